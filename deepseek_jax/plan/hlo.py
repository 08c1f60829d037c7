"""Read a compiled (per-device, SPMD-partitioned) HLO module's text: collectives and loops.

XLA's own `cost_analysis()` counts the body of a `while` loop once, whatever its trip count, so
for a model whose layers run under `jax.lax.scan` it undercounts FLOPs, bytes and collectives by
about the number of layers. Here every computation gets a multiplicity: 1 for the entry, and for
the body of a `while` the multiplicity of its caller times the loop's trip count. The trip count
is read from the loop condition when it is `counter < constant` (or `constant > counter`), the
counter starting from the constant fed to the loop (0 when it is not a visible constant), which is
how `jax.lax.scan` and `fori_loop` lower; a loop whose trip count cannot be read counts once and is
counted in `unknown_trip_counts`.

`hbm_bytes` is a rough loop-aware HBM traffic figure: operands plus results of every instruction
outside fusions (a fusion reads its operands and writes its result once), times the multiplicity;
a (fused) dynamic-slice reads only its slice and a dynamic-update-slice writes only its update,
so a scan reading one layer of stacked weights counts one layer. It ignores TPU tile padding and
on-chip reuse.

Bytes moved by a collective, per device and per execution, with g the replica-group size and
`in` the bytes of its operands on one device (ring algorithms, what crosses the links):
    all-gather        in·(g−1)        (receives every other member's piece)
    reduce-scatter    in·(g−1)/g
    all-reduce        2·in·(g−1)/g    (a reduce-scatter then an all-gather)
    all-to-all        in·(g−1)/g
    ragged-all-to-all in·(g−1)/g      (an upper bound: the input buffer, full)
    collective-permute in
"""

from __future__ import annotations

import dataclasses
import math
import re

COLLECTIVE_KINDS = (
    "all-gather",
    "reduce-scatter",
    "all-reduce",
    "all-to-all",
    "ragged-all-to-all",
    "collective-permute",
)

