"""scripts/benchmark.py runs end to end on CPU (tiny shapes), side by side with HF."""

import json

import pytest

from conftest import run_cli
from t5lite import host_malloc

pytestmark = pytest.mark.slow


def test_benchmark_json_and_hf_side_by_side(tmp_path):
  pytest.importorskip("transformers")
  out = tmp_path / "b.json"
  r = run_cli(["scripts/benchmark.py", "--gin_file=models/t5_1_1/tiny.gin",
               "--gin.ModelConfig.dtype='float32'", "--batch=2", "--inputs=16", "--targets=8",
               "--steps=1", "--warmup=1", "--decode_batches=1", "--decode_tokens=4", "--vs-hf",
               "--hf-modes=eager", f"--json={out}"])
  assert r.returncode == 0, r.stderr[-3000:]
  result = json.loads(out.read_text())
  impls = [row["impl"] for row in result["results"]]
  assert impls == ["t5lite", "hf-eager"]
  t5 = result["results"][0]
  assert t5["tokens_per_s"] > 0 and 0 < t5["mfu"] < 1.5 and t5["model_flops_per_token"] > 0
  assert [row["impl"] for row in result["decode"]] == ["t5lite-decode-b1", "hf-generate-b1"]
  assert "t5lite / HF tokens/s" in r.stdout
  # The report says what was measured: the settings gin resolved, and the higher of two peaks.
  assert result["model"]["dtype"] == "float32" and result["model"]["scan_layers"] is True
  assert "dtype=float32" in r.stdout
  assert result["peak_tflops"] == max(result["peak_tflops_before_after"]) > 0
  if host_malloc.is_glibc():  # it re-executed itself under a tuned allocator (HF too)
    assert result["host_malloc"] == ("jemalloc" if host_malloc.find_jemalloc() else "hugepages")
