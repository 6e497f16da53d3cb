"""Flash attention for GPUs in Pallas (Triton): T5's relative-position bias and its gradient.

`attention(q, k, v, bias, ...)` is `attention_impl = "pallas"` (t5lite.models.attention.attend).
cuDNN's flash attention (runs/gpu.gin) spent 18.1 of T5-base's 84.1 ms step on an H100 in its
backward pass with a bias (about 90 TFLOP/s at head_dim 64, against about 120 without one;
docs/benchmarks.md, "One H100 (seventy-first session)"). This kernel computes the same function
another way, so that a GPU session can time the two side by side:

- forward: one program per (batch, head, block of queries), a loop over blocks of keys with the
  running maximum and sum (online softmax); writes the output and each query's log-sum-exp.
- backward: one program per (batch, head, block of keys), a loop over blocks of queries that
  recomputes the probabilities from the log-sum-exp and accumulates dK and dV; it writes each
  block's score gradient dS to device memory, which the bias gradient needs anyway (dbias is dS
  summed over the batch, where the bias is shared by the batch), and dQ is then one batched
  matmul of dS with K (cuBLAS, outside the kernel) instead of a second kernel that computes the
  probabilities again. dS is [batch, heads, q_len, k_len] in the inputs' dtype: transient,
  per layer (T5-base's encoder: 403 MB in bf16), so this suits T5's lengths rather than long
  contexts. Writing it and reading it twice costs memory traffic: XLA's H100 program of T5-base
  (b64 x (512+128)) moves 152 GB a step this way against 132 GB with cuDNN's attention, about
  6 ms at 3.35 TB/s, which the kernels' own speed must win back.

Masks: key lengths (`kv_lengths`, padding at the end), causal, and packed rows' segment ids (a
query sees keys of its own segment; segment 0 is padding). A row that sees no key (padding) gets
zeros (XLA's attention averages every value there). `interpret=True` runs the same kernels on
any backend (Pallas's interpreter: the CPU tests check them against plain attention). The tile
sizes and Triton's settings are a `Tiling`; `attend` takes $T5LITE_PALLAS_ATTENTION_TILING's.
"""

import dataclasses
import functools
import os
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

# A large finite negative score for masked pairs: exp() of it against any real maximum is 0, and
# a row with no visible key keeps a finite maximum (the forward pass then writes it zeros).
MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class Tiling:
  """Tile sizes of the two kernels and Triton's launch settings. The defaults are the sizes
  Triton's flash attention commonly takes at head_dim 64 on Hopper GPUs; not yet tuned here."""
  forward_q: int = 128    # queries a forward program holds
  forward_k: int = 64     # keys a forward loop step reads
  backward_k: int = 128   # keys a backward program holds
  backward_q: int = 32    # queries a backward loop step reads
  num_warps: int = 4
  num_stages: int = 3


TILING_ENV = "T5LITE_PALLAS_ATTENTION_TILING"


def tiling_from_env(environ=None) -> Tiling:
  """The Tiling $T5LITE_PALLAS_ATTENTION_TILING names (six integers: forward_q, forward_k,
  backward_k, backward_q, num_warps, num_stages, e.g. "128,64,128,32,4,3"), else the default:
  so a GPU session can time other tiles without editing code."""
  text = (os.environ if environ is None else environ).get(TILING_ENV, "").strip()
  if not text:
    return Tiling()
  try:
    values = [int(x) for x in text.split(",")]
  except ValueError:
    values = []
  if len(values) != 6 or any(v <= 0 for v in values):
    raise ValueError(f"${TILING_ENV}={text!r}: expected six positive integers (forward_q, "
                     f"forward_k, backward_k, backward_q, num_warps, num_stages)")
  return Tiling(*values)


def supported(q, k, tiling: Tiling = Tiling(), causal: bool = False) -> bool:
  """Whether `attention` takes these shapes: query and key lengths multiples of the tiles (or
  shorter than a tile and a power of two), head_dim a power of two of at least 16, and (causal)
  as many queries as keys."""
  return _tiles(q, k, tiling, causal) is not None


def _tiles(q, k, tiling: Tiling, causal: bool) -> Optional[Tiling]:
  """`tiling` cut to these shapes (`_resolve`), or None where `attention` does not take them."""
  d = q.shape[-1]
  if d < 16 or d & (d - 1) or (causal and q.shape[1] != k.shape[1]):
    return None
  return _resolve(tiling, q.shape[1], k.shape[1])


