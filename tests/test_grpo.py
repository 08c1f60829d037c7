"""The GRPO trainer: rollout log-probs equal the trainer's (fp32, V3-router MoE with MTP), a mesh
(data=2, expert=4) gives the same rollouts and losses as one device, config errors name the
key, and a short run on the shipped task's prompts raises the mean reward."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx
from random_weights import model_state

from deepseek_jax import sharding
from deepseek_jax.config import ConfigError
from deepseek_jax.model.moe import RouterBias
from deepseek_jax.post.config import post_config_from_dict
from deepseek_jax.post.grpo import GRPOTrainer, copy_params
from deepseek_jax.post.rollout import pack

jax.config.update("jax_default_matmul_precision", "highest")

# A V3-shaped model (sigmoid router with correction bias, 2 groups, MTP depth 1) small enough
# to compile quickly; byte vocabulary.
SMALL = {
    "model": {
        "vocab_size": 260,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_layers": 2,
        "num_heads": 2,
        "init_std": 0.02,
        "mla": {
            "q_lora_rank": 16,
            "kv_lora_rank": 16,
            "qk_nope_head_dim": 8,
            "qk_rope_head_dim": 8,
            "v_head_dim": 8,
        },
        "moe": {
            "n_routed_experts": 8,
            "n_shared_experts": 1,
            "n_experts_per_tok": 2,
            "moe_intermediate_size": 16,
            "first_k_dense_replace": 1,
            "topk_method": "noaux_tc",
            "scoring_func": "sigmoid",
            "n_group": 2,
            "topk_group": 1,
            "routed_scaling_factor": 2.5,
        },
        "mtp": {"depth": 1},
    },
    "runtime": {"compute_dtype": "float32"},
    "train": {"learning_rate": 1e-3, "min_learning_rate": 1e-3, "warmup_steps": 0},
    "mesh": {"data": 1, "fsdp": -1},
    "grpo": {
        "prompts_per_step": 4,
        "group_size": 4,
        "max_new_tokens": 12,
        "max_prompt_len": 8,
        "task_digits": 1,
        "rewards": {"tests.test_grpo:digit_share": 1.0, "accuracy": 1.0},
    },
}


def digit_share(prompt: str, completion: str, reference: str) -> float:
    """A dense reward a random model can improve on: the share of completion bytes that are
    digits (the shipped rewards give a random model nothing to climb)."""
    return sum(c.isdigit() for c in completion) / max(len(completion), 1)


def post(*overrides: str):
    return post_config_from_dict(SMALL, overrides)


def random_train_state(trainer: GRPOTrainer, seed: int = 0, std: float = 0.1):
    """Random weights (non-trivial distributions, random router biases) in a fresh state."""
    graphdef, state = model_state(trainer.cfg.model, seed, std=std)
    _, params, biases = nnx.split(nnx.merge(graphdef, state), nnx.Param, RouterBias)
    return trainer.base.state_from_params(nnx.to_pure_dict(params), nnx.to_pure_dict(biases))


@pytest.mark.parametrize("speculative", [False, True], ids=["plain", "speculative"])
def test_rollout_logps_equal_trainer_logps(speculative):
    """Plain and MTP-speculative rollouts both log each token's log-prob (speculative: from
    the verify call's logits at the token's position, after an accepted draft or a rejection)."""
    overrides = ["grpo.inner_updates=2"] + ["grpo.speculative_rollouts=true"] * speculative
    trainer = GRPOTrainer(post(*overrides))
    state = random_train_state(trainer)
    groups = trainer.collect(state, np.random.default_rng(0), jax.random.key(0))
    assert sum(map(len, groups.completions)) > 50
    assert all(0 < len(c) <= 12 for c in groups.completions)
    assert [len(lp) for lp in groups.logps] == [len(c) for c in groups.completions]
    assert groups.stats["rollout_tokens"] == sum(map(len, groups.completions))
    if speculative:  # drafts were both kept and rejected: both branches' log-probs are checked
        assert 0 < groups.stats["spec_acceptance_rate"] < 1
    state, m = trainer.step(state, None, np.random.default_rng(0), None, groups=groups)
    # Same engine, fp32: the trainer's recomputed log-probs are the rollout's up to rounding.
    assert m["logp_gap_max"] < 1e-5
    assert m["mtp_loss"][0] > 0 and 0 < m["mtp_acceptance"] < 1
    assert len(m["expert_load"]) == 2 and sum(m["expert_load"][0]) > 0  # MoE layer + MTP


def test_pack_masks_prompt_and_padding():
    b = pack(
        [[5, 6, 7], [8]],
        [[9, 1], [10, 11, 12]],
        seq_len=6,
        pad_id=2,
        logps=[[-1, -2], [-3, -4, -5]],
    )
    np.testing.assert_array_equal(b["tokens"], [[5, 6, 7, 9, 1, 2], [8, 10, 11, 12, 2, 2]])
    np.testing.assert_array_equal(b["targets"], [[6, 7, 9, 1, 2, 2], [10, 11, 12, 2, 2, 2]])
    np.testing.assert_array_equal(b["loss_mask"], [[0, 0, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(b["rollout_logp"], [[0, 0, -1, -2, 0, 0], [-3, -4, -5, 0, 0, 0]])


@pytest.mark.slow
def test_mesh_matches_one_device():
    """Rollouts, rewards and every update's losses on a (data=2, expert=4) mesh equal one
    device's, with μ = 2, a k3 KL to a reference and the router bias updating."""
    overrides = ("grpo.inner_updates=2", "grpo.beta=0.05", "grpo.router_bias=update")
    one = GRPOTrainer(post(*overrides))
    mesh_post = post(*overrides, "mesh.data=2", "mesh.expert=4", "mesh.fsdp=1")
    mesh_sharding = sharding.Sharding(
        sharding.make_mesh(mesh_post.base.mesh), sharding.rules_for("ep")
    )
    many = GRPOTrainer(mesh_post, mesh_sharding)
    states = [random_train_state(t) for t in (one, many)]
    refs = [copy_params(s.params) for s in states]
    results = []
    for trainer, state, ref in zip((one, many), states, refs, strict=True):
        rng, history = np.random.default_rng(0), []
        for step in range(2):
            state, m = trainer.step(state, ref, rng, jax.random.key(step))
            history.append(m)
        results.append(history)
    for m1, m8 in zip(*results, strict=True):
        assert m1["rollout_tokens"] == m8["rollout_tokens"]
        assert m1["reward_mean"] == m8["reward_mean"]
        for key in ("loss", "policy_loss", "kl", "entropy", "mtp_acceptance", "grad_norm"):
            np.testing.assert_allclose(m8[key], m1[key], rtol=2e-5, atol=1e-6, err_msg=key)
        np.testing.assert_allclose(m8["mtp_loss"], m1["mtp_loss"], rtol=2e-5)
        assert m1["expert_load"] == m8["expert_load"]
    assert results[0][1]["kl"] > 0


