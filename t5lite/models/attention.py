"""Attention: masks and the attention functions (position encodings are in `positions`).

Masks are boolean `[batch, 1, q_len, k_len]` (True = may attend) built from segment ids, so packed
sequences never attend across examples; the attention itself goes through
`jax.nn.dot_product_attention`, which selects cuDNN flash attention on GPUs, or on CPU through
`kernel_attention` (t5lite's C++ kernel) or `chunked_attention`; decoding steps attend over a
heads-major KV cache with `attend_cache`.
"""

import contextlib
import contextvars
import functools
import math
import os
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

from t5lite import partitioning


class Mask(NamedTuple):
  """Which keys each query may see: all the conditions given.

  Unpacked rows, padded at the end, use `causal` and/or `kv_lengths` (int [batch]), the forms
  cuDNN flash attention handles natively without materializing a mask. Packed rows need `dense`
  (bool [batch, 1, q_len, k_len] from segment ids: `padding_mask`) and carry the ids it was made
  from in `segments` (int [batch, q_len], [batch, k_len]), which the CPU kernel reads instead;
  a causal packed row sets `causal` too. A prefix LM's rows (`prefix_lm`) carry their `prefix`
  flags (int [batch, length]) besides, and leave `causal` off (a prefix token sees the later
  prefix tokens). Masks of other shapes (a decoding step's over its KV cache) are `dense` alone;
  a prompt's fill carries segment ids too.
  """
  dense: Optional[jax.Array] = None
  causal: bool = False
  kv_lengths: Optional[jax.Array] = None
  segments: Optional[Tuple[jax.Array, jax.Array]] = None
  prefix: Optional[jax.Array] = None


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


def prefix_lm(segments, prefix) -> Mask:
  """The Mask of a prefix LM's rows (`prefix_lm_mask`), with the segment ids and prefix flags
  it is made from."""
  return Mask(dense=prefix_lm_mask(segments, prefix), segments=(segments, segments),
              prefix=prefix.astype(jnp.int32))


def segment_mask(q_segments, k_segments, causal: bool = False) -> Mask:
  """The Mask of packed rows: keys of the query's own segment (0: padding, sees nothing), and
  under `causal` only the keys up to the query's position."""
  dense = padding_mask(q_segments, k_segments)
  if causal:
    dense = dense & causal_mask(q_segments.shape[1])
  return Mask(dense=dense, causal=causal, segments=(q_segments, k_segments))


CHUNK = 64  # queries per block of chunked_attention

_WITHOUT_CUDNN = contextvars.ContextVar("t5lite_attention_without_cudnn", default=False)


@contextlib.contextmanager
def without_cudnn():
  """Within it, `attend(implementation="cudnn")` runs XLA's attention instead.

  For programs traced inside a partially manual `shard_map` (pipeline stages: `stage` manual,
  data / FSDP / tensor automatic): there JAX's cuDNN attention partitioner (jax 0.10 and 0.11)
  gets shardings it cannot read ("'GSPMDSharding' object has no attribute 'spec'") and XLA's GPU
  compile fails; tests/test_gpu_aot.py compiles a pipelined step for H100s to show it."""
  token = _WITHOUT_CUDNN.set(True)
  try:
    yield
  finally:
    _WITHOUT_CUDNN.reset(token)


