"""Building blocks of the network layer: norms, embeddings, attention, dense and MoE MLPs.

Every parameter carries `logical_axes` metadata (names from the axis vocabulary
`batch, length, embed, heads, kv, mlp, vocab, experts, layers`); `t5lite.partitioning` maps those
names to mesh axes. Parameters are stored in `param_dtype` and cast to the compute dtype at use,
which gives bf16 compute over fp32 master weights.
"""

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from t5lite.models import attention as attn_lib
from t5lite.models import positions as pos_lib
from t5lite.models import projection
from t5lite.models.config import ModelConfig


def param(rngs: nnx.Rngs, shape, axes, stddev: float, dtype=jnp.float32) -> nnx.Param:
  """A normally initialized parameter annotated with logical axis names."""
  value = stddev * jax.random.normal(rngs.params(), shape, dtype)
  return nnx.Param(value, logical_axes=tuple(axes))


def compute_dtype(cfg: ModelConfig):
  """The jnp dtype activations are computed in."""
  return jnp.dtype(cfg.dtype)


def project(cfg: ModelConfig, spec: str, x, kernel, *, out_dtype=None):
  """`einsum(spec, x, kernel)` for a projection in the compute dtype, with the weight-gradient
  form `cfg` asks for; `kernel` as stored (param_dtype). Under float32_dot_outputs the kernel is
  cast inside the projection, so its gradient comes out of the float32 matmul in param_dtype,
  never rounded to bf16 on the way. out_dtype float32: the output as its float32 sums
  (`projection.project`; the output head's logits)."""
  if not cfg.float32_dot_outputs:
    kernel = kernel.astype(compute_dtype(cfg))
  return projection.project(spec, x, kernel, flat_weight_grad=cfg.flat_weight_grads,
                            float32_outputs=cfg.float32_dot_outputs,
                            matvec_kernel=cfg.matvec_kernel, matmul_kernel=cfg.matmul_kernel,
                            out_dtype=out_dtype)


def dropout(x, rate: float, rng):
  """Inverted dropout; identity when `rng` is None or rate is 0."""
  if rng is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class RMSNorm(nnx.Module):
  """Root-mean-square layer norm without mean subtraction or bias (T5 v1.1, LLaMA)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    del rngs
    self.eps = cfg.norm_eps
    self.dtype = compute_dtype(cfg)
    self.scale = nnx.Param(jnp.ones((cfg.d_model,), jnp.dtype(cfg.param_dtype)),
                           logical_axes=("embed",))

  def __call__(self, x):
    """x: [..., embed] -> normalized x in the compute dtype."""
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class LayerNorm(nnx.Module):
  """Layer norm with mean subtraction, scale and bias (GPT-2)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    del rngs
    self.eps = cfg.norm_eps
    self.dtype = compute_dtype(cfg)
    pdt = jnp.dtype(cfg.param_dtype)
    self.scale = nnx.Param(jnp.ones((cfg.d_model,), pdt), logical_axes=("embed",))
    self.bias = nnx.Param(jnp.zeros((cfg.d_model,), pdt), logical_axes=("embed",))

  def __call__(self, x):
    """x: [..., embed] -> normalized x in the compute dtype."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...].astype(jnp.float32)
            + self.bias[...].astype(jnp.float32)).astype(self.dtype)


def make_norm(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
  """RMSNorm or LayerNorm, as `cfg.norm` says."""
  return LayerNorm(cfg, rngs=rngs) if cfg.norm == "layer" else RMSNorm(cfg, rngs=rngs)


def zeros_param(shape, axes, dtype) -> nnx.Param:
  """A zero-initialized parameter (biases) with logical axis names."""
  return nnx.Param(jnp.zeros(shape, dtype), logical_axes=tuple(axes))


def _add_bias(y, module, name: str):
  bias = getattr(module, name, None)
  return y if bias is None else y + bias[...].astype(y.dtype)


class Embed(nnx.Module):
  """Token embedding table, also usable as a tied output head."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.dtype = compute_dtype(cfg)
    # A tied decoder-only head has no T5-style output rescale, so the table starts small enough
    # for unit-scale logits.
    stddev = cfg.d_model ** -0.5 if cfg.tie_embeddings and cfg.arch != "encoder_decoder" else 1.0
    self.embedding = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), stddev,
                           jnp.dtype(cfg.param_dtype))

  def __call__(self, ids):
    """ids: [batch, length] int -> [batch, length, embed]."""
    return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

  def attend(self, x):
    """x: [batch, length, embed] -> float32 logits [batch, length, vocab] against the table
    (the float32 sums of the compute dtype's products, as `_Head`'s)."""
    return project(self.cfg, "bld,vd->blv", x, self.embedding[...], out_dtype=jnp.float32)


