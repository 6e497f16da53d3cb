"""KV-cache decoding equals full recomputation; sampling is reproducible; beam 1 is greedy; sharded
decoding on 8 devices gives the tokens of one."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_cli, tiny_config
from t5lite import decoding, gpu_aot
from t5lite.kernels import cpu_attention
from t5lite.models.model import Model

ARCHS = [dict(arch="encoder_decoder"), dict(arch="encoder_decoder", position_encoding="rope"),
         dict(arch="decoder_only", num_kv_heads=2), dict(arch="decoder_only", position_encoding="alibi"),
         dict(arch="prefix_lm", position_encoding="relative", scale_attention=False),
         dict(arch="prefix_lm", num_kv_heads=1),
         dict(arch="decoder_only", position_encoding="learned", norm="layer", use_bias=True, gated_mlp=False, activation="gelu", tie_embeddings=True)]
STEPS = 6


def _ids(v):
  return "-".join(f"{k}={val}" for k, val in v.items())


def _inputs(cfg):
  rng = np.random.default_rng(0)
  prompts = rng.integers(3, cfg.vocab_size, (3, 7)).astype(np.int32)
  prompts[0, 4:] = 0  # rows of different lengths
  prompts[2, 2:] = 0
  key = "encoder_input_tokens" if cfg.arch == "encoder_decoder" else "prompt_tokens"
  return {key: prompts}


def _greedy_by_recompute(model, params, batch):
  """Greedy tokens by a full forward pass per step, no cache: each sequence sits zero-padded in
  a fixed-length row (one compiled program), and the next token is the argmax at its last
  position; causal attention keeps the padding after it out of every earlier position."""
  cfg = model.cfg
  apply = jax.jit(lambda feats: model.apply(params, feats)[0])
  if cfg.arch == "encoder_decoder":
    enc = batch["encoder_input_tokens"]
    dec = np.zeros((enc.shape[0], STEPS + 1), np.int32)
    for i in range(STEPS):
      targets = (np.arange(STEPS + 1) <= i).astype(np.int32)[None].repeat(enc.shape[0], 0)
      logits = apply({"encoder_input_tokens": enc, "decoder_input_tokens": dec,
                      "decoder_target_tokens": targets})
      dec[:, i + 1] = np.asarray(jnp.argmax(logits[:, i], -1))
    return dec[:, 1:]
  out, width = [], batch["prompt_tokens"].shape[1] + 1 + STEPS
  for row in batch["prompt_tokens"]:
    prompt = [0] + [int(t) for t in row if t != 0]
    seq = list(prompt)
    for _ in range(STEPS):
      n = len(seq)
      feats = {"decoder_input_tokens": np.asarray([seq + [0] * (width - n)], np.int32),
               "decoder_target_tokens": (np.arange(width) < n).astype(np.int32)[None]}
      if cfg.arch == "prefix_lm":
        feats["decoder_causal_attention"] = (np.arange(width) < len(prompt)).astype(np.int32)[None]
      seq.append(int(jnp.argmax(apply(feats)[0, n - 1])))
    out.append(seq[len(prompt):])
  return np.asarray(out, np.int32)


@pytest.mark.parametrize("variant", ARCHS, ids=_ids)
def test_cached_greedy_equals_recompute(variant):
  cfg = tiny_config(**variant)
  model = Model(cfg)
  params = model.init(jax.random.key(1))
  batch = _inputs(cfg)
  cached = model.predict_batch(params, batch, max_decode_len=STEPS, eos_id=-1)
  np.testing.assert_array_equal(np.asarray(cached["tokens"]),
                                _greedy_by_recompute(model, params, batch))


@pytest.mark.parametrize("variant", [dict(arch="decoder_only", num_kv_heads=2),
                                     dict(arch="prefix_lm", position_encoding="relative"),
                                     dict(arch="encoder_decoder")],
                         ids=_ids)
def test_prompt_fill_runs_in_the_cpu_kernel(variant):
  """A decoder's prompt fill reaches the CPU kernel (left padding as segment 0, a prefix LM's
  prompt as its prefix), every token step the cache kernel (self-attention over the cache, with
  T5's relative bias; cross-attention over the encoder's keys), and they decode the tokens of
  'chunked' attention over the dense mask, greedy and by beam search."""
  if not cpu_attention.available():
    pytest.skip("no CPU attention kernel here")
  tokens = {}
  for impl in ("chunked", "cpu_kernel"):
    cfg = tiny_config(head_dim=16, attention_impl=impl, **variant)
    model = Model(cfg)
    params = model.init(jax.random.key(1))
    batch = _inputs(cfg)
    decode = jax.jit(lambda p, b, m=model: m.predict_batch(p, b, max_decode_len=STEPS,
                                                           eos_id=-1)["tokens"])
    text = decode.lower(params, batch).as_text()
    assert ("t5lite_cpu_attention_forward" in text) == (impl == "cpu_kernel")
    assert ("t5lite_cpu_cache_attention" in text) == (impl == "cpu_kernel")
    tokens[impl] = np.asarray(decode(params, batch))
    tokens[impl + "-beam"] = np.asarray(model.predict_batch(
        params, batch, max_decode_len=STEPS, method="beam", beam_size=3, eos_id=-1)["tokens"])
  np.testing.assert_array_equal(tokens["cpu_kernel"], tokens["chunked"])
  np.testing.assert_array_equal(tokens["cpu_kernel-beam"], tokens["chunked-beam"])
  np.testing.assert_array_equal(tokens["cpu_kernel"],
                                _greedy_by_recompute(model, params, batch))


@pytest.mark.parametrize("variant", [ARCHS[0], ARCHS[2], ARCHS[4]], ids=_ids)
def test_unrolled_parameters_compute_what_stacked_ones_do(variant):
  """`Model.unroll`: every layer's arrays on their own ({0: layer 0, 1: ...} where the stack
  was), the same values; the forward pass, scoring, greedy and beam decoding give the stacked
  parameters' results, and unrolling twice changes nothing."""
  from t5lite.models import transformer
  cfg = tiny_config(**variant)
  model = Model(cfg)
  params = model.init(jax.random.key(1))
  unrolled = model.unroll(params)
  assert transformer.is_unrolled(unrolled) and not transformer.is_unrolled(params)
  assert model.unroll(unrolled) is unrolled
  depths = {"encoder": cfg.num_encoder_layers, "decoder": cfg.num_decoder_layers}
  assert len(jax.tree.leaves(unrolled)) == len(jax.tree.leaves(params)) + sum(
      (depth - 1) * len(jax.tree.leaves(params[name]["blocks"]))
      for name, depth in depths.items() if name in params)
  for i in range(cfg.num_decoder_layers):
    for a, b in zip(jax.tree.leaves(unrolled["decoder"]["blocks"][i]),
                    jax.tree.leaves(params["decoder"]["blocks"])):
      np.testing.assert_array_equal(a, b[i])
  batch = _inputs(cfg)
  for method in ("greedy", "beam"):
    want, got = (model.predict_batch(p, batch, max_decode_len=STEPS, method=method,
                                     beam_size=3, eos_id=-1) for p in (params, unrolled))
    np.testing.assert_array_equal(np.asarray(got["tokens"]), np.asarray(want["tokens"]))
    np.testing.assert_allclose(got["scores"], want["scores"], rtol=1e-5, atol=1e-5)
  targets = np.asarray(_greedy_by_recompute(model, params, batch))
  if cfg.arch == "encoder_decoder":
    feats = dict(batch, decoder_target_tokens=targets, decoder_input_tokens=np.concatenate(
        [np.zeros((targets.shape[0], 1), np.int32), targets[:, :-1]], axis=1))
  else:
    feats = {"decoder_input_tokens": targets, "decoder_target_tokens": targets}
  np.testing.assert_allclose(model.score_batch(unrolled, feats), model.score_batch(params, feats),
                             rtol=1e-5, atol=1e-5)


