"""Decode speed: the latent KV cache against recomputing the full forward pass for every new
token, and MTP speculative decoding against plain decoding, on a trained tiny model.

    python bench/decode.py                       # trains runs/bench-tiny first if it is empty
    python bench/decode.py --checkpoint runs/tiny --batch 8 --new-tokens 128
    python bench/decode.py --batch 1 --shapes    # + where a verify's extra cost comes from
    python bench/decode.py --batch 1 --parts     # + a step and a verify without each part

Prints tokens/s of each method (compilation excluded: every jitted function runs once before
it is timed, then the best of --repeats runs counts), the MTP draft's acceptance rate, and the
cache's bytes per token against a cache of expanded keys and values, and the acceptance rate
at which speculation would break even (or reach 1.2x) given the measured per-call costs.
Figures on a CPU say little about an accelerator; compare methods with each other, on the same
machine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_jax.checkpoint.source import is_hf_checkpoint
from deepseek_jax.checkpoint.training import newest_good_step
from deepseek_jax.config import load_config
from deepseek_jax.generate import (
    bytes_per_token,
    expanded_bytes_per_token,
    generate,
    speculative_generate,
)
from deepseek_jax.generate.text import load_for_generation


def trained_tiny(run_dir: str, steps: int) -> str:
    """A run directory with a trained tiny model (the default main job), trained if empty."""
    ckpts = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(ckpts) or newest_good_step(ckpts) is None:
        from deepseek_jax.train.loop import train

        print(f"# training tiny for {steps} steps into {run_dir} ...", flush=True)
        cfg = load_config(
            "tiny",
            [f"train.run_dir={run_dir}", f"train.steps={steps}", "train.progress_bar=false"],
        )
        train(cfg, log=lambda _: None)
    return run_dir


def full_recompute(model, prompts_bt: np.ndarray, new_tokens: int):
    """Greedy decoding that runs the whole forward pass over the whole buffer for every new
    token (no cache): the baseline a KV cache exists to beat."""
    graphdef, state = nnx.split(model)
    b, p = prompts_bt.shape

    @jax.jit
    def run(state, buf_bt):
        m = nnx.merge(graphdef, state)

        def body(i, buf_bt):
            logits_btv = m(buf_bt)
            nxt_b = jnp.argmax(logits_btv[:, p - 1 + i], axis=-1).astype(jnp.int32)
            return jax.lax.dynamic_update_slice_in_dim(buf_bt, nxt_b[:, None], p + i, axis=1)

        return jax.lax.fori_loop(0, new_tokens, body, buf_bt)

    buf = np.zeros((b, p + new_tokens), np.int32)
    buf[:, :p] = prompts_bt
    return lambda: np.asarray(run(state, jnp.asarray(buf))[:, p:])


LOOP_CALLS = 64


def call_costs(model, prompts_bt: np.ndarray, repeats: int) -> dict[str, float]:
    """Seconds per call, on a cache holding the prompts: the main model over a 1-token chunk
    (a plain decode step) and a 2-token chunk (a speculative verify), and MTP module 1 over a
    1- and a 2-token chunk (a draft after a rejected or a kept draft). Each is timed as
    LOOP_CALLS calls inside one jitted loop, as the decode loops run them: without the host's
    per-call dispatch, which on a CPU is as large as a small model's step. Speculative decoding
    pays off when one verify and one draft cost less than (1 + acceptance rate) plain steps."""
    from deepseek_jax.generate import forward_with_cache, init_cache, mtp_with_cache

    graphdef, state = nnx.split(model)
    b, p = prompts_bt.shape
    cfg = model.cfg
    cache = jax.jit(lambda s, c, t: forward_with_cache(nnx.merge(graphdef, s), t, c)[1])(
        state, init_cache(cfg, b, p + 8, jnp.float32), jnp.asarray(prompts_bt)
    )
    mtp_cache = init_cache(cfg, b, p + 8, jnp.float32, layers=1)

    def chunk(i, width):
        """Call i's tokens [B, width]: different in every call."""
        return (jnp.arange(b * width, dtype=jnp.int32).reshape(b, width) + i) % cfg.vocab_size

    def main_call(m, i, width):
        logits, new_cache = forward_with_cache(m, chunk(i, width), cache)
        return logits.sum() + new_cache.c_lbsr[:, :, p].sum()

    def mtp_call(m, i, width):
        h = jnp.full((b, width, cfg.hidden_size), 0.01, jnp.float32) * i.astype(jnp.float32)
        _, logits, new_cache = mtp_with_cache(m, h, chunk(i, width), mtp_cache)
        return logits.sum() + new_cache.c_lbsr[:, :, 0].sum()

    def per_call(call, width):
        @jax.jit
        def run(state):
            m = nnx.merge(graphdef, state)
            # A different chunk every call, so that nothing is hoisted out of the loop.
            return jax.lax.fori_loop(
                0, LOOP_CALLS, lambda i, acc: acc + call(m, i, width), jnp.float32(0)
            )

        return timed(lambda: run(state).block_until_ready(), repeats)[0] / LOOP_CALLS

    out = {f"main_{w}": per_call(main_call, w) for w in (1, 2)}
    if cfg.mtp.depth:
        out.update({f"mtp_{w}": per_call(mtp_call, w) for w in (1, 2)})
    return out


