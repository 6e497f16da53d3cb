"""scripts/benchmark.py runs end to end on CPU (tiny shapes), side by side with HF."""

import argparse
import json
import os
import sys
import time

import jax
import pytest

from conftest import REPO, run_cli
from t5lite import host_malloc

pytestmark = pytest.mark.slow


def test_benchmark_json_and_hf_side_by_side(tmp_path):
  transformers = pytest.importorskip("transformers")
  out = tmp_path / "b.json"
  r = run_cli(["scripts/benchmark.py", "--gin_file=models/t5_1_1/tiny.gin",
               "--gin.ModelConfig.dtype='float32'", "--gin.LossConfig.head_chunks=2", "--batch=2",
               "--inputs=16", "--targets=8", "--steps=2", "--rounds=2", "--warmup=1",
               "--decode_batches=1", "--decode_tokens=4", "--vs-hf", "--hf-modes=eager",
               "--hf-generate-caches=dynamic,static", f"--json={out}",
               f"--profile={tmp_path / 'trace'}", "--profile_steps=2"])
  assert r.returncode == 0, r.stderr[-3000:]
  result = json.loads(out.read_text())
  impls = [row["impl"] for row in result["results"]]
  assert impls == ["t5lite", "hf-eager"]
  t5 = result["results"][0]
  assert t5["tokens_per_s"] > 0 and 0 < t5["mfu"] < 1.5 and t5["model_flops_per_token"] > 0
  # The step's memory as XLA planned it; a CPU has no allocator statistics, so that is its peak.
  assert t5["planned_mem_gb"] > 0 and t5["peak_mem_gb"] == t5["planned_mem_gb"]
  assert "planned_mem_gb" not in result["results"][1]
  assert [row["impl"] for row in result["decode"]] == [
      "t5lite-decode-b1", "hf-generate-b1", "hf-generate-static-b1"]
  assert all(row["vs_t5lite"] > 0 for row in result["decode"][1:])
  assert "t5lite / HF tokens/s" in r.stdout
  # The versions the times depend on, HF's side included.
  assert result["versions"]["jax"] == jax.__version__
  assert result["versions"]["transformers"] == transformers.__version__
  assert f"jax {jax.__version__}" in r.stdout and f"transformers {transformers.__version__}" \
      in r.stdout
  assert result["hf_process"] == "child" and "HF in its own process" in r.stdout
  assert t5["host_faults_per_step"] >= 0 and t5["host_kernel_s_per_step"] >= 0
  assert "page faults" in r.stdout
  # --profile: t5lite's ops per step from a trace of two more steps.
  profile = result["profile"]
  assert profile["steps"] == 2 and profile["trace"].startswith(str(tmp_path / "trace"))
  assert profile["by_kind"][0]["ms_per_step"] > 0 and profile["ops"][0]["where"] == "/host:CPU"
  assert "# profile: 2 steps traced" in r.stdout
  assert all(row["ms_per_step"] < row["peak_ms"] for row in profile["outrun_matmuls"])
  # The report says what was measured: the settings gin resolved, and the highest of the peaks
  # probed before the steps, between their two rounds and after them.
  assert result["model"]["dtype"] == "float32" and result["model"]["scan_layers"] is True
  assert "dtype=float32" in r.stdout
  assert result["loss"]["head_chunks"] == 2 and "head_chunks=2" in r.stdout
  assert len(t5["round_step_s"]) == 2 and len(result["peak_tflops_between_rounds"]) == 1
  readings = result["peak_tflops_before_after"] + result["peak_tflops_between_rounds"]
  assert result["peak_tflops"] == max(readings) > 0
  assert len(result["peak_by_matmul"]) == 3 and result["peak_tflops"] in [
      max(p.values()) for p in result["peak_by_matmul"]]
  assert result["peak_matmul"] in ("xla", "t5lite") and f"{result['peak_matmul']}'s" in r.stdout
  if host_malloc.is_glibc():  # it re-executed itself under a tuned allocator (HF too)
    assert result["host_malloc"] == ("jemalloc" if host_malloc.find_jemalloc() else
                                     "mimalloc" if host_malloc.find_mimalloc() else "hugepages")
    assert result["host_block_cache"] == (result["host_malloc"] == "mimalloc"
                                          and host_malloc.build_block_cache() is not None)


