"""Where a compiled step's time goes: a JAX profiler trace of a few steps, summed per XLA op.

`trace_steps` runs a step function under `jax.profiler.trace` and returns the Perfetto trace
it wrote; `op_times` reads that trace and sums the time of every XLA op (the events that carry
an `hlo_op`: on a CPU the thunks XLA:CPU runs, on a GPU the kernels the device ran) per step,
by op or by kind of op (the name without its instance number: `ffi_call.907` and `ffi_call.906`
are both `ffi_call`). On a GPU only the device's events count (the host's launches of the same
ops are not their time). Times are op times: XLA:CPU runs independent ops side by side on its
threads, so a CPU step's op times add up to more than the step.
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
  if any(processes.get(e.get("pid"), "").startswith("/device:") for e in ops):
    ops = [e for e in ops if processes.get(e.get("pid"), "").startswith("/device:")]
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
