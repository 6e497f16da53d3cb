"""Network shapes, masks (including packing), scan/remat equivalence, gradients, memorization."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import assert_not_bf16_rounded, equations, tiny_config
from t5lite import trainer
from t5lite.models import config, layers
from t5lite.models import remat as remat_lib
from t5lite.models.model import LossConfig, Model

VARIANTS = [
    dict(arch="encoder_decoder"),
    dict(arch="encoder_decoder", position_encoding="alibi"),
    dict(arch="encoder_decoder", position_encoding="rope", tie_embeddings=True),
    dict(arch="encoder_decoder", num_experts=4, experts_per_token=2),
    dict(arch="encoder_decoder", gated_mlp=False, activation="relu"),
    dict(arch="decoder_only"),
    dict(arch="decoder_only", num_kv_heads=2),
    dict(arch="decoder_only", num_kv_heads=1, tie_embeddings=True),
    dict(arch="decoder_only", position_encoding="alibi"),
    dict(arch="decoder_only", position_encoding="relative", scale_attention=False),
    dict(arch="decoder_only", num_experts=4, experts_per_token=1),
    dict(arch="decoder_only", position_encoding="learned", norm="layer", use_bias=True, gated_mlp=False, activation="gelu", tie_embeddings=True),
    dict(arch="prefix_lm"),
    dict(arch="prefix_lm", position_encoding="relative", num_kv_heads=2),
]


def _ids(v):
  return "-".join(f"{k}={val}" for k, val in v.items())


def random_batch(cfg, batch=2, in_len=12, out_len=8, seed=0):
  """Unpacked random batch with some padding at the end of each row."""
  rng = np.random.default_rng(seed)
  if cfg.arch == "encoder_decoder":
    inputs = rng.integers(3, cfg.vocab_size, (batch, in_len)).astype(np.int32)
    inputs[:, -3:] = 0
    targets = rng.integers(3, cfg.vocab_size, (batch, out_len)).astype(np.int32)
    targets[:, -2:] = 0
    dec_in = np.concatenate([np.zeros((batch, 1), np.int32), targets[:, :-1]], axis=1)
    return {"encoder_input_tokens": inputs, "decoder_input_tokens": dec_in,
            "decoder_target_tokens": targets}
  length = in_len + out_len
  targets = rng.integers(3, cfg.vocab_size, (batch, length)).astype(np.int32)
  targets[:, -2:] = 0
  dec_in = np.concatenate([np.zeros((batch, 1), np.int32), targets[:, :-1]], axis=1)
  out = {"decoder_input_tokens": dec_in, "decoder_target_tokens": targets,
         "decoder_loss_weights": (targets > 0).astype(np.float32)}
  if cfg.arch == "prefix_lm":
    out["decoder_causal_attention"] = (np.arange(length) < in_len).astype(np.int32)[None].repeat(
        batch, 0)
  return out


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_shapes_and_finite_loss(variant):
  cfg = tiny_config(**variant)
  model = Model(cfg)
  params = model.init(jax.random.key(0))
  batch = random_batch(cfg)
  logits, aux = jax.jit(model.apply)(params, batch, jax.random.key(1))
  out_len = batch["decoder_target_tokens"].shape[1]
  assert logits.shape == (2, out_len, cfg.vocab_size)
  assert logits.dtype == jnp.float32
  loss, metrics = jax.jit(model.loss)(params, batch)
  assert np.isfinite(float(loss))
  # A fresh model is close to uniform: loss near log(vocab).
  assert abs(float(metrics["nll_sum"] / metrics["token_count"]) - np.log(cfg.vocab_size)) < 2.0
  if cfg.num_experts:
    assert float(aux) > 0
  scores = jax.jit(model.score_batch)(params, batch)
  assert scores.shape == (2,)
  assert np.all(np.asarray(scores) < 0)


def _pack(examples, arch):
  """Packs two unpacked single-row examples into one row with segment ids and positions."""
  out = {}
  keys = [k for k in examples[0] if k.endswith("_tokens") or k in (
      "decoder_loss_weights", "decoder_causal_attention")]
  for k in keys:
    out[k] = np.concatenate([e[k][0] for e in examples])[None]
  if arch == "encoder_decoder":
    lens = [e["encoder_input_tokens"].shape[1] for e in examples]
    out["encoder_segment_ids"] = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lens)])[None]
    out["encoder_positions"] = np.concatenate([np.arange(n) for n in lens])[None]
  lens = [e["decoder_target_tokens"].shape[1] for e in examples]
  out["decoder_segment_ids"] = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lens)])[None]
  out["decoder_positions"] = np.concatenate([np.arange(n) for n in lens])[None]
  return {k: np.asarray(v, np.float32 if k == "decoder_loss_weights" else np.int32)
          for k, v in out.items()}


@pytest.mark.parametrize("variant", [v for v in VARIANTS if not v.get("num_experts")], ids=_ids)
def test_packing_never_crosses_segments(variant):
  """Logits of a packed row equal the logits of each example run alone."""
  cfg = tiny_config(**variant)
  model = Model(cfg)
  params = model.init(jax.random.key(0))
  examples = []
  for seed, (il, ol) in enumerate([(7, 5), (9, 6)]):
    b = random_batch(cfg, batch=1, in_len=il, out_len=ol, seed=seed + 10)
    # No padding inside examples: every token is real.
    for k in b:
      if k.endswith("_tokens"):
        b[k] = np.where(b[k] == 0, 5, b[k]).astype(np.int32)
    b["decoder_input_tokens"][:, 0] = 0
    if "decoder_loss_weights" in b:
      b["decoder_loss_weights"] = np.ones_like(b["decoder_loss_weights"])
    examples.append(b)
  apply = jax.jit(model.apply)
  alone = [np.asarray(apply(params, e)[0][0]) for e in examples]
  packed = np.asarray(apply(params, _pack(examples, cfg.arch))[0][0])
  np.testing.assert_allclose(packed, np.concatenate(alone), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("arch", ["decoder_only", "prefix_lm"])
def test_causal_and_prefix_visibility(arch):
  cfg = tiny_config(arch=arch)
  model = Model(cfg)
  params = model.init(jax.random.key(0))
  batch = random_batch(cfg, batch=1, in_len=6, out_len=6)
  base = np.asarray(model.apply(params, batch)[0])
  # Changing a later prefix token: prefix-LM sees it from earlier prefix positions, causal does not.
  changed = dict(batch)
  changed["decoder_input_tokens"] = batch["decoder_input_tokens"].copy()
  changed["decoder_input_tokens"][0, 4] = (changed["decoder_input_tokens"][0, 4] + 1) % 60 + 3
  moved = np.abs(np.asarray(model.apply(params, changed)[0]) - base).max(-1)[0]
  if arch == "prefix_lm":
    assert moved[1] > 1e-6
  else:
    assert np.all(moved[:4] < 1e-6)
  # Future target tokens are never visible.
  changed["decoder_input_tokens"] = batch["decoder_input_tokens"].copy()
  changed["decoder_input_tokens"][0, 10] = 7
  moved = np.abs(np.asarray(model.apply(params, changed)[0]) - base).max(-1)[0]
  assert np.all(moved[:10] < 1e-6) and moved[10] > 1e-6


def test_every_remat_policy_name_has_a_policy():
  """ModelConfig's allowed names are the policies t5lite.models.remat defines, and "none"."""
  assert set(config.REMAT_POLICIES) == {"none", *remat_lib.POLICIES}


