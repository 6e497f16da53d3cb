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
