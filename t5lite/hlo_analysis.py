"""What a compiled XLA program does, read from its optimized HLO text.

XLA's own `cost_analysis()` is missing where it is needed most: a program compiled for a GPU
without one (t5lite.gpu_aot) has none, and on every backend it counts a while loop's body once,
whatever its trip count (a scanned layer stack, a gradient-accumulation loop). This reads the
text instead:

  * how many times each computation runs per step: the entry once; a while body its known trip
    count times its caller's count (so a scan inside an accumulation loop multiplies); fusions,
    calls and async wrappers as often as their caller;
  * matrix-multiply FLOPs (2 per multiply-add): `dot`s, wherever fusion put them (Triton GEMM
    fusions on GPUs), cuBLAS GEMM custom calls, and cuDNN fused attention, whose forward call
    runs 2 batched matmuls over (batch, heads, queries, keys, head dim) and whose backward runs
    5 (it recomputes the scores, then the value, probability, query and key gradients), and so
    does t5lite's CPU attention kernel (t5lite/kernels). Masks are not discounted (a causal
    kernel skips about half the blocks), the convention of model FLOPs;
  * collectives per kind: count and ring-model bytes per device;
  * memory traffic: the bytes each kernel reads from and writes to device memory, and how many
    kernels run, per step or per iteration of one loop (a decode loop's token step). A fused
    kernel reads the slices and gathered rows it takes, not their whole operands, and an
    in-place dynamic-update-slice (a KV cache write) writes its update, not the buffer, and the
    workspace a cuBLAS or cuDNN call returns beside its result is scratch, not output. On a
    GPU a decode step is bound by this traffic, not by FLOPs;
  * a roofline: each kernel takes at least the longer of its matmul FLOPs at the peak and its
    traffic at the bandwidth, which bounds a step's time and so its MFU.

Elementwise work and reductions count no FLOPs: on accelerators they cost memory bandwidth, not
matmul FLOPs, and pricing them at the matmul peak says nothing; the roofline has them through
their traffic.
"""

import math
import re
from typing import Dict, List, Tuple, Union

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1,
                "f64": 8, "s64": 8, "u64": 8, "s16": 2, "u16": 2, "f8e4m3fn": 1, "f8e5m2": 1}