@pytest.mark.parametrize("arch", ["encoder_decoder", "decoder_only"])
@pytest.mark.parametrize("remat", [p for p in config.REMAT_POLICIES if p != "none"])
def test_scan_unrolled_and_remat_agree(arch, remat):
  base_cfg = tiny_config(arch=arch)
  batch = random_batch(base_cfg)
  params = Model(base_cfg).init(jax.random.key(0))

  def loss_and_grad(cfg):
    model = Model(cfg)
    return jax.jit(jax.value_and_grad(lambda p: model.loss(p, batch)[0]))(params)

  ref_loss, ref_grad = loss_and_grad(base_cfg)
  for cfg in (tiny_config(arch=arch, scan_layers=False),
              tiny_config(arch=arch, remat_policy=remat),
              tiny_config(arch=arch, remat_policy=remat, scan_layers=False)):
    loss, grad = loss_and_grad(cfg)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4), grad,
                 ref_grad)


@pytest.mark.parametrize("arch", ["encoder_decoder", "decoder_only"])
def test_unrolled_layers_gradient_is_one_concatenation_per_stack(arch):
  """Unrolled layers take their weights from one split of each stacked parameter, so a stack's
  gradient is one concatenation of the layers' gradients; indexing each layer out of the stack
  would have autodiff pad every layer's gradient to the stack's shape and add them up (on
  XLA:CPU about 2% of T5-small's train step)."""
  cfg = tiny_config(arch=arch, scan_layers=False)
  model = Model(cfg)
  params = model.init(jax.random.key(0))
  batch = random_batch(cfg)
  stacked = {leaf.shape for leaf in jax.tree.leaves(params)
             if leaf.ndim > 1 and leaf.shape[0] == cfg.num_decoder_layers}
  jaxpr = jax.make_jaxpr(jax.grad(lambda p: model.loss(p, batch)[0]))(params).jaxpr
  outputs = lambda primitive: {tuple(v.aval.shape) for eqn in equations(jaxpr, primitive)  # noqa
                               for v in eqn.outvars}
  assert stacked and stacked <= outputs("concatenate"), stacked
  assert not stacked & outputs("pad")


