"""The planner: candidate enumeration, pricing, and (8 fake devices) a tight
memory budget makes it pick a sharded plan that trains to the single-device loss."""

import json

import pytest

from conftest import run_cli, tiny_config
from t5lite import autoparallel


def test_candidates_respect_divisibility():
  cfg = tiny_config(num_heads=4, d_ff=64, d_model=32)
  cands = autoparallel.candidates(8, 16, cfg, remats=("none",), microbatches=(1, 2))
  assert all(c.data * c.fsdp * c.tensor == 8 for c in cands)
  assert all(c.tensor <= 4 and 4 % c.tensor == 0 for c in cands)
  assert all(16 % (c.data * c.fsdp * c.microbatches) == 0 for c in cands)
  assert {c.rules for c in cands} == {"data_parallel", "fsdp", "tensor_parallel", "fsdp_tensor"}


def test_planner_prices_the_loss_training_runs():
  """The plan is priced on the experiment's loss: LossConfig.head_chunks (no whole logits) lowers
  the peak memory the planner sees for a large vocabulary."""
  import jax  # pylint: disable=import-outside-toplevel
  from t5lite import optimizers  # pylint: disable=import-outside-toplevel
  from t5lite.models.model import LossConfig  # pylint: disable=import-outside-toplevel
  cfg = tiny_config(arch="decoder_only", vocab_size=16384)
  cand = autoparallel.Candidate(1, 1, 1, "data_parallel", "none", 1)
  peaks = [autoparallel.analyze(cfg, cand, 4, 0, 256, jax.devices()[:1], autoparallel.Hardware(),
                                optimizers.OptimizerConfig("adamw"), loss_cfg).peak_gb
           for loss_cfg in (None, LossConfig(head_chunks=8))]
  # The whole float32 logits and their gradient: 2 x 4 x 256 x 16384 x 4 bytes = 128 MiB.
  assert peaks[0] - peaks[1] > 0.06, peaks


def test_planner_prices_the_train_config_training_runs():
  """The plan is priced on the experiment's TrainConfig: without donation the old and the new
  state are both alive (a higher peak), and its XLA options reach the candidates' compiles."""
  import jax  # pylint: disable=import-outside-toplevel
  from t5lite import optimizers, trainer  # pylint: disable=import-outside-toplevel
  from t5lite.models.model import Model  # pylint: disable=import-outside-toplevel
  cfg = tiny_config(arch="decoder_only", vocab_size=4096)
  cand = autoparallel.Candidate(1, 1, 1, "data_parallel", "none", 1)

  def analyze(**train):
    return autoparallel.analyze(cfg, cand, 4, 0, 64, jax.devices()[:1], autoparallel.Hardware(),
                                optimizers.OptimizerConfig("adamw"), None,
                                trainer.TrainConfig(**train))

  donated, kept = analyze(), analyze(donate_state=False)
  state_gb = 3 * 4 * sum(x.size for x in jax.tree.leaves(
      jax.eval_shape(Model(cfg).init, jax.random.key(0)))) / 2 ** 30  # params + Adam moments
  assert not donated.error and not kept.error
  assert kept.peak_gb - donated.peak_gb > 0.9 * state_gb, (kept.peak_gb, donated.peak_gb, state_gb)
  bad = analyze(compiler_options={"xla_no_such_option": True})
  assert "xla_no_such_option" in bad.error and not bad.fits
  # A TrainConfig with options stays hashable (the dict is left out of the hash).
  hash(trainer.TrainConfig(compiler_options={"xla_cpu_enable_fast_math": False}))


@pytest.mark.slow
def test_tight_budget_picks_a_sharded_plan_that_trains_like_one_device():
  r = run_cli(["tests/autoparallel_check.py"])
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert out["fits"] and out["chosen"]["rules"] != "data_parallel", out["table"]
  assert out["chosen_peak_gb"] <= out["budget_gb"] < out["dp_peak_gb"]
  for a, b in zip(out["plan_losses"], out["ref_losses"]):
    assert abs(a - b) < 1e-4 * max(1.0, abs(b))


@pytest.mark.slow
def test_cli_with_parallel_workers_writes_a_plan(tmp_path):
  out = tmp_path / "plan.gin"
  r = run_cli(["-m", "t5lite.autoparallel", "--gin_file=models/t5_1_1/tiny.gin", "--num_devices=4",
               "--batch=8", "--inputs=32", "--targets=16", "--remats=none", "--microbatches=1",
               "--rules=data_parallel,fsdp", "--workers=2", f"--output={out}"])
  assert r.returncode == 0, r.stderr[-3000:]
  assert "est step s" in r.stdout and "chose" in r.stdout
  assert "MeshConfig.rules" in out.read_text()
  # The batch layout planned is the data's: DataConfig.pack (default True) unless told.
  assert "batch 8 x (32+16, packed)" in r.stdout


