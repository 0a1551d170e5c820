"""A lower bound on a training step's time, read from the compiled program without the device.

Every kernel of one iteration of the step loop (the `while` of the training call: one step) costs
at least the larger of its FLOPs at the chip's peak and its bytes moved at the memory bandwidth,
plus the target's per-kernel launch cost; a gate's conditional counts its open branch (the one with
the convolutions) with the block's survival probability and the other with the rest. Bytes are a
kernel's operands and result as XLA allocates them (of an operand a fusion only slices or gathers
from, the parts it takes; of a buffer a fusion updates in place, the update), FLOPs those of its
convolutions and dot products (elementwise work is taken as memory-bound); an uninitialised
buffer (`jax.lax.empty`) costs nothing. It ignores latency, caches, occupancy and
the tails of small kernels: a real step takes longer. Read from the optimised HLO text
(`compiled.as_text()`), so it works for every XLA backend.
"""
import dataclasses
import math
import re
from typing import Dict, List, Optional

DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2,
               "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
ARRAY = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([\d,]*)\]")
HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+) = ")
# Instructions that move no data and launch nothing (names, views, structure); control flow is walked.
FREE = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "after-all", "opt-barrier",
        "add-dependency", "domain", "partition-id", "replica-id"}
CONTROL = {"while", "conditional", "call"}
SLICING = {"slice", "dynamic-slice", "gather"}  # read only the part of their first operand they return
# Custom calls that only name a buffer: `jax.lax.empty` on GPU and TPU (no thunk, nothing written).
FREE_CUSTOM_CALLS = {"AllocateBuffer"}


@dataclasses.dataclass
class Instruction:
    name: str
    opcode: str
    type: str
    operands: List[str]
    attributes: str
    number: Optional[int] = None  # a parameter's

    @property
    def result_bytes(self) -> float:
        return array_bytes(self.type)


