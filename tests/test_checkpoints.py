"""Checkpointer: round trip with data position, corrupt-latest fallback, no readable step,
incompatible configs, a save that cannot be written."""

import os
import resource

import jax
import numpy as np
import optax
import pytest

from conftest import tiny_config
from t5lite import checkpoints, optimizers, trainer
from t5lite.models.model import Model


def _state(cfg, seed=0):
  return trainer.init_state(Model(cfg), optax.adamw(1e-3), jax.random.key(seed))


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def _corrupt(step_dir, under="state"):
  for root, _, files in os.walk(os.path.join(step_dir, under)):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"\x00garbage" * 7)


def test_round_trip_with_data_position(tmp_path):
  cfg = tiny_config()
  state = _state(cfg)
  ckpt = checkpoints.Checkpointer(str(tmp_path / "ckpt"), keep=2)
  ckpt.save(5, state, {"cursor": 123, "step": 5}, cfg)
  ckpt.wait()
  step, restored, data = ckpt.restore_latest(_abstract(state), cfg)
  assert step == 5 and data["cursor"] == 123
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  ckpt.close()


def test_round_trip_of_bfloat16_params_with_float32_masters(tmp_path):
  """The master-weights optimizer state (float32 masters beside bfloat16 parameters) comes back
  with its structure and dtypes."""
  cfg = tiny_config(param_dtype="bfloat16")
  opt = optimizers.make_optimizer(optimizers.OptimizerConfig(master_weights=True), 1e-3)
  state = trainer.init_state(Model(cfg), opt, jax.random.key(0))
  ckpt = checkpoints.Checkpointer(str(tmp_path / "ckpt"), keep=1)
  ckpt.save(1, state, {"cursor": 0, "step": 1}, cfg)
  ckpt.wait()
  _, restored, _ = ckpt.restore_latest(_abstract(state), cfg)
  assert isinstance(restored["opt_state"], optimizers.MasterWeightsState)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)
  ckpt.close()


def test_keep_n(tmp_path):
  cfg = tiny_config()
  state = _state(cfg)
  ckpt = checkpoints.Checkpointer(str(tmp_path / "ckpt"), keep=2)
  for s in (1, 2, 3):
    ckpt.save(s, state, {"cursor": s}, cfg)
  ckpt.wait()
  assert ckpt.steps() == [2, 3]
  ckpt.close()


def test_corrupt_latest_falls_back_and_keeps_files(tmp_path, capsys):
  cfg = tiny_config()
  old, new = _state(cfg, 0), _state(cfg, 1)
  ckpt = checkpoints.Checkpointer(str(tmp_path / "ckpt"), keep=3)
  ckpt.save(1, old, {"cursor": 10}, cfg)
  ckpt.save(2, new, {"cursor": 20}, cfg)
  ckpt.close()
  _corrupt(str(tmp_path / "ckpt" / "2"))
  ckpt = checkpoints.Checkpointer(str(tmp_path / "ckpt"), keep=3)
  step, restored, data = ckpt.restore_latest(_abstract(old), cfg)
  assert step == 1 and data["cursor"] == 10
  jax.tree.map(np.testing.assert_array_equal, restored, old)
  assert "could not be restored" in capsys.readouterr().out
  moved = [n for n in os.listdir(tmp_path / "ckpt") if n.startswith("2.corrupt-")]
  assert moved, "the corrupt checkpoint must be kept, renamed"
  # Saving step 2 again works (no collision with the quarantined directory).
  ckpt.save(2, old, {"cursor": 20}, cfg)
  ckpt.close()


def test_incompatible_model_is_refused(tmp_path):
  cfg = tiny_config()
  ckpt = checkpoints.Checkpointer(str(tmp_path / "ckpt"))
  ckpt.save(1, _state(cfg), {"cursor": 0}, cfg)
  ckpt.wait()
  other = tiny_config(d_model=48)
  with pytest.raises(checkpoints.CheckpointError, match="d_model"):
    ckpt.restore_latest(_abstract(_state(other)), other)
  assert ckpt.steps() == [1]
  ckpt.close()


