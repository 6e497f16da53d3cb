"""Pipeline parallelism: Alpa's stage construction and a GPipe schedule under `shard_map`.

`stage_boundaries` splits a layer sequence into contiguous stages with Alpa's dynamic program
(minimize the slowest stage, which bounds a pipeline's steady-state throughput).
`pipelined_stack` is the one GPipe schedule, on the mesh's `stage` axis: every device holds its
stage's layers, microbatches enter stage 0 one per tick, activations move to the next stage with
`ppermute`, and after `microbatches + stages - 1` ticks the last stage holds every output. The
backward pass is the autodiff of that loop (the reverse schedule). `LayerStack` calls it for
evenly split stacks; `gpipe` runs uneven Alpa stages (padded with inactive layers) through it.
"""

from typing import Callable, List, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P


def stage_boundaries(layer_costs: Sequence[float], num_stages: int) -> List[Tuple[int, int]]:
  """Contiguous [start, end) layer ranges, one per stage, minimizing the largest stage cost."""
  n = len(layer_costs)
  if not 1 <= num_stages <= n:
    raise ValueError(f"cannot split {n} layers into {num_stages} stages")
  prefix = np.concatenate([[0.0], np.cumsum(layer_costs)])
  inf = float("inf")
  # best[s][i]: the smallest max-stage cost splitting layers [0, i) into s stages.
  best = np.full((num_stages + 1, n + 1), inf)
  split = np.zeros((num_stages + 1, n + 1), int)
  best[0][0] = 0.0
  for s in range(1, num_stages + 1):
    for i in range(s, n + 1):
      for j in range(s - 1, i):
        cost = max(best[s - 1][j], prefix[i] - prefix[j])
        if cost < best[s][i]:
          best[s][i], split[s][i] = cost, j
  bounds, i = [], n
  for s in range(num_stages, 0, -1):
    j = split[s][i]
    bounds.append((int(j), int(i)))
    i = j
  return bounds[::-1]


def stack_stages(layer_params, bounds: Sequence[Tuple[int, int]]):
  """[layers, ...] parameters -> ([stages, max_layers, ...] padded, active [stages, max_layers])."""
  width = max(e - s for s, e in bounds)

  def pad(x):
    parts = []
    for s, e in bounds:
      block = x[s:e]
      padding = jnp.zeros((width - (e - s),) + x.shape[1:], x.dtype)
      parts.append(jnp.concatenate([block, padding]))
    return jnp.stack(parts)

  active = np.zeros((len(bounds), width), bool)
  for k, (s, e) in enumerate(bounds):
    active[k, : e - s] = True
  return jax.tree.map(pad, layer_params), jnp.asarray(active)


def gpipe(layer_fn: Callable, stage_params, active, x, mesh: Mesh, num_microbatches: int,
          axis: str = "stage"):
  """Applies every stage's layers to x with a GPipe schedule (that of `pipelined_stack`).

  Args:
    layer_fn: (one layer's params, activations [mb, ...]) -> activations.
    stage_params: pytree of [stages, max_layers, ...] (see stack_stages).
    active: bool [stages, max_layers]; padding layers pass activations through.
    x: [batch, ...]; the batch splits into `num_microbatches`.
    mesh: a mesh with a `stage` axis of size stages.
  Returns:
    [batch, ...], equal to running all layers in order.
  """
  flat = lambda a: a.reshape((-1,) + a.shape[2:])  # stage-major: each stage's block contiguous

  def make_step(kwargs):
    del kwargs

    def step(h, layer):
      p, a = layer
      return jnp.where(a, layer_fn(p, h), h), jnp.zeros((), jnp.float32)

    return step

  out, _ = pipelined_stack(make_step, x, (jax.tree.map(flat, stage_params), flat(active)), {},
                           mesh, num_microbatches, axis)
  return out