def attend(q, k, v, mask: Mask, bias=None, *, scale: float, implementation=None):
  """Scaled dot-product attention with grouped KV heads.

  q: [b, q_len, heads, d]; k, v: [b, k_len, kv_heads, d]; mask: a Mask;
  bias: [1 or b, heads, q_len, k_len]. Returns [b, q_len, heads, d].
  `implementation`: None (jax picks), 'xla' or 'cudnn' go to jax.nn.dot_product_attention;
  'chunked' to `chunked_attention`, 'cpu_kernel' to `kernel_attention`, 'pallas' to
  t5lite.kernels.gpu_attention (where `_pallas_applies`; else 'cudnn' on GPUs, jax's choice
  elsewhere).
  """
  if implementation == "pallas":
    from t5lite.kernels import gpu_attention  # pylint: disable=import-outside-toplevel
    tiling = gpu_attention.tiling_from_env()
    if _pallas_applies(q, k, mask, bias, tiling):
      return gpu_attention.attention(q, k, v, bias, mask.kv_lengths, mask.segments, scale=scale,
                                     causal=mask.causal, tiling=tiling)
    from t5lite import gpu_aot  # pylint: disable=import-outside-toplevel
    implementation = "cudnn" if gpu_aot.tracing_platform() == "gpu" else None
  if implementation == "cudnn" and _WITHOUT_CUDNN.get():
    implementation = "xla"
  if bias is not None:
    bias = bias.astype(q.dtype)
  if implementation == "cpu_kernel":
    return kernel_attention(q, k, v, mask, bias, scale=scale)
  if bias is not None:
    # cuDNN (GPU only) takes a batch-1 bias as it is, whatever host traces the program (the
    # host may be a CPU compiling for a GPU: t5lite.gpu_aot).
    if (bias.shape[0] == 1 < q.shape[0] and implementation != "cudnn"
        and jax.default_backend() == "cpu"):
      bias = _broadcast_batch(bias, q.shape[0])
  if implementation == "chunked":
    return chunked_attention(q, k, v, mask, bias, scale=scale)
  return jax.nn.dot_product_attention(
      q, k, v, bias=bias, mask=mask.dense, scale=scale, is_causal=mask.causal,
      key_value_seq_lengths=mask.kv_lengths, implementation=implementation)


def _pallas_applies(q, k, mask: Mask, bias, tiling) -> bool:
  """Whether t5lite.kernels.gpu_attention takes this call under `tiling`: attention with a bias
  (T5's; its backward writes the score gradient, which only a bias gradient repays: cuDNN keeps
  the rest), key lengths, causal and segment-id masks (not a prefix LM's or a bare dense mask),
  shapes the kernel takes, one device's program (a `pallas_call` has no partitioning rule), not
  inside pipeline stages."""
  from t5lite.kernels import gpu_attention  # pylint: disable=import-outside-toplevel
  return (bias is not None and mask.prefix is None
          and (mask.dense is None or mask.segments is not None)
          and gpu_attention.supported(q, k, tiling, mask.causal)
          and partitioning.one_device_program()
          and not _WITHOUT_CUDNN.get())


def _broadcast_batch(bias, batch: int):
  """[1, ...] -> [batch, ...] as an outer product with ones, so the gradient's sum over the
  batch is a matmul: XLA:CPU sums over a leading axis ~50x slower than the same dot (CPU only:
  on GPU, cuDNN takes the batch-1 bias as it is)."""
  return jnp.einsum("b,...->b...", jnp.ones((batch,), bias.dtype), bias[0])


def chunked_attention(q, k, v, mask: Mask, bias=None, *, scale: float, chunk: int = CHUNK,
                      streams: Optional[int] = None):
  """`attend` one block of `chunk` queries at a time (the 'chunked' implementation).

  Each block's scores [b, kv_heads, chunk, group, keys] stay small enough for the CPU's caches,
  and under a causal mask a block stops at its last query's key, skipping the blocks above the
  diagonal (40% of the scores at 320 tokens, half for long sequences). Queries, keys and values
  are laid out heads-major once, so the blocks slice contiguous rows. Scores and softmax in
  float32, as jax.nn.dot_product_attention computes them. Measured on XLA:CPU (runs/cpu.gin);
  on GPUs cuDNN's flash attention does all of this in one kernel.

  `streams`: the batch is cut into this many row groups, each attended on its own. XLA:CPU runs
  independent ops concurrently but each block's small matmuls and softmax on one core, so one
  group per core puts them all to work (decoder-tiny, b8 x 320, 2 cores, in-process A/B over
  seven runs: 1% to 13% faster, 6% on average). Default: on a single device, the greatest
  common divisor of the batch and the host's core count; with more devices, 1 (the batch is
  sharded, and a cut across shards would move rows between devices).
  """
  b = q.shape[0]
  if streams is None:
    streams = math.gcd(b, _host_cores()) if partitioning.one_device_program() else 1
  if streams <= 1:
    return _chunked_rows(q, k, v, mask, bias, scale=scale, chunk=chunk)
  if b % streams:
    raise ValueError(f"streams={streams} does not divide the batch ({b})")
  n = b // streams

  def rows(x, i):
    return x if x is None or x.shape[0] == 1 else x[i * n:(i + 1) * n]

  return jnp.concatenate([
      _chunked_rows(rows(q, i), rows(k, i), rows(v, i),
                    Mask(rows(mask.dense, i), mask.causal, rows(mask.kv_lengths, i)),
                    rows(bias, i), scale=scale, chunk=chunk)
      for i in range(streams)])