def test_matmul_peaks_chained_through_xla_and_torch():
  sys.path.insert(0, os.path.join(REPO, "scripts"))
  import matmul_peak  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  xla = matmul_peak.chained_matmul_tflops(128, jnp.float32, chain=4, reps=2)
  assert 0 < xla < 1e3
  pytest.importorskip("torch")
  assert 0 < matmul_peak.torch_matmul_tflops(128, device="cpu", chain=4, reps=2) < 1e3
  import torch  # pylint: disable=import-outside-toplevel
  if not torch.cuda.is_available():
    assert matmul_peak.torch_matmul_tflops(128) is None   # no GPU: no cuBLAS peak, no error
  peaks = matmul_peak.measure_peak_tflops(on_gpu=False)
  assert "xla" in peaks and all(v > 0 for v in peaks.values())


def test_cpu_order_alternates_rounds_and_keeps_every_step():
  """On CPU the runners take turns, a round each (its first step untimed after the first
  round), and each row keeps its timed steps round by round beside their median."""
  sys.path.insert(0, os.path.join(REPO, "scripts"))
  import benchmark  # pylint: disable=import-outside-toplevel
  calls = []

  def runner(name):
    return (lambda: calls.append(name) or 1.0), {"impl": name, "compile_s": 0.0,
                                                "peak_mem_gb": lambda: 0.0}

  args = argparse.Namespace(warmup=1, steps=5, rounds=2, batch=1, inputs=2, targets=2)
  rows = benchmark.time_side_by_side([runner("t5lite"), runner("hf")], args, flops=1e6)
  assert "".join(c[0] for c in calls) == "th" + "ttt" + "hhh" + "ttt" + "hhh"
  for row in rows:
    assert [len(steps) for steps in row["round_step_s"]] == [3, 2]
    every = sorted(t for steps in row["round_step_s"] for t in steps)
    assert row["step_s"] == every[2] and every[0] > 0
  # t5lite's row (this process's) also has its steps' page faults and CPU seconds, by round.
  for key in ("round_host_faults", "round_host_cpu_s"):
    assert [len(steps) for steps in rows[0][key]] == [3, 2]
    assert all(x >= 0 for steps in rows[0][key] for x in steps)
  assert "round_host_faults" not in rows[1]


def test_host_cpu_seconds_tell_a_slow_steps_cause():
  """A step that computes on this process's threads counts its CPU seconds; one that waits (on
  another process, a lock, I/O) counts none, though both take the same wall time."""
  sys.path.insert(0, os.path.join(REPO, "scripts"))
  import benchmark  # pylint: disable=import-outside-toplevel
  work = iter([0.0, 0.3, 0.0])   # the warm-up step, then a computing step and a waiting one

  def step():
    seconds, start = next(work), time.process_time()
    if seconds:
      while time.process_time() - start < seconds:
        pass
    else:
      time.sleep(0.3)
    return 1.0

  args = argparse.Namespace(warmup=1, steps=2, rounds=1, batch=1, inputs=2, targets=2)
  facts = {"impl": "t5lite", "compile_s": 0.0, "peak_mem_gb": lambda: 0.0}
  row, = benchmark.time_side_by_side([(step, facts)], args, flops=1e6)
  (busy, idle), = row["round_host_cpu_s"]
  assert busy >= 0.25 and idle < 0.1
  assert min(row["round_step_s"][0]) >= 0.29