@dataclasses.dataclass
class Cost:
    """Expected kernels, bytes, FLOPs and lower-bound seconds of a piece of program."""

    kernels: float = 0.0
    bytes: float = 0.0
    flops: float = 0.0
    seconds: float = 0.0

    def __add__(self, other):
        return Cost(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

    def __mul__(self, weight: float):
        return Cost(*(a * weight for a in dataclasses.astuple(self)))


@dataclasses.dataclass(frozen=True)
class Chip:
    """What the bound needs of a chip: peak FLOP/s by operand dtype, bytes/s, seconds per kernel."""

    flops_per_s: Dict[str, float]  # "f32" (the rate XLA's default precision gets), "bf16"
    bytes_per_s: float
    launch_s: float


def array_bytes(type_text: str) -> float:
    """Bytes of every array in an HLO type (a shape or a tuple of shapes)."""
    return sum(DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
               for dtype, dims in ARRAY.findall(type_text))


def split_type(rest: str):
    """(the result type, the text after it) of an instruction's right-hand side."""
    if not rest.startswith("("):
        type_text, _, after = rest.partition(" ")
        return type_text, after
    depth = 0
    for i, char in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0:
            return rest[:i + 1], rest[i + 1:].lstrip()
    raise ValueError(f"unbalanced type in {rest[:200]!r}")


def parse_instruction(line: str) -> Optional[Instruction]:
    match = INSTRUCTION.match(line)
    if not match:
        return None
    type_text, after = split_type(line[match.end():])
    opcode, _, args = after.partition("(")
    depth, end = 1, len(args)
    for i, char in enumerate(args):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0:
            end = i
            break
    operands = re.findall(r"%([\w.\-]+)", args[:end])
    number = int(args[:end]) if opcode.strip() == "parameter" else None
    return Instruction(match.group(2), opcode.strip(), type_text, operands, args[end + 1:], number)


def parse_module(text: str):
    """({computation: [instructions]}, the entry computation's name) of an HLO module's text."""
    computations, entry, current = {}, None, None
    for line in text.splitlines():
        header = HEADER.match(line)
        if header and " = " not in line.split("{")[0]:
            current = header.group(2)
            computations[current] = []
            if header.group(1):
                entry = current
            continue
        instruction = parse_instruction(line) if current else None
        if instruction:
            computations[current].append(instruction)
    return computations, entry


def called(instruction: Instruction, key: str) -> List[str]:
    """The computations an instruction names under `key` (calls=, body=, branch_computations={...})."""
    match = re.search(key + r"=\{?([^}]*?)\}?(?:,\s*\w+=|$)", instruction.attributes)
    return re.findall(r"%?([\w.\-]+)", match.group(1)) if match else []


def custom_call_target(instruction: Instruction) -> str:
    """The target a custom call names ("" for any other instruction)."""
    target = re.search(r'custom_call_target="([^"]+)"', instruction.attributes) if instruction.opcode == "custom-call" else None
    return target.group(1) if target else ""


def conv_flops(instruction: Instruction, shapes: Dict[str, str]) -> float:
    """2 x multiply-adds of a convolution (HLO `convolution` or a cuDNN custom call): every element of
    the forward convolution's output sums window x input features (per group) products, of which
    only one in lhs_dilate's product meets an input that is not a dilation hole."""
    window = re.search(r"window=\{size=([\dx]+)", instruction.attributes)  # none: 1x1
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", instruction.attributes)
    if not labels:
        return 0.0
    kind = custom_call_target(instruction) or "forward"
    operand_types = [shapes.get(name, "") for name in instruction.operands]
    result = ARRAY.findall(instruction.type)
    arrays = {"input": None, "kernel": None, "output": None}
    if "BackwardInput" in kind:
        arrays.update(output=operand_types[0], kernel=operand_types[1])
    elif "BackwardFilter" in kind:
        arrays.update(output=operand_types[1], kernel=instruction.type)
    else:
        arrays.update(output=instruction.type if not result else f"{result[0][0]}[{result[0][1]}]",
                      kernel=operand_types[1] if len(operand_types) > 1 else "")
    out, kernel = ARRAY.findall(arrays["output"] or ""), ARRAY.findall(arrays["kernel"] or "")
    if not (out and kernel):
        return 0.0
    kernel_dims = [int(d) for d in kernel[0][1].split(",") if d]
    in_features = kernel_dims[labels.group(2).index("i")]
    out_elements = math.prod(int(d) for d in out[0][1].split(",") if d)
    window_size = math.prod(int(s) for s in window.group(1).split("x")) if window else 1
    dilation = re.search(r"lhs_dilate=([\dx]+)", instruction.attributes)  # a strided conv's input gradient:
    holes = math.prod(int(s) for s in dilation.group(1).split("x")) if dilation else 1  # its zeros add nothing
    return 2.0 * out_elements * window_size * in_features / holes


def dot_flops(instruction: Instruction, shapes: Dict[str, str]) -> float:
    """2 x the result's elements x the contracted size of a `dot`."""
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instruction.attributes)
    lhs = ARRAY.findall(shapes.get(instruction.operands[0], "")) if instruction.operands else []
    if not (contracting and lhs):
        return 0.0
    dims = [int(d) for d in lhs[0][1].split(",") if d]
    size = math.prod(dims[int(i)] for i in contracting.group(1).split(",") if i)
    return 2.0 * array_bytes(instruction.type) / DTYPE_BYTES[ARRAY.findall(instruction.type)[0][0]] * size


def gemm_flops(instruction: Instruction, shapes: Dict[str, str]) -> float:
    """A cuBLAS custom call: 2 x M x N x K from its operands, taken as an unbatched product."""
    sizes = [math.prod(int(d) for d in dims.split(",") if d) for _, dims in
             (ARRAY.findall(shapes.get(name, ""))[0] for name in instruction.operands[:2])]
    out = ARRAY.findall(instruction.type)
    if len(sizes) < 2 or not out:
        return 0.0
    out_elements = math.prod(int(d) for d in out[0][1].split(",") if d)
    return 2.0 * out_elements * math.sqrt(sizes[0] * sizes[1] / max(out_elements, 1))


