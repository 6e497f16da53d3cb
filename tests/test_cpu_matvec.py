"""The CPU matvec kernel (a decoding step's projections of a few rows: bf16, up to 32 on AMX, and
float32, up to 32): its products against float64, its refusals, its place in
`projection.project` (the kernel where it applies, XLA's gradient) and in decoding (the tokens
of XLA's products); also as built for AVX2."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import (assert_float32_product, float64_product, skip_if_native_kernels_are_avx2,
                      tiny_config)
from t5lite.kernels import cpu_build, cpu_matvec
from t5lite.models import projection
from t5lite.models.model import Model

needs_kernel = pytest.mark.skipif(not cpu_matvec.available(), reason="no CPU kernel here")
needs_amx = pytest.mark.skipif(not cpu_matvec.amx_rows(), reason="no AMX here")

# (rows, k, n, w_transposed): vector-width tails in n (kn) and k (nk), several 64-row items.
SHAPES = [(1, 200, 300, False), (2, 64, 48, False), (3, 130, 517, False), (4, 768, 96, False),
          (1, 70, 150, True), (2, 512, 200, True), (1, 16, 1, True), (4, 3, 5, False)]


# On AMX: 5-32 rows (3-32 against a transposed weight), k and n multiples of 32; a last panel
# of W narrower than 256 columns (n = 320), row tiles of 16 and fewer.
AMX_SHAPES = [(5, 64, 96, False), (16, 96, 64, False), (32, 768, 320, False), (17, 32, 32, False),
              (3, 64, 64, True), (32, 128, 96, True), (20, 64, 32, True), (9, 512, 1024, True)]

# float32: 1-4 rows as bf16's; 5-32 rows against [k, n] in panels of 128 columns (64 with AVX2)
# and tiles of 6 rows (2 with AVX2) x 4 vectors: tails of rows and of vectors, one vector, odd k,
# several panels.
F32_SHAPES = [(1, 200, 300, False), (3, 130, 517, False), (4, 70, 150, True), (3, 64, 40, True),
              (5, 64, 48, False), (7, 100, 80, False), (13, 20, 16, False),
              (17, 33, 144, False), (31, 128, 272, False), (32, 768, 320, False)]


def _bf16(rng, shape):
  return jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)


def _wide(a):
  return np.asarray(a.astype(jnp.float32), np.float64)


@needs_kernel
@pytest.mark.parametrize("rows,k,n,w_transposed", SHAPES + [
    pytest.param(*shape, marks=needs_amx) for shape in AMX_SHAPES])
def test_matvec_matches_a_float64_product(rows, k, n, w_transposed):
  """y = x @ w (or x @ w.T) with fp32 sums rounded once to bf16: within half a bf16 step (of
  y's binade) plus the fp32 sums' error of the float64 product of the same bf16 values."""
  rng = np.random.default_rng(rows * 1000 + k + n)
  x, w = _bf16(rng, (rows, k)), _bf16(rng, (n, k) if w_transposed else (k, n))
  y = jax.jit(lambda x, w: cpu_matvec.matvec(x, w, w_transposed=w_transposed))(x, w)
  assert y.dtype == jnp.bfloat16 and y.shape == (rows, n)
  ref, scale = float64_product(x, w, w_transposed)
  err = np.abs(_wide(y) - ref)
  half_step = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(_wide(y)), 1e-30))) - 8)
  assert np.all(err <= half_step + 1e-6 * scale), (err / half_step).max()


@needs_kernel
@pytest.mark.parametrize("rows,k,n,w_transposed", F32_SHAPES)
def test_f32_matvec_matches_a_float64_product(rows, k, n, w_transposed):
  """float32 y = x @ w (or x @ w.T): the float64 product within the fp32 sums' error."""
  assert_float32_product(lambda x, w: cpu_matvec.matvec(x, w, w_transposed=w_transposed),
                         rows, k, n, w_transposed, seed=rows * 1000 + k + n)


@needs_kernel
@pytest.mark.parametrize("rows,k,n,w_transposed", SHAPES + [
    pytest.param(*shape, marks=needs_amx) for shape in AMX_SHAPES])
def test_matvec_writes_float32_sums_of_bf16_operands(rows, k, n, w_transposed):
  """out_dtype=float32 (the output head's logits): the fp32 sums as they are, within the fp32
  sums' error of the float64 product; the bf16 output is exactly them rounded to bf16."""
  rng = np.random.default_rng(rows * 1000 + k + n + 1)
  x, w = _bf16(rng, (rows, k)), _bf16(rng, (n, k) if w_transposed else (k, n))
  run = lambda out: jax.jit(  # noqa: E731
      lambda x, w: cpu_matvec.matvec(x, w, w_transposed=w_transposed, out_dtype=out))
  y, y16 = run(jnp.float32)(x, w), run(None)(x, w)
  assert y.dtype == jnp.float32 and y.shape == (rows, n)
  ref, scale = float64_product(x, w, w_transposed)
  np.testing.assert_array_less(np.abs(np.asarray(y, np.float64) - ref), 1e-6 * scale + 1e-30)
  np.testing.assert_array_equal(np.asarray(y.astype(jnp.bfloat16), np.float32),
                                np.asarray(y16, np.float32))
  assert "t5lite_cpu_matvec_bf16_f32" in run(jnp.float32).lower(x, w).as_text()
  with pytest.raises(ValueError, match="asked for float32 ones as bfloat16"):
    cpu_matvec.matvec(x.astype(jnp.float32), w.astype(jnp.float32), w_transposed=w_transposed,
                      out_dtype=jnp.bfloat16)


def test_matvec_refuses_what_it_does_not_take():
  """More rows than it is fast for, mixed or other dtypes, or shapes that do not contract:
  `supports` says no and `matvec` raises a ValueError naming what it takes."""
  s = lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype)
  assert cpu_matvec.supports(s((4, 8)), s((8, 3)))
  assert cpu_matvec.supports(s((2, 8)), s((3, 8)), w_transposed=True)
  assert not cpu_matvec.supports(s((5, 8)), s((8, 3)))  # AMX: k and n multiples of 32 only
  assert not cpu_matvec.supports(s((3, 8)), s((3, 8)), w_transposed=True)
  assert cpu_matvec.supports(s((32, 64)), s((64, 96))) == (cpu_matvec.amx_rows() == 32)
  assert cpu_matvec.supports(s((3, 64)), s((96, 64)), w_transposed=True) == (
      cpu_matvec.amx_rows() == 32)
  assert not cpu_matvec.supports(s((33, 64)), s((64, 96)))
  assert not cpu_matvec.supports(s((1, 8)), s((3, 8)))
  f32 = lambda shape: s(shape, jnp.float32)  # noqa: E731
  assert cpu_matvec.supports(f32((4, 8)), f32((3, 8)), w_transposed=True)
  assert cpu_matvec.supports(f32((32, 8)), f32((8, 48)))
  assert not cpu_matvec.supports(f32((33, 8)), f32((8, 48)))
  assert not cpu_matvec.supports(f32((5, 8)), f32((8, 40)))  # n not a multiple of 16
  assert not cpu_matvec.supports(f32((5, 8)), f32((48, 8)), w_transposed=True)
  assert not cpu_matvec.supports(f32((1, 8)), s((8, 3)))
  assert not cpu_matvec.supports(s((1, 8), jnp.float16), s((8, 3), jnp.float16))
  with pytest.raises(ValueError, match="float32 rows against"):
    cpu_matvec.matvec(jnp.ones((33, 8), jnp.float32), jnp.ones((8, 48), jnp.float32))


