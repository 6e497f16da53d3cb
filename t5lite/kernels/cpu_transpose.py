"""A bf16 or fp32 matrix transpose for CPUs as an XLA FFI kernel (cpu_transpose.cc).

XLA:CPU writes a transposed copy one strided element at a time (~1 GB/s on 2 cores of an Intel
Xeon); the kernel moves 64 x 64 tiles (8-15 GB/s), fp32 ones on x86-64 as 16 x 16 blocks read and
written a whole cache line per row (2 cores of AMD Zen 3: [2048, 512] 7 -> 27 GB/s, [2048,
1024] 4 -> 12, [512, 1024] 4 -> 34; the tiles' rows, a power of two apart, had evicted each
other from L1). The weight gradient of
`t5lite.models.projection` on t5lite's matmul kernel (bf16 under float32_outputs, or fp32 with
matmul_kernel) needs its activations transposed in memory: for decoder-125m's bf16 train step
that was ~10% of the step in XLA's transposes. Built by `cpu_build`
without -march, so that it runs on any CPU of the host's architecture (a memory-bound copy gains
nothing from newer instructions); where it cannot be built or loaded, or
T5LITE_CPU_TRANSPOSE_KERNEL=0, `available()` is False and callers transpose with XLA.
"""

import ctypes
import functools
import logging
import os

import jax
import jax.numpy as jnp

from t5lite.kernels import cpu_build

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_transpose.cc")
# The FFI target and handler symbol of each element type.
_TARGETS = {jnp.dtype(jnp.bfloat16): ("t5lite_cpu_transpose", "T5liteCpuTranspose"),
            jnp.dtype(jnp.float32): ("t5lite_cpu_transpose_f32", "T5liteCpuTransposeF32")}


@functools.lru_cache(maxsize=None)
def available() -> bool:
  """Whether the kernel is built and registered with XLA:CPU (builds it on the first call);
  False, with the reason logged once, where it cannot be."""
  if os.environ.get("T5LITE_CPU_TRANSPOSE_KERNEL", "1") == "0":
    return False
  try:
    library = ctypes.cdll.LoadLibrary(cpu_build.build(SOURCE, march=None))
    for target, symbol in _TARGETS.values():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                  platform="cpu")
  except (RuntimeError, OSError, AttributeError) as e:
    logging.warning("t5lite: CPU transpose kernel unavailable, using XLA's: %s", e)
    return False
  return True


def supports(x) -> bool:
  """Whether `transpose` takes x (an array or a jax.ShapeDtypeStruct): a bf16 or fp32 matrix."""
  return x.ndim == 2 and jnp.dtype(x.dtype) in _TARGETS


def transpose(x):
  """x.T of a bf16 or fp32 matrix, written in memory by the kernel. Requires `supports(x)` and
  `available()`."""
  if not supports(x):
    raise ValueError(f"the CPU transpose takes a bf16 or fp32 matrix, got {x.dtype} {x.shape}")
  return jax.ffi.ffi_call(_TARGETS[jnp.dtype(x.dtype)][0],
                          jax.ShapeDtypeStruct(x.shape[::-1], x.dtype))(x)
