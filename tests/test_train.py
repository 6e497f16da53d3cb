"""End to end through `python -m t5lite.train` / `t5lite.eval`: quickstart, resume after SIGKILL
(bit-identical), SIGTERM, and every bad-input path with its exit code."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, run_cli

pytestmark = pytest.mark.slow

QUICK = ["-m", "t5lite.train", "--gin_file=gin_configs/experiments/quickstart.gin",
         "--gin.BATCH_SIZE=8", "--gin.TrainConfig.log_every=1", "--gin.TrainConfig.eval_every=0",
         "--gin.TrainConfig.progress_bar=False", "--gin.DataConfig.input_length=48",
         "--gin.DataConfig.target_length=16"]


def _metrics(model_dir):
  with open(os.path.join(model_dir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _params(model_dir, step):
  from t5lite.checkpoints import restore_params
  from t5lite.models.config import ModelConfig
  from t5lite.models.model import Model
  import jax
  with open(os.path.join(model_dir, "checkpoints", str(step), "config", "metadata"),
            encoding="utf-8") as f:
    cfg = ModelConfig.from_json(json.dumps(json.load(f)["model_config"]))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          Model(cfg).abstract_params)
  return jax.tree.map(np.asarray, restore_params(os.path.join(model_dir, "checkpoints"),
                                                 abstract, step))


def test_quickstart_runs_and_eval_reports(tmp_path):
  d = str(tmp_path / "run")
  r = run_cli(QUICK + [f"--gin.MODEL_DIR={d}", "--gin.TRAIN_STEPS=8",
                       "--gin.CHECKPOINT_PERIOD=4"])
  assert r.returncode == 0, r.stderr[-3000:]
  records = _metrics(d)
  assert [m["step"] for m in records] == list(range(1, 9))
  for key in ("loss", "learning_rate", "grad_norm", "tokens_per_s"):
    assert key in records[0]
  assert records[-1]["loss"] < records[0]["loss"]
  assert sorted(os.listdir(os.path.join(d, "checkpoints")))[:2] == ["4", "8"]
  for name in ("config.gin", "operative_config.gin"):
    assert os.path.getsize(os.path.join(d, name)) > 0
  assert os.listdir(os.path.join(d, "tensorboard", "train"))
  # Rerunning a finished run does nothing and exits 0.
  again = run_cli(QUICK + [f"--gin.MODEL_DIR={d}", "--gin.TRAIN_STEPS=8"])
  assert again.returncode == 0 and "nothing to do" in again.stdout
  ev = run_cli(["-m", "t5lite.eval", "--gin_file=gin_configs/experiments/quickstart.gin",
                f"--gin.MODEL_DIR={d}", "--batches=2", "--gin.DataConfig.input_length=48",
                "--gin.DataConfig.target_length=16"])
  assert ev.returncode == 0, ev.stderr[-3000:]
  result = json.loads(ev.stdout.strip().splitlines()[-1])
  assert result["step"] == 8 and result["perplexity"] == pytest.approx(np.exp(result["loss"]))
  assert 0 <= result["accuracy"] <= 1
  # A config that leaves the partitioning to the planner (partitioning/auto.gin) evaluates too:
  # FSDP over all devices, same numbers (it stopped with "unknown rule preset 'auto'").
  auto = run_cli(["-m", "t5lite.eval", "--gin_file=gin_configs/experiments/quickstart.gin",
                  "--gin_file=gin_configs/partitioning/auto.gin", f"--gin.MODEL_DIR={d}",
                  "--batches=2", "--gin.DataConfig.input_length=48",
                  "--gin.DataConfig.target_length=16"])
  assert auto.returncode == 0, auto.stderr[-3000:]
  planned = json.loads(auto.stdout.strip().splitlines()[-1])
  assert planned["loss"] == pytest.approx(result["loss"], rel=1e-5)


def test_batch_ramp_and_finetune_from_another_run(tmp_path):
  base, ft = str(tmp_path / "base"), str(tmp_path / "ft")
  r = run_cli(QUICK + [f"--gin.MODEL_DIR={base}", "--gin.TRAIN_STEPS=6",
                       "--gin.TrainConfig.batch_ramp=((0, 4), (3, 8))",
                       "--gin.TrainConfig.microbatches=2"])
  assert r.returncode == 0, r.stderr[-3000:]
  assert [m["batch_size"] for m in _metrics(base)] == [4, 4, 4, 8, 8, 8]
  # Finetuning restores parameters only: its first loss is the base run's trained level, far
  # below a fresh model's.
  r = run_cli(QUICK + [f"--gin.MODEL_DIR={ft}", "--gin.TRAIN_STEPS=2",
                       f"--gin.TrainConfig.init_from={base}/checkpoints"])
  assert r.returncode == 0, r.stderr[-3000:]
  assert "initialized parameters from" in r.stdout
  fresh = _metrics(base)[0]["loss"]
  assert _metrics(ft)[0]["loss"] < fresh - 0.5


def test_sigkill_resume_is_bit_identical(tmp_path):
  steps = ["--gin.TRAIN_STEPS=30", "--gin.CHECKPOINT_PERIOD=5",
           "--gin.TrainConfig.async_checkpoints=True"]
  ref, killed = str(tmp_path / "ref"), str(tmp_path / "killed")
  r = run_cli(QUICK + steps + [f"--gin.MODEL_DIR={ref}"])
  assert r.returncode == 0, r.stderr[-3000:]

  env = dict(os.environ, PYTHONPATH=REPO)
  proc = subprocess.Popen([sys.executable] + QUICK + steps + [f"--gin.MODEL_DIR={killed}"],
                          cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(os.path.join(killed, "checkpoints", "10")):
      break
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  saved = [int(n) for n in os.listdir(os.path.join(killed, "checkpoints")) if n.isdigit()]
  assert saved and max(saved) < 30, f"the run was not interrupted mid-way: {saved}"

  r = run_cli(QUICK + steps + [f"--gin.MODEL_DIR={killed}"])
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from" in r.stdout
  ref_params, got_params = _params(ref, 30), _params(killed, 30)
  for a, b in zip(jax_leaves(ref_params), jax_leaves(got_params)):
    np.testing.assert_array_equal(a, b)
  ref_loss = {m["step"]: m["loss"] for m in _metrics(ref)}
  got_loss = {}
  for m in _metrics(killed):  # the resumed run's records come last and win
    got_loss[m["step"]] = m["loss"]
  assert got_loss == ref_loss


def jax_leaves(tree):
  import jax
  return jax.tree.leaves(tree)


def test_sigterm_saves_and_resumes(tmp_path):
  d = str(tmp_path / "run")
  env = dict(os.environ, PYTHONPATH=REPO)
  proc = subprocess.Popen([sys.executable] + QUICK + ["--gin.TRAIN_STEPS=100000",
                                                      "--gin.CHECKPOINT_PERIOD=100000",
                                                      f"--gin.MODEL_DIR={d}"],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  deadline = time.time() + 300
  while time.time() < deadline and not os.path.exists(os.path.join(d, "metrics.jsonl")):
    time.sleep(0.05)
  time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 143, err[-3000:]
  assert "rerun the same command to resume" in err
  saved = [int(n) for n in os.listdir(os.path.join(d, "checkpoints")) if n.isdigit()]
  assert saved and saved[0] > 0


def test_unknown_gin_binding_exits_2(tmp_path):
  r = run_cli(QUICK + [f"--gin.MODEL_DIR={tmp_path}/x", "--gin.ModelConfig.bogus_field=3"])
  assert r.returncode == 2
  assert "configuration error" in r.stderr and "bogus_field" in r.stderr
  assert not os.path.exists(tmp_path / "x" / "checkpoints")


def test_compiler_options_xla_does_not_know_exit_2(tmp_path):
  """TrainConfig.compiler_options go to XLA; a name it does not know is a configuration error
  before any data or checkpoint is touched."""
  r = run_cli(QUICK + [f"--gin.MODEL_DIR={tmp_path}/x",
                       "--gin.TrainConfig.compiler_options={'xla_no_such_option': True}"])
  assert r.returncode == 2
  assert "configuration error" in r.stderr and "xla_no_such_option" in r.stderr
  assert not os.path.exists(tmp_path / "x" / "checkpoints")


def test_missing_required_macro_exits_2():
  r = run_cli(["-m", "t5lite.train", "--gin_file=models/t5_1_1/tiny.gin",
               "--gin_file=runs/pretrain.gin", "--gin.TRAIN_STEPS=3"])
  assert r.returncode == 2
  assert "required" in r.stderr.lower() and "MODEL_DIR" in r.stderr


def test_model_dir_that_is_a_file_exits_2(tmp_path):
  path = tmp_path / "afile"
  path.write_text("keep me")
  r = run_cli(QUICK + [f"--gin.MODEL_DIR={path}", "--gin.TRAIN_STEPS=2"])
  assert r.returncode == 2 and "is a file" in r.stderr
  assert path.read_text() == "keep me"


def test_incompatible_checkpoint_exits_3_and_keeps_it(tmp_path):
  d = str(tmp_path / "run")
  r = run_cli(QUICK + [f"--gin.MODEL_DIR={d}", "--gin.TRAIN_STEPS=2"])
  assert r.returncode == 0, r.stderr[-3000:]
  r = run_cli(QUICK + [f"--gin.MODEL_DIR={d}", "--gin.TRAIN_STEPS=4",
                       "--gin.ModelConfig.d_model=64"])
  assert r.returncode == 3
  assert "incompatible" in r.stderr and "d_model" in r.stderr
  assert os.listdir(os.path.join(d, "checkpoints")) == ["2"]
  # The same model with another optimizer: its state cannot be read into this one's. Every step
  # fails alike, so none is taken for corrupt and moved aside (as all were before, and the run
  # trained from step 0).
  r = run_cli(QUICK + [f"--gin.MODEL_DIR={d}", "--gin.TRAIN_STEPS=4",
                       "--gin.OptimizerConfig.name='adafactor'"])
  assert r.returncode == 3, r.stderr[-3000:]
  assert "no checkpoint in" in r.stderr and "step 2: ValueError" in r.stderr, r.stderr[-3000:]
  assert os.listdir(os.path.join(d, "checkpoints")) == ["2"]


def test_failed_save_exits_3_and_the_rerun_resumes(tmp_path):
  """A checkpoint that cannot be written (every file capped at 500 kB, as on a full disk) stops
  the run with exit 3 as soon as the failure is known, naming the step, the operating system's
  reason and the newest saved step; that step is intact, and the same command resumes from it
  to the same losses. (Orbax's own error came one checkpoint period later, as a traceback.)"""
  d = str(tmp_path / "run")
  args = QUICK + [f"--gin.MODEL_DIR={d}", "--gin.CHECKPOINT_PERIOD=2"]
  assert run_cli(args + ["--gin.TRAIN_STEPS=4"]).returncode == 0
  failed = run_cli(args + ["--gin.TRAIN_STEPS=12"], max_file_bytes=500_000)
  assert failed.returncode == 3, failed.stderr[-3000:]
  assert re.search(r"saving step 6 .* failed: .*File too large.*; step 4 is the newest saved",
                   failed.stderr), failed.stderr[-3000:]
  names = os.listdir(os.path.join(d, "checkpoints"))
  assert sorted(n for n in names if n.isdigit()) == ["2", "4"], names
  stopped_at = _metrics(d)[-1]["step"]
  assert 6 <= stopped_at < 12, stopped_at
  r = run_cli(args + ["--gin.TRAIN_STEPS=12"])
  assert r.returncode == 0, r.stderr[-3000:]
  assert "step 4 (data cursor" in r.stdout
  records = _metrics(d)
  first = {m["step"]: m["loss"] for m in records[:stopped_at]}
  again = {m["step"]: m["loss"] for m in records[stopped_at:]}
  assert sorted(again) == list(range(5, 13))
  assert all(again[s] == first[s] for s in range(5, stopped_at + 1)), (first, again)


def test_corrupt_latest_checkpoint_falls_back_loudly(tmp_path):
  d = str(tmp_path / "run")
  r = run_cli(QUICK + [f"--gin.MODEL_DIR={d}", "--gin.TRAIN_STEPS=4", "--gin.CHECKPOINT_PERIOD=2"])
  assert r.returncode == 0, r.stderr[-3000:]
  for root, _, files in os.walk(os.path.join(d, "checkpoints", "4", "state")):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"corrupt")
  r = run_cli(QUICK + [f"--gin.MODEL_DIR={d}", "--gin.TRAIN_STEPS=6", "--gin.CHECKPOINT_PERIOD=2"])
  assert r.returncode == 0, r.stderr[-3000:]
  assert "WARNING: checkpoint step 4" in r.stdout and "resumed from" in r.stdout
  names = os.listdir(os.path.join(d, "checkpoints"))
  assert "6" in names and any(n.startswith("4.corrupt-") for n in names)


def test_too_many_nonfinite_steps_exit_4(tmp_path):
  d = str(tmp_path / "run")
  r = run_cli(QUICK + [f"--gin.MODEL_DIR={d}", "--gin.TRAIN_STEPS=20",
                       "--gin.ScheduleConfig.learning_rate=1e30",
                       "--gin.OptimizerConfig.clip_norm=0.0",
                       "--gin.TrainConfig.max_nonfinite_steps=3"])
  assert r.returncode == 4, r.stderr[-3000:]
  assert "consecutive steps had a non-finite" in r.stderr


def test_auto_partitioning_plans_before_training(tmp_path):
  d = str(tmp_path / "run")
  r = run_cli(QUICK + ["--gin_file=partitioning/auto.gin", f"--gin.MODEL_DIR={d}",
                       "--gin.TRAIN_STEPS=2"])
  assert r.returncode == 0, r.stderr[-3000:]
  assert "auto plan" in r.stdout
  plan = open(os.path.join(d, "plan.gin"), encoding="utf-8").read()
  assert "MeshConfig.rules" in plan and "remat_policy" in plan