def test_decoding_unrolled_parameters_copies_no_layer_weights():
  """A decoding call compiled for stacked parameters copies every layer's weights out of the
  stacks (XLA gives a slice a buffer of its own): temporaries of at least the layers' bytes.
  For `Model.unroll`'s, none: its temporaries are the cache and activations, under a tenth of
  them. (`gated_projection="split"`: the stacked one copies the MLP's input kernels into one for
  the prompt's pass, as it does in training.)"""
  cfg = tiny_config(arch="decoder_only", d_model=256, d_ff=1024, num_heads=4, head_dim=64,
                    num_decoder_layers=4, vocab_size=512, gated_projection="split")
  model = Model(cfg)
  params = jax.eval_shape(model.init, jax.random.key(0))
  layer_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params["decoder"]))
  feed = {"prompt_tokens": jax.ShapeDtypeStruct((1, 16), jnp.int32)}
  temps = {}
  for form, p in (("stacked", params), ("unrolled", jax.eval_shape(model.unroll, params))):
    decode = jax.jit(lambda p, f: model.predict_batch(p, f, max_decode_len=8, eos_id=-1))
    temps[form] = decode.lower(p, feed).compile().memory_analysis().temp_size_in_bytes
  assert temps["stacked"] >= layer_bytes, (temps, layer_bytes)
  assert temps["unrolled"] < 0.1 * layer_bytes, (temps, layer_bytes)


