"""Shared fixtures: tiny model configs, a cached vocabulary and corpus, CPU-only JAX."""

import os
import sys

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory):
  """One cache (corpus + SentencePiece model) for the whole session, unless CI provides one."""
  path = os.environ.get("T5LITE_CACHE_DIR") or str(tmp_path_factory.mktemp("t5lite_cache"))
  os.environ["T5LITE_CACHE_DIR"] = path
  return path


def tiny_config(**overrides):
  """A tiny fp32 model config (encoder-decoder unless `arch` says otherwise)."""
  from t5lite.models.config import ModelConfig
  base = dict(arch="encoder_decoder", vocab_size=64, d_model=32, num_heads=4, head_dim=8,
              d_ff=64, num_encoder_layers=2, num_decoder_layers=2, dtype="float32")
  if overrides.get("arch", "encoder_decoder") != "encoder_decoder":
    base.update(position_encoding="rope", scale_attention=True, activation="silu",
                num_encoder_layers=0)
  base.update(overrides)
  return ModelConfig(**base)


def run_cli(args, cwd=None, env=None, timeout=600):
  """Runs `python -m ...` in a subprocess; returns CompletedProcess with text output."""
  import subprocess
  full_env = dict(os.environ)
  full_env["PYTHONPATH"] = REPO + os.pathsep + full_env.get("PYTHONPATH", "")
  full_env.update(env or {})
  return subprocess.run([sys.executable] + list(args), cwd=cwd or REPO, env=full_env,
                        capture_output=True, text=True, timeout=timeout)
