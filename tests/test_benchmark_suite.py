"""scripts/benchmark_suite.py: a real case end to end, and the fallback when HF fails."""

import json
import os
import sys
import time

import pytest

from conftest import REPO, run_cli

sys.path.insert(0, os.path.join(REPO, "scripts"))
import benchmark_suite  # noqa: E402  pylint: disable=wrong-import-position
import benchmark_tables  # noqa: E402  pylint: disable=wrong-import-position

pytestmark = pytest.mark.slow


def test_cpu_case_with_hf_makes_the_table(tmp_path):
  transformers = pytest.importorskip("transformers")
  out, md = tmp_path / "s.json", tmp_path / "s.md"
  r = run_cli(["scripts/benchmark_suite.py", "--suite=cpu", "--cases=decoder/tiny", "--steps=1",
               f"--json={out}", f"--markdown={md}"])
  assert r.returncode == 0, r.stderr[-3000:]
  result = json.loads(out.read_text())["results"][0]
  assert [row["impl"] for row in result["results"]] == ["t5lite", "hf-eager"]
  assert result["model"]["dtype"] == "float32"  # runs/cpu.gin came after the preset
  table = md.read_text()
  assert "| decoder/tiny | 8 x (256+64) |" in table and "hf-eager" in table
  assert "vs hf-eager" in table  # the CPU target: ahead of HF eager
  assert "--gin_file=models/decoder/tiny.gin --gin_file=runs/cpu.gin" in table
  # The table's first line names the library versions the run recorded.
  assert f"transformers {transformers.__version__}." in table.splitlines()[0]
  assert result["versions"]["transformers"] == transformers.__version__


def test_cpu_compiled_case_times_hf_under_torch_compile(tmp_path):
  """The HF torch.compile runner the GPU targets compare with, on CPU (inductor): it compiles,
  trains and is the target's reference."""
  pytest.importorskip("transformers")
  out = tmp_path / "s.json"
  r = run_cli(["scripts/benchmark_suite.py", "--suite=cpu-compiled", "--cases=decoder/tiny",
               "--steps=1", f"--json={out}"])
  assert r.returncode == 0, r.stderr[-3000:]
  result = json.loads(out.read_text())["results"][0]
  assert not result["hf_error"]
  rows = {row["impl"]: row for row in result["results"]}
  assert list(rows) == ["t5lite", "hf-eager", "hf-compiled"]
  assert rows["hf-compiled"]["tokens_per_s"] > 0 and rows["hf-compiled"]["compile_s"] > 1.0
  assert "vs hf-compiled" in r.stdout


def test_packed_suite_passes_its_rows_to_the_benchmark():
  """cpu-packed's cases run benchmark.py with --pack, and the table says how many examples a
  row holds."""
  cases = benchmark_suite.SUITES["cpu-packed"]
  assert [c.preset for c in cases] == ["decoder/tiny", "t5_1_1/tiny", "prefix_lm_tiny"]
  assert all("--pack=4" in c.argv(with_hf=True) for c in cases)
  assert "--pack" not in " ".join(benchmark_suite.SUITES["cpu"][0].argv(with_hf=True))
  row = {"results": [{"impl": "t5lite", "step_s": 0.1, "tokens_per_s": 1.0, "mfu": 0.5,
                      "peak_mem_gb": 0.1}], "command": "c", "hf_error": "", "device": "cpu",
         "platform": "cpu", "peak_tflops": 0.2, "host_malloc": "jemalloc"}
  assert "| decoder/tiny | 8 x (256+64), 4 a row |" in benchmark_tables.markdown(cases[:1], [row])


def test_hf_failure_keeps_t5lite_numbers_and_says_why():
  case = benchmark_suite.Case("decoder/tiny", "cpu", 2, 8, 8, steps=1, warmup=1,
                              hf_modes="eager,bogus")
  result = benchmark_suite.run_case(case, timeout_s=600, env=benchmark_suite.SUITE_ENV["cpu"])
  assert [row["impl"] for row in result["results"]] == ["t5lite"]
  assert "--hf-modes: unknown bogus" in result["hf_error"]
  assert "--vs-hf" not in result["command"]
  table = benchmark_tables.markdown([case], [result])
  assert "failed" in table and "HF failed, t5lite re-run alone" in table