@pytest.mark.parametrize("arch", ["encoder_decoder", "decoder_only"])
def test_beam_one_is_greedy_and_sampling_is_reproducible(arch):
  cfg = tiny_config(arch=arch)
  model = Model(cfg)
  params = model.init(jax.random.key(2))
  batch = _inputs(cfg)
  greedy = model.predict_batch(params, batch, max_decode_len=STEPS, eos_id=-1)
  beam1 = model.predict_batch(params, batch, max_decode_len=STEPS, method="beam", beam_size=1,
                              eos_id=-1)
  np.testing.assert_array_equal(greedy["tokens"], beam1["tokens"])
  np.testing.assert_allclose(greedy["scores"], beam1["scores"], rtol=1e-5)
  beam4 = model.predict_batch(params, batch, max_decode_len=STEPS, method="beam", beam_size=4,
                              eos_id=-1)
  assert beam4["tokens"].shape == greedy["tokens"].shape
  kw = dict(max_decode_len=STEPS, method="sample", temperature=1.5, top_k=20, top_p=0.9)
  a = model.predict_batch(params, batch, rng=jax.random.key(7), **kw)
  b = model.predict_batch(params, batch, rng=jax.random.key(7), **kw)
  c = model.predict_batch(params, batch, rng=jax.random.key(8), **kw)
  np.testing.assert_array_equal(a["tokens"], b["tokens"])
  assert not np.array_equal(a["tokens"], c["tokens"])


@pytest.mark.parametrize("arch", ["encoder_decoder", "decoder_only"])
def test_one_row_decoded_as_two_gives_the_one_rows_tokens(arch):
  """On GPUs one row decodes as two identical rows (`decoding.doubles_single_rows`); run here
  on CPU, the doubled loop gives the single row's tokens and scores, greedy and sampled with
  the same random numbers."""
  cfg = tiny_config(arch=arch)
  model = Model(cfg)
  params = model.init(jax.random.key(2))
  row = {k: v[:1] for k, v in _inputs(cfg).items()}
  for method, eos in (("greedy", -1), ("sample", 5)):
    kw = dict(max_decode_len=STEPS, method=method, temperature=1.5, top_k=20, top_p=0.9,
              eos_id=eos)
    one, two = (decoding._sample_loop(  # pylint: disable=protected-access
        model, params, row, jax.random.key(7), double=double, **kw) for double in (False, True))
    assert two["tokens"].shape == (1, STEPS)
    np.testing.assert_array_equal(one["tokens"], two["tokens"])
    np.testing.assert_allclose(one["scores"], two["scores"], rtol=1e-5)
  # Only one row, only on a GPU (or traced for one), and not for beam search.
  assert not decoding.doubles_single_rows(1, "greedy") and jax.default_backend() == "cpu"
  with gpu_aot.tracing_for("h100"):
    assert decoding.doubles_single_rows(1, "sample")
    assert not decoding.doubles_single_rows(2, "greedy")
    assert not decoding.doubles_single_rows(1, "beam")
  assert gpu_aot.tracing_platform() == "cpu"


