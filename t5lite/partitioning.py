"""Device mesh and the one place that maps logical axis names to mesh axes.

Models annotate parameters with logical names (`embed`, `mlp`, `heads`, ...); a rule preset maps
each name to mesh axes (`data`, `fsdp`, `tensor`), and every preset maps the stacked `layers` axis
to `stage` (pipeline parallelism: each stage holds a contiguous block of layers). Parameters are created directly sharded by
jitting the initializer with these shardings, and optimizer state is sharded like its parameters.
"""

import contextlib
import contextvars
import dataclasses
import math
from typing import Dict, Optional, Sequence, Tuple

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("stage", "data", "fsdp", "tensor")
STAGE_RULE = ("layers", "stage")

# Logical name -> mesh axes, as short data. Unlisted names are replicated.
RULE_PRESETS: Dict[str, Tuple[Tuple[str, object], ...]] = {
    "data_parallel": (("batch", ("data", "fsdp")),),
    "fsdp": (("batch", ("data", "fsdp")), ("embed", "fsdp")),
    "tensor_parallel": (("batch", ("data", "fsdp")), ("heads", "tensor"), ("mlp", "tensor"),
                        ("vocab", "tensor"), ("experts", "tensor")),
    "fsdp_tensor": (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("heads", "tensor"),
                    ("mlp", "tensor"), ("vocab", "tensor"), ("experts", "tensor")),
    # MoE: each `tensor` group holds 1/tensor of the experts; dense weights are replicated and
    # tokens reach their experts through the collectives XLA inserts around the dispatch.
    "expert_parallel": (("batch", ("data", "fsdp")), ("experts", "tensor")),
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh shape over (stage, data, fsdp, tensor); -1 takes the devices left over (at most one).

  Attributes:
    data / fsdp / tensor: axis sizes.
    rules: a RULE_PRESETS name, or "auto" (t5lite.train plans first).
    stage: pipeline stages; each holds num_layers / stage consecutive layers of every stack.
    pipeline_microbatches: GPipe microbatches per batch when stage > 1 (0: 2 * stage).
  """
  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  rules: str = "data_parallel"
  stage: int = 1
  pipeline_microbatches: int = 0


def mesh_shape(cfg: MeshConfig, num_devices: int) -> Tuple[int, ...]:
  """Resolves -1 and checks that the axes multiply to the device count."""
  dims = [cfg.stage, cfg.data, cfg.fsdp, cfg.tensor]
  if dims.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dims}")
  known = math.prod(d for d in dims if d != -1)
  if -1 in dims:
    if num_devices % known:
      raise ValueError(f"{num_devices} devices do not divide by the fixed mesh axes {dims}")
    dims[dims.index(-1)] = num_devices // known
  if math.prod(dims) != num_devices:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, dims))} needs {math.prod(dims)} devices, "
                     f"have {num_devices}")
  return tuple(dims)


def make_mesh(cfg: MeshConfig = MeshConfig(), devices: Optional[Sequence] = None) -> Mesh:
  """A Mesh over `devices` (default: all devices of all processes)."""
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(cfg, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def _mesh_axes(entry) -> Tuple[str, ...]:
  """A rule's target or a PartitionSpec entry (None, one mesh axis, or several) as a tuple."""
  return (entry,) if isinstance(entry, str) else tuple(entry or ())


def logical_to_spec(axes: Sequence[Optional[str]], rules) -> P:
  """PartitionSpec for logical `axes` under `rules`; a mesh axis is used at most once."""
  table = dict(rules)
  used, spec = set(), []
  for name in axes:
    targets = tuple(t for t in _mesh_axes(table.get(name)) if t not in used)
    used.update(targets)
    spec.append(targets[0] if len(targets) == 1 else (targets or None))
  return P(*spec)


def _resolve_rules(rules):
  if isinstance(rules, str):
    if rules not in RULE_PRESETS:
      raise ValueError(f"unknown rule preset {rules!r}; choose from {sorted(RULE_PRESETS)}")
    rules = RULE_PRESETS[rules]
  rules = tuple(rules)
  return rules if any(name == "layers" for name, _ in rules) else rules + (STAGE_RULE,)


def param_specs(annotated_params, rules):
  """PartitionSpecs (a nested dict) for a parameter state whose Variables carry `logical_axes`.

  Parameters of layer stacks have one more dimension than their annotation: the leading
  `layers` axis, which the `stage` mesh axis shards.
  """
  rules = _resolve_rules(rules)
  return _map_variables(annotated_params, lambda var: logical_to_spec(_axes(var), rules))


def _axes(var):
  axes = tuple(getattr(var, "logical_axes", None) or ())
  extra = len(var.shape) - len(axes)
  return ("layers",) * min(extra, 1) + (None,) * max(extra - 1, 0) + axes


def _map_variables(tree, fn):
  """Maps fn over the Variables of an nnx.State (or nested mapping) into a plain nested dict."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  if isinstance(tree, nnx.Variable):
    return fn(tree)
  return {k: _map_variables(v, fn) for k, v in tree.items()}


def _fits(spec: P, shape, mesh: Mesh) -> P:
  """Drops sharding on dimensions the mesh axes do not divide (tiny test models)."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = _mesh_axes(axes)
    size = math.prod(mesh.shape[n] for n in names)
    out.append(axes if names and dim % size == 0 else None)
  return P(*out)


def param_shardings(annotated_params, mesh: Mesh, rules):
  """NamedShardings (a nested dict like the params) for annotated parameters on `mesh`."""
  rules = _resolve_rules(rules)

  def to_sharding(var):
    spec = logical_to_spec(_axes(var), rules)
    return NamedSharding(mesh, _fits(spec, var.shape, mesh))

  return _map_variables(annotated_params, to_sharding)


def optimizer_shardings(optimizer: optax.GradientTransformation, abstract_params,
                        shardings, mesh: Mesh):
  """Shardings of the optimizer state: moments like their parameters, everything else
  (counts, Adafactor's factored row/column statistics) replicated."""
  abstract_state = jax.eval_shape(optimizer.init, abstract_params)
  replicated = NamedSharding(mesh, P())
  like_params = optax.tree_map_params(optimizer, lambda _, sharding: sharding, abstract_state,
                                      shardings, transform_non_params=lambda _: replicated)

  def check(leaf, sharding):
    spec = sharding.spec
    if len(spec) > len(leaf.shape):
      return replicated
    return NamedSharding(mesh, _fits(spec, leaf.shape, mesh))

  return jax.tree.map(check, abstract_state, like_params)


_ACTIVE_RULES = contextvars.ContextVar("t5lite_active_rules", default=None)


_PIPELINE = contextvars.ContextVar("t5lite_pipeline", default=None)


def resolve_pipeline_microbatches(stages: int, configured: int = 0) -> int:
  """GPipe microbatches per batch: the configured count, else 2 x stages."""
  return configured or 2 * stages


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules, pipeline_microbatches: int = 0):
  """While active, `constrain` pins activations to the mesh by their logical axes, and layer
  stacks run as a GPipe pipeline over the mesh's `stage` axis when it is larger than 1."""
  token = _ACTIVE_RULES.set((mesh, _resolve_rules(rules)))
  stages = dict(mesh.shape).get("stage", 1)
  pipe = _PIPELINE.set((mesh, resolve_pipeline_microbatches(stages, pipeline_microbatches))
                       if stages > 1 else None)
  try:
    yield
  finally:
    _ACTIVE_RULES.reset(token)
    _PIPELINE.reset(pipe)


