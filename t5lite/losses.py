"""Token-level losses: cross-entropy with z-loss and label smoothing, as T5X defines them."""

import jax
import jax.numpy as jnp

NORMALIZATIONS = ("tokens", "total_tokens", "per_sequence")


def cross_entropy_with_logits(logits, targets, *, z_loss: float = 0.0,
                              label_smoothing: float = 0.0):
  """Per-token cross-entropy plus z-loss.

  Args:
    logits: float [..., vocab].
    targets: int [...].
    z_loss: coefficient of log(Z)^2, which keeps the softmax normalizer near 1 (PaLM, T5X).
    label_smoothing: mass spread uniformly over the other classes; the loss is shifted by the
      entropy of the smoothed target so that a perfect prediction still scores 0.

  Returns:
    (loss [...], z_loss_term [...]); loss includes the z-loss term.
  """
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  log_z = jax.nn.logsumexp(logits, axis=-1)
  log_probs = logits - log_z[..., None]
  target_logp = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  if label_smoothing:
    confidence = 1.0 - label_smoothing
    low = label_smoothing / (vocab - 1)
    constant = -(confidence * jnp.log(confidence) + (vocab - 1) * low * jnp.log(low + 1e-20))
    mean_logp = jnp.sum(log_probs, axis=-1)
    loss = -(confidence * target_logp + low * (mean_logp - target_logp)) - constant
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
