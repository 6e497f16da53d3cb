"""The CPU matmul kernels (training's bf16 matmuls on AMX, float32 ones on AVX-512 or AVX2 with
FMA): their products against float64, their refusals, where they pay, their place in
`projection.project` (forward, input and weight gradients; XLA's matmuls where they do not
apply), in a model's loss and gradients and under remat."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import (assert_float32_product, assert_not_bf16_rounded, float64_product,
                      tiny_config)
from t5lite.kernels import cpu_matmul, cpu_matvec
from t5lite.models import projection
from t5lite.models.model import Model

needs_amx = pytest.mark.skipif(not (cpu_matmul.available() and cpu_matvec.amx_rows()),
                               reason="no AMX kernel here")
F32_KERNEL = cpu_matmul.available() and cpu_matmul.float32_kernel()
needs_f32_kernel = pytest.mark.skipif(not F32_KERNEL,
                                      reason="no float32 kernel here (AVX-512 or AVX2 with FMA)")

# (m, k, n): one tile of rows and a panel narrower than 256 columns; row tails of 13 (one row
# tile) and 18 (16 + 2) rows; k past 2048 in two blocks (c's tiles loaded back); a deep k whose
# stripes of a are copied (k >= 2048) with panels of 128 columns and a 32-column tail; several
# panels and row blocks; one row.
SHAPES = [(32, 64, 96), (77, 96, 160), (50, 32, 32), (40, 2112, 64), (33, 4096, 288),
          (300, 768, 544), (1, 32, 32)]


def _bf16(rng, shape):
  return jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)


def _wide(a):
  return np.asarray(a.astype(jnp.float32), np.float64)


@needs_amx
@pytest.mark.parametrize("b_transposed", [False, True], ids=["b", "b_transposed"])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_matmul_matches_a_float64_product(m, k, n, b_transposed):
  """float32 c = a @ b for bf16 a, b (b stored [k, n] or [n, k]): the float64 product of the
  same values within the fp32 sums' error, every element written; with a bf16 output (k <=
  2048), those sums rounded once: within half a bf16 step of the float64 product (plus the sums'
  error) and equal to the float32 output rounded to bf16."""
  rng = np.random.default_rng(m * 7 + k + n)
  a, b = _bf16(rng, (m, k)), _bf16(rng, (n, k) if b_transposed else (k, n))
  ref, scale = float64_product(a, b, b_transposed)
  run = lambda out: jax.jit(lambda a, b: cpu_matmul.matmul(  # noqa: E731
      a, b, b_transposed=b_transposed, out_dtype=out))(a, b)
  c = run(jnp.float32)
  assert c.dtype == jnp.float32 and c.shape == (m, n)
  assert np.all(np.abs(np.asarray(c, np.float64) - ref) <= 1e-6 * scale)
  if k <= cpu_matmul.MAX_BF16_OUTPUT_DEPTH:
    c16 = run(jnp.bfloat16)
    assert c16.dtype == jnp.bfloat16 and c16.shape == (m, n)
    half_step = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(_wide(c16)), 1e-30))) - 8)
    assert np.all(np.abs(_wide(c16) - ref) <= half_step + 1e-6 * scale)
    np.testing.assert_array_equal(np.asarray(c16), np.asarray(c.astype(jnp.bfloat16)))


# float32 (m, k, n): one row and one vector; a row tail (7 = 6 + 1) and a 3-vector sub-panel;
# k past 1280 in three blocks (c added into); many sub-panels and row blocks, one group of
# them; groups of two sub-panels (1024 deep: kF32GroupBytes / 256 KB), the last one 1.25 wide;
# work items of more than kF32InPlaceRows (64) rows, b packed (fewer: b [k, n] read in place),
# and (a stored transposed) of more than kF32ChunkRows (192), a copied in chunks.
F32_SHAPES = [(1, 1, 16), (7, 33, 48), (50, 2700, 80), (300, 64, 528), (13, 1024, 336),
              (4000, 24, 48)]


@needs_amx
def test_project_writes_the_heads_float32_logits_from_the_kernel():
  """The output head's projection with out_dtype=float32 on the kernel: its forward is the
  kernel's float32 output (unrounded sums of the bf16 operands), its backward the same kernel
  calls as a bf16 head's (the input gradient in bf16, the weight gradient in float32), with the
  gradients of the bf16 head for the cotangent cast to bf16."""
  rng = np.random.default_rng(7)
  x, kernel = _bf16(rng, (2, 48, 64)), _bf16(rng, (320, 64)).astype(jnp.float32) * 0.1
  opts = dict(flat_weight_grad=True, float32_outputs=True, matmul_kernel=True)

  def run(out_dtype):
    def f(x, kernel, g):
      y, pullback = jax.vjp(lambda x, k: projection.project("bld,vd->blv", x, k,
                                                            out_dtype=out_dtype, **opts), x, kernel)
      return (y,) + pullback(g.astype(y.dtype))
    return jax.jit(f)

  g = jnp.asarray(rng.standard_normal((2, 48, 320)), jnp.float32)
  text = run(jnp.float32).lower(x, kernel, g).as_text()
  assert text.count("@t5lite_cpu_matmul_f32(") == 2  # forward, weight grad
  assert text.count("@t5lite_cpu_matmul_bf16(") == 1  # input gradient
  (y, dx, dk), (y16, dx16, dk16) = run(jnp.float32)(x, kernel, g), run(None)(x, kernel, g)
  assert y.dtype == jnp.float32 and y16.dtype == jnp.bfloat16
  want = jnp.einsum("bld,vd->blv", x.astype(jnp.float32),
                    kernel.astype(jnp.bfloat16).astype(jnp.float32))
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  assert_not_bf16_rounded(y)
  np.testing.assert_array_equal(np.asarray(dx, np.float32), np.asarray(dx16, np.float32))
  np.testing.assert_array_equal(np.asarray(dk), np.asarray(dk16))


@needs_f32_kernel
@pytest.mark.parametrize("a_transposed", [False, True], ids=["a", "a_transposed"])
@pytest.mark.parametrize("b_transposed", [False, True], ids=["b", "b_transposed"])
@pytest.mark.parametrize("m,k,n", F32_SHAPES)
def test_f32_matmul_matches_a_float64_product(m, k, n, b_transposed, a_transposed):
  """float32 c = a @ b (a stored [m, k] or [k, m], b [k, n] or [n, k]): the float64 product
  within the fp32 sums' error, every element written."""
  def product(a, b):
    return cpu_matmul.matmul(a.T if a_transposed else a, b, a_transposed=a_transposed,
                             b_transposed=b_transposed)
  assert_float32_product(product, m, k, n, b_transposed, seed=m * 3 + k + n)