def test_candidates_include_pipeline_stages():
  cfg = tiny_config(num_heads=4, d_ff=64, d_model=32, num_encoder_layers=2, num_decoder_layers=4)
  cands = autoparallel.candidates(8, 32, cfg, remats=("none",), microbatches=(1,),
                                  stages=(1, 2, 4))
  assert {c.stage for c in cands} == {1, 2}  # 4 stages do not divide the 2-layer encoder
  assert all(c.stage * c.data * c.fsdp * c.tensor == 8 for c in cands)
  assert all((32 // (c.data * c.fsdp)) % (2 * c.stage) == 0 for c in cands if c.stage > 1)
  staged = next(c for c in cands if c.stage == 2)
  assert staged.mesh_config().stage == 2 and staged.mesh_config().pipeline_microbatches == 4


@pytest.mark.slow
def test_planner_prices_pipelined_candidates(tmp_path):
  """Stage candidates compile (the real pipelined program gives the memory) and get a finite
  estimate; the written plan carries the stage settings."""
  out = tmp_path / "plan.gin"
  r = run_cli(["-m", "t5lite.autoparallel", "--gin_file=models/decoder/tiny.gin",
               "--num_devices=4", "--batch=16", "--inputs=0", "--targets=32", "--remats=none",
               "--microbatches=1", "--rules=data_parallel", "--stages=1,2",
               f"--output={out}"])
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [l for l in r.stdout.splitlines() if l.strip().startswith(("1 ", "2 "))]
  assert any("(2,2,1,1)" in l for l in rows) and any("(1,4,1,1)" in l for l in rows), r.stdout
  assert "error" not in r.stdout.split("est step s")[1]
  assert "MeshConfig.stage" in out.read_text()


def test_planner_compiles_a_prefix_lms_step_with_its_prefix():
  """A prefix LM is priced with its rows' prefix flags, so the program planned is the one that
  trains: its attention sees the prefix (here through the CPU kernel, where it builds: the
  prefix reaches it), not a plain causal mask."""
  import jax  # pylint: disable=import-outside-toplevel
  from t5lite import optimizers  # pylint: disable=import-outside-toplevel
  from t5lite.kernels import cpu_attention  # pylint: disable=import-outside-toplevel
  cfg = tiny_config(arch="prefix_lm", head_dim=16, attention_impl="cpu_kernel")
  cand = autoparallel.Candidate(1, 1, 1, "data_parallel", "none", 1)
  compiled, (_, _, batch, _) = autoparallel._compile(  # pylint: disable=protected-access
      cfg, cand, 2, 24, 16, jax.devices()[:1], optimizers.OptimizerConfig("adamw"))
  assert batch["decoder_causal_attention"].shape == (2, 40)
  if cpu_attention.available():
    assert "has_prefix = true" in compiled.as_text()


@pytest.mark.parametrize("arch", ["encoder_decoder", "decoder_only"])
def test_planner_compiles_packed_rows_as_training_feeds_them(arch):
  """DataConfig.pack (the default) feeds rows with segment ids and positions; the planner prices
  that program (here through the CPU kernel, where it builds: the segment ids reach it), and
  times it on rows of one example each."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from t5lite import optimizers  # pylint: disable=import-outside-toplevel
  from t5lite.kernels import cpu_attention  # pylint: disable=import-outside-toplevel
  cfg = tiny_config(arch=arch, head_dim=16, attention_impl="cpu_kernel")
  cand = autoparallel.Candidate(1, 1, 1, "data_parallel", "none", 1)
  stacks = ("encoder", "decoder") if arch == "encoder_decoder" else ("decoder",)
  programs = {}
  for packed in (False, True):
    compiled, (_, _, batch, _) = autoparallel._compile(  # pylint: disable=protected-access
        cfg, cand, 2, 24, 16, jax.devices()[:1], optimizers.OptimizerConfig("adamw"),
        packed=packed)
    fields = {f"{s}_{f}" for s in stacks for f in ("segment_ids", "positions")}
    assert fields <= set(batch) if packed else not fields & set(batch), sorted(batch)
    programs[packed] = compiled.as_text()
  if arch == "encoder_decoder":
    assert batch["encoder_segment_ids"].shape == (2, 24)
    assert batch["decoder_positions"].shape == (2, 16)
  else:
    assert batch["decoder_segment_ids"].shape == (2, 40)
  if cpu_attention.available():
    assert "has_segments = true" in programs[True]
    assert "has_segments = true" not in programs[False]
  est = autoparallel.plan(cfg, batch=2, inputs=24, targets=16, devices=jax.devices()[:1],
                          hw=autoparallel.Hardware(), optimizer_cfg=optimizers.OptimizerConfig(
                              "adamw"), remats=("none",), microbatches=(1,), time_top=1,
                          packed=True, log=lambda s: None)[0]
  assert not est.error and np.isfinite(est.measured_s) and est.measured_s > 0
