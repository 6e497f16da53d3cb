"""Projections of token activations by a kernel: `einsum`, optionally with a flat weight gradient.

A projection maps `x [batch, length, *in]` by a kernel holding the `in` and `out` axes (in any
order) to `[batch, length, *out]`. Its weight gradient contracts over every token. Autodiff
writes that as an einsum, and XLA:CPU then picks the layouts: for the output head it copies
the [tokens, vocab] gradient into a transposed [vocab, tokens] layout (decoder-tiny: 14.6 ms of
a 232 ms single-core step for one 12 MB transpose), where transposing the small activations
would do. `project(..., flat_weight_grad=True)` writes the gradient itself as one
[in, tokens] x [tokens, out] matmul over flattened tokens, which XLA:CPU runs with no copy of
either operand, and then lays the small result out in the kernel's axis order.

The input gradient is written flat too, as [tokens, out] x [in, out]^T. Autodiff's einsum, with
several out axes (the gated MLP's [embed, 2, mlp] kernel, attention's [embed, heads, head_dim]),
had XLA:CPU copy both the gradient and the kernel into a transposed layout first: five copies per
layer of decoder-125m, and in-process A/B of the train step (b8 x 320, 2 cores) 8,309 -> 7,954
ms; decoder-tiny 87.2 -> 82.9 ms, T5-small 2,292 -> 2,231 ms.

`float32_outputs=True` has every matmul of a bfloat16 projection (forward, input and weight
gradients) output float32, cast to bfloat16 after. XLA:CPU gives a bf16 x bf16 matmul to
YNNPACK's kernels, which use AMX tiles on CPUs that have them (Intel Sapphire Rapids on), only
when it outputs float32 and reads its left operand with the contracted axis minor; a bf16 output
or a transposed left operand has it convert both operands to float32 first and run the float32
kernel. On 2 cores with AMX, [2560, 512] x [512, 1024]: 1,232-1,573 GFLOP/s for bf16 with float32
output, 284 with bf16 output, 309 in float32. So the weight gradient x^T g is computed from a
transposed copy of the activations (5.7 ms with the copy against 12.0 ms without, same shapes;
written by t5lite's CPU transpose kernel, t5lite/kernels/cpu_transpose.py, where it builds, else
by XLA under an optimization barrier on its flattened form, so that XLA cannot fold it back into
the matmul), and the input gradient of an [out, in] kernel (the [vocab, embed] output head) reads
the kernel as stored. The kernel is cast to bf16 inside, so its gradient (in the stored dtype,
fp32) is the fp32 matmul's output, never rounded to bf16.

`matmul_kernel=True` (with float32_outputs and bf16 x) runs those matmuls on t5lite's AMX kernel
instead (t5lite/kernels/cpu_matmul.py; 1.3-2.3x YNNPACK's speed at decoder-125m's shapes), where
it applies (a program for one CPU device with AMX, sizes multiples of 32; XLA's matmul for any
it refuses): the forward and the input gradient read the kernel as stored ([in, out], or
[out, in] for the head, packed transposed by the kernel) and write bf16 straight from their
float32 sums (for contractions up to 2048 deep; float32 then a cast beyond), the weight gradient
x^T g is float32 from the transposed copy above. Float32 projections run their forward and input
gradient on the kernel's float32 path (1.1-1.25x XLA's speed on CPUs with AVX-512; with AVX2 only
the products where it pays, `cpu_matmul.pays`), and the weight gradient of an [in, out] kernel from
a transposed copy of x written by the transpose kernel (reading x as stored, [tokens, in], the
kernel ran 0.75-0.85x XLA's speed; with the copy decoder-125m's layers' weight gradients take ~1,130
ms + 77 ms of copies against XLA's ~1,390, its step 5,447 -> 5,274 ms). The head's [vocab, embed]
gradient g^T x runs on the kernel reading g as stored where that pays (few tokens and a narrow
embedding: T5-tiny's, 0.15 -> 0.25 TFLOP/s, its step 155 -> 142 ms; `cpu_matmul.transposed_a_pays`);
elsewhere it stays XLA's (the kernel's [embed, vocab] product would need a transpose that costs what
the kernel saves).

`matvec_kernel=True` runs a projection of a few tokens (a decoding step at batch <= 32 in float32;
in bf16 at batch <= 4, <= 32 on CPUs with AMX: `cpu_matvec.supports`) by t5lite's CPU kernel
(t5lite/kernels/cpu_matvec.py), which reads bf16 weights as stored where XLA:CPU widens them to
fp32, and runs float32 ones 1.2-2x as fast (a program for one CPU device, where the kernel
builds; XLA's einsum elsewhere). Its gradient, if asked for, is XLA's.
"""

