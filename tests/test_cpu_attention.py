"""The CPU attention kernel (t5lite/kernels/cpu_attention.cc through XLA's FFI): values and
gradients against jax.nn.dot_product_attention, its fallbacks, its build, and whole models."""

import ctypes
import functools
import os
import platform
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import skip_if_native_kernels_are_avx2, tiny_config
from test_models import _assert_same_loss_and_grads, random_batch
from t5lite.kernels import cpu_attention, cpu_build
from t5lite.models import attention
from t5lite.models.model import Model

needs_kernel = pytest.mark.skipif(not cpu_attention.available(),
                                  reason="the CPU attention kernel could not be built here")

CASES = {
    # name: (b, q_len, k_len, heads, kv_heads, d, causal, lengths, bias batch or None)
    "causal_grouped": (3, 150, 150, 4, 2, 32, True, None, None),
    "causal_lengths_bias": (2, 70, 70, 4, 4, 16, True, [70, 33], 1),
    "lengths_and_shared_bias": (3, 150, 150, 4, 2, 16, False, [150, 100, 7], 1),
    "cross_lengths_row_bias": (3, 40, 90, 2, 1, 64, False, [90, 51, 2], 3),
    # head_dim 80 and 48: the products' strips of 4 + 1 and 2 + 1 vectors
    "causal_head_dim_80": (2, 45, 45, 2, 1, 80, True, [45, 20], None),
    "head_dim_48_row_bias": (2, 37, 61, 3, 3, 48, False, None, 2),
    # one (row, KV head) pair: the forward and the backward share its query blocks out among
    # the threads (the backward's shares each with its own dK and dV), here with a bias of
    # batch 1 (shared: each share its own query rows of dBias)
    "one_row_one_kv_head": (1, 130, 130, 4, 1, 32, True, [111], None),
    "one_row_shared_bias": (1, 100, 100, 2, 1, 16, False, [90], 1),
}


def _operands(case, seed=0):
  b, q_len, k_len, heads, kv_heads, d, causal, lengths, bias_b = CASES[case]
  keys = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(keys[0], (b, q_len, heads, d))
  k, v = (jax.random.normal(r, (b, k_len, kv_heads, d)) for r in keys[1:3])
  bias = None if bias_b is None else jax.random.normal(keys[3], (bias_b, heads, q_len, k_len))
  lengths = None if lengths is None else jnp.array(lengths, jnp.int32)
  return q, k, v, bias, attention.Mask(causal=causal, kv_lengths=lengths)


@needs_kernel
@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_matches_jax_attention(case):
  """Outputs and the gradients of q, k, v and the bias (summed over the batch where it is
  shared) equal jax.nn.dot_product_attention's, for grouped queries, causal or not, hidden
  keys, query and key lengths that are not multiples of the kernel's blocks, head_dim 16-80."""
  q, k, v, bias, mask = _operands(case)
  ref = lambda q, k, v, bias: jax.nn.dot_product_attention(  # noqa: E731
      q, k, v, bias=bias, scale=0.3, is_causal=mask.causal,
      key_value_seq_lengths=mask.kv_lengths)
  ours = lambda q, k, v, bias: cpu_attention.attention(  # noqa: E731
      q, k, v, mask.kv_lengths, bias, scale=0.3, causal=mask.causal)
  # Both are within 3e-6 of a float64 reference (outputs of order 1).
  np.testing.assert_allclose(jax.jit(ours)(q, k, v, bias), jax.jit(ref)(q, k, v, bias),
                             atol=4e-6, rtol=2e-5)
  for got, want in zip(*_gradients((ours, ref), q, k, v, bias)):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=5e-5)


def _gradients(fns, q, k, v, bias):
  """Per attention function of (q, k, v, bias): its gradients in q, k, v (and the bias, if
  any) of sum(sin(out) * w) for fixed random weights w."""
  weights = jax.random.normal(jax.random.key(9), q.shape)
  argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
  return [jax.jit(jax.grad(lambda *a, fn=fn: jnp.sum(jnp.sin(fn(*a)) * weights), argnums))(
      q, k, v, bias) for fn in fns]


def _segments(b, length, runs):
  """int32 [b, length] segment ids: row r is `runs[r]` (segment, count) pairs, then padding (0)."""
  rows = [np.concatenate([np.full(n, seg) for seg, n in row] + [np.zeros(length, int)])[:length]
          for row in runs]
  return jnp.asarray(np.stack(rows[:b]), jnp.int32)


