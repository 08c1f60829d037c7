"""TPU chips (peak figures from Cloud TPU documentation) and topology names (`v5p-512`).

Per-chip figures, bf16. ICI is the chip's total bandwidth in one direction over all its links
(what a collective that keeps every link busy could reach): half the documented bidirectional
figure, or the documented Gbps / 8.

Sources (read 2026-12):
- v4:  https://cloud.google.com/tpu/docs/v4 (275 TFLOP/s bf16, 32 GiB HBM2 at 1200 GB/s). ICI is
       not on that page: 6 links per chip at 400 Gbit/s each direction (the TPU v4 paper, as
       summarised at https://glennklockwood.com/garden/processors/TPUv4) = 300 GB/s.
- v5e: https://cloud.google.com/tpu/docs/v5e (197 TFLOP/s, 16 GB HBM2 at 819 GB/s, ICI 400 GB/s
       bidirectional per chip = 1600 Gbps).
- v5p: https://cloud.google.com/tpu/docs/v5p (459 TFLOP/s, 95 GiB HBM2e at 2765 GB/s, ICI
       1200 GB/s bidirectional per chip = 4800 Gbps).
- v6e: https://cloud.google.com/tpu/docs/v6e (918 TFLOP/s, 32 GB HBM at 1640 GB/s, ICI 800 GB/s
       bidirectional per chip).
HBM capacity is what the docs state; the compiler's own limit (slightly different, e.g. 95.74 GiB
on v5p) decides "fits", and `plan` prints it when a program does not fit.
"""

from __future__ import annotations

import dataclasses
import os
import re

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_bf16_flops: float  # FLOP/s
    hbm_bytes: float
    hbm_bandwidth: float  # bytes/s
    ici_bandwidth: float  # bytes/s, one direction, all links of one chip
    cores_per_chip: int  # TensorCores: the "-N" in v4-N / v5p-N counts these
    chip_config: str  # libtpu chip_config_name
    device_kind: str  # jax Device.device_kind of the compile-only devices


CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 275e12, 32 * GiB, 1200e9, 300e9, 2, "megacore", "TPU v4"),
    "v5e": Chip("v5e", 197e12, 16e9, 819e9, 200e9, 1, "default", "TPU v5 lite"),
    "v5p": Chip("v5p", 459e12, 95 * GiB, 2765e9, 600e9, 2, "megacore", "TPU v5"),
    "v6e": Chip("v6e", 918e12, 32e9, 1640e9, 400e9, 1, "default", "TPU v6 lite"),
}

# Slice shapes by chip count (Cloud TPU docs' supported topologies).
_SHAPES_3D = {
    4: (2, 2, 1),
    8: (2, 2, 2),
    16: (2, 2, 4),
    32: (2, 4, 4),
    64: (4, 4, 4),
    128: (4, 4, 8),
    256: (4, 8, 8),
    512: (8, 8, 8),
    1024: (8, 8, 16),
    2048: (8, 16, 16),
    4096: (16, 16, 16),
}
_SHAPES_2D = {
    1: (1, 1),
    4: (2, 2),
    8: (2, 4),
    16: (4, 4),
    32: (4, 8),
    64: (8, 8),
    128: (8, 16),
    256: (16, 16),
}


class TopologyError(ValueError):
    """A topology name that is not a known TPU slice."""


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as the user wrote it
    chip: Chip
    shape: tuple[int, ...]

    @property
    def chips(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def libtpu_name(self) -> str:
        return f"{self.chip.name}:{'x'.join(map(str, self.shape))}"

    def devices(self) -> list:
        """Compile-only TPU devices of this slice (one per chip; needs libtpu)."""
        from jax.experimental import topologies

        # Compile-only use: let several processes on one machine load libtpu at once.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        bounds = (1, 1, 1) if self.chips == 1 else (2, 2, 1)
        desc = topologies.get_topology_desc(
            platform="tpu",
            topology_name=self.libtpu_name,
            chip_config_name=self.chip.chip_config,
            chips_per_host_bounds=bounds,
            num_slices=1,
        )
        return list(desc.devices)


def parse_topology(name: str) -> Topology:
    """`v5p-512` (v4/v5p count TensorCores, 2 per chip; v5e/v6e count chips) or `v5p:8x8x4`."""
    m = re.fullmatch(r"(v4|v5e|v5p|v6e)[:-](\d+(?:x\d+)*)", name.strip().lower())
    if not m:
        raise TopologyError(
            f"topology {name!r}: expected e.g. v5p-512, v4-128, v5e-256, v6e-64 or v5p:8x8x4"
        )
    chip = CHIPS[m.group(1)]
    spec = m.group(2)
    if "x" in spec or ":" in name:
        shape = tuple(int(s) for s in spec.split("x"))
        return Topology(name, chip, shape)
    count = int(spec)
    if count % chip.cores_per_chip:
        raise TopologyError(
            f"topology {name!r}: {chip.name}-N counts TensorCores ({chip.cores_per_chip} per "
            "chip), so N must be even"
        )
    chips = count // chip.cores_per_chip
    table = _SHAPES_3D if chip.cores_per_chip == 2 else _SHAPES_2D
    if chips not in table:
        sizes = ", ".join(f"{chip.name}-{n * chip.cores_per_chip}" for n in table)
        raise TopologyError(f"topology {name!r}: no {chips}-chip slice; known sizes: {sizes}")
    return Topology(name, chip, table[chips])
