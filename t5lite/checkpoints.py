"""Orbax checkpoints: train state + data position + model config, with safe recovery.

Each step directory holds three items: `state` (parameters, optimizer state, counters), `data`
(the stream cursor, so a resumed run reads exactly the batches an uninterrupted one would) and
`config` (the model config, checked before restoring). Saves are asynchronous and atomic (orbax
writes to a temporary directory and renames). Steps newer than the newest readable one are moved
aside (never deleted, by the first process while the others wait), with a loud warning; when none
is readable the run stops with the reasons and moves nothing. A save that fails on any process
stops every process at the same step with `CheckpointSaveError`, the older steps untouched.
"""

import json
import logging
import os
import threading
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


class CheckpointSaveError(CheckpointError):
  """A checkpoint could not be written, on this process or another; older steps are intact."""


def abstract_with_shardings(tree, shardings):
  """ShapeDtypeStructs carrying the target shardings, for restoring straight onto a mesh."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


class Checkpointer:
  """Saves and restores training checkpoints in `directory`.

  A save's outcome is settled by every process together (`check_saved`): each reports whether
  its own writes finished or failed, so a write that fails on one process stops all of them at
  the same step, rather than leaving the others waiting for it in orbax's barriers.

  Args:
    directory: the run's checkpoint directory (MODEL_DIR/checkpoints).
    keep: how many recent checkpoints to keep (None keeps all).
    async_save: write in a background thread while training continues.
    save_timeout_s: how long one process's writes of one save may take before the save counts
      as failed.
  """

  def __init__(self, directory: str, keep: Optional[int] = 3, async_save: bool = True,
               save_timeout_s: int = 1200):
    if os.path.exists(directory) and not os.path.isdir(directory):
      raise CheckpointError(f"checkpoint path {directory} exists and is not a directory")
    self.directory = os.path.abspath(directory)
    self._timeout_s = save_timeout_s
    self._writes = _Writes()
    self._pending = None  # (step, when it started) of the save not yet settled
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    state = _WatchedStandardHandler(self._writes)
    registry.add("state", ocp.args.StandardSave, state)
    registry.add("state", ocp.args.StandardRestore, state)
    for item in ("data", "config"):
      json_handler = _WatchedJsonHandler(self._writes)
      registry.add(item, ocp.args.JsonSave, json_handler)
      registry.add(item, ocp.args.JsonRestore, json_handler)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
        async_options=ocp.options.AsyncOptions(timeout_secs=save_timeout_s))
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         handler_registry=registry)

  def steps(self):
    """Saved steps, oldest first."""
    return sorted(self.manager.all_steps())

  def latest_step(self) -> Optional[int]:
    """Newest saved step, or None."""
    return self.manager.latest_step()

  def save(self, step: int, state, data: Dict[str, Any], model_cfg: ModelConfig) -> bool:
    """Starts saving `state` and the data position at `step` (asynchronously), once the previous
    save has settled; raises CheckpointSaveError (on every process) if that one failed."""
    self.wait()
    if step in self.manager.all_steps():
      return False
    config = {"model_config": json.loads(model_cfg.to_json()), "saved_at": time.time()}
    self._writes.start()
    self._pending = (step, time.monotonic())
    try:
      return self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data),
          config=ocp.args.JsonSave(config)), force=True)
    except Exception as e:  # pylint: disable=broad-except
      self._writes.fail(e)  # settled with the other processes by the next check
      return False

  def check_saved(self, block: bool = False):
    """Settles the save in flight once every process's writes of it have finished.

    Raises CheckpointSaveError on every process when any process's writes failed (or took longer
    than `save_timeout_s`). Without `block` it returns at once while some are still writing, so
    the trainer can call it after every step; with several processes every process must call it
    equally often (a collective while a save is in flight).
    """
    while self._pending is not None:
      step, started = self._pending
      error, written = self._writes.outcome()
      if not written and error is None and time.monotonic() - started > self._timeout_s:
        error = TimeoutError(f"this process's writes took over {self._timeout_s} s")
      code = _FAILED if error is not None else _WRITTEN if written else _WRITING
      codes = _allgather(code)
      if _FAILED in codes:
        self._pending = None
        if jax.process_count() == 1:
          self._forget_failed_save()
        raise self._save_error(step, error, [i for i, c in enumerate(codes) if c == _FAILED])
      if all(c == _WRITTEN for c in codes):
        # Every process reached orbax's closing barrier or is about to: waiting cannot hang.
        try:
          self.manager.wait_until_finished()
        except Exception as e:  # pylint: disable=broad-except
          error = e
        self._pending = None
        failed = _processes_that_failed(error)
        if failed:
          raise self._save_error(step, error, sorted(failed))
        return
      if not block:
        return
      time.sleep(0.05)

  def _forget_failed_save(self):
    # Orbax raises the failure once more from its next wait and only then drops the step from
    # its list; after that the same step can be saved again. With several processes this wait
    # could meet a barrier that a failed process never reaches, so the job ends instead.
    try:
      self.manager.wait_until_finished()
    except Exception:  # pylint: disable=broad-except
      pass
    self.manager.reload()

  def wait(self):
    """Blocks until the save in flight is committed (CheckpointSaveError if it failed)."""
    self.check_saved(block=True)

  def _save_error(self, step: int, error: Optional[BaseException], failed) -> CheckpointSaveError:
    where = f" on process(es) {failed}" if jax.process_count() > 1 else ""
    cause = f"{where}; see their logs" if error is None else f"{where}: {_short(error)}"
    older = [s for s in self.steps() if s < step]
    kept = (f"step {older[-1]} is the newest saved checkpoint" if older else
            "no older step is saved")
    msg = (f"saving step {step} to {self.directory} failed{cause}; {kept}. Mend the cause "
           f"(disk space, permissions) and rerun the same command to resume.")
    log.error(msg)
    return CheckpointSaveError(msg)

  def stored_config(self, step: int) -> ModelConfig:
    """The model config recorded with `step`."""
    restored = self._read(step, ocp.args.Composite(config=ocp.args.JsonRestore()))
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

    Steps newer than the one restored that could not be read are renamed `<step>.corrupt-<time>`
    (kept, and a later save of the same step number does not collide), with a loud warning. When
    no step can be read, CheckpointError names each one's error and nothing is moved: a cause
    common to all of them (an unreadable directory, an incompatible library) is the likelier one,
    and starting afresh would be the user's choice. With several processes a step counts as read
    only if every process read its part of it, so all of them resume from the same step.
    """
    unreadable = []  # (step, cause), newest first
    for step in reversed(self.steps()):
      error = restored = None  # drops what this process read of a step another could not
      try:
        self.check_compatible(step, model_cfg)
        restored = self._read(step, ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
      except Exception as e:  # pylint: disable=broad-except
        error = e
      failed = _processes_that_failed(error)
      if not failed:
        for bad, cause in unreadable:
          moved = self._quarantine(bad)
          msg = (f"checkpoint step {bad} in {self.directory} could not be restored ({cause}); "
                 f"moved it to {moved} and resuming from step {step}")
          log.error(msg)
          print(f"WARNING: {msg}", flush=True)
        return step, restored["state"], dict(restored["data"])
      if isinstance(error, CheckpointError):
        raise error
      if _INCOMPATIBLE in failed.values():
        raise CheckpointError(f"checkpoint {self.directory} step {step} is incompatible with this "
                              f"model on process(es) {sorted(failed)}; see their logs")
      unreadable.append((step, _cause(error, failed)))
    if unreadable:
      causes = "; ".join(f"step {step}: {cause}" for step, cause in unreadable)
      raise CheckpointError(
          f"no checkpoint in {self.directory} could be restored ({causes}). Nothing was moved. "
          f"Mend the cause, or move the directory aside (or use a new MODEL_DIR) to start afresh.")
    return None

  def _read(self, step: int, args):
    return _read_step(os.path.join(self.directory, str(step)), args)

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
    """Waits for the save in flight (CheckpointSaveError if it failed) and releases the manager."""
    self.wait()
    self.manager.close()


def _read_step(step_dir: str, args):
  """Restores the items named in `args` from one step directory, on this process alone.

  Orbax's own restore ends in a barrier across processes, which a process that failed to read
  never reaches, so the others would wait there forever; callers ask every process afterwards
  whether it read its part (`_processes_that_failed`).
  """
  only_me = _this_process_only()
  handler = ocp.CompositeCheckpointHandler(
      composite_options=ocp.CompositeOptions(multiprocessing_options=only_me))
  with ocp.Checkpointer(handler, multiprocessing_options=only_me) as reader:
    return reader.restore(step_dir, args=args)


def _this_process_only() -> ocp.options.MultiprocessingOptions:
  me = jax.process_index()
  return ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})