SEGMENT_CASES = {
    # name: (operands case, causal, q runs per row, k runs per row or None: the q runs)
    # packed decoder rows: causal, grouped queries, segments across the query blocks' edges
    "packed_causal_grouped": ("causal_grouped", True,
                              [[(1, 40), (2, 70), (3, 30)], [(1, 70), (2, 80)], [(1, 3), (2, 100)]],
                              None),
    # packed encoder rows: a bias shared by the rows, the last segment before the padding
    "packed_with_bias": ("lengths_and_shared_bias", False,
                         [[(1, 64), (2, 64), (3, 10)], [(1, 20), (2, 130)], [(1, 150)]], None),
    # cross-attention: the decoder's segments over the encoder's; row 1's segment 3 has no keys
    # (its queries see nothing), and the ids need not be contiguous (row 2 alternates)
    "packed_cross": ("cross_lengths_row_bias", False,
                     [[(1, 15), (2, 25)], [(1, 10), (3, 20)], [(1, 5), (2, 5)] * 4],
                     [[(1, 50), (2, 40)], [(1, 30), (2, 60)], [(2, 30), (1, 30), (2, 30)]]),
}


@needs_kernel
@pytest.mark.parametrize("case", sorted(SEGMENT_CASES))
def test_kernel_with_segment_ids_matches_jax_attention_with_their_mask(case):
  """Packed rows (`segments`): outputs and gradients equal jax.nn.dot_product_attention's with
  the dense same-segment mask, causal or not, with a bias, for cross-attention between
  different segmentations, and for ids that are not contiguous; queries of the padding or of
  a segment without keys get zeros (jax.nn would average over all keys there) and no gradient."""
  operands, causal, q_runs, k_runs = SEGMENT_CASES[case]
  q, k, v, bias, _ = _operands(operands, seed=4)
  q_seg = _segments(q.shape[0], q.shape[1], q_runs)
  k_seg = _segments(k.shape[0], k.shape[1], k_runs or q_runs)
  mask = attention.segment_mask(q_seg, k_seg, causal=causal)
  sees = np.asarray(mask.dense).any(-1)[:, 0]                          # [b, q_len]
  assert not sees.all() and sees.any()
  live = jnp.asarray(sees[:, :, None, None], jnp.float32)

  def ref(q, k, v, bias):
    return live * jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask.dense, scale=0.3)

  def ours(q, k, v, bias):
    return cpu_attention.attention(q, k, v, None, bias, mask.segments, scale=0.3,
                                   causal=causal)

  out = jax.jit(ours)(q, k, v, bias)
  assert np.all(np.asarray(out)[~sees] == 0)
  np.testing.assert_allclose(out, jax.jit(ref)(q, k, v, bias), atol=4e-6, rtol=2e-5)
  grads = _gradients((ours, ref), q, k, v, bias)
  for got, want in zip(*grads):
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, atol=5e-5)
  assert np.all(np.asarray(grads[0][0])[~sees] == 0)


def _flags(b, length, spans):
  """int32 [b, length]: 1 on row r's (start, stop) `spans[r]`."""
  flags = np.zeros((b, length), np.int32)
  for r, row in enumerate(spans[:b]):
    for start, stop in row:
      flags[r, start:stop] = 1
  return jnp.asarray(flags)


PREFIX_CASES = {
    # name: (operands case, segment runs per row, prefix (start, stop) spans per row)
    # a prefix LM's unpacked rows: inputs then targets, then padding; one row all prefix
    "unpacked_grouped": ("causal_grouped", [[(1, 150)], [(1, 120)], [(1, 31)]],
                         [[(0, 70)], [(0, 120)], [(0, 5)]]),
    # packed rows, each example with its own prefix (across query blocks' edges), a bias
    # shared by the rows
    "packed_shared_bias": ("lengths_and_shared_bias",
                           [[(1, 64), (2, 64), (3, 10)], [(1, 20), (2, 130)], [(1, 150)]],
                           [[(0, 40), (64, 100), (128, 130)], [(0, 5), (20, 90)], [(0, 149)]]),
    # flags no feature converter makes: a prefix after a gap, prefix tokens in the padding,
    # an example without a prefix
    "scattered": ("head_dim_48_row_bias", [[(1, 20), (2, 17)], [(1, 30)]],
                  [[(0, 3), (10, 15), (25, 37)], [(5, 6), (7, 37)]]),
}


