"""Typed, frozen configuration: YAML files in `configs/` plus dotted `key=value` overrides.

Every section is a frozen dataclass whose invariants are checked on construction; an error names
the full dotted key and what is wrong with it (`model.moe.n_routed_experts=10 is not divisible by
model.moe.n_group=4`). `from_hf_config` builds a `ModelConfig` from a Hugging Face `config.json`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import yaml

DType = Literal["float32", "bfloat16", "float16"]


class ConfigError(ValueError):
    """A configuration key is unknown, has a bad value, or contradicts another key."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding on the decoupled `qk_rope_head_dim` part; optional YaRN (SPEC §2)."""

    theta: float = 10000.0
    type: Literal["default", "yarn"] = "default"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    # Multiplies cos/sin; None means "derive from factor, mscale and mscale_all_dim" as YaRN does.
    attention_factor: float | None = None

    def __post_init__(self):
        p = "model.rope"
        _require(self.theta > 0, f"{p}.theta={self.theta} must be positive")
        _require(self.factor >= 1.0, f"{p}.factor={self.factor} must be >= 1")
        _require(
            self.original_max_position_embeddings > 0,
            f"{p}.original_max_position_embeddings={self.original_max_position_embeddings} "
            "must be positive",
        )
        _require(
            self.beta_fast > self.beta_slow > 0,
            f"{p}.beta_fast={self.beta_fast} must exceed {p}.beta_slow={self.beta_slow} > 0",
        )


@dataclasses.dataclass(frozen=True)
class MLAConfig:
    """Multi-head Latent Attention dimensions (SPEC §1)."""

    q_lora_rank: int | None = 1536  # None: a plain q_proj (DeepSeek-V2-Lite)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128

    def __post_init__(self):
        p = "model.mla"
        for name in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
            _require(getattr(self, name) > 0, f"{p}.{name}={getattr(self, name)} must be positive")
        _require(
            self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0,
            f"{p}.qk_rope_head_dim={self.qk_rope_head_dim} must be a positive even number "
            "(RoPE rotates pairs of dimensions)",
        )
        _require(
            self.q_lora_rank is None or self.q_lora_rank > 0,
            f"{p}.q_lora_rank={self.q_lora_rank} must be positive or null (plain q_proj)",
        )

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """DeepSeekMoE: shared + routed experts and the router (SPEC §3)."""

    n_routed_experts: int = 256
    n_shared_experts: int = 1
    n_experts_per_tok: int = 8
    moe_intermediate_size: int = 2048
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    # noaux_tc: V3 sigmoid router with selection bias; greedy / group_limited_greedy: V2 softmax.
    topk_method: Literal["noaux_tc", "greedy", "group_limited_greedy"] = "noaux_tc"
    scoring_func: Literal["sigmoid", "softmax"] = "sigmoid"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0

    def __post_init__(self):
        p = "model.moe"
        for name in ("n_routed_experts", "n_experts_per_tok", "moe_intermediate_size", "n_group"):
            _require(getattr(self, name) > 0, f"{p}.{name}={getattr(self, name)} must be positive")
        _require(self.n_shared_experts >= 0, f"{p}.n_shared_experts must be >= 0")
        _require(self.first_k_dense_replace >= 0, f"{p}.first_k_dense_replace must be >= 0")
        _require(self.moe_layer_freq >= 1, f"{p}.moe_layer_freq={self.moe_layer_freq} must be >= 1")
        _require(
            self.n_experts_per_tok <= self.n_routed_experts,
            f"{p}.n_experts_per_tok={self.n_experts_per_tok} exceeds "
            f"{p}.n_routed_experts={self.n_routed_experts}",
        )
        _require(
            self.n_routed_experts % self.n_group == 0,
            f"{p}.n_routed_experts={self.n_routed_experts} is not divisible by "
            f"{p}.n_group={self.n_group}",
        )
        _require(
            1 <= self.topk_group <= self.n_group,
            f"{p}.topk_group={self.topk_group} must be between 1 and {p}.n_group={self.n_group}",
        )
        per_group = self.n_routed_experts // self.n_group
        _require(
            self.n_experts_per_tok <= self.topk_group * per_group,
            f"{p}.n_experts_per_tok={self.n_experts_per_tok} is more than the "
            f"{self.topk_group * per_group} experts in {p}.topk_group={self.topk_group} groups",
        )
        if self.topk_method == "noaux_tc":
            _require(
                self.scoring_func == "sigmoid",
                f"{p}.topk_method=noaux_tc needs {p}.scoring_func=sigmoid, got {self.scoring_func}",
            )
            # Group score is the sum of the top-2 affinities in the group (SPEC §3).
            _require(
                self.n_group == 1 or per_group >= 2,
                f"{p}.n_routed_experts/{p}.n_group={per_group}: noaux_tc group scores need at "
                "least 2 experts per group",
            )
        else:
            _require(
                self.scoring_func == "softmax",
                f"{p}.topk_method={self.topk_method} needs {p}.scoring_func=softmax, "
                f"got {self.scoring_func}",
            )


