"""Reading compiled programs (t5lite/hlo_analysis.py): how often each computation runs, the
collectives, and matmul FLOPs, which must add up to the model FLOPs formula of
scripts/benchmark.py for real train steps, XLA:CPU's and (with JAX's CUDA plugin) an H100's."""

import dataclasses
import os
import sys

import jax
import pytest

from conftest import REPO, tiny_config
from t5lite import autoparallel, gpu_aot, hlo_analysis, optimizers

sys.path.insert(0, os.path.join(REPO, "scripts"))
import benchmark  # pylint: disable=wrong-import-position

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
  stats = hlo_analysis.collectives(HLO, 8)
  assert stats["all-reduce"]["count"] == 6
  assert stats["all-reduce"]["bytes"] == pytest.approx(6 * 2 * 3 / 4 * 256 * 4)
  # The async all-gather counts once, with its result (4 x 128 bf16), over groups of 4.
  assert stats["all-gather"]["count"] == 1
  assert stats["all-gather"]["bytes"] == pytest.approx(3 / 4 * 4 * 128 * 2)


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
  model = benchmark.model_flops_per_step(cfg, batch, inputs, targets)
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


@pytest.mark.skipif(not gpu_aot.plugin_available(), reason="JAX's CUDA plugin is not installed")
@pytest.mark.parametrize("gemms", ["triton", "cublas"])
def test_h100_program_flops_count_cudnn_attention_and_its_sharding(gemms):
  """The same step compiled for 8 H100s under FSDP, cuDNN flash attention: each GPU does an
  eighth of the model FLOPs, plus what flash attention's backward recomputes (the scores: a
  fifth matmul beside the four of the formula's backward). Without autotuning XLA puts every
  GEMM in a Triton fusion (dots); with Triton GEMMs off they are cuBLAS calls."""
  from t5lite import trainer  # pylint: disable=import-outside-toplevel
  cfg = _decoder(dtype="bfloat16", attention_impl="cudnn")
  batch, length = 16, 128
  model = benchmark.model_flops_per_step(cfg, batch, 0, length)
  attention_forward = batch * cfg.num_decoder_layers * 4 * length * length * (
      cfg.num_heads * cfg.head_dim)
  train_cfg = trainer.TrainConfig(compiler_options={
      "xla_gpu_enable_triton_gemm": gemms == "triton"})
  flops = _program_flops(cfg, batch, 0, length, target="h100", num_devices=8,
                         train_cfg=train_cfg)
  assert flops["gemm" if gemms == "cublas" else "dot"] > 0, flops
  assert flops["dot" if gemms == "cublas" else "gemm"] == 0, flops
  assert flops["total"] == pytest.approx((model + attention_forward / 2) / 8, rel=1e-3), flops
  assert flops["attention"] == pytest.approx(3.5 * attention_forward / 8, rel=1e-6), flops