@needs_kernel
@pytest.mark.parametrize("case", sorted(PREFIX_CASES))
def test_kernel_with_prefix_matches_jax_attention_with_the_prefix_lm_mask(case):
  """A prefix LM's rows (`prefix`: a prefix token sees the later prefix tokens of its segment
  too): outputs and gradients equal jax.nn.dot_product_attention's with the dense prefix-LM
  mask, for unpacked and packed rows, with a bias, and for any flags (not only a prefix at the
  start of each example)."""
  operands, runs, spans = PREFIX_CASES[case]
  q, k, v, bias, _ = _operands(operands, seed=6)
  k, v = k[:, :q.shape[1]], v[:, :q.shape[1]]
  if bias is not None:
    bias = bias[..., :q.shape[1]]
  seg = _segments(q.shape[0], q.shape[1], runs)
  prefix = _flags(q.shape[0], q.shape[1], spans)
  mask = attention.prefix_lm(seg, prefix)
  sees = np.asarray(mask.dense).any(-1)[:, 0]
  live = jnp.asarray(sees[:, :, None, None], jnp.float32)
  # more than causal: some query sees a later key
  assert (np.asarray(mask.dense) & ~np.asarray(attention.causal_mask(q.shape[1]))).any()

  def ref(q, k, v, bias):
    return live * jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask.dense, scale=0.3)

  def ours(q, k, v, bias):
    return cpu_attention.attention(q, k, v, None, bias, mask.segments, mask.prefix, scale=0.3,
                                   causal=True)

  np.testing.assert_allclose(jax.jit(ours)(q, k, v, bias), jax.jit(ref)(q, k, v, bias),
                             atol=4e-6, rtol=2e-5)
  for got, want in zip(*_gradients((ours, ref), q, k, v, bias)):
    np.testing.assert_allclose(got, want, atol=5e-5)


BF16_CASES = sorted(CASES) + ["segments", "prefix"]


@needs_kernel
@pytest.mark.parametrize("case", BF16_CASES)
def test_bf16_kernel_matches_the_float32_kernel(case):
  """bf16 operands go to the kernel's bf16 handlers, which widen them as they read them and
  compute in float32: the output is the float32 kernel's on the same values, rounded to bf16,
  bit for bit; dV (which does not read the output) too; dQ, dK and dBias (which read the bf16
  output where the float32 kernel reads its float32 one) are within twice the error of
  rounding the float32 kernel's to bf16. Every CASES shape (one row over one KV head: the
  backward's shares, each with float32 sums of its own narrowed at the end), packed rows and a
  prefix LM."""
  segments = prefix = None
  if case == "segments":
    q, k, v, bias, mask = _operands("causal_grouped", seed=4)
    segments = (_segments(3, 150, [[(1, 70), (2, 80)], [(1, 150)], [(3, 20), (1, 100)]]),) * 2
  elif case == "prefix":
    q, k, v, bias, mask = _operands("causal_grouped", seed=6)
    segments = (_segments(3, 150, [[(1, 150)], [(1, 120)], [(1, 31)]]),) * 2
    prefix = _flags(3, 150, [[(0, 70)], [(0, 120)], [(0, 5)]])
  else:
    q, k, v, bias, mask = _operands(case)
  bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  wide = [x.astype(jnp.float32) for x in bf16]

  def ours(q, k, v, bias):
    return cpu_attention.attention(q, k, v, mask.kv_lengths, bias, segments, prefix, scale=0.3,
                                   causal=mask.causal or prefix is not None)

  out_bf16, vjp_bf16 = jax.vjp(ours, *bf16, bias)
  out_wide, vjp_wide = jax.vjp(ours, *wide, bias)
  assert out_bf16.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out_bf16, np.float32),
                                np.asarray(out_wide.astype(jnp.bfloat16), np.float32))
  cotangent = jax.random.normal(jax.random.key(9), q.shape).astype(jnp.bfloat16)
  grads = zip(("q", "k", "v", "bias"), vjp_bf16(cotangent), vjp_wide(cotangent.astype(jnp.float32)))
  for name, got, want in grads:
    if got is None:
      continue
    assert got.dtype == (jnp.float32 if name == "bias" else jnp.bfloat16), name
    _assert_bf16_gradient(name, got, want)


def _assert_bf16_gradient(name, got, want):
  """The bf16 kernel's gradient `got` against the float32 kernel's `want` on the same values:
  dV (which does not read the output) bit for bit want rounded to bf16; the others (which read
  the bf16 output) within twice the error of that rounding."""
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  rounded = np.asarray(jnp.asarray(want).astype(jnp.bfloat16), np.float32)
  if name == "v":
    np.testing.assert_array_equal(got, rounded)
  err, rounding = (np.linalg.norm(x - want) / np.linalg.norm(want) for x in (got, rounded))
  assert err <= 2 * rounding, (name, err, rounding)


CACHE_CASES = {
    # name: (b, q_len, k_len, heads, kv_heads, d, masking)
    "step_grouped_dense_bias": (3, 1, 97, 6, 2, 32, "dense_and_bias"),
    "three_queries_lengths": (2, 3, 40, 4, 4, 64, "lengths"),
    "one_kv_head_dense": (1, 1, 130, 4, 1, 16, "dense"),
}