@pytest.mark.parametrize("variant", [dict(arch="encoder_decoder"), dict(arch="decoder_only"),
                                     dict(arch="prefix_lm", position_encoding="alibi")], ids=_ids)
def test_gradient_matches_finite_differences(variant):
  """Directional derivative of the loss vs a central finite difference (float32)."""
  cfg = tiny_config(**variant)
  model = Model(cfg, LossConfig(z_loss=1e-4, label_smoothing=0.1))
  params = model.init(jax.random.key(0))
  batch = random_batch(cfg)
  loss_fn = jax.jit(lambda p: model.loss(p, batch)[0])
  grad = jax.grad(loss_fn)(params)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  direction = treedef.unflatten([jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
  analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction)))
  eps = 1e-3
  shift = lambda s: jax.tree.map(lambda p, d: p + s * eps * d, params, direction)
  numeric = (loss_fn(shift(1.0)) - loss_fn(shift(-1.0))) / (2 * eps)
  np.testing.assert_allclose(float(analytic), float(numeric), rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("arch", ["encoder_decoder", "decoder_only"])
def test_tiny_model_memorizes_a_batch(arch):
  cfg = tiny_config(arch=arch, d_model=64, d_ff=128)
  model = Model(cfg, LossConfig(z_loss=0.0))
  opt = optax.adam(3e-3)
  state = trainer.init_state(model, opt, jax.random.key(0))
  batch = random_batch(cfg, batch=4)
  step = jax.jit(functools.partial(trainer.train_step, model=model, optimizer=opt,
                                   schedule=lambda s: 3e-3, seed=0))
  first = None
  for _ in range(200):
    state, metrics = step(state, batch)
    first = first if first is not None else float(metrics["loss"])
  assert first > 3.0
  assert float(metrics["loss"]) < 0.1
  # Decoder-only rows share their first context (the start token), so their first target tokens
  # cannot all be predicted; everything else must be.
  rows = batch["decoder_target_tokens"].shape[0]
  assert float(metrics["accuracy"]) >= 1.0 - (rows - 1) / float(metrics["target_tokens"]) - 1e-6


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("length", [1, 2, 7, 200])
def test_sequence_relative_bias_equals_the_per_position_bias(bidirectional, length):
  """The Toeplitz layout of `for_sequence` is the bias of positions 0..L-1, entry for entry."""
  from flax import nnx
  from t5lite.models import positions
  bias = positions.RelativePositionBias(32, 128, 3, bidirectional, rngs=nnx.Rngs(0))
  pos = jnp.arange(length)[None]
  np.testing.assert_array_equal(np.asarray(bias.for_sequence(length)), np.asarray(bias(pos, pos)))
  table = jnp.arange(2 * (2 * length - 1)).reshape(2, 2 * length - 1)
  offsets = np.arange(length)[None, :] - np.arange(length)[:, None] + length - 1
  np.testing.assert_array_equal(np.asarray(positions.toeplitz(table, length)),
                                np.asarray(table)[:, offsets])


def _assert_same_loss_and_grads(variant, batch, reference, other, *, loss_rtol, atol, rtol):
  """The model `variant` with config overrides `other` gives the loss and parameter gradients
  it gives with `reference`, from the same parameters."""
  params = Model(tiny_config(**variant)).init(jax.random.key(0))
  results = []
  for overrides in (reference, other):
    model = Model(tiny_config(**overrides, **variant))
    results.append(jax.jit(jax.value_and_grad(lambda p, m=model: m.loss(p, batch)[0]))(params))
  np.testing.assert_allclose(results[1][0], results[0][0], rtol=loss_rtol)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=atol, rtol=rtol),
               results[1][1], results[0][1])


