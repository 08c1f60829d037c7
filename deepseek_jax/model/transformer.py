"""The DeepSeek-V2/V3 language model: embedding, dense then MoE block stacks, head, MTP."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
from flax import nnx, struct

from deepseek_jax.config import ModelConfig
from deepseek_jax.model.block import run_stack, stacked, stacked_blocks
from deepseek_jax.model.layers import Embed, RMSNorm, cast, param
from deepseek_jax.model.mtp import MTPModule, shift_tokens
from deepseek_jax.model.rope import rope_tables
from deepseek_jax.runtime import Runtime


@struct.dataclass
class ModelOutput:
    logits: jax.Array | None  # [B, T, V] main next-token logits (fp32); None: logits=False
    hidden: jax.Array  # [B, T, D] last hidden state before the final norm
    mtp_logits: jax.Array | None  # [depth, B, T, V]: depth k at i predicts token i+k+1
    expert_load: jax.Array | None  # [L_moe (+ MTP), E] tokens routed to each expert
    balance_loss: jax.Array | None  # [L_moe (+ MTP)] sequence-wise balance loss, before α
    # What the shared head multiplies: final-normed hidden [B, T, D] and each MTP depth's
    # head-normed hidden [depth, B, T, D] (a loss over the vocabulary in chunks starts here).
    normed: jax.Array | None = None
    mtp_normed: jax.Array | None = None


def layer_runs(kinds: tuple[str, ...]) -> list[tuple[str, int, int]]:
    """Consecutive runs of one kind as (kind, start in that kind's stack, length).

    ('dense','dense','moe','moe','moe') -> [('dense', 0, 2), ('moe', 0, 3)]. Each run is one scan;
    layouts with moe_layer_freq > 1 simply give more, shorter runs.
    """
    runs, seen = [], {"dense": 0, "moe": 0}
    for kind, group in itertools.groupby(kinds):
        n = len(list(group))
        runs.append((kind, seen[kind], n))
        seen[kind] += n
    return runs


class DeepSeek(nnx.Module):
    """Call it on int tokens [B, T] for logits [B, T, V]; `forward` returns everything."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, runtime: Runtime | None = None):
        """`runtime` (dtypes, scan, remat, kernels, mesh) reaches every submodule as a static
        attribute; None is `Runtime.default()` (one device, bf16 compute, fp32 params)."""
        self.cfg = cfg
        self.rt = rt = Runtime.default() if runtime is None else runtime
        kinds = cfg.layer_kinds
        main, mtp = kinds[: cfg.num_layers], kinds[cfg.num_layers :]
        self.embed = Embed(cfg, rngs, rt)
        n_dense, n_moe = main.count("dense"), main.count("moe")
        self.dense_layers = stacked_blocks(cfg, "dense", n_dense, rngs, rt) if n_dense else None
        self.moe_layers = stacked_blocks(cfg, "moe", n_moe, rngs, rt) if n_moe else None
        self.final_norm = RMSNorm(cfg.hidden_size, cfg, rt)
        self.lm_head_DV = param(
            rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), cfg, rt
        )
        self.mtp = _mtp_stack(cfg, mtp, rngs, rt) if mtp else None

    def __call__(self, tokens_bt: jax.Array) -> jax.Array:
        return self.forward(tokens_bt, with_mtp=False).logits

    def head(self, h_btd: jax.Array, normed: bool = False) -> jax.Array:
        """fp32 logits from hidden states (applies the final norm unless `normed`)."""
        if not normed:
            h_btd = self.final_norm(h_btd)
        # Accumulate in fp32 even under bf16 compute: logits feed a softmax over a large vocab.
        return jnp.einsum(
            "btd,dv->btv",
            h_btd,
            cast(self.lm_head_DV, self.rt),
            preferred_element_type=jnp.float32,
        )

    def trunk(
        self,
        x_btd: jax.Array,
        positions_bt: jax.Array | None = None,
        segment_ids_bt: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """All main layers over embedded inputs; returns (hidden, stacked MoE aux)."""
        cos, sin = self._rope(x_btd, positions_bt)
        auxes = []
        for kind, start, count in layer_runs(self.cfg.layer_kinds[: self.cfg.num_layers]):
            stack = self.moe_layers if kind == "moe" else self.dense_layers
            with jax.named_scope(f"{kind}_layers_{start}"):
                x_btd, aux = run_stack(
                    stack,
                    x_btd,
                    cos,
                    sin,
                    segment_ids_bt,
                    start,
                    count,
                    self.rt,
                )
            if aux:
                auxes.append(aux)
        return x_btd, _concat(auxes)

    def forward(
        self,
        tokens_bt: jax.Array,
        positions_bt: jax.Array | None = None,
        segment_ids_bt: jax.Array | None = None,
        with_mtp: bool = True,
        logits: bool = True,
    ) -> ModelOutput:
        """Everything the model computes. `logits=False` skips the [B, T, V] products (main and
        MTP) and returns only the normed hidden states the head would multiply, for a loss that
        goes over the vocabulary in chunks (`deepseek_jax.ops.cross_entropy`)."""
        x_btd = self.embed(tokens_bt)
        h_btd, aux = self.trunk(x_btd, positions_bt, segment_ids_bt)
        normed_btd = self.final_norm(h_btd)
        mtp_normed = None
        if with_mtp and self.mtp is not None:
            mtp_normed, mtp_aux = self._mtp(tokens_bt, h_btd, positions_bt, segment_ids_bt)
            if mtp_aux:
                aux = _concat([aux, mtp_aux]) if aux else mtp_aux
        return ModelOutput(
            logits=self.head(normed_btd, normed=True) if logits else None,
            hidden=h_btd,
            mtp_logits=None
            if mtp_normed is None or not logits
            else jnp.stack([self.head(n_btd, normed=True) for n_btd in mtp_normed]),
            expert_load=aux.get("load"),
            balance_loss=aux.get("balance_loss"),
            normed=normed_btd,
            mtp_normed=mtp_normed,
        )

    def _mtp(self, tokens_bt, h_btd, positions_bt, segment_ids_bt):
        """Each depth's head-normed hidden [depth, B, T, D] and the MTP blocks' MoE aux."""
        cos, sin = self._rope(h_btd, positions_bt)
        graphdef, state = nnx.split(self.mtp)
        normed, auxes = [], []
        for k in range(1, self.cfg.mtp.depth + 1):
            module = nnx.merge(graphdef, jax.tree.map(lambda a, k=k: a[k - 1], state))
            emb_btd = self.embed(shift_tokens(tokens_bt, k))
            h_btd, normed_btd, aux = module(h_btd, emb_btd, cos, sin, segment_ids_bt)
            normed.append(normed_btd)
            if aux:
                auxes.append(jax.tree.map(lambda a: a[None], aux))
        return jnp.stack(normed), _concat(auxes)

    def _rope(self, x_btd, positions_bt):
        b, t = x_btd.shape[:2]
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        return rope_tables(self.cfg, positions_bt)


def _mtp_stack(cfg: ModelConfig, kinds: tuple[str, ...], rngs: nnx.Rngs, rt: Runtime) -> MTPModule:
    """The MTP modules with parameters stacked along a leading 'layers' axis (one per depth)."""
    if len(set(kinds)) != 1:
        raise ValueError(f"MTP blocks must all be one kind (dense or moe), got {kinds}")
    return stacked(lambda r: MTPModule(cfg, kinds[0], r, rt), len(kinds), rngs)


def _concat(auxes: list[dict[str, jax.Array]]) -> dict[str, jax.Array]:
    if not auxes:
        return {}
    return jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *auxes)
