"""Learning-rate schedules, batch-size ramp-up and optimizer construction."""

import numpy as np
import pytest

from t5lite import optimizers, schedules


def test_warmup_then_cosine():
  s = schedules.make_schedule(schedules.ScheduleConfig(1.0, warmup_steps=10, decay="cosine"), 110)
  np.testing.assert_allclose(float(s(0)), 0.1, rtol=1e-6)
  np.testing.assert_allclose(float(s(9)), 1.0, rtol=1e-6)
  np.testing.assert_allclose(float(s(60)), 0.5, rtol=1e-5)
  np.testing.assert_allclose(float(s(110)), 0.0, atol=1e-6)


def test_linear_and_constant_and_end_fraction():
  lin = schedules.make_schedule(schedules.ScheduleConfig(2.0, 0, "linear", end_fraction=0.5), 100)
  np.testing.assert_allclose([float(lin(0)), float(lin(50)), float(lin(100))], [2.0, 1.5, 1.0],
                             rtol=1e-6)
  const = schedules.make_schedule(schedules.ScheduleConfig(0.3, 5, "constant"), 100)
  np.testing.assert_allclose(float(const(50)), 0.3, rtol=1e-6)


def test_rsqrt_like_t5x():
  s = schedules.make_schedule(schedules.ScheduleConfig(0.01, warmup_steps=100, decay="rsqrt"), 0)
  np.testing.assert_allclose(float(s(10)), 0.01, rtol=1e-6)
  np.testing.assert_allclose(float(s(400)), 0.01 * np.sqrt(100 / 400), rtol=1e-6)


def test_batch_ramp():
  ramp = ((0, 4), (10, 8), (20, 16))
  assert [schedules.batch_size_at(s, 32, ramp) for s in (0, 9, 10, 25)] == [4, 4, 8, 16]
  assert schedules.batch_size_at(5, 32) == 32


def test_bad_names_are_rejected():
  with pytest.raises(ValueError, match="decay"):
    schedules.make_schedule(schedules.ScheduleConfig(decay="exp"), 10)
  with pytest.raises(ValueError, match="optimizer"):
    optimizers.make_optimizer(optimizers.OptimizerConfig(name="sgd9"), 1e-3)
