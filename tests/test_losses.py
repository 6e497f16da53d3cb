"""Cross-entropy, z-loss, label smoothing and loss normalization against hand computations."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5lite import gpu_aot
from t5lite import losses


def test_cross_entropy_matches_manual():
  logits = jnp.array([[2.0, 0.5, -1.0], [0.0, 0.0, 0.0]])
  targets = jnp.array([0, 2])
  loss, z = losses.cross_entropy_with_logits(logits, targets, z_loss=0.0)
  manual = [-(2.0 - np.log(np.exp(2) + np.exp(0.5) + np.exp(-1))), np.log(3.0)]
  np.testing.assert_allclose(loss, manual, rtol=1e-6)
  np.testing.assert_allclose(z, 0.0)


def test_z_loss_adds_log_z_squared():
  logits = jnp.array([[1.0, 2.0, 3.0]])
  targets = jnp.array([1])
  base, _ = losses.cross_entropy_with_logits(logits, targets)
  with_z, z = losses.cross_entropy_with_logits(logits, targets, z_loss=1e-2)
  log_z = np.log(np.exp([1.0, 2.0, 3.0]).sum())
  np.testing.assert_allclose(z, 1e-2 * log_z ** 2, rtol=1e-6)
  np.testing.assert_allclose(with_z - base, z, rtol=1e-6)


def test_label_smoothing_is_zero_at_the_smoothed_optimum():
  vocab, ls = 5, 0.1
  soft = np.full(vocab, ls / (vocab - 1))
  soft[2] = 1 - ls
  logits = jnp.log(jnp.asarray(soft))[None]
  loss, _ = losses.cross_entropy_with_logits(logits, jnp.array([2]), label_smoothing=ls)
  np.testing.assert_allclose(loss, 0.0, atol=1e-5)
  # And it penalizes a one-hot-confident prediction.
  sharp = jnp.array([[0.0, 0.0, 30.0, 0.0, 0.0]])
  assert float(losses.cross_entropy_with_logits(sharp, jnp.array([2]), label_smoothing=ls)[0][0]) > 1


@pytest.mark.parametrize("traced_for", ["cpu", "gpu"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("z_loss,smoothing", [(0.0, 0.0), (1e-4, 0.0), (1e-2, 0.1)])
def test_fused_backward_equals_autodiff_of_the_formula(dtype, z_loss, smoothing, traced_for):
  """The hand-written gradient (one sweep over the logits) equals JAX's gradient of the plain
  formula, for both outputs (the z-term is a metric but may be differentiated too), in the
  form traced for CPUs (targets set after the sweep) and for GPUs (a one-hot mask in it)."""
  logits = (4.0 * jax.random.normal(jax.random.key(0), (3, 5, 37))).astype(dtype)
  targets = jax.random.randint(jax.random.key(1), (3, 5), 0, 37)
  weights = jax.random.uniform(jax.random.key(2), (3, 5))

  def objective(fn, x):
    loss, z_term = fn(x, targets, z_loss=z_loss, label_smoothing=smoothing)
    return jnp.sum(loss * weights) + 0.3 * jnp.sum(z_term * weights)

  tracing = gpu_aot.tracing_for("h100") if traced_for == "gpu" else contextlib.nullcontext()
  with tracing:
    fused, fused_grad = jax.value_and_grad(
        lambda x: objective(losses.cross_entropy_with_logits, x))(logits)
    program = str(jax.make_jaxpr(jax.grad(
        lambda x: objective(losses.cross_entropy_with_logits, x)))(logits))
  assert ("scatter" in program) == (traced_for == "cpu")  # each platform's form was traced
  ref, ref_grad = jax.value_and_grad(
      lambda x: objective(losses.cross_entropy_reference, x))(logits)
  assert fused_grad.dtype == logits.dtype
  tol = 1e-6 if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(fused, ref, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(fused_grad, np.float32), np.asarray(ref_grad, np.float32),
                             atol=tol)
  assert float(jnp.max(jnp.abs(ref_grad.astype(jnp.float32)))) > 0.05  # not a vacuous compare


def test_label_smoothing_out_of_range_is_an_error():
  with pytest.raises(ValueError, match="label_smoothing"):
    losses.cross_entropy_with_logits(jnp.zeros((1, 3)), jnp.array([0]), label_smoothing=1.0)


@pytest.mark.parametrize("mode,expected_denominator", [("tokens", 3.0), ("total_tokens", 8.0),
                                                       ("per_sequence", 2.0)])
def test_normalizations(mode, expected_denominator):
  targets = jnp.array([[5, 6, 0, 0], [7, 0, 0, 0]])
  weights, denom = losses.loss_weights(targets, None, mode)
  assert float(denom) == expected_denominator
  if mode == "per_sequence":
    np.testing.assert_allclose(weights.sum(-1), [1.0, 1.0])
  else:
    np.testing.assert_allclose(weights, (targets > 0).astype(np.float32))


def test_unknown_normalization_is_rejected():
  with pytest.raises(ValueError, match="normalization"):
    losses.loss_weights(jnp.ones((1, 2), jnp.int32), None, "bogus")


def test_target_is_top_is_argmax_accuracy():
  logits = jax.random.normal(jax.random.key(3), (4, 9, 50))
  targets = jax.random.randint(jax.random.key(4), (4, 9), 0, 50)
  targets = targets.at[:, ::2].set(jnp.argmax(logits, -1)[:, ::2])  # half the tokens right
  expected = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  np.testing.assert_array_equal(losses.target_is_top(logits, targets), expected)
  assert 0 < float(jnp.mean(expected)) < 1


@pytest.mark.parametrize("chunks", [1, 3, 7])
@pytest.mark.parametrize("z_loss,smoothing", [(0.0, 0.0), (1e-2, 0.1)])
def test_head_cross_entropy_equals_the_whole_logits(chunks, z_loss, smoothing):
  """The blocked head + loss gives the loss sum, per-token statistics and input and kernel
  gradients of the plain formula on whole logits (7 blocks over 10 positions: padded)."""
  rng = np.random.default_rng(0)
  batch, length, embed, vocab = 3, 10, 16, 50
  x = jnp.asarray(rng.normal(size=(batch, length, embed)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(vocab, embed)) * 0.5, jnp.float32)
  targets = jnp.asarray(rng.integers(1, vocab, (batch, length)), jnp.int32)
  weights = jnp.asarray(rng.uniform(0.0, 2.0, (batch, length)), jnp.float32)

  def reference(x, kernel):
    logits = jnp.einsum("bld,vd->blv", x, kernel)
    token_loss, z_term = losses.cross_entropy_reference(logits, targets, z_loss=z_loss,
                                                        label_smoothing=smoothing)
    stats = (token_loss, z_term, losses.target_is_top(logits, targets))
    return jnp.sum(token_loss * weights), stats

  def blocked(x, kernel):
    return losses.head_cross_entropy(x, kernel, targets, weights, chunks=chunks, z_loss=z_loss,
                                     label_smoothing=smoothing)

  (want, want_stats), want_grads = jax.value_and_grad(reference, (0, 1), has_aux=True)(x, kernel)
  (got, got_stats), got_grads = jax.jit(jax.value_and_grad(blocked, (0, 1), has_aux=True))(
      x, kernel)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for g, w in zip(got_stats, want_stats):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
  # Without differentiation (evaluation) the same values come out.
  np.testing.assert_allclose(jax.jit(blocked)(x, kernel)[0], want, rtol=1e-5)
  # A scaled cotangent scales the gradients (the backward pass applies it).
  scaled = jax.grad(lambda x, k: 3.0 * blocked(x, k)[0])(x, kernel)
  np.testing.assert_allclose(scaled, 3.0 * want_grads[0], rtol=1e-4, atol=1e-5)


def test_head_cross_entropy_rejects_zero_chunks():
  with pytest.raises(ValueError, match="chunks"):
    losses.head_cross_entropy(jnp.zeros((1, 2, 4)), jnp.zeros((5, 4)), jnp.zeros((1, 2), int),
                              jnp.ones((1, 2)), chunks=0)
