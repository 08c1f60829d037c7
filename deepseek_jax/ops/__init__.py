"""Kernels behind one seam each, chosen by `runtime:` config keys and checked against the plain
XLA path: `attention` (runtime.attention), `cross_entropy` (runtime.cross_entropy) and the
grouped matmul of the routed experts (runtime.grouped_matmul)."""