class Attention(nnx.Module):
  """Multi-head / grouped-query attention through `jax.nn.dot_product_attention`."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, h, k, dh = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_dim
    pdt = jnp.dtype(cfg.param_dtype)
    # T5 init: the 1/sqrt(head_dim) attention scale is folded into the query init.
    q_std = (d * dh) ** -0.5 if not cfg.scale_attention else d ** -0.5
    self.query = param(rngs, (d, h, dh), ("embed", "heads", "kv"), q_std, pdt)
    self.key = param(rngs, (d, k, dh), ("embed", "heads", "kv"), d ** -0.5, pdt)
    self.value = param(rngs, (d, k, dh), ("embed", "heads", "kv"), d ** -0.5, pdt)
    self.out = param(rngs, (h, dh, d), ("heads", "kv", "embed"), (h * dh) ** -0.5, pdt)
    if cfg.use_bias:
      self.query_bias = zeros_param((h, dh), ("heads", "kv"), pdt)
      self.key_bias = zeros_param((k, dh), ("heads", "kv"), pdt)
      self.value_bias = zeros_param((k, dh), ("heads", "kv"), pdt)
      self.out_bias = zeros_param((d,), ("embed",), pdt)

  def project_q(self, x):
    """x: [batch, length, embed] -> queries [batch, length, heads, head_dim]."""
    return _add_bias(project(self.cfg, "bld,dhk->blhk", x, self.query[...]), self, "query_bias")

  def project_kv(self, x):
    """x: [batch, length, embed] -> (keys, values) each [batch, length, kv_heads, head_dim]."""
    k = _add_bias(project(self.cfg, "bld,dhk->blhk", x, self.key[...]), self, "key_bias")
    v = _add_bias(project(self.cfg, "bld,dhk->blhk", x, self.value[...]), self, "value_bias")
    return k, v

  def project_out(self, y):
    """y: [batch, length, heads, head_dim] -> [batch, length, embed]."""
    return _add_bias(project(self.cfg, "blhk,hkd->bld", y, self.out[...]), self, "out_bias")

  def __call__(self, x, kv_input, mask, bias=None, q_positions=None, k_positions=None):
    """Attends from x to kv_input.

    Args:
      x: [batch, q_len, embed] queries' input.
      kv_input: [batch, k_len, embed] keys' and values' input.
      mask: an attention.Mask (dense boolean, causal, and/or key lengths).
      bias: optional float [1 or batch, heads, q_len, k_len] added to logits (relative / ALiBi).
      q_positions / k_positions: int [batch, len], used for RoPE.

    Returns:
      [batch, q_len, embed].
    """
    cfg = self.cfg
    q = self.project_q(x)
    k, v = self.project_kv(kv_input)
    if cfg.position_encoding == "rope" and q_positions is not None:  # not for cross-attention
      q = pos_lib.apply_rope(q, q_positions, cfg.rope_theta)
      k = pos_lib.apply_rope(k, k_positions, cfg.rope_theta)
    y = attn_lib.attend(q, k, v, mask, bias, scale=self.scale(), implementation=cfg.attention_impl)
    return self.project_out(y)

  def cached(self, x, cache, index, mask, bias=None, positions=None):
    """Incremental self-attention for decoding.

    Writes the keys/values of x into slots index..index+q_len-1 of this layer's cache and attends
    over its slots. x: [batch, q_len, embed]; cache: {"k", "v"} [batch, kv_heads, max_len,
    head_dim] (heads-major: see `attention.attend_cache`), written in place; mask: a Mask over
    [q_len, max_len]; bias: [1 or batch, heads, q_len, max_len]; positions: [batch, q_len].
    Filling a prompt into an empty cache (`index` the constant 0, several tokens), the new keys
    are all there is to see, and x attends to them alone through `attention.attend` (cuDNN flash
    attention on GPUs). Returns (y, new_cache).
    """
    cfg = self.cfg
    dt = compute_dtype(cfg)
    q = self.project_q(x)
    k_new, v_new = self.project_kv(x)
    if cfg.position_encoding == "rope":
      q = pos_lib.apply_rope(q, positions, cfg.rope_theta)
      k_new = pos_lib.apply_rope(k_new, positions, cfg.rope_theta)
    new_cache = {name: write_slots(cache[name], new.transpose(0, 2, 1, 3), index)
                 for name, new in (("k", k_new), ("v", v_new))}
    q_len = x.shape[1]
    if isinstance(index, int) and index == 0 and q_len > 1:
      first = mask._replace(
          dense=None if mask.dense is None else mask.dense[..., :q_len],
          segments=None if mask.segments is None else (mask.segments[0],
                                                       mask.segments[1][:, :q_len]))
      y = attn_lib.attend(q, k_new, v_new, first, None if bias is None else bias[..., :q_len],
                          scale=self.scale(), implementation=cfg.attention_impl)
    else:
      y = attn_lib.attend_cache(q, new_cache["k"].astype(dt), new_cache["v"].astype(dt), mask,
                                bias, scale=self.scale(), implementation=cfg.attention_impl)
    return self.project_out(y), new_cache

  def attend_to(self, x, keys, values, mask):
    """Cross-attention from x [batch, q_len, embed] to precomputed heads-major keys/values
    [batch, kv_heads, k_len, head_dim]."""
    dt = compute_dtype(self.cfg)
    q = self.project_q(x)
    y = attn_lib.attend_cache(q, keys.astype(dt), values.astype(dt), mask, None,
                              scale=self.scale(), implementation=self.cfg.attention_impl)
    return self.project_out(y)

  def scale(self) -> float:
    """Logit scale: 1 for T5 (folded into init), 1/sqrt(head_dim) otherwise."""
    return 1.0 / math.sqrt(self.cfg.head_dim) if self.cfg.scale_attention else 1.0


def write_slots(cache, new, index):
  """`cache` [batch, kv_heads, max_len, head_dim] with `new` [batch, kv_heads, q_len, head_dim]
  written at slots index.., in place. A bf16 cache is written as its 16-bit patterns: XLA:CPU
  widens a bf16 dynamic-update-slice to float32, which rewrote the whole cache every token step
  (decoder-125m, batch 32: 11 of its ~80 ms)."""
  new = new.astype(cache.dtype)
  if cache.dtype != jnp.bfloat16:
    return jax.lax.dynamic_update_slice(cache, new, (0, 0, index, 0))
  bits = jax.lax.dynamic_update_slice(jax.lax.bitcast_convert_type(cache, jnp.uint16),
                                      jax.lax.bitcast_convert_type(new, jnp.uint16),
                                      (0, 0, index, 0))
  return jax.lax.bitcast_convert_type(bits, jnp.bfloat16)


def activation_fn(name: str):
  """Maps an activation name to its function."""
  fns = {"gelu": lambda x: jax.nn.gelu(x, approximate=True), "silu": jax.nn.silu,
         "relu": jax.nn.relu}
  if name not in fns:
    raise ValueError(f"unknown activation {name!r}; choose from {sorted(fns)}")
  return fns[name]


# The name of the feed-forward block's activation (the gated product, the wo projection's input)
# for remat policies that keep it (`remat.POLICIES`).
MLP_ACTIVATION = "mlp_activation"


class MLP(nnx.Module):
  """Feed-forward block: gated (GeGLU / SwiGLU) or plain."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, f, pdt = cfg.d_model, cfg.d_ff, jnp.dtype(cfg.param_dtype)
    self.wi_0 = param(rngs, (d, f), ("embed", "mlp"), d ** -0.5, pdt)
    if cfg.gated_mlp:
      self.wi_1 = param(rngs, (d, f), ("embed", "mlp"), d ** -0.5, pdt)
    self.wo = param(rngs, (f, d), ("mlp", "embed"), f ** -0.5, pdt)
    if cfg.use_bias:
      self.wi_0_bias = zeros_param((f,), ("mlp",), pdt)
      if cfg.gated_mlp:
        self.wi_1_bias = zeros_param((f,), ("mlp",), pdt)
      self.wo_bias = zeros_param((d,), ("embed",), pdt)

  def __call__(self, x, rng=None):
    """x: [batch, length, embed] -> ([batch, length, embed], aux_loss=0)."""
    dt = compute_dtype(self.cfg)
    if (self.cfg.gated_mlp and self.cfg.gated_projection.startswith("stacked")
        and x.shape[1] > 1):
      # Both input projections as one matmul over stacked kernels [embed, 2, mlp]. XLA:CPU then
      # stops recomputing the gate's backward in a second, transposed layout: the train step of
      # T5-small is 14% faster there, decoder-tiny 7%. A tensor-sharded `mlp` axis stays sharded.
      # One-token decode steps skip it: they are bound by reading the weights, and the stacked
      # copy would add a write and a read of both kernels. (ModelConfig.gated_projection.)
      kernels = jnp.stack([self.wi_0[...], self.wi_1[...]], axis=1)
      both = project(self.cfg, "bld,dnf->blnf", x, kernels)
      if self.cfg.use_bias:
        both = both + jnp.stack([self.wi_0_bias[...], self.wi_1_bias[...]]).astype(dt)
      gated = gated_activation if self.cfg.gated_projection == "stacked" else gated_product
      h = gated(both, self.cfg.activation)
    else:
      gate = _add_bias(project(self.cfg, "bld,df->blf", x, self.wi_0[...]), self, "wi_0_bias")
      if self.cfg.gated_mlp:
        up = _add_bias(project(self.cfg, "bld,df->blf", x, self.wi_1[...]), self, "wi_1_bias")
        gated = gated_pair if self.cfg.gated_projection == "split_recompute" else _gated_pair
        h = gated(gate, up, self.cfg.activation)
      else:
        h = activation_fn(self.cfg.activation)(gate)
    h = checkpoint_name(h, MLP_ACTIVATION)
    h = dropout(h, self.cfg.dropout_rate, rng)
    out = project(self.cfg, "blf,fd->bld", h, self.wo[...])
    return _add_bias(out, self, "wo_bias"), jnp.zeros((), jnp.float32)