def ffn_shapes(cfg) -> dict:
    """Model configs shaped like `cfg` but for the FFNs: as is; with as many routed experts as
    each token picks (every token uses every expert, so two tokens read no more expert matrices
    than one); and with every layer dense."""
    from deepseek_jax.config import replace

    k = cfg.moe.n_experts_per_tok
    return {
        "as trained": cfg,
        f"{k} routed experts, top-{k}": replace(
            cfg, **{"moe.n_routed_experts": k, "moe.n_group": 1, "moe.topk_group": 1}
        ),
        "every layer dense": replace(cfg, **{"moe.first_k_dense_replace": cfg.num_layers}),
    }


def verify_cost_by_shape(cfg, prompts_bt: np.ndarray, repeats: int) -> dict[str, dict]:
    """`call_costs` of a random-weight model of each of `ffn_shapes(cfg)`. Where the
    verify/step ratio falls between them says how much of a verify's extra cost is the
    routed experts' (each (token, expert) pair reads its expert's matrices)."""
    from deepseek_jax.model.transformer import DeepSeek
    from deepseek_jax.runtime import Runtime

    rt = Runtime.of(compute_dtype="float32", param_dtype="float32")
    return {
        name: call_costs(DeepSeek(c, nnx.Rngs(0), rt), prompts_bt, repeats)
        for name, c in ffn_shapes(cfg).items()
    }


@contextlib.contextmanager
def without(part: str):
    """While tracing inside this block, one part of every block passes its input through: the
    routed experts (routing and the shared expert still run) or the whole attention (projections,
    cache write, scores). What a call costs without it is what it costs with it minus its share;
    the outputs are meaningless, only the timing counts."""
    from deepseek_jax.generate import decode
    from deepseek_jax.model import moe

    if part == "routed experts":
        module, name = moe, "routed_experts"

        def skip(x_nd, *args, **kwargs):
            return 0.5 * x_nd.astype(jnp.float32)
    elif part == "attention":
        module, name = decode, "absorbed_attention"

        def skip(attn, x_btd, cos_btk, sin_btk, c_bsr, k_pe_bsk, write_bt, mask_bts):
            return 0.5 * x_btd, c_bsr, k_pe_bsk
    else:
        raise ValueError(f"without: unknown part {part!r}")
    original = getattr(module, name)
    setattr(module, name, skip)
    try:
        yield
    finally:
        setattr(module, name, original)


def costs_by_part(model, prompts_bt: np.ndarray, repeats: int) -> dict[str, dict]:
    """`call_costs` of the model as is, without its routed experts, without its attention, and
    without both: which parts make a 2-token verify cost more than a 1-token step."""
    out = {"as is": call_costs(model, prompts_bt, repeats)}
    for parts in (("routed experts",), ("attention",), ("routed experts", "attention")):
        with contextlib.ExitStack() as stack:
            for part in parts:
                stack.enter_context(without(part))
            out["without " + " and ".join(parts)] = call_costs(model, prompts_bt, repeats)
    return out


def acceptance_needed(costs: dict[str, float], speedup: float) -> float:
    """The draft acceptance rate a at which one verify plus one draft (1-token after a
    rejection, 2-token after a kept draft) costs 1/speedup of the (1 + a) plain steps it
    replaces: speedup·(verify + mtp_1 + a·(mtp_2 - mtp_1)) = (1 + a)·step. Above 1: out of reach
    with one draft token."""
    step, verify = costs["main_1"], costs["main_2"]
    extra = costs["mtp_2"] - costs["mtp_1"]
    return (speedup * (verify + costs["mtp_1"]) - step) / (step - speedup * extra)


def print_step_and_verify(title: str, rows: dict[str, dict]) -> None:
    """One line per variant: its decode step, its 2-token verify, and their ratio."""
    print(title)
    width = max(len(name) for name in rows)
    for name, c in rows.items():
        print(
            f"  {name:<{width}} decode step {1e6 * c['main_1']:4.0f} us, 2-token verify "
            f"{1e6 * c['main_2']:4.0f} us ({c['main_2'] / c['main_1']:.2f}x)"
        )