def _block(length: int, block: int) -> Optional[int]:
  """The block size used along a length, or None where the length does not tile."""
  if length % block == 0:
    return block
  if length < block and length & (length - 1) == 0 and length >= 16:
    return length
  return None


def _resolve(tiling: Tiling, q_len: int, k_len: int) -> Optional[Tiling]:
  """`tiling` with each tile cut to a length shorter than it, or None where one does not tile."""
  sizes = dict(forward_q=_block(q_len, tiling.forward_q), forward_k=_block(k_len, tiling.forward_k),
               backward_k=_block(k_len, tiling.backward_k),
               backward_q=_block(q_len, tiling.backward_q))
  if None in sizes.values():
    return None
  return dataclasses.replace(tiling, **sizes)


def attention(q, k, v, bias=None, kv_lengths=None, segments=None, *, scale: float,
              causal: bool = False, tiling: Tiling = Tiling(),
              interpret: Optional[bool] = None):
  """Softmax(scale * q k^T + bias, masked) v.

  q: [b, q_len, heads, d]; k, v: [b, k_len, kv_heads, d] (kv_heads divides heads); bias: None
  or [1 or b, heads, q_len, k_len]; kv_lengths: None or int [b]; segments: None or (int [b,
  q_len], int [b, k_len]); causal: query i sees keys j <= i. Returns [b, q_len, heads, d] in
  q's dtype. `interpret` (default: where the program is traced for a CPU) runs Pallas's
  interpreter. A `pallas_call` has no partitioning rule of its own: under a mesh, call it
  inside `shard_map`.
  """
  tiles = _tiles(q, k, tiling, causal)
  if tiles is None:
    raise ValueError(f"gpu_attention: q {q.shape}, k {k.shape}{' (causal)' if causal else ''} "
                     f"do not tile as {tiling} (lengths multiples of the tiles, head_dim a power "
                     f"of two >= 16, causal only with as many queries as keys)")
  if interpret is None:
    from t5lite import gpu_aot  # pylint: disable=import-outside-toplevel
    interpret = gpu_aot.tracing_platform() == "cpu"
  group = q.shape[2] // k.shape[2]
  if group > 1:   # grouped KV heads: each query head reads its group's (the gradient sums them)
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
  options = _Options(scale=float(scale), causal=causal, tiling=tiles, interpret=bool(interpret),
                     has_bias=bias is not None, has_lengths=kv_lengths is not None,
                     has_segments=segments is not None)
  # What a call does not have, the kernels do not read: one-element stand-ins keep one signature.
  one = lambda dtype: jnp.zeros((1,) * 2, dtype)  # noqa: E731
  bias = one(q.dtype)[None, None] if bias is None else bias.astype(q.dtype)
  lengths = one(jnp.int32)[0] if kv_lengths is None else kv_lengths.astype(jnp.int32)
  q_seg, k_seg = ((one(jnp.int32),) * 2 if segments is None
                  else tuple(s.astype(jnp.int32) for s in segments))
  return _attention(options, q, k, v, bias, lengths, q_seg, k_seg)


@dataclasses.dataclass(frozen=True)
class _Options:
  """Static settings of one attention call (hashable: custom_vjp's nondiff argument)."""
  scale: float
  causal: bool
  tiling: Tiling
  interpret: bool
  has_bias: bool
  has_lengths: bool
  has_segments: bool


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(options, q, k, v, bias, lengths, q_seg, k_seg):
  return _forward(options, q, k, v, bias, lengths, q_seg, k_seg)[0]


def _dot(a, b, trans_a: bool = False, trans_b: bool = False):
  """a @ b (either transposed) with float32 accumulation and result: Triton's tl.dot."""
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _scores(options, q, k, bias_tile, q_start, k_start, length, q_seg, k_seg):
  """scale * q k^T (+ bias) over one tile [queries, keys], float32, MASKED where a pair may
  not attend (only the masks the call has are computed)."""
  s = _dot(q, k, trans_b=True) * options.scale
  if options.has_bias:
    s = s + bias_tile.astype(jnp.float32)
  shape = s.shape
  visible = None
  both = lambda a, b: b if a is None else a & b  # noqa: E731
  if options.has_lengths or options.causal:
    cols = k_start + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
  if options.has_lengths:
    visible = both(visible, cols < length)
  if options.has_segments:
    visible = both(visible, (q_seg[:, None] == k_seg[None, :]) & (q_seg[:, None] > 0))
  if options.causal:
    rows = q_start + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    visible = both(visible, rows >= cols)
  return s if visible is None else jnp.where(visible, s, MASKED)


