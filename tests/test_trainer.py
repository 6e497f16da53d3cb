"""The pure train step: accumulation, NaN guard, RNG by step, bf16 compute over fp32 params."""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import USERS_CODEGEN, tiny_config
from test_models import random_batch
from t5lite import gpu_aot, optimizers, schedules, trainer
from t5lite.models.model import Model


def _step(model, opt, microbatches=1, seed=0):
  return jax.jit(functools.partial(trainer.train_step, model=model, optimizer=opt,
                                   schedule=lambda s: 1e-3, seed=seed, microbatches=microbatches))


class _UsersStep:
  """`_step` compiled with XLA:CPU's default codegen (`USERS_CODEGEN`), once for each batch
  structure it is called with: for comparisons between programs that hold bit for bit in the
  programs users run. `jitted` is the jitted step it lowers (its traces are reused)."""

  def __init__(self, model, opt):
    self.jitted = _step(model, opt)
    self._compiled = {}

  def __call__(self, state, batch):
    key = tuple(sorted(batch))
    if key not in self._compiled:
      self._compiled[key] = self.jitted.lower(state, batch).compile(
          compiler_options=USERS_CODEGEN)
    return self._compiled[key](state, batch)


@pytest.mark.parametrize("arch", ["encoder_decoder", "decoder_only"])
def test_gradient_accumulation_equals_full_batch(arch):
  cfg = tiny_config(arch=arch)
  model = Model(cfg)
  # Clipped SGD: the update is proportional to the gradient. (Adam's normalized update turns
  # float-rounding differences in near-zero gradient entries into lr-sized parameter changes.)
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(1.0))
  state = trainer.init_state(model, opt, jax.random.key(0))
  batch = random_batch(cfg, batch=4)
  full_state, full = _step(model, opt, 1)(jax.tree.map(jnp.copy, state), batch)
  acc_state, acc = _step(model, opt, 2)(jax.tree.map(jnp.copy, state), batch)
  np.testing.assert_allclose(acc["loss"], full["loss"], rtol=1e-5)
  np.testing.assert_allclose(acc["grad_norm"], full["grad_norm"], rtol=1e-5)
  delta = lambda new: jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), new["params"],
                                   state["params"])
  full_delta, acc_delta = delta(full_state), delta(acc_state)
  assert max(float(np.abs(d).max()) for d in jax.tree.leaves(full_delta)) > 1e-3  # it moved
  # atol: two float32 ulps of a unit-scale parameter (the deltas carry the rounding of p + u).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2.5e-7, rtol=1e-4),
               acc_delta, full_delta)


@pytest.mark.parametrize("donate", [True, False])
def test_jit_train_step_donates_the_state_unless_told_not_to(donate):
  """`trainer.jit_train_step` (what `run`, the benchmark and the planner compile): the state's
  buffers are donated unless TrainConfig.donate_state is off, XLA takes the compiler options,
  and the step computes what the plain jitted train_step does."""
  cfg = tiny_config()
  model = Model(cfg)
  opt = optax.adamw(1e-3)
  state = trainer.init_state(model, opt, jax.random.key(0))
  batch = random_batch(cfg)
  want_state, want = _UsersStep(model, opt)(jax.tree.map(jnp.copy, state), batch)
  train_cfg = trainer.TrainConfig(donate_state=donate, compiler_options={
      "xla_cpu_enable_fast_math": False, **USERS_CODEGEN})
  new_state, metrics = trainer.jit_train_step(model, opt, lambda s: 1e-3, train_cfg)(state, batch)
  assert all(x.is_deleted() == donate for x in jax.tree.leaves(state))
  np.testing.assert_array_equal(metrics["loss"], want["loss"])
  jax.tree.map(np.testing.assert_array_equal, new_state, want_state)


def test_compiler_options_xla_rejects_are_value_errors():
  """A name or value XLA does not know: a ValueError naming it from `check_compiler_options`,
  and the same XLA error from the step compiled with it (so the options do reach XLA)."""
  with pytest.raises(ValueError, match="xla_no_such_option"):
    trainer.check_compiler_options({"xla_no_such_option": True})
  with pytest.raises(ValueError, match="not a valid bool"):
    trainer.check_compiler_options({"xla_cpu_enable_fast_math": "maybe"})
  trainer.check_compiler_options({"xla_gpu_enable_latency_hiding_scheduler": True})
  trainer.check_compiler_options({})
  cfg = tiny_config()
  model = Model(cfg)
  opt = optax.sgd(1e-3)
  step = trainer.jit_train_step(model, opt, lambda s: 1e-3, trainer.TrainConfig(
      compiler_options={"xla_no_such_option": True}))
  with pytest.raises(jax.errors.JaxRuntimeError, match="xla_no_such_option"):
    step(trainer.init_state(model, opt, jax.random.key(0)), random_batch(cfg))


