"""scripts/benchmark.py runs end to end on CPU (tiny shapes), side by side with HF."""

import argparse
import json
import os
import sys

import pytest

from conftest import REPO, run_cli
from t5lite import host_malloc

pytestmark = pytest.mark.slow


def test_benchmark_json_and_hf_side_by_side(tmp_path):
  pytest.importorskip("transformers")
  out = tmp_path / "b.json"
  r = run_cli(["scripts/benchmark.py", "--gin_file=models/t5_1_1/tiny.gin",
               "--gin.ModelConfig.dtype='float32'", "--gin.LossConfig.head_chunks=2", "--batch=2",
               "--inputs=16", "--targets=8", "--steps=1", "--warmup=1", "--decode_batches=1",
               "--decode_tokens=4", "--vs-hf",
               "--hf-modes=eager", "--hf-generate-caches=dynamic,static", f"--json={out}"])
  assert r.returncode == 0, r.stderr[-3000:]
  result = json.loads(out.read_text())
  impls = [row["impl"] for row in result["results"]]
  assert impls == ["t5lite", "hf-eager"]
  t5 = result["results"][0]
  assert t5["tokens_per_s"] > 0 and 0 < t5["mfu"] < 1.5 and t5["model_flops_per_token"] > 0
  assert [row["impl"] for row in result["decode"]] == [
      "t5lite-decode-b1", "hf-generate-b1", "hf-generate-static-b1"]
  assert all(row["vs_t5lite"] > 0 for row in result["decode"][1:])
  assert "t5lite / HF tokens/s" in r.stdout
  # The report says what was measured: the settings gin resolved, and the higher of two peaks.
  assert result["model"]["dtype"] == "float32" and result["model"]["scan_layers"] is True
  assert "dtype=float32" in r.stdout
  assert result["loss"]["head_chunks"] == 2 and "head_chunks=2" in r.stdout
  assert result["peak_tflops"] == max(result["peak_tflops_before_after"]) > 0
  if host_malloc.is_glibc():  # it re-executed itself under a tuned allocator (HF too)
    assert result["host_malloc"] == ("jemalloc" if host_malloc.find_jemalloc() else "hugepages")


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
  rows = benchmark.time_one_at_a_time([maker("t5lite"), maker("hf-eager"), maker("hf-compiled")],
                                      args, flops=1e6)
  assert order == ["hf-eager", "hf-compiled", "t5lite"]
  assert [r["impl"] for r in rows] == ["t5lite", "hf-eager", "hf-compiled"]


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
