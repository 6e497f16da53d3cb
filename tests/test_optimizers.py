"""The optimizer chain's own pieces against optax's."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5lite import optimizers


@pytest.mark.parametrize("scale", [0.01, 1.0, 100.0])
def test_clip_by_global_norm_matches_optax(scale):
  """Below, at and above the threshold: the same clipped gradients and state as optax's."""
  keys = jax.random.split(jax.random.key(0), 3)
  grads = {"w": scale * jax.random.normal(keys[0], (7, 5)),
           "b": scale * jax.random.normal(keys[1], (5,)),
           "e": scale * jax.random.normal(keys[2], (3, 2, 4))}
  ours, theirs = optimizers.clip_by_global_norm(1.0), optax.clip_by_global_norm(1.0)
  got, got_state = ours.update(grads, ours.init(grads))
  want, want_state = theirs.update(grads, theirs.init(grads))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, want)
  assert jax.tree.structure(got_state) == jax.tree.structure(want_state)
  expected_norm = min(float(optax.global_norm(grads)), 1.0)
  np.testing.assert_allclose(float(optax.global_norm(got)), expected_norm, rtol=1e-6)
  # The norm a caller already has (the trainer's) is used as given, not computed again.
  given, _ = ours.update(grads, ours.init(grads), global_norm=optax.global_norm(grads))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), given, want)
  scaled, _ = ours.update(grads, ours.init(grads), global_norm=jnp.float32(10.0))
  jax.tree.map(lambda a, g: np.testing.assert_allclose(a, g / 10.0, rtol=1e-6), scaled, grads)


@pytest.mark.parametrize("name", optimizers.OPTIMIZERS)
@pytest.mark.parametrize("clip_norm", [0.0, 1.0])
def test_optimizers_take_the_global_norm_as_an_extra_argument(name, clip_norm):
  """The trainer passes `global_norm` to every optimizer make_optimizer builds, clipped or not:
  the update equals one computing the norm itself."""
  params = {"w": jnp.ones((4, 3)), "b": jnp.zeros((3,))}
  grads = jax.tree.map(lambda p: 5.0 * jnp.cos(p + 1.0), params)
  opt = optimizers.make_optimizer(optimizers.OptimizerConfig(name, clip_norm=clip_norm), 1e-2)
  state = opt.init(params)
  want, _ = opt.update(grads, state, params)
  got, _ = optax.with_extra_args_support(opt).update(grads, state, params,
                                                     global_norm=optax.global_norm(grads))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, want)


def test_adamw_chain_matches_optax_chain():
  """make_optimizer's AdamW steps equal optax's clip_by_global_norm + adamw (so checkpoints
  written with either restore into the other)."""
  params = {"w": jnp.ones((4, 3)), "b": jnp.zeros((3,))}
  ours = optimizers.make_optimizer(optimizers.OptimizerConfig("adamw", weight_decay=0.1), 1e-2)
  theirs = optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(1e-2, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1))
  state_a, state_b = ours.init(params), theirs.init(params)
  assert jax.tree.structure(state_a) == jax.tree.structure(state_b)
  p_a = p_b = params
  for step in range(3):
    grads = jax.tree.map(lambda p: (step + 1) * 3.0 * jnp.cos(p + step), p_a)
    up_a, state_a = ours.update(grads, state_a, p_a)
    up_b, state_b = theirs.update(grads, state_b, p_b)
    p_a, p_b = optax.apply_updates(p_a, up_a), optax.apply_updates(p_b, up_b)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), p_a, p_b)


def test_adamw_first_moment_in_bfloat16():
  """mu_dtype='bfloat16': AdamW's first moment is held in bfloat16 and its second in float32;
  the steps are optax's adamw with that mu_dtype, within bfloat16's rounding of the float32
  moments' steps. Adafactor, which has no first moment, and unknown dtypes are refused."""
  params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(4, 3), "b": jnp.zeros((3,))}
  make = lambda mu: optimizers.make_optimizer(  # noqa: E731
      optimizers.OptimizerConfig("adamw", weight_decay=0.1, mu_dtype=mu), 1e-2)
  theirs = optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(1e-2, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
                                   mu_dtype=jnp.bfloat16))
  runs = {}
  for name, opt in (("bf16", make("bfloat16")), ("optax", theirs), ("fp32", make(""))):
    state, p = opt.init(params), params
    for step in range(3):
      grads = jax.tree.map(lambda x, s=step: (s + 1) * 3.0 * jnp.cos(x + s), p)
      updates, state = opt.update(grads, state, p)
      p = optax.apply_updates(p, updates)
    runs[name] = p, state
  adam = runs["bf16"][1][1][0]
  assert {x.dtype for x in jax.tree.leaves(adam.mu)} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(adam.nu)} == {jnp.dtype(jnp.float32)}
  assert {x.dtype for x in jax.tree.leaves(runs["fp32"][1][1][0].mu)} == {jnp.dtype(jnp.float32)}
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), runs["bf16"][0],
               runs["optax"][0])
  moved = lambda run: jax.tree.map(lambda a, b: a - b, runs[run][0], params)  # noqa: E731
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-2, atol=1e-4),
               moved("bf16"), moved("fp32"))
  with pytest.raises(ValueError, match="first moment"):
    optimizers.make_optimizer(optimizers.OptimizerConfig("adafactor", mu_dtype="bfloat16"), 1e-2)
  with pytest.raises(ValueError, match="mu_dtype must be one of"):
    make("bf16")


def test_master_weights_keep_updates_below_the_parameters_rounding():
  """bfloat16 parameters lose SGD steps of +1e-3 (below half their rounding step above 0.5 and
  1); with float32 masters the steps add up and the parameters are the masters rounded."""
  params = {"w": jnp.array([1.0, 0.5], jnp.bfloat16)}
  grads = {"w": -jnp.ones(2, jnp.bfloat16)}

  def run(opt):
    state, p = opt.init(params), params
    for _ in range(20):
      steps, state = opt.update(grads, state, p)
      p = optax.apply_updates(p, steps)
    return p, state

  plain, _ = run(optax.sgd(1e-3))
  np.testing.assert_array_equal(plain["w"], params["w"])
  mixed, state = run(optimizers.with_master_weights(optax.sgd(1e-3)))
  assert state.master["w"].dtype == jnp.float32 and mixed["w"].dtype == jnp.bfloat16
  np.testing.assert_allclose(state.master["w"], [1.02, 0.52], rtol=1e-5)
  np.testing.assert_array_equal(mixed["w"], state.master["w"].astype(jnp.bfloat16))


def test_master_weights_need_the_parameters():
  opt = optimizers.with_master_weights(optax.sgd(1e-3))
  state = opt.init({"w": jnp.ones(2, jnp.bfloat16)})
  with pytest.raises(ValueError, match="parameters"):
    opt.update({"w": jnp.ones(2, jnp.bfloat16)}, state)