@pytest.mark.parametrize("variant", [dict(arch="encoder_decoder"),
                                     dict(arch="decoder_only", num_kv_heads=2),
                                     dict(arch="prefix_lm", position_encoding="relative",
                                          num_kv_heads=2)], ids=_ids)
def test_chunked_attention_model_matches_jax_attention(variant):
  """attention_impl='chunked' gives jax.nn's loss and gradients on sequences several query
  blocks long (the causal self-attention is chunked; the rest goes to jax.nn)."""
  batch = random_batch(tiny_config(**variant), batch=2, in_len=90, out_len=70, seed=3)
  _assert_same_loss_and_grads(variant, batch, dict(attention_impl="xla"),
                              dict(attention_impl="chunked"), loss_rtol=1e-5, atol=2e-6,
                              rtol=1e-4)


@pytest.mark.parametrize("variant", [dict(arch="encoder_decoder"),
                                     dict(arch="decoder_only", num_kv_heads=2, tie_embeddings=True),
                                     dict(arch="decoder_only", gated_mlp=False, use_bias=True,
                                          activation="gelu", norm="layer",
                                          position_encoding="learned"),
                                     dict(arch="prefix_lm", scan_layers=False)], ids=_ids)
def test_flat_weight_grads_match_autodiff(variant):
  """flat_weight_grads=True (every projection's kernel gradient as one flat matmul) gives the
  same loss and gradients as autodiff of the einsums."""
  batch = random_batch(tiny_config(**variant), seed=4)
  _assert_same_loss_and_grads(variant, batch, dict(flat_weight_grads=False),
                              dict(flat_weight_grads=True), loss_rtol=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("variant", [dict(arch="encoder_decoder", head_dim=16,
                                          attention_impl="cpu_kernel"),
                                     dict(arch="decoder_only", num_kv_heads=2, tie_embeddings=True),
                                     dict(arch="decoder_only", gated_mlp=False, use_bias=True,
                                          activation="gelu", norm="layer",
                                          position_encoding="learned", scan_layers=False)],
                         ids=_ids)
def test_bf16_with_float32_dot_outputs_tracks_float32(variant):
  """dtype='bfloat16' with float32_dot_outputs (runs/cpu_bf16.gin's lever), jitted as the
  trainer jits it (so XLA's whole-program rewrites of the matmuls run too), gives the float32
  model's loss and gradients to bf16 precision, and no less closely than bf16 without it."""
  batch = random_batch(tiny_config(**variant), seed=5)
  params = Model(tiny_config(**variant)).init(jax.random.key(0))

  def loss_and_grads(**overrides):
    model = Model(tiny_config(**{**variant, **overrides}))
    return jax.jit(jax.value_and_grad(lambda p: model.loss(p, batch)[0]))(params)

  want_loss, want = loss_and_grads()
  errors = {}
  for name, overrides in (("lever", dict(dtype="bfloat16", float32_dot_outputs=True)),
                          ("plain", dict(dtype="bfloat16"))):
    loss, grads = loss_and_grads(**overrides)
    np.testing.assert_allclose(loss, want_loss, rtol=2e-2)
    flat = lambda tree: jnp.concatenate([x.ravel() for x in jax.tree.leaves(tree)])  # noqa: E731
    errors[name] = float(jnp.linalg.norm(flat(grads) - flat(want)) / jnp.linalg.norm(flat(want)))
  assert errors["lever"] < 0.05 and errors["lever"] <= 1.2 * errors["plain"], errors


@pytest.mark.parametrize("projection", ["stacked_autodiff", "split", "split_recompute"])
@pytest.mark.parametrize("variant", [dict(arch="encoder_decoder"),
                                     dict(arch="decoder_only", num_kv_heads=2, activation="silu",
                                          scan_layers=False),
                                     dict(arch="decoder_only", use_bias=True, activation="silu")],
                         ids=_ids)
def test_gated_projections_match_the_stacked_one(variant, projection):
  """gated_projection 'stacked_autodiff' (autodiff's gradient of the stacked matmul), 'split'
  (two matmuls) and 'split_recompute' (two, the gradient by hand) give the hand-written stacked
  gradient's loss and gradients; the split ones have no [.., 2, mlp] product, the stacked ones
  have."""
  batch = random_batch(tiny_config(**variant), seed=6)
  _assert_same_loss_and_grads(variant, batch, dict(gated_projection="stacked"),
                              dict(gated_projection=projection), loss_rtol=1e-6, atol=1e-6,
                              rtol=1e-5)
  cfg = tiny_config(gated_projection=projection, **variant)
  params = Model(cfg).init(jax.random.key(0))
  jaxpr = jax.make_jaxpr(jax.grad(lambda p: Model(cfg).loss(p, batch)[0]))(params).jaxpr
  stacked = [v.aval.shape for eqn in equations(jaxpr, "dot_general") for v in eqn.outvars
             if v.aval.shape[-2:] == (2, cfg.d_ff)]
  assert bool(stacked) == projection.startswith("stacked")
  with pytest.raises(ValueError, match="gated_projection must be one of"):
    tiny_config(gated_projection="stacked_by_hand")


@pytest.mark.parametrize("activation", ["silu", "gelu", "relu"])
def test_gated_activation_gradient_matches_autodiff(activation):
  """layers.gated_activation (its gradient written stacked, by hand) against autodiff of
  act(gate) * up over the two slices."""
  both = jax.random.normal(jax.random.key(0), (2, 5, 2, 16)) * 3.0
  weights = jax.random.normal(jax.random.key(1), (2, 5, 16))
  act = layers.activation_fn(activation)
  ours = lambda b: jnp.sum(layers.gated_activation(b, activation) * weights)
  reference = lambda b: jnp.sum(act(b[..., 0, :]) * b[..., 1, :] * weights)
  np.testing.assert_allclose(ours(both), reference(both), rtol=1e-6)
  grad, ref_grad = jax.jit(jax.grad(ours))(both), jax.jit(jax.grad(reference))(both)
  assert grad.shape == both.shape
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(grad[..., 0, :])).max() > 0 and np.abs(np.asarray(grad[..., 1, :])).max() > 0


