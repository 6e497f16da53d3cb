"""Reading compiled programs (t5lite/hlo_analysis.py): how often each computation runs, the
collectives, and matmul FLOPs, which must add up to the model FLOPs formula of
scripts/benchmark.py for real train steps, XLA:CPU's and (with JAX's CUDA plugin) an H100's;
and device-memory traffic, which for a decode step on an H100 must come to its weights and KV
cache read once."""

import argparse
import dataclasses
import os
import sys

import jax
import pytest

from conftest import REPO, tiny_config
from t5lite import autoparallel, gin_setup, gpu_aot, hlo_analysis, optimizers
from t5lite.kernels import cpu_attention

sys.path.insert(0, os.path.join(REPO, "scripts"))
import benchmark_aot  # pylint: disable=wrong-import-position
import benchmark_step  # pylint: disable=wrong-import-position

# Outer loop x2 around an inner loop x3 whose body calls a fusion holding a dot; an async
# all-gather (start and done) at the top, an all-reduce in the inner body.
HLO = """
%fused_dot (p0: f32[4,8], p1: f32[8,16]) -> f32[4,16] {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = f32[8,16]{1,0} parameter(1)
  ROOT %dot.1 = f32[4,16]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
%inner_body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %x = f32[4,8]{1,0} parameter(0)
  %w = f32[8,16]{1,0} constant({...})
  %f = f32[4,16]{1,0} fusion(%x, %w), kind=kCustom, calls=%fused_dot
  %ar = f32[256]{0} all-reduce(f32[256]{0} %y), replica_groups={{0,1,2,3}}, to_apply=%add
}
%outer_body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %t = (s32[], f32[4,8]) parameter(0)
  %w2 = (s32[], f32[4,8]) while(%t), condition=%cond.2, body=%inner_body, backend_config={"known_trip_count":{"n":"3"}}
}
ENTRY %main (a: f32[8]) -> f32[8] {
  %y = bf16[1,128]{1,0} parameter(0)
  %ags = (bf16[1,128]{1,0}, bf16[4,128]{1,0}) all-gather-start(%y), replica_groups=[2,4]<=[8], dimensions={0}
  %agd = bf16[4,128]{1,0} all-gather-done(%ags)
  %w = (s32[], f32[8]) while(%t), condition=%cond.1, body=%outer_body, backend_config={"known_trip_count":{"n":"2"}}
}
"""


def test_nested_loops_multiply_and_async_collectives_count_once():
  program = hlo_analysis.Program(HLO)
  assert program.runs["outer_body"] == 2 and program.runs["inner_body"] == 6
  assert program.runs["fused_dot"] == 6 and not program.unknown_loops
  # A loop whose trip count XLA does not know runs once here, and is listed.
  unknown = hlo_analysis.Program(HLO.replace(', backend_config={"known_trip_count":{"n":"2"}}', ""))
  assert unknown.unknown_loops == ["w"] and unknown.runs["inner_body"] == 3
  assert hlo_analysis.matmul_flops(HLO)["dot"] == 6 * 2 * 4 * 16 * 8
  # By op: the dot under its own name (not its fusion's), six runs a step.
  assert hlo_analysis.matmul_flops_by_op(HLO) == {"dot.1": 6 * 2 * 4 * 16 * 8}
  stats = hlo_analysis.collectives(HLO, 8)
  assert stats["all-reduce"]["count"] == 6
  assert stats["all-reduce"]["bytes"] == pytest.approx(6 * 2 * 3 / 4 * 256 * 4)
  # The async all-gather counts once, with its result (4 x 128 bf16), over groups of 4.
  assert stats["all-gather"]["count"] == 1
  assert stats["all-gather"]["bytes"] == pytest.approx(3 / 4 * 4 * 128 * 2)


