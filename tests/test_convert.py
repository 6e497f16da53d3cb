"""HF interop: logits parity (fp32, 1e-4) and greedy decodes equal to `generate`, both directions,
for T5 (gated v1.1 untied, plain tied) and LLaMA (GQA), on random tiny configs built here."""

import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import tiny_config  # noqa: E402
from t5lite import convert  # noqa: E402
from t5lite.models.model import Model  # noqa: E402

STEPS = 5


def _hf_t5(gated: bool, tied: bool):
  cfg = transformers.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                              num_decoder_layers=2, num_heads=4,
                              feed_forward_proj="gated-gelu" if gated else "relu",
                              tie_word_embeddings=tied, dropout_rate=0.0, pad_token_id=0,
                              eos_token_id=1, decoder_start_token_id=0)
  torch.manual_seed(0)
  return transformers.T5ForConditionalGeneration(cfg).eval()


def _hf_llama(kv_heads: int, tied: bool):
  cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=kv_heads, head_dim=8, rms_norm_eps=1e-6,
                                 tie_word_embeddings=tied, max_position_embeddings=64)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():  # HF inits small; make the test sensitive to every tensor
    for p in model.parameters():
      p.normal_(0, 0.2)
  return model


def _hf_gpt2(n_inner=None):
  cfg = transformers.GPT2Config(vocab_size=96, n_embd=32, n_head=4, n_layer=2, n_positions=64,
                                n_inner=n_inner, resid_pdrop=0.0, embd_pdrop=0.0,
                                attn_pdrop=0.0, bos_token_id=95, eos_token_id=95)
  torch.manual_seed(0)
  model = transformers.GPT2LMHeadModel(cfg).eval()
  with torch.no_grad():  # biases and LayerNorms start at 0 / 1: make every tensor matter
    for p in model.parameters():
      p.normal_(0, 0.2)
  return model


def _tokens(seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(3, 96, (2, 9)).astype(np.int64)


def _compare_t5(hf, cfg, params):
  enc = _tokens()
  dec = np.concatenate([np.zeros((2, 1), np.int64), _tokens(1)[:, :5]], 1)
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(enc), decoder_input_ids=torch.tensor(dec)).logits.numpy()
  model = Model(cfg)
  ours, _ = model.apply(params, {"encoder_input_tokens": enc.astype(np.int32),
                                 "decoder_input_tokens": dec.astype(np.int32),
                                 "decoder_target_tokens": np.ones_like(dec, np.int32)})
  np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=1e-4)
  with torch.no_grad():
    gen = hf.generate(torch.tensor(enc), max_new_tokens=STEPS, min_new_tokens=STEPS,
                      do_sample=False, num_beams=1, eos_token_id=None)
  got = model.predict_batch(params, {"encoder_input_tokens": enc.astype(np.int32)},
                            max_decode_len=STEPS, eos_id=-1)
  np.testing.assert_array_equal(np.asarray(got["tokens"]), gen.numpy()[:, 1:])


def _compare_llama(hf, cfg, params):
  ids = np.concatenate([np.zeros((2, 1), np.int64), _tokens()], 1)
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(ids)).logits.numpy()
  model = Model(cfg)
  ours, _ = model.apply(params, {"decoder_input_tokens": ids.astype(np.int32),
                                 "decoder_target_tokens": np.ones_like(ids, np.int32)})
  np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=1e-4)
  with torch.no_grad():
    gen = hf.generate(torch.tensor(ids), attention_mask=torch.ones_like(torch.tensor(ids)),
                      max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
                      num_beams=1, eos_token_id=None, pad_token_id=0)
  got = model.predict_batch(params, {"prompt_tokens": ids[:, 1:].astype(np.int32)},
                            max_decode_len=STEPS, eos_id=-1)
  np.testing.assert_array_equal(np.asarray(got["tokens"]), gen.numpy()[:, ids.shape[1]:])


CASES = [("t5", lambda: _hf_t5(True, False), _compare_t5),
         ("t5", lambda: _hf_t5(False, True), _compare_t5),
         ("llama", lambda: _hf_llama(2, False), _compare_llama),
         ("llama", lambda: _hf_llama(4, True), _compare_llama),
         ("gpt2", lambda: _hf_gpt2(), _compare_llama),
         ("gpt2", lambda: _hf_gpt2(48), _compare_llama)]


