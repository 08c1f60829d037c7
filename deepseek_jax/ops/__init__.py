"""Kernels behind one seam each: every option is chosen by a runtime knob and tested against the
plain XLA path."""