# A token loop (no known trip count) whose body writes one row of a cache in place and runs an
# inner loop x3 of an elementwise fusion; before it, a fusion that converts a stacked weight
# and keeps one layer of it, and one that gathers rows of a table.
TRAFFIC_HLO = """
%fused_update (c: bf16[4,16,8], u: bf16[4,1,8], i: s32[]) -> bf16[4,16,8] {
  %c = bf16[4,16,8]{2,1,0} parameter(0)
  %u = bf16[4,1,8]{2,1,0} parameter(1)
  %i = s32[] parameter(2)
  %z = s32[] constant(0)
  ROOT %d = bf16[4,16,8]{2,1,0} dynamic-update-slice(%c, %u, %z, %i, %z)
}
%fused_mul (a: f32[8,8], b: f32[8,8]) -> f32[8,8] {
  %a = f32[8,8]{1,0} parameter(0)
  %b = f32[8,8]{1,0} parameter(1)
  ROOT %m = f32[8,8]{1,0} multiply(%a, %b)
}
%fused_layer (w: f32[6,8,8]) -> bf16[1,8,8] {
  %w = f32[6,8,8]{2,1,0} parameter(0)
  %c = bf16[6,8,8]{2,1,0} convert(%w)
  ROOT %s = bf16[1,8,8]{2,1,0} slice(%c), slice={[0:1], [0:8], [0:8]}
}
%fused_rows (t: bf16[100,8], ids: s32[4,1]) -> (bf16[4,8], bf16[4,8]) {
  %t = bf16[100,8]{1,0} parameter(0)
  %ids = s32[4,1]{1,0} parameter(1)
  %g = bf16[4,8]{1,0} gather(%t, %ids), offset_dims={1}, collapsed_slice_dims={0}, start_index_map={0}, index_vector_dim=1, slice_sizes={1,8}
  %n = bf16[4,8]{1,0} negate(%g)
  ROOT %r = (bf16[4,8]{1,0}, bf16[4,8]{1,0}) tuple(%g, %n)
}
%inner_body (p: (s32[], f32[8,8])) -> (s32[], f32[8,8]) {
  %p = (s32[], f32[8,8]{1,0}) parameter(0)
  %x = f32[8,8]{1,0} get-tuple-element(%p), index=1
  %y = f32[8,8]{1,0} fusion(%x, %x), kind=kLoop, calls=%fused_mul
}
%token_body (p: (s32[], bf16[4,16,8], bf16[4,1,8])) -> (s32[], bf16[4,16,8], bf16[4,1,8]) {
  %p = (s32[], bf16[4,16,8]{2,1,0}, bf16[4,1,8]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %cache = bf16[4,16,8]{2,1,0} get-tuple-element(%p), index=1
  %u = bf16[4,1,8]{2,1,0} get-tuple-element(%p), index=2
  %k = bf16[4,16,8]{2,1,0} fusion(%cache, %u, %i), kind=kLoop, calls=%fused_update
  %in = (s32[], f32[8,8]) while(%p), condition=%inner_cond, body=%inner_body, backend_config={"known_trip_count":{"n":"3"}}
}
ENTRY %main (w: f32[6,8,8], t: bf16[100,8], ids: s32[4,1]) -> bf16[1,8,8] {
  %w = f32[6,8,8]{2,1,0} parameter(0)
  %t = bf16[100,8]{1,0} parameter(1)
  %ids = s32[4,1]{1,0} parameter(2)
  %l = bf16[1,8,8]{2,1,0} fusion(%w), kind=kLoop, calls=%fused_layer
  %r = (bf16[4,8]{1,0}, bf16[4,8]{1,0}) fusion(%t, %ids), kind=kLoop, calls=%fused_rows
  %tokens = (s32[], bf16[4,16,8], bf16[4,1,8]) while(%init), condition=%token_cond, body=%token_body
}
"""


def test_memory_traffic_counts_what_kernels_touch():
  """A cache written in place moves its update, a slice after a conversion reads its slice of
  the operand, gathered rows are read, not the table; loops multiply; per token step or per
  step (the token loop, with no known trip count, once)."""
  step = hlo_analysis.memory_traffic(TRAFFIC_HLO, loop="tokens")
  update = 4 * 1 * 8 * 2
  inner = 3 * (8 * 8 * 4) * 3   # two operands and the result, three times
  assert step == {"bytes": 2 * update + 4 + inner, "kernels": 1 + 3}
  layer = 8 * 8 * 4 + 8 * 8 * 2   # one float32 layer read, written as bfloat16
  rows = 4 * 8 * 2 + 4 * 4 + 2 * 4 * 8 * 2   # gathered rows, ids, both outputs
  whole = hlo_analysis.memory_traffic(TRAFFIC_HLO)
  assert whole == {"bytes": step["bytes"] + layer + rows, "kernels": step["kernels"] + 2}
  assert hlo_analysis.Program(TRAFFIC_HLO).loop_bodies == {"in": "inner_body",
                                                           "tokens": "token_body"}
  # XLA 0.11 runs some fusions asynchronously (fusion-start / fusion-done): the same kernel.
  launched = TRAFFIC_HLO.replace("%k = bf16[4,16,8]{2,1,0} fusion(",
                                 "%k = ((bf16[4,16,8]{2,1,0}), s32[]) fusion-start(")
  assert launched != TRAFFIC_HLO
  assert hlo_analysis.memory_traffic(launched, loop="tokens") == step