def test_eos_stops_rows_and_pads():
  cfg = tiny_config()
  model = Model(cfg)
  params = model.init(jax.random.key(1))
  batch = _inputs(cfg)
  free = np.asarray(model.predict_batch(params, batch, max_decode_len=STEPS, eos_id=-1)["tokens"])
  eos = int(free[0, 1])  # make the second token of row 0 the EOS
  out = np.asarray(model.predict_batch(params, batch, max_decode_len=STEPS, eos_id=eos)["tokens"])
  j = int(np.argmax(free[0] == eos))  # the first time row 0 emits that token
  np.testing.assert_array_equal(out[0, :j + 1], free[0, :j + 1])
  assert np.all(out[0, j + 1:] == 0)


def test_first_max_is_argmax_with_ties():
  logits = np.random.default_rng(0).integers(0, 5, (64, 300)).astype(np.float32)  # many ties
  logits[3] = -np.inf
  logits[4, 7] = np.inf
  np.testing.assert_array_equal(jax.jit(decoding.first_max)(jnp.asarray(logits)),
                                np.argmax(logits, axis=-1))


def test_filter_logits():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  kept = decoding.filter_logits(logits, top_k=2) > decoding.NEG_INF / 2
  np.testing.assert_array_equal(kept, [[True, True, False, False]])
  kept = decoding.filter_logits(logits, top_p=0.7) > decoding.NEG_INF / 2
  np.testing.assert_array_equal(kept, [[True, True, False, False]])
  kept = decoding.filter_logits(logits, top_p=0.85) > decoding.NEG_INF / 2
  np.testing.assert_array_equal(kept, [[True, True, True, False]])


def test_bad_requests_are_clear_errors():
  cfg = tiny_config(arch="decoder_only", max_length=16)
  model = Model(cfg)
  params = model.init(jax.random.key(0))
  with pytest.raises(ValueError, match="max_length"):
    model.predict_batch(params, {"prompt_tokens": np.ones((1, 12), np.int32)}, max_decode_len=8)
  with pytest.raises(ValueError, match="prompt_tokens"):
    model.predict_batch(params, {"encoder_input_tokens": np.ones((1, 4), np.int32)})
  with pytest.raises(ValueError, match="method"):
    model.predict_batch(params, {"prompt_tokens": np.ones((1, 4), np.int32)}, method="nucleus")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["encoder_decoder", "decoder_only"])
def test_sharded_decoding_matches_single_device_on_8_devices(arch):
  """Greedy and beam decoding with parameters sharded (FSDP+tensor, and tensor with data
  parallel batches) on 8 fake CPU devices: the tokens of one device, scores to float rounding,
  with the parameters really split and the tensor-parallel all-reduces in the compiled loop;
  unrolled (`Model.unroll`), as split and with the same tokens."""
  r = run_cli(["tests/decoding_check.py", arch, "fsdp_tensor,tensor_parallel"])
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert out["devices"] == 8
  for name, res in out["presets"].items():
    for method in ("greedy", "beam"):
      assert res[method]["tokens_equal"], (name, method)
      assert res[method]["max_score_err"] < 1e-4, (name, method, res[method])
    assert res["param_bytes_per_device"] < 0.5 * res["param_bytes_total"], name
    assert res["collectives"]["all-reduce"] > 0, name
    assert res["unrolled"]["tokens_equal"], name
    assert res["unrolled"]["max_score_err"] < 1e-4, (name, res["unrolled"])
    assert res["unrolled"]["param_bytes_per_device"] == res["param_bytes_per_device"], name


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_cache_slots_are_written_in_place(dtype):
  """`layers.write_slots` writes a decoding step's keys into the cache as
  dynamic_update_slice does, bit for bit, and XLA:CPU's program for it never widens a bf16
  cache to float32 (that rewrote the whole cache every token step)."""
  from t5lite.models import layers
  cache = jax.random.normal(jax.random.key(0), (3, 2, 50, 16)).astype(dtype)
  new = jax.random.normal(jax.random.key(1), (3, 2, 1, 16))           # float32, cast to the cache's
  write = jax.jit(layers.write_slots, donate_argnums=0)
  want = jax.lax.dynamic_update_slice(cache, new.astype(dtype), (0, 0, 7, 0))
  hlo = write.lower(cache, new, 7).compile().as_text()
  assert ("f32[3,2,50,16]" in hlo) == (dtype == "float32")
  got = write(cache, new, 7)
  assert got.dtype == jnp.dtype(dtype)
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