@dataclasses.dataclass(frozen=True)
class MTPConfig:
    """Multi-Token Prediction modules (SPEC §4); depth 0 disables them."""

    depth: int = 0

    def __post_init__(self):
        _require(self.depth >= 0, f"model.mtp.depth={self.depth} must be >= 0")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The architecture: everything a checkpoint's weights must match (runtime knobs live in
    `RuntimeConfig`)."""

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # dense SwiGLU width
    num_layers: int = 61
    num_heads: int = 128
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 163840
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    # How fresh weights are drawn (SPEC §7), not what they are: left out of ==, so that "does
    # this checkpoint fit this model" stays one ModelConfig comparison.
    init_std: float = dataclasses.field(default=0.006, compare=False)
    mla: MLAConfig = MLAConfig()
    moe: MoEConfig = MoEConfig()
    mtp: MTPConfig = MTPConfig()
    rope: RopeConfig = RopeConfig()

    def __post_init__(self):
        p = "model"
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads"):
            _require(getattr(self, name) > 0, f"{p}.{name}={getattr(self, name)} must be positive")
        _require(self.rms_norm_eps > 0, f"{p}.rms_norm_eps must be positive")
        _require(self.init_std > 0, f"{p}.init_std must be positive")
        for name in ("bos_token_id", "eos_token_id"):
            tok = getattr(self, name)
            _require(
                tok is None or 0 <= tok < self.vocab_size,
                f"{p}.{name}={tok} is outside the vocabulary [0, {self.vocab_size})",
            )

    def is_moe_layer(self, layer: int) -> bool:
        """SPEC §3: layer l is MoE iff l >= first_k_dense_replace and l % moe_layer_freq == 0."""
        return layer >= self.moe.first_k_dense_replace and layer % self.moe.moe_layer_freq == 0

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        """'dense' or 'moe' for each main layer followed by each MTP block."""
        n = self.num_layers + self.mtp.depth
        return tuple("moe" if self.is_moe_layer(i) else "dense" for i in range(n))

    @property
    def softmax_scale(self) -> float:
        """(d_n + d_r)^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN (SPEC §1)."""
        scale = self.mla.qk_head_dim**-0.5
        if self.rope.type == "yarn" and self.rope.mscale_all_dim:
            m = yarn_mscale(self.rope.factor, self.rope.mscale_all_dim)
            scale *= m * m
        return scale


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1·mscale·ln(factor) + 1 (1 when not extending)."""
    return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