def test_matmul_refuses_what_it_does_not_take():
  """k or n not a multiple of 32, float32 or mixed operands, shapes that do not contract, a
  transposed bf16 a, or no AMX: `supports` says no and `matmul` raises a ValueError naming what
  it takes."""
  s = lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype)  # noqa: E731
  amx = cpu_matvec.amx_rows() > 0
  assert cpu_matmul.supports(s((5, 64)), s((64, 96))) == amx
  assert not cpu_matmul.supports(s((5, 48)), s((48, 96)))
  assert not cpu_matmul.supports(s((5, 64)), s((64, 80)))
  assert not cpu_matmul.supports(s((5, 64)), s((32, 96)))
  f32 = lambda shape: s(shape, jnp.float32)  # noqa: E731
  assert cpu_matmul.supports(f32((5, 64)), f32((64, 96))) == F32_KERNEL
  assert cpu_matmul.supports(f32((5, 63)), f32((96, 63)), b_transposed=True) == F32_KERNEL
  assert not cpu_matmul.supports(f32((5, 64)), f32((64, 40)))  # n not a multiple of 16
  assert cpu_matmul.supports(f32((64, 5)), f32((64, 96)), a_transposed=True) == F32_KERNEL
  assert not cpu_matmul.supports(f32((5, 64)), f32((64, 96)), a_transposed=True)
  assert not cpu_matmul.supports(s((64, 5)), s((64, 96)), a_transposed=True)  # float32 only
  assert not cpu_matmul.supports(f32((5, 0)), f32((0, 48)))  # nothing to contract
  assert not cpu_matmul.supports(s((5, 0)), s((0, 64)))
  assert not cpu_matmul.supports(f32((5, 64)), f32((64, 96)), out_dtype=jnp.bfloat16)
  assert not cpu_matmul.supports(s((5, 64)), s((64, 96), jnp.float32))
  assert not cpu_matmul.supports(s((64,)), s((64, 96)))
  assert cpu_matmul.supports(s((5, 64)), s((96, 64)), b_transposed=True) == amx
  assert not cpu_matmul.supports(s((5, 64)), s((64, 96)), b_transposed=True)
  assert cpu_matmul.supports(s((5, 2048)), s((2048, 96)), out_dtype=jnp.bfloat16) == amx
  assert not cpu_matmul.supports(s((5, 2080)), s((2080, 96)), out_dtype=jnp.bfloat16)
  assert not cpu_matmul.supports(s((5, 64)), s((64, 96)), out_dtype=jnp.float16)
  with pytest.raises(ValueError, match="bf16, k and n multiples of 32"):
    cpu_matmul.matmul(jnp.ones((5, 48), jnp.bfloat16), jnp.ones((48, 96), jnp.bfloat16))
  with pytest.raises(ValueError, match="n a multiple of 16, on a CPU with AVX-512 or AVX2 with"):
    cpu_matmul.matmul(jnp.ones((5, 64), jnp.float32), jnp.ones((64, 40), jnp.float32))


