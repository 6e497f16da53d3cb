"""Runs with 8 fake CPU devices: loss and gradients of models whose layer stacks run as a GPipe
pipeline over the mesh's `stage` axis (combined with data / tensor sharding) equal a single
device's. Prints one JSON object."""

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
from t5lite import partitioning  # noqa: E402
from t5lite.models.model import Model  # noqa: E402

MESHES = {"stage2_data4": partitioning.MeshConfig(4, 1, 1, "data_parallel", stage=2),
          "stage4_data2": partitioning.MeshConfig(2, 1, 1, "data_parallel", stage=4,
                                                  pipeline_microbatches=4),
          "stage2_tensor2_data2": partitioning.MeshConfig(2, 1, 2, "tensor_parallel", stage=2)}


def main(arch):
  cfg = tiny_config(arch=arch, d_model=64, num_heads=8, head_dim=8, d_ff=128, vocab_size=256,
                    num_decoder_layers=4, num_encoder_layers=4 if arch == "encoder_decoder" else 0)
  model = Model(cfg)
  batch = random_batch(cfg, batch=8, in_len=16, out_len=8)
  loss_grad = lambda p, b: jax.value_and_grad(lambda q: model.loss(q, b)[0])(p)
  one = jax.devices()[0]
  params = jax.device_put(model.init(jax.random.key(0)), one)
  ref_loss, ref_grad = jax.jit(loss_grad)(params, jax.device_put(batch, one))
  out = {}
  for name, mesh_cfg in MESHES.items():
    mesh = partitioning.make_mesh(mesh_cfg)
    shardings = partitioning.param_shardings(model.annotated_params, mesh, mesh_cfg.rules)
    sharded = jax.jit(model.init, out_shardings=shardings)(jax.random.key(0))
    stacked = [x for x in jax.tree.leaves(sharded) if x.ndim >= 2 and x.shape[0] == 4]
    layers_per_device = stacked[0].addressable_shards[0].data.shape[0]
    batch_sh = partitioning.batch_sharding(mesh)
    gbatch = jax.device_put(batch, batch_sh)
    with jax.set_mesh(mesh), partitioning.activation_rules(mesh, mesh_cfg.rules,
                                                           mesh_cfg.pipeline_microbatches):
      fn = jax.jit(loss_grad, in_shardings=(shardings, batch_sh), out_shardings=(None, shardings))
      compiled = fn.lower(sharded, gbatch).compile()
      loss, grad = compiled(sharded, gbatch)
    grad_err = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                   for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)))
    out[name] = {"loss": float(loss), "ref_loss": float(ref_loss), "max_grad_err": grad_err,
                 "layers_per_device": int(layers_per_device),
                 "collective_permutes": compiled.as_text().count("collective-permute")}
  print(json.dumps(out))


if __name__ == "__main__":
  main(sys.argv[1])
