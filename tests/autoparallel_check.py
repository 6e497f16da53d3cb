"""Subprocess with 8 fake CPU devices: under a memory budget below data parallelism's peak, the
planner must choose a sharded plan, and that plan must train to the single-device loss."""

import dataclasses
import functools
import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import tiny_config  # noqa: E402
from t5lite import autoparallel, optimizers, partitioning, trainer  # noqa: E402
from t5lite.models.model import Model  # noqa: E402


def main():
  cfg = tiny_config(arch="decoder_only", d_model=128, num_heads=8, num_kv_heads=8, head_dim=16,
                    d_ff=512, vocab_size=512, num_decoder_layers=2)
  batch, inputs, targets = 8, 0, 32
  opt_cfg = optimizers.OptimizerConfig("adamw")
  devices = jax.devices()
  dp = autoparallel.analyze(cfg, autoparallel.Candidate(8, 1, 1, "data_parallel", "none", 1),
                            batch, inputs, targets, devices, autoparallel.Hardware(), opt_cfg)
  hw = autoparallel.Hardware(memory_gb=dp.peak_gb * 0.6)
  ranked = autoparallel.plan(cfg, batch=batch, inputs=inputs, targets=targets, devices=devices,
                             hw=hw, optimizer_cfg=opt_cfg, remats=("none",), microbatches=(1,),
                             rules=("data_parallel", "fsdp"), log=lambda s: None)
  best = ranked[0]
  # Train three steps with the chosen plan and on one device.
  from test_models import random_batch  # pylint: disable=import-outside-toplevel
  feed = random_batch(cfg, batch=batch, in_len=0, out_len=targets)
  model = Model(dataclasses.replace(cfg, remat_policy=best.candidate.remat))
  opt = optimizers.make_optimizer(opt_cfg, 1e-3)
  step = functools.partial(trainer.train_step, model=model, optimizer=opt,
                           schedule=lambda s: 1e-3, seed=0,
                           microbatches=best.candidate.microbatches)
  one = jax.devices()[0]
  state = jax.device_put(trainer.init_state(model, opt, jax.random.key(0)), one)
  ref = []
  for _ in range(3):
    state, m = jax.jit(step)(state, jax.device_put(feed, one))
    ref.append(float(m["loss"]))
  mesh = partitioning.make_mesh(best.candidate.mesh_config())
  param_sh = partitioning.param_shardings(model.annotated_params, mesh, best.candidate.rules)
  init = jax.jit(functools.partial(trainer.init_state, model, opt),
                 out_shardings={"step": None, "params": param_sh, "opt_state": None,
                                "nonfinite_streak": None, "nonfinite_total": None})
  state = init(jax.random.key(0))
  got = []
  with jax.set_mesh(mesh), partitioning.activation_rules(mesh, best.candidate.rules):
    for _ in range(3):
      state, m = jax.jit(step)(state, jax.device_put(feed, partitioning.batch_sharding(mesh)))
      got.append(float(m["loss"]))
  print(json.dumps({"dp_peak_gb": dp.peak_gb, "budget_gb": hw.memory_gb,
                    "chosen": dataclasses.asdict(best.candidate), "chosen_peak_gb": best.peak_gb,
                    "fits": best.fits, "table": autoparallel.table(ranked),
                    "ref_losses": ref, "plan_losses": got}))


if __name__ == "__main__":
  main()
