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
    5 (it recomputes the scores, then the value, probability, query and key gradients). Masks are
    not discounted (a causal kernel skips about half the blocks), the convention of model FLOPs;
  * collectives per kind: count and ring-model bytes per device.

Elementwise work and reductions are left out: on accelerators they cost memory bandwidth, not
matmul FLOPs, and pricing them at the matmul peak says nothing.
"""

import math
import re
from typing import Dict, List, Tuple

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


def _dims(shape: str) -> List[List[int]]:
  """The dimensions of every array in a shape string (one for an array, several for a tuple)."""
  return [[int(d) for d in dims.split(",") if d] for _, dims in _ARRAY.findall(shape)]


def shape_bytes(shape: str) -> int:
  """Bytes of every array in a shape string, e.g. 'bf16[4,128]{1,0}' -> 1024."""
  return sum(math.prod(int(d) for d in dims.split(",") if d) * _DTYPE_BYTES.get(dtype, 4)
             for dtype, dims in _ARRAY.findall(shape))


class _Instruction:
  """One parsed HLO instruction: name, result shape, opcode, and the rest of its line."""

  def __init__(self, name: str, shape: str, opcode: str, rest: str):
    self.name, self.shape, self.opcode, self.rest = name, shape, opcode, rest

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
      inst = _Instruction(*found.groups())
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
    self.runs: Dict[str, int] = {}
    for name in self.computations:
      self._count(name, callers)

  def _count(self, name: str, callers) -> int:
    if name not in self.runs:
      self.runs[name] = 1 if name == self.entry else sum(
          self._count(caller, callers) * factor for caller, factor in callers.get(name, ()))
    return self.runs[name]

  def instructions(self):
    """(instruction, runs per step, its computation's name -> instruction table) for every
    instruction that runs."""
    for name, insts in self.computations.items():
      if self.runs.get(name):
        table = {i.name: i for i in insts}
        for inst in insts:
          yield inst, self.runs[name], table


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
  target = re.search(r'custom_call_target="([^"]+)"', inst.rest)
  target = target.group(1) if target else ""
  if target.startswith(_GEMM_TARGETS):
    lhs = _operand_dims(inst.operands()[0], table)
    return "gemm", _matmul_flops(_dims(inst.shape)[0], lhs,
                                 _json_ints(inst.rest, "lhs_contracting_dimensions"))
  if target.startswith("__cudnn$fmha"):
    scores = _json_ints(inst.rest.split('"intermediate_tensor_shape"', 1)[-1], "dimensions")
    head_dim = _operand_dims(inst.operands()[0], table)[-1]  # queries: BTNH or BNTH
    matmuls = 5 if "Backward" in target else 2
    return "attention", 2.0 * matmuls * math.prod(scores) * head_dim
  return "", 0.0


def matmul_flops(hlo_text: str) -> Dict[str, float]:
  """Matrix-multiply FLOPs per step of an optimized HLO module, by kind ("dot", "gemm" for
  cuBLAS calls, "attention" for cuDNN fused attention) and in "total" (see the module
  docstring)."""
  flops = {"dot": 0.0, "gemm": 0.0, "attention": 0.0}
  for inst, runs, table in Program(hlo_text).instructions():
    kind, f = _instruction_flops(inst, table)
    if kind:
      flops[kind] += runs * f
  flops["total"] = sum(flops.values())
  return flops


def _group_size(rest: str, num_devices: int) -> int:
  iota = re.search(r"replica_groups=\[(\d+),(\d+)\]", rest)
  if iota:
    return int(iota.group(2))
  groups = re.search(r"replica_groups=\{\{([\d,]*)\}", rest)
  if groups and groups.group(1):
    return len(groups.group(1).split(","))
  return num_devices


def collectives(hlo_text: str, num_devices: int) -> Dict[str, Dict[str, float]]:
  """Per collective kind: how many run per step and the bytes each device sends under a ring
  model (all-reduce 2(g-1)/g of the buffer, all-gather and all-to-all (g-1)/g of the result,
  reduce-scatter (g-1) of its result, a permute the buffer), g the replica group's size. An
  asynchronous collective (a -start and a -done) counts once, with the -done's result."""
  stats = {c: {"count": 0.0, "bytes": 0.0} for c in COLLECTIVES}
  for inst, runs, table in Program(hlo_text).instructions():
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