def _cache_operands(case, dtype=jnp.float32):
  b, q_len, k_len, heads, kv_heads, d, masking = CACHE_CASES[case]
  keys = jax.random.split(jax.random.key(3), 4)
  q = jax.random.normal(keys[0], (b, q_len, heads, d)).astype(dtype)
  k, v = (jax.random.normal(r, (b, kv_heads, k_len, d)).astype(dtype) for r in keys[1:3])
  bias = None
  if masking == "lengths":
    mask = attention.Mask(kv_lengths=jnp.array([k_len, 17, 1][:b]))
  else:  # causal over the cache's slots, left padding
    last = (k_len // 2 + np.arange(q_len))[None, :, None]
    first = np.array([0, 5, 19][:b])[:, None, None]
    slots = np.arange(k_len)[None, None]
    mask = attention.Mask(dense=jnp.asarray((slots <= last) & (slots >= first))[:, None])
    if masking == "dense_and_bias":
      bias = jax.random.normal(keys[3], (1, heads, q_len, k_len))
  return q, k, v, mask, bias


@needs_kernel
@pytest.mark.parametrize("case", sorted(CACHE_CASES))
def test_cache_kernel_matches_jax_attention(case):
  """A decoding step's attention over a heads-major cache (`attend_cache` with 'cpu_kernel'):
  the cache kernel runs, its output equals jax.nn.dot_product_attention's (grouped KV heads, one
  to three new queries, length or dense masks, T5's bias), its gradient is XLA's path's, and for
  bf16 operands it is the float32 kernel's on the same values, rounded, bit for bit."""
  q, k, v, mask, bias = _cache_operands(case)

  def ours(q, k, v, bias, impl="cpu_kernel"):
    return attention.attend_cache(q, k, v, mask, bias, scale=0.4, implementation=impl)

  assert "t5lite_cpu_cache_attention" in jax.jit(ours).lower(q, k, v, bias).as_text()
  want = jax.nn.dot_product_attention(
      q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), bias=bias, mask=mask.dense,
      scale=0.4, key_value_seq_lengths=mask.kv_lengths)
  got = jax.jit(ours)(q, k, v, bias)
  np.testing.assert_allclose(got, want, atol=3e-6)
  xla = functools.partial(ours, impl=None)
  argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
  objective = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a)))  # noqa: E731
  for g_kernel, g_xla in zip(jax.grad(objective(ours), argnums)(q, k, v, bias),
                             jax.grad(objective(xla), argnums)(q, k, v, bias)):
    # (the same function: they differ only through cos(out), out within 3e-6)
    np.testing.assert_allclose(g_kernel, g_xla, atol=1e-5)
  q16, k16, v16, _, _ = _cache_operands(case, jnp.bfloat16)
  got16 = jax.jit(ours)(q16, k16, v16, bias)
  assert got16.dtype == jnp.bfloat16
  wide = jax.jit(ours)(*(x.astype(jnp.float32) for x in (q16, k16, v16)), bias)
  np.testing.assert_array_equal(np.asarray(got16, np.float32),
                                np.asarray(wide.astype(jnp.bfloat16), np.float32))


@needs_kernel
def test_cache_kernel_is_not_used_where_it_does_not_apply():
  """attend_cache keeps XLA's attention without implementation='cpu_kernel', for head_dim 8 and
  in a program for several devices (a mesh set: XLA cannot partition the kernel's call); a mesh
  of one device is one device's program."""
  q, k, v, mask, bias = _cache_operands("step_grouped_dense_bias")

  def calls(q, k, v, mask, bias, impl="cpu_kernel"):
    fn = lambda q, k, v: attention.attend_cache(q, k, v, mask, bias, scale=0.4,  # noqa: E731
                                                implementation=impl)
    return "t5lite_cpu_cache_attention" in str(jax.make_jaxpr(fn)(q, k, v))

  assert calls(q, k, v, mask, bias)
  assert not calls(q, k, v, mask, bias, impl="chunked")
  assert not calls(q[..., :8], k[..., :8], v[..., :8], mask, bias)
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((2,), ("data",))):
    assert not calls(q, k, v, mask, bias)
  with jax.set_mesh(jax.make_mesh((1,), ("data",))):
    assert calls(q, k, v, mask, bias)


@needs_kernel
def test_kernel_rejects_a_prefix_it_cannot_apply():
  """A prefix needs causal attention over queries and keys of one length, with flags of that
  shape: otherwise a ValueError before anything runs."""
  q, k, v, _, _ = _operands("cross_lengths_row_bias")                 # 40 queries, 90 keys
  same = (q, k[:, :40], v[:, :40])
  flags = jnp.ones(q.shape[:2], jnp.int32)
  for args, prefix, causal in ((same, flags, False), ((q, k, v), flags, True),
                               (same, flags[:, :39], True)):
    with pytest.raises(ValueError, match="a prefix needs causal attention"):
      cpu_attention.attention(*args, prefix=prefix, scale=0.3, causal=causal)