# A conditional: one branch multiplies [64, 64] matrices (a kernel of 2 * 64^3 FLOPs over
# 3 x 16 KB), the other passes its operand through; then an elementwise kernel.
GUARD_HLO = """
%fused_matmul (a: f32[64,64], b: f32[64,64]) -> f32[64,64] {
  %a = f32[64,64]{1,0} parameter(0)
  %b = f32[64,64]{1,0} parameter(1)
  ROOT %d = f32[64,64]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
%fused_neg (x: f32[64,64]) -> f32[64,64] {
  %x = f32[64,64]{1,0} parameter(0)
  ROOT %n = f32[64,64]{1,0} negate(%x)
}
%update (p: (f32[64,64])) -> f32[64,64] {
  %p = (f32[64,64]{1,0}) parameter(0)
  %x = f32[64,64]{1,0} get-tuple-element(%p), index=0
  ROOT %m = f32[64,64]{1,0} fusion(%x, %x), kind=kCustom, calls=%fused_matmul
}
%skip (p: (f32[64,64])) -> f32[64,64] {
  %p = (f32[64,64]{1,0}) parameter(0)
  ROOT %x = f32[64,64]{1,0} get-tuple-element(%p), index=0
}
ENTRY %main (ok: pred[], x: f32[64,64]) -> f32[64,64] {
  %ok = pred[] parameter(0)
  %x = f32[64,64]{1,0} parameter(1)
  %t = (f32[64,64]{1,0}) tuple(%x)
  %c = f32[64,64]{1,0} conditional(%ok, %t, %t), true_computation=%update, false_computation=%skip
  ROOT %n = f32[64,64]{1,0} fusion(%c), kind=kLoop, calls=%fused_neg
}
"""


def test_a_conditional_runs_its_costlier_branch_and_the_roofline_takes_each_kernels_bound():
  matrix = 64 * 64 * 4
  assert hlo_analysis.memory_traffic(GUARD_HLO) == {"bytes": 3 * matrix + 2 * matrix,
                                                     "kernels": 2}
  flops = 2 * 64 ** 3
  # Bandwidth-bound matmul: both kernels at the bandwidth.
  assert hlo_analysis.roofline(GUARD_HLO, 1e12, 1e9) == pytest.approx(
      {"seconds": 5 * matrix / 1e9, "matmul_s": 0.0, "memory_s": 5 * matrix / 1e9})
  # Compute-bound matmul: it takes its FLOPs at the peak, the negation its bytes.
  assert hlo_analysis.roofline(GUARD_HLO, 1e6, 1e9) == pytest.approx(
      {"seconds": flops / 1e6 + 2 * matrix / 1e9, "matmul_s": flops / 1e6,
       "memory_s": 2 * matrix / 1e9})


def test_top_kernels_rank_the_roofline_by_kernel():
  flops, matrix = 2 * 64 ** 3, 64 * 64 * 4
  top = hlo_analysis.top_kernels(GUARD_HLO, 1e6, 1e9)
  assert [(row["opcode"], row["bound"], row["runs"]) for row in top] == [
      ("fusion", "matmul", 1), ("fusion", "memory", 1)]
  assert top[0]["seconds"] == pytest.approx(flops / 1e6) and top[0]["flops"] == flops
  assert top[1]["bytes"] == 2 * matrix and top[1]["shape"].startswith("f32[64,64]")
  assert sum(row["seconds"] for row in top) == pytest.approx(
      hlo_analysis.roofline(GUARD_HLO, 1e6, 1e9)["seconds"])
  # At a fast enough peak the matmul is bandwidth-bound and the order follows the bytes.
  assert [row["bytes"] for row in hlo_analysis.top_kernels(GUARD_HLO, 1e18, 1e9, count=1)] == [
      3 * matrix]
  named = GUARD_HLO.replace("calls=%fused_neg", 'calls=%fused_neg, metadata={op_name="jit(f)/neg"}')
  assert hlo_analysis.top_kernels(named, 1e18, 1e9)[1]["op_name"] == "jit(f)/neg"


