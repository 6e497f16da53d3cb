"""The gin edge: registers library configs with gin and parses T5X-style command lines.

Only entry points (`t5lite.train`, `t5lite.eval`, scripts) import this module; the library itself
never imports gin. Gin files bind the frozen config dataclasses and the `experiment` function:

    experiment.model = @ModelConfig()
    experiment.train = @TrainConfig()
    TrainConfig.num_steps = %TRAIN_STEPS
"""

import argparse
import dataclasses
import logging
import os
import re
from typing import Sequence

import gin

from t5lite import optimizers, partitioning, schedules
from t5lite.data import pipeline, task_specs
from t5lite.models import config as model_config
from t5lite.models import model as model_lib
from t5lite import trainer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Where `--gin_file` names are looked up: the working directory (at import), then the repository's.
REPO_GIN_PATHS = (REPO_ROOT, os.path.join(REPO_ROOT, "gin_configs"))
GIN_SEARCH_PATHS = (os.getcwd(),) + REPO_GIN_PATHS

# The run's config dataclasses, each bindable by its class name (`ModelConfig.d_model = 512`).
CONFIGS = (model_config.ModelConfig, model_lib.LossConfig, optimizers.OptimizerConfig,
           schedules.ScheduleConfig, trainer.TrainConfig, pipeline.DataConfig,
           partitioning.MeshConfig)
for _cls in CONFIGS:
  gin.external_configurable(_cls, module="t5lite")
for _cls in (task_specs.TextSource, task_specs.JsonlSource, task_specs.TfdsSource,
             task_specs.TaskSpec, task_specs.MixtureSpec):
  gin.external_configurable(_cls, module="t5lite.data")


class ConfigError(ValueError):
  """The gin configuration is invalid (unknown binding, missing value, bad type)."""


@dataclasses.dataclass(frozen=True)
class Experiment:
  """Everything a run is made of, as plain config values."""
  model_dir: str
  model: model_config.ModelConfig
  loss: model_lib.LossConfig
  optimizer: optimizers.OptimizerConfig
  schedule: schedules.ScheduleConfig
  train: trainer.TrainConfig
  data: pipeline.DataConfig
  mesh: partitioning.MeshConfig


@gin.configurable
def experiment(model_dir: str = gin.REQUIRED, model=gin.REQUIRED,
               loss=model_lib.LossConfig(), optimizer=optimizers.OptimizerConfig(),
               schedule=schedules.ScheduleConfig(), train=trainer.TrainConfig(),
               data=pipeline.DataConfig(), mesh=partitioning.MeshConfig()) -> Experiment:
  """Collects the bound configs into an Experiment (gin fills the arguments)."""
  _check_required({"experiment.model_dir": model_dir, "experiment.model": model})
  for cfg in (model, loss, optimizer, schedule, train, data, mesh):
    if dataclasses.is_dataclass(cfg):
      _check_required({f"{type(cfg).__name__}.{f.name}": getattr(cfg, f.name)
                       for f in dataclasses.fields(cfg)})
  return Experiment(os.path.expanduser(str(model_dir)), model, loss, optimizer, schedule, train,
                    data, mesh)


_EXPERIMENT_CONFIGS = (("loss", model_lib.LossConfig), ("optimizer", optimizers.OptimizerConfig),
                       ("schedule", schedules.ScheduleConfig), ("train", trainer.TrainConfig),
                       ("data", pipeline.DataConfig), ("mesh", partitioning.MeshConfig))


def _check_required(values):
  """Raises for values still equal to gin.REQUIRED (a `MACRO = %gin.REQUIRED` never set)."""
  missing = [name for name, value in values.items() if value is gin.REQUIRED]
  if missing:
    raise ConfigError(
        f"a required gin value is missing: {', '.join(missing)} (set it, or the macro bound to "
        f"it such as MODEL_DIR / TRAIN_STEPS, e.g. --gin.MODEL_DIR=/path/run)")


_LITERAL = re.compile(r"""^(['"\[\(\{@%]|-?\d|True$|False$|None$)""")


def parse_binding(arg: str) -> str:
  """`--gin.NAME=VALUE` -> gin binding; bare words become strings (`--gin.MODEL_DIR=/tmp/x`)."""
  name, _, value = arg[len("--gin."):].partition("=")
  if not _LITERAL.match(value):
    value = repr(value)
  return f"{name} = {value}"


