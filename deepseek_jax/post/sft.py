"""Supervised fine-tuning on prompt/completion pairs: loss on completion tokens only.

Plain SFT reuses the training step (`train.step.Trainer`): a packed row is prompt + completion
+ EOS + padding, and the loss mask covers the completion's targets (EOS included), so the usual
objective (CE, MTP CE, balance loss, router-bias update) runs on completion tokens only.

Logit distillation (teacher and student share a tokenizer) adds, per completion token,
T²·KL(p_teacher,T ‖ p_student,T) (Hinton et al. 2015), the teacher's distribution optionally
cut to its top-k tokens and renormalized. The teacher's logits are computed once per batch by
its own forward and passed in; the student's step is then a separate jit.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from deepseek_jax.generate.sampling import filter_logits
from deepseek_jax.post.rollout import pack
from deepseek_jax.train.loss import loss_sums
from deepseek_jax.train.optim import bias_gamma
from deepseek_jax.train.step import Trainer, TrainState, update_router_bias


def sft_batches(
    prompts: list[list[int]],
    completions: list[list[int]],
    batch_size: int,
    seq_len: int,
    pad_id: int,
    seed: int,
):
    """Endless shuffled batches (numpy dicts: tokens, targets, loss_mask [B, seq_len]) of
    packed pairs; an epoch is one pass over the pairs in a fresh order."""
    rng = np.random.default_rng(seed)
    n = len(prompts)
    if n == 0:
        raise ValueError("no prompt/completion pairs to fine-tune on")
    order = np.empty((0,), np.int64)
    while True:
        while len(order) < batch_size:
            order = np.concatenate([order, rng.permutation(n)])
        idx, order = order[:batch_size], order[batch_size:]
        yield pack([prompts[i] for i in idx], [completions[i] for i in idx], seq_len, pad_id)


def distill_kl(
    student_logits_btv: jax.Array,
    teacher_logits_btv: jax.Array,
    mask_bt: jax.Array,
    temperature: float,
    top_k: int,
) -> jax.Array:
    """Mean over masked tokens of T²·KL(teacher_T ‖ student_T), teacher cut to its top-k."""
    t = temperature
    teacher = filter_logits(teacher_logits_btv.astype(jnp.float32) / t, top_k=top_k)
    p_btv = jax.nn.softmax(teacher, axis=-1)
    log_q_btv = jax.nn.log_softmax(student_logits_btv.astype(jnp.float32) / t, axis=-1)
    log_p_btv = jnp.where(p_btv > 0, jax.nn.log_softmax(teacher, axis=-1), 0.0)
    kl_bt = (p_btv * (log_p_btv - log_q_btv)).sum(-1)
    mask_bt = mask_bt.astype(jnp.float32)
    return t * t * (kl_bt * mask_bt).sum() / jnp.maximum(mask_bt.sum(), 1.0)


def make_distill_step(
    trainer: Trainer, weight: float, temperature: float, top_k: int
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """A jitted SFT step whose objective adds `weight`·distill_kl to the CE (and MTP CE);
    the batch carries `teacher_logits` [B, T, V]."""
    tc, depth = trainer.cfg.train, trainer.cfg.model.mtp.depth

    def step(state: TrainState, batch: dict):

        def objective(params):
            model = nnx.merge(trainer.graphdef, params, state.router_bias)
            out = model.forward(batch["tokens"], with_mtp=depth > 0)
            sums = loss_sums(out, batch, depth)
            n = jnp.maximum(sums["tokens"], 1.0)
            kl = distill_kl(
                out.logits, batch["teacher_logits"], batch["loss_mask"], temperature, top_k
            )
            obj = (sums["lm"] + tc.mtp_lambda / max(depth, 1) * sums["mtp"].sum()) / n
            obj = obj + weight * kl
            load = out.expert_load if out.expert_load is not None else jnp.zeros((0, 0))
            return obj, (sums["lm"] / n, kl, load)

        (obj, (lm, kl, load)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        updates, opt_state = trainer.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        bias = update_router_bias(state.router_bias, load, bias_gamma(tc, state.step))
        new = TrainState(step=state.step + 1, params=params, router_bias=bias, opt_state=opt_state)
        return new, {"loss": obj, "lm_loss": lm, "distill_kl": kl}

    return jax.jit(step, donate_argnums=0)
