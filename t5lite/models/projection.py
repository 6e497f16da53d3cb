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
"""

import functools
import math

import jax
import jax.numpy as jnp


def project(spec: str, x, kernel, *, flat_weight_grad: bool = False):
  """`jnp.einsum(spec, x, kernel)` for a projection of token activations.

  Args:
    spec: an einsum of the form '<tokens><in>,<kernel>-><tokens><out>', e.g. 'bld,dhk->blhk'
      or 'bld,vd->blv': the leading token axes of `x` are not in the kernel, the kernel holds
      exactly the remaining input axes and the output axes.
    x: activations.
    kernel: the weights.
    flat_weight_grad: compute the kernel gradient as one matmul over flattened tokens (a
      custom VJP; same values). A CPU lever (`ModelConfig.flat_weight_grads`).

  Returns:
    The projection.
  """
  if not flat_weight_grad:
    return jnp.einsum(spec, x, kernel)
  _parse(spec)  # reject a spec the flat gradient cannot handle before tracing the VJP
  return _flat_grad_einsum(spec, x, kernel)


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flat_grad_einsum(spec, x, kernel):
  return jnp.einsum(spec, x, kernel)


def _forward(spec, x, kernel):
  return jnp.einsum(spec, x, kernel), (x, kernel)


def _backward(spec, residuals, g):
  x, kernel = residuals
  tokens, ins, outs, ks = _parse(spec)
  n = math.prod(x.shape[:len(tokens)])
  in_shape, out_shape = x.shape[len(tokens):], g.shape[len(tokens):]
  flat_g = g.reshape(n, -1)                                                 # [tokens, out]
  # The kernel as [in, out]: a transpose XLA folds into the dot (a bitcast when the kernel's
  # axes are already in that order, as for every projection but the [vocab, embed] output head).
  flat_kernel = jnp.transpose(kernel, [ks.index(c) for c in ins + outs]).reshape(
      math.prod(in_shape), math.prod(out_shape))
  dx = jax.lax.dot_general(flat_g, flat_kernel, (((1,), (1,)), ((), ()))).reshape(x.shape)
  grad = jnp.dot(x.reshape(n, -1).T, flat_g)  # [in, out]
  grad = grad.reshape(in_shape + out_shape)
  order = [(ins + outs).index(c) for c in ks]
  return dx, jnp.transpose(grad, order).astype(kernel.dtype)


_flat_grad_einsum.defvjp(_forward, _backward)