@needs_kernel
def test_kernel_gradients_are_the_same_bits_from_run_to_run():
  """The gradient of a bias shared by the batch rows (T5's) sums over the rows on several
  threads: it is bit for bit the same in every run, as are the others (so a CPU run with the
  kernel resumes bit-identically). With one partial sum per thread it varied in its last bits
  with the threads' timing. So are a single row's, whose query blocks the threads share."""
  for b, kv in ((16, 4), (1, 1)):  # (1, 1): a row's query blocks shared out, dK / dV in shares
    keys = jax.random.split(jax.random.key(3), 4)
    q = jax.random.normal(keys[0], (b, 128, 4, 32))
    k, v = (jax.random.normal(r, (b, 128, kv, 32)) for r in keys[1:3])
    bias = jax.random.normal(keys[3], (1, 4, 128, 128))
    grad = jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(cpu_attention.attention(
        *a[:3], None, a[3], scale=0.2, causal=False))), (0, 1, 2, 3)))
    first = [np.asarray(g) for g in grad(q, k, v, bias)]
    for _ in range(50):
      for got, want in zip(grad(q, k, v, bias), first):
        np.testing.assert_array_equal(np.asarray(got), want)


@needs_kernel
def test_kernel_rejects_segment_ids_of_the_wrong_shape():
  """Segment ids that do not match the queries' and keys' [batch, length] are an error from
  the kernel, not a read past their end."""
  q, k, v, _, _ = _operands("causal_grouped")
  seg = jnp.ones((q.shape[0], q.shape[1] - 1), jnp.int32)
  with pytest.raises(Exception, match="segment ids must be"):
    jax.block_until_ready(cpu_attention.attention(q, k, v, segments=(seg, seg), scale=0.3,
                                                  causal=True))


@needs_kernel
def test_kernel_row_that_sees_no_key_gives_zeros():
  """A row whose keys are all hidden (length 0) gets zero outputs and passes no gradient (no
  NaN from an empty softmax); the other rows are unaffected."""
  q, k, v, _, _ = _operands("causal_grouped")
  lengths = jnp.array([0, 150, 40], jnp.int32)

  def fn(q, k, v):
    return cpu_attention.attention(q, k, v, lengths, scale=0.3, causal=True)

  out = jax.jit(fn)(q, k, v)
  assert np.all(np.asarray(out[0]) == 0)
  ref = jax.nn.dot_product_attention(q[1:], k[1:], v[1:], scale=0.3, is_causal=True,
                                     key_value_seq_lengths=lengths[1:])
  np.testing.assert_allclose(out[1:], ref, atol=2e-6)
  d_q, d_k, d_v = jax.grad(lambda *a: jnp.sum(fn(*a)), (0, 1, 2))(q, k, v)
  for g in (d_q, d_k, d_v):
    assert np.all(np.isfinite(g)) and np.all(np.asarray(g[0]) == 0)


def _calls_kernel(fn, *args) -> bool:
  return "t5lite_cpu_attention_forward" in jax.jit(fn).lower(*args).as_text()


@needs_kernel
def test_kernel_attention_falls_back_where_the_kernel_does_not_apply():
  """attend(implementation='cpu_kernel') runs the kernel for float32 with head_dim a multiple
  of 16 and causal / length / segment / prefix-LM masks, and for bfloat16 (bf16 handlers that
  compute in float32: the output is the float32 call's, rounded), and chunked_attention (same values) for a dense mask without
  segment ids (decoding's) or head_dim 8."""
  q, k, v, bias, mask = _operands("lengths_and_shared_bias")

  def attend(mask, q, k, v, bias):
    return attention.attend(q, k, v, mask, bias, scale=0.3, implementation="cpu_kernel")

  seg = jnp.asarray(np.repeat([[1] * 100 + [2] * 50], 3, 0), jnp.int32)
  for m in (mask, attention.segment_mask(seg, seg, causal=True),
            attention.prefix_lm(seg, seg == 1)):
    assert _calls_kernel(lambda *a, m=m: attend(m, *a), q, k, v, bias)
  dense = attention.Mask(dense=attention.prefix_lm_mask(seg, seg == 1))
  bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v, bias)]
  narrow = [x[..., :8] for x in (q, k, v)] + [bias]
  for m, args in ((dense, (q, k, v, bias)), (mask, narrow)):
    assert not _calls_kernel(lambda *a, m=m: attend(m, *a), *args)
    chunked = attention.attend(*args[:3], m, args[3], scale=0.3, implementation="chunked")
    np.testing.assert_allclose(np.asarray(attend(m, *args), np.float32),
                               np.asarray(chunked, np.float32), atol=1e-6)
  assert _calls_kernel(lambda *a: attend(mask, *a), *bf16)
  text = jax.jit(jax.grad(lambda *a: jnp.sum(attend(mask, *a).astype(jnp.float32)),
                          (0, 1, 2))).lower(*bf16).as_text()
  assert "t5lite_cpu_attention_forward_bf16" in text
  assert "t5lite_cpu_attention_backward_bf16" in text
  wide = [x.astype(jnp.float32) for x in bf16]
  for name, got, want in zip(("q", "k", "v", "bias"),
                             jax.vjp(lambda *a: attend(mask, *a), *bf16)[1](bf16[0]),
                             jax.vjp(lambda *a: attend(mask, *a), *wide)[1](wide[0])):
    # The bf16 kernel's backward reads the bf16 output (the float32 call, its float32 output)
    # and rounds its gradients to bf16.
    assert got.dtype == jnp.bfloat16
    _assert_bf16_gradient(name, got, want)
  got = attend(mask, *bf16)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(got, np.float32),
                                np.asarray(attend(mask, *wide).astype(jnp.bfloat16), np.float32))