def _key_blocks(options, q_block_index, length, k_len):
  """How many key blocks a forward program's queries visit: up to the row's key length, and
  (causal) its last row."""
  bq, bk = options.tiling.forward_q, options.tiling.forward_k
  count = (length + bk - 1) // bk if options.has_lengths else k_len // bk
  if options.causal:
    count = jnp.minimum(count, ((q_block_index + 1) * bq + bk - 1) // bk)
  return count


def _forward_kernel(options, lengths_ref, q_ref, k_ref, v_ref, bias_ref, q_seg_ref, k_seg_ref,
                    o_ref, lse_ref):
  bq, bk = options.tiling.forward_q, options.tiling.forward_k
  i = pl.program_id(2)
  length = lengths_ref[0] if options.has_lengths else None
  q = q_ref[...]
  q_seg = q_seg_ref[...] if options.has_segments else None

  def body(j, carry):
    m, l, acc = carry
    keys = pl.ds(j * bk, bk)
    s = _scores(options, q, k_ref[keys, :], bias_ref[:, keys] if options.has_bias else None,
                i * bq, j * bk, length, q_seg, k_seg_ref[keys] if options.has_segments else None)
    m_new = jnp.maximum(m, s.max(axis=1))
    p = jnp.exp(s - m_new[:, None])
    alpha = jnp.exp(m - m_new)
    acc = acc * alpha[:, None] + _dot(p.astype(v_ref.dtype), v_ref[keys, :])
    return m_new, l * alpha + p.sum(axis=1), acc

  init = (jnp.full((bq,), MASKED, jnp.float32), jnp.zeros((bq,), jnp.float32),
          jnp.zeros((bq, q.shape[-1]), jnp.float32))
  m, l, acc = jax.lax.fori_loop(0, _key_blocks(options, i, length, k_ref.shape[0]), body, init)
  # A row that saw no key (padding; its m stayed MASKED) outputs 0, and its log-sum-exp is made
  # so large that the backward pass's probabilities for it are 0 too.
  seen = m > 0.5 * MASKED
  l = jnp.maximum(l, 1e-30)
  o_ref[...] = jnp.where(seen[:, None], acc / l[:, None], 0.0).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, m + jnp.log(l), -MASKED)


def _triton_params(tiling: Tiling):
  """Triton's launch settings (ignored by the interpreter)."""
  from jax.experimental.pallas import triton as pl_triton  # pylint: disable=import-outside-toplevel
  return pl_triton.CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages)


def _inputs_specs(options, q, k, bias, lengths, q_seg, k_seg, block: int, by_keys: bool):
  """BlockSpecs of (lengths, q, k, v, bias, q_seg, k_seg) for a grid (batch, head, block):
  blocks of `block` queries (forward) or keys (`by_keys`: the backward), the other side whole."""
  q_len, d = q.shape[1], q.shape[3]
  k_len = k.shape[1]
  b_bias, h_bias = bias.shape[0] > 1, bias.shape[1] > 1
  if by_keys:
    q_rows, q_at = q_len, lambda i: 0
    k_rows, k_at = block, lambda i: i
  else:
    q_rows, q_at = block, lambda i: i
    k_rows, k_at = k_len, lambda i: 0
  whole = lambda x: pl.BlockSpec(x.shape, lambda b, h, i: (0,) * x.ndim)  # noqa: E731
  return [
      pl.BlockSpec((1,), lambda b, h, i: (b,)) if options.has_lengths else whole(lengths),
      pl.BlockSpec((None, q_rows, None, d), lambda b, h, i: (b, q_at(i), h, 0)),
      pl.BlockSpec((None, k_rows, None, d), lambda b, h, i: (b, k_at(i), h, 0)),
      pl.BlockSpec((None, k_rows, None, d), lambda b, h, i: (b, k_at(i), h, 0)),
      pl.BlockSpec((None, None, q_rows, k_rows),
                   lambda b, h, i: (b if b_bias else 0, h if h_bias else 0, q_at(i), k_at(i)))
      if options.has_bias else pl.BlockSpec((None, None, 1, 1), lambda b, h, i: (0, 0, 0, 0)),
      pl.BlockSpec((None, q_rows), lambda b, h, i: (b, q_at(i)))
      if options.has_segments else whole(q_seg),
      pl.BlockSpec((None, k_rows), lambda b, h, i: (b, k_at(i)))
      if options.has_segments else whole(k_seg),
  ]


