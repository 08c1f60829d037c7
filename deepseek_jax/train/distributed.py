"""Joining several processes into one JAX runtime (`jax.distributed.initialize`)."""

from __future__ import annotations

import threading

import jax

from deepseek_jax.config import DistributedConfig

_initialized = False


def initialize(cfg: DistributedConfig) -> None:
    """Start the multi-process runtime once. Arguments left null are found by JAX from the
    environment (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, SLURM, Cloud TPU).
    Must run before anything touches a device."""
    global _initialized
    if not cfg.enabled or _initialized:
        return
    # Cross-process collectives between CPU devices need an implementation named; GPU and TPU
    # backends ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
    # A short heartbeat timeout bounds how long the survivors of a crashed process wait in a
    # collective: the coordination service declares it dead and stops them with its name.
    jax.distributed.initialize(
        coordinator_address=cfg.coordinator_address,
        num_processes=cfg.num_processes,
        process_id=cfg.process_id,
        initialization_timeout=cfg.initialization_timeout_s,
        heartbeat_timeout_seconds=cfg.heartbeat_timeout_s,
    )
    _initialized = True


def shutdown(timeout_s: float = 30.0) -> bool:
    """Leave the multi-process runtime in order: every process's client meets the others at the
    coordination service's shutdown barrier before process 0 stops the service, so no client is
    left talking to a coordinator that is gone (its gRPC error would be its last words). Waits at
    most `timeout_s`: a peer that never arrives must not hang an exit. Returns whether the
    shutdown finished; a no-op without `initialize`."""
    if not _initialized:
        return True
    leaving = threading.Thread(target=jax.distributed.shutdown, daemon=True)
    leaving.start()
    leaving.join(timeout_s)
    return not leaving.is_alive()