def _gated_pair(gate, up, activation: str):
  """act(gate) * up, with autodiff's gradient."""
  return activation_fn(activation)(gate) * up


def gated_product(both, activation: str):
  """act(gate) * up from the stacked projections `both` [..., 2, mlp] (gate first), with
  autodiff's gradient of the two slices (`gated_activation` writes it by hand)."""
  return _gated_pair(both[..., 0, :], both[..., 1, :], activation)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def gated_activation(both, activation: str):
  """act(gate) * up from the stacked projections `both` [..., 2, mlp] (gate first).

  Its gradient is written by hand as one stack of the gate's and the up's gradients. Autodiff
  of the two slices pads each slice's gradient to the stacked shape and adds them: on XLA:CPU
  three passes over [tokens, 2, mlp] (decoder-125m, b8 x 320: 324 ms of its 8.5 s step).
  In-process A/B of the train step (fp32, 2 cores): decoder-125m 8,607 -> 8,502 ms, T5-small
  2,412 -> 2,370 ms, the tiny presets within noise.
  """
  return gated_product(both, activation)


def _gated_forward(both, activation: str):
  return gated_activation(both, activation), both


def _gated_backward(activation: str, both, d_h):
  return (jnp.stack(_gated_grads(activation, both[..., 0, :], both[..., 1, :], d_h), axis=-2),)


