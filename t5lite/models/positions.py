"""Position encodings: T5's relative position buckets and bias, ALiBi, rotary embeddings (RoPE).

The relative and ALiBi biases are added to the attention scores ([batch or 1, heads, q, k]);
RoPE rotates the queries and keys before their scores.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


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

  def _values(self, relative_position):
    """Relative positions (key - query) [...] -> learned bias [..., heads], float32."""
    buckets = relative_position_bucket(relative_position, self.bidirectional, self.num_buckets,
                                       self.max_distance)
    # A one-hot matmul instead of a gather: its gradient is a matmul too, not a scatter-add of
    # many values into 32 rows (which serializes on GPU atomics).
    onehot = jax.nn.one_hot(buckets, self.num_buckets, dtype=jnp.float32)
    return onehot @ self.embedding[...].astype(jnp.float32)

  def __call__(self, q_positions, k_positions, dtype=jnp.float32):
    """Positions [batch or 1, q] and [batch or 1, k] -> bias [batch or 1, heads, q, k]."""
    rel = k_positions[:, None, :] - q_positions[:, :, None]
    return jnp.moveaxis(self._values(rel), -1, 1).astype(dtype)

  def for_sequence(self, length: int, dtype=jnp.float32):
    """Bias of a length-`length` sequence attending to itself: [1, heads, length, length].

    From index offsets, as T5X computes it: exact for unpacked rows and for packed rows whose
    positions count up by one inside each segment (pairs across segments are masked anyway).
    The 2*length-1 offsets are bucketed once and laid out as a Toeplitz matrix by slicing, so
    neither direction touches a [batch, q, k, buckets] one-hot or a scatter.
    """
    table = self._values(jnp.arange(1 - length, length)).T   # [heads, 2L-1]: k - q per diagonal
    return toeplitz(table, length).astype(dtype)[None]


def toeplitz(table, length: int):
  """[..., 2L-1] values by offset -> [..., L, L] with out[q, k] = table[k - q + L - 1].

  Repeating the table (padded to period 2L) and reading it back in rows of 2L-1 shifts each row
  by one: flat index q*(2L-1) + k + L-1 is congruent to k - q + L-1 modulo 2L.
  """
  period = 2 * length
  padded = jnp.pad(table, [(0, 0)] * (table.ndim - 1) + [(0, 1)])
  flat = jnp.tile(padded, (1,) * (table.ndim - 1) + (length,))
  rows = flat[..., length - 1: length - 1 + length * (period - 1)]
  return rows.reshape(table.shape[:-1] + (length, period - 1))[..., :length]


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
  cos, sin = (_as_table(t)[:, :, None, :] for t in (jnp.cos(angles), jnp.sin(angles)))
  x32 = x.astype(jnp.float32)
  x1, x2 = x32[..., : d // 2], x32[..., d // 2:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _as_table(x):
  """x [batch, ...], computed once into a buffer its consumers read.

  Fused into its consumers, RoPE's cos and sin of [b, l, d/2] would be evaluated again for every
  head, in the forward and again in the backward. XLA:CPU drops an optimization barrier before
  fusing, but keeps this identity gather (over each row's flattened values, so a batch sharding
  passes through) as a boundary: six RoPEs of [8, 320, 12, 64], forward and backward, took 86 ms
  evaluated per element, 32 ms from tables (44 ms gathering along the last axis alone).
  """
  rows = x.reshape(x.shape[0], -1)
  return jnp.take(rows, jnp.arange(rows.shape[1]), axis=1, unique_indices=True,
                  indices_are_sorted=True).reshape(x.shape)