SPECS = [("bld,vd->blv", (320, 64)), ("bld,dhk->blhk", (64, 4, 16)),
         ("blhk,hkd->bld", (4, 16, 96)), ("bld,dnf->blnf", (64, 2, 96))]


@needs_amx
@pytest.mark.parametrize("tokens", [(2, 48), (2, 20)], ids=["96_tokens", "40_tokens"])
@pytest.mark.parametrize("spec,k_shape", SPECS)
def test_project_runs_its_matmuls_in_the_kernel(spec, k_shape, tokens):
  """A bf16 projection with float32 outputs and matmul_kernel runs its forward and input
  gradient in the kernel, and its weight gradient when the tokens are a multiple of 32 (else
  XLA's): values within one bf16 rounding of XLA's path, the fp32 weight gradient within fp32
  sums' error; a program for several devices keeps XLA's matmuls."""
  rng = np.random.default_rng(len(spec))
  ins = spec.split(",")[0][2:]
  x = _bf16(rng, tokens + tuple(k_shape[spec.split(",")[1].index(c)] for c in ins))
  kernel = _bf16(rng, k_shape).astype(jnp.float32) * 0.1  # fp32 parameters, cast inside
  opts = dict(flat_weight_grad=True, float32_outputs=True)
  y_shape = jax.eval_shape(lambda: projection.project(spec, x, kernel, **opts)).shape
  g = _bf16(rng, y_shape)

  def run(mk):
    def f(x, kernel, g):
      y, pullback = jax.vjp(lambda x, k: projection.project(spec, x, k, matmul_kernel=mk, **opts),
                            x, kernel)
      return (y,) + pullback(g)
    return jax.jit(f)

  calls = run(True).lower(x, kernel, g).as_text().count("t5lite_cpu_matmul")
  assert calls == (3 if tokens[0] * tokens[1] % 32 == 0 else 2)
  assert "t5lite_cpu_matmul" not in run(False).lower(x, kernel, g).as_text()
  (y, dx, dk), (y0, dx0, dk0) = run(True)(x, kernel, g), run(False)(x, kernel, g)
  assert dk.dtype == jnp.float32
  for got, want in ((y, y0), (dx, dx0)):
    np.testing.assert_allclose(_wide(got), _wide(want), rtol=2.0 ** -7, atol=1e-2)
  np.testing.assert_allclose(np.asarray(dk), np.asarray(dk0), rtol=1e-5, atol=1e-4)
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((2,), ("data",))):
    assert "t5lite_cpu_matmul" not in str(jax.make_jaxpr(run(True))(x, kernel, g))


@needs_amx
@pytest.mark.parametrize("variant", [dict(arch="decoder_only", num_kv_heads=2),
                                     dict(arch="encoder_decoder")],
                         ids=["decoder_only", "encoder_decoder"])
def test_model_loss_and_gradients_with_the_kernel(variant):
  """runs/cpu_bf16.gin's model (bf16, float32_dot_outputs) with matmul_kernel: its train
  program's matmuls in the kernel, and the loss and gradients of XLA's matmuls to bf16
  precision."""
  rng = np.random.default_rng(1)
  cfg = tiny_config(dtype="bfloat16", float32_dot_outputs=True, **variant)
  ids = lambda length: rng.integers(3, cfg.vocab_size, (4, length)).astype(np.int32)  # noqa
  if cfg.arch == "encoder_decoder":
    batch = {"encoder_input_tokens": ids(16), "decoder_input_tokens": ids(8),
             "decoder_target_tokens": ids(8), "decoder_loss_weights": np.ones((4, 8), np.float32)}
  else:
    batch = {"decoder_input_tokens": ids(16), "decoder_target_tokens": ids(16),
             "decoder_loss_weights": np.ones((4, 16), np.float32)}
  params = Model(cfg).init(jax.random.key(0))
  results = {}
  for mk in (False, True):
    model = Model(tiny_config(dtype="bfloat16", float32_dot_outputs=True, matmul_kernel=mk,
                              **variant))
    step = jax.jit(jax.value_and_grad(lambda p, m=model: m.loss(p, batch)[0]))
    assert ("t5lite_cpu_matmul" in step.lower(params).as_text()) == mk
    results[mk] = step(params)
  (loss, grads), (want_loss, want) = results[True], results[False]
  np.testing.assert_allclose(loss, want_loss, rtol=1e-3)
  flat = lambda tree: jnp.concatenate([x.ravel() for x in jax.tree.leaves(tree)])  # noqa: E731
  assert float(jnp.linalg.norm(flat(grads) - flat(want)) / jnp.linalg.norm(flat(want))) < 1e-2


