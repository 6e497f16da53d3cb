"""Runs in a subprocess with 8 fake CPU devices (XLA_FLAGS must be set before jax is imported).

Decodes one batch of prompts on one device and again with the parameters sharded under each
rule preset named (and the preset's activation rules), greedy and beam search, and reports
whether the tokens agree, how far the scores are apart, the collectives of the compiled sharded
greedy loop and the parameter bytes each device holds; and greedy decoding from the sharded
parameters unrolled (`Model.unroll`).
Usage: decoding_check.py ARCH PRESET[,PRESET...]. Prints one JSON object.
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
from partitioning_check import PRESETS, collectives_per_step  # noqa: E402
from t5lite import decoding, partitioning  # noqa: E402
from t5lite.models.model import Model  # noqa: E402

MAX_DECODE_LEN = 6


def main(arch: str, presets: str):
  cfg = tiny_config(arch=arch, d_model=64, num_heads=8, head_dim=8,
                    **({} if arch == "encoder_decoder" else {"num_kv_heads": 4}))
  model = Model(cfg)
  prompts = np.random.default_rng(0).integers(3, cfg.vocab_size, (8, 7)).astype(np.int32)
  prompts[1, 3:] = 0  # rows of different lengths
  prompts[5, 5:] = 0
  key = "encoder_input_tokens" if arch == "encoder_decoder" else "prompt_tokens"
  one = jax.devices()[0]
  params = jax.device_put(model.init(jax.random.key(0)), one)
  feed = {key: jax.device_put(prompts, one)}
  methods = {"greedy": dict(method="greedy"), "beam": dict(method="beam", beam_size=3)}
  ref = {m: decoding.decode(model, params, feed, max_decode_len=MAX_DECODE_LEN, **kw)
         for m, kw in methods.items()}

  results = {"arch": arch, "devices": jax.device_count(), "presets": {}}
  for preset in presets.split(","):
    results["presets"][preset] = _sharded(model, cfg, PRESETS[preset], prompts, key, methods, ref)
  print(json.dumps(results))


def _sharded(model, cfg, mesh_cfg, prompts, key, methods, ref):
  """Decodes with parameters sharded under `mesh_cfg`; compares with `ref`."""
  mesh = partitioning.make_mesh(mesh_cfg)
  shardings = partitioning.param_shardings(model.annotated_params, mesh, mesh_cfg.rules)
  sharded = jax.jit(model.init, out_shardings=shardings)(jax.random.key(0))
  gfeed = {key: jax.device_put(prompts, partitioning.batch_sharding(mesh))}
  result = {}
  with jax.set_mesh(mesh), partitioning.activation_rules(mesh, mesh_cfg.rules):
    for m, kw in methods.items():
      out = decoding.decode(model, sharded, gfeed, max_decode_len=MAX_DECODE_LEN, **kw)
      result[m] = {
          "tokens_equal": bool(np.array_equal(np.asarray(out["tokens"]),
                                              np.asarray(ref[m]["tokens"]))),
          "max_score_err": float(np.max(np.abs(np.asarray(out["scores"]) -
                                               np.asarray(ref[m]["scores"])))),
      }
    # The parameters as serving.Session holds them (Model.unroll): still sharded, same tokens.
    unrolled = model.unroll(sharded)
    out = decoding.decode(model, unrolled, gfeed, max_decode_len=MAX_DECODE_LEN)
    result["unrolled"] = {
        "tokens_equal": bool(np.array_equal(np.asarray(out["tokens"]),
                                            np.asarray(ref["greedy"]["tokens"]))),
        "max_score_err": float(np.max(np.abs(np.asarray(out["scores"]) -
                                             np.asarray(ref["greedy"]["scores"])))),
        "param_bytes_per_device": sum(s.data.nbytes for x in jax.tree.leaves(unrolled)
                                      for s in x.addressable_shards[:1])}
    hlo = decoding._sample_loop.lower(
        model, sharded, gfeed, jax.random.key(0), max_decode_len=MAX_DECODE_LEN,
        method="greedy", temperature=1.0, top_k=0, top_p=1.0, eos_id=cfg.eos_id,
    ).compile().as_text()
  result["collectives"] = collectives_per_step(hlo)
  result["param_bytes_per_device"] = sum(
      s.data.nbytes for x in jax.tree.leaves(sharded) for s in x.addressable_shards[:1])
  result["param_bytes_total"] = sum(x.nbytes for x in jax.tree.leaves(sharded))
  return result


if __name__ == "__main__":
  main(*sys.argv[1:3])