class Program:
    """An optimised HLO module, walked for the cost of its computations."""

    def __init__(self, text: str, chip: Chip):
        self.computations, self.entry = parse_module(text)
        self.instructions = {i.name: i for instrs in self.computations.values() for i in instrs}  # names are module-wide
        self.shapes = {name: i.type for name, i in self.instructions.items()}
        self.chip = chip

    def flops(self, instruction: Instruction) -> float:
        if instruction.opcode == "convolution":
            return conv_flops(instruction, self.shapes)
        if instruction.opcode == "dot":
            return dot_flops(instruction, self.shapes)
        if instruction.opcode == "custom-call":
            name = custom_call_target(instruction)
            if "conv" in name:
                return conv_flops(instruction, self.shapes)
            if "gemm" in name or "matmul" in name:
                return gemm_flops(instruction, self.shapes)
        if instruction.opcode == "fusion":
            return sum(self.flops(inner) for computation in called(instruction, "calls")
                       for inner in self.computations.get(computation, []))
        return 0.0

    def moved_bytes(self, instruction: Instruction) -> float:
        """Bytes a kernel reads and writes: its operands and result, except that what a fusion reads
        only through slices, dynamic slices and gathers counts as the parts they take (a batch
        gathered from a dataset on the device), and a dynamic-update-slice at a fusion's root writes
        its update in place of the buffer it neither reads nor rewrites (a scan stacking a value)."""
        operands = [array_bytes(self.shapes.get(name, "")) for name in instruction.operands]
        result = instruction.result_bytes
        fused = self.computations.get(next(iter(called(instruction, "calls")), ""), []) if instruction.opcode == "fusion" else []
        if not fused:
            return result + sum(operands)
        parameters = {i.name: i.number for i in fused if i.opcode == "parameter"}
        root = fused[-1]
        outputs = [root] if root.opcode != "tuple" else [self.instructions[name] for name in root.operands]
        for output in outputs:
            if output.opcode == "dynamic-update-slice" and output.operands[0] in parameters:
                result -= output.result_bytes - array_bytes(self.shapes.get(output.operands[1], ""))
                operands[parameters[output.operands[0]]] = 0.0
        users = {name: [] for name in parameters}
        for inner in fused:
            for name in set(inner.operands) & users.keys():
                users[name].append(inner)
        for name, number in parameters.items():
            if users[name] and all(u.opcode in SLICING and u.operands[0] == name and name not in u.operands[1:]
                                   for u in users[name]):
                operands[number] = min(operands[number], sum(u.result_bytes for u in users[name]))
        return result + sum(operands)

    def kernel_cost(self, instruction: Instruction) -> Cost:
        moved = self.moved_bytes(instruction)
        flops = self.flops(instruction)
        dtypes = ARRAY.findall(" ".join(self.shapes.get(name, "") for name in instruction.operands))
        rate = self.chip.flops_per_s["bf16" if any(d in ("bf16", "f16") for d, _ in dtypes) else "f32"]
        seconds = max(flops / rate, moved / self.chip.bytes_per_s) + self.chip.launch_s
        return Cost(1.0, moved, flops, seconds)

    def cost(self, computation: str, weights) -> Cost:
        """Expected cost of one run of `computation`; `weights` gives each conditional met (in program
        order) the probability of its open branch."""
        total = Cost()
        for instruction in self.computations.get(computation, []):
            if instruction.opcode in FREE or custom_call_target(instruction) in FREE_CUSTOM_CALLS:
                continue
            if instruction.opcode == "while":
                (body,), (condition,) = called(instruction, "body"), called(instruction, "condition")
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', instruction.attributes)
                total += (self.cost(body, weights) + self.cost(condition, weights)) * (int(trips.group(1)) if trips else 1)
            elif instruction.opcode == "conditional":
                total += self.conditional_cost(instruction, next(weights))
            elif instruction.opcode == "call":
                total += sum((self.cost(c, weights) for c in called(instruction, "to_apply")), Cost())
            else:
                total += self.kernel_cost(instruction)
        return total

    def branches(self, instruction: Instruction) -> List[str]:
        return called(instruction, "branch_computations") or (
            called(instruction, "true_computation") + called(instruction, "false_computation"))

    def branch_costs(self, instruction: Instruction, p_inner: float = 1.0):
        """(the open branch's cost, the other branches' mean cost) of a gate's conditional; the open
        branch runs the block: the one with the most FLOPs (its convolutions). `p_inner` weighs any
        conditional inside the branches."""
        costs = {b: self.cost(b, iter(lambda: p_inner, None)) for b in self.branches(instruction)}
        opened = max(costs, key=lambda b: costs[b].flops)
        closed = [cost for b, cost in costs.items() if b != opened]
        return costs[opened], sum((cost * (1 / len(closed)) for cost in closed), Cost())

    def conditional_cost(self, instruction: Instruction, p_open: float) -> Cost:
        opened, closed = self.branch_costs(instruction, p_open)
        return opened * p_open + closed * (1 - p_open)

    def step_loop(self) -> Instruction:
        """The training call's step loop: the entry computation's costliest `while`."""
        loops = [i for i in self.computations[self.entry] if i.opcode == "while"]
        if not loops:
            raise ValueError("the program has no step loop (while) in its entry computation")
        ones = iter(lambda: 1.0, None)
        return max(loops, key=lambda i: self.cost(called(i, "body")[0], ones).bytes)

    def conditionals_in(self, computation: str) -> List[Instruction]:
        """The conditionals one run of `computation` meets, in program order (nested loops' once)."""
        found = []
        for instruction in self.computations.get(computation, []):
            if instruction.opcode == "conditional":
                found.append(instruction)
            for key in ("body", "condition", "to_apply"):
                for inner in called(instruction, key) if instruction.opcode in CONTROL else []:
                    found += self.conditionals_in(inner)
        return found