@contextlib.contextmanager
def no_activation_rules():
  """Suspends activation constraints and pipelining (inside a pipeline stage's body)."""
  token, pipe = _ACTIVE_RULES.set(None), _PIPELINE.set(None)
  try:
    yield
  finally:
    _ACTIVE_RULES.reset(token)
    _PIPELINE.reset(pipe)


def rules_active() -> bool:
  """Whether `activation_rules` is active (and so `constrain` and `per_shard` act)."""
  return _ACTIVE_RULES.get() is not None


def one_device_program() -> bool:
  """Whether the program being traced runs on one device: no mesh set (`jax.set_mesh`; every
  multi-device run in t5lite sets one) or a mesh of one. A custom call, which XLA cannot
  partition, is one device's work only then."""
  mesh = jax.sharding.get_abstract_mesh()
  return mesh.empty or mesh.size == 1


def stage_pipeline():
  """(mesh, microbatches) when layer stacks should run pipelined, else None."""
  return _PIPELINE.get()


def constrain(x, logical_axes: Sequence[Optional[str]]):
  """Sharding constraint from logical names; the identity outside `activation_rules`.

  Models call this at layer boundaries with names like ("batch", "length", "embed") and never
  see a mesh axis.
  """
  active = _ACTIVE_RULES.get()
  if active is None:
    return x
  mesh, rules = active
  spec = _fits(logical_to_spec(logical_axes, rules), x.shape, mesh)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def per_shard(fn, in_axes: Sequence[Sequence[Optional[str]]],
              out_axes: Sequence[Sequence[Optional[str]]]):
  """`fn` run by every device on its block of the operands, under `activation_rules`; `fn`
  itself outside them (or on a one-device mesh).

  For a kernel XLA cannot partition (a custom call: XLA would gather every operand whole onto
  every device and run it there). in_axes / out_axes: the logical axes of each operand / output
  of `fn`, which takes and returns flat tuples of arrays. A name is split over its mesh axes
  only where they divide that dimension in every operand and output that carries it, so the
  blocks agree (the KV head of a block's query heads is in the block); every other dimension is
  whole on every device. Differentiable: the gradient of an operand whole on every device along
  a split name (a bias shared by the batch rows) is summed over the devices.
  """
  active = _ACTIVE_RULES.get()
  if active is None or active[0].size == 1:
    return fn
  mesh, rules = active
  table = dict(rules)

  def splits(shapes, axes_list):
    """Per logical name, whether its mesh axes divide its every dimension."""
    ok = {}
    for shape, axes in zip(shapes, axes_list):
      for dim, name in zip(shape, axes):
        if name is not None:
          size = math.prod(mesh.shape[a] for a in _mesh_axes(table.get(name)))
          ok[name] = ok.get(name, True) and dim % size == 0
    return ok

  def spec(axes, ok):
    return logical_to_spec(tuple(n if n is not None and ok[n] else None for n in axes), rules)

  def run(*operands):
    out_shapes = jax.eval_shape(fn, *operands)
    shapes = [x.shape for x in operands] + [x.shape for x in out_shapes]
    ok = splits(shapes, tuple(in_axes) + tuple(out_axes))
    return jax.shard_map(
        fn, mesh=mesh, in_specs=tuple(spec(a, ok) for a in in_axes),
        out_specs=tuple(spec(a, ok) for a in out_axes), check_vma=False)(*operands)

  return run


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches are split over the data-like axes on their leading dimension."""
  return NamedSharding(mesh, P(("data", "fsdp")))