import functools
import math

import jax
import jax.numpy as jnp

from t5lite import partitioning


def project(spec: str, x, kernel, *, flat_weight_grad: bool = False,
            float32_outputs: bool = False, matvec_kernel: bool = False,
            matmul_kernel: bool = False, out_dtype=None):
  """`jnp.einsum(spec, x, kernel)` for a projection of token activations.

  Args:
    spec: an einsum of the form '<tokens><in>,<kernel>-><tokens><out>', e.g. 'bld,dhk->blhk'
      or 'bld,vd->blv': the leading token axes of `x` are not in the kernel, the kernel holds
      exactly the remaining input axes and the output axes.
    x: activations.
    kernel: the weights.
    flat_weight_grad: compute the kernel gradient as one matmul over flattened tokens (a
      custom VJP; same values). A CPU lever (`ModelConfig.flat_weight_grads`).
    float32_outputs: every matmul, forward and backward, outputs float32, cast to x's dtype
      after (module docstring; implies the flat gradients). The kernel may be stored wider than
      x (fp32 parameters of a bf16 model): it is cast to x's dtype inside, and its gradient
      comes out of the float32 matmul in the kernel's own dtype, not rounded to x's on the
      way. A lever for bf16 on CPUs with AMX (`ModelConfig.float32_dot_outputs`); no change
      for float32 operands.
    matvec_kernel: a projection of a few tokens by the CPU kernel where it applies
      (module docstring; `ModelConfig.matvec_kernel`); its gradient is the einsum's above.
    matmul_kernel: the forward and input-gradient matmuls of float32 operands, and with
      float32_outputs all three of bf16 ones, by t5lite's CPU matmul kernel where it applies
      (module docstring; `ModelConfig.matmul_kernel`; implies the flat gradients), else XLA's.
    out_dtype: None, or float32: the projection of bf16 operands as its float32 sums, never
      rounded to bf16 (the output head's logits, as T5X computes them in float32); its gradient
      reaches the matmuls of the backward in x's dtype, as a bf16 output's would.

  Returns:
    The projection, in x's dtype (or out_dtype).
  """
  out_dtype = None if out_dtype is None or out_dtype == x.dtype else jnp.dtype(out_dtype)
  if out_dtype not in (None, jnp.float32):
    raise ValueError(f"project's out_dtype is float32 or None (x's dtype), got {out_dtype}")
  if matvec_kernel and _matvec_applies(spec, x, kernel):
    return _matvec_project(spec, flat_weight_grad, float32_outputs, out_dtype, x, kernel)
  return _xla_project(spec, flat_weight_grad, float32_outputs, x, kernel, matmul_kernel,
                      out_dtype=out_dtype)


def _xla_project(spec, flat_weight_grad, float32_outputs, x, kernel, matmul_kernel=False, *,
                 out_dtype=None):
  if not (flat_weight_grad or float32_outputs or matmul_kernel):
    if out_dtype is None:
      return jnp.einsum(spec, x, kernel)
    return _widened_einsum(spec, x, kernel)
  _parse(spec)  # reject a spec the flat gradient cannot handle before tracing the VJP
  return _flat_grad_einsum(spec, float32_outputs, matmul_kernel, out_dtype, x, kernel)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _widened_einsum(spec, x, kernel):
  """`einsum(spec, x, kernel)` of bf16 operands output as its float32 sums. Its backward is the
  bf16 einsum's, from the gradient cast to bf16 (autodiff's would widen both operands to
  float32 and run float32 matmuls)."""
  return jnp.einsum(spec, x, kernel, preferred_element_type=jnp.float32)


def _widened_forward(spec, x, kernel):
  return _widened_einsum(spec, x, kernel), (x, kernel)


def _widened_backward(spec, residuals, g):
  x, kernel = residuals
  _, pullback = jax.vjp(functools.partial(jnp.einsum, spec), x, kernel)
  return pullback(g.astype(x.dtype))


_widened_einsum.defvjp(_widened_forward, _widened_backward)


@functools.lru_cache(maxsize=None)
def _parse(spec: str):
  """(tokens, in, out, kernel) axis letters of a projection spec; raises if it is not one."""
  inputs, out = spec.replace(" ", "").split("->")
  xs, ks = inputs.split(",")
  tokens = "".join(c for c in xs if c not in ks)
  ins = xs[len(tokens):]
  outs = out[len(tokens):]
  if (not tokens or xs != tokens + ins or not out.startswith(tokens)
      or sorted(ks) != sorted(ins + outs) or set(ins) & set(outs)):
    raise ValueError(f"{spec!r} is not a projection '<tokens><in>,<kernel>-><tokens><out>'")
  return tokens, ins, outs, ks