@pytest.mark.parametrize("streams", [1, 3])
@pytest.mark.parametrize("masking", ["causal", "lengths_and_bias", "dense_and_bias"])
def test_chunked_attention_matches_jax_attention(masking, streams):
  """chunked_attention itself, with grouped KV heads, under each kind of mask, in one group of
  rows or one per row: outputs on the real queries and gradients equal
  jax.nn.dot_product_attention's."""
  from t5lite.models import attention
  b, length, heads, kv_heads, d = 3, 150, 4, 2, 16
  keys = jax.random.split(jax.random.key(0), 5)
  q = jax.random.normal(keys[0], (b, length, heads, d))
  k, v = (jax.random.normal(r, (b, length, kv_heads, d)) for r in keys[1:3])
  bias = jax.random.normal(keys[3], (1, heads, length, length))
  segments = np.concatenate([np.ones((b, 80)), 2 * np.ones((b, 60)), np.zeros((b, 10))], 1)
  real = np.ones((b, length, 1, 1), bool)
  if masking == "causal":
    mask, bias = attention.Mask(causal=True), None
  elif masking == "lengths_and_bias":
    mask = attention.Mask(kv_lengths=jnp.array([150, 100, 7]))
  else:
    seg = jnp.asarray(segments, jnp.int32)
    mask = attention.Mask(dense=attention.padding_mask(seg, seg) & attention.causal_mask(length))
    real = (segments > 0)[..., None, None]   # padding queries see nothing: their output is moot

  def objective(fn):
    return lambda *args: jnp.sum(jnp.where(real, jnp.sin(fn(*args)), 0.0))

  ref = lambda q, k, v, bias=bias: jax.nn.dot_product_attention(  # noqa: E731
      q, k, v, bias=bias, mask=mask.dense, scale=0.3, is_causal=mask.causal,
      key_value_seq_lengths=mask.kv_lengths)
  chunked = lambda q, k, v, bias=bias: attention.chunked_attention(  # noqa: E731
      q, k, v, mask, bias, scale=0.3, streams=streams)
  np.testing.assert_allclose(np.where(real, jax.jit(chunked)(q, k, v), 0),
                             np.where(real, jax.jit(ref)(q, k, v), 0), atol=2e-6)
  # The gradients of q, k, v and (where there is one) the bias, which chunked_attention's
  # blocks compute by hand (flash attention's backward), not by autodiff.
  args, argnums = ((q, k, v), (0, 1, 2)) if bias is None else ((q, k, v, bias), (0, 1, 2, 3))
  for got, want in zip(jax.jit(jax.grad(objective(chunked), argnums=argnums))(*args),
                       jax.jit(jax.grad(objective(ref), argnums=argnums))(*args)):
    np.testing.assert_allclose(got, want, atol=5e-5)