_RING_FACTOR = {"all-reduce": lambda g: 2 * (g - 1) / g, "all-gather": lambda g: (g - 1) / g,
                "reduce-scatter": lambda g: g - 1, "all-to-all": lambda g: (g - 1) / g,
                "collective-permute": lambda g: 1.0}
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s+\(.*\{\s*$")
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\(.*?\)|\S+)\s+([\w\-]+)\((.*)$")
_CALLEES = re.compile(r"\b(calls|to_apply|body|condition|branch_computations|"
                      r"called_computations|true_computation|false_computation)="
                      r"(\{[^}]*\}|%?[\w.\-]+)")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")
_GEMM_TARGETS = ("__cublas$gemm", "__cublas$lt$matmul")
_LIBRARY_TARGETS = _GEMM_TARGETS + ("__cudnn$",)
_SCRATCH = re.compile(r"\b[su]8\[\d*\]")   # a flat byte array: a library call's workspace


def _dims(shape: str) -> List[List[int]]:
  """The dimensions of every array in a shape string (one for an array, several for a tuple)."""
  return [[int(d) for d in dims.split(",") if d] for _, dims in _ARRAY.findall(shape)]


def shape_bytes(shape: str) -> int:
  """Bytes of every array in a shape string, e.g. 'bf16[4,128]{1,0}' -> 1024."""
  return sum(math.prod(int(d) for d in dims.split(",") if d) * _DTYPE_BYTES.get(dtype, 4)
             for dtype, dims in _ARRAY.findall(shape))


class _Instruction:
  """One parsed HLO instruction: name, result shape, opcode, the rest of its line, and whether
  it is its computation's root."""

  def __init__(self, name: str, shape: str, opcode: str, rest: str, root: bool = False):
    self.name, self.shape, self.opcode, self.rest, self.root = name, shape, opcode, rest, root

  def operands(self) -> List[str]:
    """The operand list's entries as written (a name, or a shape and a name)."""
    depth, start, out = 0, 0, []
    for i, ch in enumerate(self.rest):
      if ch in "([{":
        depth += 1
      elif ch in ")]}":
        if depth == 0:
          out.append(self.rest[start:i].strip())
          return [o for o in out if o]
        depth -= 1
      elif ch == "," and depth == 0:
        out.append(self.rest[start:i].strip())
        start = i + 1
    return [o for o in out if o]

  def attribute(self, key: str) -> List[int]:
    """An `{a,b}` integer-list attribute of the instruction, e.g. lhs_contracting_dims."""
    found = re.search(r"\b" + key + r"=\{([\d,]*)\}", self.rest)
    return [int(d) for d in found.group(1).split(",") if d] if found else []


class Program:
  """An optimized HLO module's computations, their instructions and how often each runs
  (`runs`). A while loop without a known trip count runs its body once here; such loops are
  listed in `unknown_loops` (a train step's scans all have one)."""

  def __init__(self, hlo_text: str):
    self.computations: Dict[str, List[_Instruction]] = {}
    self.entry = ""
    self.unknown_loops: List[str] = []
    # computation -> (callee, trips, how it is called, the calling instruction) per call edge
    self.callees: Dict[str, List[Tuple[str, int, str, str]]] = {}
    self.loop_bodies: Dict[str, str] = {}  # while instruction -> its body
    callers: Dict[str, List[Tuple[str, int]]] = {}
    current = None
    for line in hlo_text.splitlines():
      header = _HEADER.match(line)
      if header:
        current = header.group(2)
        self.computations[current] = []
        if header.group(1):
          self.entry = current
        continue
      found = _INSTRUCTION.match(line) if current else None
      if not found:
        continue
      inst = _Instruction(*found.groups(), root=line.lstrip().startswith("ROOT"))
      self.computations[current].append(inst)
      if inst.opcode in ("async-update", "async-done"):
        continue  # they name the computation their async-start already runs
      trips = _TRIP_COUNT.search(inst.rest)
      if inst.opcode == "while" and not trips:
        self.unknown_loops.append(inst.name)
      for kind, names in _CALLEES.findall(inst.rest):
        factor = int(trips.group(1)) if kind == "body" and trips else 1
        for callee in re.findall(r"%?([\w.\-]+)", names):
          callers.setdefault(callee, []).append((current, factor))
          self.callees.setdefault(current, []).append(
              (callee, factor, f"{inst.opcode}.{kind}", inst.name))
          if inst.opcode == "while" and kind == "body":
            self.loop_bodies[inst.name] = callee
    self.runs: Dict[str, int] = {}
    for name in self.computations:
      self._count(name, callers)
    self._tables: Dict[str, Dict[str, _Instruction]] = {}
    self._users: Dict[str, Dict[str, List[Tuple[_Instruction, int]]]] = {}
    self._kernel_costs: Dict[str, List[Tuple[_Instruction, int, int, float]]] = {}

  def _count(self, name: str, callers) -> int:
    if name not in self.runs:
      self.runs[name] = 1 if name == self.entry else sum(
          self._count(caller, callers) * factor for caller, factor in callers.get(name, ()))
    return self.runs[name]

  def table(self, computation: str) -> Dict[str, _Instruction]:
    """A computation's instructions by name."""
    if computation not in self._tables:
      self._tables[computation] = {i.name: i for i in self.computations.get(computation, [])}
    return self._tables[computation]

  def users(self, computation: str) -> Dict[str, List[Tuple[_Instruction, int]]]:
    """Instruction name -> (user, operand position) for each use of it in a computation."""
    if computation not in self._users:
      users: Dict[str, List[Tuple[_Instruction, int]]] = {}
      for inst in self.computations.get(computation, []):
        for position, operand in enumerate(inst.operands()):
          users.setdefault(_name(operand), []).append((inst, position))
      self._users[computation] = users
    return self._users[computation]

  def instructions(self):
    """(instruction, runs per step, its computation's name -> instruction table) for every
    instruction that runs."""
    for name, insts in self.computations.items():
      if self.runs.get(name):
        table = self.table(name)
        for inst in insts:
          yield inst, self.runs[name], table

  def kernel_costs(self, root: str) -> List[Tuple[_Instruction, int, int, float]]:
    """(kernel instruction, runs per run of computation `root`, device-memory bytes it reads
    plus writes, its matmul FLOPs) for every kernel reachable from `root`; computed once."""
    if root not in self._kernel_costs:
      self._kernel_costs[root] = [
          (inst, runs, _kernel_bytes(self, inst, table), _kernel_flops(self, inst, table))
          for inst, runs, table in _kernels(self, root)]
    return self._kernel_costs[root]


def _as_program(hlo: Union[str, Program]) -> Program:
  return hlo if isinstance(hlo, Program) else Program(hlo)


def _call_target(inst: _Instruction) -> str:
  """A custom-call's target ("" for anything else), e.g. "__cublas$lt$matmul"."""
  found = re.search(r'custom_call_target="([^"]+)"', inst.rest)
  return found.group(1) if inst.opcode == "custom-call" and found else ""


def _operand_dims(operand: str, table) -> List[int]:
  """Dimensions of an operand written as '%name' or as 'f32[2,3]{1,0} %name'."""
  written = _dims(operand)
  if written:
    return written[0]
  return _dims(table[operand.lstrip("%")].shape)[0]


def _matmul_flops(out: List[int], lhs: List[int], contracting: List[int]) -> float:
  return 2.0 * math.prod(out) * math.prod(lhs[d] for d in contracting)


def _json_ints(text: str, key: str) -> List[int]:
  found = re.search('"' + key + r'":\s*\[([^\]]*)\]', text)
  return [int(x) for x in re.findall(r"\d+", found.group(1))] if found else []


def _instruction_flops(inst: _Instruction, table) -> Tuple[str, float]:
  """(kind, matmul FLOPs) of one instruction; kind "" when it does none."""
  if inst.opcode == "dot":
    lhs = _operand_dims(inst.operands()[0], table)
    return "dot", _matmul_flops(_dims(inst.shape)[0], lhs, inst.attribute("lhs_contracting_dims"))
  if inst.opcode != "custom-call":
    return "", 0.0
  target = _call_target(inst)
  if target.startswith(_GEMM_TARGETS):
    lhs = _operand_dims(inst.operands()[0], table)
    return "gemm", _matmul_flops(_dims(inst.shape)[0], lhs,
                                 _json_ints(inst.rest, "lhs_contracting_dimensions"))
  if target.startswith("__cudnn$fmha"):
    scores = _json_ints(inst.rest.split('"intermediate_tensor_shape"', 1)[-1], "dimensions")
    head_dim = _operand_dims(inst.operands()[0], table)[-1]  # queries: BTNH or BNTH
    matmuls = 5 if "Backward" in target else 2
    return "attention", 2.0 * matmuls * math.prod(scores) * head_dim
  if target.startswith("t5lite_cpu_attention_"):
    batch, q_len, heads, head_dim = _operand_dims(inst.operands()[0], table)  # q [b, q, h, d]
    k_len = _operand_dims(inst.operands()[1], table)[1]                       # k [b, k, kv, d]
    matmuls = 5 if target.endswith("backward") else 2
    return "attention", 2.0 * matmuls * batch * heads * q_len * k_len * head_dim
  return "", 0.0


def _matmuls(hlo: Union[str, Program]):
  """(instruction name, kind, matmul FLOPs per step) of every instruction that runs and
  multiplies matrices (`_instruction_flops`)."""
  for inst, runs, table in _as_program(hlo).instructions():
    kind, f = _instruction_flops(inst, table)
    if kind:
      yield inst.name, kind, runs * f


def matmul_flops(hlo: Union[str, Program]) -> Dict[str, float]:
  """Matrix-multiply FLOPs per step of an optimized HLO module (its text or its `Program`), by
  kind ("dot", "gemm" for cuBLAS calls, "attention" for cuDNN fused attention and t5lite's CPU
  kernel) and in "total"
  (see the module docstring)."""
  flops = {"dot": 0.0, "gemm": 0.0, "attention": 0.0}
  for _, kind, f in _matmuls(hlo):
    flops[kind] += f
  flops["total"] = sum(flops.values())
  return flops


def matmul_flops_by_op(hlo: Union[str, Program]) -> Dict[str, float]:
  """{instruction name: matrix-multiply FLOPs per step} of the instructions that multiply
  matrices (as `matmul_flops` counts them; a dot inside a fusion under its own name, not the
  fusion's): what a profile's ops should take at least, at the matmul peak."""
  return {name: f for name, _, f in _matmuls(hlo)}


def _group_size(rest: str, num_devices: int) -> int:
  iota = re.search(r"replica_groups=\[(\d+),(\d+)\]", rest)
  if iota:
    return int(iota.group(2))
  groups = re.search(r"replica_groups=\{\{([\d,]*)\}", rest)
  if groups and groups.group(1):
    return len(groups.group(1).split(","))
  return num_devices


def collectives(hlo: Union[str, Program], num_devices: int) -> Dict[str, Dict[str, float]]:
  """Per collective kind: how many run per step and the bytes each device sends under a ring
  model (all-reduce 2(g-1)/g of the buffer, all-gather and all-to-all (g-1)/g of the result,
  reduce-scatter (g-1) of its result, a permute the buffer), g the replica group's size. An
  asynchronous collective (a -start and a -done) counts once, with the -done's result."""
  stats = {c: {"count": 0.0, "bytes": 0.0} for c in COLLECTIVES}
  for inst, runs, table in _as_program(hlo).instructions():
    kind, issued = inst.opcode, inst
    if kind.endswith("-done"):
      kind = kind[:-len("-done")]
      issued = table.get(inst.operands()[0].split()[-1].lstrip("%"), inst)
    if kind not in stats:
      continue
    g = max(_group_size(issued.rest, num_devices), 1)
    stats[kind]["count"] += runs
    stats[kind]["bytes"] += runs * _RING_FACTOR[kind](g) * shape_bytes(inst.shape)
  return stats


# How a kernel-level computation calls another whose instructions are kernels too (a fusion's
# body, a reducer or a sort comparator is part of its caller's kernel); a conditional's branches
# are too, one of them per run.
_KERNEL_LEVEL_CALLS = ("while.body", "while.condition", "call.to_apply", "async-start.calls")
# Instructions that launch nothing and move no data.
_NO_KERNEL = ("parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while",
              "conditional", "call", "after-all", "partition-id", "replica-id", "add-dependency",
              "opt-barrier", "domain", "async-start", "async-update", "async-done")


def _kernel_runs(program: Program, root: str) -> Dict[str, int]:
  """Kernel-level computations reachable from `root` and how often each runs per run of it. A
  conditional runs one branch: the one that moves the most bytes (a guard's update, not its
  skip) is counted."""
  runs: Dict[str, int] = {}

  def visit(name: str, times: int):
    runs[name] = runs.get(name, 0) + times
    branches: Dict[str, List[str]] = {}
    for callee, factor, how, caller in program.callees.get(name, ()):
      if how.startswith("conditional."):
        branches.setdefault(caller, []).append(callee)
      elif how in _KERNEL_LEVEL_CALLS:
        visit(callee, times * factor)
    for options in branches.values():
      visit(max(options, key=lambda branch: sum(
          r * b for _, r, b, _ in program.kernel_costs(branch))), times)

  visit(root, 1)
  return runs


def _name(operand: str) -> str:
  return operand.split()[-1].lstrip("%")


def _elements(shape: str) -> int:
  return sum(math.prod(d) for d in _dims(shape))


def _fused_reads(program: Program, fused: str, index: int, full: int) -> int:
  """Bytes a fusion reads of its operand `index`: the slices or gathered rows where the fused
  computation `fused` only takes those (after conversions and bitcasts), nothing where it only
  updates the operand in place, else all of it."""
  users = program.users(fused)
  param = next((i for i in program.computations[fused] if i.opcode == "parameter"
                and i.rest.split(")", 1)[0].strip() == str(index)), None)
  if param is None:
    return full
  size = max(_elements(param.shape), 1)

  def fraction(name: str) -> float:
    """The fraction of the parameter's elements that the uses of `name` read."""
    total = 0.0
    for user, position in users.get(name, ()):
      if user.opcode in ("bitcast", "convert", "copy"):
        total += fraction(user.name)
      elif user.opcode in ("dynamic-slice", "slice", "gather") and position == 0:
        total += _elements(user.shape) / size
      elif user.opcode != "dynamic-update-slice" or position != 0:
        return 1.0
    return total

  return int(min(fraction(param.name), 1.0) * full)


def _written(table: Dict[str, _Instruction], inst: _Instruction) -> int:
  """Bytes written by an instruction of a fused computation (`table`) as its output: an
  in-place dynamic-update-slice writes its update only, a library call's workspace nothing."""
  if inst.opcode == "bitcast":
    source = table.get(_name(inst.operands()[0]))
    return _written(table, source) if source else shape_bytes(inst.shape)
  if inst.opcode == "tuple":
    return sum(_written(table, table[_name(o)]) if _name(o) in table else shape_bytes(o)
               for o in inst.operands())
  if inst.opcode == "dynamic-update-slice":
    update = table.get(_name(inst.operands()[1]))
    return shape_bytes(update.shape) if update else shape_bytes(inst.shape)
  if inst.opcode == "get-tuple-element" and _SCRATCH.fullmatch(inst.shape.split("{")[0]):
    source = table.get(_name(inst.operands()[0]))
    if source is not None and _scratch_bytes(source):
      return 0   # a library call's workspace, passed out of a fusion that wraps the call
  return shape_bytes(inst.shape) - _scratch_bytes(inst)


def _scratch_bytes(inst: _Instruction) -> int:
  """Bytes of the workspace a cuBLAS or cuDNN call returns beside its results (a flat s8 or u8
  array, 4 MB per cuBLAS GEMM): scratch the call may use, not output it writes in full."""
  if not inst.shape.startswith("(") or not _call_target(inst).startswith(_LIBRARY_TARGETS):
    return 0
  return sum(shape_bytes(m.group(0)) for m in _SCRATCH.finditer(inst.shape))


def _fused_computation(program: Program, inst: _Instruction) -> str:
  """The name of the computation a fusion runs ("" for anything else). XLA 0.11 also launches
  some fusions asynchronously, as a fusion-start and a fusion-done."""
  if inst.opcode not in ("fusion", "fusion-start"):
    return ""
  called = re.search(r"calls=%?([\w.\-]+)", inst.rest)
  return called.group(1) if called and called.group(1) in program.computations else ""


def _kernel_bytes(program: Program, inst: _Instruction, table) -> int:
  """Device-memory bytes one kernel reads plus writes."""
  operand_bytes = [shape_bytes(table[_name(o)].shape) if _name(o) in table else shape_bytes(o)
                   for o in inst.operands()]
  fused = _fused_computation(program, inst)
  if fused:
    root = next((i for i in program.computations[fused] if i.root), None)
    if root is not None:
      return (sum(_fused_reads(program, fused, k, b) for k, b in enumerate(operand_bytes))
              + _written(program.table(fused), root))
  if inst.opcode == "dynamic-update-slice":
    return 2 * operand_bytes[1]
  if inst.opcode in ("dynamic-slice", "slice", "gather"):
    return 2 * shape_bytes(inst.shape)
  return sum(operand_bytes) + shape_bytes(inst.shape) - _scratch_bytes(inst)


def _kernels(program: Program, root: str):
  """(kernel instruction, runs per run of `root`, its computation's table) for every kernel
  reachable from computation `root`."""
  for name, runs in _kernel_runs(program, root).items():
    table = program.table(name)
    for inst in program.computations.get(name, []):
      if inst.opcode not in _NO_KERNEL and not inst.opcode.endswith("-done"):
        yield inst, runs, table


def _kernel_flops(program: Program, inst: _Instruction, table) -> float:
  """Matmul FLOPs of one kernel: its own (a cuBLAS or cuDNN call) or the dots of the fused
  computations it calls."""
  flops = _instruction_flops(inst, table)[1]
  fused = _fused_computation(program, inst)
  if fused:
    inner = program.table(fused)
    flops += sum(_kernel_flops(program, i, inner) for i in program.computations[fused])
  return flops


def _loop_kernel_costs(hlo: Union[str, Program], loop: str):
  """`Program.kernel_costs` of the module's entry, or of the body of the while loop `loop`."""
  program = _as_program(hlo)
  return program.kernel_costs(program.loop_bodies[loop] if loop else program.entry)


def memory_traffic(hlo: Union[str, Program], loop: str = "") -> Dict[str, float]:
  """{"bytes": device-memory bytes read plus written, "kernels": kernels run} per step of an
  optimized HLO module (its text or its `Program`), or per iteration of the while loop named
  `loop` (an instruction name, e.g. one of `Program(text).unknown_loops`, a decode loop's token
  step). Loops inside count their known trip counts, loops without one once. A model of what a
  GPU kernel touches (see the module docstring), not a measurement: caches and fusion-internal
  reuse are not seen."""
  traffic = {"bytes": 0.0, "kernels": 0.0}
  for _, runs, moved, _ in _loop_kernel_costs(hlo, loop):
    traffic["bytes"] += runs * moved
    traffic["kernels"] += runs
  return traffic


def roofline(hlo: Union[str, Program], flops_per_s: float, bytes_per_s: float,
             loop: str = "") -> Dict[str, float]:
  """A lower bound on the time of a step (or of one iteration of `loop`, as in
  `memory_traffic`) on a device with matmul peak `flops_per_s` and memory bandwidth
  `bytes_per_s`: each kernel takes at least the longer of its matmul FLOPs at the peak and its
  device-memory traffic at the bandwidth, and kernels run one after another. Returns
  {"seconds": the bound, "matmul_s" / "memory_s": the kernels bound by each, summed}. Launch
  latencies, collectives and kernels below either roof are not in it."""
  bound = {"seconds": 0.0, "matmul_s": 0.0, "memory_s": 0.0}
  for _, runs, moved, flops in _loop_kernel_costs(hlo, loop):
    compute = flops / flops_per_s
    memory = moved / bytes_per_s
    bound["seconds"] += runs * max(compute, memory)
    bound["matmul_s" if compute > memory else "memory_s"] += runs * max(compute, memory)
  return bound


def top_kernels(hlo: Union[str, Program], flops_per_s: float, bytes_per_s: float,
                count: int = 10, loop: str = "") -> List[Dict]:
  """The `count` kernels that take longest in `roofline`'s model (each at the longer of its
  matmul FLOPs at `flops_per_s` and its device-memory traffic at `bytes_per_s`, times its runs
  per step or per iteration of `loop`), longest first, each a dict: seconds (all its runs),
  bound ("matmul" or "memory"), runs, bytes and flops (one run), opcode, shape, and the JAX
  op_name of its metadata ("" where it has none). Where a step's time goes as far as the model
  sees it: launch gaps and kernels below both roofs are not in it."""
  rows = []
  for inst, runs, moved, flops in _loop_kernel_costs(hlo, loop):
    compute, memory = flops / flops_per_s, moved / bytes_per_s
    name = re.search(r'op_name="([^"]*)"', inst.rest)
    rows.append({"seconds": runs * max(compute, memory),
                 "bound": "matmul" if compute > memory else "memory", "runs": runs,
                 "bytes": moved, "flops": flops, "opcode": inst.opcode, "shape": inst.shape,
                 "op_name": name.group(1) if name else ""})
  rows.sort(key=lambda row: -row["seconds"])
  return rows[:count]
