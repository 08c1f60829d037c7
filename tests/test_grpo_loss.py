"""The GRPO loss and its gradient against an independent float64 NumPy computation of SPEC §8
(finite differences for the gradient), for every aggregation mode and KL estimator."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.post.grpo_loss import group_advantages, grpo_loss

G, B, T = 3, 6, 7
EPS_LOW, EPS_HIGH = 0.2, 0.28


def hand_made():
    rng = np.random.default_rng(0)
    logp = -rng.uniform(0.1, 3.0, (B, T))
    # Ratios spread over [0.6, 1.5]: some clipped below, some above, most inside.
    old = logp - np.log(rng.uniform(0.6, 1.5, (B, T)))
    ref = logp + rng.normal(0.0, 0.5, (B, T))
    mask = np.zeros((B, T))
    prompt = [2, 1, 3, 2, 1, 2]  # prompt tokens are masked out, then completion, then padding
    length = [4, 6, 2, 5, 3, 1]
    for b in range(B):
        mask[b, prompt[b] : prompt[b] + length[b]] = 1.0
    rewards = np.array([1.0, 0.0, 0.5, 2.0, 2.0, 1.0])
    return logp, old, ref, mask, rewards


def np_advantages(r, norm):
    r = r.reshape(-1, G)
    centered = r - r.mean(1, keepdims=True)
    if norm == "group":
        centered = (
            centered / (np.sqrt(((r - r.mean(1, keepdims=True)) ** 2).mean(1)) + 1e-4)[:, None]
        )
    elif norm == "batch":
        centered = centered / (np.sqrt(((r - r.mean()) ** 2).mean()) + 1e-4)
    return centered.reshape(-1)


def np_loss(logp, old, ref, mask, adv, beta, estimator, mode, normalizer):
    """SPEC §8 written out token by token with Python loops (float64)."""
    per_seq, total, count = [], 0.0, 0.0
    for i in range(B):
        s, n = 0.0, 0.0
        for t in range(T):
            if not mask[i, t]:
                continue
            rho = np.exp(logp[i, t] - old[i, t])
            obj = min(rho * adv[i], np.clip(rho, 1 - EPS_LOW, 1 + EPS_HIGH) * adv[i])
            x = ref[i, t] - logp[i, t]
            kl = {"k1": -x, "k2": x * x / 2, "k3": np.exp(x) - x - 1}[estimator]
            s += -(obj - beta * kl)
            n += 1
        if n:
            per_seq.append((s, n))
        total, count = total + s, count + n
    if mode == "token_mean":
        return total / count
    if mode == "seq_mean_token_mean":
        return sum(s / n for s, n in per_seq) / len(per_seq)
    return sum(s for s, _ in per_seq) / (len(per_seq) * normalizer)


MODES = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum")


@pytest.mark.parametrize(
    "mode, estimator, beta",
    [(m, e, 0.05) for m, e in itertools.product(MODES, ("k1", "k2", "k3"))]
    + [(m, "k3", 0.0) for m in MODES],
)
def test_loss_and_gradient_match_numpy(mode, estimator, beta):
    logp, old, ref, mask, rewards = hand_made()
    adv = np_advantages(rewards, "group")
    kw = dict(beta=beta, estimator=estimator, mode=mode, normalizer=8.0)

    def loss_fn(lp):
        return grpo_loss(
            lp,
            jnp.asarray(old, jnp.float32),
            group_advantages(jnp.asarray(rewards), G, "group"),
            jnp.asarray(mask),
            jnp.asarray(ref, jnp.float32),
            eps_low=EPS_LOW,
            eps_high=EPS_HIGH,
            beta=beta,
            kl_estimator=estimator,
            aggregation=mode,
            normalizer=8.0,
        )[0]

    loss, grad = jax.value_and_grad(loss_fn)(jnp.asarray(logp, jnp.float32))
    expected = np_loss(logp, old, ref, mask, adv, **kw)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5, atol=1e-6)

    h, fd = 1e-6, np.zeros_like(logp)
    for i, t in itertools.product(range(B), range(T)):
        up, down = logp.copy(), logp.copy()
        up[i, t] += h
        down[i, t] -= h
        fd[i, t] = (
            np_loss(up, old, ref, mask, adv, **kw) - np_loss(down, old, ref, mask, adv, **kw)
        ) / (2 * h)
    np.testing.assert_allclose(np.asarray(grad), fd, rtol=1e-4, atol=1e-6)
    assert np.all(np.asarray(grad)[mask == 0] == 0)  # prompt and padding tokens get nothing


@pytest.mark.parametrize("norm", ["group", "none", "batch"])
def test_advantages(norm):
    rewards = np.array([1.0, 0.0, 0.5, 2.0, 2.0, 2.0, -3.0, 7.0, 1e3])
    adv = np.asarray(group_advantages(jnp.asarray(rewards), G, norm))
    np.testing.assert_allclose(adv.reshape(-1, G).mean(1), 0.0, atol=1e-4)
    np.testing.assert_allclose(adv, np_advantages(rewards, norm), rtol=1e-5, atol=1e-5)
    assert np.all(adv[3:6] == 0.0)  # equal rewards: zero advantage


def test_equal_reward_group_gives_no_policy_gradient():
    logp, old, ref, mask, _ = hand_made()
    rewards = jnp.asarray([1.0, 0.0, 0.5, 2.0, 2.0, 2.0])  # second group all equal
    for mode in MODES:
        grad = jax.grad(
            lambda lp, mode=mode: grpo_loss(
                lp,
                jnp.asarray(old, jnp.float32),
                group_advantages(rewards, G),
                jnp.asarray(mask),
                aggregation=mode,
            )[0]
        )(jnp.asarray(logp, jnp.float32))
        grad = np.asarray(grad)
        assert np.all(grad[3:] == 0.0) and np.any(grad[:3] != 0.0)


def test_on_policy_ratio_is_exactly_one():
    """μ = 1: old log-probs are the current ones (detached); ρ = 1 exactly, nothing clipped,
    and the gradient is the plain policy gradient −Â·m/|o| per token (seq-mean-token-mean)."""
    logp, _, _, mask, rewards = hand_made()
    lp = jnp.asarray(logp, jnp.float32)
    adv = group_advantages(jnp.asarray(rewards), G)

    def loss_fn(lp):
        return grpo_loss(lp, lp, adv, jnp.asarray(mask), eps_low=EPS_LOW, eps_high=EPS_HIGH)

    (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(lp)
    assert float(metrics["ratio_mean"]) == 1.0
    assert float(metrics["clip_frac_low"]) == 0.0 and float(metrics["clip_frac_high"]) == 0.0
    n_b = mask.sum(1, keepdims=True)
    expected = -np.asarray(adv)[:, None] * mask / n_b / B
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-6, atol=1e-7)