@needs_f32_kernel
@pytest.mark.parametrize("arch", ["decoder_only", "encoder_decoder"])
def test_float32_model_loss_and_gradients_with_the_kernel(arch, kernel_pays):
  """runs/cpu.gin's model (float32) with matmul_kernel: its train program's forward, input- and
  weight-gradient matmuls in the float32 kernel (the weight gradients from transposed copies
  where the transpose kernel builds), the loss and gradients of XLA's matmuls within fp32 sums'
  error."""
  from t5lite.kernels import cpu_transpose  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(2)
  cfg = tiny_config(dtype="float32", arch=arch)
  ids = lambda length: rng.integers(3, cfg.vocab_size, (4, length)).astype(np.int32)  # noqa
  batch = {"decoder_input_tokens": ids(16), "decoder_target_tokens": ids(16),
           "decoder_loss_weights": np.ones((4, 16), np.float32)}
  if arch == "encoder_decoder":
    batch["encoder_input_tokens"] = ids(24)
  params = Model(cfg).init(jax.random.key(0))
  results = {}
  for mk in (False, True):
    model = Model(tiny_config(dtype="float32", arch=arch, matmul_kernel=mk))
    step = jax.jit(jax.value_and_grad(lambda p, m=model: m.loss(p, batch)[0]))
    text = step.lower(params).as_text()
    assert ("t5lite_cpu_matmul_f32_f32" in text) == mk
    assert ("t5lite_cpu_transpose_f32" in text) == (mk and cpu_transpose.available())
    results[mk] = step(params)
  (loss, grads), (want_loss, want) = results[True], results[False]
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  flat = lambda tree: jnp.concatenate([x.ravel() for x in jax.tree.leaves(tree)])  # noqa: E731
  assert float(jnp.linalg.norm(flat(grads) - flat(want)) / jnp.linalg.norm(flat(want))) < 1e-5


@needs_amx
def test_remat_dots_policies_save_the_kernel_s_products():
  """The dots remat policies keep the kernel's products as they keep XLA's dots: the gradient
  program runs as many kernel matmuls as without remat, fewer than 'full' (which runs each
  layer's forward products again)."""
  rng = np.random.default_rng(2)
  ids = rng.integers(3, 64, (4, 16)).astype(np.int32)
  batch = {"decoder_input_tokens": ids, "decoder_target_tokens": ids,
           "decoder_loss_weights": np.ones((4, 16), np.float32)}
  calls = {}
  for policy in ("none", "dots", "dots_no_batch", "dots_no_batch_attention", "full"):
    model = Model(tiny_config(arch="decoder_only", num_kv_heads=2, dtype="bfloat16",
                              float32_dot_outputs=True, matmul_kernel=True, remat_policy=policy))
    params = model.init(jax.random.key(0))
    program = jax.jit(jax.grad(lambda p, m=model: m.loss(p, batch)[0])).lower(params).compile()
    calls[policy] = program.as_text().count('custom_call_target="t5lite_cpu_matmul')
  assert calls["none"] > 0 and calls["full"] > calls["none"], calls
  assert calls["dots"] == calls["dots_no_batch"] == calls["dots_no_batch_attention"] == calls[
      "none"], calls


