"""`plan` and `sweep`: compile for a TPU slice and turn what the compiler says into a PlanResult."""

from __future__ import annotations

import dataclasses
import typing

from deepseek_jax.config import Config, ModelConfig, load_config
from deepseek_jax.plan.chips import Topology, parse_topology
from deepseek_jax.plan.compile import (
    compile_program,
    compiler_hbm_limit,
    devices_for,
    lower_decode_step,
    lower_train_step,
)
from deepseek_jax.plan.report import PlanResult, Roofline
from deepseek_jax.train.flops import forward_flops_per_token, train_flops_per_token


def remat_key(cfg: Config) -> str:
    """Where the remat policy lives: `runtime.remat` once the runtime section exists."""
    return "runtime.remat" if hasattr(cfg, "runtime") else "model.remat"


def remat_of(cfg: Config) -> str:
    return cfg.runtime.remat if hasattr(cfg, "runtime") else cfg.model.remat


def remat_choices(cfg: Config) -> tuple[str, ...]:
    owner = cfg.runtime if hasattr(cfg, "runtime") else cfg.model
    return typing.get_args(typing.get_type_hints(type(owner))["remat"])


def _recompute_factor(remat: str) -> float:
    """Forward passes per step over 3 (fwd + bwd ≈ 3 forward): full remat runs the forward twice.
    Partial policies recompute less; counting them as 1 keeps the estimate a lower bound."""
    return 4.0 / 3.0 if remat == "full" else 1.0


def decode_flops_per_token(cfg: ModelConfig, context: int) -> float:
    """One decode token's forward FLOPs against `context` cached positions in the absorbed form
    (SPEC §1): the projections and active experts of every main layer and the head (no MTP),
    plus per head and position a score over d_c + d_r and a context sum over d_c."""
    main = dataclasses.replace(cfg, mtp=dataclasses.replace(cfg.mtp, depth=0))
    m = cfg.mla
    dense = forward_flops_per_token(main, 1)  # attends to one position: negligible
    attention = 2 * cfg.num_heads * (2 * m.kv_lora_rank + m.qk_rope_head_dim) * context
    return dense + cfg.num_layers * attention


def plan(
    config: str,
    topology: str | Topology,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    generate: bool = False,
    batch: int | None = None,
    context: int | None = None,
    hlo_out: str | None = None,
    memory_report: int = 0,
) -> PlanResult:
    """Compile the train step (or, with `generate`, one decode step) of `config` for `topology`.

    Train: the batch is `train.batch_size` sequences of `train.seq_len` tokens (set them with
    overrides). Generate: `batch` rows each attending to a latent cache of `context` tokens.
    `hlo_out`: a file to write the compiled HLO text to (when it fits). `memory_report`: list
    that many of the largest temporaries from XLA's buffer assignment.
    """
    cfg = load_config(config, list(overrides))
    topo = parse_topology(topology) if isinstance(topology, str) else topology
    devices = devices_for(topo)
    if generate:
        batch = batch or cfg.train.batch_size
        context = context or cfg.train.seq_len
        program = lower_decode_step(cfg, devices, batch, context)
        shape = {"batch": batch, "context": context}
        model_flops = decode_flops_per_token(cfg.model, context) * batch
        tokens = batch
        factor = 1.0
    else:
        program = lower_train_step(cfg, devices)
        b, t = cfg.train.batch_size, cfg.train.seq_len
        shape = {"batch": b, "seq_len": t}
        model_flops = train_flops_per_token(cfg.model, t) * b * t
        tokens = b * t
        factor = _recompute_factor(remat_of(cfg))
    compiled = compile_program(program.lowered, program.n_devices, memory_report)
    if hlo_out and compiled.hlo_text:
        with open(hlo_out, "w") as f:
            f.write(compiled.hlo_text)
    chips = topo.chips
    result = PlanResult(
        mode="generate" if generate else "train",
        config=config,
        overrides=list(overrides),
        topology=topo.name,
        chip=topo.chip.name,
        chips=chips,
        mesh=program.mesh_shape,
        rules=cfg.mesh.rules,
        remat=remat_of(cfg),
        fits=compiled.fits,
        compile_seconds=compiled.compile_seconds,
        state_bytes=program.state_bytes,
        memory=compiled.memory,
        hbm_doc_bytes=topo.chip.hbm_bytes,
        hbm_compiler_bytes=compiled.compiler_hbm_limit or compiler_hbm_limit(devices),
        compiler_required_bytes=compiled.compiler_hbm_used,
        error=compiled.error,
        memory_report=compiled.memory_report,
        peak_flops=topo.chip.peak_bf16_flops,
        shape=shape,
    )
    if compiled.fits:
        h = compiled.hlo
        result.xla_flops = compiled.xla_flops
        result.xla_bytes_accessed = compiled.xla_bytes_accessed
        result.hlo_hbm_bytes = h.hbm_bytes
        result.collectives = {k: dataclasses.asdict(v) for k, v in h.collectives.items()}
        result.dispatch = {k: dataclasses.asdict(v) for k, v in h.dispatch.items()}
        kinds = cfg.model.layer_kinds
        result.moe_layers = sum(
            k == "moe" for k in (kinds[: cfg.model.num_layers] if generate else kinds)
        )
        result.loops = h.loops
        chip = topo.chip
        per_chip = model_flops / chips
        result.roofline = Roofline(
            model_flops_per_chip=per_chip,
            compute_s=max(per_chip * factor, compiled.xla_flops) / chip.peak_bf16_flops,
            hbm_s=max(compiled.xla_bytes_accessed, h.hbm_bytes) / chip.hbm_bandwidth,
            ici_s=h.traffic_bytes / chip.ici_bandwidth,
            tokens_per_chip=tokens / chips,
        )
    return result


