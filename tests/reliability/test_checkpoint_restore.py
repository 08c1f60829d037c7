"""Issue 11 item 2, checkpoints that are always restorable: resume takes the newest complete and
readable step and names each step it skipped; rotation never deletes the newest good checkpoint;
a save that fails (full disk, a write refused by the OS) is reported at once with the path,
training goes on, the next save retries, and max_save_failures failures in a row stop the run.

The full disk is a real one: a small tmpfs mounted for the test (this needs root; without it
that test is reported as skipped). The failed background write is real too: the training
process runs under a file-size limit (RLIMIT_FSIZE), so the kernel refuses Orbax's writes with
EFBIG while training goes on; no error is injected in Python."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

import pytest

from .helpers import REPO, TINY, checkpoint_steps, env, failure, metrics, run_train, train_cmd


def _copy_step(run, src: int, dst: int) -> pathlib.Path:
    out = run / "checkpoints" / str(dst)
    shutil.copytree(run / "checkpoints" / str(src), out)
    return out


def test_resume_skips_empty_half_written_truncated_and_corrupted_steps(tmp_path, jax_cache):
    run = tmp_path / "run"
    first = run_train(
        jax_cache,
        "train.steps=4",
        "train.checkpoint_every=2",
        "train.keep_checkpoints=10",
        f"train.run_dir={run}",
    )
    assert first.returncode == 0, failure(first)
    assert checkpoint_steps(run) == [2, 4]
    # Four newer steps, each broken in its own way.
    (run / "checkpoints" / "6").mkdir()  # empty: a crash right after the rename
    os.remove(_copy_step(run, 4, 8) / "state" / "_METADATA")  # half-written
    truncated = _copy_step(run, 4, 10)
    for data in (truncated / "state").rglob("d/*"):
        if data.is_file():
            with open(data, "r+b") as f:
                f.truncate(data.stat().st_size // 2)
    (_copy_step(run, 4, 12) / "state" / "_METADATA").write_text("{not json")  # corrupted

    resumed = run_train(
        jax_cache,
        "train.steps=6",
        "train.checkpoint_every=2",
        "train.keep_checkpoints=10",
        f"train.run_dir={run}",
    )
    assert resumed.returncode == 0, failure(resumed)
    out = resumed.stdout
    ckpts = f"{run}/checkpoints"
    skips = [line for line in out.splitlines() if line.startswith("skipped checkpoint step")]
    assert len(skips) == 4, out
    assert skips[0].startswith(f"skipped checkpoint step 12 in {ckpts}: unreadable (")
    assert skips[1].startswith(f"skipped checkpoint step 10 in {ckpts}: unreadable (")
    assert skips[2] == f"skipped checkpoint step 8 in {ckpts}: half-written (no state/_METADATA)"
    assert skips[3] == f"skipped checkpoint step 6 in {ckpts}: empty directory"
    assert f"resumed from the checkpoint at step 4 in {ckpts}" in out
    assert [m["step"] for m in metrics(run)] == [1, 2, 3, 4, 5, 6]
    # The skipped steps are kept aside, out of the way of the new step 6.
    assert checkpoint_steps(run) == [2, 4, 6]
    assert sorted(os.listdir(run / "rejected_checkpoints")) == ["10", "12", "6", "8"]


def _mount_tmpfs(path: pathlib.Path, size: int) -> bool:
    path.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    return done.returncode == 0


def _state_bytes() -> int:
    """Bytes of the TINY train state (what the checkpoint room check asks for)."""
    import jax

    from deepseek_jax import sharding
    from deepseek_jax.checkpoint.training import state_nbytes
    from deepseek_jax.config import load_config
    from deepseek_jax.train import preflight
    from deepseek_jax.train.step import Trainer

    cfg = load_config("tiny", [*TINY, "mesh.fsdp=1"])
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    trainer = Trainer.create(cfg, sharding.Sharding(mesh, sharding.rules_for(cfg.mesh.rules)))
    return state_nbytes(preflight.state_shapes(trainer))


def test_full_disk_keeps_the_newest_good_checkpoint_and_stops_after_n_failures(tmp_path, jax_cache):
    state = _state_bytes()
    disk = tmp_path / "disk"
    # Room for the room check and the first checkpoint, not for a second one beside it.
    if not _mount_tmpfs(disk, int(state * 1.6)):
        pytest.skip("mounting a tmpfs needs root; the file-size-limit test covers write failures")
    try:
        run = disk / "run"
        overrides = ["train.checkpoint_every=2", "train.keep_checkpoints=1", f"train.run_dir={run}"]
        result = run_train(jax_cache, "train.steps=10", "train.max_save_failures=3", *overrides)
        assert result.returncode == 2, failure(result)
        lines = result.stdout.splitlines()
        ckpts = f"{run}/checkpoints"
        failed = [i for i, line in enumerate(lines) if "checkpoint save of step" in line]
        assert [lines[i].split()[4] for i in failed] == ["4", "6", "8"], result.stdout
        for n, i in enumerate(failed, start=1):
            assert f"to {ckpts} failed: no room for a checkpoint in {ckpts}" in lines[i]
            assert f"(failure {n} of at most 3 in a row; training goes on" in lines[i]
            assert "newest checkpoint: step 2)" in lines[i]
            # Reported at once: before the next step's line, and training went on after it.
            step = int(lines[i].split()[4])
            if n < 3:
                assert lines[i + 1].startswith(f"step {step + 1:>6} loss"), lines[i : i + 2]
        assert result.stderr.startswith("deepseek-jax: error: 3 checkpoint saves in a row failed")
        assert "The newest checkpoint is step 2: free space" in result.stderr
        # The newest good checkpoint survived rotation and failures; nothing half-written stays.
        assert checkpoint_steps(run) == [2]
        assert os.listdir(run / "checkpoints") == ["2"]
        assert [m["step"] for m in metrics(run)] == list(range(1, 9))

        # With room again, the same command resumes from step 2 and saves.
        subprocess.run(["mount", "-o", f"remount,size={state * 4}", str(disk)], check=True)
        again = run_train(jax_cache, "train.steps=6", *overrides)
        assert again.returncode == 0, failure(again)
        assert f"resumed from the checkpoint at step 2 in {ckpts}" in again.stdout
        assert checkpoint_steps(run) == [6]

        # A read-only disk is refused at start, with the path, before compiling.
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        ro = run_train(jax_cache, "train.steps=8", *overrides)
        assert ro.returncode == 2, failure(ro)
        assert ro.stderr.count("\n") == 1 and str(run) in ro.stderr
        assert "Read-only file system" in ro.stderr
        assert "training steps" not in ro.stdout  # stopped before compiling
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_a_failed_background_write_is_reported_at_once_and_retried(tmp_path, jax_cache):
    """Every checkpoint data file is bigger than the limit, so every asynchronous save fails
    inside Orbax's background thread; the run reports each one at the first step boundary after
    the write ended (at the latest before the next save starts), removes its temporary
    directory, stops after train.max_save_failures, and its stderr ends with its one line."""
    run = tmp_path / "run"
    cmd = train_cmd(
        "train.steps=8",
        "train.checkpoint_every=2",
        "train.max_save_failures=3",
        "train.async_checkpointing=true",
        f"train.run_dir={run}",
    )
    # Writes past 512 KiB fail with EFBIG (Python ignores SIGXFSZ; the trap makes it explicit).
    # The compilation cache is only read here: its writes may fail too, with a warning.
    limited = ["bash", "-c", 'trap "" XFSZ; ulimit -f 512; exec "$@"', "bash", *cmd]
    result = subprocess.run(
        limited, cwd=REPO, env=env(jax_cache), capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 2, failure(result)
    lines = result.stdout.splitlines()
    failed = [i for i, line in enumerate(lines) if "checkpoint save of step" in line]
    assert [lines[i].split()[4] for i in failed] == ["2", "4", "6"], result.stdout
    for i in failed:
        assert f"to {run}/checkpoints failed: " in lines[i]
        # EFBIG: the OS's text, or TensorStore's code for it when the message ends in a spec.
        assert "File too large" in lines[i] or "OUT_OF_RANGE" in lines[i], lines[i]
        # After the step that saved, and before the step after the next save: when exactly in
        # between depends on how long the background write takes.
        step = int(lines[i].split()[4])
        step_lines = [n for n, line in enumerate(lines) if line.startswith("step ")]
        before = [int(lines[n].split()[1]) for n in step_lines if n < i]
        assert step <= before[-1] <= step + 2, lines
        print(f"\n[ckpt] background save of step {step} failed; reported after step {before[-1]}")
    # Orbax logs the failed writes' tracebacks to stderr while the run goes on; the run then
    # closes Orbax and waits for its writer threads, so its own one-line error comes last.
    err = result.stderr.splitlines()
    assert err[-1].startswith("deepseek-jax: error: 3 checkpoint saves in a row failed"), err[-20:]
    assert sum(ln.startswith("deepseek-jax: error:") for ln in err) == 1
    assert os.listdir(run / "checkpoints") == []  # no temporary directory left behind
    # Steps went on after each failure; the third stops the run at step 7 or 8, before the
    # stopping step is logged when noticed between steps.
    steps = [m["step"] for m in metrics(run)]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 6, steps
