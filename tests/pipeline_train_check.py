"""Runs with 8 fake CPU devices: loss and gradients of models whose layer stacks run as a GPipe
pipeline over the mesh's `stage` axis (combined with data / tensor sharding) equal a single
device's. Prints one JSON object."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import tiny_config  # noqa: E402
from partitioning_check import check_meshes  # noqa: E402
from t5lite import partitioning  # noqa: E402

MESHES = {"stage2_data4": partitioning.MeshConfig(4, 1, 1, "data_parallel", stage=2),
          "stage4_data2": partitioning.MeshConfig(2, 1, 1, "data_parallel", stage=4,
                                                  pipeline_microbatches=4),
          "stage2_tensor2_data2": partitioning.MeshConfig(2, 1, 2, "tensor_parallel", stage=2)}


def main(arch):
  cfg = tiny_config(arch=arch, d_model=64, num_heads=8, head_dim=8, d_ff=128, vocab_size=256,
                    num_decoder_layers=4, num_encoder_layers=4 if arch == "encoder_decoder" else 0)
  out = {}
  for name, sharded, result in check_meshes(cfg, MESHES):
    stacked = [x for x in jax.tree.leaves(sharded) if x.ndim >= 2 and x.shape[0] == 4]
    out[name] = {k: result[k] for k in ("loss", "ref_loss", "max_grad_err")}
    out[name]["layers_per_device"] = int(stacked[0].addressable_shards[0].data.shape[0])
    out[name]["collective_permutes"] = result["collectives"]["collective-permute"]
  print(json.dumps(out))


if __name__ == "__main__":
  main(sys.argv[1])