@pytest.mark.parametrize("cxx", ["false", "/nonexistent/g++"])
def test_build_reports_the_compiler_error(cxx, tmp_path, monkeypatch):
  """A compiler that fails, or names no program, gives a RuntimeError with its command (no
  library left behind); `available()` turns that into False and a fallback."""
  monkeypatch.setenv("CXX", cxx)
  with pytest.raises(RuntimeError, match=re.escape(cxx) + " .* failed"):
    cpu_attention.build(str(tmp_path))
  assert not list(tmp_path.iterdir())


CPU_FLAGS = cpu_build.cpu_flags() or frozenset()


def _load_build(cache_dir=None):
  """The library built into cache_dir (default: t5lite's), loaded; skips without a compiler (a
  build that fails with one fails the test: the source must compile for every target)."""
  if not cpu_build.compiler():
    pytest.skip("no C++ compiler here")
  return ctypes.cdll.LoadLibrary(cpu_attention.build(cache_dir))


@pytest.mark.skipif(platform.machine() != "x86_64" or cpu_build.cpu_flags() is None,
                    reason="x86 targets, and the CPU's features from Linux")
@pytest.mark.parametrize("march,lanes,needs", [("x86-64", 0, ""), ("haswell", 8, "avx2 fma"),
                                               ("skylake-avx512", 16, "avx512f")])
def test_library_is_tuned_for_avx2_and_avx512_and_refused_without(march, lanes, needs, tmp_path,
                                                                   monkeypatch):
  """A build says which vectors it is tuned for: AVX-512's 16 floats, AVX2's 8, or none (the
  x86-64 baseline: SSE2), and the last is refused (XLA's attention is used instead); so is a
  build for features the CPU lacks (it would die of an illegal instruction)."""
  if not set(needs.split()) <= CPU_FLAGS:
    pytest.skip(f"this CPU cannot load a build for {march}")
  monkeypatch.setenv("T5LITE_CPU_ATTENTION_MARCH", march)
  library = _load_build(str(tmp_path))
  assert cpu_attention.lanes(library) == lanes
  assert (cpu_attention.refusal(library) is None) == (lanes > 0)
  monkeypatch.setattr(cpu_build, "cpu_features", lambda: "flags\t\t: fpu sse sse2")
  assert cpu_attention.refusal(library) is not None


@pytest.mark.skipif("avx512f" not in CPU_FLAGS, reason="no AVX-512 here")
def test_native_build_on_an_avx512_cpu_is_used():
  """On a CPU with AVX-512 the native build has the kernel's 16-float vectors, and is used."""
  assert cpu_attention.lanes(_load_build()) == 16
  assert cpu_attention.available()


@pytest.mark.skipif(not {"avx2", "fma"} <= CPU_FLAGS, reason="this CPU cannot run an AVX2 build")
@pytest.mark.skipif(not cpu_attention.available(), reason="no native kernel: no compiler here")
def test_avx2_build_passes_the_parity_tests(tmp_path):
  """The kernel built for AVX2 (-march=haswell: 8-float vectors, 6x2 register tiles) passes
  this file's value and gradient tests of the kernel (float32 and bf16, training and decoding
  steps), in a process that uses that build."""
  skip_if_native_kernels_are_avx2()
  env = dict(os.environ, T5LITE_CPU_ATTENTION_MARCH="haswell", T5LITE_CACHE_DIR=str(tmp_path))
  tests = ("kernel_matches_jax_attention or sees_no_key or segment_ids_matches or "
           "prefix_matches or bf16_kernel_matches")
  done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                         "-p", "no:xdist", "-k", tests, __file__],
                        env=env, capture_output=True, text=True, check=False,
                        cwd=os.path.dirname(__file__))
  summary = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
  assert done.returncode == 0 and "skipped" not in summary, done.stdout[-3000:] + done.stderr
  passed = (len(CASES) + 1 + len(SEGMENT_CASES) + len(PREFIX_CASES) + len(CACHE_CASES)
            + len(BF16_CASES))
  assert f"{passed} passed" in summary, summary
  (library,) = (tmp_path / "kernels").glob("*.so")
  assert cpu_attention.lanes(ctypes.cdll.LoadLibrary(str(library))) == 8