def _dot(a, b, dims, float32_outputs: bool):
  """`lax.dot_general(a, b, dims)` in a's dtype; with float32_outputs, output float32 first."""
  if not float32_outputs or a.dtype == jnp.float32:
    return jax.lax.dot_general(a, b, dims)
  return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32).astype(a.dtype)


def _einsum(spec, x, kernel, float32_outputs: bool, matmul_kernel: bool = False,
            out_dtype=None):
  out = x.dtype if out_dtype is None else out_dtype
  if float32_outputs:
    kernel = kernel.astype(x.dtype)
  if not _kernel_dtypes(x, kernel, float32_outputs):
    matmul_kernel = False
  layout = _flat_layout(spec, x, kernel) if matmul_kernel else None
  if layout is not None:
    token_shape, n_in, in_out, out_shape = layout
    flat_kernel = kernel.reshape((n_in, -1) if in_out else (-1, n_in))  # [out, in]: the head
    y = _kernel_product(x.reshape(-1, n_in), flat_kernel, b_transposed=not in_out,
                        out_dtype=out)
    if y is not None:
      return y.reshape(token_shape + out_shape)
  if x.dtype == jnp.float32 or not (float32_outputs or out_dtype is not None):
    return jnp.einsum(spec, x, kernel)
  return jnp.einsum(spec, x, kernel, preferred_element_type=jnp.float32).astype(out)


def _kernel_dtypes(x, kernel, float32_outputs: bool) -> bool:
  """Whether the matmul kernel computes a projection of these dtypes as it is asked to: float32
  x and kernel, or bf16 ones under float32_outputs."""
  both = x.dtype == kernel.dtype
  return both and (x.dtype == jnp.float32 or (x.dtype == jnp.bfloat16 and float32_outputs))


def _kernel_runs(a, b, *, a_transposed: bool = False, b_transposed: bool = False) -> bool:
  """Whether t5lite's CPU matmul kernel runs a @ b (a.T with a_transposed, b.T with
  b_transposed) here: a program for one CPU device, the kernel built, shapes and dtypes it takes
  (a may be a jax.ShapeDtypeStruct)."""
  from t5lite import gpu_aot  # pylint: disable=import-outside-toplevel
  from t5lite.kernels import cpu_matmul  # pylint: disable=import-outside-toplevel
  return (gpu_aot.tracing_platform() == "cpu" and partitioning.one_device_program()
          and cpu_matmul.supports(a, b, a_transposed=a_transposed, b_transposed=b_transposed)
          and cpu_matmul.pays(a, b, a_transposed=a_transposed, b_transposed=b_transposed)
          and cpu_matmul.available())


def _kernel_product(a, b, *, a_transposed: bool = False, b_transposed: bool = False,
                    out_dtype=jnp.float32):
  """a @ b (a.T with a_transposed, b.T with b_transposed) by t5lite's CPU matmul kernel with
  float32 sums: bf16 matrices on AMX, in out_dtype (bf16 written by the kernel where it can,
  else cast after), or float32 ones; None where the kernel does not run it (`_kernel_runs`)."""
  from t5lite.kernels import cpu_matmul  # pylint: disable=import-outside-toplevel
  if not _kernel_runs(a, b, a_transposed=a_transposed, b_transposed=b_transposed):
    return None
  direct = cpu_matmul.supports(a, b, a_transposed=a_transposed, b_transposed=b_transposed,
                               out_dtype=out_dtype)
  y = cpu_matmul.matmul(a, b, a_transposed=a_transposed, b_transposed=b_transposed,
                        out_dtype=out_dtype if direct else jnp.float32)
  return y.astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _flat_grad_einsum(spec, float32_outputs, matmul_kernel, out_dtype, x, kernel):
  return _einsum(spec, x, kernel, float32_outputs, matmul_kernel, out_dtype)


def _forward(spec, float32_outputs, matmul_kernel, out_dtype, x, kernel):
  return _einsum(spec, x, kernel, float32_outputs, matmul_kernel, out_dtype), (x, kernel)