def gate_weights(conditionals: int, survival: List[float]):
    """The open-branch probability of each conditional of a step, in program order: the gated blocks'
    forward conditionals in block order, then their backward ones in reverse (data dependences fix
    that order); any other count (scanned blocks) gets the gated blocks' mean. (weights, paired)."""
    gated = [p for p in survival if p < 1.0]
    if conditionals and conditionals == 2 * len(gated):
        return gated + gated[::-1], True
    mean = sum(gated) / len(gated) if gated else 1.0
    return [mean] * conditionals, False


def estimate_step(hlo_text: str, chip: Chip, survival: List[float]) -> dict:
    """The lower bound of one training step of a compiled training call (see the module doc), with
    its expected kernels, bytes and FLOPs, the part outside the gates, and a gate's open and closed
    cost (its forward and backward conditionals together, averaged over the gates)."""
    program = Program(hlo_text, chip)
    loop = program.step_loop()
    body, condition = called(loop, "body")[0], called(loop, "condition")[0]
    conditionals = program.conditionals_in(body)
    weights, paired = gate_weights(len(conditionals), survival)
    step = program.cost(body, iter(weights)) + program.cost(condition, iter(()))
    gates = Cost(), Cost()
    for instruction in conditionals:
        opened, closed = program.branch_costs(instruction)
        gates = gates[0] + opened, gates[1] + closed
    per_gate = 2.0 / len(conditionals) if conditionals else 0.0
    return {"seconds": step.seconds, "kernels": step.kernels, "bytes": step.bytes, "flops": step.flops,
            "conditionals": len(conditionals), "gates_paired_with_blocks": paired,
            "open_gate": dataclasses.asdict(gates[0] * per_gate), "closed_gate": dataclasses.asdict(gates[1] * per_gate)}