def _forward(options, q, k, v, bias, lengths, q_seg, k_seg):
  batch, q_len, heads, d = q.shape
  bq = options.tiling.forward_q
  out, lse = pl.pallas_call(
      functools.partial(_forward_kernel, options),
      grid=(batch, heads, q_len // bq),
      in_specs=_inputs_specs(options, q, k, bias, lengths, q_seg, k_seg, bq, by_keys=False),
      out_specs=[
          pl.BlockSpec((None, bq, None, d), lambda b, h, i: (b, i, h, 0)),
          pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i)),
      ],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32)],
      compiler_params=_triton_params(options.tiling),
      interpret=options.interpret,
      name="t5lite_attention_forward",
  )(lengths, q, k, v, bias, q_seg, k_seg)
  return out, (q, k, v, bias, lengths, q_seg, k_seg, out, lse)


def _backward_kernel(options, lengths_ref, q_ref, k_ref, v_ref, bias_ref, q_seg_ref, k_seg_ref,
                     do_ref, lse_ref, delta_ref, dk_ref, dv_ref, ds_ref):
  bq, bk = options.tiling.backward_q, options.tiling.backward_k
  j = pl.program_id(2)
  length = lengths_ref[0] if options.has_lengths else None
  k = k_ref[...]
  v = v_ref[...]
  k_seg = k_seg_ref[...] if options.has_segments else None
  # Causal: the query blocks wholly above this key block see none of it; their dS is zero.
  first = (j * bk) // bq if options.causal else 0

  def zeros(i, carry):
    ds_ref[pl.ds(i * bq, bq), :] = jnp.zeros((bq, bk), ds_ref.dtype)
    return carry

  jax.lax.fori_loop(0, first, zeros, 0)

  def body(i, carry):
    dk, dv = carry
    rows = pl.ds(i * bq, bq)
    q = q_ref[rows, :]
    do = do_ref[rows, :]
    s = _scores(options, q, k, bias_ref[rows, :] if options.has_bias else None, i * bq, j * bk,
                length, q_seg_ref[rows] if options.has_segments else None, k_seg)
    p = jnp.exp(s - lse_ref[rows][:, None])
    dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)
    ds = p * (_dot(do, v, trans_b=True) - delta_ref[rows][:, None])
    ds_ref[rows, :] = ds.astype(ds_ref.dtype)
    dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True)
    return dk, dv

  init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32))
  dk, dv = jax.lax.fori_loop(first, q_ref.shape[0] // bq, body, init)
  dk_ref[...] = (dk * options.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward(options, residuals, do):
  q, k, v, bias, lengths, q_seg, k_seg, out, lse = residuals
  batch, q_len, heads, d = q.shape
  k_len = k.shape[1]
  bk = options.tiling.backward_k
  # Each query's sum of o * do (the softmax gradient's row term), [b, heads, q_len].
  delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), do.astype(jnp.float32))
  rows = pl.BlockSpec((None, None, q_len), lambda b, h, j: (b, h, 0))
  dk, dv, ds = pl.pallas_call(
      functools.partial(_backward_kernel, options),
      grid=(batch, heads, k_len // bk),
      in_specs=_inputs_specs(options, q, k, bias, lengths, q_seg, k_seg, bk, by_keys=True) + [
          pl.BlockSpec((None, q_len, None, d), lambda b, h, j: (b, 0, h, 0)), rows, rows],
      out_specs=[
          pl.BlockSpec((None, bk, None, d), lambda b, h, j: (b, j, h, 0)),
          pl.BlockSpec((None, bk, None, d), lambda b, h, j: (b, j, h, 0)),
          pl.BlockSpec((None, None, q_len, bk), lambda b, h, j: (b, h, 0, j)),
      ],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype),
                 jax.ShapeDtypeStruct((batch, heads, q_len, k_len), q.dtype)],
      compiler_params=_triton_params(options.tiling),
      interpret=options.interpret,
      name="t5lite_attention_backward",
  )(lengths, q, k, v, bias, q_seg, k_seg, do, lse, delta)
  # dQ from dS: one batched matmul (cuBLAS on a GPU) instead of a kernel recomputing P.
  dq = (jnp.einsum("bhqk,bkhd->bqhd", ds, k, preferred_element_type=jnp.float32)
        * options.scale).astype(q.dtype)
  if options.has_bias:   # dS summed over what the bias is broadcast along
    axes = tuple(a for a in (0, 1) if bias.shape[a] == 1)
    dbias = ds.astype(jnp.float32).sum(axis=axes, keepdims=True).astype(bias.dtype)
  else:
    dbias = jnp.zeros_like(bias)
  return dq, dk, dv, dbias, None, None, None


_attention.defvjp(_forward, _backward)