def sweep_candidates(
    cfg: Config,
    chips: int,
    meshes: list[str] | None = None,
    rules: list[str] | None = None,
    remats: list[str] | None = None,
) -> list[list[str]]:
    """Override lists to try: mesh splits x rules presets x remat policies.

    Default meshes: everything on fsdp, and fsdp x expert for expert 8 and 64 (where the slice
    and the expert count allow); rules: fsdp without an expert axis, ep and ep_fsdp with one;
    remat: full, save_dots_except_experts when the config knows it, none.
    """
    if meshes is None:
        n_experts = cfg.model.moe.n_routed_experts
        experts = [e for e in (1, 8, 64) if e <= chips and chips % e == 0 and n_experts % e == 0]
        meshes = [f"data=1,fsdp={chips // e},expert={e}" for e in experts]
    if remats is None:
        known = remat_choices(cfg)
        remats = [r for r in ("full", "save_dots_except_experts", "none") if r in known]
    out = []
    key = remat_key(cfg)
    for mesh in meshes:
        sizes = dict(item.split("=") for item in mesh.split(","))
        has_expert = int(sizes.get("expert", 1)) > 1
        presets = rules or (["ep", "ep_fsdp"] if has_expert else ["fsdp"])
        for preset in presets:
            for remat in remats:
                out.append(
                    [f"mesh.{k.strip()}={v.strip()}" for k, v in sizes.items()]
                    + [f"mesh.rules={preset}", f"{key}={remat}"]
                )
    return out


def sweep(
    config: str,
    topology: str,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    meshes: list[str] | None = None,
    rules: list[str] | None = None,
    remats: list[str] | None = None,
    generate: bool = False,
    batch: int | None = None,
    context: int | None = None,
    log=None,
) -> list[PlanResult]:
    """`plan` for every candidate (see `sweep_candidates`); the user's overrides come first."""
    topo = parse_topology(topology)
    cfg = load_config(config, list(overrides))
    results = []
    candidates = sweep_candidates(cfg, topo.chips, meshes, rules, None if generate else remats)
    if generate:  # decode has no backward pass: remat does not apply
        candidates = [[o for o in c if not o.startswith(remat_key(cfg))] for c in candidates]
        candidates = [list(c) for c in dict.fromkeys(tuple(c) for c in candidates)]
    for extra in candidates:
        if log:
            log(f"plan: compiling {' '.join(extra)}")
        results.append(
            plan(
                config,
                topo,
                [*overrides, *extra],
                generate=generate,
                batch=batch,
                context=context,
            )
        )
    return results
