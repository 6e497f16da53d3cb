"""Shared fixtures: tiny model configs, a cached vocabulary and corpus, CPU-only JAX."""

import os
import sys

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite compiles hundreds of small programs, and their compile time is most of its time.
# LLVM at -O0 compiles them about a third faster; XLA's HLO passes still run, so every program,
# sharding, collective and FLOP count the tests read is the one users get, only the machine code
# is less optimized. Subprocesses inherit it (run_cli adds their own XLA_FLAGS after it).
# T5LITE_TEST_LLVM_OPT=1 keeps XLA's default.
LLVM_O0 = "--xla_backend_optimization_level=0"
# And XLA:CPU's fusions by its LLVM IR emitters rather than its MLIR fusion emitters, whose pass
# pipeline per fusion (not LLVM's) is then most of a compile: the tiny encoder-decoder's train
# step compiles in 1.1-1.7 s against 3.5 s, and the suite on 2 cores took 19 minutes against 25.
# The partitioning passes, and so the shardings and collectives, and the matmuls whose FLOPs the
# tests count are the same; the fusion passes differ a little (the MLIR emitters' pipeline fuses
# scatters and in-place updates that this one expands or leaves apart). Float results differ in
# the last bits, and, with these emitters, between programs that differ only in buffer donation:
# tests that compare two programs bit for bit compile them with USERS_CODEGEN, XLA's default.
# Set where the flag is known (jaxlib 0.10: XLA aborts at a flag it does not know);
# T5LITE_TEST_FUSION_EMITTERS=1 keeps XLA's default everywhere.
LEGACY_EMITTERS = "--xla_cpu_use_fusion_emitters=false"


def _jaxlib_knows_the_emitters_flag() -> bool:
  """Whether the installed jaxlib is one whose XLA has `LEGACY_EMITTERS`' flag (checked: 0.10)."""
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  try:
    return metadata.version("jaxlib").startswith("0.10.")
  except metadata.PackageNotFoundError:
    return False


def _add_xla_flag(flag: str):
  """Adds `flag` to XLA_FLAGS, once (xdist's workers load this file after the controller)."""
  flags = os.environ.get("XLA_FLAGS", "")
  if flag not in flags.split():
    os.environ["XLA_FLAGS"] = (flags + " " + flag).strip()


if os.environ.get("T5LITE_TEST_LLVM_OPT") != "1":
  _add_xla_flag(LLVM_O0)
LEGACY_FUSION = (os.environ.get("T5LITE_TEST_FUSION_EMITTERS") != "1"
                 and _jaxlib_knows_the_emitters_flag())
if LEGACY_FUSION:
  _add_xla_flag(LEGACY_EMITTERS)
# Compile options for XLA:CPU's default codegen, as users' programs are compiled
# (`jax.jit(f).lower(...).compile(compiler_options=USERS_CODEGEN)`).
USERS_CODEGEN = {"xla_cpu_use_fusion_emitters": True} if LEGACY_FUSION else {}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory):
  """One cache (corpus + SentencePiece model) for the whole session, unless CI provides one."""
  path = os.environ.get("T5LITE_CACHE_DIR") or str(tmp_path_factory.mktemp("t5lite_cache"))
  os.environ["T5LITE_CACHE_DIR"] = path
  return path


@pytest.fixture
def kernel_pays(monkeypatch):
  """The float32 matmul kernel run wherever it takes the operands (a build for AVX2 runs float32
  products only where they are large enough to pay, `cpu_matmul.pays`; the tests' are small)."""
  from t5lite.kernels import cpu_matmul  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(cpu_matmul, "pays", lambda *args, **kwargs: True)


def skip_if_native_kernels_are_avx2():
  """Skips a test that builds the CPU kernels for AVX2 and reruns kernel tests on that build,
  where this host's own build (-march=native) already is the AVX2 one (8 lanes): every kernel
  test of the suite ran the AVX2 code then, and the rerun would repeat it (about 100 s of
  compiling and testing on 2 cores). Hosts with AVX-512 still run it."""
  from t5lite.kernels import cpu_attention  # pylint: disable=import-outside-toplevel
  if cpu_attention.available() and cpu_attention.lanes(cpu_attention.library()) == 8:
    pytest.skip("this host's own kernel build is the AVX2 one; the suite's kernel tests ran it")


