"""The GPU benchmark suites' programs lower for CUDA, on this CPU-only machine.

No GPU runs these tests, and most sessions are lent none, so this is what guards the GPU run
config (`runs/gpu.gin`: bfloat16, cuDNN flash attention, unrolled layers, no remat)
between GPU runs: every case of the `gpu`, `gpu-levers` and `gpu-decode` suites is traced at its
real shapes (abstract: nothing is allocated) and lowered to StableHLO for CUDA, and the attention
must reach cuDNN's fused kernels, forward and backward, with T5's position bias passed at batch 1
as the GPU gets it, and run flash attention's forward a second time in the backward pass only
where the remat policy drops its outputs.

JAX asks the local GPU for cuDNN's version and its compute capability while tracing; there is
none here, so `t5lite.gpu_aot.tracing_for("h100")` answers for an H100 (cuDNN 9.10). Everything
else is JAX's own path: its shape, layout and mask checks for cuDNN run as they would on an H100.
tests/test_gpu_aot.py goes further and compiles these programs with XLA's GPU compiler.
"""

import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from t5lite import gin_setup, gpu_aot, optimizers, trainer
from t5lite.models import attention
from t5lite.models.model import Model

sys.path.insert(0, os.path.join(REPO, "scripts"))
import benchmark_step  # pylint: disable=wrong-import-position
import benchmark_suite  # pylint: disable=wrong-import-position


@pytest.fixture(name="cuda_host")
def fixture_cuda_host():
  """Traces as for an H100 (cuDNN 9.10, compute capability 9.0)."""
  with gpu_aot.tracing_for("h100"):
    yield


def _experiment(case):
  return gin_setup.parse_gin(case.gin_files,
                             ["experiment.model_dir = '/tmp/unused'"] + list(case.bindings))


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _cudnn_calls(stablehlo: str):
  """{cuDNN custom call target: [its operand types, one string per call]}."""
  calls = {}
  for m in re.finditer(r'custom_call @(__cudnn\$fmha\w*)\([^)]*\)[^\n]*: \(([^)]*)\)', stablehlo):
    calls.setdefault(m.group(1), []).append(m.group(2))
  return calls


def _check_training_attention(exp, calls, text):
  """cuDNN's kernels, forward and backward, in bfloat16; T5's bias at batch 1. Under
  `attention_impl = "pallas"` T5's biased self-attention is t5lite's Pallas kernel instead
  (forward and backward) and the rest stays cuDNN's."""
  cfg = exp.model
  assert cfg.attention_impl in ("cudnn", "pallas") and cfg.dtype == "bfloat16"
  suffixes = ("", "Backward")
  if cfg.arch == "encoder_decoder":
    # Self-attention with the relative position bias, cross-attention without.
    kernel = cfg.attention_impl == "pallas"
    for suffix in suffixes:
      assert (f"__cudnn$fmhaScaleBiasSoftmax{suffix}" in calls) != kernel, sorted(calls)
      assert f"__cudnn$fmhaSoftmax{suffix}" in calls, sorted(calls)
    for operands in calls.get("__cudnn$fmhaScaleBiasSoftmax", []):
      assert f"tensor<1x{cfg.num_heads}x" in operands, operands  # the bias, at batch 1
    for name in ("t5lite_attention_forward", "t5lite_attention_backward"):
      assert (name in text) == kernel, name
  else:
    for suffix in suffixes:
      assert f"__cudnn$fmhaSoftmax{suffix}" in calls, sorted(calls)
    assert not any("Bias" in name for name in calls)
  assert all("bf16" in operands for ops in calls.values() for operands in ops)


TRAIN_CASES = [pytest.param(c, id=f"{name}:{c.label}") for name in ("gpu", "gpu-levers")
               for c in benchmark_suite.SUITES[name]]
