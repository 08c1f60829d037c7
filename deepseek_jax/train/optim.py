"""AdamW with warmup + cosine decay, global-norm clipping and a weight-decay mask (SPEC §7)."""

from __future__ import annotations

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
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(
            lambda count: learning_rate(cfg, count),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask(param_axes),
        ),
    )