def timed(fn, repeats: int) -> tuple[float, object]:
    out = fn()  # compile and warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def timed_in_turns(fns: dict, repeats: int) -> dict[str, tuple[float, object]]:
    """`timed` for several functions whose calls alternate, so that drift in the machine's
    load hits each alike: {name: (best seconds, output)}."""
    outs = {name: fn() for name, fn in fns.items()}  # compile and warm up
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            outs[name] = fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: (best[name], outs[name]) for name in fns}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="runs/bench-tiny", help="trained if empty")
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--shapes",
        action="store_true",
        help="also time a verify against a step on random models with the same widths: as "
        "trained, with every routed expert active, and all dense",
    )
    parser.add_argument(
        "--parts",
        action="store_true",
        help="also time a step and a verify without the routed experts, without the attention, "
        "and without both (what each part adds to a verify)",
    )
    args = parser.parse_args(argv)

    path = args.checkpoint
    if not is_hf_checkpoint(path):
        path = trained_tiny(path, args.train_steps)
    model, tokenizer = load_for_generation(path)
    cfg = model.cfg
    print(
        f"# {jax.devices()[0].platform}, checkpoint {path}, batch {args.batch}, prompt "
        f"{args.prompt_len} tokens, {args.new_tokens} new tokens per row, greedy"
    )

    # Prompts: consecutive slices of this file's own text (what the tiny model saw in training).
    ids = tokenizer.encode(open(__file__).read())
    step = max(1, (len(ids) - args.prompt_len) // args.batch)
    prompts = [ids[i * step : i * step + args.prompt_len] for i in range(args.batch)]
    prompts_bt = np.asarray(prompts, np.int32)
    n_new = args.batch * args.new_tokens
    key = jax.random.key(0)

    t_full, full_out = timed(
        lambda: full_recompute(model, prompts_bt, args.new_tokens)(), args.repeats
    )
    # Plain and speculative decoding in turns (the best of --repeats runs each).
    fns = {"cache": lambda: generate(model, prompts, args.new_tokens, key=key)}
    if cfg.mtp.depth:
        fns["spec"] = lambda: speculative_generate(model, prompts, args.new_tokens, key=key)
    runs = timed_in_turns(fns, args.repeats)
    t_cache, cache_out = runs["cache"]
    same = np.array_equal(np.asarray(cache_out), full_out)
    print(f"full forward per token : {n_new / t_full:10.1f} tokens/s")
    print(
        f"latent KV cache        : {n_new / t_cache:10.1f} tokens/s  "
        f"({t_full / t_cache:.2f}x; same tokens: {same})"
    )

    if cfg.mtp.depth:
        t_spec, (spec_out, stats) = runs["spec"]
        same = spec_out == cache_out
        print(
            f"MTP speculative        : {n_new / t_spec:10.1f} tokens/s  "
            f"({t_cache / t_spec:.2f}x over the cache alone; same tokens: {same})"
        )
        print(
            f"MTP draft acceptance   : {stats['acceptance_rate']:.3f} "
            f"({stats['accepted']}/{stats['drafted']} drafts, "
            f"{stats['main_forward_calls']} main-model calls for {args.new_tokens} tokens)"
        )
    else:
        print("MTP speculative        : skipped (the checkpoint has no MTP module)")
    costs = call_costs(model, prompts_bt, max(args.repeats, 10))
    line = (
        f"per call in a loop (us): decode step {1e6 * costs['main_1']:.0f}, "
        f"2-token verify {1e6 * costs['main_2']:.0f} "
        f"({costs['main_2'] / costs['main_1']:.2f}x)"
    )
    if "mtp_2" in costs:
        line += (
            f", MTP draft {1e6 * costs['mtp_1']:.0f} / {1e6 * costs['mtp_2']:.0f} (1 / 2 tokens)"
        )
    print(line)
    if "mtp_2" in costs:
        print(
            f"acceptance needed      : {acceptance_needed(costs, 1.0):.2f} to break even, "
            f"{acceptance_needed(costs, 1.2):.2f} for 1.2x (from these per-call costs)"
        )
    if args.shapes:
        print_step_and_verify(
            "verify/step by FFN shape (random weights, same attention and widths):",
            verify_cost_by_shape(cfg, prompts_bt, max(args.repeats, 10)),
        )
    if args.parts:
        print_step_and_verify(
            "step and verify without each part (the part passes its input through):",
            costs_by_part(model, prompts_bt, max(args.repeats, 10)),
        )

    for name, c in (
        ("this model", cfg),
        ("deepseek-v3-671b", load_config("deepseek-v3-671b").model),
    ):
        lat, full = bytes_per_token(c, jnp.bfloat16), expanded_bytes_per_token(c, jnp.bfloat16)
        print(
            f"cache bytes/token bf16 : {lat:>9,} latent vs {full:>11,} expanded K/V "
            f"({full / lat:.1f}x smaller) [{name}]"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