# Keys that moved from `model:` to `runtime:`; an old-style key gets a one-line pointer.
MOVED_TO_RUNTIME = ("param_dtype", "compute_dtype", "scan_layers", "remat")


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """How the model runs, never what it computes: dtypes, layer scan, rematerialization and
    kernel choices. Two runs that differ only here load each other's checkpoints."""

    param_dtype: DType = "float32"
    compute_dtype: DType = "bfloat16"
    # Run each homogeneous run of layers under jax.lax.scan (False: a Python loop, same params).
    scan_layers: bool = True
    # What each block keeps for the backward pass: none (everything), full (only its input),
    # save_dots (matmul outputs), save_dots_except_experts (matmul outputs but not the routed
    # experts' own, the largest), offload (the named MLA latents, attention and MoE outputs go
    # to pinned host memory; TPU/GPU only), offload_layer_input (full, with each block's input
    # in pinned host memory instead of HBM; TPU/GPU only). Names: see `deepseek_jax.model.remat`.
    remat: Literal[
        "none", "full", "save_dots", "save_dots_except_experts", "offload", "offload_layer_input"
    ] = "none"
    # Attention kernel (deepseek_jax.ops.attention): xla (plain einsum + fp32 softmax, the
    # reference), dpa_xla / dpa_cudnn (jax.nn.dot_product_attention), splash (TPU Pallas),
    # causal_blocks (xla per block of attention_chunk_size queries against its causal key
    # prefix only: the masked upper half of the scores is mostly not computed), chunked
    # (online softmax over blocks of attention_chunk_size: no [T, T] score matrix).
    attention: Literal["xla", "dpa_xla", "dpa_cudnn", "splash", "causal_blocks", "chunked"] = "xla"
    attention_chunk_size: int = 512
    # full: fp32 logits over the vocabulary; chunked: the loss in tiles of
    # cross_entropy_chunk_size tokens (per device) x cross_entropy_vocab_chunk_size vocabulary
    # entries, never holding [N, V] logits, nor on a mesh a whole copy of the head or of its
    # gradient (deepseek_jax.ops.cross_entropy).
    cross_entropy: Literal["full", "chunked"] = "full"
    cross_entropy_chunk_size: int = 4096
    cross_entropy_vocab_chunk_size: int = 16384
    # Routed experts' grouped matmul and dispatch (deepseek_jax.model.dispatch); auto picks by
    # backend and mesh.
    grouped_matmul: Literal["auto", "ragged_dot", "megablox", "blocked"] = "auto"
    moe_dispatch: Literal["auto", "all_gather", "all_to_all"] = "auto"
    # First all-to-all exchange buffer per peer, as a multiple of the mean load (overflow goes
    # in further rounds: never dropped).
    moe_a2a_buffer_factor: float = 1.25

    def __post_init__(self):
        p = "runtime"
        for name in (
            "attention_chunk_size",
            "cross_entropy_chunk_size",
            "cross_entropy_vocab_chunk_size",
        ):
            v = getattr(self, name)
            _require(v >= 1, f"{p}.{name}={v} must be >= 1 (a chunk length)")
        _require(
            self.moe_a2a_buffer_factor > 0,
            f"{p}.moe_a2a_buffer_factor={self.moe_a2a_buffer_factor} must be positive "
            "(1.0 sizes the first exchange for a perfectly balanced load)",
        )


