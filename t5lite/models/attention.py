"""Attention masks and position encodings (T5 relative buckets, RoPE, ALiBi).

Masks are boolean `[batch, 1, q_len, k_len]` (True = may attend) built from segment ids, so packed
sequences never attend across examples; the attention itself goes through
`jax.nn.dot_product_attention`, which selects cuDNN flash attention on GPUs.
"""

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class Mask(NamedTuple):
  """Which keys each query may see.

  Packed rows need `dense` (bool [batch, 1, q_len, k_len] from segment ids). Unpacked rows,
  padded at the end, use `causal` and/or `kv_lengths` (int [batch]), the forms cuDNN flash
  attention handles natively without materializing a mask.
  """
  dense: Optional[jax.Array] = None
  causal: bool = False
  kv_lengths: Optional[jax.Array] = None


def padding_mask(q_segments, k_segments):
  """Same-segment mask: [batch, 1, q, k]; segment 0 is padding and sees nothing."""
  same = q_segments[:, :, None] == k_segments[:, None, :]
  valid = (q_segments[:, :, None] > 0) & (k_segments[:, None, :] > 0)
  return (same & valid)[:, None]


def causal_mask(length: int):
  """Lower-triangular [1, 1, length, length] mask over token indices."""
  idx = jnp.arange(length)
  return (idx[:, None] >= idx[None, :])[None, None]


def prefix_lm_mask(segments, prefix):
  """Causal mask made fully visible inside each example's prefix (UniLM / T5 prefix-LM).

  Args:
    segments: int [batch, length] segment ids (0 = padding).
    prefix: bool/int [batch, length], 1 on the input (prefix) tokens.
  """
  length = segments.shape[1]
  prefix = prefix.astype(bool)
  both_prefix = (prefix[:, :, None] & prefix[:, None, :])[:, None]
  return (causal_mask(length) | both_prefix) & padding_mask(segments, segments)


def relative_position_bucket(relative_position, bidirectional: bool, num_buckets: int,
                             max_distance: int):
  """T5's log-spaced relative position buckets.

  relative_position = key_position - query_position. Half the buckets are exact offsets, the rest
  grow logarithmically up to `max_distance`; bidirectional buckets split by direction first.
  """
  bucket = jnp.zeros_like(relative_position)
  n = relative_position
  if bidirectional:
    num_buckets //= 2
    bucket = bucket + (n > 0).astype(n.dtype) * num_buckets
    n = jnp.abs(n)
  else:
    n = -jnp.minimum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  scaled = (jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact)
            / math.log(max_distance / max_exact) * (num_buckets - max_exact))
  large = jnp.minimum(max_exact + scaled.astype(n.dtype), num_buckets - 1)
  return bucket + jnp.where(is_small, n, large)


class RelativePositionBias(nnx.Module):
  """Learned per-head bias over relative position buckets, shared by a stack's layers."""

  def __init__(self, num_buckets: int, max_distance: int, num_heads: int, bidirectional: bool,
               *, rngs: nnx.Rngs, param_dtype=jnp.float32):
    self.num_buckets = num_buckets
    self.max_distance = max_distance
    self.bidirectional = bidirectional
    value = jax.random.normal(rngs.params(), (num_buckets, num_heads), param_dtype)
    self.embedding = nnx.Param(value, logical_axes=("relpos_buckets", "heads"))

  def __call__(self, q_positions, k_positions, dtype=jnp.float32):
    """Positions [batch or 1, q] and [batch or 1, k] -> bias [batch or 1, heads, q, k]."""
    rel = k_positions[:, None, :] - q_positions[:, :, None]
    buckets = relative_position_bucket(rel, self.bidirectional, self.num_buckets,
                                       self.max_distance)
    # A one-hot matmul instead of a gather: its gradient is a matmul too, not a scatter-add of
    # q*k values into 32 rows (which serializes on GPU atomics).
    onehot = jax.nn.one_hot(buckets, self.num_buckets, dtype=jnp.float32)
    return jnp.einsum("bqkn,nh->bhqk", onehot, self.embedding[...].astype(jnp.float32)
                      ).astype(dtype)


def alibi_slopes(num_heads: int) -> np.ndarray:
  """ALiBi head slopes (Press et al.): a geometric sequence, extended for non powers of two."""
  def power_of_two_slopes(n):
    start = 2.0 ** (-8.0 / n)
    return [start ** (i + 1) for i in range(n)]
  if math.log2(num_heads).is_integer():
    slopes = power_of_two_slopes(num_heads)
  else:
    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = power_of_two_slopes(closest)
    slopes += power_of_two_slopes(2 * closest)[0::2][: num_heads - closest]
  return np.asarray(slopes, np.float32)


def alibi_bias(q_positions, k_positions, num_heads: int, dtype=jnp.float32):
  """Linear distance penalty -slope * |k - q|: [batch, heads, q, k]."""
  dist = jnp.abs(k_positions[:, None, :] - q_positions[:, :, None]).astype(jnp.float32)
  slopes = jnp.asarray(alibi_slopes(num_heads))
  return (-slopes[None, :, None, None] * dist[:, None]).astype(dtype)


def apply_rope(x, positions, theta: float):
  """Rotary embedding, half-split layout (as LLaMA in HF): x [b, l, h, d], positions [b, l]."""
  d = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq       # [b, l, d/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = x32[..., : d // 2], x32[..., d // 2:]
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


def attend(q, k, v, mask: Mask, bias=None, *, scale: float, implementation=None):
  """Scaled dot-product attention with grouped KV heads.

  q: [b, q_len, heads, d]; k, v: [b, k_len, kv_heads, d]; mask: a Mask;
  bias: [1 or b, heads, q_len, k_len]. Returns [b, q_len, heads, d].
  """
  if bias is not None:
    bias = bias.astype(q.dtype)
  return jax.nn.dot_product_attention(
      q, k, v, bias=bias, mask=mask.dense, scale=scale, is_causal=mask.causal,
      key_value_seq_lengths=mask.kv_lengths, implementation=implementation)