def test_lever_suite_runs_each_lever_against_the_run_config(tmp_path):
  """The lever suites: t5lite alone (no HF run), the run config and then each lever added in gin,
  which the run's JSON echoes; one table row per variant."""
  out, md = tmp_path / "l.json", tmp_path / "l.md"
  r = run_cli(["scripts/benchmark_suite.py", "--suite=cpu-levers", "--cases=decoder/tiny",
               "--steps=1", f"--json={out}", f"--markdown={md}"])
  assert r.returncode == 0, r.stderr[-3000:]
  results = json.loads(out.read_text())["results"]
  assert len(results) == len(benchmark_suite.LEVERS) == 3
  assert all([row["impl"] for row in res["results"]] == ["t5lite"] for res in results)
  assert not any(res["hf_error"] or "--vs-hf" in res["command"] for res in results)
  assert [res["loss"]["head_chunks"] for res in results] == [0, 8, 0]
  assert [res["model"]["param_dtype"] for res in results] == ["float32", "float32", "bfloat16"]
  assert [res["optimizer"]["master_weights"] for res in results] == [False, False, True]
  table = md.read_text()
  assert "| decoder/tiny | 8 x (256+64) |" in table
  assert "| decoder/tiny LossConfig.head_chunks=8 | 8 x (256+64) |" in table
  # Each row's speed against the run config's row: the run config itself at 1x.
  rows = [line for line in table.splitlines() if line.startswith("| decoder/tiny")]
  assert rows[0].endswith("| 1.000x |") and all(line.endswith("x |") for line in rows)
  base_ms = float(rows[0].split("|")[3].replace(",", ""))
  lever_ms = float(rows[1].split("|")[3].replace(",", ""))
  assert float(rows[1].split("|")[-2].strip()[:-1]) == pytest.approx(base_ms / lever_ms,
                                                                     rel=0.02)
  assert "OptimizerConfig.master_weights=True | 8 x (256+64) |" in table
  assert "failed" not in table
  gpu = benchmark_suite.SUITES["gpu-levers"]
  assert {(c.preset, c.batch, c.inputs, c.targets) for c in gpu} == {
      ("t5_1_1/base", 64, 512, 128), ("decoder/1b", 8, 0, 2048)}
  assert all(c.run == "gpu" and not c.hf_modes for c in gpu)


def test_gin_bindings_and_no_hf_apply_to_every_case(tmp_path):
  """`--gin.X=Y` adds a binding to every case (before a lever suite's levers, which then vary on
  top of it and are compared with the cases that have it alone); `--no_hf` runs t5lite alone.
  The next GPU session times a lever against the gpu suite's targets this way."""
  out, md = tmp_path / "g.json", tmp_path / "g.md"
  r = run_cli(["scripts/benchmark_suite.py", "--suite=cpu", "--cases=decoder/tiny", "--steps=1",
               "--no_hf", "--gin.LossConfig.head_chunks=4", f"--json={out}", f"--markdown={md}"])
  assert r.returncode == 0, r.stderr[-3000:]
  result = json.loads(out.read_text())["results"][0]
  assert [row["impl"] for row in result["results"]] == ["t5lite"]
  assert result["loss"]["head_chunks"] == 4
  command = result["command"]
  assert "--gin.LossConfig.head_chunks=4" in command and "--vs-hf" not in command
  table = md.read_text()
  assert "| decoder/tiny LossConfig.head_chunks=4 | 8 x (256+64) |" in table
  assert "vs the run config" not in table and "| - | - | - |" in table
  # A lever suite under --gin: the run config is the cases with the added bindings alone.
  extra = ("ModelConfig.remat_policy='full'",)
  cases = [benchmark_suite.Case("decoder/tiny", "cpu", 8, 256, 64, steps=1, warmup=1,
                                hf_modes="", bindings=extra + lever)
           for lever in benchmark_suite.LEVERS[:2]]
  rows = [{"results": [{"impl": "t5lite", "step_s": step_s, "tokens_per_s": 1.0, "mfu": 0.5,
                        "peak_mem_gb": 0.1}], "command": "c", "hf_error": "", "device": "cpu",
           "platform": "cpu", "peak_tflops": 0.2, "host_malloc": "mimalloc"}
          for step_s in (0.2, 0.1)]
  lines = [line for line in benchmark_tables.markdown(cases, rows).splitlines()
           if line.startswith("| decoder/tiny")]
  assert lines[0].endswith("| 1.000x |") and lines[1].endswith("| 2.000x |")
  with pytest.raises(SystemExit):
    benchmark_suite.main(["--suite=cpu", "--cases=decoder/tiny", "--gin.Nope.field=1",
                          "--steps=1", "--no_hf"])


def test_targets_are_checked_against_the_issue():
  case = benchmark_suite.SUITES["gpu"][2]  # decoder/1b: >= 60% MFU, >= 1.3x compiled, < 40 GB
  result = {"results": [
      {"impl": "t5lite", "mfu": 0.62, "tokens_per_s": 70e3, "peak_mem_gb": 29.0},
      {"impl": "hf-compiled", "mfu": 0.48, "tokens_per_s": 56e3, "peak_mem_gb": 43.0}]}
  got = benchmark_tables.checks(case, result)
  assert got["MFU"][2] and got["peak GB"][2]
  assert got["vs hf-compiled"][1] == pytest.approx(1.25) and not got["vs hf-compiled"][2]
  # Memory is measured in GiB, the target is in GB: 37.5 GiB is 40.27 GB, over 40.
  result["results"][0]["peak_mem_gb"] = 37.5
  assert benchmark_tables.checks(case, result)["peak GB"] == (40.0, pytest.approx(40.27, abs=0.01),
                                                              False)
  del result["results"][1]  # HF failed: no ratio to judge
  assert "vs hf-compiled" not in benchmark_tables.checks(case, result)