DECODE_CASES = list(benchmark_suite.SUITES["gpu-decode"])


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_train_step_lowers_for_cuda_with_cudnn_attention(case, cuda_host):
  del cuda_host
  exp = _experiment(case)
  model = Model(exp.model, exp.loss)
  opt = optimizers.make_optimizer(exp.optimizer, 1e-4)
  step = trainer.jit_train_step(model, opt, lambda s: 1e-4, exp.train)
  state = jax.eval_shape(lambda: trainer.init_state(model, opt, jax.random.key(0)))
  batch = _abstract(benchmark_step.synthetic_batch(exp.model, case.batch, case.inputs,
                                                  case.targets))
  lowered = step.trace(state, batch).lower(lowering_platforms=("cuda",))
  text = lowered.as_text()
  calls = _cudnn_calls(text)
  _check_training_attention(exp, calls, text)
  # Flash attention's forward runs again in the backward pass where the remat policy drops its
  # outputs (dots_no_batch: they are no dot's), once per layer where it keeps them.
  forward = sum(len(v) for k, v in calls.items() if not k.endswith("Backward"))
  backward = sum(len(v) for k, v in calls.items() if k.endswith("Backward"))
  recomputed = exp.model.remat_policy in ("full", "dots", "dots_no_batch", "dots_no_batch_mlp")
  assert (forward > backward) if recomputed else (forward == backward), (forward, backward)
  # Parameters are stored as the case asks, and the state is donated to the step unless the
  # case turns that off.
  params = state["params"]
  want = jnp.dtype(exp.model.param_dtype)
  assert {x.dtype for x in jax.tree.leaves(params)} == {want}
  donated = "tf.aliasing_output" in text or "jax.buffer_donor" in text
  assert donated == exp.train.donate_state


def test_gpu_levers_setting_compiler_options_keep_the_run_configs():
  """A lever that sets TrainConfig.compiler_options replaces runs/gpu.gin's whole dict, so
  benchmark_suite.py starts from the file's (`run_compiler_options`, read from its text): as gin
  parses the file, the levers' options are its options but for the one each lever is about (the
  dot merger back on; cuBLAS GEMMs)."""
  cases = [c for c in benchmark_suite.SUITES["gpu-levers"] if c.preset == "t5_1_1/base"]
  run = _experiment(cases[0]).train.compiler_options
  assert not cases[0].bindings and "xla_gpu_dot_merger_threshold_mb" in run
  options = [_experiment(c).train.compiler_options for c in cases
             if any(b.startswith("TrainConfig.compiler_options") for b in c.bindings)]
  merger_on = {k: v for k, v in run.items() if k != "xla_gpu_dot_merger_threshold_mb"}
  assert options == [merger_on, {**run, "xla_gpu_enable_triton_gemm": False}]
  assert benchmark_suite.run_compiler_options("gpu") == run
  assert benchmark_suite.run_compiler_options("cpu") == {}  # runs/cpu.gin binds none


@pytest.mark.parametrize("case", DECODE_CASES, ids=[f"{c.preset}-b{c.batch}" for c in DECODE_CASES])
def test_decode_lowers_for_cuda_with_cudnn_prefill(case, cuda_host):
  del cuda_host
  exp = _experiment(case)
  model = Model(exp.model)
  params = jax.eval_shape(model.init, jax.random.key(0))
  key = "encoder_input_tokens" if exp.model.arch == "encoder_decoder" else "prompt_tokens"
  feed = {key: jax.ShapeDtypeStruct((case.batch, case.inputs), jnp.int32)}
  decode = jax.jit(lambda p, f: model.predict_batch(p, f, max_decode_len=case.decode_tokens,
                                                    eos_id=-1))
  text = decode.trace(params, feed).lower(lowering_platforms=("cuda",)).as_text()
  # The prompt (the encoder for T5, the prefill for decoders) goes through cuDNN, forward
  # only; the steps after it attend to the cache with one query each. JAX hands cuDNN a dense
  # mask as a bias, so the decoders' prefill (its mask covers padded prompts) is biased too.
  calls = _cudnn_calls(text)
  assert list(calls) == ["__cudnn$fmhaScaleBiasSoftmax"], sorted(calls)
  assert all("bf16" in operands for operands in calls["__cudnn$fmhaScaleBiasSoftmax"])