@pytest.mark.parametrize("family,make,compare", CASES,
                         ids=["t5-gated-untied", "t5-relu-tied", "llama-gqa", "llama-tied",
                              "gpt2", "gpt2-n_inner"])
def test_hf_to_t5lite_parity(tmp_path, family, make, compare):
  hf = make()
  hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
  (tmp_path / "hf" / "spiece.model").write_bytes(b"tokenizer bytes")
  assert convert.main(["hf-to-t5lite", "--family", family, str(tmp_path / "hf"),
                       str(tmp_path / "ours")]) == 0
  assert (tmp_path / "ours" / "spiece.model").read_bytes() == b"tokenizer bytes"
  cfg, params = convert.load_t5lite(str(tmp_path / "ours"))
  compare(hf, cfg, params)


@pytest.mark.parametrize("family,variant", [
    ("t5", dict(arch="encoder_decoder")),
    ("t5", dict(arch="encoder_decoder", gated_mlp=False, activation="relu", tie_embeddings=True)),
    ("llama", dict(arch="decoder_only", num_kv_heads=2, norm_eps=1e-6)),
    ("gpt2", dict(arch="decoder_only", position_encoding="learned", norm="layer",
                  use_bias=True, gated_mlp=False, activation="gelu", tie_embeddings=True,
                  norm_eps=1e-5, max_length=64))])
def test_t5lite_to_hf_parity(tmp_path, family, variant):
  from t5lite import checkpoints
  cfg = tiny_config(vocab_size=96, **variant)
  params = Model(cfg).init(jax.random.key(3))
  if family == "gpt2":  # biases start at zero: randomize every tensor
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(4), len(leaves))
    params = jax.tree.unflatten(tree, [0.2 * np.asarray(jax.random.normal(k, x.shape))
                                       for k, x in zip(keys, leaves)])
  params = jax.tree.map(lambda x: np.asarray(x) * (0.2 if family == "llama" else 1.0), params)
  ckpt = checkpoints.Checkpointer(str(tmp_path / "ours" / "checkpoints"), async_save=False)
  ckpt.save(7, {"params": params}, {"cursor": 0}, cfg)
  ckpt.close()
  assert convert.main(["t5lite-to-hf", "--family", family, str(tmp_path / "ours"),
                       str(tmp_path / "hf")]) == 0
  hf_cls = {"t5": transformers.T5ForConditionalGeneration,
            "llama": transformers.LlamaForCausalLM,
            "gpt2": transformers.GPT2LMHeadModel}[family]
  hf = hf_cls.from_pretrained(tmp_path / "hf").eval()
  (_compare_t5 if family == "t5" else _compare_llama)(hf, cfg, params)


def test_bad_sources_are_clear_errors(tmp_path):
  hf = _hf_t5(True, False)
  hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
  # A pickled-only directory is refused without --allow_pickle.
  os.makedirs(tmp_path / "pickled")
  (tmp_path / "pickled" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
  torch.save(hf.state_dict(), tmp_path / "pickled" / "pytorch_model.bin")
  with pytest.raises(convert.ConversionError, match="allow_pickle"):
    convert.hf_to_t5lite("t5", str(tmp_path / "pickled"), str(tmp_path / "x"))
  assert not os.path.exists(tmp_path / "x")
  # Wrong family and unknown architecture.
  with pytest.raises(convert.ConversionError, match="not llama"):
    convert.hf_to_t5lite("llama", str(tmp_path / "hf"), str(tmp_path / "x"))
  # A missing tensor.
  from safetensors.numpy import load_file, save_file
  tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
  tensors.pop("decoder.block.1.layer.2.DenseReluDense.wo.weight")
  save_file(tensors, str(tmp_path / "hf" / "model.safetensors"))
  assert convert.main(["hf-to-t5lite", "--family", "t5", str(tmp_path / "hf"),
                       str(tmp_path / "y")]) == 2
  assert not os.path.exists(tmp_path / "y") and not os.path.exists(tmp_path / "y.partial")
  # A mismatched tensor shape.
  cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
  cfg["d_ff"] = 48
  (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(convert.ConversionError):
    convert.hf_to_t5lite("t5", str(tmp_path / "hf"), str(tmp_path / "z"))