def make_parser(description: str) -> argparse.ArgumentParser:
  """An argument parser with the gin flags; entry points add their own flags."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--gin_file", action="append", default=[],
                      help="gin file (repeatable); searched in cwd and the repo's gin_configs/")
  parser.add_argument("--gin_search_path", action="append", default=[])
  return parser


def split_gin_bindings(argv: Sequence[str]):
  """Separates `--gin.NAME=VALUE` arguments from the rest."""
  bindings = [parse_binding(a) for a in argv if a.startswith("--gin.")]
  rest = [a for a in argv if not a.startswith("--gin.")]
  return bindings, rest


def _folder_tolerant(exists):
  """`exists` (a gin file reader's existence check) with a TypeError taken as "not there".

  gin also looks for `include 'runs/pretrain.gin'` inside a Python package `runs`, and its check
  raises TypeError where `runs` is a plain folder on sys.path (a namespace package has no file):
  the `runs/` that the quickstart's MODEL_DIR leaves in the working directory, which `python -m`
  puts on sys.path. Every later run from there failed on its own include instead of going on to
  the search paths, where the file is.
  """
  if getattr(exists, "folder_tolerant", False):
    return exists

  def check(path):
    try:
      return exists(path)
    except TypeError:
      return False
  check.folder_tolerant = True
  return check


def _make_file_readers_folder_tolerant():
  readers = getattr(gin.config, "_FILE_READERS", None)  # gin keeps no public handle on them
  if readers is not None:
    readers[:] = [(reader, _folder_tolerant(exists)) for reader, exists in readers]


def parse_gin(files: Sequence[str], bindings: Sequence[str],
              search_paths: Sequence[str] = ()) -> Experiment:
  """Parses gin files and bindings and builds the Experiment; raises ConfigError on any problem."""
  gin.clear_config()
  _make_file_readers_folder_tolerant()
  for path in list(search_paths) + list(GIN_SEARCH_PATHS):
    gin.add_config_file_search_path(path)
  if not files:
    raise ConfigError("no --gin_file given (try gin_configs/experiments/quickstart.gin)")
  root = logging.getLogger()
  level = root.level
  root.setLevel(logging.CRITICAL)  # gin logs every search path it tries as an error
  try:
    # Every config is built by gin, so a binding such as LossConfig.z_loss takes effect even
    # where no file names the config (a file's own `experiment.loss = ...` comes later and wins).
    gin.parse_config([f"experiment.{field} = @{cls.__name__}()"
                      for field, cls in _EXPERIMENT_CONFIGS])
    rebound = _parse_files(files)
    gin.parse_config(list(bindings))
    exp = experiment()
  except ConfigError:
    raise
  except (ValueError, TypeError, KeyError, RuntimeError, IOError) as e:
    raise ConfigError(_explain(e)) from e
  finally:
    root.setLevel(level)
  for line in rebound:
    logging.warning("gin: %s", line)
  return exp


def _parse_files(files: Sequence[str]):
  """Parses the gin files in order (a later file's binding wins), and says where a file
  rebinds a value that an earlier --gin_file bound to something else: one line each.

  Later files winning is gin's rule (and T5X's), but a run config named before a model preset
  that binds the same parameter is silently undone by it; the lines make that visible. A value
  left `%gin.REQUIRED` by an earlier file is meant to be filled in, and `parse_gin`'s own
  defaults (`experiment.loss = @LossConfig()`, ...) are meant to be replaced: neither is
  reported.
  """
  rebound = []
  bound_by = {}
  before = _bindings()
  for path in files:
    gin.parse_config_file(path)
    after = _bindings()
    for key, value in after.items():
      old = before.get(key)
      if old == value:
        continue
      if key in bound_by and old != _REQUIRED:
        rebound.append(f"{path} rebinds {key} = {value}, bound to {old} by the earlier "
                       f"{bound_by[key]} (the later --gin_file wins)")
      bound_by[key] = path
    before = after
  return rebound


_REQUIRED = "%gin.REQUIRED"


def _bindings():
  """Every value gin holds now, as {"Configurable.param" or "MACRO": repr(value)}.

  Read from gin's registry of bindings, which gin keeps private (empty where a gin version keeps
  it elsewhere: the check in `_parse_files` then reports nothing)."""
  registry = getattr(gin.config, "_CONFIG", None)
  if not isinstance(registry, dict):
    return {}
  values = {}
  for (scope, selector), params in registry.items():
    for name, value in params.items():
      if selector == "gin.macro":
        key = scope
      else:
        key = f"{scope + '/' if scope else ''}{selector.rsplit('.', 1)[-1]}.{name}"
      values[key] = repr(value)
  return values


def _explain(e: Exception) -> str:
  text = str(e).strip()
  if "Required bindings" in text or "gin.REQUIRED" in text:
    return f"a required gin value is missing: {text}"
  return f"{type(e).__name__}: {text}"


def write_config(model_dir: str, name: str = "config.gin"):
  """Saves the gin config text next to the run (process 0 only)."""
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_index() == 0:
    with open(os.path.join(model_dir, name), "w", encoding="utf-8") as f:
      f.write(gin.config_str())


def write_operative_config(model_dir: str):
  """Saves the operative config (the values the run actually used)."""
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_index() == 0:
    with open(os.path.join(model_dir, "operative_config.gin"), "w", encoding="utf-8") as f:
      f.write(gin.operative_config_str())


def prepare_model_dir(model_dir: str) -> str:
  """Creates MODEL_DIR; refuses a path that exists as a file."""
  if not model_dir:
    raise ConfigError("MODEL_DIR is empty")
  if os.path.exists(model_dir) and not os.path.isdir(model_dir):
    raise ConfigError(f"MODEL_DIR {model_dir} exists and is a file, not a directory; "
                      f"choose another --gin.MODEL_DIR")
  os.makedirs(model_dir, exist_ok=True)
  return model_dir
