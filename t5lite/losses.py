"""Token-level losses: cross-entropy with z-loss and label smoothing, as T5X defines them."""

import functools
import math

import jax
import jax.numpy as jnp

from t5lite import gpu_aot

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
  return _logits_grad(logits.astype(jnp.float32), targets, log_z, g_loss, g_z, z_loss,
                      label_smoothing, logits.dtype), None


def _logits_grad(x, targets, log_z, g_loss, g_z, z_loss, label_smoothing, dtype):
  """d(loss, z_term)/d(logits) for float32 logits x, given the outputs' cotangents, in `dtype`.

  One elementwise sweep with a one-hot mask of the targets. On CPUs every class is instead
  given the gradient of a non-target class, then each row's target is set to its own value,
  from its gathered logit: the mask (an iota compared in the sweep) made the sweep twice as
  slow on XLA:CPU ([2560, 32000] logits, 2 cores: 67 -> 33 ms). Both values are the same
  formula with the one-hot term 0 or 1: the gradient the mask gives (to the bit without z-loss
  and label smoothing, within float32 rounding with them). On GPUs the mask costs nothing in a
  memory-bound sweep, and the scatter would be one more kernel.
  """
  vocab = x.shape[-1]

  def grad(probs, onehot, g_loss, g_z, log_z):
    if label_smoothing:
      confidence, low, _ = _smoothing_constants(vocab, label_smoothing)
      # d(target_logp) = onehot - p; d(sum_logp) = 1 - V p.
      d_loss = (confidence - low) * (probs - onehot) + low * (vocab * probs - 1.0)
    else:
      d_loss = probs - onehot
    g = g_loss * d_loss
    if z_loss:  # d(z log_z^2) = 2 z log_z p, reaching both outputs (the loss includes the z-term)
      g = g + (g_loss + g_z) * (2.0 * z_loss) * log_z * probs
    return g.astype(dtype)

  probs = jnp.exp(x - log_z[..., None])
  if gpu_aot.tracing_platform() != "cpu":
    onehot = targets[..., None] == jnp.arange(vocab, dtype=targets.dtype)
    return grad(probs, onehot.astype(jnp.float32), g_loss[..., None], g_z[..., None],
                log_z[..., None])
  others = grad(probs, 0.0, g_loss[..., None], g_z[..., None], log_z[..., None])
  target = grad(jnp.exp(_target_logit(x, targets) - log_z), 1.0, g_loss, g_z, log_z)
  rows = targets.size
  # One scatter batched over the rows (rows a batching dimension, not an index): under a mesh
  # each device sets its own rows' targets, with no collective.
  set_target = lambda row, t, value: row.at[t].set(value, mode="drop")
  others = jax.vmap(set_target)(others.reshape(rows, vocab), targets.reshape(rows),
                                target.reshape(rows))
  return others.reshape(x.shape)


_fused_cross_entropy.defvjp(_fused_forward, _fused_backward)


def head_cross_entropy(x, kernel, targets, weights, *, chunks: int, z_loss: float = 0.0,
                       label_smoothing: float = 0.0, dtype=jnp.float32):
  """The output projection and the weighted cross-entropy, in blocks along the length.

  Args:
    x: [batch, length, embed] final hidden states (logits = x @ kernel.T).
    kernel: [vocab, embed] output head (or a tied embedding table).
    targets: int [batch, length].
    weights: float [batch, length] loss weight of each token.
    chunks: number of blocks the length is cut into (the last one zero-padded).
    z_loss, label_smoothing: as in `cross_entropy_with_logits`.
    dtype: the matmuls' input dtype (the model's compute dtype); logits are float32.

  Returns:
    (loss_sum, (token_loss, z_term, target_is_top)): loss_sum = sum(weights * token_loss) is the
    only differentiable output; the per-token statistics, [batch, length], carry no gradient.

  Only one block's logits ([batch * length / chunks, vocab]) exist at a time. Under
  differentiation the forward pass also forms each block's gradients: the loss sum's gradient
  w.r.t. a block's logits is known up to the scalar cotangent, so the input and kernel gradients
  are accumulated block by block and the backward pass only scales them (nothing is recomputed).
  Batch sharding is kept, since the blocks cut the length, not the batch.
  """
  if chunks < 1:
    raise ValueError(f"chunks must be >= 1, got {chunks}")
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
  loss_sum, stats = _head_loss(x, kernel, targets, weights.astype(jnp.float32), int(chunks),
                               float(z_loss), float(label_smoothing), jnp.dtype(dtype))
  return loss_sum, jax.lax.stop_gradient(stats)