@pytest.mark.slow
def test_short_run_raises_mean_reward():
    """15 steps from random weights on the addition prompts: the mean reward (share of digits
    in the completion) at least doubles between the first and last three steps (measured:
    0.043 -> 0.136; a 3-step mean of 48 completions at 0.04 varies by about 0.01)."""
    trainer = GRPOTrainer(
        post("train.learning_rate=1e-2", "train.min_learning_rate=1e-2", "grpo.steps=15")
    )
    state = trainer.base.init()
    rng, rewards = np.random.default_rng(0), []
    for step in range(15):
        state, m = trainer.step(state, None, rng, jax.random.key(step))
        rewards.append(m["reward_mean"])
    first, last = np.mean(rewards[:3]), np.mean(rewards[-3:])
    print(f"mean reward first 3 steps {first:.3f}, last 3 steps {last:.3f}")
    assert last > 2 * first and last > first + 0.05


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="grpo.group_size=1 must be >= 2"):
        post("grpo.group_size=1")
    with pytest.raises(ConfigError, match="grpo.kl_estimator='k4' is not one of"):
        post("grpo.kl_estimator=k4")
    with pytest.raises(ConfigError, match="unknown config key 'grpo.betta'"):
        post("grpo.betta=0.1")
    with pytest.raises(ConfigError, match="grpo.rewards.accuracy='high' must be a number"):
        post("grpo.rewards.accuracy=high")