SPECS = [("bld,dhk->blhk", (1, 1, 32), (32, 4, 16)), ("blhk,hkd->bld", (2, 1, 4, 16), (4, 16, 40)),
         ("bld,vd->blv", (2, 1, 32), (300, 32)), ("bld,dnf->blnf", (4, 1, 32), (32, 2, 24))]


@needs_kernel
@pytest.mark.parametrize("float32_outputs", [False, True])
@pytest.mark.parametrize("spec,x_shape,k_shape", SPECS)
def test_project_runs_few_tokens_in_the_kernel_with_xla_gradients(spec, x_shape, k_shape,
                                                                   float32_outputs):
  """A bf16 projection of <= 4 tokens runs in the kernel (its custom call in the program), its
  values XLA's product's within one bf16 rounding, its gradients XLA's path's exactly (float32's
  values within fp32 rounding); with more tokens or a mesh of several devices XLA's einsum
  runs."""
  rng = np.random.default_rng(0)
  x, kernel = _bf16(rng, x_shape), _bf16(rng, k_shape)
  if float32_outputs:
    kernel = kernel.astype(jnp.float32)  # fp32 parameters, cast inside
  opts = dict(flat_weight_grad=True, float32_outputs=float32_outputs)
  run = lambda mv: jax.jit(lambda x, k: projection.project(spec, x, k, matvec_kernel=mv, **opts))
  assert "t5lite_cpu_matvec" in run(True).lower(x, kernel).as_text()
  assert "t5lite_cpu_matvec" not in run(False).lower(x, kernel).as_text()
  got, want = _wide(run(True)(x, kernel)), _wide(run(False)(x, kernel))
  np.testing.assert_allclose(got, want, rtol=2.0 ** -7, atol=1e-2)
  loss = lambda mv: lambda x, k: jnp.sum(
      projection.project(spec, x, k, matvec_kernel=mv, **opts).astype(jnp.float32) ** 2)
  g_kernel = jax.jit(jax.grad(loss(True), argnums=(0, 1)))(x, kernel)
  g_xla = jax.jit(jax.grad(loss(False), argnums=(0, 1)))(x, kernel)
  # The cotangent is 2y, computed from the kernel's y: the gradients are XLA's for that y.
  y = run(True)(x, kernel)
  _, pullback = jax.vjp(lambda x, k: projection.project(spec, x, k, **opts), x, kernel)
  for a, b in zip(g_kernel, pullback((2 * y.astype(jnp.float32)).astype(y.dtype))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert all(a.shape == b.shape for a, b in zip(g_kernel, g_xla))
  many = jnp.concatenate([x] * 40, axis=0)  # 40 or more tokens: more than AMX takes
  assert "t5lite_cpu_matvec" not in run(True).lower(many, kernel).as_text()
  # float32: the kernel too (<= 4 tokens), XLA's values within fp32 rounding; not for 40 or more.
  fp32 = lambda mv: jax.jit(lambda x, k: projection.project(spec, x, k, matvec_kernel=mv))
  x32, k32 = x.astype(jnp.float32), kernel.astype(jnp.float32)
  assert "t5lite_cpu_matvec_f32" in fp32(True).lower(x32, k32).as_text()
  np.testing.assert_allclose(fp32(True)(x32, k32), fp32(False)(x32, k32), rtol=1e-5, atol=1e-5)
  assert "t5lite_cpu_matvec" not in fp32(True).lower(many.astype(jnp.float32), k32).as_text()
  # float32 logits of bf16 operands (out_dtype, the output head): the kernel's unrounded sums.
  wide = jax.jit(lambda x, k: projection.project(spec, x, k, matvec_kernel=True,
                                                 out_dtype=jnp.float32, **opts))
  assert "t5lite_cpu_matvec_bf16_f32" in wide.lower(x, kernel).as_text()
  want = jnp.einsum(spec, x.astype(jnp.float32), kernel.astype(jnp.bfloat16).astype(jnp.float32))
  np.testing.assert_allclose(wide(x, kernel), want, rtol=1e-5, atol=1e-5)
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((2,), ("data",))):
    # A program for several devices: XLA's einsum (the kernel's call would not partition).
    assert "t5lite_cpu_matvec" not in str(jax.make_jaxpr(run(True))(x, kernel))


