"""The GRPO trainer (SPEC §8) on the training mesh, with on-policy MTP (SPEC §4).

One step: sample G completions for each of `prompts_per_step` prompts from the current policy
(`rollout.sample_completions`, the generation engine on the same mesh and weights), score them
with the rule rewards, normalize advantages within groups, then take μ optimizer updates on the
batch. The first update recomputes the log-probs of the sampled tokens with the training forward
and uses them, detached, as π_old (so with μ = 1 the ratio is exactly 1); later updates reuse
them. The rollout's own log-probs are logged beside (their gap is rounding with one engine).

Besides the clipped objective, the update trains the MTP modules on the policy's own samples
(weight `mtp_weight`) and measures how often MTP's drafts would be accepted by speculative
sampling on these rollouts: Σ_v min(p(v), q(v)) per position, the exact acceptance probability
of a draft from q verified against p (Leviathan et al. 2023), averaged over completion tokens.
The router correction bias is frozen or keeps its aux-loss-free update (SPEC §3), by config.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from deepseek_jax import sharding
from deepseek_jax.config import replace
from deepseek_jax.data.tokenizer import Tokenizer, make_tokenizer
from deepseek_jax.generate import generate
from deepseek_jax.generate.text import encode_prompt
from deepseek_jax.post.config import PostConfig
from deepseek_jax.post.grpo_loss import group_advantages, grpo_loss
from deepseek_jax.post.rewards import RewardSet, accuracy_reward, format_reward, overlong_penalty
from deepseek_jax.post.rollout import pack, sample_completions
from deepseek_jax.post.tasks import AdditionTask, Problem
from deepseek_jax.train.loss import mtp_targets, token_ce
from deepseek_jax.train.optim import bias_gamma, learning_rate
from deepseek_jax.train.step import Trainer, TrainState, update_router_bias


def completion_logps(logits_btv: jax.Array, targets_bt: jax.Array, temperature: float):
    """(log-probs [B,T,V] of the temperature-scaled policy, log-prob of each target [B,T])."""
    logp_btv = jax.nn.log_softmax(logits_btv.astype(jnp.float32) / temperature, axis=-1)
    return logp_btv, jnp.take_along_axis(logp_btv, targets_bt[..., None], axis=-1)[..., 0]


def mtp_acceptance(
    logp_btv: jax.Array, mtp_logits_btv: jax.Array, mask_bt: jax.Array, temperature: float
) -> jax.Array:
    """Mean over completion positions of Σ_v min(p, q): q is MTP depth 1 at i (drafting token
    i+2), p the main model at i+1 (judging it), both at the sampling temperature."""
    q_btv = jax.nn.softmax(mtp_logits_btv[:, :-1].astype(jnp.float32) / temperature, axis=-1)
    p_btv = jnp.exp(logp_btv[:, 1:])
    accept_bt = jnp.minimum(p_btv, q_btv).sum(-1)
    mask_bt = mask_bt[:, :-1]
    return (accept_bt * mask_bt).sum() / jnp.maximum(mask_bt.sum(), 1.0)


@dataclasses.dataclass
class Groups:
    """One step's rollouts, G consecutive rows per prompt."""

    problems: list[Problem]  # one per row
    prompts: list[list[int]]
    completions: list[list[int]]
    logps: list[list[float]]  # the rollout engine's, per completion token
    truncated: list[bool]
    rewards: np.ndarray  # [rows] total reward used for advantages
    parts: dict[str, np.ndarray]  # each reward function's raw values [rows]
    live: np.ndarray  # [rows] False for padding groups (dynamic sampling ran short)
    stats: dict[str, float]


