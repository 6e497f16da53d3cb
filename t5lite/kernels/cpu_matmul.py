"""Training's matmuls on CPUs as XLA FFI handlers: bf16 with float32 sums on AMX tiles (`Matmul`
in cpu_matmul.cc, built into the attention kernel's library, beside the matvec's AMX code), and
float32 with AVX-512 or AVX2 FMAs (`F32Matmul`, beside the matvec's float32 tiles).

Under `ModelConfig.float32_dot_outputs` every projection of a bf16 model is a bf16 x bf16
matmul with a float32 output, which XLA:CPU (jaxlib 0.10) hands to YNNPACK's AMX kernels. Those
ran decoder-125m's output head ([2560, 768] x [768, 32000], its input and weight gradients) at
0.9-1.1 TFLOP/s on 2 cores of an Intel Xeon, and the layers' products at 1.3-1.8. The kernel
packs b as AMX reads it, a panel of columns over every row of b (about 1 MB, held in L2), and
multiplies 32 rows of a at a time into 2 x 2 tiles of sums, written once to c: the head's
products at 1.6-2.2 TFLOP/s (1.6-2.3x XLA's speed), the layers' at 1.8-2.5 (1.3-1.9x). Sums are
float32 in the order AMX adds pairs of products, as YNNPACK's (at decoder-125m's shapes the
values matched XLA's to the bit). b may be stored transposed ([n, k]: the head's [vocab,
embed] kernel, a layer's kernel in its input gradient), packed as it stands; c may be bf16,
rounded as the sums leave the tiles (what a float32 c cast to bf16 holds, without the float32
array and the pass over it), for k up to MAX_BF16_OUTPUT_DEPTH.

The bf16 products run where the CPU and this process have AMX (`amx_rows()` of cpu_matvec:
Intel Sapphire Rapids on, a native build) and k and n are multiples of 32.

XLA:CPU's float32 matmuls ran decoder-125m's products at 0.33-0.38 TFLOP/s on those 2 cores,
torch's at 0.39-0.45. The float32 kernel packs a sub-panel of 64 of b's columns (up to 1280 rows
of it; a shallow product a group of them, so that c is written in long runs) and multiplies it
with 6 rows of a at a time, 24 vectors of sums in registers: 0.39-0.41 TFLOP/s, 1.1-1.25x XLA's
speed, for n a multiple of 16 on CPUs with AVX-512 (a build tuned for 16-float vectors:
`float32_kernel()`); a layer's weight gradient x^T g from a copy of x transposed by
t5lite/kernels/cpu_transpose.py, the output head's g^T x reading g as stored (`a_transposed`)
where `transposed_a_pays`. With AVX2 and FMA (a build for 8-float vectors: AMD Zen 3, where
XLA's and torch's float32 matmuls ran 0.09-0.15 TFLOP/s on 2 cores) the tiles are 6 rows by 2
vectors (12 sums of AVX2's 16 registers) and b stored transposed is packed by 8 x 8 transposes
in registers: a layer's products at 1.1-1.3x XLA's speed, taken where they `pays`.
`t5lite.models.projection` asks `supports` and `pays` and otherwise keeps XLA's matmul.
"""

import jax
import jax.numpy as jnp

from t5lite.kernels import cpu_attention
from t5lite.kernels import cpu_matvec

# The FFI target of each (operand dtype, output dtype).
_TARGETS = {(jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)): "t5lite_cpu_matmul_f32",
            (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.bfloat16)): "t5lite_cpu_matmul_bf16",
            (jnp.dtype(jnp.float32), jnp.dtype(jnp.float32)): "t5lite_cpu_matmul_f32_f32"}
# The deepest product (k) the kernel sums in one pass over c (kGemmMaxDepth in the C++): a bf16
# c, narrowed as its sums leave the tiles, cannot be summed into again.
MAX_BF16_OUTPUT_DEPTH = 2048
# The float32 kernel's blocks of k, its sub-panels' columns on AVX-512 and its groups of them on
# an Intel Xeon (kF32Depth, kGemmVecs * kLanes and F32GroupBytes() in the C++; the library says,
# where built: `_sub_panel`), for `transposed_a_pays`.
_F32_DEPTH, _F32_SUB_PANEL, _F32_GROUP_BYTES = 1280, 64, 512 << 10


def supports(a, b, *, a_transposed: bool = False, b_transposed: bool = False,
             out_dtype=jnp.float32) -> bool:
  """Whether `matmul` takes these operands: matrices a [m, k] and b [k, n] ([n, k] with
  `b_transposed`), either bf16, k and n multiples of 32, a float32 output or a bf16 one with k
  at most MAX_BF16_OUTPUT_DEPTH, on a CPU and process with AMX; or float32 with a float32
  output, n a multiple of 16, a stored [k, m] with `a_transposed`, on a CPU with AVX-512 or
  AVX2 with FMA (builds the kernel to ask)."""
  if not (a.ndim == 2 and b.ndim == 2 and a.dtype == b.dtype
          and (jnp.dtype(a.dtype), jnp.dtype(out_dtype)) in _TARGETS):
    return False
  m, k, n = _dims(a, b, a_transposed, b_transposed)
  if b.shape[1 if b_transposed else 0] != k or k < 1 or m < 1:
    return False
  if a.dtype == jnp.float32:
    return n % 16 == 0 and float32_kernel()
  return (not a_transposed and k % 32 == 0 and n % 32 == 0
          and (jnp.dtype(out_dtype) == jnp.float32 or k <= MAX_BF16_OUTPUT_DEPTH)
          and cpu_matvec.amx_rows() > 0)


