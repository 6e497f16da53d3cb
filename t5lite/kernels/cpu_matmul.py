"""Training's bf16 matmuls with float32 outputs on AMX tiles, as an XLA FFI handler (`Matmul` in
cpu_attention.cc, built into the attention kernel's library beside the matvec's AMX code).

Under `ModelConfig.float32_dot_outputs` every projection of a bf16 model is a bf16 x bf16
matmul with a float32 output, which XLA:CPU (jaxlib 0.10) hands to YNNPACK's AMX kernels. Those
ran decoder-125m's output head ([2560, 768] x [768, 32000], its input and weight gradients) at
0.9-1.1 TFLOP/s on 2 cores of an Intel Xeon, and the layers' products at 1.3-1.8. The kernel
packs b as AMX reads it, a panel of columns over every row of b (about 1 MB, held in L2), and
multiplies 32 rows of a at a time into 2 x 2 tiles of sums, written once to c: the head's
products at 1.7-2.2 TFLOP/s (1.5-2.3x XLA's time), the layers' at 2.1-2.4 (1.3-1.5x). Sums are
float32 in the order AMX adds pairs of products, as YNNPACK's.

It runs where the CPU and this process have AMX (`amx_rows()` of cpu_matvec: Intel Sapphire
Rapids on, a native build) and k and n are multiples of 32; `t5lite.models.projection` asks
`supports` and otherwise keeps XLA's matmul.
"""

import jax
import jax.numpy as jnp

from t5lite.kernels import cpu_attention
from t5lite.kernels import cpu_matvec

_TARGET = "t5lite_cpu_matmul_bf16"


def supports(a, b) -> bool:
  """Whether `matmul` takes these operands: bf16 matrices a [m, k] and b [k, n] with k and n
  multiples of 32, on a CPU and process with AMX (builds the kernel to ask)."""
  return (a.ndim == 2 and b.ndim == 2 and a.dtype == b.dtype == jnp.bfloat16
          and a.shape[1] == b.shape[0] and a.shape[0] >= 1 and a.shape[1] % 32 == 0
          and b.shape[1] % 32 == 0 and cpu_matvec.amx_rows() > 0)


def available() -> bool:
  """Whether the kernel's library is built and registered with XLA:CPU (`cpu_attention`)."""
  return cpu_attention.available()


def matmul(a, b):
  """a @ b for bf16 a [m, k] and b [k, n], as float32 [m, n] (float32 sums). Requires
  `supports` and `available()`; no gradient of its own."""
  if not supports(a, b):
    raise ValueError("the CPU matmul takes bf16 a [m, k] and b [k, n], k and n multiples of 32, "
                     f"on a CPU with AMX (amx_rows() = {cpu_matvec.amx_rows()}); got "
                     f"{a.dtype} {a.shape} and {b.dtype} {b.shape}")
  return jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct((a.shape[0], b.shape[1]), jnp.float32))(
      a, b)
