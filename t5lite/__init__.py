"""t5lite: T5 and decoder-only language models in JAX/Flax, trained end to end.

The public API, re-exported here so notebooks need one import:

    import t5lite
    model = t5lite.Model(t5lite.ModelConfig(arch="decoder_only", ...))

Importing t5lite never imports TensorFlow or gin, and imports JAX only when one of these names is
first used (PEP 562): the entry points restart themselves under a tuned host allocator
(`t5lite.host_malloc`) before they load JAX, so that restart costs no imports.
"""

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "t5lite.checkpoints": ("Checkpointer", "CheckpointError", "restore_params"),
    "t5lite.losses": ("cross_entropy_with_logits",),
    "t5lite.models.config": ("ModelConfig",),
    "t5lite.models.model": ("LossConfig", "Model", "build_model"),
    "t5lite.optimizers": ("OptimizerConfig", "make_optimizer"),
    "t5lite.partitioning": ("MeshConfig", "make_mesh"),
    "t5lite.schedules": ("ScheduleConfig", "make_schedule"),
    "t5lite.trainer": ("TrainConfig", "eval_step", "init_state", "train_step"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
  """Imports a re-exported name's module (or a submodule, `t5lite.trainer`) on first use."""
  if name in _MODULE_OF:
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
  else:
    try:
      value = importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
      if e.name != f"{__name__}.{name}":
        raise
      raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
  globals()[name] = value
  return value


def __dir__():
  """The module's names, the re-exported ones included before their first use."""
  return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what type checkers and IDEs see
  from t5lite.checkpoints import Checkpointer, CheckpointError, restore_params  # noqa: F401
  from t5lite.losses import cross_entropy_with_logits  # noqa: F401
  from t5lite.models.config import ModelConfig  # noqa: F401
  from t5lite.models.model import LossConfig, Model, build_model  # noqa: F401
  from t5lite.optimizers import OptimizerConfig, make_optimizer  # noqa: F401
  from t5lite.partitioning import MeshConfig, make_mesh  # noqa: F401
  from t5lite.schedules import ScheduleConfig, make_schedule  # noqa: F401
  from t5lite.trainer import TrainConfig, eval_step, init_state, train_step  # noqa: F401