_READ, _UNREADABLE, _INCOMPATIBLE = 0, 1, 2
_WRITING, _WRITTEN, _FAILED = 0, 1, 2


def _allgather(code: int):
  """Every process's `code`, by process index."""
  if jax.process_count() == 1:
    return [code]
  return multihost_utils.process_allgather(np.int32(code)).reshape(-1).tolist()


def _processes_that_failed(error: Optional[BaseException]) -> Dict[int, int]:
  """{process index: _UNREADABLE or _INCOMPATIBLE} over all processes, given this one's error."""
  code = (_READ if error is None else
          _INCOMPATIBLE if isinstance(error, CheckpointError) else _UNREADABLE)
  return {i: c for i, c in enumerate(_allgather(code)) if c != _READ}


class _Writes:
  """This process's writes of the save in flight, as orbax's background thread awaits them.

  Orbax reports a failed write only on the process that made it, and only once every process
  has passed a barrier that the failed process never reaches; this records each write's outcome
  as it happens, for `Checkpointer.check_saved` to settle across processes.
  """

  def __init__(self):
    self._lock = threading.Lock()
    self._open, self._error = set(), None

  def start(self):
    with self._lock:
      self._open, self._error = set(), None

  def track(self, futures):
    """Wraps a handler's commit futures so that their outcomes are recorded here."""
    watched = [_WatchedFuture(f, self) for f in futures or []]
    with self._lock:
      self._open.update(id(f) for f in watched)
    return watched

  def settle(self, watched, error: Optional[BaseException]):
    with self._lock:
      self._open.discard(id(watched))
      if error is not None and self._error is None:
        self._error = error

  def fail(self, error: BaseException):
    with self._lock:
      self._error = self._error or error

  def outcome(self) -> Tuple[Optional[BaseException], bool]:
    """(the first error, whether every write finished without one), read together."""
    with self._lock:
      return self._error, not self._open and self._error is None