def kernel_attention(q, k, v, mask: Mask, bias=None, *, scale: float):
  """`attend` through t5lite.kernels.cpu_attention (the 'cpu_kernel' implementation).

  One compiled C++ kernel keeps each block of queries' scores in cache from QK^T through the
  softmax to PV, where XLA:CPU makes a pass over memory per op, and spreads the batch rows and
  KV heads over XLA's intra-op threads. Decoder-tiny's attention (b8 x 320, 4 query / 2 KV
  heads of 32), forward and backward, on an Intel Xeon: XLA's 23 ms -> 8.4 ms on one core, 13
  -> 5.7 ms on two.

  Packed rows go to the kernel as their segment ids (`mask.segments`), a prefix LM's rows as
  their segment ids and prefix flags (`mask.prefix`). On a mesh (under
  `partitioning.activation_rules`) each device runs the kernel on its block of batch rows and
  heads (`partitioning.per_shard`). Falls back to `chunked_attention` where the kernel does not
  apply: a program for more than one device outside activation rules (inside a pipeline stage,
  where XLA would gather the batch onto every device), a program traced for a GPU by
  t5lite.gpu_aot, a dense mask without segment ids, neither float32 nor bfloat16 (the kernel
  widens bfloat16 as it reads it), head_dim not a multiple of 16, or no kernel
  (`cpu_attention.available()`: no C++ compiler, a CPU with neither AVX-512 nor AVX2, or
  switched off).
  """
  from t5lite import gpu_aot  # pylint: disable=import-outside-toplevel
  from t5lite.kernels import cpu_attention  # pylint: disable=import-outside-toplevel
  if not (gpu_aot.tracing_platform() == "cpu"
          and (partitioning.one_device_program() or partitioning.rules_active())
          and (mask.dense is None or mask.segments is not None)
          and cpu_attention.supports(q, k, v, bias)
          and cpu_attention.available()):
    if bias is not None and bias.shape[0] == 1 < q.shape[0]:
      bias = _broadcast_batch(bias, q.shape[0])
    return chunked_attention(q, k, v, mask, bias, scale=scale)
  rows = ("batch", None, "heads", None)
  operands, axes = [q, k, v], [rows, rows, rows]
  q_segments, k_segments = mask.segments if mask.segments is not None else (None, None)
  optional = {"kv_lengths": (mask.kv_lengths, ("batch",)),
              "bias": (bias, (None if bias is None or bias.shape[0] == 1 else "batch",
                              "heads", None, None)),
              "q_segments": (q_segments, ("batch", None)),
              "k_segments": (k_segments, ("batch", None)),
              "prefix": (mask.prefix, ("batch", None))}
  present = [name for name, (x, _) in optional.items() if x is not None]
  for name in present:
    operands.append(optional[name][0])
    axes.append(optional[name][1])

  def block(q, k, v, *rest):
    given = dict(zip(present, rest))
    segments = ((given["q_segments"], given["k_segments"]) if "q_segments" in given
                else None)
    return (cpu_attention.attention(q, k, v, given.get("kv_lengths"), given.get("bias"),
                                    segments, given.get("prefix"), scale=scale,
                                    causal=mask.causal or mask.prefix is not None),)

  return partitioning.per_shard(block, axes, (rows,))(*operands)[0]