def test_cpu_decode_cases_make_the_table(tmp_path):
  pytest.importorskip("transformers")
  md = tmp_path / "d.md"
  r = run_cli(["scripts/benchmark_suite.py", "--suite=cpu-decode", "--cases=decoder/tiny",
               f"--markdown={md}"])
  assert r.returncode == 0, r.stderr[-3000:]
  table = md.read_text()
  for batch in (1, 32):
    assert f"| decoder/tiny | {batch} | 64 + 32 |" in table
    assert f"vs hf-generate-b{batch}" in table
    assert f"--no_train --decode_batches={batch} --decode_tokens=32 --vs-hf" in table


def test_decode_targets_are_checked_against_the_issue():
  case = benchmark_suite.SUITES["gpu-decode"][-1]  # decoder/1b b32: 1.5x HF's static cache
  assert (case.preset, case.batch, case.inputs, case.decode_tokens) == ("decoder/1b", 32, 512, 128)
  result = {"decode": [{"impl": "t5lite-decode-b32", "new_tokens_per_s": 6000.0},
                       {"impl": "hf-generate-b32", "new_tokens_per_s": 1444.0},
                       {"impl": "hf-generate-static-b32", "new_tokens_per_s": 4701.0}]}
  want, got, met = benchmark_tables.checks(case, result)["vs hf-generate-static-b32"]
  assert want == 1.5 and got == pytest.approx(6000 / 4701) and not met
  # Each GPU case asks HF only for the cache its target names.
  assert [(c.batch, c.hf_modes) for c in benchmark_suite.SUITES["gpu-decode"][:2]] == [
      (1, "dynamic"), (32, "static")]
  assert "--hf-generate-caches=static" in case.argv(with_hf=True)


def test_unknown_case_and_the_gpu_suite_without_a_gpu_are_clear_errors():
  r = run_cli(["scripts/benchmark_suite.py", "--suite=gpu", "--cases=t5_1_1/bsae"])
  assert r.returncode == 2 and "t5_1_1/bsae not in the gpu suite" in r.stderr
  if benchmark_suite.jax_backend() != "gpu":
    r = run_cli(["scripts/benchmark_suite.py", "--suite=gpu", "--cases=decoder/1b"])
    assert r.returncode == 2 and "--suite=gpu needs a GPU" in r.stderr


def test_budget_runs_what_fits_and_lists_the_rest(tmp_path):
  """--budget: the cases that fit are measured and written as they finish; one that fails does
  not stop the next; those left when too little time remains are listed, not run."""
  out, md = tmp_path / "b.json", tmp_path / "b.md"
  r = run_cli(["scripts/benchmark_suite.py", "--suite=cpu-levers", "--cases=decoder/tiny",
               "--steps=1", "--budget=1", "--min_case_s=5", f"--json={out}", f"--markdown={md}"])
  assert r.returncode == 0, r.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["results"] == [] and len(result["not_run"]) == 3
  assert all("not run (" in line for line in result["not_run"])
  table = md.read_text()
  assert table.startswith("No case ran.")
  assert "decoder/tiny LossConfig.head_chunks=8: not run" in table
  # A case that cannot finish before the deadline is stopped there and reported as failed.
  case = benchmark_suite.Case("decoder/tiny", "cpu", 2, 8, 8, steps=1, warmup=1, hf_modes="")
  start = time.monotonic()
  with pytest.raises(RuntimeError, match="failed without HF too"):
    benchmark_suite.run_case(case, timeout_s=600, env=benchmark_suite.SUITE_ENV["cpu"],
                             deadline=time.monotonic() + 2)
  assert time.monotonic() - start < 30
  with pytest.raises(RuntimeError, match="no time left"):
    benchmark_suite.run_case(case, timeout_s=600, deadline=time.monotonic() - 1)
  row = {"results": [{"impl": "t5lite", "step_s": 0.1, "tokens_per_s": 1.0, "mfu": 0.5,
                      "peak_mem_gb": 0.1}], "command": "c", "hf_error": "", "device": "cpu",
         "platform": "cpu", "peak_tflops": 0.2, "host_malloc": "mimalloc"}
  table = benchmark_tables.markdown([case], [row], ["decoder/1b: failed: out of memory"])
  assert "| decoder/tiny | 2 x (8+8) |" in table
  assert table.endswith("Not measured:\n- decoder/1b: failed: out of memory\n")
