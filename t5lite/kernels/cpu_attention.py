"""Softmax attention for CPUs as an XLA FFI kernel (cpu_attention.cc), with its gradient.

XLA:CPU runs attention op by op: each op is a pass over the [queries, keys] scores in memory,
and its batched matmuls with head_dim 32-64 run far below the CPU's peak. The kernel keeps a
block of 32 queries' scores in cache from QK^T through the softmax to PV (and, in the
backward, recomputes them from the saved log-sum-exp), as flash attention does on GPUs, and
spreads (batch row, KV head) pairs over XLA's intra-op threads. `cache_attention` is a
decoding step's attention over a heads-major KV cache (no gradient of its own).

The C++ source is compiled on first use by `cpu_build` for this CPU (-march=native;
$T5LITE_CPU_ATTENTION_MARCH names another target, say a cluster's oldest CPU). Its vectors and
register tiles are tuned for AVX-512 and for AVX2 with FMA. Where the build fails (no compiler),
the target has neither or this CPU cannot run it (`refusal`: an older x86 CPU, ARM) or
T5LITE_CPU_ATTENTION_KERNEL=0, `available()` is False and callers fall back to XLA's attention
(the reason is logged once). q, k, v float32 or all bfloat16 (widened to float32 a block at a
time inside the kernel, which computes in float32 and narrows its outputs as it writes them);
head_dim a multiple of 16.
"""

import ctypes
import functools
import logging
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from t5lite.kernels import cpu_build

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_attention.cc")
# The library's sources: the attention's, and the matrix products' (cpu_matvec.py, cpu_matmul.py
# call them), which share its vectors (cpu_vectors.h) and threads (cpu_threads.h).
SOURCES = (SOURCE, os.path.join(os.path.dirname(SOURCE), "cpu_matmul.cc"))
# The CPU features (Linux's names) a build of each vector width runs on.
_NEEDS = {16: ("avx512f",), 8: ("avx2", "fma")}
# The FFI targets (forward, backward, decoding step over a cache) for each operand dtype, and
# the library's handler of each.
_TARGETS = {jnp.dtype(jnp.float32): ("t5lite_cpu_attention_forward",
                                     "t5lite_cpu_attention_backward",
                                     "t5lite_cpu_cache_attention"),
            jnp.dtype(jnp.bfloat16): ("t5lite_cpu_attention_forward_bf16",
                                      "t5lite_cpu_attention_backward_bf16",
                                      "t5lite_cpu_cache_attention_bf16")}
_HANDLERS = {"t5lite_cpu_attention_forward": "T5liteCpuAttentionForward",
             "t5lite_cpu_attention_backward": "T5liteCpuAttentionBackward",
             "t5lite_cpu_cache_attention": "T5liteCpuCacheAttention",
             "t5lite_cpu_attention_forward_bf16": "T5liteCpuAttentionForwardBf16",
             "t5lite_cpu_attention_backward_bf16": "T5liteCpuAttentionBackwardBf16",
             "t5lite_cpu_cache_attention_bf16": "T5liteCpuCacheAttentionBf16",
             "t5lite_cpu_matvec_bf16": "T5liteCpuMatvecBf16",
             "t5lite_cpu_matvec_bf16_f32": "T5liteCpuMatvecBf16F32",
             "t5lite_cpu_matvec_f32": "T5liteCpuMatvecF32",
             "t5lite_cpu_matmul_f32": "T5liteCpuMatmulF32",
             "t5lite_cpu_matmul_f32_f32": "T5liteCpuMatmulF32F32",
             "t5lite_cpu_matmul_bf16": "T5liteCpuMatmulBf16"}


def march() -> str:
  """The target the kernel is built for: $T5LITE_CPU_ATTENTION_MARCH, else "native"."""
  return os.environ.get("T5LITE_CPU_ATTENTION_MARCH") or "native"


def build(folder: Optional[str] = None) -> str:
  """The path of the kernel's shared library for `march()`, built on the first call
  (`cpu_build.build`); RuntimeError, with the compiler's message, when it cannot be."""
  return cpu_build.build(SOURCES, march(), folder)


def available() -> bool:
  """Whether the kernel is built and registered with XLA:CPU (builds it on the first call).
  False, with the reason logged once, where it cannot be built or loaded."""
  return library() is not None


