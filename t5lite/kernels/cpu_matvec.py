"""A decoding step's projections on CPUs: products of a few rows (at most `MAX_ROWS`; up to 32
in float32, or in bf16 on CPUs with AMX) with a weight matrix, as an XLA FFI handler (`Matvec`
in cpu_matmul.cc, built into the attention kernel's library, whose vectors and threads it
shares).

Such a product reads each weight once for a few multiply-adds: it is bound by the bytes of the
weights read. XLA:CPU (jaxlib 0.10) runs a one-row bf16 product with its own dot emitter on
weights it first widens to fp32 (all of them, once per decode call, and then each step reads
twice their bytes), and YNNPACK runs 2-4 rows at about 10 GB/s. The kernel reads the bf16
weights as stored. Two cores of an Intel Xeon: [1, 768] x [768, 2048] 0.61 -> 0.13 ms,
[1, 768] x [32000, 768]^T (the output head) 26.8 -> 1.4 ms; weights read from memory (not
cache) at 12-18 GB/s, 1.5-2x XLA's speed at 4 rows.

With more rows (a step at batch 8-32) the products run on AMX tiles where the CPU has them
(Intel Sapphire Rapids on, a native build; `amx_rows()`): YNNPACK ran them at the rate of fp32
FMAs. Weights from memory, 2 cores: [32, 768] x [768, 3072] 0.61 -> 0.33 ms, [32, 768] x
[768, 768] 0.17 -> 0.08 ms, the head at 5-32 rows 1.06-1.5x. Products and sums are fp32; the
output is rounded to bf16 once, as XLA's fp32-accumulating dot is, or written fp32 where the
caller asks for it (`out_dtype`: the output head's logits).

Float32 products run here too (XLA:CPU's YNNPACK ran them at 40-60% of the FMA peak from cache,
less from memory): 1-4 rows as bf16's (against the head too), and 5-32 rows against [k, n]
weights a panel of columns at a time, copied once into a buffer as the first rows of x are
multiplied. Forty distinct weights of a shape (from memory), 2 cores of an Intel Xeon:
[1-4, 768] x [768, 2048] 1.2-2.0x XLA's speed, [5-32, 768] x [768, 2048] 1.3-1.7x, [5-32, 2048]
x [2048, 768] 1.2-1.4x, [1-4, 768] x [32000, 768]^T 1.05-1.3x.
"""

import functools

import jax
import jax.numpy as jnp

from t5lite.kernels import cpu_attention

MAX_ROWS = 4
# Rows of bf16 x the kernel takes against a transposed weight ([n, k]: the output head): at 3-4
# rows it sums each output across a vector's lanes too often to be faster than XLA's product.
MAX_ROWS_TRANSPOSED = 2
# Rows of float32 x the kernel takes against [k, n] weights.
MAX_ROWS_F32 = 32
# (operands' dtype, output dtype) -> the handler's target.
_TARGETS = {(jnp.dtype(jnp.bfloat16),) * 2: "t5lite_cpu_matvec_bf16",
            (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)): "t5lite_cpu_matvec_bf16_f32",
            (jnp.dtype(jnp.float32),) * 2: "t5lite_cpu_matvec_f32"}


@functools.lru_cache(maxsize=None)
def amx_rows() -> int:
  """The rows the kernel takes on AMX tiles (32), or 0 where the built library or this process
  has none (a CPU without AMX, a kernel that refuses it)."""
  library = cpu_attention.library()
  return int(library.T5liteCpuMatvecAmxRows()) if library is not None else 0


def supports(x, w, *, w_transposed: bool = False) -> bool:
  """Whether `matvec` takes these operands: x [rows, k] and w a matrix that contracts with it,
  both bf16 or both float32, and rows from 1 to: MAX_ROWS (MAX_ROWS_TRANSPOSED for bf16 with
  `w_transposed`); bf16, up to `amx_rows()` with k and n multiples of 32; float32 against [k, n]
  (not transposed), up to MAX_ROWS_F32 with n a multiple of 16."""
  if not (x.ndim == 2 and w.ndim == 2 and x.dtype == w.dtype
          and (jnp.dtype(x.dtype),) * 2 in _TARGETS
          and x.shape[1] == w.shape[int(w_transposed)] and x.shape[0] >= 1):
    return False
  rows, k, n = x.shape[0], x.shape[1], w.shape[1 - int(w_transposed)]
  if x.dtype == jnp.float32:
    return rows <= MAX_ROWS or (not w_transposed and rows <= MAX_ROWS_F32 and n % 16 == 0)
  if rows <= (MAX_ROWS_TRANSPOSED if w_transposed else MAX_ROWS):
    return True
  return rows <= amx_rows() and k % 32 == 0 and n % 32 == 0


def available() -> bool:
  """Whether the kernel is built and registered with XLA:CPU (`cpu_attention.available`)."""
  return cpu_attention.available()


def matvec(x, w, *, w_transposed: bool = False, out_dtype=None):
  """x @ w ([rows, k] x [k, n]), or x @ w.T with `w_transposed` (w stored [n, k], as the
  [vocab, embed] output head), with fp32 sums, in x's dtype or `out_dtype` (float32 for bf16
  operands: the sums unrounded). Requires `supports` and `available()`; no gradient of its own."""
  out_dtype = jnp.dtype(x.dtype if out_dtype is None else out_dtype)
  target = _TARGETS.get((jnp.dtype(x.dtype), out_dtype))
  if target is None:
    raise ValueError(f"the CPU matvec writes bf16 products as bf16 or float32 and float32 "
                     f"ones as float32; asked for {x.dtype} ones as {out_dtype}")
  if not supports(x, w, w_transposed=w_transposed):
    raise ValueError(f"the CPU matvec takes bf16 or float32 [1..{MAX_ROWS}, k] rows and a "
                     f"matrix [k, n] ([n, k] and at most {MAX_ROWS_TRANSPOSED} bf16 rows with "
                     f"w_transposed), up to {amx_rows()} bf16 rows with k and n multiples of 32 "
                     f"(AMX), or up to {MAX_ROWS_F32} float32 rows against [k, n], n a multiple "
                     f"of 16; got {x.dtype} {x.shape} and {w.dtype} {w.shape}")
  n = w.shape[0] if w_transposed else w.shape[1]
  return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((x.shape[0], n), out_dtype))(
                              x, w, nk=bool(w_transposed))