class GRPOTrainer:
    """GRPO on `post.base`'s model and mesh; the optimizer is `train`'s (see post/config.py)."""

    def __init__(self, post: PostConfig, mesh_sharding: sharding.Sharding | None = None):
        g = post.grpo
        updates = g.steps * g.inner_updates
        cfg = replace(post.base, **{"train.steps": updates})
        self.post, self.g, self.cfg = post, g, cfg
        self.mesh_sharding = mesh_sharding
        self.base = Trainer.create(cfg, mesh_sharding)
        self.rewards = RewardSet.from_weights(dict(g.rewards))
        self.task = AdditionTask(g.task_digits, g.task_held_out_fraction)
        self.tokenizer: Tokenizer = make_tokenizer(cfg.data, cfg.model)
        self.seq_len = g.max_prompt_len + g.max_new_tokens
        self._update_fns: dict[bool, Callable] = {}
        self._ref_fn: Callable | None = None

    # -- the model --------------------------------------------------------------------------

    def policy(self, state: TrainState) -> nnx.Module:
        """The current policy as a module sharing the state's arrays (no copy)."""
        return self.base.model(state)

    def _objective(self, params, router_bias, batch: dict, first: bool):
        g, depth = self.g, self.cfg.model.mtp.depth
        model = nnx.merge(self.base.graphdef, params, router_bias)
        out = model.forward(batch["tokens"], with_mtp=depth > 0)
        logp_btv, logp_bt = completion_logps(out.logits, batch["targets"], g.temperature)
        mask_bt = batch["loss_mask"]
        old_bt = jax.lax.stop_gradient(logp_bt) if first else batch["old_logp"]
        loss, metrics = grpo_loss(
            logp_bt,
            old_bt,
            batch["advantages"],
            mask_bt,
            batch.get("ref_logp"),
            eps_low=g.eps_low,
            eps_high=g.eps_high,
            beta=g.beta,
            kl_estimator=g.kl_estimator,
            aggregation=g.aggregation,
            normalizer=g.normalizer,
        )
        n_tokens = jnp.maximum(mask_bt.sum(), 1.0)
        entropy_bt = -(jnp.exp(logp_btv) * logp_btv).sum(-1)
        metrics["entropy"] = jax.lax.stop_gradient((entropy_bt * mask_bt).sum() / n_tokens)
        metrics["policy_loss"] = loss
        total = loss
        if depth:
            per_depth = []
            for k in range(1, depth + 1):
                tgt_bt, m_bt = mtp_targets(batch["targets"], mask_bt, None, k)
                ce_bt, _ = token_ce(out.mtp_logits[k - 1], tgt_bt)
                per_depth.append((ce_bt * m_bt).sum() / jnp.maximum(m_bt.sum(), 1.0))
            metrics["mtp_loss"] = jnp.stack(per_depth)
            total = total + g.mtp_weight / depth * metrics["mtp_loss"].sum()
            _, m1_bt = mtp_targets(batch["targets"], mask_bt, None, 1)
            metrics["mtp_acceptance"] = jax.lax.stop_gradient(
                mtp_acceptance(logp_btv, out.mtp_logits[0], m1_bt, g.temperature)
            )
        alpha = self.cfg.train.balance_alpha
        if out.balance_loss is not None and alpha > 0:
            total = total + alpha * out.balance_loss.sum()
        load = out.expert_load if out.expert_load is not None else jnp.zeros((0, 0), jnp.int32)
        return total, (metrics, logp_bt, load)

    def _update(self, state: TrainState, batch: dict, first: bool):
        # The graphdef carries the model's Runtime (mesh included): nothing to enter here.
        grad_fn = jax.value_and_grad(self._objective, has_aux=True)
        (total, (metrics, logp_bt, load)), grads = grad_fn(
            state.params, state.router_bias, batch, first
        )
        updates, opt_state = self.base.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        router_bias = state.router_bias
        if self.g.router_bias == "update":
            gamma = bias_gamma(self.cfg.train, state.step)
            router_bias = update_router_bias(router_bias, load, gamma)
        loadf = load.astype(jnp.float32)
        metrics.update(
            loss=total,
            grad_norm=optax.tree.norm(grads),
            learning_rate=learning_rate(self.cfg.train, state.step),
            expert_load=load,
            load_imbalance=loadf.max(-1) / jnp.maximum(loadf.mean(-1), 1e-9)
            if load.size
            else jnp.zeros((0,)),
        )
        new = TrainState(
            step=state.step + 1, params=params, router_bias=router_bias, opt_state=opt_state
        )
        return new, metrics, logp_bt

    def _batch_shardings(self, batch: dict):
        sh = self.mesh_sharding
        return {k: sh.named(("batch",) + (None,) * (v.ndim - 1)) for k, v in batch.items()}

    def update(self, state: TrainState, batch: dict, first: bool):
        """One optimizer update (jitted, state donated): (state, metrics, log-probs [B, T])."""
        if first not in self._update_fns:
            fn = lambda s, b, first=first: self._update(s, b, first)  # noqa: E731
            if self.mesh_sharding is None:
                self._update_fns[first] = jax.jit(fn, donate_argnums=0)
            else:
                replicated = NamedSharding(self.mesh_sharding.mesh, PartitionSpec())
                self._update_fns[first] = jax.jit(
                    fn,
                    in_shardings=(self.base.state_shardings, self._batch_shardings(batch)),
                    out_shardings=(
                        self.base.state_shardings,
                        replicated,
                        self.mesh_sharding.named(("batch", None)),
                    ),
                    donate_argnums=0,
                )
        return self._update_fns[first](state, batch)

    def reference_logps(self, ref_params: dict, router_bias: dict, batch: dict) -> jax.Array:
        """log π_ref of each target token [B, T] (frozen reference weights)."""
        if self._ref_fn is None:

            def fn(params, bias, tokens, targets):
                model = nnx.merge(self.base.graphdef, params, bias)
                out = model.forward(tokens, with_mtp=False)
                return completion_logps(out.logits, targets, self.g.temperature)[1]

            self._ref_fn = jax.jit(fn)
        return self._ref_fn(ref_params, router_bias, batch["tokens"], batch["targets"])

    # -- rollouts and rewards ---------------------------------------------------------------

    def encode(self, problems: list[Problem]) -> list[list[int]]:
        ids = [encode_prompt(self.tokenizer, p.prompt) for p in problems]
        too_long = [len(i) for i in ids if len(i) > self.g.max_prompt_len]
        if too_long:
            raise ValueError(
                f"a prompt of {max(too_long)} tokens exceeds grpo.max_prompt_len="
                f"{self.g.max_prompt_len}: raise it"
            )
        return ids

    def score(self, problems, completions, truncated) -> tuple[np.ndarray, dict]:
        texts = [self.tokenizer.decode(c) for c in completions]
        totals, parts = self.rewards.score(
            [p.prompt for p in problems], texts, [p.answer for p in problems]
        )
        totals = np.asarray(totals, np.float32)
        if self.g.overlong_buffer:
            totals += np.asarray(
                [
                    overlong_penalty(len(c), self.g.max_new_tokens, self.g.overlong_buffer)
                    for c in completions
                ],
                np.float32,
            )
        return totals, {k: np.asarray(v, np.float32) for k, v in parts.items()}

    def collect(self, state: TrainState, rng: np.random.Generator, key: jax.Array) -> Groups:
        """Rollouts for one step; with dynamic sampling, only groups whose rewards differ."""
        g = self.g
        model = self.policy(state)
        eos = self.tokenizer.eos_id
        kept: list[dict] = []
        spare: list[dict] = []
        stats = {"rollout_seconds": 0.0, "rollout_tokens": 0, "sampled_groups": 0}
        spec = {"drafted": 0, "accepted": 0}
        zero_std = 0
        sampled: dict[str, list] = {"rewards": [], "lengths": [], "truncated": []}
        sampled_parts: dict[str, list] = {}
        rounds = 1 + (g.max_sampling_rounds if g.dynamic_sampling else 0)
        for r in range(rounds):
            problems = self.task.sample("train", g.prompts_per_step, rng)
            rows = [p for p in problems for _ in range(g.group_size)]
            prompts = self.encode(rows)
            roll = sample_completions(
                model,
                prompts,
                g.max_new_tokens,
                key=jax.random.fold_in(key, r),
                temperature=g.temperature,
                top_k=g.top_k,
                top_p=g.top_p,
                eos_id=eos,
                mesh_sharding=self.mesh_sharding,
                speculative=g.speculative_rollouts,
            )
            stats["rollout_seconds"] += roll.seconds
            stats["rollout_tokens"] += sum(map(len, roll.completions))
            for k in spec:
                spec[k] += roll.stats.get(k, 0)
            totals, parts = self.score(rows, roll.completions, roll.truncated)
            sampled["rewards"].append(totals)
            sampled["lengths"].append([len(c) for c in roll.completions])
            sampled["truncated"].append(roll.truncated)
            for k, v in parts.items():
                sampled_parts.setdefault(k, []).append(v)
            for i in range(g.prompts_per_step):
                sl = slice(i * g.group_size, (i + 1) * g.group_size)
                group = dict(
                    problems=rows[sl],
                    prompts=prompts[sl],
                    completions=roll.completions[sl],
                    logps=roll.logps[sl],
                    truncated=roll.truncated[sl],
                    rewards=totals[sl],
                    parts={k: v[sl] for k, v in parts.items()},
                )
                flat = np.ptp(totals[sl]) == 0
                zero_std += flat
                stats["sampled_groups"] += 1
                (spare if (g.dynamic_sampling and flat) else kept).append(group)
            if len(kept) >= g.prompts_per_step:
                break
        stats["sampling_rounds"] = r + 1
        stats["zero_std_frac"] = zero_std / stats["sampled_groups"]
        if g.speculative_rollouts:
            stats["spec_acceptance_rate"] = spec["accepted"] / max(spec["drafted"], 1)
        live = [True] * min(len(kept), g.prompts_per_step)
        chosen = kept[: g.prompts_per_step]
        while len(chosen) < g.prompts_per_step:  # ran short: masked-out padding groups
            chosen.append(spare.pop() if spare else kept[len(chosen) % len(kept)])
            live.append(False)
        stats["groups_kept"] = sum(live)
        # Reward and length statistics cover everything sampled this step, kept or not.
        rewards, lengths = np.concatenate(sampled["rewards"]), np.concatenate(sampled["lengths"])
        stats.update(
            reward_mean=float(rewards.mean()),
            reward_std=float(rewards.std()),
            completion_len_mean=float(lengths.mean()),
            completion_len_max=int(lengths.max()),
            truncated_frac=float(np.mean(np.concatenate(sampled["truncated"]))),
        )
        for k, v in sampled_parts.items():
            v = np.concatenate(v)
            stats[f"reward/{k}_mean"], stats[f"reward/{k}_std"] = float(v.mean()), float(v.std())
        if "accuracy" in sampled_parts:
            stats["accuracy"] = stats["reward/accuracy_mean"]

        def cat(name):
            return [x for grp in chosen for x in grp[name]]

        return Groups(
            problems=cat("problems"),
            prompts=cat("prompts"),
            completions=cat("completions"),
            logps=cat("logps"),
            truncated=cat("truncated"),
            rewards=np.concatenate([grp["rewards"] for grp in chosen]),
            parts={k: np.concatenate([grp["parts"][k] for grp in chosen]) for k in parts},
            live=np.repeat(np.asarray(live), g.group_size),
            stats=stats,
        )

    def batch(self, groups: Groups) -> dict[str, np.ndarray]:
        """The update's inputs: packed rows, advantages, masks (padding groups masked out)."""
        b = pack(
            groups.prompts,
            groups.completions,
            self.seq_len,
            self.tokenizer.pad_id,
            groups.logps,
        )
        adv = np.asarray(
            group_advantages(jnp.asarray(groups.rewards), self.g.group_size, self.g.advantage_norm)
        )
        b["advantages"] = np.where(groups.live, adv, 0.0).astype(np.float32)
        b["loss_mask"] = b["loss_mask"] * groups.live[:, None]
        return b

    # -- one step ---------------------------------------------------------------------------

    def step(
        self,
        state: TrainState,
        ref_params: dict | None,
        rng: np.random.Generator,
        key: jax.Array,
        groups: Groups | None = None,
    ) -> tuple[TrainState, dict]:
        """Rollouts (unless `groups` are given), rewards, then μ updates. Returns metrics."""
        g = self.g
        groups = groups if groups is not None else self.collect(state, rng, key)
        host = self.batch(groups)
        rollout_logp = host.pop("rollout_logp")
        batch = self._place(host)
        if g.beta > 0:
            batch["ref_logp"] = self.reference_logps(ref_params, state.router_bias, batch)
        start = time.perf_counter()
        logp_bt = None
        for j in range(g.inner_updates):
            if j:
                batch["old_logp"] = logp_bt
            state, metrics, new_logp = self.update(state, batch, first=j == 0)
            if j == 0:
                logp_bt, first_metrics = new_logp, metrics
        first_metrics = jax.device_get(first_metrics)
        last_metrics = jax.device_get(metrics)
        update_seconds = time.perf_counter() - start

        m = _scalars(first_metrics)
        for key_ in ("loss", "grad_norm", "clip_frac_low", "clip_frac_high", "ratio_mean"):
            m[key_] = _scalars(last_metrics)[key_]  # the last inner update's value
        m["learning_rate"] = _scalars(last_metrics)["learning_rate"]
        mask = host["loss_mask"]
        gap = np.abs(rollout_logp - np.asarray(jax.device_get(logp_bt))) * mask
        m["logp_gap_mean"] = float(gap.sum() / max(mask.sum(), 1))
        m["logp_gap_max"] = float(gap.max())
        m.update(update_seconds=update_seconds, **groups.stats)
        m["rollout_tokens_per_sec"] = m["rollout_tokens"] / max(m["rollout_seconds"], 1e-9)
        return state, m

    def _place(self, host: dict) -> dict:
        if self.mesh_sharding is None:
            return {k: jnp.asarray(v) for k, v in host.items()}
        return jax.device_put(host, self._batch_shardings(host))

    # -- evaluation -------------------------------------------------------------------------

    def evaluate(
        self, state: TrainState, n: int, temperature: float = 0.0, seed: int = 0, rows: int = 64
    ) -> dict[str, float]:
        """Held-out accuracy and format rate on the first `n` held-out problems (a fixed
        shuffle), greedy by default; batches of `rows` (padded) keep one compilation."""
        return evaluate_model(
            self.policy(state),
            self.task,
            self.tokenizer,
            n,
            self.g.max_new_tokens,
            temperature=temperature,
            seed=seed,
            rows=rows,
            mesh_sharding=self.mesh_sharding,
        )


