"""AdamW with warmup + cosine decay, global-norm clipping and a weight-decay mask (SPEC §7),
its moments stored in fp32 or, as V3 trains, in bf16."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from deepseek_jax.config import TrainConfig


def learning_rate(cfg: TrainConfig, step: jax.Array) -> jax.Array:
    """Linear warmup from 0 to the peak over warmup_steps, then cosine down to the minimum."""
    step = jnp.asarray(step, jnp.float32)
    warm = jnp.minimum(1.0, (step + 1) / max(cfg.warmup_steps, 1))
    decay_steps = max(cfg.steps - cfg.warmup_steps, 1)
    progress = jnp.clip((step - cfg.warmup_steps) / decay_steps, 0.0, 1.0)
    cosine = cfg.min_learning_rate + 0.5 * (cfg.learning_rate - cfg.min_learning_rate) * (
        1 + jnp.cos(jnp.pi * progress)
    )
    return jnp.where(step < cfg.warmup_steps, cfg.learning_rate * warm, cosine)


def bias_gamma(cfg: TrainConfig, step: jax.Array) -> jax.Array:
    """The router-bias step γ at `step`: bias_gamma, or with bias_gamma_final set, a cosine from
    bias_gamma at step 0 down to bias_gamma_final at cfg.steps (no warmup: the biases must catch
    up with the router from the first steps, when it moves fastest)."""
    if cfg.bias_gamma_final is None:
        return jnp.float32(cfg.bias_gamma)
    progress = jnp.clip(jnp.asarray(step, jnp.float32) / max(cfg.steps, 1), 0.0, 1.0)
    return cfg.bias_gamma_final + 0.5 * (cfg.bias_gamma - cfg.bias_gamma_final) * (
        1 + jnp.cos(jnp.pi * progress)
    )


def decay_mask(param_axes: dict) -> dict:
    """Weight decay on matrices only: not on norm scales (one axis besides 'layers') or biases.

    The router correction bias is not a parameter at all and never reaches the optimizer.
    """
    return jax.tree.map(
        lambda axes: len([a for a in axes if a != "layers"]) >= 2,
        param_axes,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def make_optimizer(cfg: TrainConfig, param_axes: dict) -> optax.GradientTransformation:
    return optax.chain(
        clip_by_global_norm(cfg.grad_clip),
        adamw_with_moments(cfg, decay_mask(param_axes)),
    )


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """Every gradient times one scalar, min(1, max_norm / ||g||): global-norm clipping.

    optax.clip_by_global_norm computes the same clip as a select between g and g / ||g|| ·
    max_norm for every element. XLA:CPU then writes the divided copy of every gradient and
    passes both copies to each Adam moment's update; a scalar factor fuses into those updates
    instead. The optimizer update of 22.7M parameters (issue-12 shapes with 64 experts, state
    donated, under the step's non-finite guard): 41.6 -> 26.1 ms; a whole step, 0.329 -> 0.325
    s. (The clipped values can differ from optax's in the last bit: g · (max_norm / ||g||)
    against (g / ||g||) · max_norm.)
    """

    def update(updates, state, params=None):
        del params
        scale = jnp.minimum(1.0, max_norm / optax.tree.norm(updates))
        return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

    return optax.GradientTransformation(optax.clip_by_global_norm(max_norm).init, update)


def adamw_with_moments(cfg: TrainConfig, mask: dict) -> optax.GradientTransformation:
    """optax's AdamW with both moments stored in train.adam_moments.

    float32 is optax.adamw itself. bfloat16 is V3's low-precision optimizer state (report
    §3.3.3: both AdamW moments in bf16, master weights in fp32): the same chain with
    `scale_by_adam_stored` in place of optax.scale_by_adam, so the state has optax's structure
    and a checkpoint restores into either (orbax casts the moments). config.py refuses betas
    whose per-step change the rounding would swallow.
    """
    schedule = functools.partial(learning_rate, cfg)
    moments = jnp.dtype(cfg.adam_moments)
    if moments == jnp.float32:
        return optax.adamw(
            schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask
        )
    return optax.chain(
        scale_by_adam_stored(cfg.b1, cfg.b2, cfg.eps, moments),
        optax.add_decayed_weights(cfg.weight_decay, mask),
        optax.scale_by_learning_rate(schedule),
    )


def scale_by_adam_stored(
    b1: float, b2: float, eps: float, dtype: jnp.dtype
) -> optax.GradientTransformation:
    """optax.scale_by_adam with mu and nu stored in `dtype` and fp32 arithmetic.

    Each step widens the stored moments, forms the new ones in fp32 (optax's own `mu_dtype`
    would multiply b1 by the stored moment in bf16), stores them rounded, and takes the step's
    update from the moments as stored, as an optimizer whose moments are bf16 tensors does.
    Taking it from the unrounded fp32 moments instead means reading the old moments after the
    new ones have been written over them (the state is donated): XLA:CPU then copied both
    moments of every parameter twice per step, and the optimizer update of 22.7M parameters
    (issue-12 shapes with 64 experts, under the step's non-finite guard) took 38.8 ms against
    26.4 ms with fp32 moments; from the stored moments it takes 27.3 ms (in the whole step
    the two moment dtypes time alike on a CPU). TPU plan of V3 unchanged (55.02 GiB per chip).
    """
    widen = functools.partial(optax.tree.cast, dtype=jnp.float32)

    def init(params):
        return optax.ScaleByAdamState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params, dtype=dtype),
            nu=optax.tree.zeros_like(params, dtype=dtype),
        )

    def update(updates, state, params=None):
        del params
        mu = optax.tree.update_moment(updates, widen(state.mu), b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(updates, widen(state.nu), b2, 2)
        mu, nu = optax.tree.cast(mu, dtype), optax.tree.cast(nu, dtype)
        count = optax.safe_increment(state.count)
        mu_hat = optax.tree.bias_correction(widen(mu), b1, count)
        nu_hat = optax.tree.bias_correction(widen(nu), b2, count)
        updates = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu_hat, nu_hat)
        return updates, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init, update)
