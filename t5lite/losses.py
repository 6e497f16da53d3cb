"""Token-level losses: cross-entropy with z-loss and label smoothing, as T5X defines them."""

import functools
import math

import jax
import jax.numpy as jnp

NORMALIZATIONS = ("tokens", "total_tokens", "per_sequence")


def cross_entropy_with_logits(logits, targets, *, z_loss: float = 0.0,
                              label_smoothing: float = 0.0):
  """Per-token cross-entropy plus z-loss, with a fused backward pass.

  Args:
    logits: float [..., vocab].
    targets: int [...].
    z_loss: coefficient of log(Z)^2, which keeps the softmax normalizer near 1 (PaLM, T5X).
    label_smoothing: mass spread uniformly over the other classes; the loss is shifted by the
      entropy of the smoothed target so that a perfect prediction still scores 0.

  Returns:
    (loss [...], z_loss_term [...]); loss includes the z-loss term.

  The gradient is written out (softmax minus the smoothed target, plus the z-loss term) so the
  backward pass is one elementwise sweep over the logits: autodiff of the same formula keeps
  float32 log-probabilities and scatters the target gradient back through a gather (the
  forward, never differentiated, can gather the target logit).
  `cross_entropy_reference` is the plain formula the tests hold this to.
  """
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
  return _fused_cross_entropy(logits, targets, float(z_loss), float(label_smoothing))


def _smoothing_constants(vocab: int, label_smoothing: float):
  """(confidence, low, constant): target weight, other-class weight and the entropy shift."""
  confidence = 1.0 - label_smoothing
  low = label_smoothing / (vocab - 1)
  constant = -(confidence * math.log(confidence) + (vocab - 1) * low * math.log(low + 1e-20))
  return confidence, low, constant


def _target_mask(targets, vocab: int):
  return targets[..., None] == jnp.arange(vocab, dtype=targets.dtype)


def _target_logit(x, targets):
  return jnp.take_along_axis(x, targets[..., None], axis=-1)[..., 0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _fused_cross_entropy(logits, targets, z_loss, label_smoothing):
  return _fused_forward(logits, targets, z_loss, label_smoothing)[0]


def _fused_forward(logits, targets, z_loss, label_smoothing):
  x = logits.astype(jnp.float32)
  vocab = x.shape[-1]
  log_z = jax.nn.logsumexp(x, axis=-1)
  target_logp = _target_logit(x, targets) - log_z
  if label_smoothing:
    confidence, low, constant = _smoothing_constants(vocab, label_smoothing)
    sum_logp = jnp.sum(x, axis=-1) - vocab * log_z
    loss = -(confidence * target_logp + low * (sum_logp - target_logp)) - constant
  else:
    loss = -target_logp
  z_term = z_loss * jnp.square(log_z)
  return (loss + z_term, z_term), (logits, targets, log_z)


def _fused_backward(z_loss, label_smoothing, residuals, cotangents):
  logits, targets, log_z = residuals
  g_loss, g_z = cotangents
  x = logits.astype(jnp.float32)
  vocab = x.shape[-1]
  probs = jnp.exp(x - log_z[..., None])
  onehot = _target_mask(targets, vocab).astype(jnp.float32)
  if label_smoothing:
    confidence, low, _ = _smoothing_constants(vocab, label_smoothing)
    # d(target_logp) = onehot - p; d(sum_logp) = 1 - V p.
    d_loss = (confidence - low) * (probs - onehot) + low * (vocab * probs - 1.0)
  else:
    d_loss = probs - onehot
  grad = g_loss[..., None] * d_loss
  if z_loss:  # d(z log_z^2) = 2 z log_z p, reaching both outputs (the loss includes the z-term)
    grad = grad + ((g_loss + g_z) * (2.0 * z_loss) * log_z)[..., None] * probs
  return grad.astype(logits.dtype), None


_fused_cross_entropy.defvjp(_fused_forward, _fused_backward)


def target_is_top(logits, targets):
  """1.0 where the target's logit is the largest (token accuracy), else 0.0: float32 [...].

  Unlike `argmax == target` (a variadic reduce, slow on XLA:CPU) this is a max and a gather,
  which the cross-entropy computes too; a tie with another class counts as correct.
  """
  x = logits.astype(jnp.float32)
  return (_target_logit(x, targets) >= jnp.max(x, axis=-1)).astype(jnp.float32)


def cross_entropy_reference(logits, targets, *, z_loss: float = 0.0,
                            label_smoothing: float = 0.0):
  """`cross_entropy_with_logits` as the plain formula, differentiated by JAX (for tests)."""
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  log_z = jax.nn.logsumexp(logits, axis=-1)
  log_probs = logits - log_z[..., None]
  target_logp = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  if label_smoothing:
    confidence, low, constant = _smoothing_constants(vocab, label_smoothing)
    sum_logp = jnp.sum(log_probs, axis=-1)
    loss = -(confidence * target_logp + low * (sum_logp - target_logp)) - constant
  else:
    loss = -target_logp
  z_term = z_loss * jnp.square(log_z)
  return loss + z_term, z_term


def loss_weights(targets, weights, normalization: str):
  """Per-token weights whose sum over a batch is that batch's loss denominator contribution.

  `tokens`: 1 on real target tokens (loss averaged over real tokens).
  `total_tokens`: real tokens weigh 1 but the denominator counts every target position.
  `per_sequence`: each row's tokens weigh 1/len(row), so every example counts once.
  Returns (weights, denominator) for this batch.
  """
  if normalization not in NORMALIZATIONS:
    raise ValueError(f"loss normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
  if weights is None:
    weights = (targets != 0).astype(jnp.float32)
  weights = weights.astype(jnp.float32)
  if normalization == "tokens":
    return weights, jnp.sum(weights)
  if normalization == "total_tokens":
    return weights, jnp.asarray(targets.size, jnp.float32)
  per_row = jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), 1.0)
  return weights / per_row, jnp.asarray(targets.shape[0], jnp.float32)
