"""Transformer blocks and the stack that runs them: `EncoderBlock`, `DecoderBlock`, `LayerStack`.

A stack creates its layers once with a leading `layers` axis (vmapped init) and runs them with
`jax.lax.scan` (or unrolled when `scan_layers=False`, with the same parameter layout; or as a
GPipe pipeline under a mesh with pipeline stages), each step optionally rematerialized
(`remat.POLICIES`). Inference may hold the layers one by one instead (`LayerStack.unroll`), and
decodes through them with per-layer KV caches (`LayerStack.decode_step`).
"""

import logging

import jax
import jax.numpy as jnp
from flax import nnx

from t5lite import partitioning, pipeline_parallel
from t5lite.models import attention as attn_lib
from t5lite.models import layers, remat
from t5lite.models.config import ModelConfig

log = logging.getLogger(__name__)


class EncoderBlock(nnx.Module):
  """Pre-norm self-attention + feed-forward."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.pre_attention_norm = layers.make_norm(cfg, rngs)
    self.attention = layers.Attention(cfg, rngs=rngs)
    self.pre_mlp_norm = layers.make_norm(cfg, rngs)
    self.mlp = layers.make_mlp(cfg, rngs)

  def __call__(self, x, rng, *, mask, bias, positions):
    """x: [batch, length, embed] -> (x, aux_loss)."""
    r = jax.random.split(rng, 3) if rng is not None else [None] * 3
    h = self.pre_attention_norm(x)
    h = self.attention(h, h, mask, bias, positions, positions)
    x = x + layers.dropout(h, self.cfg.dropout_rate, r[0])
    h, aux = self.mlp(self.pre_mlp_norm(x), r[1])
    return x + layers.dropout(h, self.cfg.dropout_rate, r[2]), aux


class DecoderBlock(nnx.Module):
  """Pre-norm causal self-attention, optional cross-attention, feed-forward."""

  def __init__(self, cfg: ModelConfig, *, cross_attention: bool, rngs: nnx.Rngs):
    self.cfg = cfg
    self.pre_self_attention_norm = layers.make_norm(cfg, rngs)
    self.self_attention = layers.Attention(cfg, rngs=rngs)
    self.has_cross_attention = cross_attention
    if cross_attention:
      self.pre_cross_attention_norm = layers.make_norm(cfg, rngs)
      self.cross_attention = layers.Attention(cfg, rngs=rngs)
    self.pre_mlp_norm = layers.make_norm(cfg, rngs)
    self.mlp = layers.make_mlp(cfg, rngs)

  def __call__(self, x, rng, *, mask, bias, positions, encoded=None, cross_mask=None):
    """x: [batch, length, embed] -> (x, aux_loss)."""
    r = jax.random.split(rng, 4) if rng is not None else [None] * 4
    h = self.pre_self_attention_norm(x)
    h = self.self_attention(h, h, mask, bias, positions, positions)
    x = x + layers.dropout(h, self.cfg.dropout_rate, r[0])
    if self.has_cross_attention:
      h = self.pre_cross_attention_norm(x)
      h = self.cross_attention(h, encoded, cross_mask)
      x = x + layers.dropout(h, self.cfg.dropout_rate, r[1])
    h, aux = self.mlp(self.pre_mlp_norm(x), r[2])
    return x + layers.dropout(h, self.cfg.dropout_rate, r[3]), aux


def _decoder_block_step(block, x, self_cache, cross_kv, index, *, mask, bias, positions,
                        cross_mask=None):
  """One decoder block on new tokens x with its self-attention cache and its cross-attention
  keys/values (or None): returns (x, new self cache)."""
  h = block.pre_self_attention_norm(x)
  h, self_cache = block.self_attention.cached(h, self_cache, index, mask, bias, positions)
  x = x + h
  if block.has_cross_attention:
    h = block.pre_cross_attention_norm(x)
    x = x + block.cross_attention.attend_to(h, cross_kv["k"], cross_kv["v"], cross_mask)
  h, _ = block.mlp(block.pre_mlp_norm(x), None)
  return x + h, self_cache


def _split_layers(state, num_layers: int):
  """The layers' slices of stacked parameters `state`, one tree per layer, from one split of
  each stack: its gradient is one concatenation of the layers' gradients, where indexing each
  layer out of the stack has autodiff pad every layer's gradient to the stack's shape and add
  them up."""
  leaves, treedef = jax.tree.flatten(state)
  pieces = [jnp.split(leaf, num_layers) for leaf in leaves]
  return [treedef.unflatten([jnp.squeeze(p[i], 0) for p in pieces]) for i in range(num_layers)]


class LayerStack(nnx.Module):
  """`num_layers` copies of a block stored with a leading `layers` axis and run by scan."""

  def __init__(self, make_block, num_layers: int, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.num_layers = num_layers
    keys = jax.random.split(rngs.params(), num_layers)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: make_block(nnx.Rngs(0))))
    states = jax.vmap(lambda k: nnx.split(make_block(nnx.Rngs(params=k)))[1])(keys)
    self.blocks = nnx.merge(graphdef, states)
    self.unrolled = False

  def __call__(self, x, rng, **kwargs):
    """Runs every layer on x: [batch, length, embed]; returns (x, summed aux loss).

    Under a mesh with pipeline stages (`partitioning.stage_pipeline`), a stacked (not `unroll`ed)
    stack runs as a GPipe pipeline, each stage holding its own consecutive layers.
    """
    if self.unrolled:   # the blocks share one graph: the first's
      splits = [nnx.split(block) for block in self.blocks]
      graphdef, layer_states = splits[0][0], [state for _, state in splits]
    else:
      graphdef, state = nnx.split(self.blocks)
    rngs = (jax.random.split(rng, self.num_layers) if rng is not None
            else jnp.zeros((self.num_layers,), jnp.uint32))
    use_rng = rng is not None

    def make_step(kw):
      def step(carry, xs):
        layer_state, layer_rng = xs
        block = nnx.merge(graphdef, layer_state)
        y, aux = block(carry, layer_rng if use_rng else None, **kw)
        return partitioning.constrain(y, ("batch", "length", "embed")), aux

      if self.cfg.remat_policy != "none":
        # Under scan the recomputation cannot be CSE'd away; unrolled, it must be prevented.
        step = jax.checkpoint(step, policy=remat.POLICIES[self.cfg.remat_policy],
                              prevent_cse=not self.cfg.scan_layers)
      return step

    if not self.unrolled:   # the stacked form: a pipeline, a scan, or its layers in order
      pipe = partitioning.stage_pipeline()
      if pipe is not None:
        mesh, microbatches = pipe
        if self.cfg.attention_impl == "cudnn":
          log.warning("pipeline stages: attention runs as 'xla', not 'cudnn' (JAX's cuDNN "
                      "attention cannot be partitioned inside pipeline stages)")
        with partitioning.no_activation_rules(), attn_lib.without_cudnn():
          return pipeline_parallel.pipelined_stack(make_step, x, (state, rngs), kwargs, mesh,
                                                   microbatches)
      if self.cfg.scan_layers:
        x, aux = jax.lax.scan(make_step(kwargs), x, (state, rngs))
        return x, jnp.sum(aux)
      layer_states = _split_layers(state, self.num_layers)
    step = make_step(kwargs)
    total = jnp.zeros((), jnp.float32)
    for i, layer_state in enumerate(layer_states):
      x, aux = step(x, (layer_state, rngs[i]))
      total = total + aux
    return x, total

  def unstack(self):
    """The layers as separate blocks: each holds static slices of the stacked parameters, or,
    once `unroll`ed, arrays of its own.

    Decoding takes them once, before its token loop. A step that sliced them itself, or scanned
    the stack, would copy every layer's weights out of the stack for every token (on CPU a fifth
    of the busy time of T5-small's decode step at batch 32; decoder-125m decodes 25-40% faster
    without the copies). Sliced once per call, they are still a copy of every layer's weights
    per call, which `unroll` avoids.
    """
    if self.unrolled:
      return tuple(self.blocks)
    graphdef, state = nnx.split(self.blocks)
    return tuple(nnx.merge(graphdef, layer) for layer in _split_layers(state, self.num_layers))

  def unroll(self):
    """Holds the layers as separate blocks with arrays of their own (copies of their slices of
    the stacks), in place of the stacked block: the form `Model.unroll` gives inference.

    A program that slices a layer out of a stack writes a copy of its weights (XLA gives the
    slice a buffer of its own): a decoding call read from stacked parameters copied every
    layer's weights once, doubling its peak memory (decoder/7b in bf16 on an H100: 10.9 GB of
    temporaries for 11.3 GB of weights). Unrolled, each layer's weights are program inputs.
    Forward passes run the layers in order, as `scan_layers=False` does, and on a mesh with
    pipeline stages not as a pipeline (as decoding's token steps never do). Its parameters are
    the stacks' values: `{"blocks": {0: <layer 0>, 1: ...}}`.
    """
    if not self.unrolled:
      self.blocks = nnx.List(self.unstack())
      self.unrolled = True

  def decode_step(self, x, caches, index, *, blocks=None, **kwargs):
    """Runs every layer on new tokens with the KV caches; returns (x, new caches).

    caches: {"self": a {"k", "v"} per layer, "cross": a {"k", "v"} per layer (encoder-decoder)},
    each [batch, kv_heads, length, head_dim]. Each layer writes its new slots into its own
    cache in place and reads it whole: no layer's slice of a stacked cache is copied per step.
    The layers run unrolled, as `blocks` from `unstack` (taken once outside a decoding loop) or
    sliced here.
    """
    blocks = self.unstack() if blocks is None else blocks
    cross = caches.get("cross") or (None,) * len(blocks)
    new_self = []
    for block, self_cache, cross_kv in zip(blocks, caches["self"], cross):
      x, self_cache = _decoder_block_step(block, x, self_cache, cross_kv, index, **kwargs)
      new_self.append(self_cache)
    return x, dict(caches, self=tuple(new_self))
