"""Projections of token activations by a kernel: `einsum`, optionally with a flat weight gradient.

A projection maps `x [batch, length, *in]` by a kernel holding the `in` and `out` axes (in any
order) to `[batch, length, *out]`. Its weight gradient contracts over every token. Autodiff
writes that as an einsum, and XLA:CPU then picks the layouts: for the output head it copies
the [tokens, vocab] gradient into a transposed [vocab, tokens] layout (decoder-tiny: 14.6 ms of
a 232 ms single-core step for one 12 MB transpose), where transposing the small activations
would do. `project(..., flat_weight_grad=True)` writes the gradient itself as one
[in, tokens] x [tokens, out] matmul over flattened tokens, which XLA:CPU runs with no copy of
either operand, and then lays the small result out in the kernel's axis order.
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
  dx = jnp.einsum(f"{tokens}{outs},{ks}->{tokens}{ins}", g, kernel)
  n = math.prod(x.shape[:len(tokens)])
  in_shape, out_shape = x.shape[len(tokens):], g.shape[len(tokens):]
  grad = jnp.dot(x.reshape(n, -1).T, g.reshape(n, -1))  # [in, out]
  grad = grad.reshape(in_shape + out_shape)
  order = [(ins + outs).index(c) for c in ks]
  return dx, jnp.transpose(grad, order).astype(kernel.dtype)


_flat_grad_einsum.defvjp(_forward, _backward)
