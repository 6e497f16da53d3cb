"""t5lite/profiling.py: a real trace of a jitted step on CPU, and the GPU trace's layout."""

import gzip
import json

import jax
import jax.numpy as jnp
import pytest

from conftest import run_cli
from t5lite import hlo_analysis, profiling


def test_a_traced_step_sums_each_op_per_step(tmp_path):
  x = jnp.ones((128, 128))
  step = jax.jit(lambda x: jnp.tanh(x @ x).sum())
  run = lambda: step(x).block_until_ready()
  run()
  trace = profiling.trace_steps(run, 3, str(tmp_path))
  assert trace.endswith("perfetto_trace.json.gz") and trace.startswith(str(tmp_path))
  ops = profiling.op_times(trace, 3)
  assert ops and all(row["where"] == "/host:CPU" and row["ms_per_step"] > 0 for row in ops)
  assert [row["ms_per_step"] for row in ops] == sorted((row["ms_per_step"] for row in ops),
                                                       reverse=True)
  # Every op of this program runs once a step.
  assert {row["runs_per_step"] for row in ops} == {1.0}
  kinds = profiling.op_times(trace, 3, by_kind=True)
  assert sum(r["ms_per_step"] for r in kinds) == pytest.approx(sum(r["ms_per_step"] for r in ops))


def test_ops_traced_for_less_than_their_matmul_flops_take_are_listed_apart(tmp_path):
  """XLA:CPU runs its own dots on its intra-op threads after their trace event, which times the
  dispatch (decoder-125m's head weight gradient: 0.14 ms traced, 0.75 s at the peak). A real
  trace's op names are the program's instruction names, so each traced dot finds its FLOPs; at
  an impossibly high peak nothing is outrun, at a low one the dot is, and the note names it."""
  a, b = jnp.ones((256, 64)), jnp.ones((256, 128))
  step = jax.jit(lambda a, b: jnp.tanh(jnp.dot(a.T, b)).sum())  # a weight gradient's layout
  run = lambda: step(a, b).block_until_ready()
  run()
  ops = profiling.op_times(profiling.trace_steps(run, 2, str(tmp_path)), 2)
  flops = hlo_analysis.matmul_flops_by_op(step.lower(a, b).compile().as_text())
  assert list(flops.values()) == [2 * 256 * 64 * 128]
  (dot,) = flops
  assert dot in {row["op"] for row in ops}
  assert profiling.outrun_matmuls(ops, flops, peak_tflops=1e9) == []
  (row,) = profiling.outrun_matmuls(ops, flops, peak_tflops=1e-9)
  assert row["op"] == dot and row["gflops_per_step"] == pytest.approx(2 * 256 * 64 * 128 / 1e9)
  assert row["peak_ms"] == pytest.approx(2 * 256 * 64 * 128 / 1e-9 / 1e12 * 1e3)
  # A GPU trace's kernels are their time: never listed.
  on_device = [dict(r, where="/device:GPU:0") for r in ops]
  assert profiling.outrun_matmuls(on_device, flops, peak_tflops=1e-9) == []
  assert profiling.outrun_note([row]).startswith("1 op(s) traced for less time")
  assert dot in profiling.outrun_note([row]) and profiling.outrun_note([]) == ""


def test_custom_calls_are_named_by_their_target():
  hlo = """
  %ffi_call.907 = f32[512,512]{1,0} custom-call(%a, %b), custom_call_target="t5lite_cpu_matmul_f32_f32", backend_config={}
  %custom-call.3 = (bf16[8,16]{1,0}, s8[4194304]{0}) custom-call(%x, %y), custom_call_target="__cublas$lt$matmul"
  %fusion.1 = f32[8]{0} fusion(%p), kind=kLoop, calls=%fused
  """
  assert profiling.custom_call_targets(hlo) == {"ffi_call.907": "t5lite_cpu_matmul_f32_f32",
                                                "custom-call.3": "__cublas$lt$matmul"}
  assert profiling.op_kind("loop_add_fusion.12") == "loop_add_fusion"
  assert profiling.op_kind("fusion_3") == "fusion" and profiling.op_kind("dot") == "dot"


def test_on_a_gpu_only_the_device_s_kernels_count(tmp_path):
  """A GPU trace's layout: the host launches each op (an event with its hlo_op too) and the
  device runs it; only the device's time is the op's. Events without an hlo_op are the
  runtime's, not ops."""
  def event(pid, name, dur, op=None):
    args = {"hlo_op": op} if op else {}
    return {"ph": "X", "pid": pid, "tid": 1, "ts": 0, "dur": dur, "name": name, "args": args}
  events = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
            {"ph": "M", "pid": 7, "name": "process_name", "args": {"name": "/device:GPU:0"}}]
  for _ in range(2):  # two steps
    events += [event(1, "launch", 5.0, "custom-call.3"), event(1, "PjitFunction", 900.0),
               event(7, "sm90_xmma_gemm", 300.0, "custom-call.3"),
               event(7, "loop_add_fusion_1", 40.0, "loop_add_fusion.1"),
               event(7, "loop_add_fusion_2", 60.0, "loop_add_fusion.2")]
  path = tmp_path / "perfetto_trace.json.gz"
  with gzip.open(path, "wt", encoding="utf-8") as f:
    json.dump({"traceEvents": events}, f)
  ops = profiling.op_times(str(path), 2)
  assert [(r["op"], r["where"], r["ms_per_step"], r["runs_per_step"]) for r in ops] == [
      ("custom-call.3", "/device:GPU:0", 0.3, 1.0),
      ("loop_add_fusion.2", "/device:GPU:0", 0.06, 1.0),
      ("loop_add_fusion.1", "/device:GPU:0", 0.04, 1.0)]
  kinds = profiling.op_times(str(path), 2, by_kind=True,
                             kinds={"custom-call.3": "__cublas$lt$matmul"})
  assert [(r["op"], r["ms_per_step"], r["runs_per_step"]) for r in kinds] == [
      ("__cublas$lt$matmul", 0.3, 1.0), ("loop_add_fusion", pytest.approx(0.1), 2.0)]


def test_command_buffers_that_hold_most_of_a_trace_are_called_out():
  """An H200's T5-base profile came back as 77 ms a step of `command_buffer` (XLA:GPU's CUDA
  graphs, traced whole): the report says how to see their kernels, and stays quiet otherwise."""
  rows = [{"op": "command_buffer", "ms_per_step": 77.1}, {"op": "loop_slice_fusion",
                                                          "ms_per_step": 0.2}]
  note = profiling.command_buffer_note(rows)
  assert note.startswith("100% of the traced op time") and "--xla_gpu_enable_command_buffer=" in note
  rows[1]["ms_per_step"] = 80.0
  assert profiling.command_buffer_note(rows) == ""
  assert profiling.command_buffer_note([]) == ""


def test_benchmark_refuses_a_profile_with_no_train_step():
  r = run_cli(["scripts/benchmark.py", "--gin_file=models/decoder/tiny.gin", "--no_train",
               "--decode_batches=1", "--profile=/tmp/unused"])
  assert r.returncode == 2 and "--profile traces the train step" in r.stderr