def pipelined_stack(make_step: Callable, x, layer_xs, kwargs, mesh: Mesh,
                    num_microbatches: int, axis: str = "stage"):
  """Runs a layer stack as a GPipe pipeline over `axis`; what `LayerStack` calls under a mesh
  with stages.

  Args:
    make_step: kwargs -> scan body (carry, one layer's xs) -> (carry, aux loss); kwargs are one
      microbatch's slice of `kwargs`.
    x: [batch, ...] stack input.
    layer_xs: pytree of [layers, ...] (layer parameters and rngs), sharded over `axis` so every
      stage holds layers / stages consecutive layers.
    kwargs: per-call inputs of every layer (mask, bias, positions, encoder output); arrays with a
      leading batch dimension travel with their microbatch, other arrays are shared.
  Returns:
    (output [batch, ...], aux loss summed over layers, averaged over microbatches).
  Only the stage axis is manual inside: data, fsdp and tensor sharding stay automatic.
  """
  stages = mesh.shape[axis]
  m = num_microbatches
  batch = x.shape[0]
  num_layers = jax.tree.leaves(layer_xs)[0].shape[0]
  if num_layers % stages:
    raise ValueError(f"{num_layers} layers do not split into {stages} pipeline stages")
  if batch % m:
    raise ValueError(f"batch {batch} does not split into {m} pipeline microbatches")

  leaves, treedef = jax.tree.flatten(kwargs)
  kinds = []  # "micro", "shared" or "static" per leaf
  for leaf in leaves:
    if not hasattr(leaf, "shape"):
      kinds.append("static")
    elif leaf.ndim and leaf.shape[0] == batch:
      kinds.append("micro")
    else:
      kinds.append("shared")
  micro = [l.reshape((m, batch // m) + l.shape[1:]) for l, k in zip(leaves, kinds)
           if k == "micro"]
  shared = [l for l, k in zip(leaves, kinds) if k == "shared"]
  # The schedule's buffers are float32: with bfloat16 ones XLA:CPU's compiler aborts
  # ("Invalid binary instruction opcode copy"). Layers still compute in x's dtype.
  dtype = x.dtype
  xs = x.astype(jnp.float32).reshape((m, batch // m) + x.shape[1:])
  perm = [(i, (i + 1) % stages) for i in range(stages)]

  def rebuild(micro_vals, shared_vals):
    it_m, it_s = iter(micro_vals), iter(shared_vals)
    out = [next(it_m) if k == "micro" else next(it_s) if k == "shared" else leaf
           for leaf, k in zip(leaves, kinds)]
    return jax.tree.unflatten(treedef, out)

  def per_stage(local_xs, xs, micro, shared):
    stage = jax.lax.axis_index(axis)

    def tick(t, carry):
      held, outputs, aux_total = carry
      index = jnp.clip(t - stage, 0, m - 1)
      valid = (t - stage >= 0) & (t - stage < m)
      feed = jnp.where(stage == 0, xs[jnp.minimum(t, m - 1)], held)
      kw = rebuild([v[index] for v in micro], shared)
      out, aux = jax.lax.scan(make_step(kw), feed.astype(dtype), local_xs)
      out = out.astype(jnp.float32)
      aux_total = aux_total + jnp.where(valid, jnp.sum(aux), 0.0)
      done = t - (stages - 1)
      write = (stage == stages - 1) & (done >= 0)
      outputs = jnp.where(write, outputs.at[jnp.clip(done, 0, m - 1)].set(out), outputs)
      return jax.lax.ppermute(out, axis, perm), outputs, aux_total

    held = jax.lax.pcast(jnp.zeros_like(xs[0]), axis, to="varying")
    outputs = jax.lax.pcast(jnp.zeros_like(xs), axis, to="varying")
    aux0 = jax.lax.pcast(jnp.zeros((), jnp.float32), axis, to="varying")
    _, outputs, aux_total = jax.lax.fori_loop(0, m + stages - 1, tick, (held, outputs, aux0))
    outputs = jax.lax.psum(jnp.where(stage == stages - 1, outputs, jnp.zeros_like(outputs)),
                           axis)
    return outputs, jax.lax.psum(aux_total, axis) / m

  run = jax.shard_map(per_stage, mesh=mesh, in_specs=(P(axis), P(), P(), P()),
                      out_specs=(P(), P()), axis_names={axis})
  out, aux = run(layer_xs, xs, micro, shared)
  return out.reshape(x.shape).astype(dtype), aux
