"""The flat weight-gradient projection and float32 matmul outputs (CPU levers): same values and
gradients as einsum."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_not_bf16_rounded, equations
from t5lite.models import projection

SPECS = {  # spec: (x shape, kernel shape), as the model's layers use them
    "bld,dhk->blhk": ((2, 5, 6), (6, 3, 4)),      # attention query / key / value
    "blhk,hkd->bld": ((2, 5, 3, 4), (3, 4, 6)),   # attention output
    "bld,vd->blv": ((2, 5, 6), (11, 6)),          # output head against a [vocab, embed] table
    "bld,dnf->blnf": ((2, 5, 6), (6, 2, 7)),      # stacked gated-MLP input kernels
    "blf,fd->bld": ((2, 5, 7), (7, 6)),           # MLP output
    "bd,dv->bv": ((10, 6), (6, 11)),              # one token axis
}


@pytest.mark.parametrize("spec", sorted(SPECS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_flat_weight_grad_matches_einsum(spec, dtype):
  """Forward and both gradients equal plain einsum under autodiff, in fp32 and bf16."""
  x_shape, k_shape = SPECS[spec]
  kx, kk, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, x_shape).astype(dtype)
  kernel = jax.random.normal(kk, k_shape).astype(dtype)
  out_shape = jax.eval_shape(lambda a, b: jnp.einsum(spec, a, b), x, kernel).shape
  cot = jax.random.normal(kg, out_shape).astype(dtype)

  def vjp(flat):
    out, pullback = jax.vjp(
        lambda a, b: projection.project(spec, a, b, flat_weight_grad=flat), x, kernel)
    return (out,) + pullback(cot)

  tol = dict(rtol=1e-6, atol=1e-6) if dtype == "float32" else dict(rtol=2e-2, atol=5e-2)
  for got, want in zip(vjp(True), vjp(False)):
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **tol)


@pytest.mark.parametrize("spec", sorted(SPECS))
@pytest.mark.parametrize("kernel_dtype", ["bfloat16", "float32"])
def test_float32_outputs_match_the_float32_einsum_of_bf16_operands(spec, kernel_dtype):
  """With float32_outputs, forward and both gradients of bf16 activations are float32 einsums
  of the bf16 operands, rounded once to bf16 (eager and jitted; jitted, the left operand of the
  weight gradient goes through a transposed copy). A float32 kernel (a bf16 model's stored
  parameter) is used as bf16 and gets its gradient in float32, unrounded."""
  x_shape, k_shape = SPECS[spec]
  x_shape = (x_shape[0] * 5,) + x_shape[1:]  # more tokens, so that rounding differs
  kx, kk, kg = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(kx, x_shape).astype(jnp.bfloat16)
  kernel = jax.random.normal(kk, k_shape).astype(kernel_dtype)
  out_shape = jax.eval_shape(lambda a, b: jnp.einsum(spec, a, b), x, kernel).shape
  cot = jax.random.normal(kg, out_shape).astype(jnp.bfloat16)

  def vjp(f, *operands):
    out, pullback = jax.vjp(f, *operands)
    return (out,) + pullback(cot.astype(out.dtype))

  wide = [a.astype(jnp.bfloat16).astype(jnp.float32) for a in (x, kernel)]
  want = vjp(lambda a, b: jnp.einsum(spec, a, b), *wide)
  want = [np.asarray(a.astype(dtype), np.float32)
          for a, dtype in zip(want, ("bfloat16", "bfloat16", kernel_dtype))]
  ours = lambda a, b: projection.project(spec, a, b, float32_outputs=True)  # noqa: E731
  for got in (vjp(ours, x, kernel), jax.jit(lambda a, b: vjp(ours, a, b))(x, kernel)):
    for g, w, dtype in zip(got, want, ("bfloat16", "bfloat16", kernel_dtype)):
      assert g.dtype == jnp.dtype(dtype)
      tol = dict(rtol=1e-2, atol=1e-2) if dtype == "bfloat16" else dict(rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(np.asarray(g, np.float32), w, **tol)


@pytest.mark.parametrize("spec", ["bld,vd->blv", "bld,dhk->blhk"])
@pytest.mark.parametrize("levers", [{}, {"flat_weight_grad": True}, {"float32_outputs": True},
                                    {"float32_outputs": True, "matmul_kernel": True}])
def test_float32_out_dtype_is_the_unrounded_sums_of_bf16_operands(spec, levers):
  """out_dtype=float32 (the output head's logits): the forward is the float32 einsum of the bf16
  operands, not rounded to bf16; the gradients are, bit for bit, the bf16 projection's for the
  cotangent cast to bf16, and every matmul of the backward reads bf16 operands (autodiff of a
  float32-output einsum would widen both to float32)."""
  x_shape, k_shape = SPECS[spec]
  x_shape = (x_shape[0] * 8,) + x_shape[1:]
  kx, kk, kg = jax.random.split(jax.random.key(2), 3)
  x = jax.random.normal(kx, x_shape).astype(jnp.bfloat16)
  kernel = jax.random.normal(kk, k_shape).astype(jnp.bfloat16)
  ours = lambda a, b: projection.project(spec, a, b, out_dtype=jnp.float32, **levers)  # noqa
  bf16 = lambda a, b: projection.project(spec, a, b, **levers)  # noqa: E731
  y, pullback = jax.vjp(jax.jit(ours), x, kernel)
  want = jnp.einsum(spec, x.astype(jnp.float32), kernel.astype(jnp.float32))
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  assert_not_bf16_rounded(y)

  cot = jax.random.normal(kg, y.shape, jnp.float32)
  _, bf16_pullback = jax.vjp(jax.jit(bf16), x, kernel)
  for got, ref in zip(pullback(cot), bf16_pullback(cot.astype(jnp.bfloat16))):
    assert got.dtype == ref.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(ref, np.float32))
  grads = jax.make_jaxpr(lambda a, b, g: jax.vjp(ours, a, b)[1](g))(x, kernel, cot)
  dots = list(equations(grads.jaxpr, "dot_general"))
  assert dots and all(v.aval.dtype == jnp.bfloat16 for eqn in dots for v in eqn.invars)


def test_out_dtype_other_than_float32_is_rejected():
  """out_dtype is float32 or x's dtype; anything else is a ValueError."""
  x, kernel = jnp.ones((2, 3, 4), jnp.float32), jnp.ones((4, 5), jnp.float32)
  assert projection.project("bld,df->blf", x, kernel, out_dtype=jnp.float32).dtype == jnp.float32
  with pytest.raises(ValueError, match="out_dtype"):
    projection.project("bld,df->blf", x, kernel, out_dtype=jnp.bfloat16)


def test_float32_outputs_leave_float32_operands_alone():
  """For float32 operands the lever changes nothing: the flat gradients, bit for bit."""
  x = jax.random.normal(jax.random.key(3), (4, 9, 6))
  kernel = jax.random.normal(jax.random.key(4), (11, 6))
  grads = jax.jit(jax.grad(lambda a, b, **kw: jnp.sum(jnp.sin(projection.project(
      "bld,vd->blv", a, b, **kw))), argnums=(0, 1)),
                  static_argnames=("flat_weight_grad", "float32_outputs"))
  for a, b in zip(grads(x, kernel, flat_weight_grad=True, float32_outputs=False),
                  grads(x, kernel, flat_weight_grad=False, float32_outputs=True)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_flat_weight_grad_under_jit_with_odd_token_counts():
  """Inside jit, with a token count that is not a multiple of anything (7 x 13 tokens)."""
  x = jax.random.normal(jax.random.key(1), (7, 13, 5))
  kernel = jax.random.normal(jax.random.key(2), (9, 5))
  loss = lambda flat: jax.jit(jax.grad(lambda k: jnp.sum(jnp.sin(  # noqa: E731
      projection.project("bld,vd->blv", x, k, flat_weight_grad=flat)))))(kernel)
  np.testing.assert_allclose(loss(True), loss(False), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec", ["bld,dv->bv", "bld,lv->blv", "bld,dd->bld", "bld,dv->vbl"])
def test_non_projection_specs_are_rejected(spec):
  """Specs whose kernel does not hold exactly the input and output axes are an error."""
  with pytest.raises(ValueError, match="not a projection"):
    projection.project(spec, jnp.zeros((2, 3, 4)), jnp.zeros((4, 4)), flat_weight_grad=True)


def test_cpu_transpose_kernel_and_its_use_by_the_bf16_weight_gradient(monkeypatch):
  """t5lite's CPU transpose kernel gives x.T of bf16 and fp32 matrices, bit for bit, at shapes
  that are and are not multiples of its tiles; the jitted bf16 weight gradient calls it where it
  builds, and gives the same gradients through XLA's transpose when switched off."""
  from t5lite.kernels import cpu_transpose
  if not cpu_transpose.available():
    pytest.skip("no C++ compiler here")
  for dtype in (jnp.bfloat16, jnp.float32):
    for shape in ((1, 1), (7, 13), (64, 64), (130, 65), (2048, 96), (50, 1040), (17, 33)):
      x = jax.random.normal(jax.random.key(sum(shape)), shape).astype(dtype)
      t = jax.jit(cpu_transpose.transpose)(x)
      assert t.dtype == dtype
      np.testing.assert_array_equal(np.asarray(t, np.float32), np.asarray(x, np.float32).T)
  assert not cpu_transpose.supports(jnp.zeros((2, 3), jnp.int32))
  assert not cpu_transpose.supports(jax.ShapeDtypeStruct((2, 3, 4), jnp.float32))
  assert cpu_transpose.supports(jax.ShapeDtypeStruct((2, 3), jnp.bfloat16))
  with pytest.raises(ValueError, match="bf16 or fp32 matrix"):
    cpu_transpose.transpose(jnp.zeros((2, 3), jnp.int32))
  with pytest.raises(ValueError, match="bf16 or fp32 matrix"):
    cpu_transpose.transpose(jnp.zeros((2, 3, 4)))
  x = jax.random.normal(jax.random.key(5), (3, 70, 48)).astype(jnp.bfloat16)
  kernel = jax.random.normal(jax.random.key(6), (48, 80))
  grads = lambda: jax.jit(jax.grad(lambda a, b: jnp.sum(jnp.sin(projection.project(  # noqa: E731
      "bld,dv->blv", a, b, float32_outputs=True).astype(jnp.float32))), argnums=(0, 1)))
  assert "t5lite_cpu_transpose" in grads().lower(x, kernel).as_text()
  with_kernel = grads()(x, kernel)
  monkeypatch.setattr(cpu_transpose, "available", lambda: False)
  assert "t5lite_cpu_transpose" not in grads().lower(x, kernel).as_text()
  for a, b in zip(with_kernel, grads()(x, kernel)):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