def test_gpu_order_times_hf_first_and_reports_t5lite_first():
  sys.path.insert(0, os.path.join(REPO, "scripts"))
  import benchmark  # pylint: disable=import-outside-toplevel
  order = []

  def maker(name):
    def make():
      order.append(name)
      return (lambda: 1.0), {"impl": name, "compile_s": 0.0, "peak_mem_gb": lambda: 0.0}
    return make

  args = argparse.Namespace(warmup=0, steps=2, rounds=3, batch=1, inputs=2, targets=2)
  rows = benchmark.time_one_at_a_time(
      [(name, maker(name)) for name in ("t5lite", "hf-eager", "hf-compiled")], args, flops=1e6)
  assert order == ["hf-eager", "hf-compiled", "t5lite"]
  assert [r["impl"] for r in rows] == ["t5lite", "hf-eager", "hf-compiled"]


def test_gpu_order_leaves_out_a_failing_hf_runner_but_not_a_failing_t5lite():
  sys.path.insert(0, os.path.join(REPO, "scripts"))
  import benchmark  # pylint: disable=import-outside-toplevel

  def ok(name):
    return lambda: ((lambda: 1.0), {"impl": name, "compile_s": 0.0, "peak_mem_gb": lambda: 0.0})

  def broken():
    def run():
      raise RuntimeError("inductor: no C compiler")
    return run, {"impl": "hf-compiled", "compile_s": 0.0, "peak_mem_gb": lambda: 0.0}

  args = argparse.Namespace(warmup=1, steps=2, rounds=3, batch=1, inputs=2, targets=2)
  failed = {}
  rows = benchmark.time_one_at_a_time(
      [("t5lite", ok("t5lite")), ("hf-eager", ok("hf-eager")), ("hf-compiled", broken)],
      args, flops=1e6, failed=failed)
  assert [r["impl"] for r in rows] == ["t5lite", "hf-eager"]
  assert failed == {"hf-compiled": "RuntimeError: inductor: no C compiler"}
  with pytest.raises(RuntimeError, match="no C compiler"):
    benchmark.time_one_at_a_time([("t5lite", broken), ("hf-eager", ok("hf-eager"))], args,
                                 flops=1e6, failed={})


def test_compile_vs_depth_scanned_and_unrolled(tmp_path):
  out = tmp_path / "c.json"
  r = run_cli(["scripts/benchmark.py", "--gin_file=models/t5_1_1/tiny.gin", "--batch=2",
               "--inputs=16", "--targets=8", "--compile_depths=1,3", f"--json={out}"])
  assert r.returncode == 0, r.stderr[-3000:]
  rows = json.loads(out.read_text())["compile_vs_depth"]
  assert [(row["depth"], row["scan_layers"]) for row in rows] == [
      (1, True), (1, False), (3, True), (3, False)]
  assert all(row["lower_s"] > 0 and row["compile_s"] > 0 for row in rows)
  assert "unrolled" in r.stdout