def _backward(spec, float32_outputs, matmul_kernel, out_dtype, residuals, g):
  del out_dtype  # the gradient of a float32 output goes on in x's dtype, as a bf16 one's would
  x, kernel = residuals
  g = g.astype(x.dtype)
  tokens, ins, outs, ks = _parse(spec)
  n = math.prod(x.shape[:len(tokens)])
  in_shape, out_shape = x.shape[len(tokens):], g.shape[len(tokens):]
  flat_g = g.reshape(n, -1)                                                 # [tokens, out]
  n_in, n_out = math.prod(in_shape), math.prod(out_shape)
  if ks == outs + ins:
    # An [out, in] kernel (the [vocab, embed] output head) as stored: transposed to [in, out],
    # XLA would see a column-major right operand, for which XLA:CPU widens a bf16 matmul to fp32.
    flat_kernel, dims = kernel.reshape(n_out, n_in), (((1,), (0,)), ((), ()))
  else:
    # The kernel as [in, out]: a transpose XLA folds into the dot (a bitcast when the kernel's
    # axes are already in that order, as for every other projection).
    flat_kernel = jnp.transpose(kernel, [ks.index(c) for c in ins + outs]).reshape(n_in, n_out)
    dims = (((1,), (1,)), ((), ()))
  if float32_outputs:
    flat_kernel = flat_kernel.astype(x.dtype)
  narrow = float32_outputs and x.dtype != jnp.float32  # bf16 matmuls with fp32 outputs
  dx = None
  if matmul_kernel and _kernel_dtypes(flat_g, flat_kernel, float32_outputs):
    # flat_kernel: [out, in] (the head), else [in, out] = b.T.
    dx = _kernel_product(flat_g, flat_kernel, b_transposed=ks != outs + ins, out_dtype=x.dtype)
  if dx is None:
    dx = _dot(flat_g, flat_kernel, dims, float32_outputs)
  dx = dx.reshape(x.shape)
  flat_x = x.reshape(n, -1)
  if narrow and not partitioning.one_device_program():
    # Sharded tokens: the flattened copy below would gather them onto every device, so the
    # weight gradient is an fp32 matmul (what XLA:CPU would widen it to anyway).
    grad = jnp.dot(flat_x.T.astype(jnp.float32), flat_g.astype(jnp.float32))
  elif narrow:
    x_t = _transposed_copy(flat_x)
    grad = _kernel_product(x_t, flat_g) if matmul_kernel else None  # [in, out]
    if grad is None:
      grad = jax.lax.dot(x_t, flat_g, preferred_element_type=jnp.float32)
    if ks != ins + outs:
      # Kept [in, out] for the transpose below: XLA would otherwise fold it into the matmul as
      # [out, in] = g^T x, whose transposed left operand XLA:CPU (jaxlib 0.10) then neither
      # widens nor runs ("Unsupported element type for DotThunk: BF16 x BF16 = F32").
      grad = jax.lax.optimization_barrier(grad)
  else:
    grad = None
    if matmul_kernel and ks == ins + outs and _float32_weight_grad_on_kernel(flat_x, flat_g):
      grad = _kernel_product(_transposed_copy(flat_x), flat_g)  # [in, out]
    elif matmul_kernel and ks == outs + ins and _head_weight_grad_on_kernel(flat_g, n_in):
      grad = _kernel_product(flat_g, flat_x, a_transposed=True)  # [out, in]: the head's layout
      grad = None if grad is None else grad.T  # (transposed back below: no copy)
    if grad is None:
      grad = jnp.dot(flat_x.T, flat_g)  # [in, out]
  grad = grad.reshape(in_shape + out_shape)
  order = [(ins + outs).index(c) for c in ks]
  return dx, jnp.transpose(grad, order).astype(kernel.dtype)


_flat_grad_einsum.defvjp(_forward, _backward)


def _float32_weight_grad_on_kernel(flat_x, flat_g) -> bool:
  """Whether a float32 weight gradient x^T g runs on the matmul kernel from a transposed copy of
  x written by the CPU transpose kernel: both kernels run here (XLA's transposes would cost more
  than the kernel saves: ~2 GB/s for fp32 on an Intel Xeon; on AMD Zen 3, where XLA:CPU's own
  ran 12-25 GB/s alone, T5-small's step took 8% longer with them in place of the kernel's)."""
  from t5lite.kernels import cpu_transpose  # pylint: disable=import-outside-toplevel
  x_t = jax.ShapeDtypeStruct(flat_x.shape[::-1], flat_x.dtype)
  return (flat_x.dtype == flat_g.dtype == jnp.float32 and _kernel_runs(x_t, flat_g)
          and cpu_transpose.available())


