"""The training loop behind `deepseek-jax train`.

Mesh and train state (fresh, from given weights (`train.init_from`), or restored from the run
directory's latest checkpoint onto the current mesh), per-process data, the jitted step,
held-out evaluation, metrics to `metrics.jsonl` and TensorBoard, a progress bar, asynchronous
Orbax checkpoints, a final checkpoint on SIGTERM / SIGINT (`signals.py`), the numerical guard
(`guard.py`), and the run-folder and configuration checks done before compiling (`rundir.py`,
`preflight.py`). How a run ends, and its exit code, is in `deepseek_jax.errors`.
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

from deepseek_jax import sharding
from deepseek_jax.checkpoint import Checkpointer, abstract_like
from deepseek_jax.checkpoint.training import NonFiniteState
from deepseek_jax.config import Config, ConfigError, to_dict
from deepseek_jax.data import make_iterator, make_source
from deepseek_jax.errors import DataError, Diverged, Interrupted, Preempted
from deepseek_jax.train import distributed, preflight, rundir
from deepseek_jax.train.flops import measure_peak_flops, train_flops_per_token
from deepseek_jax.train.guard import Guard
from deepseek_jax.train.optim import learning_rate
from deepseek_jax.train.signals import NAMES, StopSignals
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


def data_iterators(
    cfg: Config, rows: tuple[int, int], log: Callable[[str], None] = lambda _: None
) -> tuple[Iterator, Callable[[], Iterator]]:
    """This process's training iterator and a factory of fresh held-out iterators.

    Process i of n reads only its share of the documents and yields the batch rows its devices
    hold, rows [i·B/n, (i+1)·B/n) of the global batch. The source is indexed and every record
    checked once, here, before anything compiles (`data.on_bad_record`); the first training
    batch and, when evaluation is on, the first held-out batch are read as a check too.
    """
    start, stop = rows
    index, count = jax.process_index(), jax.process_count()
    if (stop - start) * count != cfg.train.batch_size or start != index * (stop - start):
        raise ValueError(
            f"process {index} of {count} holds batch rows [{start}, {stop}); the data pipeline "
            "expects each process to hold an equal, ordered share"
        )
    source = None if cfg.data.kind == "synthetic" else make_source(cfg.data)
    if source is not None:
        bad = getattr(source, "bad_records", 0)
        log(
            f"data: {source!r}"
            + (f"; {bad} bad record(s) skipped (data.on_bad_record=skip)" if bad else "")
        )

    def make(split: str) -> Iterator:
        return make_iterator(
            cfg.data,
            cfg.train.seq_len,
            stop - start,
            index,
            count,
            split,
            model=cfg.model,
            source=source,
            log=log if split == "train" else None,
        )

    if cfg.train.eval_every:
        try:
            next(make("eval"))
        except StopIteration:
            raise DataError(f"data: the held-out split of {source!r} yields no batch") from None
    return make("train"), lambda: make("eval")


def _scalarize(metrics: dict) -> dict:
    out = {}
    for k, v in metrics.items():
        v = np.asarray(v)
        out[k] = v.item() if v.ndim == 0 else v.tolist()
    return out


def _keep_lines_up_to(path: str, step: int) -> int:
    """On resume, drop metrics logged after the checkpoint (those steps run again); returns how
    many lines were dropped."""
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    keep = [line for line in lines if _logged_step(line) <= step]
    if len(keep) < len(lines):
        with open(path, "w") as f:
            f.writelines(keep)
    return len(lines) - len(keep)


def _logged_step(line: str) -> float:
    """The step of a metrics line; a line cut short by a kill counts as never logged."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


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
    run's (ModelConfig: the architecture; runtime knobs and init_std may differ)."""
    from flax import nnx

    from deepseek_jax.checkpoint import check_same_model, load, resolve
    from deepseek_jax.model.moe import RouterBias

    source = resolve(path)
    check_same_model(source.model, trainer.cfg.model, f"train.init_from={path}")
    ours = trainer.cfg.runtime
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
    (also appended to <run_dir>/metrics.jsonl).

    Raises a UserError / ConfigError / CheckpointError for a mistake found before compiling,
    Diverged after train.max_bad_steps non-finite steps in a row, and Preempted / Interrupted
    after saving a checkpoint on SIGTERM / SIGINT (see `deepseek_jax.errors` for exit codes)."""
    preflight.check_config(cfg)
    # Before the signal handlers: JAX's runtime installs its own SIGTERM notifier, which ours
    # then replace (the loop, not Orbax's preemption sync, decides when to save).
    distributed.initialize(cfg.distributed)
    with StopSignals() as signals:
        return _train(cfg, log, signals)


def _train(cfg: Config, log: Callable[[str], None] | None, signals: StopSignals) -> list[dict]:
    tc = cfg.train
    is_main = jax.process_index() == 0
    log = log or (lambda msg: tqdm.tqdm.write(msg) if is_main else None)
    rundir.prepare(tc, log)
    mesh = sharding.make_mesh(cfg.mesh)
    trainer = Trainer.create(cfg, sharding.Sharding(mesh, sharding.rules_for(cfg.mesh.rules)))
    state_shapes = preflight.state_shapes(trainer)
    preflight.check_shardable(cfg, trainer.batch_sharding, trainer.state_shardings, state_shapes)
    rows = process_rows(trainer.batch_sharding, tc.batch_size, tc.seq_len)
    train_iter, make_eval_iter = data_iterators(cfg, rows, log)

    ckpt = Checkpointer(
        os.path.join(tc.run_dir, "checkpoints"),
        every=tc.checkpoint_every,
        keep=tc.keep_checkpoints,
        async_save=tc.async_checkpointing,
        max_failures=tc.max_save_failures,
        log=log,
    )
    ckpt.check_room(state_shapes)  # room for one checkpoint, before compiling
    metrics_path = os.path.join(tc.run_dir, "metrics.jsonl")
    if tc.resume and ckpt.latest_step() is not None:
        abstract = abstract_like(trainer.state_shardings, state_shapes)
        state = ckpt.restore(abstract, cfg, train_iter)
        start = int(jax.device_get(state.step))
        if tc.steps < start:
            raise ConfigError(
                f"train.steps={tc.steps} is below step {start} of the checkpoint being resumed in "
                f"{ckpt.directory}: set train.steps >= {start}, or start afresh with "
                "train.resume=false train.overwrite=true"
            )
        log(f"resumed from the checkpoint at step {start} in {ckpt.directory}")
        _announce_schedule_change(ckpt, start, cfg, log)
        if tc.init_from:
            log(f"train.init_from={tc.init_from} ignored: resuming takes precedence")
    elif tc.init_from:
        state, start = state_from_weights(trainer, tc.init_from), 0
        log(f"starting from the weights in {tc.init_from} (fresh optimizer, step 0)")
    else:
        state, start = trainer.init(), 0
    if is_main:
        with open(os.path.join(tc.run_dir, "config.json"), "w") as f:
            json.dump(to_dict(cfg), f, indent=1)
        dropped = _keep_lines_up_to(metrics_path, start)
        if dropped:
            log(f"metrics.jsonl: {dropped} line(s) logged after step {start} dropped (re-run)")

    step_fn = trainer.jitted_step()
    n_devices = jax.device_count()
    peak = tc.peak_flops_per_device or measure_peak_flops(cfg.runtime.compute_dtype)
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
    guard = Guard(tc, log)
    bar = tqdm.tqdm(
        total=tc.steps, initial=start, disable=not (is_main and tc.progress_bar), mininterval=1
    )
    try:
        with open(metrics_path, "a") if is_main else open(os.devnull, "w") as out:
            last, last_step = time.perf_counter(), start
            stopping = 0
            while step < tc.steps:
                batch = to_global(next(train_iter), trainer.batch_sharding, tc.batch_size)
                state, metrics = step_fn(state, batch)
                step += 1
                # A failed background save is reported here, at the first step boundary after
                # its write has ended (see Checkpointer.poll).
                ckpt.poll()
                bar.update(1)
                guard.watch(step, metrics)
                guard.settle(newest_too=False)  # the previous step, while this one runs
                stopping = signals.agreed()
                logging_now = step % tc.log_every == 0 or step == tc.steps or stopping
                saving_now = step % tc.checkpoint_every == 0 or step == tc.steps or stopping
                if logging_now or saving_now:
                    guard.settle()
                if logging_now:
                    m = _scalarize(jax.device_get(metrics))
                    now = time.perf_counter()
                    # Time since the previous log line, so the first one includes compilation.
                    seconds, steps_done = now - last, step - last_step
                    last, last_step = now, step
                    m["tokens_per_sec"] = m["tokens"] * steps_done / seconds
                    m["mfu"] = m["tokens_per_sec"] * flops_per_token / (peak * n_devices)
                    m["step"], m["seconds"] = step, seconds
                    m["bad_steps_total"] = guard.bad_total
                    if tc.eval_every and step % tc.eval_every == 0:
                        m["eval_loss"] = evaluate(
                            trainer, state, make_eval_iter, tc.eval_batches, tc.batch_size
                        )
                    history.append(m)
                    out.write(json.dumps(m) + "\n")
                    out.flush()
                    bar.set_postfix(loss=f"{m['loss']:.4g}", tok_s=f"{m['tokens_per_sec']:.0f}")
                    if writer is not None:
                        _tensorboard(writer, m)
                    log(_line(m))
                if saving_now and guard.bad_run and not stopping:
                    log(f"step {step}: no checkpoint while steps are being skipped as non-finite")
                elif saving_now:
                    _save(ckpt, step, state, cfg, train_iter)
                if stopping:
                    break
            guard.settle()
        ckpt.close()  # waits for the last save; CheckpointError if it failed
    except Diverged as e:
        ckpt.abandon()  # saves already started are good ones: let them finish
        newest = ckpt.latest_step()
        where = (
            f"the newest checkpoint is step {newest} in {ckpt.directory}"
            if newest is not None
            else "there is no checkpoint yet"
        )
        raise Diverged(
            f"{e}; no checkpoint was written from them, {where}. Lower "
            "train.learning_rate or raise train.warmup_steps / train.grad_clip, then resume",
            e.step,
        ) from None
    finally:
        bar.close()
        if writer is not None:
            writer.close()
        # After any error too: nothing of Orbax is left running (or printing) when the error
        # reaches the CLI's one line and the interpreter exits.
        ckpt.abandon()
    if stopping:
        name = NAMES.get(stopping, f"signal {stopping}")
        kind = Preempted if stopping == signal.SIGTERM else Interrupted
        raise kind(
            f"{name}: saved a checkpoint at step {step} in {ckpt.directory}; run the same "
            f"command to resume (exit code {kind.exit_code})",
            step,
        )
    if is_main:
        _summary(tc, ckpt, metrics_path, writer is not None, guard, log)
    return history


def _save(ckpt: Checkpointer, step: int, state, cfg: Config, train_iter) -> None:
    """Save `state` (asynchronously); a state holding a non-finite value ends the run."""
    try:
        # Decided here rather than by Orbax, which would also save the first step.
        ckpt.save(step, state, cfg, train_iter, force=True)
    except NonFiniteState:  # the Checkpointer's check, the only one: nothing was written
        raise Diverged(
            f"training diverged: the state at step {step} holds non-finite values although "
            "every applied step had a finite loss and gradient norm (an update overflowed)",
            step,
        ) from None


def _announce_schedule_change(ckpt: Checkpointer, step: int, cfg: Config, log) -> None:
    """Resuming with another schedule length is allowed (a run is often extended), but said."""
    try:
        saved = ckpt.saved_config(step).train
    except Exception:  # an older checkpoint without a readable config: nothing to compare
        return
    tc = cfg.train
    keys = ("steps", "warmup_steps", "learning_rate", "min_learning_rate")
    changed = [k for k in keys if getattr(saved, k) != getattr(tc, k)]
    if changed:
        before, after = float(learning_rate(saved, step)), float(learning_rate(tc, step))
        what = ", ".join(f"train.{k} {getattr(saved, k)} -> {getattr(tc, k)}" for k in changed)
        log(
            f"the learning-rate schedule changed since the checkpoint ({what}): it is "
            f"recomputed, the learning rate at step {step} goes from {before:.3e} to {after:.3e}"
        )


def _summary(tc, ckpt: Checkpointer, metrics_path: str, tensorboard: bool, guard, log) -> None:
    lines = [
        f"done: {tc.steps} steps; {guard.bad_total} skipped as non-finite, "
        f"{guard.spikes} loss spike(s) logged",
        f"  checkpoints  {ckpt.directory} (steps {ckpt.all_steps()})",
        f"  metrics      {metrics_path}",
    ]
    if tensorboard:
        events = os.path.join(tc.run_dir, "tensorboard")
        lines.append(f"  TensorBoard  tensorboard --logdir {events}")
    lines.append(f"  plots        deepseek-jax plot {tc.run_dir}")
    log("\n".join(lines))


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
