"""Runs in a subprocess with 8 fake CPU devices (XLA_FLAGS must be set before jax is imported).

For one architecture and every rule preset it compares the sharded loss and gradients with a
single-device run, lists the collectives in the compiled program, and measures per-device
parameter bytes. Prints one JSON object.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import tiny_config  # noqa: E402
from test_models import random_batch  # noqa: E402
from t5lite import hlo_analysis, partitioning  # noqa: E402
from t5lite.models.model import LossConfig, Model  # noqa: E402

PRESETS = {
    "data_parallel": partitioning.MeshConfig(8, 1, 1, "data_parallel"),
    "fsdp": partitioning.MeshConfig(1, 8, 1, "fsdp"),
    "tensor_parallel": partitioning.MeshConfig(2, 1, 4, "tensor_parallel"),
    "fsdp_tensor": partitioning.MeshConfig(1, 4, 2, "fsdp_tensor"),
}


def collectives_per_step(hlo: str):
  """{collective kind: how many run in one call of the compiled program}."""
  return {k: v["count"] for k, v in hlo_analysis.collectives(hlo, 8).items()}


def check_meshes(cfg, meshes, lengths=(16, 8), loss_cfg=LossConfig()):
  """For each named MeshConfig: parameters born sharded, sharded loss and gradients compared
  with one device, and the compiled program's collectives. Yields (name, sharded params,
  result dict). `lengths`: (inputs, targets) of the random batch."""
  model = Model(cfg, loss_cfg)
  batch = random_batch(cfg, batch=8, in_len=lengths[0], out_len=lengths[1])
  loss_grad = lambda p, b: jax.value_and_grad(lambda q: model.loss(q, b)[0])(p)
  one = jax.devices()[0]
  params = jax.device_put(model.init(jax.random.key(0)), one)
  ref_loss, ref_grad = jax.jit(loss_grad)(params, jax.device_put(batch, one))
  full_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  for name, mesh_cfg in meshes.items():
    mesh = partitioning.make_mesh(mesh_cfg)
    shardings = partitioning.param_shardings(model.annotated_params, mesh, mesh_cfg.rules)
    # Initialized directly sharded: the init is jitted with the target shardings.
    sharded = jax.jit(model.init, out_shardings=shardings)(jax.random.key(0))
    batch_sh = partitioning.batch_sharding(mesh)
    gbatch = jax.device_put(batch, batch_sh)
    with jax.set_mesh(mesh), partitioning.activation_rules(mesh, mesh_cfg.rules,
                                                           mesh_cfg.pipeline_microbatches):
      fn = jax.jit(loss_grad, in_shardings=(shardings, batch_sh), out_shardings=(None, shardings))
      compiled = fn.lower(sharded, gbatch).compile()
      loss, grad = compiled(sharded, gbatch)
    hlo = compiled.as_text()
    grad_err = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                   for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)))
    yield name, sharded, {
        "loss": float(loss), "ref_loss": float(ref_loss), "max_grad_err": grad_err,
        "collectives": collectives_per_step(hlo),
        "kernel_calls": hlo.count('custom_call_target="t5lite_cpu_attention_'),
        "param_bytes_per_device": sum(x.addressable_shards[0].data.nbytes
                                      for x in jax.tree.leaves(sharded)),
        "param_bytes_total": full_bytes,
    }


def main(arch):
  presets = dict(PRESETS)
  extra, lengths, loss_cfg = {}, (16, 8), LossConfig()
  # The variants below check one feature under sharding, each against the one preset that
  # shards both the batch and the weights two ways (fsdp_tensor), plus what the feature needs;
  # the plain architectures go through every preset.
  if arch in ("moe", "cpu_levers", "cpu_levers_t5", "head_chunks", "cpu_bf16_levers"):
    presets = {"fsdp_tensor": PRESETS["fsdp_tensor"]}
  if arch == "moe":  # decoder-only with a top-2 MoE feed-forward of 8 experts
    arch, extra = "decoder_only", dict(num_experts=8, experts_per_token=2)
    presets["data_parallel"] = PRESETS["data_parallel"]
    presets["expert_parallel"] = partitioning.MeshConfig(2, 1, 4, "expert_parallel")
  if arch in ("cpu_levers", "cpu_levers_t5"):
    # runs/cpu.gin's levers: the attention kernel (each device runs it on its rows and heads,
    # over three query blocks of the decoder), flat weight gradients; every way of splitting
    # the heads: two and four ways (KV heads too), and eight ways, which four KV heads do not
    # divide (so no head is split).
    presets.update(tensor_parallel=PRESETS["tensor_parallel"],
                   tensor_8=partitioning.MeshConfig(1, 1, 8, "tensor_parallel"))
    lengths = (100, 40)
    if arch == "cpu_levers_t5":  # the relative position bias, shared by the batch rows
      arch, extra = "encoder_decoder", {}
    else:
      arch, extra = "decoder_only", dict(tie_embeddings=True)
    extra.update(head_dim=16, attention_impl="cpu_kernel", flat_weight_grads=True)
  if arch == "cpu_bf16_levers":
    # runs/cpu_bf16.gin's: bf16 with fp32 matmul outputs, the attention kernel on widened
    # operands, an untied [vocab, embed] head; the batch split 8 ways, then batch and weights.
    presets["data_parallel"] = PRESETS["data_parallel"]
    arch, lengths = "decoder_only", (100, 40)
    extra = dict(head_dim=16, attention_impl="cpu_kernel", flat_weight_grads=True,
                 dtype="bfloat16", float32_dot_outputs=True)
  if arch == "head_chunks":  # decoder-only, the head and loss in 5 blocks over 24 positions
    arch, loss_cfg = "decoder_only", LossConfig(head_chunks=5)
  extra = {"head_dim": 8, **extra}
  cfg = tiny_config(arch=arch, d_model=64, num_heads=8, num_kv_heads=4 if arch != "encoder_decoder" else 0,
                    d_ff=128, vocab_size=256, **extra)
  out = {"devices": len(jax.devices()), "presets": {}}
  for name, sharded, result in check_meshes(cfg, presets, lengths, loss_cfg):
    flat = jax.tree_util.tree_flatten_with_path(sharded)[0]
    expert_bytes = [(x.addressable_shards[0].data.nbytes, x.nbytes) for path, x in flat
                    if "mlp" in jax.tree_util.keystr(path) and x.ndim == 4]
    out["presets"][name] = dict(result, expert_bytes_per_device=sum(a for a, _ in expert_bytes),
                                expert_bytes_total=sum(b for _, b in expert_bytes))
  print(json.dumps(out))


if __name__ == "__main__":
  main(sys.argv[1])
