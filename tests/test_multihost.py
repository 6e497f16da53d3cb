"""Two processes x 4 fake CPU devices over localhost (jax.distributed) train to the loss of one
process x 8 devices, write one cooperative checkpoint, and both resume from it; when the latest
checkpoint is corrupt, both fall back to the one before, keep the corrupt one aside and save the
step again, also when only one process's shards of it are corrupt; a SIGTERM to one process stops
both at one step, which both save; a save that fails on one process stops both. Attention runs in
the CPU kernel (runs/cpu.gin's), each device on its own rows, across the processes."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO, cli_env, file_size_limit, run_cli
from test_checkpoints import _corrupt
from test_train import QUICK

pytestmark = pytest.mark.slow

ARGS = QUICK + ["--gin.DataConfig.host_sharding='rows'", "--gin.CHECKPOINT_PERIOD=3",
                "--gin.MeshConfig.data=-1", "--gin.ModelConfig.dropout_rate=0.0",
                "--gin.ModelConfig.attention_impl='cpu_kernel'"]
# Parameters sharded over both processes, so each writes and reads only its own part of a step.
FSDP = ["--gin.MeshConfig.data=1", "--gin.MeshConfig.fsdp=-1", "--gin.MeshConfig.rules='fsdp'"]


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start_two(model_dir, steps, extra=(), max_file_bytes=(None, None)):
  port = _free_port()
  env = cli_env({"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
  return [subprocess.Popen(
      [sys.executable] + ARGS + [f"--gin.MODEL_DIR={model_dir}", f"--gin.TRAIN_STEPS={steps}",
                                 f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                 f"--process_id={i}", *extra],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      preexec_fn=file_size_limit(max_file_bytes[i]))
      for i in range(2)]


def _finish(procs, returncode=0, timeout=600):
  try:
    outs = [p.communicate(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == returncode, (p.returncode, out[-2000:], err[-3000:])
  return outs


def _two_processes(model_dir, steps):
  return _finish(_start_two(model_dir, steps))


def _losses(model_dir):
  with open(os.path.join(model_dir, "metrics.jsonl"), encoding="utf-8") as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


def _assert_losses_match(ref, got):
  for step in ref:
    assert abs(ref[step] - got[step]) < 1e-4 * max(1.0, abs(ref[step])), (step, ref, got)


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
  _assert_losses_match(ref, got)

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
  _assert_losses_match(ref, _losses(multi))


def test_sigterm_to_one_host_saves_one_step_on_both(tmp_path):
  """A preemption notice (SIGTERM) reaching one process only: both stop at the same step, save it
  together and exit 143; both resume from it to one process's losses."""
  multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
  procs = _start_two(multi, 100000, ["--gin.CHECKPOINT_PERIOD=100000"])
  deadline = time.time() + 300
  while time.time() < deadline and not os.path.exists(os.path.join(multi, "metrics.jsonl")):
    time.sleep(0.05)
  time.sleep(0.5)
  procs[1].send_signal(signal.SIGTERM)
  outs = _finish(procs, returncode=143, timeout=300)
  saved = [int(n) for n in os.listdir(os.path.join(multi, "checkpoints")) if n.isdigit()]
  assert len(saved) == 1 and saved[0] > 0, saved
  assert all("rerun the same command to resume" in err for _, err in outs)
  outs = _two_processes(multi, saved[0] + 2)
  assert all(f"step {saved[0]} (data cursor" in out for out, _ in outs), outs
  r = run_cli(ARGS + [f"--gin.MODEL_DIR={single}", f"--gin.TRAIN_STEPS={saved[0] + 2}"],
              env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert r.returncode == 0, r.stderr[-3000:]
  ref, got = _losses(single), _losses(multi)
  assert set(ref) == set(got) == set(range(1, saved[0] + 3))
  _assert_losses_match(ref, got)


def test_shards_unreadable_on_one_host_both_fall_back(tmp_path):
  """Parameters sharded over both processes (fsdp), so each reads only its own part of a
  checkpoint; when only process 1's part of the latest is corrupt, both fall back to the step
  before (rather than process 0 resuming alone and waiting for process 1 forever) and retrain
  the same losses."""
  multi = str(tmp_path / "multi")
  _finish(_start_two(multi, 6, FSDP))
  first = _losses(multi)
  step_dir = os.path.join(multi, "checkpoints", "6")
  shards = os.path.join("state", "ocdbt.process_1", "d")
  assert os.listdir(os.path.join(step_dir, shards)), "process 1 wrote no shards of its own"
  _corrupt(step_dir, shards)
  outs = _finish(_start_two(multi, 6, FSDP), timeout=300)
  assert all("step 6" in out and "could not be restored" in out for out, _ in outs), outs
  assert "unreadable on process(es) [1]" in outs[0][0], outs[0][0]
  assert all("step 3 (data cursor" in out for out, _ in outs), outs
  names = os.listdir(os.path.join(multi, "checkpoints"))
  assert sorted(n for n in names if n.isdigit()) == ["3", "6"]
  assert len([n for n in names if n.startswith("6.corrupt-")]) == 1, names
  _assert_losses_match(first, _losses(multi))


def test_save_failing_on_one_host_stops_both(tmp_path):
  """Parameters sharded over both processes (fsdp), and process 1 cannot write its part of step 6
  (its files capped at 300 kB, as on a full disk): both stop at the same step with exit 3, step
  3 intact, and both resume from it to the same losses. (Before, process 0 waited in orbax's
  barrier for process 1's writes, and the job hung: still running after 900 s.)"""
  multi = str(tmp_path / "multi")
  _finish(_start_two(multi, 3, FSDP))
  outs = _finish(_start_two(multi, 12, FSDP, max_file_bytes=(None, 300_000)), returncode=3,
                 timeout=300)
  errors = [[line for line in err.splitlines() if line.startswith("t5lite.train: checkpoint")]
            for _, err in outs]
  assert all(len(e) == 1 and "saving step 6" in e[0] and "; step 3 is the newest saved" in e[0]
             for e in errors), [err[-2000:] for _, err in outs]
  assert "failed on process(es) [1]; see their logs" in errors[0][0], errors
  assert re.search(r"failed on process\(es\) \[1\]: .*File too large", errors[1][0]), errors
  names = os.listdir(os.path.join(multi, "checkpoints"))
  assert sorted(n for n in names if n.isdigit()) == ["3"], names
  stopped = _losses(multi)
  assert 6 <= max(stopped) < 12, stopped
  outs = _finish(_start_two(multi, 12, FSDP))
  assert all("step 3 (data cursor" in out for out, _ in outs), outs
  resumed = _losses(multi)
  _assert_losses_match({s: stopped[s] for s in range(4, max(stopped) + 1)}, resumed)