def test_restore_params_only(tmp_path):
  cfg = tiny_config()
  state = _state(cfg)
  ckpt = checkpoints.Checkpointer(str(tmp_path / "ckpt"))
  ckpt.save(3, state, {"cursor": 0}, cfg)
  ckpt.close()
  params = checkpoints.restore_params(str(tmp_path / "ckpt"), _abstract(state["params"]))
  jax.tree.map(np.testing.assert_array_equal, params, state["params"])
  with pytest.raises(checkpoints.CheckpointError):
    checkpoints.restore_params(str(tmp_path / "missing"), _abstract(state["params"]))


def test_restore_params_errors_name_the_step_and_cause(tmp_path):
  """A step it lacks, parameters of other shapes, a corrupt step: each a CheckpointError (the CLI's
  exit code 3), not a traceback from orbax."""
  cfg = tiny_config()
  state = _state(cfg)
  ckpt = checkpoints.Checkpointer(str(tmp_path / "ckpt"))
  ckpt.save(3, state, {"cursor": 0}, cfg)
  ckpt.close()
  directory = str(tmp_path / "ckpt")
  with pytest.raises(checkpoints.CheckpointError, match=r"no step 4 .* holds steps \[3\]"):
    checkpoints.restore_params(directory, _abstract(state["params"]), step=4)
  other = _state(tiny_config(d_model=48))  # orbax alone returns the checkpoint's shapes
  with pytest.raises(checkpoints.CheckpointError,
                     match=r"other shapes .*: checkpoint \(2, 32, 4, 8\), model \(2, 48, 4, 8\)"):
    checkpoints.restore_params(directory, _abstract(other["params"]))
  _corrupt(os.path.join(directory, "3"))
  with pytest.raises(checkpoints.CheckpointError, match="could not be restored from .* step 3"):
    checkpoints.restore_params(directory, _abstract(state["params"]))


def test_model_dir_that_is_a_file(tmp_path):
  path = tmp_path / "file"
  path.write_text("x")
  with pytest.raises(checkpoints.CheckpointError, match="not a directory"):
    checkpoints.Checkpointer(str(path))


def test_every_step_unreadable_stops_and_moves_nothing(tmp_path):
  """No readable step: an error naming each step's cause, and both steps left where they are (a
  common cause can be mended and the run resumed), rather than training from step 0."""
  cfg = tiny_config()
  state = _state(cfg)
  ckpt = checkpoints.Checkpointer(str(tmp_path / "ckpt"), keep=3)
  ckpt.save(1, state, {"cursor": 10}, cfg)
  ckpt.save(2, state, {"cursor": 20}, cfg)
  ckpt.close()
  for step in ("1", "2"):
    _corrupt(str(tmp_path / "ckpt" / step))
  ckpt = checkpoints.Checkpointer(str(tmp_path / "ckpt"), keep=3)
  with pytest.raises(checkpoints.CheckpointError, match=r"no checkpoint .*\(step 2: .*; step 1: "):
    ckpt.restore_latest(_abstract(state), cfg)
  assert sorted(os.listdir(tmp_path / "ckpt")) == ["1", "2"]
  assert ckpt.steps() == [1, 2]
  ckpt.close()


def test_failed_save_raises_and_keeps_the_older_step(tmp_path):
  """A save whose files cannot be written (over RLIMIT_FSIZE here, as on a full disk) raises
  CheckpointSaveError naming the step, the operating system's reason and the newest saved step;
  that step stays readable, and the same step saves once the cause is gone."""
  cfg = tiny_config()
  state = _state(cfg)
  directory = str(tmp_path / "ckpt")
  ckpt = checkpoints.Checkpointer(directory, keep=3)
  ckpt.save(1, state, {"cursor": 10}, cfg)
  ckpt.wait()
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  resource.setrlimit(resource.RLIMIT_FSIZE, (2000, hard))
  try:
    ckpt.save(2, state, {"cursor": 20}, cfg)
    with pytest.raises(checkpoints.CheckpointSaveError,
                       match=r"saving step 2 .*File too large.*step 1 is the newest saved"):
      ckpt.wait()
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
  assert ckpt.steps() == [1]
  ckpt.check_saved(block=True)  # settled: the failure is reported once
  ckpt.save(2, state, {"cursor": 20}, cfg)
  ckpt.close()
  fresh = checkpoints.Checkpointer(directory, keep=3)
  step, restored, data = fresh.restore_latest(_abstract(state), cfg)
  assert step == 2 and data["cursor"] == 20
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  fresh.close()