@needs_kernel
@pytest.mark.parametrize("variant", [dict(arch="decoder_only", num_kv_heads=2),
                                     dict(arch="encoder_decoder")],
                         ids=["decoder_only", "encoder_decoder"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_decoding_with_the_kernel_gives_xla_s_tokens(variant, dtype):
  """Greedy decoding at batch 1 and 2 (and 5: AMX for bf16, where there is AMX; the panels for
  float32) runs its token steps' projections in the kernel and decodes the tokens of XLA's
  products (a tiny model whose logits are far apart, so that one bf16 rounding's difference
  cannot flip a choice)."""
  more = (5,) if dtype == "float32" or cpu_matvec.amx_rows() else ()
  for rows in (1, 2) + more:
    tokens = {}
    for mv in (False, True):
      cfg = tiny_config(dtype=dtype, matvec_kernel=mv, **variant)
      model = Model(cfg)
      params = model.init(jax.random.key(3))
      params = jax.tree.map(lambda p: p * 4 if p.ndim == 2 and p.shape[0] == cfg.vocab_size
                            else p, params)  # sharper logits
      key = "encoder_input_tokens" if cfg.arch == "encoder_decoder" else "prompt_tokens"
      batch = {key: np.random.default_rng(rows).integers(3, cfg.vocab_size, (rows, 5))
               .astype(np.int32)}
      decode = jax.jit(lambda p, b, m=model: m.predict_batch(p, b, max_decode_len=6,
                                                             eos_id=-1)["tokens"])
      assert ("t5lite_cpu_matvec" in decode.lower(params, batch).as_text()) == mv
      tokens[mv] = np.asarray(decode(params, batch))
    np.testing.assert_array_equal(tokens[True], tokens[False])


@pytest.mark.skipif(not {"avx2", "fma"} <= (cpu_build.cpu_flags() or frozenset()),
                    reason="this CPU cannot run an AVX2 build")
@needs_kernel
def test_avx2_build_passes_the_value_tests(tmp_path):
  """The kernel built for AVX2 (8-float vectors, 8 sums in registers; float32 tiles of 2 rows)
  passes the value tests."""
  skip_if_native_kernels_are_avx2()
  env = dict(os.environ, T5LITE_CPU_ATTENTION_MARCH="haswell", T5LITE_CACHE_DIR=str(tmp_path))
  done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                         "-p", "no:xdist", "-k", "matches_a_float64_product", __file__],
                        env=env, capture_output=True, text=True, check=False,
                        cwd=os.path.dirname(__file__))
  summary = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
  passed = len(SHAPES) + len(F32_SHAPES)
  assert done.returncode == 0 and f"{passed} passed" in summary, done.stdout[-3000:]
  assert list((tmp_path / "kernels").glob("*.so"))