MESH_AXES = ("data", "fsdp", "expert", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh: sizes of the data, fsdp, expert and tensor axes; one may be -1 (the rest).

    `dcn_data` > 1 builds a hybrid mesh whose data axis spans that many slices (TPU) or process
    groups (GPU/CPU hosts), the other axes staying inside one slice or host.
    """

    data: int = 1
    fsdp: int = -1
    expert: int = 1
    tensor: int = 1
    dcn_data: int = 1
    # Logical-axis rules preset: dp (replicate weights), fsdp (shard weights over fsdp),
    # ep (routed experts over expert, other weights over fsdp), ep_fsdp (expert axis also
    # shards attention and dense weights, FSDP-style).
    rules: Literal["dp", "fsdp", "ep", "ep_fsdp"] = "ep"

    def __post_init__(self):
        p = "mesh"
        sizes = [getattr(self, a) for a in MESH_AXES]
        _require(
            all(s == -1 or s >= 1 for s in sizes),
            f"{p}: axis sizes must be >= 1 or -1, got {dict(zip(MESH_AXES, sizes, strict=True))}",
        )
        _require(sizes.count(-1) <= 1, f"{p}: at most one axis may be -1, got {sizes}")
        _require(self.dcn_data >= 1, f"{p}.dcn_data={self.dcn_data} must be >= 1")

    def resolve(self, n_devices: int) -> dict[str, int]:
        """Axis sizes with -1 filled so that their product is `n_devices`."""
        sizes = {a: getattr(self, a) for a in MESH_AXES}
        known = math.prod(v for v in sizes.values() if v != -1)
        for a, v in sizes.items():
            if v == -1:
                _require(
                    n_devices % known == 0,
                    f"mesh.{a}=-1: {n_devices} devices are not divisible by the other axes "
                    f"({known})",
                )
                sizes[a] = n_devices // known
        _require(
            math.prod(sizes.values()) == n_devices,
            f"mesh {sizes} needs {math.prod(sizes.values())} devices, but {n_devices} are present",
        )
        _require(
            sizes["data"] % self.dcn_data == 0,
            f"mesh.data={sizes['data']} is not divisible by mesh.dcn_data={self.dcn_data}",
        )
        return sizes


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimization, loss weights and the loop (SPEC §7 defaults where they apply)."""

    steps: int = 100
    batch_size: int = 8  # global, in sequences
    seq_len: int = 128
    micro_batches: int = 1  # gradient accumulation: batch_size is split into this many
    seed: int = 0
    learning_rate: float = 2.2e-4
    min_learning_rate: float = 2.2e-5
    warmup_steps: int = 10
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    # dtype of both AdamW moments in the optimizer state: float32, or bfloat16 as V3 trains
    # (report §3.3.3; the update itself runs in fp32 either way).
    adam_moments: Literal["float32", "bfloat16"] = "float32"
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # MTP loss weight λ (SPEC §4, §7): mtp_lambda until mtp_lambda_switch_step, then the final one.
    mtp_lambda: float = 0.3
    mtp_lambda_final: float = 0.1
    mtp_lambda_switch_step: int = 1_000_000_000
    balance_alpha: float = 1e-4  # sequence-wise balance loss weight α (SPEC §3)
    bias_gamma: float = 0.001  # aux-loss-free bias update speed γ (SPEC §3)
    # null keeps γ constant; a value decays γ along a cosine from bias_gamma at step 0 to this
    # at train.steps (V3 lowers γ to 0 for its final phase, SPEC §7).
    bias_gamma_final: float | None = None
    z_loss: float = 0.0  # weight of mean(logsumexp(logits)²), 0 disables
    log_every: int = 1
    run_dir: str = "runs/default"
    # Orbax checkpoints under <run_dir>/checkpoints: every N steps (and at the end and on
    # SIGTERM), keeping the last K. A run directory holding checkpoints is resumed.
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    async_checkpointing: bool = True
    # A failed save is reported at once and retried at the next save; this many failures in a
    # row stop the run with a non-zero exit (the newest good checkpoint is kept).
    max_save_failures: int = 3
    resume: bool = True
    # train.resume=false on a run dir that already holds a run (checkpoints or metrics) is refused
    # unless overwrite=true, which moves the old run aside to <run_dir>.old-<UTC time> first.
    overwrite: bool = False
    # Numerical guard: a step whose loss or gradient norm is not finite applies no update; this
    # many in a row stop the run (exit code 3), the newest checkpoint being the last good one.
    max_bad_steps: int = 5
    # A loss above this factor times the median of the last loss_spike_window losses is logged
    # as a spike (0 disables).
    loss_spike_factor: float = 3.0
    loss_spike_window: int = 50
    # Start a run that has no checkpoint yet from these weights (params and router biases, fresh
    # optimizer, step 0): a directory written by `deepseek-jax convert hf-to-orbax`, or any path
    # `deepseek_jax.load` accepts. "" starts from random weights. Resuming takes precedence.
    init_from: str = ""
    # Held-out loss every N steps over this many batches (0 disables).
    eval_every: int = 50
    eval_batches: int = 4
    progress_bar: bool = True
    tensorboard: bool = True
    # Peak FLOP/s of one device for MFU; null measures a large matmul at start-up.
    peak_flops_per_device: float | None = None

    def __post_init__(self):
        p = "train"
        for name in (
            "steps",
            "batch_size",
            "seq_len",
            "micro_batches",
            "log_every",
            "checkpoint_every",
            "keep_checkpoints",
            "max_save_failures",
            "eval_batches",
            "max_bad_steps",
            "loss_spike_window",
        ):
            _require(getattr(self, name) >= 1, f"{p}.{name}={getattr(self, name)} must be >= 1")
        _require(
            self.batch_size % self.micro_batches == 0,
            f"{p}.batch_size={self.batch_size} is not divisible by "
            f"{p}.micro_batches={self.micro_batches}",
        )
        _require(self.learning_rate > 0, f"{p}.learning_rate must be positive")
        # A moment moves by (1 - beta)·|g - m| a step; bf16 keeps 8 significant bits, so with
        # 1 - beta much below 2^-8 round-to-nearest swallows most changes and the moment stalls.
        _require(
            self.adam_moments == "float32" or max(self.b1, self.b2) <= 0.98,
            f"{p}.adam_moments=bfloat16 needs b1 and b2 <= 0.98 (got b1={self.b1}, "
            f"b2={self.b2}): a bf16 moment would not register per-step changes of 1 - beta",
        )
        _require(
            0 <= self.min_learning_rate <= self.learning_rate,
            f"{p}.min_learning_rate={self.min_learning_rate} must be in [0, learning_rate]",
        )
        _require(self.warmup_steps >= 0, f"{p}.warmup_steps must be >= 0")
        _require(self.eval_every >= 0, f"{p}.eval_every must be >= 0 (0 disables evaluation)")
        _require(
            self.loss_spike_factor == 0 or self.loss_spike_factor > 1,
            f"{p}.loss_spike_factor={self.loss_spike_factor} must be > 1 (or 0 to disable)",
        )
        _require(
            self.init_from == self.init_from.strip(),
            f'{p}.init_from={self.init_from!r} has surrounding spaces; give a plain path or ""',
        )
        for name in ("mtp_lambda", "mtp_lambda_final", "balance_alpha", "bias_gamma", "z_loss"):
            _require(getattr(self, name) >= 0, f"{p}.{name}={getattr(self, name)} must be >= 0")
        _require(
            self.bias_gamma_final is None or self.bias_gamma_final >= 0,
            f"{p}.bias_gamma_final={self.bias_gamma_final} must be >= 0 (or null: constant γ)",
        )


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Multi-process setup for `jax.distributed.initialize`; nulls fall back to the usual
    environment (JAX_COORDINATOR_ADDRESS, SLURM, Cloud TPU metadata)."""

    enabled: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    # CPU collectives between processes (tests, CPU clusters): gloo or mpi.
    cpu_collectives: Literal["gloo", "mpi"] = "gloo"
    # A process that sends no heartbeat for this long is declared dead by the coordination
    # service, and every other process then stops (JAX's default, 100 s, is raised to minutes
    # by its retries; a short one bounds how long survivors hang after a crash).
    heartbeat_timeout_s: int = 30
    initialization_timeout_s: int = 300

    def __post_init__(self):
        p = "distributed"
        for name in ("heartbeat_timeout_s", "initialization_timeout_s"):
            _require(getattr(self, name) >= 1, f"{p}.{name}={getattr(self, name)} must be >= 1")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Training text (`deepseek_jax.data`): documents -> tokens -> packed rows of train.seq_len."""

    # synthetic: a learnable Markov stream, no files; stdlib: this Python's standard library
    # .py files; text: the files under `path` that match `glob` (recursive), one document
    # each; jsonl / parquet: one document per line / row, its text in `text_field`.
    kind: Literal["synthetic", "stdlib", "text", "jsonl", "parquet"] = "synthetic"
    path: str | None = None
    glob: str = "*"
    text_field: str = "text"
    # "byte" (UTF-8 bytes after bos 0, eos 1, pad 2), the path of a Hugging Face tokenizer.json,
    # or the name of one shipped in configs/tokenizers (e.g. stdlib-bpe512.json).
    tokenizer: str = "byte"
    # Special ids for a tokenizer.json; null: from tokenizer_config.json beside it, or by name.
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    eval_fraction: float = 0.01  # documents held out for evaluation, picked by a fixed hash
    shuffle: bool = True
    # Train rows are also shuffled within windows of this many packed rows (0: off). Packing
    # cuts each document into consecutive rows, so without it a batch is one stretch of one or
    # two documents; a window spanning many documents mixes them in every batch.
    shuffle_window: int = 0
    seed: int = 0
    # False: packed documents cannot attend to each other (segment ids, per-document positions).
    cross_document_attention: bool = False
    num_workers: int = 0  # tokenizing worker processes (Grain mp_prefetch); 0: in-process
    read_threads: int = 4  # threads reading and tokenizing documents in each process
    prefetch_buffer_size: int = 64  # documents read ahead in each process
    # A record that is not valid JSON, lacks text_field, or is not valid UTF-8: "error" stops
    # before training with its file and line; "skip" leaves it out and logs how many were left.
    on_bad_record: Literal["skip", "error"] = "error"

    def __post_init__(self):
        p = "data"
        _require(
            self.kind in ("synthetic", "stdlib") or bool(self.path),
            f"{p}.path is required for {p}.kind={self.kind} (a file or a folder)",
        )
        for name in ("glob", "text_field", "tokenizer"):
            _require(bool(getattr(self, name)), f"{p}.{name} must not be empty")
        for name in ("bos_id", "eos_id", "pad_id"):
            tok = getattr(self, name)
            _require(tok is None or tok >= 0, f"{p}.{name}={tok} must be >= 0 or null")
        _require(
            0.0 <= self.eval_fraction < 1.0,
            f"{p}.eval_fraction={self.eval_fraction} must be in [0, 1)",
        )
        _require(0 <= self.seed < 2**32, f"{p}.seed={self.seed} must be in [0, 2**32)")
        for name in ("num_workers", "read_threads", "shuffle_window"):
            _require(getattr(self, name) >= 0, f"{p}.{name}={getattr(self, name)} must be >= 0")
        _require(
            self.prefetch_buffer_size >= 1,
            f"{p}.prefetch_buffer_size={self.prefetch_buffer_size} must be >= 1",
        )


@dataclasses.dataclass(frozen=True)
class Config:
    """Root config: the model, how it runs, the device mesh, training and multi-process
    settings."""

    model: ModelConfig = ModelConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    mesh: MeshConfig = MeshConfig()
    train: TrainConfig = TrainConfig()
    distributed: DistributedConfig = DistributedConfig()
    data: DataConfig = DataConfig()

    def __post_init__(self):
        mb = self.train.batch_size // self.train.micro_batches
        _require(
            mb >= 1,
            f"train.batch_size/train.micro_batches={mb} sequences per micro-batch",
        )


# ---------------------------------------------------------------------------------------------
# Building dataclasses from nested dicts with type checking.


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_SCI_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}={value!r} has the wrong type: expected {_type_name(tp)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        _require(value in choices, f"{key}={value!r} is not one of {list(choices)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        _require(
            isinstance(value, Mapping),
            f"{key} must be a mapping of {tp.__name__} fields, got {value!r}",
        )
        return _build(tp, value, key)
    if tp is bool:
        _require(isinstance(value, bool), f"{key}={value!r} must be true or false")
        return value
    if tp is int:
        _require(
            isinstance(value, int) and not isinstance(value, bool),
            f"{key}={value!r} must be an integer",
        )
        return value
    if tp is float:
        if isinstance(value, str) and _SCI_FLOAT.fullmatch(value.strip()):
            value = float(value)  # PyYAML (YAML 1.1) reads `1e-5` (no dot) as a string
        _require(
            isinstance(value, (int, float)) and not isinstance(value, bool),
            f"{key}={value!r} must be a number",
        )
        return float(value)
    if tp is str:
        _require(isinstance(value, str), f"{key}={value!r} must be a string")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} at {key}")