def held_out(task: AdditionTask, n: int) -> list[Problem]:
    pool = task.problems("eval")
    order = np.random.default_rng(1234).permutation(len(pool))
    return [pool[i] for i in order[:n]]


def evaluate_model(
    model: nnx.Module,
    task: AdditionTask,
    tokenizer: Tokenizer,
    n: int,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    seed: int = 0,
    rows: int = 64,
    mesh_sharding: sharding.Sharding | None = None,
) -> dict[str, float]:
    """Accuracy and format rate of `model` on `n` held-out problems of `task`."""
    problems = held_out(task, n)
    acc = fmt = 0.0
    for start in range(0, len(problems), rows):
        chunk = problems[start : start + rows]
        prompts = [encode_prompt(tokenizer, p.prompt) for p in chunk]
        prompts += [prompts[0]] * (rows - len(prompts))
        outs = generate(
            model,
            prompts,
            max_new_tokens,
            key=jax.random.fold_in(jax.random.key(seed), start),
            temperature=temperature,
            eos_id=tokenizer.eos_id,
            mesh_sharding=mesh_sharding,
        )
        for p, o in zip(chunk, outs, strict=False):
            text = tokenizer.decode(o)
            acc += accuracy_reward(p.prompt, text, p.answer)
            fmt += format_reward(p.prompt, text, p.answer)
    return {"accuracy": acc / len(problems), "format": fmt / len(problems)}


def copy_params(params: dict) -> dict:
    """A separate copy (the train state is donated, so the reference must not alias it)."""
    return jax.tree.map(jnp.copy, params)


def _scalars(metrics: dict) -> dict:
    out = {}
    for k, v in metrics.items():
        v = np.asarray(v)
        out[k] = v.item() if v.ndim == 0 else v.tolist()
    return out