@functools.lru_cache(maxsize=None)
def library():
  """The kernel's library (a ctypes handle), built, loaded and its handlers registered with
  XLA:CPU on the first call; None, with the reason logged once, where it cannot be built or
  loaded, the CPU cannot run it, or $T5LITE_CPU_ATTENTION_KERNEL is 0."""
  if os.environ.get("T5LITE_CPU_ATTENTION_KERNEL", "1") == "0":
    return None
  try:
    handle = ctypes.cdll.LoadLibrary(build())
    reason = refusal(handle)
    if reason:
      logging.warning("t5lite: CPU attention kernel not used, using XLA's attention: %s", reason)
      return None
    for target, handler in _HANDLERS.items():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(handle, handler)),
                                  platform="cpu")
  except (RuntimeError, OSError, AttributeError) as e:
    logging.warning("t5lite: CPU attention kernel unavailable, using XLA's attention: %s", e)
    return None
  return handle


def refusal(library) -> Optional[str]:
  """Why a built library (a ctypes handle) is not to be used, or None: built for a CPU with
  neither AVX-512 nor AVX2 with FMA, the vector widths and register tiles it is tuned for, or
  (on Linux, where the CPU's features are known) for one this CPU cannot run, say with
  $T5LITE_CPU_ATTENTION_MARCH naming a newer CPU (it would die of an illegal instruction)."""
  width = lanes(library)
  if not width:
    return "this CPU has neither AVX-512 nor AVX2 with FMA, which the kernel is written for"
  cpu = cpu_build.cpu_flags()
  missing = [f for f in _NEEDS[width] if cpu is not None and f not in cpu]
  if missing:
    return f"built for a CPU with {', '.join(missing)}, which this one lacks"
  return None


def lanes(library) -> int:
  """The floats per vector a built library (a ctypes handle) is tuned for: 16 (AVX-512), 8
  (AVX2 with FMA), or 0 (neither)."""
  return library.T5liteCpuAttentionLanes()


def supports(q, k, v, bias) -> bool:
  """Whether `attention` takes these operands: q, k, v all float32 or all bfloat16, head_dim a
  multiple of 16, query heads a multiple of KV heads, bias (if any) float32 or bfloat16 (the
  kernel reads it widened) [1 or batch, heads, q_len, k_len]."""
  b, q_len, heads, d = q.shape
  ok = (jnp.dtype(q.dtype) in _TARGETS and k.dtype == v.dtype == q.dtype and d % 16 == 0
        and heads % k.shape[2] == 0)
  return ok and _bias_fits(bias, b, (heads, q_len, k.shape[1]))


def _bias_fits(bias, b: int, per_row: tuple) -> bool:
  """Whether `bias` is None or a float32 / bfloat16 [1 or b, *per_row] array."""
  return bias is None or (jnp.dtype(bias.dtype) in _TARGETS and bias.ndim == 4
                          and bias.shape[0] in (1, b) and tuple(bias.shape[1:]) == per_row)


def attention(q, k, v, kv_lengths=None, bias=None, segments=None, prefix=None, *,
              scale: float, causal: bool):
  """Softmax attention of q [b, q_len, heads, d] over k, v [b, k_len, kv_heads, d].

  Keys at or past a row's `kv_lengths` (int [b]; default: none) are hidden, and under `causal`
  query i sees keys 0..i; `prefix` (a prefix LM, causal, q_len = k_len: int [b, q_len], nonzero
  on the prefix tokens) lets a prefix token see the later prefix tokens too; `segments` (packed
  rows: int (q_segments [b, q_len], k_segments [b, k_len]), 0 for padding) hides each key from
  the queries of other segments, and the padding from all; `bias` [1 or b, heads, q_len,
  k_len] is added to the scaled scores. A query that sees no key gets zeros. Differentiable in
  q, k, v and bias. Requires `available()` and `supports(q, k, v, bias)`; returns
  [b, q_len, heads, d] in q's dtype (bfloat16 operands: computed in float32, the output and
  the gradients of q, k, v rounded to bfloat16; the backward reads the bfloat16 output).
  """
  b = q.shape[0]
  if prefix is not None and not (causal and prefix.shape == q.shape[:2] == k.shape[:2]):
    raise ValueError("a prefix needs causal attention and [batch, length] prefix flags for "
                     f"queries and keys of one length: q {q.shape}, k {k.shape}, prefix "
                     f"{prefix.shape}, causal={causal}")
  lengths = (jnp.full((b,), k.shape[1], jnp.int32) if kv_lengths is None
             else kv_lengths.astype(jnp.int32))
  has_bias = bias is not None
  bias_in = bias.astype(jnp.float32) if has_bias else jnp.zeros((1, 1, 1, 1), jnp.float32)
  has_segments = segments is not None
  seg_in = (tuple(s.astype(jnp.int32) for s in segments) if has_segments
            else (jnp.zeros((1, 1), jnp.int32),) * 2)
  masks = seg_in + ((prefix if prefix is not None else jnp.zeros((1, 1))).astype(jnp.int32),)
  return _attention(q, k, v, lengths, bias_in, masks, float(scale), bool(causal), has_bias,
                    has_segments, prefix is not None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10))