def _build(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in values.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            _unknown_key(key, str(k), names, prefix)
        kwargs[k] = _coerce(v, hints[k], key)
    return cls(**kwargs)


def _unknown_key(key: str, name: str, names: Sequence[str], prefix: str) -> typing.NoReturn:
    if prefix == "model" and name in MOVED_TO_RUNTIME:
        raise ConfigError(
            f"'{key}' moved to 'runtime.{name}' (runtime knobs are apart from the architecture); "
            f"write runtime.{name}=..."
        )
    close = difflib.get_close_matches(name, names, n=3)
    dotted = [f"'{prefix + '.' if prefix else ''}{c}'" for c in close]
    hint = f"; did you mean {' or '.join(dotted)}?" if close else ""
    raise ConfigError(f"unknown config key '{key}'{hint}")


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        _require(
            isinstance(child, dict),
            f"override {dotted}: '{part}' is a value, not a section",
        )
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: Sequence[str]) -> dict:
    """Turn ['model.moe.n_group=4', ...] into a nested dict; values are parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        _require(bool(sep) and bool(key), f"override '{item}' is not of the form key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or type(e).__name__
            raise ConfigError(
                f"override {key.strip()}={raw}: the value is not YAML ({problem}); quote it"
            ) from None
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict, update: Mapping) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


def config_from_dict(values: Mapping[str, Any], overrides: Sequence[str] = ()) -> Config:
    return _build(Config, _merge(dict(values), parse_overrides(overrides)), "")


def config_from_saved(values: Mapping[str, Any]) -> Config:
    """A Config from a dict this project saved (checkpoint metadata, run config.json), also one
    written before the runtime keys left `model:`: those are moved to `runtime:` so that no saved
    run becomes unreadable. User YAML and overrides get no such help (they must be fixed)."""
    values = dict(values)
    model = dict(values.get("model") or {})
    runtime = dict(values.get("runtime") or {})
    for name in MOVED_TO_RUNTIME:
        if name in model:
            value = model.pop(name)
            runtime.setdefault(name, "save_dots" if (name, value) == ("remat", "dots") else value)
    if model:
        values["model"] = model
    if runtime:
        values["runtime"] = runtime
    return config_from_dict(values)


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config (a path, or a name in `configs/` such as 'tiny') and apply overrides."""
    values: dict = {}
    if path is not None:
        resolved = _resolve_config_path(path)
        with open(resolved) as f:
            loaded = yaml.safe_load(f)
        _require(
            loaded is None or isinstance(loaded, dict),
            f"{resolved}: top level must be a mapping of sections",
        )
        values = loaded or {}
    return config_from_dict(values, overrides)


CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _resolve_config_path(path: str | os.PathLike) -> str:
    """A config file's path: `path` itself when it is a file, else the shipped config of that
    name. A directory never counts: a run directory called `tiny` in the working directory
    (`train.run_dir=tiny`) must not hide `configs/tiny.yaml`."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return path
    candidate = os.path.join(CONFIG_DIR, path if path.endswith(".yaml") else f"{path}.yaml")
    if os.path.isfile(candidate):
        return candidate
    if os.path.isdir(path):
        raise FileNotFoundError(
            f"config {path!r} is a directory, not a YAML file (and {candidate} does not exist)"
        )
    raise FileNotFoundError(f"config file not found: {path} (also looked for {candidate})")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def replace(cfg: Any, **changes: Any) -> Any:
    """`dataclasses.replace` with dotted nested keys: replace(m, **{"moe.n_group": 2}).

    Values are checked like YAML values and overrides (types, choices, unknown keys).
    """
    nested: dict = {}
    for k, v in changes.items():
        _set_dotted(nested, k, v)
    return _replace_nested(cfg, nested, _PREFIX.get(type(cfg), ""))


def _replace_nested(cfg: Any, nested: Mapping, prefix: str) -> Any:
    hints = typing.get_type_hints(type(cfg))
    kw = {}
    for k, v in nested.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        current = getattr(cfg, k, None)
        if isinstance(v, Mapping) and dataclasses.is_dataclass(current):
            kw[k] = _replace_nested(current, v, key)
        elif k in hints:
            kw[k] = _coerce(v, hints[k], key)
        else:
            _unknown_key(key, str(k), list(hints), prefix)
    return dataclasses.replace(cfg, **kw)


# ---------------------------------------------------------------------------------------------
# Hugging Face config.json -> ModelConfig.

_HF_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "n_routed_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
)

# Keys that change the math and that we do not implement: refuse rather than silently differ.
_HF_MUST_EQUAL = {
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
}


def from_hf_config(hf: Mapping[str, Any] | str | os.PathLike, **overrides: Any) -> ModelConfig:
    """Build a ModelConfig from a Hugging Face DeepSeek-V2/V3 `config.json` (dict or path).

    Accepts `rope_scaling` (hub files, key `type`) and `rope_parameters` (transformers 5.x, key
    `rope_type`). Keys that do not change the math (use_cache, initializer_range, ...) are ignored.
    `overrides` are dotted ModelConfig fields, e.g. **{"mtp.depth": 0}.
    """
    if not isinstance(hf, Mapping):
        path = os.fspath(hf)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path) as f:
            hf = json.load(f)
    missing = [k for k in _HF_REQUIRED if hf.get(k) is None]
    _require(not missing, f"config.json lacks required key(s) {', '.join(missing)}")
    model_type = hf.get("model_type", "deepseek_v3")
    _require(
        model_type in ("deepseek_v2", "deepseek_v3"),
        f"config.json model_type={model_type!r} is not deepseek_v2 or deepseek_v3",
    )
    for key, want in _HF_MUST_EQUAL.items():
        if key in hf and hf[key] is not None:
            _require(hf[key] == want, f"config.json {key}={hf[key]!r} is not supported ({want!r})")
    _require(
        hf.get("rope_interleave", True) in (True, None),
        "config.json rope_interleave=false is not supported (DeepSeek rotates adjacent pairs)",
    )
    heads = hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads")
    _require(
        kv_heads in (None, heads),
        f"config.json num_key_value_heads={kv_heads} != num_attention_heads={heads}: MLA has "
        "one latent shared by all heads, grouped K/V heads do not apply",
    )

    is_v3 = model_type == "deepseek_v3"
    topk_method = hf.get("topk_method") or ("noaux_tc" if is_v3 else "greedy")
    scoring = hf.get("scoring_func") or ("sigmoid" if topk_method == "noaux_tc" else "softmax")
    n_group = hf.get("n_group") or 1
    moe = dict(
        n_routed_experts=hf["n_routed_experts"],
        n_shared_experts=hf.get("n_shared_experts") or 0,
        n_experts_per_tok=hf["num_experts_per_tok"],
        moe_intermediate_size=hf["moe_intermediate_size"],
        first_k_dense_replace=hf.get("first_k_dense_replace") or 0,
        moe_layer_freq=hf.get("moe_layer_freq") or 1,
        topk_method=topk_method,
        scoring_func=scoring,
        n_group=n_group,
        topk_group=hf.get("topk_group") or n_group,
        # transformers' V2 router never renormalizes; its V3 router follows the flag.
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)) and topk_method == "noaux_tc",
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
    )
    mla = dict(
        q_lora_rank=hf.get("q_lora_rank"),
        kv_lora_rank=hf["kv_lora_rank"],
        qk_nope_head_dim=hf["qk_nope_head_dim"],
        qk_rope_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"],
    )
    eos = hf.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    values = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=eos,
        mla=mla,
        moe=moe,
        mtp=dict(depth=hf.get("num_nextn_predict_layers") or 0),
        rope=_hf_rope(hf),
    )
    cfg = _build(ModelConfig, values, "model")
    return replace(cfg, **overrides) if overrides else cfg


def _hf_rope(hf: Mapping[str, Any]) -> dict:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind == "default":
        return dict(theta=float(theta))
    _require(kind == "yarn", f"config.json rope type {kind!r} is not supported (default or yarn)")
    original = params.get("original_max_position_embeddings")
    _require(original is not None, "config.json yarn rope needs original_max_position_embeddings")
    factor = params.get("factor")
    if factor is None:  # transformers derives it from the two context lengths
        factor = hf["max_position_embeddings"] / original
    _require(
        params.get("truncate", True) is not False,
        "config.json rope truncate=false is not supported",
    )
    return dict(
        theta=float(theta),
        type="yarn",
        factor=float(factor),
        original_max_position_embeddings=int(original),
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        mscale=float(params.get("mscale") or 0.0),
        mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
        attention_factor=params.get("attention_factor"),
    )


def to_hf_config(cfg: ModelConfig) -> dict:
    """The Hugging Face config.json for `cfg` (the inverse of `from_hf_config`)."""
    model_type = "deepseek_v3" if cfg.moe.topk_method == "noaux_tc" else "deepseek_v2"
    rope: dict[str, Any] = {"rope_theta": cfg.rope.theta, "rope_type": cfg.rope.type}
    if cfg.rope.type == "yarn":
        rope.update(
            factor=cfg.rope.factor,
            original_max_position_embeddings=cfg.rope.original_max_position_embeddings,
            beta_fast=cfg.rope.beta_fast,
            beta_slow=cfg.rope.beta_slow,
            mscale=cfg.rope.mscale,
            mscale_all_dim=cfg.rope.mscale_all_dim,
        )
        if cfg.rope.attention_factor is not None:
            rope["attention_factor"] = cfg.rope.attention_factor
    out = dict(
        architectures=[
            "DeepseekV3ForCausalLM" if model_type == "deepseek_v3" else "DeepseekV2ForCausalLM"
        ],
        model_type=model_type,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        hidden_act="silu",
        tie_word_embeddings=False,
        attention_bias=False,
        q_lora_rank=cfg.mla.q_lora_rank,
        kv_lora_rank=cfg.mla.kv_lora_rank,
        qk_nope_head_dim=cfg.mla.qk_nope_head_dim,
        qk_rope_head_dim=cfg.mla.qk_rope_head_dim,
        v_head_dim=cfg.mla.v_head_dim,
        n_routed_experts=cfg.moe.n_routed_experts,
        n_shared_experts=cfg.moe.n_shared_experts,
        num_experts_per_tok=cfg.moe.n_experts_per_tok,
        moe_intermediate_size=cfg.moe.moe_intermediate_size,
        first_k_dense_replace=cfg.moe.first_k_dense_replace,
        moe_layer_freq=cfg.moe.moe_layer_freq,
        topk_method=cfg.moe.topk_method,
        scoring_func=cfg.moe.scoring_func,
        n_group=cfg.moe.n_group,
        topk_group=cfg.moe.topk_group,
        norm_topk_prob=cfg.moe.norm_topk_prob,
        routed_scaling_factor=cfg.moe.routed_scaling_factor,
        num_nextn_predict_layers=cfg.mtp.depth,
        rope_parameters=rope,
    )
    return out


_PREFIX = {
    Config: "",
    MeshConfig: "mesh",
    TrainConfig: "train",
    DistributedConfig: "distributed",
    DataConfig: "data",
    ModelConfig: "model",
    RuntimeConfig: "runtime",
    MLAConfig: "model.mla",
    MoEConfig: "model.moe",
    MTPConfig: "model.mtp",
    RopeConfig: "model.rope",
}
