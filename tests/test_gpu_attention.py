"""t5lite.kernels.gpu_attention (Pallas flash attention with T5's bias), run by Pallas's
interpreter on CPU against XLA's attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from t5lite.kernels import gpu_attention
from t5lite.models import attention
from t5lite.models.model import Model


# Small tiles, several along each length, the backward's not the forward's (64 queries: 2 tiles
# a forward program, 4 loop steps a backward one).
TILES = gpu_attention.Tiling(forward_q=32, forward_k=16, backward_k=32, backward_q=16)

CASES = {
    "lengths_and_shared_bias": dict(lengths=True, bias=(1, 4)),
    "causal_and_shared_bias": dict(causal=True, bias=(1, 4)),
    "segments_causal_per_row_bias": dict(segments=True, causal=True, bias=(2, 4)),
    "cross_lengths_no_bias": dict(lengths=True, k_len=32),
    "grouped_kv_heads_causal": dict(causal=True, kv_heads=2),
    "one_head_bias_broadcast": dict(bias=(1, 1), lengths=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_plain_attention_and_its_gradients(case):
  """Outputs on the queries that see a key, and the gradients of q, k, v and the bias (dS
  summed over the batch where the bias is shared), equal XLA's float32 attention's
  (jax.nn.dot_product_attention), over several query and key tiles."""
  c = CASES[case]
  b, q_len, k_len, heads, d = 2, 64, c.get("k_len", 64), 4, 16
  kv_heads = c.get("kv_heads", heads)
  keys = jax.random.split(jax.random.key(0), 5)
  q = jax.random.normal(keys[0], (b, q_len, heads, d))
  k, v = (jax.random.normal(r, (b, k_len, kv_heads, d)) for r in keys[1:3])
  bias = (jax.random.normal(keys[3], c["bias"] + (q_len, k_len)) if "bias" in c else None)
  lengths = jnp.array([k_len, k_len - 21]) if c.get("lengths") else None
  segments = None
  real = np.ones((b, q_len, 1, 1), bool)
  if c.get("segments"):
    seg = np.concatenate([np.ones((b, 30)), 2 * np.ones((b, 25)), np.zeros((b, 9))], 1)
    segments = (jnp.asarray(seg, jnp.int32),) * 2
    real = (seg > 0)[..., None, None]   # padding queries see no key: their output is moot
  causal = c.get("causal", False)

  def objective(fn):
    return lambda *args: jnp.sum(jnp.where(real, jnp.sin(fn(*args)), 0.0))

  kernel = lambda q, k, v, bias=bias: gpu_attention.attention(  # noqa: E731
      q, k, v, bias, lengths, segments, scale=0.3, causal=causal, tiling=TILES)
  plain = lambda q, k, v, bias=bias: jax.nn.dot_product_attention(  # noqa: E731
      q, k, v, bias=bias, mask=None if segments is None else attention.padding_mask(*segments),
      scale=0.3, is_causal=causal, key_value_seq_lengths=lengths, implementation="xla")
  out = jax.jit(kernel)(q, k, v)
  np.testing.assert_allclose(np.where(real, out, 0), np.where(real, plain(q, k, v), 0),
                             atol=2e-5)
  assert np.all(np.asarray(out)[~np.broadcast_to(real, out.shape)] == 0)
  args, argnums = ((q, k, v), (0, 1, 2)) if bias is None else ((q, k, v, bias), (0, 1, 2, 3))
  got = jax.jit(jax.grad(objective(kernel), argnums=argnums))(*args)
  want = jax.jit(jax.grad(objective(plain), argnums=argnums))(*args)
  for name, g, w in zip("q k v bias".split(), got, want):
    assert g.shape == w.shape, name
    assert np.abs(np.asarray(w)).max() > 0, name
    np.testing.assert_allclose(g, w, atol=1e-4, err_msg=name)


def test_agrees_with_jax_attention_in_bfloat16():
  """bf16 inputs (what runs/gpu.gin computes in): the output within bf16 rounding of
  jax.nn.dot_product_attention's, with T5's shared bias and key lengths."""
  b, length, heads, d = 2, 32, 2, 32
  keys = jax.random.split(jax.random.key(3), 4)
  q, k, v = (jax.random.normal(r, (b, length, heads, d), jnp.bfloat16) for r in keys[:3])
  bias = jax.random.normal(keys[3], (1, heads, length, length), jnp.bfloat16)
  lengths = jnp.array([32, 20])
  got = gpu_attention.attention(q, k, v, bias, lengths, scale=1.0)
  want = jax.nn.dot_product_attention(q, k, v, bias=bias, key_value_seq_lengths=lengths,
                                      scale=1.0)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             atol=3e-2)


def test_shapes_that_do_not_tile_are_refused_and_attend_falls_back():
  """Lengths that are not multiples of the blocks get a clear error from the kernel, and
  `attend(implementation="pallas")` sends such calls, attention without a bias, a prefix LM's
  masks and bare dense masks to cuDNN (on a GPU) instead."""
  q = jnp.ones((1, 40, 2, 16))
  assert not gpu_attention.supported(q, q)
  with pytest.raises(ValueError, match="do not tile"):
    gpu_attention.attention(q, q, q, scale=1.0)
  keys = q[:, :32].repeat(2, axis=1)   # 64 keys for 32 queries
  with pytest.raises(ValueError, match="causal only with as many queries as keys"):
    gpu_attention.attention(q[:, :32], keys, keys, scale=1.0, causal=True)
  ok = jnp.ones((1, 64, 2, 16))
  bias = jnp.zeros((1, 2, 64, 64))
  def applies(q, k, mask, bias):
    return attention._pallas_applies(q, k, mask, bias, gpu_attention.Tiling())

  assert applies(ok, ok, attention.Mask(causal=True), bias)
  assert not applies(q, q, attention.Mask(causal=True), bias[..., :40, :40])
  assert not applies(ok[:, :32], ok, attention.Mask(causal=True), bias[..., :32, :])
  assert not applies(ok, ok, attention.Mask(causal=True), None)
  assert not applies(ok, ok, attention.Mask(dense=jnp.ones((1, 1, 64, 64), bool),
                                            prefix=jnp.ones((1, 64), jnp.int32)), bias)
  assert not applies(ok, ok, attention.Mask(dense=jnp.ones((1, 1, 64, 64), bool)), bias)


@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_t5_with_the_kernel_matches_xla_attention(packed):
  """A tiny T5 (relative-position bias shared by each stack, key lengths or segment ids, causal
  decoder) with attention_impl="pallas": XLA attention's loss and parameter gradients,
  the bias embedding's included."""
  cfg = tiny_config(head_dim=16)
  rng = np.random.default_rng(0)
  inputs = rng.integers(3, cfg.vocab_size, (2, 32)).astype(np.int32)
  inputs[1, -9:] = 0
  targets = rng.integers(3, cfg.vocab_size, (2, 16)).astype(np.int32)
  targets[1, -3:] = 0
  batch = {"encoder_input_tokens": inputs, "decoder_target_tokens": targets,
           "decoder_input_tokens": np.concatenate([np.zeros((2, 1), np.int32),
                                                   targets[:, :-1]], 1)}
  if packed:
    batch["encoder_segment_ids"] = np.repeat([[1] * 20 + [2] * 12], 2, 0).astype(np.int32)
    batch["encoder_positions"] = np.repeat([list(range(20)) + list(range(12))], 2, 0)
    batch["decoder_segment_ids"] = np.repeat([[1] * 10 + [2] * 6], 2, 0).astype(np.int32)
    batch["decoder_positions"] = np.repeat([list(range(10)) + list(range(6))], 2, 0)
    batch["encoder_segment_ids"][1, -9:] = 0
    batch["decoder_segment_ids"][1, -3:] = 0
  params = Model(cfg).init(jax.random.key(0))
  results = {}
  for impl in ("xla", "pallas"):
    model = Model(tiny_config(head_dim=16, attention_impl=impl))
    loss = jax.value_and_grad(lambda p, m=model: m.loss(p, batch)[0])
    # The attention with T5's bias is the kernel's, forward and backward: the encoder's and the
    # decoder's self-attention, once each in the scanned stacks' layer bodies (the
    # cross-attention, without a bias, is not).
    calls = str(jax.make_jaxpr(loss)(params)).count("pallas_call")
    assert calls == (0 if impl == "xla" else 2 * 2), calls
    results[impl] = jax.jit(loss)(params)
  np.testing.assert_allclose(results["pallas"][0], results["xla"][0], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4),
               results["pallas"][1], results["xla"][1])
  grads = jax.tree.leaves_with_path(results["pallas"][1])
  bias_grads = [g for path, g in grads if "relpos" in jax.tree_util.keystr(path)]
  assert bias_grads and all(np.abs(np.asarray(g)).max() > 0 for g in bias_grads)