def _attention(q, k, v, lengths, bias, masks, scale, causal, has_bias, has_segments,
               has_prefix):
  return _forward(q, k, v, lengths, bias, masks, scale, causal, has_bias, has_segments,
                  has_prefix)[0]


def _attrs(scale, causal, has_bias, has_segments, has_prefix):
  return dict(scale=np.float32(scale), causal=causal, has_bias=has_bias,
              has_segments=has_segments, has_prefix=has_prefix)


def _forward(q, k, v, lengths, bias, masks, scale, causal, has_bias, has_segments, has_prefix):
  """masks: (q_segments, k_segments, prefix), int32 (placeholders where not has_*)."""
  b, q_len, heads, _ = q.shape
  out, lse = jax.ffi.ffi_call(
      _TARGETS[jnp.dtype(q.dtype)][0], (jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, heads, q_len), jnp.float32)),
      vmap_method="sequential")(q, k, v, lengths, bias, *masks,
                                **_attrs(scale, causal, has_bias, has_segments, has_prefix))
  return out, (q, k, v, lengths, bias, masks, out, lse)


def _backward(scale, causal, has_bias, has_segments, has_prefix, saved, d_out):
  q, k, v, lengths, bias, masks, out, lse = saved
  d_q, d_k, d_v, d_bias = jax.ffi.ffi_call(
      _TARGETS[jnp.dtype(q.dtype)][1], (jax.ShapeDtypeStruct(q.shape, q.dtype),
                                        jax.ShapeDtypeStruct(k.shape, q.dtype),
                                        jax.ShapeDtypeStruct(v.shape, q.dtype),
                                        jax.ShapeDtypeStruct(bias.shape, jnp.float32)),
      vmap_method="sequential")(q, k, v, lengths, bias, *masks, out, lse,
                                d_out.astype(q.dtype),
                                **_attrs(scale, causal, has_bias, has_segments, has_prefix))
  return (d_q, d_k, d_v, None, d_bias if has_bias else jnp.zeros_like(bias),
          (None, None, None))


_attention.defvjp(_forward, _backward)


def supports_cache(q, k, v, bias) -> bool:
  """Whether `cache_attention` takes these operands: q [b, q_len, heads, d], k and v
  [b, kv_heads, k_len, d] heads-major, all float32 or all bfloat16, d a multiple of 16, heads a
  multiple of kv_heads, bias (if any) float32 or bfloat16 [1 or b, heads, q_len, k_len]."""
  b, q_len, heads, d = q.shape
  ok = (jnp.dtype(q.dtype) in _TARGETS and k.dtype == v.dtype == q.dtype and d % 16 == 0
        and k.shape == v.shape and k.shape[0] == b and k.shape[3] == d
        and heads % k.shape[1] == 0)
  return ok and _bias_fits(bias, b, (heads, q_len, k.shape[2]))


def cache_attention(q, k, v, visible, bias=None, *, scale: float):
  """A decoding step's attention: q [b, q_len, heads, d] over a heads-major cache k, v
  [b, kv_heads, k_len, d], where query i of row r sees key j if visible[r, i, j] (bool
  [b, q_len, k_len]); `bias` [1 or b, heads, q_len, k_len] is added to the scaled scores.
  Scores, softmax and sums in float32; returns [b, q_len, heads, d] in q's dtype, zeros for a
  query that sees no key. Not differentiable (callers that may be differentiated wrap it).
  Requires `available()` and `supports_cache(q, k, v, bias)`."""
  has_bias = bias is not None
  return jax.ffi.ffi_call(_TARGETS[jnp.dtype(q.dtype)][2],
                          jax.ShapeDtypeStruct(q.shape, q.dtype), vmap_method="sequential")(
      q, k, v, visible.astype(jnp.bool_),
      bias.astype(jnp.float32) if has_bias else jnp.zeros((1, 1, 1, 1), jnp.float32),
      scale=np.float32(scale), has_bias=has_bias)
