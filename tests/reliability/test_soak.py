"""Issue 11 item 8, a short soak (bench/soak.py): an 8-step run interrupted three times (SIGTERM,
SIGKILL at a random step, SIGKILL while a checkpoint is being written) ends with every logged
loss and the final parameters bitwise equal to an uninterrupted run's (CPU)."""

from __future__ import annotations

from .helpers import env, load_soak


def test_short_soak_ends_bitwise_where_an_uninterrupted_run_ends(tmp_path, jax_cache):
    soak = load_soak()
    figures = soak.soak(
        str(tmp_path / "soak"),
        steps=8,
        checkpoint_every=2,
        restarts=3,
        seed=-1,  # the kinds in order: sigterm, sigkill, sigkill_saving
        env=env(jax_cache),
        step_timeout=300,
    )
    print(figures)
    assert figures["restarts"] == 3
    assert (figures["sigterm"], figures["sigkill"]) == (1, 2)
    assert figures["exit_codes"][:3] == [75, -9, -9] and figures["exit_codes"][-1] == 0
    assert figures["logged_steps_equal"] and figures["losses_equal"]
    assert figures["params_equal"] and figures["all_finite"]