# cuBLAS GEMMs, each returning a 4 MB workspace beside its [8, 16] result: one called directly,
# one in XLA 0.11's dynamic-slice fusion, which writes its result into row 1 of a [4, 8, 16]
# buffer in place and passes the workspace out; and a cuDNN call with an empty workspace.
LIBRARY_HLO = """
%dsf (a: bf16[8,32], b: bf16[32,16], buf: bf16[4,8,16], i: s32[]) -> (bf16[4,8,16], s8[4194304]) {
  %a = bf16[8,32]{1,0} parameter(0)
  %b = bf16[32,16]{1,0} parameter(1)
  %buf = bf16[4,8,16]{2,1,0} parameter(2)
  %i = s32[] parameter(3)
  %g = (bf16[8,16]{1,0}, s8[4194304]{0}) custom-call(%a, %b), custom_call_target="__cublas$lt$matmul", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"]}}}
  %r = bf16[8,16]{1,0} get-tuple-element(%g), index=0
  %x = bf16[1,8,16]{2,1,0} bitcast(%r)
  %z = s32[] constant(0)
  %d = bf16[4,8,16]{2,1,0} dynamic-update-slice(%buf, %x, %i, %z, %z)
  %w = s8[4194304]{0} get-tuple-element(%g), index=1
  ROOT %t = (bf16[4,8,16]{2,1,0}, s8[4194304]{0}) tuple(%d, %w)
}
ENTRY %main (a: bf16[8,32], b: bf16[32,16], buf: bf16[4,8,16], i: s32[]) -> bf16[8,16] {
  %a = bf16[8,32]{1,0} parameter(0)
  %b = bf16[32,16]{1,0} parameter(1)
  %buf = bf16[4,8,16]{2,1,0} parameter(2)
  %i = s32[] parameter(3)
  %g = (bf16[8,16]{1,0}, s8[4194304]{0}) custom-call(%a, %b), custom_call_target="__cublas$lt$matmul", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"]}}}
  %f = (bf16[4,8,16]{2,1,0}, s8[4194304]{0}) fusion(%a, %b, %buf, %i), kind=kCustom, calls=%dsf
  %q = bf16[2,4,8,16]{3,2,1,0} parameter(4)
  %att = (bf16[2,4,8,16]{3,2,1,0}, f32[2,4,8]{2,1,0}, u8[0]{0}) custom-call(%q, %q, %q), custom_call_target="__cudnn$fmhaSoftmax"
}
"""


def test_library_workspaces_are_not_traffic():
  """A cuBLAS call reads its operands and writes its result, not its 4 MB workspace, called
  directly or from a dynamic-slice fusion (which writes its result in place, one row of the
  buffer it updates); a cuDNN call writes its outputs."""
  gemm = 8 * 32 * 2 + 32 * 16 * 2 + 8 * 16 * 2
  attention = 3 * 2 * 4 * 8 * 16 * 2 + 2 * 4 * 8 * 16 * 2 + 2 * 4 * 8 * 4
  index = 4   # the fusion's row index, an s32
  assert hlo_analysis.memory_traffic(LIBRARY_HLO) == {"bytes": 2 * gemm + index + attention,
                                                       "kernels": 3}
  assert hlo_analysis.matmul_flops(LIBRARY_HLO)["gemm"] == 2 * 2 * 8 * 16 * 32


def _decoder(**overrides):
  return tiny_config(arch="decoder_only", d_model=64, num_heads=4, head_dim=16, d_ff=128,
                     vocab_size=256, num_decoder_layers=3, remat_policy="none", **overrides)