@needs_kernel
def test_build_is_cached_by_source():
  """The library is compiled once per source, compiler, flags and JAX version: a second build
  into the suite's cache (the first built it, or an earlier test did) returns that library
  untouched."""
  path = cpu_attention.build()
  mtime = os.stat(path).st_mtime_ns
  assert cpu_attention.build() == path and os.path.dirname(path) == cpu_build.cache_dir()
  assert os.stat(path).st_mtime_ns == mtime


@needs_kernel
def test_build_is_keyed_by_the_headers_beside_the_source(tmp_path):
  """A kernel's library is rebuilt when a header it includes (cpu_threads.h) changes."""
  kernels = os.path.dirname(cpu_attention.SOURCE)
  src = tmp_path / "src"
  src.mkdir()
  for name in ("cpu_transpose.cc", "cpu_threads.h"):
    (src / name).write_bytes(open(os.path.join(kernels, name), "rb").read())
  first = cpu_build.build(str(src / "cpu_transpose.cc"), None, str(tmp_path / "out"))
  assert cpu_build.build(str(src / "cpu_transpose.cc"), None, str(tmp_path / "out")) == first
  with open(src / "cpu_threads.h", "a", encoding="utf-8") as f:
    f.write("// changed\n")
  second = cpu_build.build(str(src / "cpu_transpose.cc"), None, str(tmp_path / "out"))
  assert second != first and os.path.exists(second)
  assert ctypes.cdll.LoadLibrary(second).T5liteCpuTranspose


def test_build_links_several_sources_into_one_library_keyed_by_each(tmp_path):
  """Sources built together (the attention's and the matrix products') make one library named
  for the first, holding the symbols of all; changing any one of them rebuilds it."""
  if not cpu_build.compiler():
    pytest.skip("no C++ compiler here")
  src = tmp_path / "src"
  src.mkdir()
  (src / "first.cc").write_text('extern "C" int First() { return 1; }\n')
  (src / "second.cc").write_text('extern "C" int Second() { return 2; }\n')
  sources = [str(src / "first.cc"), str(src / "second.cc")]
  path = cpu_build.build(sources, None, str(tmp_path / "out"))
  assert os.path.basename(path).startswith("first-")
  library = ctypes.cdll.LoadLibrary(path)
  assert (library.First(), library.Second()) == (1, 2)
  assert cpu_build.build(sources, None, str(tmp_path / "out")) == path
  (src / "second.cc").write_text('extern "C" int Second() { return 3; }\n')
  changed = cpu_build.build(sources, None, str(tmp_path / "out"))
  assert changed != path and ctypes.cdll.LoadLibrary(changed).Second() == 3


@needs_kernel
@pytest.mark.parametrize("variant", [dict(arch="encoder_decoder"),
                                     dict(arch="decoder_only", num_kv_heads=2),
                                     dict(arch="prefix_lm", position_encoding="relative",
                                          num_kv_heads=2)],
                         ids=["encoder_decoder", "decoder_only-gqa", "prefix_lm"])
def test_cpu_kernel_model_matches_chunked(variant):
  """attention_impl='cpu_kernel' gives the loss and gradients of 'chunked' for T5 (relative
  position bias shared by the batch, padded encoder rows, causal decoder, cross-attention), a
  grouped-query decoder and a prefix LM (90 prefix tokens, then 70 targets), on sequences
  several kernel blocks long."""
  variant = dict(variant, head_dim=16)
  batch = random_batch(tiny_config(**variant), batch=2, in_len=90, out_len=70, seed=3)
  model = Model(tiny_config(attention_impl="cpu_kernel", **variant))
  params = model.init(jax.random.key(0))
  assert "t5lite_cpu_attention_backward" in jax.jit(
      jax.grad(lambda p: model.loss(p, batch)[0])).lower(params).as_text()
  _assert_same_loss_and_grads(variant, batch, dict(attention_impl="chunked"),
                              dict(attention_impl="cpu_kernel"), loss_rtol=1e-5, atol=2e-6,
                              rtol=1e-4)


