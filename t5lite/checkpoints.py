"""Orbax checkpoints: train state + data position + model config, with safe recovery.

Each step directory holds three items: `state` (parameters, optimizer state, counters), `data`
(the stream cursor, so a resumed run reads exactly the batches an uninterrupted one would) and
`config` (the model config, checked before restoring). Saves are asynchronous and atomic (orbax
writes to a temporary directory and renames). A latest step that fails to restore is moved aside
(never deleted, by the first process while the others wait) and the previous one is used, with a
loud warning.
"""

import json
import logging
import os
import time
from typing import Any, Dict, Optional, Tuple

import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from t5lite.models.config import ModelConfig

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
  """A checkpoint cannot be used (incompatible, or every step is unreadable)."""


def abstract_with_shardings(tree, shardings):
  """ShapeDtypeStructs carrying the target shardings, for restoring straight onto a mesh."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


class Checkpointer:
  """Saves and restores training checkpoints in `directory`.

  Args:
    directory: the run's checkpoint directory (MODEL_DIR/checkpoints).
    keep: how many recent checkpoints to keep (None keeps all).
    async_save: write in a background thread while training continues.
  """

  def __init__(self, directory: str, keep: Optional[int] = 3, async_save: bool = True):
    if os.path.exists(directory) and not os.path.isdir(directory):
      raise CheckpointError(f"checkpoint path {directory} exists and is not a directory")
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data", "config"))

  def steps(self):
    """Saved steps, oldest first."""
    return sorted(self.manager.all_steps())

  def latest_step(self) -> Optional[int]:
    """Newest saved step, or None."""
    return self.manager.latest_step()

  def save(self, step: int, state, data: Dict[str, Any], model_cfg: ModelConfig) -> bool:
    """Starts saving `state` and the data position at `step` (asynchronously)."""
    if step in self.manager.all_steps():
      return False
    config = {"model_config": json.loads(model_cfg.to_json()), "saved_at": time.time()}
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data),
        config=ocp.args.JsonSave(config)), force=True)

  def wait(self):
    """Blocks until pending asynchronous saves are committed."""
    self.manager.wait_until_finished()

  def stored_config(self, step: int) -> ModelConfig:
    """The model config recorded with `step`."""
    restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return ModelConfig.from_json(json.dumps(restored["config"]["model_config"]))

  def check_compatible(self, step: int, model_cfg: ModelConfig):
    """Raises CheckpointError when the stored model differs in a shape-changing field."""
    stored = self.stored_config(step)
    diff = stored.shape_differences(model_cfg)
    if diff:
      lines = ", ".join(f"{k}: checkpoint={a!r} config={b!r}" for k, (a, b) in diff.items())
      raise CheckpointError(
          f"checkpoint {self.directory} step {step} was saved by an incompatible model "
          f"({lines}). Use a new MODEL_DIR, or restore parameters only from a compatible one.")

  def restore_latest(self, abstract_state, model_cfg: ModelConfig
                     ) -> Optional[Tuple[int, Any, Dict[str, Any]]]:
    """(step, state, data) of the newest readable checkpoint, or None when there is none.

    An unreadable step is renamed to `<step>.corrupt-<time>` and the previous step is tried, so
    nothing is deleted and a later save of the same step number does not collide.
    """
    for step in reversed(self.steps()):
      try:
        self.check_compatible(step, model_cfg)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return step, restored["state"], dict(restored["data"])
      except CheckpointError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        moved = self._quarantine(step)
        msg = (f"checkpoint step {step} in {self.directory} could not be restored "
               f"({type(e).__name__}: {str(e)[:300]}); moved it to {moved} and falling back "
               f"to the previous checkpoint")
        log.error(msg)
        print(f"WARNING: {msg}", flush=True)
    return None

  def _quarantine(self, step: int) -> str:
    src = os.path.join(self.directory, str(step))
    stamp = int(time.time())
    if jax.process_index() == 0 and os.path.exists(src):
      os.replace(src, f"{src}.corrupt-{stamp}")
    if jax.process_count() > 1:
      # The first process's name for it, which the others receive only once it has moved the
      # step aside: a process that listed the steps before that would later skip saving this step
      # number while the others save it.
      stamp = int(multihost_utils.broadcast_one_to_all(np.int64(stamp)))
    self.manager.reload()
    return f"{src}.corrupt-{stamp}"

  def close(self):
    """Waits for pending saves and releases the manager."""
    self.manager.wait_until_finished()
    self.manager.close()


def restore_params(directory: str, abstract_params, step: Optional[int] = None):
  """Parameters only, from another run's checkpoint (finetuning); ignores its optimizer state.

  Args:
    directory: a checkpoint directory (containing step subdirectories).
    abstract_params: the target parameter tree (ShapeDtypeStructs, optionally with shardings).
    step: which step; default the latest.
  """
  if not os.path.isdir(directory):
    raise CheckpointError(f"no checkpoint directory at {directory}")
  manager = ocp.CheckpointManager(os.path.abspath(directory),
                                  options=ocp.CheckpointManagerOptions(
                                      read_only=True, save_interval_steps=0, create=False),
                                  item_names=("state", "data", "config"))
  step = manager.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f"no checkpoint steps in {directory}")
  target = {"params": abstract_params}
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True)))
  manager.close()
  return restored["state"]["params"]


def latest_step(directory: str) -> Optional[int]:
  """Newest step saved in a checkpoint directory, or None."""
  if not os.path.isdir(directory):
    return None
  steps = [int(n) for n in os.listdir(directory) if n.isdigit()]
  return max(steps) if steps else None
