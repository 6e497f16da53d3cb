"""Two processes x 4 fake CPU devices over localhost (jax.distributed) train to the loss of one
process x 8 devices, write one cooperative checkpoint, and both resume from it; when the latest
checkpoint is corrupt, both fall back to the one before, keep the corrupt one aside and save the
step again. Attention runs in the CPU kernel (runs/cpu.gin's), each device on its own rows, across
the processes."""

import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import REPO, cli_env, run_cli
from test_checkpoints import _corrupt
from test_train import QUICK

pytestmark = pytest.mark.slow

ARGS = QUICK + ["--gin.DataConfig.host_sharding='rows'", "--gin.CHECKPOINT_PERIOD=3",
                "--gin.MeshConfig.data=-1", "--gin.ModelConfig.dropout_rate=0.0",
                "--gin.ModelConfig.attention_impl='cpu_kernel'"]


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_processes(model_dir, steps):
  port = _free_port()
  env = cli_env({"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
  procs = [subprocess.Popen(
      [sys.executable] + ARGS + [f"--gin.MODEL_DIR={model_dir}", f"--gin.TRAIN_STEPS={steps}",
                                 f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                 f"--process_id={i}"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return outs


def _losses(model_dir):
  with open(os.path.join(model_dir, "metrics.jsonl"), encoding="utf-8") as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


def test_two_hosts_match_one_host_resume_and_fall_back(tmp_path):
  single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
  r = run_cli(ARGS + [f"--gin.MODEL_DIR={single}", "--gin.TRAIN_STEPS=6"],
              env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert r.returncode == 0, r.stderr[-3000:]
  _two_processes(multi, 3)
  assert sorted(n for n in os.listdir(os.path.join(multi, "checkpoints")) if n.isdigit()) == ["3"]
  outs = _two_processes(multi, 6)
  assert all("resumed from" in out for out, _ in outs)
  ref, got = _losses(single), _losses(multi)
  assert set(ref) == set(got) == set(range(1, 7))
  for step in ref:
    assert abs(ref[step] - got[step]) < 1e-4 * max(1.0, abs(ref[step])), (step, ref, got)

  # The latest checkpoint corrupt: both processes fall back to step 3, the same one, and train to
  # step 6 again to the same losses; step 6 is saved anew beside the corrupt one, renamed.
  _corrupt(os.path.join(multi, "checkpoints", "6"))
  outs = _two_processes(multi, 6)
  assert all("step 6" in out and "could not be restored" in out for out, _ in outs), outs
  assert all("step 3 (data cursor" in out for out, _ in outs), outs
  names = os.listdir(os.path.join(multi, "checkpoints"))
  assert sorted(n for n in names if n.isdigit()) == ["3", "6"]
  corrupt = [n for n in names if n.startswith("6.corrupt-")]
  assert len(corrupt) == 1, names
  assert all(f"moved it to {os.path.join(multi, 'checkpoints', corrupt[0])} " in out
             for out, _ in outs), outs
  got = _losses(multi)
  for step in ref:
    assert abs(ref[step] - got[step]) < 1e-4 * max(1.0, abs(ref[step])), (step, ref, got)
