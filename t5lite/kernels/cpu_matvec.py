"""A decoding step's bf16 projections on CPUs: products of a few rows (at most `MAX_ROWS`) with
a weight matrix, as an XLA FFI handler (`Matvec` in cpu_attention.cc, built into the attention
kernel's library, whose vectors and threads it shares).

Such a product reads each weight once for a few multiply-adds: it is bound by the bytes of the
weights read. XLA:CPU (jaxlib 0.10) runs a one-row bf16 product with its own dot emitter on
weights it first widens to fp32 (all of them, once per decode call, and then each step reads
twice their bytes), and YNNPACK runs 2-4 rows at about 10 GB/s. The kernel reads the bf16
weights as stored. Two cores of an Intel Xeon: [1, 768] x [768, 2048] 0.61 -> 0.13 ms,
[1, 768] x [32000, 768]^T (the output head) 26.8 -> 1.4 ms; weights read from memory (not
cache) at 12-18 GB/s, 1.5-2x XLA's speed at 4 rows. Float32
products are left to XLA, which runs them about as fast. Products and sums are fp32; the output
is rounded to bf16 once, as XLA's fp32-accumulating dot is.
"""

import jax
import jax.numpy as jnp

from t5lite.kernels import cpu_attention

MAX_ROWS = 4
# Rows of x the kernel takes against a transposed weight ([n, k]: the output head): at 3-4 rows
# it sums each output across a vector's lanes too often to be faster than XLA's product.
MAX_ROWS_TRANSPOSED = 2
_TARGET = "t5lite_cpu_matvec_bf16"


def supports(x, w, *, w_transposed: bool = False) -> bool:
  """Whether `matvec` takes these operands: x a bf16 [rows, k] with 1 <= rows <= MAX_ROWS
  (MAX_ROWS_TRANSPOSED with `w_transposed`), w a bf16 matrix that contracts with it."""
  limit = MAX_ROWS_TRANSPOSED if w_transposed else MAX_ROWS
  return (x.ndim == 2 and 1 <= x.shape[0] <= limit and w.ndim == 2
          and x.dtype == w.dtype == jnp.bfloat16 and x.shape[1] == w.shape[int(w_transposed)])


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
                     f"got {x.dtype} {x.shape} and {w.dtype} {w.shape}")
  n = w.shape[0] if w_transposed else w.shape[1]
  return jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct((x.shape[0], n), x.dtype))(
      x, w, nk=bool(w_transposed))