def test_t5_decodes_the_same_with_the_kernel():
  """Greedy decoding of a tiny T5 with attention_impl="pallas" (the encoder's attention through
  the kernel, the decoding steps over the cache through XLA) gives XLA attention's tokens."""
  cfg = tiny_config(head_dim=16)
  params = Model(cfg).init(jax.random.key(1))
  inputs = np.random.default_rng(1).integers(3, cfg.vocab_size, (2, 32)).astype(np.int32)
  inputs[1, -7:] = 0
  tokens = {impl: np.asarray(Model(tiny_config(head_dim=16, attention_impl=impl)).predict_batch(
      params, {"encoder_input_tokens": inputs}, max_decode_len=8, eos_id=-1)["tokens"])
            for impl in ("xla", "pallas")}
  np.testing.assert_array_equal(tokens["pallas"], tokens["xla"])


def test_tiling_from_the_environment():
  """$T5LITE_PALLAS_ATTENTION_TILING sets the tiles and Triton settings (a GPU session varies
  them without editing code); anything but six positive integers is refused by name."""
  assert gpu_attention.tiling_from_env({}) == gpu_attention.Tiling()
  assert gpu_attention.tiling_from_env(
      {gpu_attention.TILING_ENV: "64, 32, 64, 16, 8, 2"}) == gpu_attention.Tiling(64, 32, 64, 16,
                                                                                   8, 2)
  for bad in ("64,32", "64,32,64,16,8,x", "64,32,64,16,8,0"):
    with pytest.raises(ValueError, match="T5LITE_PALLAS_ATTENTION_TILING"):
      gpu_attention.tiling_from_env({gpu_attention.TILING_ENV: bad})