class _WatchedFuture:
  """An orbax commit future whose outcome is reported to `_Writes` when it is awaited."""

  def __init__(self, inner, writes: _Writes):
    self._inner, self._writes = inner, writes

  def result(self, timeout: Optional[float] = None):
    try:
      value = self._inner.result(timeout=timeout)
    except BaseException as e:
      self._writes.settle(self, e)
      raise
    self._writes.settle(self, None)
    return value

  def __getattr__(self, name):
    return getattr(self._inner, name)


class _WatchedWrites:
  """Handler mixin: hands every save's commit futures to a `_Writes`."""

  def __init__(self, writes: _Writes, **kwargs):
    super().__init__(**kwargs)
    self._writes = writes

  async def async_save(self, *args, **kwargs):
    return self._writes.track(await super().async_save(*args, **kwargs))


class _WatchedStandardHandler(_WatchedWrites, ocp.StandardCheckpointHandler):
  """Orbax's standard (array tree) handler, its writes watched."""


class _WatchedJsonHandler(_WatchedWrites, ocp.JsonCheckpointHandler):
  """Orbax's JSON handler, its writes watched."""


def _cause(error: Optional[BaseException], failed: Dict[int, int]) -> str:
  if error is None:
    what = "refused" if _INCOMPATIBLE in failed.values() else "unreadable"
    return f"{what} on process(es) {sorted(failed)}; see their logs"
  return _short(error)


def _short(error: BaseException) -> str:
  """The error's type and message on one line, without tensorstore's spec; a long message keeps
  its start and its end (where the operating system's reason is)."""
  text = " ".join(str(error).split(" [tensorstore_spec=")[0].split())
  if len(text) > 400:
    text = f"{text[:150]} ... {text[-240:]}"
  return f"{type(error).__name__}: {text}"


def restore_params(directory: str, abstract_params, step: Optional[int] = None):
  """Parameters only, from another run's checkpoint (finetuning); ignores its optimizer state.

  Raises CheckpointError, on every process alike, when the directory has no such step or any
  process cannot read its part of it (corrupt, or saved by a model of other shapes).

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
  steps = sorted(manager.all_steps())
  manager.close()
  if not steps:
    raise CheckpointError(f"no checkpoint steps in {directory}")
  step = steps[-1] if step is None else step
  if step not in steps:
    raise CheckpointError(f"no step {step} in {directory}; it holds steps {steps}")
  target = {"params": abstract_params}
  args = ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      partial_restore=True))
  step_dir = os.path.join(os.path.abspath(directory), str(step))
  error = restored = None
  try:
    _check_param_shapes(step_dir, abstract_params)
    restored = _read_step(step_dir, args)
  except Exception as e:  # pylint: disable=broad-except
    error = e
  failed = _processes_that_failed(error)
  if isinstance(error, CheckpointError):
    raise error
  if failed:
    raise CheckpointError(f"parameters could not be restored from {directory} step {step} "
                          f"({_cause(error, failed)})") from error
  return restored["state"]["params"]


def _check_param_shapes(step_dir: str, abstract_params):
  # Orbax itself returns the stored shapes when the target has no shardings (without a word)
  # and raises a ValueError from deep in its reader when it has them.
  only_me = _this_process_only()
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(multiprocessing_options=only_me),
                        multiprocessing_options=only_me) as reader:
    stored = reader.metadata(os.path.join(step_dir, "state")).item_metadata["params"]
  shapes = {jax.tree_util.keystr(k): tuple(v.shape)
            for k, v in jax.tree_util.tree_leaves_with_path(stored)}
  wrong = []
  for key, leaf in jax.tree_util.tree_leaves_with_path(abstract_params):
    name = jax.tree_util.keystr(key)
    if shapes.get(name) != tuple(leaf.shape):
      wrong.append(f"{name}: checkpoint {shapes.get(name, 'none')}, model {tuple(leaf.shape)}")
  if wrong:
    raise CheckpointError(f"{step_dir} holds parameters of other shapes than this model's "
                          f"({len(wrong)} of them: {'; '.join(wrong[:4])})")


def latest_step(directory: str) -> Optional[int]:
  """Newest step saved in a checkpoint directory, or None."""
  if not os.path.isdir(directory):
    return None
  steps = [int(n) for n in os.listdir(directory) if n.isdigit()]
  return max(steps) if steps else None
