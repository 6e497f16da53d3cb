"""Every shipped gin file parses and builds its model (shrunk to tiny size); presets have the
documented shapes."""

import glob
import os

import jax
import numpy as np
import pytest

from conftest import REPO
from t5lite import gin_setup
from t5lite.models.model import Model

GIN_DIR = os.path.join(REPO, "gin_configs")
ALL = sorted(os.path.relpath(p, GIN_DIR) for p in glob.glob(f"{GIN_DIR}/**/*.gin", recursive=True))
TINY = ["ModelConfig.d_model = 32", "ModelConfig.d_ff = 64", "ModelConfig.num_heads = 4",
        "ModelConfig.num_kv_heads = 0", "ModelConfig.head_dim = 8", "ModelConfig.vocab_size = 128",
        "MODEL_DIR = '/tmp/unused'", "TRAIN_STEPS = 1", "INIT_FROM = '/tmp/unused'"]


def _files_for(name):
  """The gin files a user would combine with `name` (a model needs a run, and vice versa)."""
  if name.startswith("experiments/"):
    return [name]
  if name.startswith("models/") and name != "models/moe.gin":
    return [name, "runs/pretrain.gin"]
  if name in ("runs/pretrain.gin", "runs/finetune.gin"):
    return ["models/t5_1_1/tiny.gin", name]
  return ["models/t5_1_1/tiny.gin", "runs/pretrain.gin", name]


def test_includes_resolve_from_a_directory_with_runs_and_models_folders(tmp_path, monkeypatch):
  """The quickstart leaves `runs/` in the working directory (MODEL_DIR = "runs/quickstart"), and
  `python -m` puts that directory on sys.path, where gin took `include 'runs/pretrain.gin'` for a
  package `runs` and failed with a TypeError: rerunning the quickstart (to resume) was a
  configuration error. Includes now resolve from the search paths there too."""
  for folder in ("runs/quickstart", "models", "experiments"):
    (tmp_path / folder).mkdir(parents=True)
  monkeypatch.chdir(tmp_path)
  monkeypatch.syspath_prepend(str(tmp_path))
  exp = gin_setup.parse_gin(["gin_configs/experiments/quickstart.gin"], [])
  assert exp.model_dir == "runs/quickstart" and exp.train.num_steps == 300
  exp = gin_setup.parse_gin(["models/t5_1_1/tiny.gin", "runs/pretrain.gin"], TINY)
  assert exp.data.pack


@pytest.mark.parametrize("name", ALL)
def test_gin_file_parses_and_builds(name):
  exp = gin_setup.parse_gin(_files_for(name), TINY + ["ModelConfig.num_decoder_layers = 2",
                                                      "ModelConfig.num_encoder_layers = 2"])
  model = Model(exp.model)
  params = model.init(jax.random.key(0))
  assert jax.tree.leaves(params)


def _num_params(preset):
  exp = gin_setup.parse_gin([preset, "runs/pretrain.gin"],
                            ["MODEL_DIR = '/tmp/unused'", "TRAIN_STEPS = 1"])
  model = Model(exp.model)
  return exp.model, sum(int(np.prod(x.shape)) for x in jax.tree.leaves(model.abstract_params))


def test_preset_shapes_match_the_reference():
  cfg, n = _num_params("models/t5_1_1/large.gin")
  assert (cfg.d_model, cfg.d_ff, cfg.num_encoder_layers, cfg.num_heads, cfg.vocab_size) == (
      1024, 2816, 24, 16, 32128)
  assert 0.77e9 < n < 0.80e9  # ~783M
  cfg, n = _num_params("models/chatyuan_large.gin")
  assert cfg.vocab_size == 32128 and not cfg.tie_embeddings and 0.77e9 < n < 0.80e9
  cfg, n = _num_params("models/decoder/1b.gin")
  assert (cfg.d_model, cfg.d_ff, cfg.num_decoder_layers, cfg.num_heads, cfg.kv_heads) == (
      2048, 5632, 22, 32, 4)
  assert 1.05e9 < n < 1.15e9  # TinyLlama: 1.1B
  _, n = _num_params("models/t5_1_1/base.gin")
  assert 0.24e9 < n < 0.26e9  # T5 v1.1 base: ~248M


def test_bindings_reach_configs_no_file_names():
  """A model preset alone (as scripts/benchmark.py takes it) still honours bindings to the
  other configs: gin builds every config, so none is silently left at its default."""
  exp = gin_setup.parse_gin(["models/decoder/tiny.gin"],
                            ["experiment.model_dir = '/tmp/unused'", "LossConfig.head_chunks = 4",
                             "OptimizerConfig.clip_norm = 0.5", "MeshConfig.tensor = 2"])
  assert exp.loss.head_chunks == 4
  assert exp.optimizer.clip_norm == 0.5
  assert exp.mesh.tensor == 2


@pytest.mark.parametrize("run", ["runs/cpu.gin", "runs/cpu_bf16.gin", "runs/gpu.gin"])
@pytest.mark.parametrize("preset", ["models/t5_1_1/large.gin", "models/decoder/1b.gin"])
def test_run_config_wins_before_or_after_a_preset(run, preset, caplog):
  """Model presets bind the architecture only, so a run config's dtype and scanned layers hold
  in either order (two GPU measurements once ran with scanned layers because runs/gpu.gin came
  first and the preset's `scan_layers = True` undid it), and neither order rebinds anything."""
  unused = ["experiment.model_dir = '/tmp/unused'"]
  after = gin_setup.parse_gin([preset, run], unused)
  before = gin_setup.parse_gin([run, preset], unused)
  assert before.model == after.model
  assert after.model.dtype == ("bfloat16" if run != "runs/cpu.gin" else "float32")
  assert after.model.scan_layers is False
  assert "rebinds" not in caplog.text


def test_a_file_rebinding_an_earlier_files_value_is_reported(tmp_path, caplog):
  """A later --gin_file still wins (gin's and T5X's rule), with a warning naming both files and
  both values; filling in an earlier file's %gin.REQUIRED, replacing parse_gin's default
  configs, rebinding to the same value and command-line bindings are not reported."""
  mine = tmp_path / "mine.gin"
  mine.write_text("ModelConfig.scan_layers = True\nModelConfig.dtype = 'float32'\n"
                  "MODEL_DIR = '/tmp/mine'\nTRAIN_STEPS = 5\n"
                  "experiment.loss = @mine/LossConfig()\nmine/LossConfig.z_loss = 0.5\n")
  exp = gin_setup.parse_gin(["runs/gpu.gin", "runs/pretrain.gin", "models/t5_1_1/tiny.gin",
                             str(mine)], ["ModelConfig.d_model = 64", "BATCH_SIZE = 4"])
  assert exp.model.scan_layers and exp.model.dtype == "float32"
  assert (exp.model_dir, exp.train.num_steps, exp.model.d_model) == ("/tmp/mine", 5, 64)
  assert exp.loss.z_loss == 0.5
  lines = [r.getMessage() for r in caplog.records if "rebinds" in r.getMessage()]
  assert lines == [f"gin: {mine} rebinds ModelConfig.{name} = {new}, bound to {old} by the "
                   f"earlier runs/gpu.gin (the later --gin_file wins)"
                   for name, new, old in (("scan_layers", True, False),
                                          ("dtype", "'float32'", "'bfloat16'"))], lines