def _packed_batch(arch, vocab, input_runs, target_runs, seed=0):
  """Packed rows as t5lite's data pipeline makes them: per row, examples of the given lengths
  one after another, then padding; segment ids, positions restarting in each example,
  decoder inputs shifted right inside each example."""
  rng = np.random.default_rng(seed)

  def fields(runs, length):
    seg = np.zeros((len(runs), length), np.int32)
    pos = np.zeros_like(seg)
    for r, lens in enumerate(runs):
      starts = np.cumsum([0] + lens)
      for i, n in enumerate(lens):
        seg[r, starts[i]:starts[i + 1]] = i + 1
        pos[r, starts[i]:starts[i + 1]] = np.arange(n)
    return np.where(seg > 0, rng.integers(3, vocab, seg.shape), 0).astype(np.int32), seg, pos

  targets, seg, pos = fields(target_runs, 70)
  inputs = np.where(pos == 0, 0, np.roll(targets, 1, axis=1)).astype(np.int32)
  batch = {"decoder_input_tokens": inputs, "decoder_target_tokens": targets,
           "decoder_segment_ids": seg, "decoder_positions": pos}
  if arch == "encoder_decoder":
    tokens, enc_seg, enc_pos = fields(input_runs, 90)
    batch.update(encoder_input_tokens=tokens, encoder_segment_ids=enc_seg,
                 encoder_positions=enc_pos)
  else:
    batch["decoder_loss_weights"] = (targets > 0).astype(np.float32)
  if arch == "prefix_lm":  # each example's first 60% is its prefix (the inputs)
    size = np.zeros_like(seg)
    for r, lens in enumerate(target_runs):
      size[r, :sum(lens)] = np.repeat(lens, lens)
    batch["decoder_causal_attention"] = ((seg > 0) & (pos < 0.6 * size)).astype(np.int32)
  return batch


@needs_kernel
@pytest.mark.parametrize("variant", [dict(arch="encoder_decoder"),
                                     dict(arch="decoder_only", num_kv_heads=2),
                                     dict(arch="prefix_lm", num_kv_heads=2)],
                         ids=["encoder_decoder", "decoder_only-gqa", "prefix_lm"])
def test_cpu_kernel_on_packed_rows_matches_chunked(variant):
  """Packed rows (T5X's default for pretraining) go to the kernel as their segment ids, and
  give the loss and gradients of 'chunked' over the dense mask: the encoder's, the causal
  decoder's and the cross-attention's segments, a prefix LM's examples each with its own
  prefix, examples across the kernel's query blocks."""
  variant = dict(variant, head_dim=16)
  batch = _packed_batch(variant["arch"], tiny_config().vocab_size,
                        [[30, 41, 12], [40, 50]], [[20, 35, 5], [9, 50]], seed=5)
  model = Model(tiny_config(attention_impl="cpu_kernel", **variant))
  params = model.init(jax.random.key(0))
  hlo = jax.jit(jax.grad(lambda p: model.loss(p, batch)[0])).lower(params).as_text()
  assert "has_segments = true" in hlo
  assert ("has_prefix = true" in hlo) == (variant["arch"] == "prefix_lm")
  _assert_same_loss_and_grads(variant, batch, dict(attention_impl="chunked"),
                              dict(attention_impl="cpu_kernel"), loss_rtol=1e-5, atol=2e-6,
                              rtol=1e-4)


@needs_kernel
def test_remat_dots_no_batch_attention_keeps_the_attention_kernel_s_output():
  """dots_no_batch_attention keeps the CPU attention kernel's output as it keeps cuDNN's: the
  gradient program runs each layer's attention forward once, as without remat; dots_no_batch
  runs it again in the backward pass."""
  rng = np.random.default_rng(3)
  ids = rng.integers(3, 64, (2, 16)).astype(np.int32)
  batch = {"decoder_input_tokens": ids, "decoder_target_tokens": ids,
           "decoder_loss_weights": np.ones((2, 16), np.float32)}
  calls = {}
  for policy in ("none", "dots_no_batch", "dots_no_batch_attention"):
    model = Model(tiny_config(arch="decoder_only", num_kv_heads=2, head_dim=16,
                              attention_impl="cpu_kernel", remat_policy=policy))
    params = model.init(jax.random.key(0))
    program = jax.jit(jax.grad(lambda p, m=model: m.loss(p, batch)[0])).lower(params).compile()
    calls[policy] = program.as_text().count('custom_call_target="t5lite_cpu_attention_forward')
  assert calls["none"] > 0 and calls["dots_no_batch"] > calls["none"], calls
  assert calls["dots_no_batch_attention"] == calls["none"], calls