gated_activation.defvjp(_gated_forward, _gated_backward)


def _gated_grads(activation: str, gate, up, d_h):
  """(d gate, d up) of act(gate) * up, the activation computed again from `gate`."""
  activated, act_vjp = jax.vjp(activation_fn(activation), gate)
  d_gate, = act_vjp(d_h * up)
  return d_gate, d_h * activated


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def gated_pair(gate, up, activation: str):
  """act(gate) * up from the two input projections, its gradient computing the activation
  again from `gate` (`ModelConfig.gated_projection = "split_recompute"`).

  Under autodiff's gradient XLA:GPU has the forward's kernel write the activation's inner term
  (GELU's tanh, SiLU's sigmoid: [tokens, mlp]) for the backward's kernel to read back; here
  the backward's kernel computes it from `gate`, which it reads anyway. XLA's H100 programs
  (runs/gpu.gin): T5-base at b64 x (512+128) moves 4.0 of its 132 GB a step less (about 1.2 ms
  at 3.35 TB/s) and peaks 1.9 GiB lower, the 1b decoder at b8 x 2048 8.1 of 230 GB less.
  """
  return _gated_pair(gate, up, activation)


def _gated_pair_forward(gate, up, activation: str):
  return _gated_pair(gate, up, activation), (gate, up)