@pytest.mark.parametrize("masking", ["dense_and_bias", "lengths"])
def test_attend_cache_matches_jax_attention(masking):
  """Decoding's attention over a heads-major cache (grouped KV heads, a few new queries) equals
  jax.nn.dot_product_attention over the same keys laid out [batch, keys, heads, d]."""
  from t5lite.models import attention
  b, q_len, k_len, heads, kv_heads, d = 3, 2, 40, 6, 2, 8
  keys = jax.random.split(jax.random.key(1), 4)
  q = jax.random.normal(keys[0], (b, q_len, heads, d))
  k, v = (jax.random.normal(r, (b, kv_heads, k_len, d)) for r in keys[1:3])
  if masking == "lengths":
    mask, bias = attention.Mask(kv_lengths=jnp.array([40, 17, 1])), None
  else:
    slots = np.arange(k_len)
    visible = (slots[None, None, :] <= np.array([[20, 21]]).T[None]) & (
        slots >= np.array([0, 5, 19])[:, None, None])                 # causal, left padding
    mask = attention.Mask(dense=jnp.asarray(visible)[:, None])
    bias = jax.random.normal(keys[3], (b, heads, q_len, k_len))
  got = attention.attend_cache(q, k, v, mask, bias, scale=0.4)
  want = jax.nn.dot_product_attention(
      q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), bias=bias, mask=mask.dense,
      scale=0.4, key_value_seq_lengths=mask.kv_lengths)
  np.testing.assert_allclose(got, want, atol=2e-6)


def test_unknown_attention_implementation_is_rejected():
  with pytest.raises(ValueError, match="attention_impl must be one of"):
    tiny_config(attention_impl="flash")