def _host_cores() -> int:
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def _chunked_rows(q, k, v, mask: Mask, bias, *, scale: float, chunk: int):
  """`chunked_attention` of one group of rows."""
  return _heads_major_blocks(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask, bias,
                             scale=scale, chunk=chunk)


def _heads_major_blocks(q, k, v, mask: Mask, bias, *, scale: float, chunk: int):
  """Attention of q [b, q_len, heads, d] over heads-major k, v [b, kv_heads, k_len, d], in
  blocks of `chunk` queries (under a causal mask each block stops at its last query's key).
  Returns [b, q_len, heads, d]."""
  b, q_len, heads, d = q.shape
  kv_heads, k_len = k.shape[1], k.shape[2]
  group = heads // kv_heads
  q = q.reshape(b, q_len, kv_heads, group, d).transpose(0, 2, 1, 3, 4)    # [b, kv, q, g, d]
  if bias is not None:                                                    # [b|1, kv, q, g, k]
    bias = bias.reshape(bias.shape[0], kv_heads, group, q_len, k_len).transpose(0, 1, 3, 2, 4)
  outputs = []
  for start in range(0, q_len, chunk):
    stop = min(start + chunk, q_len)
    keys = min(stop, k_len) if mask.causal else k_len
    outputs.append(_heads_major_attention(
        q[:, :, start:stop], k[:, :, :keys], v[:, :, :keys], _visible(mask, start, stop, keys),
        None if bias is None else bias[:, :, start:stop, :, :keys], scale))
  out = outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs, axis=2)
  return out.transpose(0, 2, 1, 3, 4).reshape(b, q_len, heads, d)


def _visible(mask: Mask, start: int, stop: int, keys: int):
  """Which of the first `keys` keys queries start..stop-1 see: bool broadcastable to
  [b, kv_heads, queries, group, keys]."""
  visible = jnp.ones((1, 1, 1, 1, keys), bool)
  if mask.causal:
    visible = visible & (jnp.arange(keys) <= jnp.arange(start, stop)[:, None, None])
  if mask.kv_lengths is not None:
    visible = visible & (jnp.arange(keys) < mask.kv_lengths[:, None, None, None, None])
  if mask.dense is not None:
    visible = visible & mask.dense[:, :, start:stop, None, :keys]
  return visible


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _heads_major_attention(q, k, v, visible, bias, scale: float):
  """Softmax attention in the heads-major layout: q [b, kv_heads, queries, group, d], k and v
  [b, kv_heads, keys, d], visible and bias broadcastable to [b, kv_heads, queries, group, keys].
  Scores and softmax in float32, as jax.nn.dot_product_attention computes them.

  Its gradient is written out (`_heads_major_backward`) as flash attention's is: the softmax's
  backward takes each row's sum over the head dimension, dO . O, instead of autodiff's sum over
  the keys of dP * P (on XLA:CPU that [.., keys] reduction cost more than the block's matmuls).
  """
  return _heads_major_forward(q, k, v, visible, bias, scale)[0]