def _blocks(a, chunks: int):
  """[batch, length, ...] -> [chunks, batch, ceil(length / chunks), ...], zero-padded."""
  size = -(-a.shape[1] // chunks)
  a = jnp.pad(a, [(0, 0), (0, size * chunks - a.shape[1])] + [(0, 0)] * (a.ndim - 2))
  return a.reshape(a.shape[0], chunks, size, *a.shape[2:]).swapaxes(0, 1)


def _unblock(a, length: int):
  """Inverse of `_blocks`: [chunks, batch, size, ...] -> [batch, length, ...]."""
  a = a.swapaxes(0, 1)
  return a.reshape(a.shape[0], -1, *a.shape[3:])[:, :length]


def _head_loss_scan(x, kernel, targets, weights, chunks, z_loss, label_smoothing, dtype,
                    with_grads: bool):
  """Loops over the blocks: ((loss_sum, stats), (dx, dkernel) of the loss sum or None)."""
  w = kernel.astype(dtype)

  def block(dkernel, xs):
    xb, tb, wb = xs  # [batch, size, embed], [batch, size], [batch, size]
    flat, t = xb.reshape(-1, xb.shape[-1]).astype(dtype), tb.reshape(-1)
    logits = jnp.einsum("td,vd->tv", flat, w, preferred_element_type=jnp.float32)
    (loss, z_term), (_, _, log_z) = _fused_forward(logits, t, z_loss, label_smoothing)
    stats = tuple(s.reshape(tb.shape) for s in (loss, z_term, target_is_top(logits, t)))
    if not with_grads:
      return dkernel, (stats, ())
    g = _logits_grad(logits, t, log_z, wb.reshape(-1), jnp.zeros_like(log_z), z_loss,
                     label_smoothing, dtype)
    dxb = jnp.einsum("tv,vd->td", g, w).reshape(xb.shape).astype(x.dtype)
    dkernel = dkernel + jnp.einsum("tv,td->vd", g, flat, preferred_element_type=jnp.float32)
    return dkernel, (stats, dxb)

  init = jnp.zeros(kernel.shape, jnp.float32) if with_grads else ()
  dkernel, (stats, dx) = jax.lax.scan(
      block, init, (_blocks(x, chunks), _blocks(targets, chunks), _blocks(weights, chunks)))
  stats = tuple(_unblock(s, x.shape[1]) for s in stats)
  out = (jnp.sum(stats[0] * weights), stats)
  if not with_grads:
    return out, None
  return out, (_unblock(dx, x.shape[1]), dkernel.astype(kernel.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _head_loss(x, kernel, targets, weights, chunks, z_loss, label_smoothing, dtype):
  return _head_loss_scan(x, kernel, targets, weights, chunks, z_loss, label_smoothing, dtype,
                         with_grads=False)[0]


def _head_loss_forward(x, kernel, targets, weights, chunks, z_loss, label_smoothing, dtype):
  return _head_loss_scan(x, kernel, targets, weights, chunks, z_loss, label_smoothing, dtype,
                         with_grads=True)


def _head_loss_backward(chunks, z_loss, label_smoothing, dtype, grads, cotangents):
  del chunks, z_loss, label_smoothing, dtype
  dx, dkernel = grads
  g = cotangents[0]  # the statistics are stop_gradient-ed: only the loss sum has a cotangent
  return (g * dx).astype(dx.dtype), (g * dkernel).astype(dkernel.dtype), None, None


_head_loss.defvjp(_head_loss_forward, _head_loss_backward)


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