def _head_weight_grad_on_kernel(flat_g, n_in: int) -> bool:
  """Whether the [out, in] weight gradient g^T x of a float32 [out, in] kernel (the output head)
  runs on the matmul kernel, reading g [tokens, out] as stored: where that runs at XLA's speed
  or better (`cpu_matmul.transposed_a_pays`: few tokens and a narrow embedding, T5-tiny's head).
  Elsewhere XLA's dot, which the kernel's [in, out] product and a transpose of it would not beat
  (a transposed copy of g, tokens x vocab, costs as much)."""
  from t5lite.kernels import cpu_matmul  # pylint: disable=import-outside-toplevel
  return flat_g.dtype == jnp.float32 and cpu_matmul.transposed_a_pays(flat_g.shape[0], n_in)


def _transposed_copy(a):
  """a.T written out in memory, for a matmul's left operand: by t5lite's CPU transpose kernel
  where it applies, else by XLA (a transpose under an optimization barrier would stay a relayout
  that XLA folds into the matmul, leaving its left operand transposed; the flattened form
  cannot)."""
  from t5lite import gpu_aot  # pylint: disable=import-outside-toplevel
  from t5lite.kernels import cpu_transpose  # pylint: disable=import-outside-toplevel
  if (cpu_transpose.supports(a) and gpu_aot.tracing_platform() == "cpu"
      and cpu_transpose.available()):
    return cpu_transpose.transpose(a)
  return jax.lax.optimization_barrier(a.T.reshape(-1)).reshape(a.shape[::-1])


def _flat_layout(spec: str, x, kernel):
  """(token_shape, n_in, in_out, out_shape) of a projection as the CPU kernels take it: x
  flattened to [tokens, n_in], the kernel to [n_in, n_out] where it holds its axes as [in, out]
  (in_out), else to [n_out, n_in] (the output head); out_shape, the kernel's output axes. None
  for any other axis order."""
  tokens, ins, outs, ks = _parse(spec)
  if ks not in (ins + outs, outs + ins):
    return None
  in_out = ks == ins + outs
  out_shape = kernel.shape[len(ins):] if in_out else kernel.shape[:len(outs)]
  return (tuple(x.shape[:len(tokens)]), math.prod(x.shape[len(tokens):]), in_out,
          tuple(out_shape))


def _matvec_applies(spec: str, x, kernel) -> bool:
  """Whether the CPU matvec kernel runs this projection: a program for one CPU device, bf16 or
  float32 x of a few tokens (`cpu_matvec.supports`) and a kernel holding its axes as [in, out]
  or [out, in]."""
  from t5lite import gpu_aot  # pylint: disable=import-outside-toplevel
  from t5lite.kernels import cpu_matvec  # pylint: disable=import-outside-toplevel
  layout = _flat_layout(spec, x, kernel)
  if (layout is None or gpu_aot.tracing_platform() != "cpu"
      or not partitioning.one_device_program()):
    return False
  token_shape, n_in, in_out, out_shape = layout
  n_out = math.prod(out_shape)
  rows = jax.ShapeDtypeStruct((math.prod(token_shape), n_in), x.dtype)
  weights = jax.ShapeDtypeStruct((n_in, n_out) if in_out else (n_out, n_in), x.dtype)
  return (cpu_matvec.supports(rows, weights, w_transposed=not in_out)
          and cpu_matvec.available())


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _matvec_project(spec, flat_weight_grad, float32_outputs, out_dtype, x, kernel):
  from t5lite.kernels import cpu_matvec  # pylint: disable=import-outside-toplevel
  token_shape, n_in, in_out, out_shape = _flat_layout(spec, x, kernel)
  flat_kernel = kernel.astype(x.dtype).reshape((n_in, -1) if in_out else (-1, n_in))
  y = cpu_matvec.matvec(x.reshape(-1, n_in), flat_kernel, w_transposed=not in_out,
                        out_dtype=out_dtype)
  return y.reshape(token_shape + out_shape)


def _matvec_forward(spec, flat_weight_grad, float32_outputs, out_dtype, x, kernel):
  return (_matvec_project(spec, flat_weight_grad, float32_outputs, out_dtype, x, kernel),
          (x, kernel))


def _matvec_backward(spec, flat_weight_grad, float32_outputs, out_dtype, residuals, g):
  _, pullback = jax.vjp(functools.partial(_xla_project, spec, flat_weight_grad, float32_outputs,
                                          out_dtype=out_dtype), *residuals)
  return pullback(g)


_matvec_project.defvjp(_matvec_forward, _matvec_backward)