@needs_f32_kernel
@pytest.mark.parametrize("spec,k_shape", SPECS)
def test_project_runs_float32_matmuls_in_the_kernel(spec, k_shape, kernel_pays):
  """A float32 projection with matmul_kernel runs its forward and input gradient in the kernel,
  and the weight gradient of an [in, out] kernel from activations transposed by the transpose
  kernel, the [vocab, embed] head's reading its output gradient as stored (a_transposed; here
  96 tokens, `transposed_a_pays`); values and gradients within fp32 sums' error of XLA's; a
  program for several devices keeps XLA's matmuls and transposes."""
  from t5lite.kernels import cpu_transpose  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(len(spec) + 1)
  ins = spec.split(",")[0][2:]
  x = jnp.asarray(rng.standard_normal((2, 48) + tuple(
      k_shape[spec.split(",")[1].index(c)] for c in ins)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal(k_shape), jnp.float32) * 0.1
  y_shape = jax.eval_shape(lambda: projection.project(spec, x, kernel)).shape
  g = jnp.asarray(rng.standard_normal(y_shape), jnp.float32)

  def run(mk):
    def f(x, kernel, g):
      y, pullback = jax.vjp(lambda x, k: projection.project(spec, x, k, matmul_kernel=mk),
                            x, kernel)
      return (y,) + pullback(g)
    return jax.jit(f)

  head = spec == "bld,vd->blv"
  copied = not head and cpu_transpose.available()
  text = run(True).lower(x, kernel, g).as_text()
  assert text.count("t5lite_cpu_matmul_f32_f32") == 2 + (head or copied)
  assert text.count("t5lite_cpu_transpose_f32") == copied
  assert text.count("a_transposed = true") == head
  for got, want in zip(run(True)(x, kernel, g), run(False)(x, kernel, g)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((2,), ("data",))):
    jaxpr = str(jax.make_jaxpr(run(True))(x, kernel, g))
  assert "t5lite_cpu_matmul" not in jaxpr and "t5lite_cpu_transpose" not in jaxpr


def test_float32_products_of_an_avx2_build_run_where_they_pay(monkeypatch):
  """On a build for 8-float vectors (AVX2) a float32 product `pays` on the kernel only at least
  256 rows by 256 to 8192 deep with at most 8192 columns (a layer's products, not the output
  head's forward or input gradient, a shallow product, a narrow weight gradient or one over more
  than 8192 tokens); bf16 products and an AVX-512 build's always."""
  s = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype)  # noqa: E731
  monkeypatch.setattr(cpu_matmul, "_lanes", lambda: 8)
  assert cpu_matmul.pays(s((2048, 512)), s((512, 1152)))               # a layer's forward
  assert cpu_matmul.pays(s((2048, 1152)), s((512, 1152)), b_transposed=True)  # its input grad
  assert cpu_matmul.pays(s((512, 2048)), s((2048, 1152)))              # its weight gradient
  assert cpu_matmul.pays(s((512, 256)), s((256, 8192)))
  assert cpu_matmul.pays(s((256, 512)), s((256, 1024)), a_transposed=True)  # m = 512, k = 256
  assert cpu_matmul.pays(s((256, 8192)), s((8192, 512)))
  assert not cpu_matmul.pays(s((512, 512)), s((32128, 512)), b_transposed=True)  # the head
  assert not cpu_matmul.pays(s((2560, 32000)), s((32000, 768)))       # its input gradient
  assert not cpu_matmul.pays(s((768, 10240)), s((10240, 768)))        # 10240 tokens' weight grad
  assert not cpu_matmul.pays(s((2048, 128)), s((128, 384)))            # shallow
  assert not cpu_matmul.pays(s((128, 2048)), s((2048, 512)))           # few rows
  assert not cpu_matmul.pays(s((255, 512)), s((512, 512)))
  assert cpu_matmul.pays(s((32, 64), jnp.bfloat16), s((64, 32128), jnp.bfloat16))
  monkeypatch.setattr(cpu_matmul, "_lanes", lambda: 16)
  assert cpu_matmul.pays(s((512, 512)), s((32128, 512)), b_transposed=True)
  assert cpu_matmul.pays(s((7, 33)), s((33, 48)))


@needs_f32_kernel
def test_project_keeps_xla_s_matmuls_where_the_kernel_does_not_pay(monkeypatch):
  """A float32 projection on an AVX2 build runs the kernel where it pays (`cpu_matmul.pays`):
  [256 tokens, 256] x [256, 256] in its forward, input and weight gradients; 128 tokens of it
  (too few rows) none of them. (The weight gradient on the kernel from x transposed by the
  transpose kernel, where that builds.)"""
  from t5lite.kernels import cpu_transpose  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(cpu_matmul, "_lanes", lambda: 8)
  kernel = jnp.zeros((256, 256), jnp.float32)

  def program(tokens):
    x = jnp.zeros((2, tokens // 2, 256), jnp.float32)
    f = lambda x, k: projection.project("bld,de->ble", x, k, matmul_kernel=True)  # noqa: E731
    return jax.jit(lambda x, k: jax.vjp(f, x, k)[1](f(x, k))).lower(x, kernel).as_text()

  assert program(256).count("t5lite_cpu_matmul_f32_f32") == 2 + cpu_transpose.available()
  assert "t5lite_cpu_matmul" not in program(128)