@pytest.mark.parametrize("arch", ["encoder_decoder", "decoder_only", "prefix_lm"])
def test_packed_synthetic_batches_and_their_model_flops(arch):
  """--pack's rows hold that many examples as the data pipeline packs them (segment ids from 1,
  positions restarting, decoder inputs shifted inside each example, a prefix LM's prefix at the
  start of each), and the model FLOPs count each example's own attention: `attention_pairs`
  equals a count of the same-segment (query, key) pairs."""
  sys.path.insert(0, os.path.join(REPO, "scripts"))
  import benchmark_step  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from conftest import tiny_config  # pylint: disable=import-outside-toplevel
  cfg = tiny_config(arch=arch)
  batch = benchmark_step.synthetic_batch(cfg, 4, 24, 16, pack=3)
  unpacked = benchmark_step.synthetic_batch(cfg, 4, 24, 16)
  assert set(unpacked) < set(batch)
  names = ("decoder", "encoder") if arch == "encoder_decoder" else ("decoder",)
  for name in names:
    seg, pos = batch[f"{name}_segment_ids"], batch[f"{name}_positions"]
    for row_seg, row_pos in zip(seg, pos):
      assert list(np.unique(row_seg)) == [1, 2, 3]
      starts = np.flatnonzero(np.diff(row_seg, prepend=0))
      assert np.all(row_pos[starts] == 0) and np.all(np.diff(row_pos)[np.diff(row_seg) == 0] == 1)
  starts = batch["decoder_positions"] == 0
  assert np.all(batch["decoder_input_tokens"][starts] == 0)
  assert np.all(batch["decoder_input_tokens"][:, 1:][~starts[:, 1:]]
                == batch["decoder_target_tokens"][:, :-1][~starts[:, 1:]])
  if arch == "prefix_lm":  # each example: its prefix first, the loss on the rest
    prefix = batch["decoder_causal_attention"].astype(bool)
    assert np.all(prefix[starts]) and np.all(batch["decoder_loss_weights"] == ~prefix)

  def same_segment(q, k):
    return sum(int(((a[:, None] == b[None, :]) & (a[:, None] > 0)).sum()) for a, b in zip(q, k))

  pairs = benchmark_step.attention_pairs(batch)
  dec = batch["decoder_segment_ids"]
  assert pairs["decoder"] == same_segment(dec, dec)
  if arch == "encoder_decoder":
    enc = batch["encoder_segment_ids"]
    assert pairs["encoder"] == same_segment(enc, enc) and pairs["cross"] == same_segment(dec, enc)
  packed = benchmark_step.model_flops_per_step(cfg, 4, 24, 16, pairs)
  assert packed < benchmark_step.model_flops_per_step(cfg, 4, 24, 16)


def test_benchmark_times_packed_rows(tmp_path):
  """--pack times the step on packed rows (here a prefix LM's, through the CPU kernel where it
  builds, in bf16 with float32 matmul outputs: runs/cpu_bf16.gin) and says so in the report;
  MFU is then against a bf16 matmul peak."""
  out = tmp_path / "p.json"
  r = run_cli(["scripts/benchmark.py", "--gin_file=models/prefix_lm_tiny.gin",
               "--gin_file=runs/cpu_bf16.gin", "--batch=2", "--inputs=24", "--targets=16",
               "--steps=1", "--warmup=1", "--pack=3", f"--json={out}"])
  assert r.returncode == 0, r.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["pack"] == 3 and result["results"][0]["tokens_per_s"] > 0
  assert "3 examples a row" in r.stdout
  assert result["model"]["dtype"] == "bfloat16" and result["model"]["float32_dot_outputs"]
  assert result["peak_dtype"] == "bf16" and "(bf16 matmul, " in r.stdout
  bad = run_cli(["scripts/benchmark.py", "--gin_file=models/prefix_lm_tiny.gin", "--batch=2",
                 "--inputs=2", "--targets=1", "--pack=4"])
  assert bad.returncode == 2 and "hold 1 to 3 examples" in bad.stderr