@pytest.mark.parametrize("form", ["cond", "select"])
def test_nonfinite_step_is_skipped_and_counted(form):
  """The update is kept or skipped by a cond on CPUs, by a select per tensor when traced for a
  GPU (`trainer._keep_if`; run here on the CPU): both skip it whole and keep the same update."""
  cfg = tiny_config()
  model = Model(cfg)
  opt = optax.adamw(1e-3)
  good = random_batch(cfg)
  kept = ("params", "opt_state")
  state = trainer.init_state(model, opt, jax.random.key(0))
  reference = _UsersStep(model, opt)(state, good)[0]
  with gpu_aot.tracing_for("h100") if form == "select" else contextlib.nullcontext():
    step = _UsersStep(model, opt)
    text = step.jitted.lower(state, good).as_text()
    assert ("stablehlo.case" in text or "stablehlo.if" in text) == (form == "cond")
    state, _ = step(state, good)        # nonzero moments and count to keep
    before = jax.tree.map(np.asarray, {k: state[k] for k in kept})
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6), before,
                 {k: reference[k] for k in kept})
    bad = random_batch(cfg)
    bad["decoder_loss_weights"] = np.full(bad["decoder_target_tokens"].shape, np.nan, np.float32)
    state, metrics = step(state, bad)
    assert int(metrics["skipped"]) == 1 and int(state["nonfinite_streak"]) == 1
    after = jax.tree.map(np.asarray, {k: state[k] for k in kept})
    jax.tree.map(np.testing.assert_array_equal, after, before)
    state, metrics = step(state, bad)
    assert int(state["nonfinite_streak"]) == 2 and int(state["nonfinite_total"]) == 2
    assert int(state["step"]) == 3
    state, metrics = step(state, random_batch(cfg))
    assert int(metrics["skipped"]) == 0 and int(state["nonfinite_streak"]) == 0
    assert int(state["nonfinite_total"]) == 2


def test_dropout_rng_comes_from_the_step():
  cfg = tiny_config(dropout_rate=0.3)
  model = Model(cfg)
  opt = optax.sgd(0.0)
  state = trainer.init_state(model, opt, jax.random.key(0))
  batch = random_batch(cfg)
  step = _step(model, opt)
  s1, m1 = step(jax.tree.map(jnp.copy, state), batch)
  _, m1_again = step(jax.tree.map(jnp.copy, state), batch)
  _, m2 = step(s1, batch)  # same params (lr 0), next step -> other dropout mask
  assert float(m1["loss"]) == float(m1_again["loss"])
  assert float(m1["loss"]) != float(m2["loss"])


def test_bf16_compute_keeps_fp32_params_and_state():
  cfg = tiny_config(dtype="bfloat16")
  model = Model(cfg)
  opt = optimizers.make_optimizer(optimizers.OptimizerConfig("adafactor"), 1e-2)
  state = trainer.init_state(model, opt, jax.random.key(0))
  logits, _ = model.apply(state["params"], random_batch(cfg))
  assert logits.dtype == jnp.float32
  state, metrics = _step(model, opt)(state, random_batch(cfg))
  assert np.isfinite(float(metrics["loss"]))
  for leaf in jax.tree.leaves(state["params"]):
    assert leaf.dtype == jnp.float32


def test_bfloat16_params_train_on_float32_masters():
  """ModelConfig.param_dtype='bfloat16' with OptimizerConfig.master_weights: the parameters stay
  bfloat16 and equal their float32 masters rounded, the masters (and AdamW's moments) are
  float32, and steps too small for bfloat16 still move the masters."""
  cfg = tiny_config(param_dtype="bfloat16")
  model = Model(cfg)
  opt = optimizers.make_optimizer(optimizers.OptimizerConfig("adamw", master_weights=True), 1e-5)
  state = trainer.init_state(model, opt, jax.random.key(0))
  first = state["params"]
  step = _step(model, opt)
  for _ in range(3):
    state, metrics = step(state, random_batch(cfg))
    assert np.isfinite(float(metrics["loss"]))
  master = state["opt_state"].master
  jax.tree.map(lambda p, m: np.testing.assert_array_equal(p, m.astype(jnp.bfloat16)),
               state["params"], master)
  assert {leaf.dtype for leaf in jax.tree.leaves(state["params"])} == {jnp.dtype(jnp.bfloat16)}
  assert {leaf.dtype for leaf in jax.tree.leaves(state["opt_state"])} - {jnp.dtype(jnp.int32)} == {
      jnp.dtype(jnp.float32)}
  moved = jax.tree.leaves(jax.tree.map(lambda m, p: float(jnp.max(jnp.abs(m - p))), master, first))
  assert min(moved) > 0  # every tensor's master moved by ~3 steps of 1e-5


def test_warmup_schedule_reaches_the_step_metrics():
  cfg = tiny_config()
  model = Model(cfg)
  schedule = schedules.make_schedule(schedules.ScheduleConfig(1e-2, 4, "linear"), 8)
  opt = optimizers.make_optimizer(optimizers.OptimizerConfig(), schedule)
  state = trainer.init_state(model, opt, jax.random.key(0))
  step = jax.jit(functools.partial(trainer.train_step, model=model, optimizer=opt,
                                   schedule=schedule, seed=0))
  rates = []
  for _ in range(3):
    state, metrics = step(state, random_batch(cfg))
    rates.append(float(metrics["learning_rate"]))
  np.testing.assert_allclose(rates, [2.5e-3, 5e-3, 7.5e-3], rtol=1e-5)
