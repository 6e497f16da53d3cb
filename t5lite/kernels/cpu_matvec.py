"""A decoding step's bf16 projections on CPUs: products of a few rows (at most `MAX_ROWS`; up to
32 on CPUs with AMX) with a weight matrix, as an XLA FFI handler (`Matvec` in cpu_attention.cc,
built into the attention kernel's library, whose vectors and threads it shares).

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
[768, 768] 0.17 -> 0.08 ms, the head at 5-32 rows 1.06-1.5x. Float32 products are left to XLA,
which runs them about as fast. Products and sums are fp32; the output is rounded to bf16 once, as
XLA's fp32-accumulating dot is.
"""

import functools

import jax
import jax.numpy as jnp

from t5lite.kernels import cpu_attention

MAX_ROWS = 4
# Rows of x the kernel takes against a transposed weight ([n, k]: the output head): at 3-4 rows
# it sums each output across a vector's lanes too often to be faster than XLA's product.
MAX_ROWS_TRANSPOSED = 2
_TARGET = "t5lite_cpu_matvec_bf16"


@functools.lru_cache(maxsize=None)
def amx_rows() -> int:
  """The rows the kernel takes on AMX tiles (32), or 0 where the built library or this process
  has none (a CPU without AMX, a kernel that refuses it)."""
  library = cpu_attention.library()
  return int(library.T5liteCpuMatvecAmxRows()) if library is not None else 0


def supports(x, w, *, w_transposed: bool = False) -> bool:
  """Whether `matvec` takes these operands: x a bf16 [rows, k] with 1 <= rows <= MAX_ROWS
  (MAX_ROWS_TRANSPOSED with `w_transposed`), or up to `amx_rows()` rows with k and n multiples
  of 32, and w a bf16 matrix that contracts with it."""
  if not (x.ndim == 2 and w.ndim == 2 and x.dtype == w.dtype == jnp.bfloat16
          and x.shape[1] == w.shape[int(w_transposed)] and x.shape[0] >= 1):
    return False
  rows, k, n = x.shape[0], x.shape[1], w.shape[1 - int(w_transposed)]
  if rows <= (MAX_ROWS_TRANSPOSED if w_transposed else MAX_ROWS):
    return True
  return rows <= amx_rows() and k % 32 == 0 and n % 32 == 0


def available() -> bool:
  """Whether the kernel is built and registered with XLA:CPU (`cpu_attention.available`)."""
  return cpu_attention.available()


def matvec(x, w, *, w_transposed: bool = False):
  """x @ w ([rows, k] x [k, n]), or x @ w.T with `w_transposed` (w stored [n, k], as the
  [vocab, embed] output head), in bf16 with fp32 sums. Requires `supports` and `available()`;
  no gradient of its own."""
  if not supports(x, w, w_transposed=w_transposed):
    raise ValueError(f"the CPU matvec takes bf16 [1..{MAX_ROWS}, k] rows and a bf16 matrix "
                     f"[k, n] ([n, k] and at most {MAX_ROWS_TRANSPOSED} rows with w_transposed), "
                     f"or up to {amx_rows()} rows with k and n multiples of 32 (AMX); got "
                     f"{x.dtype} {x.shape} and {w.dtype} {w.shape}")
  n = w.shape[0] if w_transposed else w.shape[1]
  return jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct((x.shape[0], n), x.dtype))(
      x, w, nk=bool(w_transposed))