def pays(a, b, *, a_transposed: bool = False, b_transposed: bool = False) -> bool:
  """Whether `matmul` (where it `supports` these operands) is worth running rather than XLA's
  matmul: always for bf16 and on AVX-512; a float32 product on a build for 8-float vectors (AVX2
  with FMA) only at least 256 rows and 256 to 8192 deep with at most 8192 columns. On 2 cores of
  an AMD EPYC (Zen 3, 512 KB of L2 a core; best of alternated runs on a host whose timings drift)
  the kernel ran T5-small's and decoder-125m's layer products at 1.1-1.3x XLA's speed, but the
  output head's forward ([512, 512] x [512, 32128], b stored transposed) at 0.85-0.95x, shallow
  products (k = 128: T5-tiny's layers) and weight gradients of 128 outputs at 0.6-0.95x. Deeper
  than 8192 (the head's input gradient, k the vocabulary; a weight gradient over more tokens), a
  streams from memory once for every 16 of b's columns: the head's input gradient at
  decoder-125m's and T5-small's shapes ran at 0.84-0.92x XLA's speed (median of alternated pairs,
  jaxlib 0.10.2), weight gradients over 10240-16384 tokens at 0.84-0.96x (against 0.97-1.26x over
  2048-2560); with the head's input gradient on XLA, T5-small's and decoder-125m's steps (one
  process, alternated rounds) 1.04x and 1.03-1.07x as fast, T5-small's once 0.98x."""
  if a.dtype != jnp.float32 or _lanes() != 8:
    return True
  m, k, n = _dims(a, b, a_transposed, b_transposed)
  return m >= 256 and 256 <= k <= 8192 and n <= 8192


def _dims(a, b, a_transposed: bool, b_transposed: bool) -> tuple:
  """(m, k, n) of a @ b for a stored [m, k] ([k, m] with a_transposed) and b's n columns (its
  rows with b_transposed)."""
  (m, k), n = a.shape[::-1] if a_transposed else a.shape, b.shape[0 if b_transposed else 1]
  return m, k, n


def transposed_a_pays(k: int, n: int) -> bool:
  """Whether a float32 a.T @ b with a stored [k, m] (`matmul(..., a_transposed=True)`) runs
  faster than XLA's: each work item copies its rows of a, 192 at a time, once per group of b's
  columns, so only where n is one group (T5-tiny's head gradient, [32128, 512] x [512, 128]: 0.25
  TFLOP/s against XLA's 0.15 on 2 cores of an Intel Xeon; T5-small's, n = 512 in two groups,
  0.27 against 0.26 alone and no faster in its step; decoder-125m's, [32000, 2560] x [2560, 768]
  in 12 groups, 0.20 against 0.29)."""
  depth = -(-k // -(-k // _F32_DEPTH))
  sub_panel, group_bytes = _sub_panel()
  subs = -(-n // sub_panel)
  group = min(max(group_bytes // (depth * sub_panel * 4), 1), subs)
  return subs <= group


def float32_kernel() -> bool:
  """Whether this CPU runs float32 products on the kernel: its build is tuned for 16-float
  vectors (AVX-512) or 8-float ones (AVX2 with FMA; models then use it where it `pays`).
  Builds the library to ask."""
  return _lanes() > 0


def _lanes() -> int:
  """The built library's floats per vector (`cpu_attention.lanes`), 0 where it is not built."""
  library = cpu_attention.library()
  return 0 if library is None else cpu_attention.lanes(library)


def _sub_panel() -> tuple:
  """(The columns of b one tile of the float32 kernel spans, 64 on AVX-512 and 16 on AVX2; the
  most bytes of them a work item packs, a quarter of a core's L2 up to 512 KB) as the library
  has them."""
  library = cpu_attention.library()
  if library is None:
    return _F32_SUB_PANEL, _F32_GROUP_BYTES
  return library.T5liteCpuMatmulF32SubPanel(), library.T5liteCpuMatmulF32GroupBytes()


def available() -> bool:
  """Whether the kernel's library is built and registered with XLA:CPU (`cpu_attention`)."""
  return cpu_attention.available()


def matmul(a, b, *, a_transposed: bool = False, b_transposed: bool = False,
           out_dtype=jnp.float32):
  """a @ b (a.T with `a_transposed`, b.T with `b_transposed`) for a [m, k] (stored [k, m]) and b
  [k, n] (stored [n, k]) with float32 sums: bf16 operands give float32 [m, n] or, with out_dtype
  bf16, the sums rounded once to bf16 as they leave the tiles (what XLA's float32 product cast
  to bf16 gives, without the float32 array); float32 operands give float32. Requires `supports`
  and `available()`; no gradient of its own."""
  if not supports(a, b, a_transposed=a_transposed, b_transposed=b_transposed,
                  out_dtype=out_dtype):
    raise ValueError("the CPU matmul takes a [m, k] and b [k, n] ([n, k] with b_transposed): "
                     "bf16, k and n multiples of 32, a float32 or (k <= "
                     f"{MAX_BF16_OUTPUT_DEPTH}) bf16 output, on a CPU with AMX (amx_rows() = "
                     f"{cpu_matvec.amx_rows()}); or float32 (a stored [k, m] with a_transposed), "
                     f"n a multiple of 16, on a CPU with AVX-512 or AVX2 with FMA; got {a.dtype} "
                     f"{a.shape} (a_transposed={a_transposed}) and {b.dtype} {b.shape} -> "
                     f"{jnp.dtype(out_dtype)}")
  m, _, n = _dims(a, b, a_transposed, b_transposed)
  attrs = {"b_transposed": bool(b_transposed)}
  if a.dtype == jnp.float32:
    attrs["a_transposed"] = bool(a_transposed)
  return jax.ffi.ffi_call(_TARGETS[(jnp.dtype(a.dtype), jnp.dtype(out_dtype))],
                          jax.ShapeDtypeStruct((m, n), out_dtype))(a, b, **attrs)
