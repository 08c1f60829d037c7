"""The training loop behind `deepseek-jax train`.

Mesh and train state (fresh, from given weights (`train.init_from`), or restored from the run
directory's latest checkpoint onto the current mesh), per-process data, the jitted step,
held-out evaluation, metrics to `metrics.jsonl` and TensorBoard, a progress bar, asynchronous
Orbax checkpoints, and a final checkpoint on SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator

import jax
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from deepseek_jax import sharding
from deepseek_jax.checkpoint import Checkpointer, abstract_like
from deepseek_jax.config import Config, to_dict
from deepseek_jax.data import make_iterator
from deepseek_jax.train import distributed
from deepseek_jax.train.flops import measure_peak_flops, train_flops_per_token
from deepseek_jax.train.step import Trainer, TrainState


def process_rows(batch_sharding, global_rows: int, seq_len: int) -> tuple[int, int]:
    """The contiguous range of global batch rows that this process's devices hold."""
    index_map = batch_sharding.addressable_devices_indices_map((global_rows, seq_len))
    spans = sorted({(idx[0].start or 0, idx[0].stop or global_rows) for idx in index_map.values()})
    start, stop = spans[0][0], spans[-1][1]
    covered = sum(b - a for a, b in spans)
    if covered != stop - start:
        raise ValueError(f"this process's batch rows are not contiguous: {spans}")
    return start, stop


def to_global(local: dict[str, np.ndarray], batch_sharding, global_rows: int) -> dict:
    """Assemble the sharded global batch from this process's rows."""
    return {
        k: jax.make_array_from_process_local_data(batch_sharding, v, (global_rows,) + v.shape[1:])
        for k, v in local.items()
    }


def data_iterators(cfg: Config, rows: tuple[int, int]) -> tuple[Iterator, Callable[[], Iterator]]:
    """This process's training iterator and a factory of fresh held-out iterators.

    Process i of n reads only its share of the documents and yields the batch rows its devices
    hold, rows [i·B/n, (i+1)·B/n) of the global batch.
    """
    start, stop = rows
    index, count = jax.process_index(), jax.process_count()
    if (stop - start) * count != cfg.train.batch_size or start != index * (stop - start):
        raise ValueError(
            f"process {index} of {count} holds batch rows [{start}, {stop}); the data pipeline "
            "expects each process to hold an equal, ordered share"
        )

    def make(split: str) -> Iterator:
        return make_iterator(
            cfg.data, cfg.train.seq_len, stop - start, index, count, split, model=cfg.model
        )

    return make("train"), lambda: make("eval")


class _Stop:
    """Turns SIGTERM into a flag the loop checks between steps (and agrees on across hosts)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not in the main thread: no handler, no graceful stop
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def agreed(self) -> bool:
        if jax.process_count() == 1:
            return self.requested
        flags = multihost_utils.process_allgather(np.array(self.requested))
        return bool(np.any(flags))


def _scalarize(metrics: dict) -> dict:
    out = {}
    for k, v in metrics.items():
        v = np.asarray(v)
        out[k] = v.item() if v.ndim == 0 else v.tolist()
    return out


def _keep_lines_up_to(path: str, step: int) -> None:
    """On resume, drop metrics logged after the checkpoint (those steps run again)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(lines)


def evaluate(trainer: Trainer, state, make_iter, n_batches: int, global_rows: int) -> float:
    """Mean next-token loss over `n_batches` fresh held-out batches."""
    eval_fn = trainer.jitted_eval_step()
    it = make_iter()
    total, count = 0.0, 0.0
    for _ in range(n_batches):
        out = jax.device_get(
            eval_fn(state, to_global(next(it), trainer.batch_sharding, global_rows))
        )
        total, count = total + float(out["lm"]), count + float(out["tokens"])
    return total / max(count, 1.0)


def state_from_weights(trainer: Trainer, path: str) -> TrainState:
    """Step 0 and a fresh optimizer around the params and router biases at `path` (a converted
    directory, a training run or an HF checkpoint), loaded onto the trainer's mesh by its rules
    (Orbax checkpoints shard by shard, see `deepseek_jax.load`).

    Raises CheckpointError, before reading any weights, if their model differs from the
    run's in anything but dtypes, scan_layers, remat or init_std."""
    from flax import nnx

    from deepseek_jax.checkpoint import check_same_model, load, resolve
    from deepseek_jax.model.moe import RouterBias

    source = resolve(path)
    check_same_model(source.model, trainer.cfg.model, f"train.init_from={path}")
    ours = trainer.cfg.model
    model = load(
        source,
        compute_dtype=ours.compute_dtype,
        param_dtype=ours.param_dtype,
        mesh_sharding=trainer.mesh_sharding,
    )
    _, params, biases = nnx.split(model, nnx.Param, RouterBias)
    return trainer.state_from_params(nnx.to_pure_dict(params), nnx.to_pure_dict(biases))