def test_only_cudnn_gets_the_position_bias_at_batch_1(cuda_host):
  """On a CPU host the XLA implementation gets T5's bias broadcast over the batch (a CPU speed
  path), cuDNN gets it at batch 1 as on a GPU: so the batch-1 checks above are not vacuous, and
  hold because the implementation, not the host, decides."""
  del cuda_host
  b, length, heads, dim = 4, 32, 2, 64
  qkv = jax.ShapeDtypeStruct((b, length, heads, dim), jnp.bfloat16)
  bias = jax.ShapeDtypeStruct((1, heads, length, length), jnp.float32)
  texts = {}
  for impl in ("xla", "cudnn"):
    fn = lambda q, k, v, bias, impl=impl: attention.attend(
        q, k, v, attention.Mask(), bias, scale=1.0, implementation=impl)
    texts[impl] = jax.jit(fn).trace(qkv, qkv, qkv, bias).lower(
        lowering_platforms=("cuda",)).as_text()
  broadcast = f"tensor<{b}x{heads}x{length}x{length}xbf16>"
  assert broadcast in texts["xla"]
  biased = _cudnn_calls(texts["cudnn"])["__cudnn$fmhaScaleBiasSoftmax"]
  assert biased and all(f"tensor<1x{heads}x" in ops for ops in biased), biased
  assert broadcast not in texts["cudnn"]


def _packed(batch, lengths, examples=3):
  """`batch` with its rows packed as t5lite's data pipeline packs them (runs/pretrain.gin's
  default): `examples` examples a row, then padding; segment ids and positions per feature
  ("encoder"/"decoder": length)."""
  rows = next(iter(batch.values())).shape[0]
  for prefix, length in lengths.items():
    size = length // (examples + 1)
    seg = np.zeros((rows, length), np.int32)
    pos = np.zeros_like(seg)
    for i in range(examples):
      seg[:, i * size:(i + 1) * size] = i + 1
      pos[:, i * size:(i + 1) * size] = np.arange(size)
    batch[f"{prefix}_segment_ids"], batch[f"{prefix}_positions"] = seg, pos
  return batch


@pytest.mark.parametrize("preset,inputs,targets,masks", [
    ("models/t5_1_1/base.gin", 512, 128, {"CAUSAL", "NO_MASK"}),
    ("models/decoder/1b.gin", 0, 2048, {"CAUSAL"}),
    ("models/prefix_lm_tiny.gin", 256, 64, {"NO_MASK"})])
def test_packed_rows_lower_for_cuda_with_cudnn_attention(preset, inputs, targets, masks,
                                                          cuda_host):
  """Packed rows (what a GPU pretraining run, runs/pretrain.gin + runs/gpu.gin, trains on) reach
  cuDNN's kernels, forward and backward, with the segments' mask as a bias; causal self-attention
  keeps cuDNN's causal mask type (it skips the blocks above the diagonal), a prefix LM's does
  not (its prefix sees ahead)."""
  del cuda_host
  exp = gin_setup.parse_gin([preset, "runs/gpu.gin"], ["experiment.model_dir = '/tmp/unused'"])
  batch = benchmark_step.synthetic_batch(exp.model, 2, inputs, targets)
  enc_dec = exp.model.arch == "encoder_decoder"
  batch = _packed(batch, {"encoder": inputs, "decoder": targets} if enc_dec
                  else {"decoder": inputs + targets})
  model = Model(exp.model, exp.loss)
  opt = optimizers.make_optimizer(exp.optimizer, 1e-4)
  step = trainer.jit_train_step(model, opt, lambda s: 1e-4, exp.train)
  state = jax.eval_shape(lambda: trainer.init_state(model, opt, jax.random.key(0)))
  text = step.trace(state, _abstract(batch)).lower(lowering_platforms=("cuda",)).as_text()
  calls = _cudnn_calls(text)
  assert sorted(calls) == ["__cudnn$fmhaScaleBiasSoftmax",
                           "__cudnn$fmhaScaleBiasSoftmaxBackward"], sorted(calls)
  assert set(re.findall(r'mask_type\\22: \\22(\w+)\\22', text)) == masks


def test_plugin_check_answers_without_the_plugin_namespace():
  """Where no CUDA plugin is installed there is no `jax_plugins` package to look in:
  `plugin_available()` is False then (test_gpu_aot.py skips) rather than an ImportError."""
  assert not gpu_aot._module_exists("t5lite_no_such_package.xla_cuda12")
  assert gpu_aot._module_exists("jax.numpy")
  assert isinstance(gpu_aot.plugin_available(), bool)