def float64_product(x, w, transposed: bool = False):
  """(x @ w, |x| @ |w|) in float64 over the values of x and w (w.T with `transposed`; bf16 or
  float32 arrays): a product's reference and the scale of its float32 sums' rounding error."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  wide = lambda a: np.asarray(a.astype("float32"), np.float64)  # noqa: E731
  wx, ww = wide(x), (wide(w).T if transposed else wide(w))
  return wx @ ww, np.abs(wx) @ np.abs(ww)


def assert_float32_product(product, m: int, k: int, n: int, transposed: bool, seed: int):
  """Runs `product(a, b)` under jit on float32 a [m, k] and b [k, n] ([n, k] with `transposed`)
  of standard normal values drawn from `seed`, and asserts a float32 [m, n] result within the
  float32 sums' error of the float64 product (every element written)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  a = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
  b = jnp.asarray(rng.standard_normal((n, k) if transposed else (k, n)), jnp.float32)
  c = jax.jit(product)(a, b)
  assert c.dtype == jnp.float32 and c.shape == (m, n)
  ref, scale = float64_product(a, b, transposed)
  assert np.all(np.abs(np.asarray(c, np.float64) - ref) <= 1e-6 * scale)


def assert_not_bf16_rounded(y):
  """Asserts float32 values `y` are sums as they came, not rounded to bf16 on the way: more than
  90% of them are not bf16 values (a bf16-rounded output would have none)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  assert y.dtype == jnp.float32
  rounded = np.asarray(y.astype(jnp.bfloat16).astype(jnp.float32))
  assert np.mean(rounded != np.asarray(y)) > 0.9


def equations(jaxpr, primitive: str):
  """The equations of `primitive` (e.g. "dot_general") in a jaxpr, its sub-jaxprs' too."""
  # jax.extend.core: jax.core's copy was removed in jax 0.11.
  from jax.extend.core import jaxprs_in_params  # pylint: disable=import-outside-toplevel
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == primitive:
      yield eqn
    for sub in jaxprs_in_params(eqn.params):
      yield from equations(sub, primitive)


def tiny_config(**overrides):
  """A tiny fp32 model config (encoder-decoder unless `arch` says otherwise)."""
  from t5lite.models.config import ModelConfig
  base = dict(arch="encoder_decoder", vocab_size=64, d_model=32, num_heads=4, head_dim=8,
              d_ff=64, num_encoder_layers=2, num_decoder_layers=2, dtype="float32")
  if overrides.get("arch", "encoder_decoder") != "encoder_decoder":
    base.update(position_encoding="rope", scale_attention=True, activation="silu",
                num_encoder_layers=0)
  base.update(overrides)
  return ModelConfig(**base)


def cli_env(env=None, optimized=False):
  """The environment for a t5lite subprocess: this one's, t5lite on PYTHONPATH, then `env`,
  whose XLA_FLAGS are added to the suite's rather than put in their place.

  optimized: compile with XLA's default LLVM optimization and fusion emitters, for a run whose
  time goes into running many steps rather than compiling (the mixture CLI test, 30 steps of
  T5-tiny: 59 s with it, 74 s at -O0, alone on 2 cores).
  """
  full_env = dict(os.environ)
  full_env["PYTHONPATH"] = REPO + os.pathsep + full_env.get("PYTHONPATH", "")
  if optimized:
    full_env["XLA_FLAGS"] = " ".join(f for f in full_env.get("XLA_FLAGS", "").split()
                                     if f not in (LLVM_O0, LEGACY_EMITTERS))
  env = dict(env or {})
  if "XLA_FLAGS" in env:
    env["XLA_FLAGS"] = (full_env.get("XLA_FLAGS", "") + " " + env["XLA_FLAGS"]).strip()
  full_env.update(env)
  return full_env


def run_cli(args, cwd=None, env=None, timeout=600, optimized=False, max_file_bytes=None):
  """Runs `python ARGS` in a subprocess with `cli_env(env, optimized)`; returns the
  CompletedProcess with text output. max_file_bytes: see `file_size_limit`."""
  import subprocess
  return subprocess.run([sys.executable] + list(args), cwd=cwd or REPO,
                        env=cli_env(env, optimized), capture_output=True, text=True,
                        timeout=timeout, preexec_fn=file_size_limit(max_file_bytes))


def file_size_limit(max_bytes):
  """A subprocess `preexec_fn` capping the size of every file the process writes (RLIMIT_FSIZE:
  a longer write fails with EFBIG, "File too large", as one fails on a full disk), or None."""
  if max_bytes is None:
    return None

  def limit():
    import resource
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
  return limit