def _program_flops(cfg, batch, inputs, targets, microbatches=1, target="", num_devices=1,
                   train_cfg=None):
  cand = autoparallel.Candidate(1, num_devices, 1, "fsdp", cfg.remat_policy, microbatches)
  opt = optimizers.OptimizerConfig("adamw")
  if target:
    compiled, _ = autoparallel._compile_for_target(  # pylint: disable=protected-access
        target, cfg, cand, batch, inputs, targets, num_devices, opt, None, train_cfg)
  else:
    compiled, _ = autoparallel._compile(  # pylint: disable=protected-access
        cfg, cand, batch, inputs, targets, jax.devices()[:num_devices], opt)
  return hlo_analysis.matmul_flops(compiled.as_text())


@pytest.mark.parametrize("arch", ["decoder_only", "encoder_decoder"])
def test_cpu_train_step_matmul_flops_are_the_model_flops(arch):
  """Without rematerialization a train step's matmuls are 3x the forward's, the formula's
  convention: the count from the compiled program agrees to 0.1%, scanned (loop bodies counted
  per layer) or unrolled, and with the batch split into 2 accumulated microbatches."""
  cfg = _decoder() if arch == "decoder_only" else tiny_config(
      d_model=64, num_heads=4, head_dim=16, d_ff=128, vocab_size=256, num_encoder_layers=3,
      num_decoder_layers=2, remat_policy="none")
  batch, inputs, targets = 4, 32, 16
  model = benchmark_step.model_flops_per_step(cfg, batch, inputs, targets)
  scanned = _program_flops(cfg, batch, inputs, targets)
  assert scanned["total"] == pytest.approx(model, rel=1e-3), (scanned, model)
  unrolled = _program_flops(dataclasses.replace(cfg, scan_layers=False), batch, inputs, targets)
  assert unrolled["total"] == pytest.approx(scanned["total"], rel=1e-6)
  # (T5's position-bias matmul does not shrink with the microbatch: 0.015% more.)
  accumulated = _program_flops(cfg, batch, inputs, targets, microbatches=2)
  assert accumulated["total"] == pytest.approx(scanned["total"], rel=1e-3)
  # Full rematerialization runs each layer's forward again in the backward pass.
  remat = _program_flops(dataclasses.replace(cfg, remat_policy="full"), batch, inputs, targets)
  assert 1.1 * model < remat["total"] < 4 / 3 * model * 1.001


@pytest.mark.skipif(not cpu_attention.available(), reason="no CPU attention kernel here")
def test_cpu_kernel_attention_flops_are_counted():
  """With attention in t5lite's CPU kernel (custom calls, no dots), the program's FLOPs are the
  model FLOPs plus what the kernel's backward recomputes (QK^T: one attention matmul)."""
  cfg = _decoder(attention_impl="cpu_kernel", scan_layers=False)
  batch, inputs, targets = 4, 32, 16
  length = inputs + targets
  flops = _program_flops(cfg, batch, inputs, targets)
  one_matmul = cfg.num_decoder_layers * 2 * batch * cfg.num_heads * length ** 2 * cfg.head_dim
  assert flops["attention"] == pytest.approx(7 * one_matmul, rel=1e-9), flops
  model = benchmark_step.model_flops_per_step(cfg, batch, inputs, targets)
  assert flops["total"] == pytest.approx(model + one_matmul, rel=1e-3), (flops, model)


def _gpu_run_options():
  """runs/gpu.gin's XLA options (TrainConfig.compiler_options)."""
  return dict(gin_setup.parse_gin(["models/decoder/1b.gin", "runs/gpu.gin"],
                                  ["experiment.model_dir = '/tmp/unused'"]).train.compiler_options)


def _h100_flops(gemms: str, options):
  """(program FLOPs, model FLOPs plus what cuDNN's backward recomputes, attention's forward
  FLOPs), per GPU, of the tiny decoder's step compiled for 8 H100s under FSDP with cuDNN flash
  attention, GEMMs as Triton fusions or cuBLAS calls, and XLA `options`."""
  from t5lite import trainer  # pylint: disable=import-outside-toplevel
  cfg = _decoder(dtype="bfloat16", attention_impl="cudnn")
  batch, length = 16, 128
  model = benchmark_step.model_flops_per_step(cfg, batch, 0, length)
  attention_forward = batch * cfg.num_decoder_layers * 4 * length * length * (
      cfg.num_heads * cfg.head_dim)
  train_cfg = trainer.TrainConfig(compiler_options=dict(
      options, xla_gpu_enable_triton_gemm=gemms == "triton"))
  flops = _program_flops(cfg, batch, 0, length, target="h100", num_devices=8,
                         train_cfg=train_cfg)
  return flops, (model + attention_forward / 2) / 8, attention_forward / 8


