"""Where a compiled step's time goes: a JAX profiler trace of a few steps, summed per XLA op.

`trace_steps` runs a step function under `jax.profiler.trace` and returns the Perfetto trace
it wrote; `op_times` reads that trace and sums the time of every XLA op (the events that carry
an `hlo_op`: on a CPU the thunks XLA:CPU runs, on a GPU the kernels the device ran) per step,
by op or by kind of op (the name without its instance number: `ffi_call.907` and `ffi_call.906`
are both `ffi_call`). On a GPU only the device's events count (the host's launches of the same
ops are not their time). Times are op times: XLA:CPU runs independent ops side by side on its
threads, so a CPU step's op times add up to more than the step; and its own dots time only their
dispatch (`outrun_matmuls` finds the ops traced for less than their FLOPs need).
"""

import collections
import glob
import gzip
import json
import os
import re
from typing import Callable, Dict, List

import jax

_INSTANCE = re.compile(r"[._]?\d+$")


def trace_steps(run: Callable[[], object], steps: int, folder: str) -> str:
  """Runs `run` (one step, which waits for its result) `steps` times under the JAX profiler,
  writing the trace under `folder`; returns the path of its Perfetto trace
  (perfetto_trace.json.gz)."""
  with jax.profiler.trace(folder, create_perfetto_trace=True):
    for _ in range(steps):
      run()
  found = sorted(glob.glob(os.path.join(folder, "**", "perfetto_trace.json.gz"), recursive=True),
                 key=os.path.getmtime)
  if not found:
    raise RuntimeError(f"the profiler wrote no perfetto_trace.json.gz under {folder}")
  return found[-1]


def op_kind(name: str) -> str:
  """An op's name without its instance number (`loop_add_fusion.12` -> `loop_add_fusion`)."""
  return _INSTANCE.sub("", name) or name


def custom_call_targets(hlo_text: str) -> Dict[str, str]:
  """{instruction name: custom-call target} of an optimized HLO module's text: what an op named
  `ffi_call.907` or `custom-call.12` runs (t5lite's CPU kernels, cuBLAS, cuDNN)."""
  found = re.finditer(r"%?([\w.\-]+) = [^\n]*? custom-call\([^\n]*?custom_call_target=\"([^\"]+)\"",
                      hlo_text)
  return {m.group(1): m.group(2) for m in found}


def _on_device(process: str) -> bool:
  """Whether a profiler process name is a device's ("/device:GPU:0"), not the host's."""
  return process.startswith("/device:")


def op_times(trace_path: str, steps: int, by_kind: bool = False,
             kinds: Dict[str, str] = None) -> List[Dict]:
  """The XLA ops of a trace of `steps` steps (see the module docstring), longest first: dicts of
  op (its HLO name, or with `by_kind` its kind: `kinds[name]` where given, e.g.
  `custom_call_targets` of the program, else `op_kind`), where (the profiler's process:
  "/host:CPU", "/device:GPU:0", ...), ms_per_step and runs_per_step."""
  kinds = kinds or {}
  with gzip.open(trace_path, "rt", encoding="utf-8") as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  processes = {e.get("pid"): e.get("args", {}).get("name", "") for e in events
               if e.get("ph") == "M" and e.get("name") == "process_name"}
  ops = [e for e in events if e.get("ph") == "X" and "dur" in e
         and "hlo_op" in (e.get("args") or {})]
  on_device = [e for e in ops if _on_device(processes.get(e.get("pid"), ""))]
  ops = on_device or ops  # a device's trace: its ops' own events, not the host's launches
  time_us, runs = collections.Counter(), collections.Counter()
  for e in ops:
    name = e["args"]["hlo_op"]
    kind = kinds.get(name) or op_kind(name)
    key = (kind if by_kind else name, processes.get(e.get("pid"), ""))
    time_us[key] += float(e["dur"])
    runs[key] += 1
  return [{"op": op, "where": where, "ms_per_step": us / 1e3 / steps,
           "runs_per_step": runs[(op, where)] / steps}
          for (op, where), us in time_us.most_common()]


def outrun_matmuls(ops: List[Dict], flops_by_op: Dict[str, float],
                   peak_tflops: float) -> List[Dict]:
  """The ops of `op_times(...)` (by op) traced for less time than their matrix-multiply FLOPs
  (`flops_by_op`: `hlo_analysis.matmul_flops_by_op` of the traced program) take at
  `peak_tflops`: events that cannot hold the op's time. On a CPU these are XLA's own dots: XLA:CPU
  runs them on its intra-op threads after their event, which times their dispatch (a
  [2560, 32000] x [32000, 768] weight gradient, 0.75 s of decoder-125m's step at the peak, traced
  at 0.14 ms), so their time is in no row, or in the rows of the ops that ran meanwhile (the head's
  input gradient beside it). A device's ops (a GPU trace's kernels) are left out: their events
  are their time, and a causal attention kernel, whose FLOPs count the blocks it skips, could
  read faster than the peak. Dicts of op, ms_per_step (traced), gflops_per_step and peak_ms (the
  least time its FLOPs take), the longest at the peak first."""
  rows = []
  for row in ops:
    if _on_device(row["where"]):
      continue
    flops = flops_by_op.get(row["op"], 0.0)
    peak_ms = flops / (peak_tflops * 1e12) * 1e3 if peak_tflops > 0 else 0.0
    if row["ms_per_step"] < peak_ms:
      rows.append({"op": row["op"], "ms_per_step": row["ms_per_step"],
                   "gflops_per_step": flops / 1e9, "peak_ms": peak_ms})
  return sorted(rows, key=lambda r: -r["peak_ms"])


def outrun_note(rows: List[Dict]) -> str:
  """A warning for `outrun_matmuls` rows (the first three named), "" where there are none."""
  if not rows:
    return ""
  named = "; ".join(f"{r['op']} {r['ms_per_step']:.2f} ms traced, {r['gflops_per_step']:.1f} "
                    f"GFLOP, at least {r['peak_ms']:.1f} ms at the peak" for r in rows[:3])
  more = f" and {len(rows) - 3} more" if len(rows) > 3 else ""
  least = sum(r["peak_ms"] for r in rows)
  return (f"{len(rows)} op(s) traced for less time than their matmul FLOPs take at the peak, "
          f"{least:.1f} ms a step in all (XLA:CPU's dots: their events time the dispatch): "
          f"{named}{more}; their time is in no row, or in those of the ops that ran beside them")


# The XLA:GPU option that compiles a step without command buffers (CUDA graphs: runs of kernels
# launched as one, which a trace shows whole), so that its trace has each kernel.
NO_COMMAND_BUFFERS = {"xla_gpu_enable_command_buffer": ""}


def command_buffer_note(kinds: List[Dict]) -> str:
  """A warning for `op_times(..., by_kind=True)` rows where XLA:GPU's command buffers (CUDA
  graphs: runs of kernels launched as one) hold most of the traced time, since the trace shows
  each graph whole and not its kernels; "" otherwise."""
  total = sum(row["ms_per_step"] for row in kinds)
  graphs = sum(row["ms_per_step"] for row in kinds if row["op"] == "command_buffer")
  if not total or graphs < total / 2:
    return ""
  return (f"{graphs / total:.0%} of the traced op time is in XLA's command buffers (CUDA graphs), "
          "shown whole: to see their kernels, compile the traced step with the XLA options "
          f"{NO_COMMAND_BUFFERS} (or XLA_FLAGS=--{next(iter(NO_COMMAND_BUFFERS))}=), "
          "which brings back the launches the graphs save: time the step with them")