def test_cli_bad_key_is_one_line(capsys):
    from deepseek_jax.cli import main

    assert main(["grpo", "r1zero_addition", "grpo.group_size=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "grpo.group_size=1 must be >= 2" in err and len(err.splitlines()) == 1


def test_top_k_top_p_rollouts_sample_the_filtered_distribution():
    """Rollouts with top-k and top-p draw from the filtered, renormalized temperature-scaled
    distribution, while their log-probs stay the full softmax's: the π_old the trainer's ratio
    takes (its own recomputation, `completion_logps`), not the filtered one."""
    from deepseek_jax.generate.sampling import filter_logits
    from deepseek_jax.post.grpo import completion_logps
    from deepseek_jax.post.rollout import sample_completions

    trainer = GRPOTrainer(post())
    state = random_train_state(trainer, std=0.5)  # peaked enough for the filters to matter
    model = trainer.policy(state)
    prompt = trainer.encode([trainer.task.problem(3, 4)])[0]
    temperature, top_k, top_p, n = 0.7, 8, 0.8, 4096
    roll = sample_completions(
        model,
        [prompt] * n,
        1,
        key=jax.random.key(0),
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
    )
    tokens = np.asarray([c[0] for c in roll.completions])
    logits_v = model.forward(jax.numpy.asarray([prompt]), with_mtp=False).logits[0, -1]
    kept_v = np.asarray(jax.nn.softmax(filter_logits(logits_v / temperature, top_k, top_p)))
    # The trainer's log-probs over the vocabulary at this position ([B=1, T=1, V]).
    logp_11v, _ = completion_logps(logits_v[None, None], tokens[None, :1], temperature)
    full_logp_v = np.asarray(logp_11v[0, 0])
    assert 2 <= (kept_v > 0).sum() < top_k  # both filters cut something
    assert set(tokens) <= set(np.flatnonzero(kept_v))
    freq_v = np.bincount(tokens, minlength=len(kept_v)) / n
    # 4 standard errors of a frequency from n draws
    np.testing.assert_array_less(
        np.abs(freq_v - kept_v), 4 * np.sqrt(kept_v * (1 - kept_v) / n) + 1e-9
    )
    rollout_logp = np.asarray([lp[0] for lp in roll.logps])
    np.testing.assert_allclose(rollout_logp, full_logp_v[tokens], atol=1e-5)
    # ... which is not the filtered distribution's log-prob (that one is larger by -log(mass)).
    assert np.all(np.log(kept_v[tokens]) - rollout_logp > 0.05)


def test_killed_run_resumes_with_its_step_and_optimizer(tmp_path):
    """A run killed after its step-1 checkpoint resumes there (update counter, Adam moments,
    reference for β > 0) and its step 2 matches an uninterrupted run's. One trainer serves the
    three runs (its compiled functions are reused: only the run directory differs)."""
    from deepseek_jax.post.grpo_loop import make_trainer, run_grpo

    overrides = (
        "grpo.steps=2",
        "grpo.checkpoint_every=1",
        "grpo.inner_updates=2",
        "grpo.beta=0.05",
        "grpo.eval_every=0",
        "grpo.eval_problems=4",
        "grpo.max_new_tokens=8",
        "train.tensorboard=false",
    )

    def kill_at_step_2(line: str):
        if line.startswith("step    2"):  # logged after step 2's update, before its checkpoint
            raise KeyboardInterrupt

    whole = post(*overrides, f"train.run_dir={tmp_path / 'whole'}")
    killed = post(*overrides, f"train.run_dir={tmp_path / 'killed'}")
    trainer = make_trainer(whole)
    run_grpo(whole, log=lambda line: None, trainer=trainer)
    with pytest.raises(KeyboardInterrupt):
        run_grpo(killed, log=kill_at_step_2, trainer=trainer)
    lines = []
    summary = run_grpo(killed, log=lines.append, trainer=trainer)
    assert summary["resumed_at_step"] == 1
    assert any("at update 2" in line for line in lines)  # 1 step x 2 inner updates

    def metrics(run):
        path = tmp_path / run / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]

    a, b = metrics("whole"), metrics("killed")
    assert [m["step"] for m in b] == [1, 2]
    for m1, m2 in zip(a, b, strict=True):
        assert m1["reward_mean"] == m2["reward_mean"]
        for key in ("loss", "kl", "grad_norm", "learning_rate"):
            np.testing.assert_allclose(m2[key], m1[key], rtol=1e-5, atol=1e-7, err_msg=key)
    assert a[-1]["kl"] > 0
