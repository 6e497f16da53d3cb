"""Alpa stage construction and the GPipe pipeline (4 fake devices: equals sequential)."""

import json

import pytest

from conftest import run_cli
from t5lite import pipeline_parallel as pp


def test_stage_boundaries_minimize_the_slowest_stage():
  assert pp.stage_boundaries([1, 1, 1, 1], 2) == [(0, 2), (2, 4)]
  assert pp.stage_boundaries([4, 1, 1, 1, 1], 2) == [(0, 1), (1, 5)]
  bounds = pp.stage_boundaries([1, 1, 1, 3, 1, 1, 2], 4)
  assert max(sum([1, 1, 1, 3, 1, 1, 2][s:e]) for s, e in bounds) == 3
  assert bounds[0][0] == 0 and bounds[-1][1] == 7
  assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
  with pytest.raises(ValueError):
    pp.stage_boundaries([1, 2], 3)


@pytest.mark.slow
def test_gpipe_equals_sequential_outputs_and_gradients():
  r = run_cli(["tests/pipeline_check.py"])
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert out["out_err"] < 1e-5
  assert out["grad_err"] < 1e-5 * max(1.0, out["grad_scale"])


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["decoder_only", "encoder_decoder"])
def test_pipeline_stage_axis_in_models_matches_single_device(arch):
  """Layer stacks under a mesh with a `stage` axis (alone, with data and with tensor
  parallelism) give the single-device loss and gradients; each device holds its stage's
  layers, and activations move between stages by collective-permute."""
  r = run_cli(["tests/pipeline_train_check.py", arch])
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  for name, res in out.items():
    assert abs(res["loss"] - res["ref_loss"]) < 1e-5 * max(1.0, abs(res["ref_loss"])), name
    assert res["max_grad_err"] < 1e-5, (name, res["max_grad_err"])
    assert res["collective_permutes"] > 0, name
  assert out["stage2_data4"]["layers_per_device"] == 2
  assert out["stage4_data2"]["layers_per_device"] == 1


@pytest.mark.slow
def test_train_cli_with_pipeline_stages(tmp_path):
  """`t5lite.train` on 8 devices with 2 pipeline stages x 4 data shards follows the
  data-parallel run's losses step for step, and resumes on a mesh without stages."""
  from test_train import QUICK, _metrics
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  runs = {}
  for name, extra in (("dp", []), ("pp", ["--gin_file=gin_configs/partitioning/pipeline.gin",
                                           "--gin.STAGES=2"])):
    d = str(tmp_path / name)
    r = run_cli(QUICK + extra + [f"--gin.MODEL_DIR={d}", "--gin.TRAIN_STEPS=6",
                                 "--gin.CHECKPOINT_PERIOD=6"], env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    runs[name] = [m["loss"] for m in _metrics(d) if "loss" in m]
  assert len(runs["pp"]) == 6
  np_ = pytest.importorskip("numpy")
  np_.testing.assert_allclose(runs["pp"], runs["dp"], rtol=2e-4)
  d = str(tmp_path / "pp")
  r = run_cli(QUICK + [f"--gin.MODEL_DIR={d}", "--gin.TRAIN_STEPS=8",
                       "--gin.CHECKPOINT_PERIOD=8"], env=env)
  assert r.returncode == 0 and "resumed" in r.stderr + r.stdout, r.stderr[-3000:]
