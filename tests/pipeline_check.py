"""Subprocess with 4 fake CPU devices: a GPipe pipeline over uneven Alpa stages gives the outputs
and gradients of sequential execution."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from t5lite import pipeline_parallel as pp  # noqa: E402


def layer(p, h):
  return h + jnp.tanh(h @ p["w"] + p["b"])


def main():
  layers, d = 7, 16
  keys = jax.random.split(jax.random.key(0), 3)
  params = {"w": 0.3 * jax.random.normal(keys[0], (layers, d, d)),
            "b": 0.1 * jax.random.normal(keys[1], (layers, d))}
  x = jax.random.normal(keys[2], (8, d))
  costs = [1, 1, 1, 3, 1, 1, 2]
  bounds = pp.stage_boundaries(costs, 4)
  mesh = Mesh(np.asarray(jax.devices()[:4]), ("stage",))

  def sequential(params, x):
    return jax.lax.scan(lambda h, p: (layer(p, h), None), x, params)[0]

  def piped(params, x):
    stacked, active = pp.stack_stages(params, bounds)
    return pp.gpipe(layer, stacked, active, x, mesh, num_microbatches=4)

  loss = lambda f: (lambda p, x: jnp.sum(f(p, x) ** 2))
  ref_out, got_out = sequential(params, x), jax.jit(piped)(params, x)
  ref_g = jax.grad(loss(sequential))(params, x)
  got_g = jax.jit(jax.grad(loss(piped)))(params, x)
  err = lambda a, b: float(max(np.max(np.abs(np.asarray(u) - np.asarray(v)))
                               for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b))))
  print(json.dumps({"bounds": bounds, "out_err": err(ref_out, got_out),
                    "grad_err": err(ref_g, got_g),
                    "grad_scale": float(max(np.max(np.abs(np.asarray(g)))
                                            for g in jax.tree.leaves(ref_g)))}))


if __name__ == "__main__":
  main()
