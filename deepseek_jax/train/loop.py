"""The training loop behind `deepseek-jax train`: mesh, state, batches, step, metrics.jsonl."""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import numpy as np

from deepseek_jax import sharding
from deepseek_jax.config import Config, to_dict
from deepseek_jax.train import distributed
from deepseek_jax.train.flops import measure_peak_flops, train_flops_per_token
from deepseek_jax.train.step import Trainer
from deepseek_jax.train.synthetic import MarkovTokens


def process_rows(batch_sharding, global_rows: int, seq_len: int) -> tuple[int, int]:
    """The contiguous range of global batch rows that this process's devices hold."""
    index_map = batch_sharding.addressable_devices_indices_map((global_rows, seq_len))
    spans = sorted({(idx[0].start or 0, idx[0].stop or global_rows) for idx in index_map.values()})
    start, stop = spans[0][0], spans[-1][1]
    covered = sum(b - a for a, b in spans)
    if covered != stop - start:
        raise ValueError(f"this process's batch rows are not contiguous: {spans}")
    return start, stop


def global_batch(source: MarkovTokens, step: int, batch_sharding, global_rows: int) -> dict:
    """Build only this process's rows and assemble the global, sharded batch arrays."""
    start, stop = process_rows(batch_sharding, global_rows, source.seq_len)
    local = source.rows(step, start, stop)
    shape = (global_rows, source.seq_len)
    return {
        k: jax.make_array_from_process_local_data(batch_sharding, v, shape)
        for k, v in local.items()
    }


def _scalarize(metrics: dict) -> dict:
    out = {}
    for k, v in metrics.items():
        v = np.asarray(v)
        out[k] = v.item() if v.ndim == 0 else v.tolist()
    return out


def train(cfg: Config, log=print) -> list[dict]:
    """Run cfg.train.steps steps; returns the logged metrics (also in run_dir/metrics.jsonl)."""
    distributed.initialize(cfg.distributed)
    tc = cfg.train
    mesh = sharding.make_mesh(cfg.mesh)
    sh = sharding.Sharding(mesh, sharding.rules_for(cfg.mesh.rules))
    trainer = Trainer.create(cfg, sh)
    state = trainer.init()
    step_fn = trainer.jitted_step()
    source = MarkovTokens(cfg.model.vocab_size, tc.seq_len, tc.seed)

    n_devices = jax.device_count()
    peak = tc.peak_flops_per_device or measure_peak_flops(cfg.model.compute_dtype)
    flops_per_token = train_flops_per_token(cfg.model, tc.seq_len)
    is_main = jax.process_index() == 0
    if is_main:
        os.makedirs(tc.run_dir, exist_ok=True)
        with open(os.path.join(tc.run_dir, "config.json"), "w") as f:
            json.dump(to_dict(cfg), f, indent=1)
    metrics_path = os.path.join(tc.run_dir, "metrics.jsonl")
    history = []
    log(
        f"training {tc.steps} steps on {n_devices} device(s), mesh {dict(mesh.shape)}, "
        f"rules {cfg.mesh.rules}; {flops_per_token / 1e6:.1f} MFLOP/token"
    )
    with open(metrics_path, "w") if is_main else open(os.devnull, "w") as out:
        last, last_step = time.perf_counter(), 0
        for step in range(tc.steps):
            batch = global_batch(source, step, trainer.batch_sharding, tc.batch_size)
            state, metrics = step_fn(state, batch)
            if (step + 1) % tc.log_every and step + 1 != tc.steps:
                continue
            m = _scalarize(jax.device_get(metrics))
            now = time.perf_counter()
            # Time since the last log line, so the first one includes compilation.
            seconds, steps_done = now - last, step + 1 - last_step
            last, last_step = now, step + 1
            m["tokens_per_sec"] = m["tokens"] * steps_done / seconds
            m["mfu"] = m["tokens_per_sec"] * flops_per_token / (peak * n_devices)
            m["step"] = step + 1
            m["seconds"] = seconds
            history.append(m)
            out.write(json.dumps(m) + "\n")
            out.flush()
            log(
                f"step {step + 1:>5} loss {m['loss']:.4f} lm {m['lm_loss']:.4f} "
                f"mtp {[round(x, 4) for x in m['mtp_loss']]} grad_norm {m['grad_norm']:.3f} "
                f"lr {m['learning_rate']:.2e} tok/s {m['tokens_per_sec']:.0f} mfu {m['mfu']:.2%}"
            )
    sys.stdout.flush()
    return history