def test_hf_process_runs_hf_apart_and_reports_its_failures():
  """On CPU, --vs-hf runs HF in a child process (so torch's allocations do not take the pages
  XLA:CPU frees between t5lite's steps): its train steps and `generate` answer through the
  pipe from another process, and a failure there arrives here as RuntimeError with the child's
  traceback; a child that dies is reported too, not waited on."""
  pytest.importorskip("transformers")
  sys.path.insert(0, os.path.join(REPO, "scripts"))
  import benchmark_step  # pylint: disable=import-outside-toplevel
  import hf_reference  # pylint: disable=import-outside-toplevel
  from conftest import tiny_config  # pylint: disable=import-outside-toplevel
  cfg = tiny_config(arch="decoder_only")
  args = argparse.Namespace(inputs=8, decode_tokens=3)
  hf = hf_reference.HFProcess()
  try:
    run, facts = hf.runner(cfg, benchmark_step.synthetic_batch(cfg, 2, 8, 4), compiled=False)
    assert facts["impl"] == "hf-eager" and facts["compile_s"] > 0
    losses = [run(), run()]
    assert all(isinstance(x, float) and 0 < x < 20 for x in losses) and losses[1] < losses[0]
    assert facts["peak_mem_gb"]() != facts["peak_mem_gb"]()  # NaN: no device memory on CPU
    row = hf.generate(cfg, args, 2)
    assert row["impl"] == "hf-generate-b2" and row["new_tokens_per_s"] > 0
    with pytest.raises(RuntimeError, match="KeyError: 'hf-compiled'"):
      hf._call("step", "hf-compiled")  # pylint: disable=protected-access
    assert run() > 0  # the child carries on after a failed request
    hf._process.kill()  # pylint: disable=protected-access
    with pytest.raises(RuntimeError, match="HF process exited"):
      run()
  finally:
    hf.close()


def test_hf_reference_runs_bf16_where_t5lite_does():
  """Where t5lite computes in bf16 on a CPU (runs/cpu_bf16.gin), HF's train step runs under
  bf16 autocast and `generate` with bf16 weights: a comparison at one precision."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("transformers")
  sys.path.insert(0, os.path.join(REPO, "scripts"))
  import benchmark_step  # pylint: disable=import-outside-toplevel
  import hf_reference  # pylint: disable=import-outside-toplevel
  from conftest import tiny_config  # pylint: disable=import-outside-toplevel
  cfg = tiny_config(arch="decoder_only", dtype="bfloat16")
  seen = []
  hook = lambda module, inputs, output: seen.append(getattr(output, "dtype", None))  # noqa: E731
  run, _ = hf_reference.hf_runner(cfg, benchmark_step.synthetic_batch(cfg, 2, 8, 4), compiled=False)
  with torch.nn.modules.module.register_module_forward_hook(hook):
    losses = [run(), run()]
  assert all(0 < x < 20 for x in losses) and losses[1] < losses[0]
  assert torch.bfloat16 in seen  # the projections ran in bf16
  row = hf_reference.bench_hf_generate(cfg, argparse.Namespace(inputs=8, decode_tokens=3), 2)
  assert row["new_tokens_per_s"] > 0


def test_a_gpu_profile_traces_a_step_compiled_without_command_buffers(tmp_path):
  """On a GPU, `--profile` compiles the traced step again without XLA's command buffers (CUDA
  graphs, which a trace shows whole): the remade runner gets the option on top of gin's
  compiler options, and the timed runner's arguments are left as they were. The option is one
  XLA:CPU accepts too, so the path runs here."""
  sys.path.insert(0, os.path.join(REPO, "scripts"))
  import benchmark  # pylint: disable=import-outside-toplevel
  import benchmark_step  # pylint: disable=import-outside-toplevel
  args = argparse.Namespace(gin_file=["models/decoder/tiny.gin", "runs/cpu.gin"], batch=2,
                            inputs=8, targets=8, pack=0, microbatches=1, aot="",
                            profile=str(tmp_path / "trace"), profile_steps=1)
  cfg, args.loss, args.optimizer, args.train = benchmark_step.load_config(args, [])
  made = []

  def remake(remade_args):
    made.append(dict(remade_args.train.compiler_options))
    return benchmark.t5lite_runner(cfg, remade_args)

  before = dict(args.train.compiler_options)
  out = benchmark.profile_step(*benchmark.t5lite_runner(cfg, args), args, 0.1, remake=remake)
  assert made == [{**before, "xla_gpu_enable_command_buffer": ""}]
  assert dict(args.train.compiler_options) == before
  assert out["compiler_options"] == {"xla_gpu_enable_command_buffer": ""}
  assert out["by_kind"] and out["by_kind"][0]["ms_per_step"] > 0