@pytest.mark.skipif(not gpu_aot.plugin_available(), reason="JAX's CUDA plugin is not installed")
@pytest.mark.parametrize("gemms", ["triton", "cublas"])
def test_h100_program_flops_count_cudnn_attention_and_its_sharding(gemms):
  """The same step compiled for 8 H100s under FSDP, cuDNN flash attention, with runs/gpu.gin's
  XLA options: each GPU does an eighth of the model FLOPs, plus what flash attention's backward
  recomputes (the scores: a fifth matmul beside the four of the formula's backward). Without
  autotuning XLA puts every GEMM in a Triton fusion (dots); with Triton GEMMs off they are
  cuBLAS calls, as autotuning on a GPU may make some."""
  flops, expected, attention_forward = _h100_flops(gemms, _gpu_run_options())
  assert flops["gemm" if gemms == "cublas" else "dot"] > 0, flops
  assert flops["dot" if gemms == "cublas" else "gemm"] == 0, flops
  assert flops["total"] == pytest.approx(expected, rel=1e-3), flops
  assert flops["attention"] == pytest.approx(3.5 * attention_forward, rel=1e-6), flops


@pytest.mark.skipif(not gpu_aot.plugin_available(), reason="JAX's CUDA plugin is not installed")
def test_gpu_run_config_stops_xla_running_a_cublas_gemm_twice():
  """jax 0.11's XLA (not 0.10's) fuses a cuBLAS GEMM whose result the scanned layer also saves
  for the backward pass into a dynamic-slice fusion that writes the saved copy by running the
  GEMM again: the MLP's input GEMM, 1/12 more FLOPs at the tiny preset (15% at the 1b preset).
  runs/gpu.gin turns that fusion off; the step is then the formula's on either JAX (the
  cuBLAS case of the test above compiles it so)."""
  options = _gpu_run_options()
  assert options.get("xla_gpu_enable_dynamic_slice_fusion") is False, options
  default, expected, _ = _h100_flops("cublas", {})
  if tuple(int(x) for x in jax.__version__.split(".")[:2]) == (0, 11):
    assert default["total"] == pytest.approx(13 / 12 * expected, rel=1e-3), default
  else:
    assert default["total"] >= expected * (1 - 1e-3), default


@pytest.mark.skipif(not gpu_aot.plugin_available(), reason="JAX's CUDA plugin is not installed")
@pytest.mark.parametrize("batch,most", [(1, 1.1), (32, 1.4)])
def test_h100_decode_step_reads_its_weights_and_cache_once(batch, most):
  """The 1b preset's greedy decoding at the decoding issue's batch sizes compiled for an H100:
  a token step moves the bfloat16 weights (cast once, before the loop, not per token) and the
  KV cache, and little else (at batch 32 the attention scores and split-K partial sums add a
  quarter), and writes the cache in place (a copy per token would double the cache's share).
  One row decodes as two (`decoding.doubles_single_rows`): as one, XLA writes out and reads
  back the products of the MLP's and the attention output's weights, 1.19x the traffic."""
  args = argparse.Namespace(inputs=512, decode_tokens=128)
  cfg = gin_setup.parse_gin(["models/decoder/1b.gin", "runs/gpu.gin"],
                            ["experiment.model_dir = '/tmp/unused'"]).model
  compiled, _ = benchmark_aot.compile_decode_abstract(cfg, args, batch, "h100")
  text = compiled.as_text()
  (loop,) = hlo_analysis.Program(text).unknown_loops
  step = hlo_analysis.memory_traffic(text, loop)
  d, f, layers = cfg.d_model, cfg.d_ff, cfg.num_decoder_layers
  q, kv = cfg.num_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
  weights = 2 * (layers * (2 * d * q + 2 * d * kv + 3 * d * f) + d * cfg.vocab_size)
  cache = 2 * 2 * layers * max(batch, 2) * kv * (1 + 512 + 128)
  assert weights + cache < step["bytes"] < most * (weights + cache), (step, weights, cache)
  assert step["kernels"] < 20 * layers, step