def _gated_pair_backward(activation: str, saved, d_h):
  # The barrier keeps XLA from sharing the activation's inner terms (GELU's tanh) between this
  # pass and the forward one, which would have the forward's kernel write them for this one.
  gate, up = jax.lax.optimization_barrier(saved)
  return _gated_grads(activation, gate, up, d_h)


gated_pair.defvjp(_gated_pair_forward, _gated_pair_backward)


class MoEMLP(nnx.Module):
  """Top-k routed mixture of expert MLPs with capacity-limited dispatch (GShard / Switch).

  Tokens over an expert's capacity are dropped (pass through the residual only). The
  load-balancing loss is the Switch Transformer one: num_experts * sum_e(fraction_e * prob_e).
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, capacity_factor: float = 1.25):
    self.cfg = cfg
    self.capacity_factor = capacity_factor
    d, f, e, pdt = cfg.d_model, cfg.d_ff, cfg.num_experts, jnp.dtype(cfg.param_dtype)
    self.router = param(rngs, (d, e), ("embed", "experts"), d ** -0.5, pdt)
    self.wi_0 = param(rngs, (e, d, f), ("experts", "embed", "mlp"), d ** -0.5, pdt)
    if cfg.gated_mlp:
      self.wi_1 = param(rngs, (e, d, f), ("experts", "embed", "mlp"), d ** -0.5, pdt)
    self.wo = param(rngs, (e, f, d), ("experts", "mlp", "embed"), f ** -0.5, pdt)

  def __call__(self, x, rng=None):
    """x: [batch, length, embed] -> ([batch, length, embed], load-balancing loss)."""
    cfg = self.cfg
    dt = compute_dtype(cfg)
    b, l, _ = x.shape
    e, k = cfg.num_experts, cfg.experts_per_token
    logits = jnp.einsum("bld,de->ble", x.astype(jnp.float32), self.router[...])
    probs = jax.nn.softmax(logits, axis=-1)
    gate, index = jax.lax.top_k(probs, k)                       # [b, l, k]
    gate = gate / jnp.sum(gate, axis=-1, keepdims=True)
    capacity = max(1, int(math.ceil(self.capacity_factor * k * l / e)))
    # Order choices so every token's first choice is served before any second choice.
    onehot = jax.nn.one_hot(index, e, dtype=jnp.int32)          # [b, l, k, e]
    flat = onehot.transpose(0, 2, 1, 3).reshape(b, k * l, e)    # choice-major
    slot = (jnp.cumsum(flat, axis=1) - 1) * flat                # position in expert queue
    slot = slot.reshape(b, k, l, e).transpose(0, 2, 1, 3)
    fits = (slot < capacity) & (onehot > 0)
    slot_onehot = jax.nn.one_hot(jnp.sum(slot * fits, -1), capacity, dtype=dt)  # [b,l,k,c]
    dispatch = jnp.einsum("blke,blkc->blec", fits.astype(dt), slot_onehot)
    combine = jnp.einsum("blke,blkc->blec", (fits * gate[..., None]).astype(dt), slot_onehot)
    xe = jnp.einsum("blec,bld->becd", dispatch, x)
    act = activation_fn(cfg.activation)
    h = act(jnp.einsum("becd,edf->becf", xe, self.wi_0[...].astype(dt)))
    if cfg.gated_mlp:
      h = h * jnp.einsum("becd,edf->becf", xe, self.wi_1[...].astype(dt))
    h = dropout(h, cfg.dropout_rate, rng)
    ye = jnp.einsum("becf,efd->becd", h, self.wo[...].astype(dt))
    y = jnp.einsum("blec,becd->bld", combine, ye)
    fraction = jnp.mean(onehot[:, :, 0, :].astype(jnp.float32), axis=(0, 1))
    mean_prob = jnp.mean(probs, axis=(0, 1))
    aux = cfg.num_experts * jnp.sum(fraction * mean_prob)
    return y, aux


def make_mlp(cfg: ModelConfig, rngs: nnx.Rngs):
  """Dense MLP or MoE, as the config asks."""
  return MoEMLP(cfg, rngs=rngs) if cfg.num_experts else MLP(cfg, rngs=rngs)