_DTYPE_BYTES = {
    "pred": 1,
    "s4": 0.5,
    "u4": 0.5,
    "s8": 1,
    "u8": 1,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
    "f8e4m3": 1,
    "f8e4m3b11fnuz": 1,
    "f8e4m3fnuz": 1,
    "f8e5m2fnuz": 1,
    "bf16": 2,
    "f16": 2,
    "s16": 2,
    "u16": 2,
    "f32": 4,
    "s32": 4,
    "u32": 4,
    "f64": 8,
    "s64": 8,
    "u64": 8,
    "c64": 8,
    "c128": 16,
}
_ARRAY = re.compile(
    r"\b(" + "|".join(sorted(_DTYPE_BYTES, key=len, reverse=True)) + r")\[([\d,]*)\]"
)
# `%name = TYPE opcode(operands), attributes`; TYPE may be a tuple with nested parentheses.
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")
_COMP = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s*\(.*\{\s*$")
_OPCODE = re.compile(r"^([a-z][\w\-]*)\(")
_CALLS = re.compile(r"\b(?:calls|to_apply|body|condition)=%([\w.\-]+)")
_BRANCHES = re.compile(r"\bbranch_computations=\{([^}]*)\}")
_OPERAND = re.compile(r"%([\w.\-]+)")

# Instructions that move no data of their own (structure, aliasing views, control flow).
_NO_TRAFFIC = {
    "parameter",
    "tuple",
    "get-tuple-element",
    "constant",
    "bitcast",
    "while",
    "call",
    "conditional",
    "after-all",
    "partition-id",
    "replica-id",
    "opt-barrier",
    "copy-done",
    "all-gather-done",
    "all-reduce-done",
    "collective-permute-done",
    "async-done",
    "async-update",
    "send-done",
    "recv-done",
}


def type_bytes(type_text: str) -> float:
    """Bytes of every array in an HLO type (`bf16[2,3]{1,0}` or a tuple of them)."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(type_text):
        total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _split_type(rest: str) -> tuple[str, str]:
    """(`TYPE`, `opcode(...)...`) from the text after `=`."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[: i + 1], rest[i + 1 :].lstrip()
    head, _, tail = rest.partition(" ")
    return head, tail


def _operand_text(call: str) -> str:
    """The text inside the opcode's parentheses."""
    start = call.index("(")
    depth = 0
    for i in range(start, len(call)):
        depth += call[i] == "("
        depth -= call[i] == ")"
        if depth == 0:
            return call[start + 1 : i]
    return call[start + 1 :]


@dataclasses.dataclass
class Instr:
    name: str
    type_text: str
    opcode: str
    operands: list[str]
    args: str  # the text inside the opcode's parentheses (a constant's literal)
    attrs: str


@dataclasses.dataclass
class Module:
    computations: dict[str, list[Instr]]
    fused: set[str]  # computations that are the body of a fusion (no HBM traffic of their own)
    entry: str
    types: dict[str, str]  # instruction name -> result type text
    by_name: dict[str, Instr]


def _logical_lines(text: str) -> list[str]:
    """The module's lines with each instruction whole: an attribute may span lines (a Pallas
    kernel's `frontend_attributes={kernel_metadata={` + a JSON line + `}}, metadata=...`), and a
    continuation line that starts with `}` must neither end the computation nor lose the rest of
    the instruction. A computation ends at a line that is only `}`."""
    out: list[str] = []
    for line in text.splitlines():
        starts = (
            not out
            or line.rstrip() == "}"
            or _INSTR.match(line)
            or _COMP.match(line)
            or not line.strip()
            or line.startswith("HloModule")
        )
        if starts or out[-1].rstrip() == "}" or not out[-1].strip():
            out.append(line)
        else:
            out[-1] += " " + line.strip()
    return out


def parse_module(text: str) -> Module:
    computations: dict[str, list[Instr]] = {}
    types: dict[str, str] = {}
    by_name: dict[str, Instr] = {}
    fused: set[str] = set()
    entry, current = "", None
    for line in _logical_lines(text):
        m = _COMP.match(line)
        if m:
            current = m.group(2)
            computations[current] = []
            if m.group(1):
                entry = current
            continue
        if current is None:
            continue
        if line.rstrip() == "}":
            current = None
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name, rest = m.groups()
        type_text, call = _split_type(rest)
        op = _OPCODE.match(call)
        if not op:
            continue
        opcode = op.group(1)
        inner = _operand_text(call)
        attrs = call[len(opcode) + len(inner) + 2 :]
        instr = Instr(name, type_text, opcode, _OPERAND.findall(inner), inner, attrs)
        computations[current].append(instr)
        types[name] = type_text
        by_name[name] = instr
        if opcode == "fusion":
            fused.update(_CALLS.findall(attrs))
    return Module(computations, fused, entry, types, by_name)


def _group_size(attrs: str, n_devices: int) -> int:
    """Members of one replica group: mesh[...] {axes}, [groups,size]<=[...], or {{...},...}."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
    if m:
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
        chosen = re.findall(r"'([^']+)'", m.group(2))
        return math.prod(int(sizes[a]) for a in chosen) if chosen else n_devices
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attrs)
    if m:
        return int(m.group(2))
    m = re.search(r"replica_groups=\{\{([^}]*)\}", attrs)
    if m:
        return len(m.group(1).split(","))
    return n_devices  # `replica_groups={}`: every device


def _traffic(kind: str, in_bytes: float, g: int) -> float:
    if g <= 1 and kind != "collective-permute":
        return 0.0
    if kind == "all-gather":
        return in_bytes * (g - 1)
    if kind == "all-reduce":
        return 2 * in_bytes * (g - 1) / g
    if kind == "collective-permute":
        return in_bytes
    return in_bytes * (g - 1) / g  # reduce-scatter, all-to-all, ragged-all-to-all


def _trip_count(module: Module, loop: Instr) -> int | None:
    cond = _CALLS.findall(re.sub(r"\bbody=%[\w.\-]+", "", loop.attrs))
    if not cond or cond[0] not in module.computations:
        return None
    instrs = {i.name: i for i in module.computations[cond[0]]}
    root = module.computations[cond[0]][-1]
    if root.opcode != "compare" or len(root.operands) != 2:
        return None
    direction = re.search(r"direction=(\w+)", root.attrs)
    a, b = (instrs.get(o) for o in root.operands)
    if a is None or b is None:
        return None
    if direction and direction.group(1) == "GT":
        a, b = b, a
    elif not direction or direction.group(1) != "LT":
        return None
    if a.opcode != "get-tuple-element" or b.opcode != "constant":
        return None
    limit = _constant_value(b)
    index = re.search(r"index=(\d+)", a.attrs)
    start = _initial_value(module, loop, int(index.group(1))) if index else None
    if limit is None or start is None:
        return None
    return max(limit - start, 0)


def _constant_value(instr: Instr) -> int | None:
    return int(instr.args) if re.fullmatch(r"-?\d+", instr.args.strip()) else None


def _initial_value(module: Module, loop: Instr, index: int) -> int | None:
    """The loop counter's start: element `index` of the tuple fed to the while, a constant."""
    init = module.by_name.get(loop.operands[0]) if loop.operands else None
    if init is None or init.opcode != "tuple" or index >= len(init.operands):
        return None
    src = module.by_name.get(init.operands[index])
    while src is not None and src.opcode in ("copy", "bitcast", "convert") and src.operands:
        src = module.by_name.get(src.operands[0])
    if src is not None and src.opcode == "constant":
        return _constant_value(src)
    return 0  # not a constant we can see: scan and fori_loop counters start at 0


@dataclasses.dataclass
class CollectiveStats:
    ops: int = 0  # collective instructions in the program text
    executions: float = 0.0  # times they run per step (loop trip counts applied)
    buffer_bytes: float = 0.0  # operand bytes per device, summed over executions
    traffic_bytes: float = 0.0  # bytes over the links per device (see module docstring)


# Collectives the routed-expert dispatch issues: inside a shard_map (the only other shard_map in
# the model wraps splash attention, under the "attention" scope).
DISPATCH_SCOPE = re.compile(r'op_name="(?![^"]*attention)[^"]*/shard_map/')


@dataclasses.dataclass
class HloSummary:
    collectives: dict[str, CollectiveStats]
    dispatch: dict[str, CollectiveStats]  # the subset under DISPATCH_SCOPE (expert dispatch)
    hbm_bytes: float  # operands + results of every unfused instruction, trip counts applied
    loops: list[tuple[str, int | None]]  # (while name, trip count or None)
    unknown_trip_counts: int

    @property
    def traffic_bytes(self) -> float:
        return sum(c.traffic_bytes for c in self.collectives.values())


def _fused_io(module: Module, comp: str) -> tuple[dict[int, float], float | None]:
    """What a fusion really moves: parameters only read through dynamic-slices count the slices;
    a root dynamic-update-slice writes (and its buffer parameter reads) only the update."""
    instrs = module.computations.get(comp, [])
    users: dict[str, list[Instr]] = {}
    for ins in instrs:
        for o in ins.operands:
            users.setdefault(o, []).append(ins)
    params: dict[int, float] = {}
    root = instrs[-1] if instrs else None
    out: float | None = None
    if root is not None and root.opcode == "dynamic-update-slice" and len(root.operands) > 1:
        out = type_bytes(module.types.get(root.operands[1], ""))
    for ins in instrs:
        if ins.opcode != "parameter" or not re.fullmatch(r"\d+", ins.args.strip()):
            continue
        uses = users.get(ins.name, [])
        if uses and all(u.opcode == "dynamic-slice" and u.operands[0] == ins.name for u in uses):
            params[int(ins.args)] = sum(type_bytes(u.type_text) for u in uses)
        elif out is not None and uses == [root] and root.operands[0] == ins.name:
            params[int(ins.args)] = 0.0  # updated in place
    return params, out


def _instr_traffic(module: Module, ins: Instr, cache: dict) -> float:
    """HBM bytes one unfused instruction reads and writes (see `_fused_io` for slicing)."""
    operands = [type_bytes(module.types.get(o, "")) for o in ins.operands]
    result = type_bytes(ins.type_text)
    if ins.opcode == "dynamic-slice":
        return 2 * result
    if ins.opcode == "dynamic-update-slice" and len(operands) > 1:
        return 2 * operands[1]
    if ins.opcode == "fusion":
        callee = _CALLS.findall(ins.attrs)
        if callee:
            if callee[0] not in cache:
                cache[callee[0]] = _fused_io(module, callee[0])
            params, out = cache[callee[0]]
            operands = [params.get(i, b) for i, b in enumerate(operands)]
            result = result if out is None else out
    return sum(operands) + result


def summarize(text: str, n_devices: int) -> HloSummary:
    """Collective bytes by kind and HBM bytes of one device's step (see the module docstring)."""
    module = parse_module(text)
    stats = {k: CollectiveStats() for k in COLLECTIVE_KINDS}
    dispatch = {k: CollectiveStats() for k in COLLECTIVE_KINDS}
    loops: list[tuple[str, int | None]] = []
    hbm = 0.0
    seen_ops: set[str] = set()
    fusion_io: dict[str, tuple[dict[int, float], float | None]] = {}

    def visit(comp: str, mult: float, depth: int = 0) -> None:
        nonlocal hbm
        if depth > 64 or comp not in module.computations:
            return
        in_fusion = comp in module.fused
        for ins in module.computations[comp]:
            kind = ins.opcode.removesuffix("-start")
            if kind in COLLECTIVE_KINDS and not ins.opcode.endswith("-done"):
                in_bytes = sum(type_bytes(module.types.get(o, "")) for o in ins.operands)
                if kind == "ragged-all-to-all":
                    in_bytes = type_bytes(module.types.get(ins.operands[0], ""))
                g = _group_size(ins.attrs, n_devices)
                first = ins.name not in seen_ops
                seen_ops.add(ins.name)
                targets = [stats[kind]]
                if DISPATCH_SCOPE.search(ins.attrs):
                    targets.append(dispatch[kind])
                for s in targets:
                    s.ops += first
                    s.executions += mult
                    s.buffer_bytes += in_bytes * mult
                    s.traffic_bytes += _traffic(kind, in_bytes, g) * mult
            if not in_fusion and ins.opcode not in _NO_TRAFFIC:
                hbm += _instr_traffic(module, ins, fusion_io) * mult
            if ins.opcode == "while":
                trips = _trip_count(module, ins)
                loops.append((ins.name, trips))
                body = re.search(r"\bbody=%([\w.\-]+)", ins.attrs)
                if body:
                    visit(body.group(1), mult * (trips if trips is not None else 1), depth + 1)
                continue
            callees = _CALLS.findall(ins.attrs)
            for branch in _BRANCHES.findall(ins.attrs):
                callees += _OPERAND.findall(branch)
            for callee in callees:
                if ins.opcode in ("all-reduce", "reduce-scatter", "reduce", "scatter", "sort"):
                    continue  # reducers and comparators: scalar helpers
                visit(callee, mult, depth + 1)

    visit(module.entry, 1.0)
    return HloSummary(
        collectives=stats,
        dispatch=dispatch,
        hbm_bytes=hbm,
        loops=loops,
        unknown_trip_counts=sum(1 for _, t in loops if t is None),
    )