@pytest.mark.parametrize("variant", [
    dict(arch="encoder_decoder"),  # relative position bias, untied head
    dict(arch="encoder_decoder", tie_embeddings=True, num_experts=4, experts_per_token=2),
    dict(arch="decoder_only", position_encoding="learned", norm="layer", use_bias=True,
         gated_mlp=False, activation="gelu", tie_embeddings=True),
    dict(arch="prefix_lm", position_encoding="relative", scale_attention=False),
], ids=lambda v: "-".join(f"{k}={val}" for k, val in v.items()))
def test_cast_for_compute_changes_no_output(variant):
  """Parameters cast once to the compute dtype (what decoding does before its loop) give
  bit-identical bf16 logits; what the network reads in float32 (norms, relative position bias,
  MoE router) stays float32. Every parameter is perturbed first, so that no value survives a
  wrong cast to bf16 unrounded."""
  from t5lite.models.transformer import cast_for_compute
  cfg = tiny_config(dtype="bfloat16", **variant)
  model = Model(cfg)
  params = model.init(jax.random.key(0))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [x + 0.01 * jax.random.normal(k, x.shape, x.dtype)
                                     for x, k in zip(leaves, keys)])
  cast = cast_for_compute(params, cfg)
  batch = random_batch(cfg)
  want, _ = model.apply(params, batch)
  got, _ = model.apply(cast, batch)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  dtypes = {jax.tree_util.keystr(p): x.dtype for p, x in jax.tree_util.tree_leaves_with_path(cast)}
  stay = [k for k in dtypes if "norm" in k or "relpos" in k or "router" in k]
  assert stay and all(dtypes[k] == jnp.float32 for k in stay), dtypes
  moved = [k for k in dtypes if k not in stay and "position_embed" not in k]
  assert all(dtypes[k] == jnp.bfloat16 for k in moved), dtypes


@pytest.mark.parametrize("variant", [dict(arch="encoder_decoder"),
                                     dict(arch="encoder_decoder", position_encoding="rope",
                                          tie_embeddings=True, dropout_rate=0.1),
                                     dict(arch="decoder_only", num_kv_heads=1,
                                          tie_embeddings=True),
                                     dict(arch="prefix_lm", num_experts=4)], ids=_ids)
def test_head_chunks_give_the_loss_metrics_and_gradients_of_whole_logits(variant):
  """LossConfig.head_chunks (the output head and cross-entropy in blocks, 3 over 8 target
  positions) changes no loss, metric, parameter gradient or score, with z-loss, label
  smoothing, per-sequence normalization, tied heads, dropout and MoE."""
  cfg = tiny_config(**variant)
  batch = random_batch(cfg, seed=5)
  params = Model(cfg).init(jax.random.key(0))
  rng = jax.random.key(7)
  results, scores = [], []
  for chunks in (0, 3):
    model = Model(cfg, LossConfig(z_loss=1e-3, label_smoothing=0.1,
                                  normalization="per_sequence", head_chunks=chunks))
    fn = jax.jit(jax.value_and_grad(lambda p, m=model: m.loss(p, batch, rng), has_aux=True))
    results.append(fn(params))
    scores.append(jax.jit(model.score_batch)(params, batch))
  (loss0, metrics0), grads0 = results[0]
  (loss1, metrics1), grads1 = results[1]
  # Scoring in blocks: the same log-likelihoods (z-loss and smoothing play no part in them).
  np.testing.assert_allclose(scores[1], scores[0], rtol=1e-5)
  assert np.all(np.asarray(scores[0]) < 0)
  np.testing.assert_allclose(loss1, loss0, rtol=1e-5)
  for name in metrics0:
    np.testing.assert_allclose(metrics1[name], metrics0[name], rtol=1e-5, atol=1e-6, err_msg=name)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4), grads1, grads0)


@pytest.mark.parametrize("variant", [dict(arch="decoder_only"),
                                     dict(arch="encoder_decoder", tie_embeddings=True),
                                     dict(arch="decoder_only", float32_dot_outputs=True,
                                          matmul_kernel=True)], ids=_ids)
def test_bf16_logits_are_float32_sums(variant):
  """A bf16 model's logits are the float32 sums of its bf16 products, never rounded to bf16 (as
  T5X computes them in float32): the loss of whole logits is the blocked head's (whose logits
  were always float32) to float32 precision, and a rounded logit is rare."""
  cfg = tiny_config(dtype="bfloat16", **variant)
  batch = random_batch(cfg, seed=3)
  params = Model(cfg).init(jax.random.key(0))
  logits, _ = jax.jit(Model(cfg).apply)(params, batch)
  assert logits.dtype == jnp.float32
  assert_not_bf16_rounded(logits)
  losses = [jax.jit(Model(cfg, LossConfig(head_chunks=chunks)).loss)(params, batch)[0]
            for chunks in (0, 3)]
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)


def test_negative_head_chunks_are_rejected():
  with pytest.raises(ValueError, match="head_chunks"):
    LossConfig(head_chunks=-1)