def _heads_major_forward(q, k, v, visible, bias, scale: float):
  scores = jnp.einsum("bkqgd,bksd->bkqgs", q, k, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    scores = scores + bias.astype(jnp.float32)
  scores = jnp.where(visible, scores, -0.7 * jnp.finfo(jnp.float32).max)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkqgs,bksd->bkqgd", probs, v)
  return out, (q, k, v, visible, bias, probs, out)


def _heads_major_backward(scale: float, saved, d_out):
  """Gradients of `_heads_major_attention` from its probabilities and output (both saved):
  dS = P * (dP - rowsum(dO * O)), zero where a key is hidden (fully hidden rows included)."""
  q, k, v, visible, bias, probs, out = saved
  d_v = jnp.einsum("bkqgs,bkqgd->bksd", probs, d_out)
  d_probs = jnp.einsum("bkqgd,bksd->bkqgs", d_out, v, preferred_element_type=jnp.float32)
  row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  d_scores = jnp.where(visible, probs.astype(jnp.float32) * (d_probs - row), 0.0)
  d_bias = None if bias is None else _sum_to_shape(d_scores, bias.shape).astype(bias.dtype)
  d_scaled = (d_scores * scale).astype(q.dtype)
  d_q = jnp.einsum("bkqgs,bksd->bkqgd", d_scaled, k)
  d_k = jnp.einsum("bkqgs,bkqgd->bksd", d_scaled, q)
  return d_q, d_k, d_v, None, d_bias


_heads_major_attention.defvjp(_heads_major_forward, _heads_major_backward)


def _sum_to_shape(x, shape):
  """Sums x over the axes that `shape` (same rank) broadcasts, keeping them as size 1."""
  axes = tuple(i for i, (n, m) in enumerate(zip(x.shape, shape)) if m == 1 and n != 1)
  return jnp.sum(x, axis=axes, keepdims=True) if axes else x


def attend_cache(q, k, v, mask: Mask, bias=None, *, scale: float, implementation=None):
  """Attention of a few new queries over a decoding cache kept heads-major.

  q: [b, q_len, heads, d]; k, v: [b, kv_heads, k_len, d] (each head's keys contiguous, so the
  score and value matmuls read the cache as it lies, without a transposed copy of it per step);
  mask: a Mask over [q_len, k_len]; bias: [1 or b, heads, q_len, k_len]. Returns
  [b, q_len, heads, d].

  With `implementation="cpu_kernel"`, on one CPU device, the step goes to
  t5lite.kernels.cpu_attention's cache kernel where it applies (float32 or bfloat16 read as
  stored, head_dim a multiple of 16; a query that sees no key then gets zeros, where XLA's
  attention averages every key): XLA:CPU runs the step's [1, d] x [d, k_len] products as one
  small matmul per row and head (~5 GFLOP/s) and widens a bf16 cache to float32 in memory every
  step. Its gradient, if asked for, is XLA's.
  """
  if implementation == "cpu_kernel" and _cache_kernel_applies(q, k, v, mask, bias):
    b, q_len = q.shape[:2]
    visible = jnp.broadcast_to(_visible(mask, 0, q_len, k.shape[2]),
                               (b, 1, q_len, 1, k.shape[2]))[:, 0, :, 0, :]
    return _cache_kernel(q, k, v, visible, bias, scale)
  return _heads_major_blocks(q, k, v, mask, bias, scale=scale, chunk=q.shape[1])


def _cache_kernel_applies(q, k, v, mask: Mask, bias) -> bool:
  from t5lite import gpu_aot  # pylint: disable=import-outside-toplevel
  from t5lite.kernels import cpu_attention  # pylint: disable=import-outside-toplevel
  return (gpu_aot.tracing_platform() == "cpu" and partitioning.one_device_program()
          and mask.segments is None and mask.prefix is None
          and (mask.dense is None or mask.dense.shape[1] == 1)
          and cpu_attention.supports_cache(q, k, v, bias)
          and cpu_attention.available())


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _cache_kernel(q, k, v, visible, bias, scale: float):
  from t5lite.kernels import cpu_attention  # pylint: disable=import-outside-toplevel
  return cpu_attention.cache_attention(q, k, v, visible, bias, scale=scale)


def _cache_kernel_forward(q, k, v, visible, bias, scale: float):
  return _cache_kernel(q, k, v, visible, bias, scale), (q, k, v, visible, bias)


def _cache_kernel_backward(scale: float, saved, d_out):
  """XLA's gradient (the step's attention over the visible keys, `_heads_major_blocks`)."""
  q, k, v, visible, bias = saved
  mask = Mask(dense=visible[:, None])
  _, vjp = jax.vjp(lambda q, k, v, bias: _heads_major_blocks(q, k, v, mask, bias, scale=scale,
                                                             chunk=q.shape[1]), q, k, v, bias)
  d_q, d_k, d_v, d_bias = vjp(d_out)
  return d_q, d_k, d_v, None, d_bias


_cache_kernel.defvjp(_cache_kernel_forward, _cache_kernel_backward)