def train(cfg: Config, log: Callable[[str], None] | None = None) -> list[dict]:
    """Run (or resume) training up to cfg.train.steps; returns the metrics logged by this call
    (also appended to <run_dir>/metrics.jsonl)."""
    distributed.initialize(cfg.distributed)
    tc = cfg.train
    mesh = sharding.make_mesh(cfg.mesh)
    trainer = Trainer.create(cfg, sharding.Sharding(mesh, sharding.rules_for(cfg.mesh.rules)))
    rows = process_rows(trainer.batch_sharding, tc.batch_size, tc.seq_len)
    train_iter, make_eval_iter = data_iterators(cfg, rows)
    is_main = jax.process_index() == 0
    log = log or (lambda msg: tqdm.tqdm.write(msg) if is_main else None)

    ckpt = Checkpointer(
        os.path.join(tc.run_dir, "checkpoints"),
        every=tc.checkpoint_every,
        keep=tc.keep_checkpoints,
        async_save=tc.async_checkpointing,
        max_failures=tc.max_save_failures,
        log=log,
    )
    abstract = abstract_like(trainer.state_shardings, jax.eval_shape(trainer.init))
    ckpt.check_room(abstract)  # writable, with room for one checkpoint, before compiling
    metrics_path = os.path.join(tc.run_dir, "metrics.jsonl")
    if tc.resume and ckpt.latest_step() is not None:
        state = ckpt.restore(abstract, cfg, train_iter)  # newest readable; logs skipped steps
        start = int(jax.device_get(state.step))
        log(f"resumed from the checkpoint at step {start} in {ckpt.directory}")
        if tc.init_from:
            log(f"train.init_from={tc.init_from} ignored: resuming takes precedence")
    elif tc.init_from:
        state, start = state_from_weights(trainer, tc.init_from), 0
        log(f"starting from the weights in {tc.init_from} (fresh optimizer, step 0)")
    else:
        state, start = trainer.init(), 0
    if is_main:
        os.makedirs(tc.run_dir, exist_ok=True)
        with open(os.path.join(tc.run_dir, "config.json"), "w") as f:
            json.dump(to_dict(cfg), f, indent=1)
        if start:
            _keep_lines_up_to(metrics_path, start)
        elif os.path.exists(metrics_path):
            os.remove(metrics_path)

    step_fn = trainer.jitted_step()
    n_devices = jax.device_count()
    peak = tc.peak_flops_per_device or measure_peak_flops(cfg.model.compute_dtype)
    flops_per_token = train_flops_per_token(cfg.model, tc.seq_len)
    log(
        f"training steps {start}..{tc.steps} on {n_devices} device(s), mesh {dict(mesh.shape)}, "
        f"rules {cfg.mesh.rules}; {flops_per_token / 1e6:.1f} MFLOP/token"
    )
    writer = None
    if is_main and tc.tensorboard:
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(os.path.join(tc.run_dir, "tensorboard"))

    history: list[dict] = []
    step = start
    bar = tqdm.tqdm(
        total=tc.steps, initial=start, disable=not (is_main and tc.progress_bar), mininterval=1
    )
    with _Stop() as stop, open(metrics_path, "a") if is_main else open(os.devnull, "w") as out:
        last, last_step = time.perf_counter(), start
        while step < tc.steps:
            batch = to_global(next(train_iter), trainer.batch_sharding, tc.batch_size)
            state, metrics = step_fn(state, batch)
            step += 1
            ckpt.poll()  # reports a failed background save as soon as it has failed
            bar.update(1)
            stopping = stop.agreed()
            if step % tc.log_every == 0 or step == tc.steps or stopping:
                m = _scalarize(jax.device_get(metrics))
                now = time.perf_counter()
                # Time since the previous log line, so the first one includes compilation.
                seconds, steps_done = now - last, step - last_step
                last, last_step = now, step
                m["tokens_per_sec"] = m["tokens"] * steps_done / seconds
                m["mfu"] = m["tokens_per_sec"] * flops_per_token / (peak * n_devices)
                m["step"], m["seconds"] = step, seconds
                if tc.eval_every and step % tc.eval_every == 0:
                    m["eval_loss"] = evaluate(
                        trainer, state, make_eval_iter, tc.eval_batches, tc.batch_size
                    )
                history.append(m)
                out.write(json.dumps(m) + "\n")
                out.flush()
                bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{m['tokens_per_sec']:.0f}")
                if writer is not None:
                    _tensorboard(writer, m)
                log(_line(m))
            if step % tc.checkpoint_every == 0 or step == tc.steps or stopping:
                # Decided here rather than by Orbax, which would also save the first step.
                ckpt.save(step, state, cfg, train_iter, force=True)
            if stopping:
                log(f"SIGTERM: saved a checkpoint at step {step}, stopping")
                break
    bar.close()
    ckpt.close()
    if writer is not None:
        writer.close()
    return history


def _line(m: dict) -> str:
    text = (
        f"step {m['step']:>6} loss {m['loss']:.4f} lm {m['lm_loss']:.4f} "
        f"mtp {[round(x, 4) for x in m['mtp_loss']]} grad_norm {m['grad_norm']:.3f} "
        f"lr {m['learning_rate']:.2e} tok/s {m['tokens_per_sec']:.0f} mfu {m['mfu']:.2%}"
    )
    if "eval_loss" in m:
        text += f" eval {m['eval_loss']:.4f}"
    return text


def _tensorboard(writer, m: dict) -> None:
    step = m["step"]
    for key in ("loss", "lm_loss", "balance_loss", "grad_norm", "learning_rate", "eval_loss"):
        if key in m:
            writer.add_scalar(f"train/{key}" if key != "eval_loss" else "eval/loss", m[key], step)
    writer.add_scalar("perf/tokens_per_sec", m["tokens_per_sec"], step)
    writer.add_scalar("perf/mfu", m["mfu"], step)
    for k, value in enumerate(m["mtp_loss"], start=1):
        writer.add_scalar(f"train/mtp_loss_depth{k}", value, step)
    for layer, value in enumerate(m["load_imbalance"]):
        writer.add_scalar(f"moe/load_imbalance_layer{layer}", value, step)
