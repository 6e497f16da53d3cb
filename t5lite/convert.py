"""Hugging Face checkpoint interop (safetensors only): T5 / mT5 / ChatYuan and LLaMA, both ways.

    python -m t5lite.convert hf-to-t5lite --family t5 SRC_DIR DEST_DIR
    python -m t5lite.convert t5lite-to-hf --family llama SRC_DIR DEST_DIR
    (families: t5 = T5 v1.1 / mT5 / ChatYuan, llama, gpt2)

`SRC_DIR` of hf-to-t5lite is a HF model directory (config.json + *.safetensors); the result is a
t5lite checkpoint directory (orbax, step 0) whose stored model config lets `infer`/`chat` run
without gin. Tokenizer files are copied across. Pickled `.bin` weights are refused unless
`--allow_pickle` is given (unpickling runs arbitrary code).

The maps are name tables: HF tensor name pattern -> (t5lite path, transform). Layer tensors are
stacked along the leading `layers` axis of t5lite's scanned stacks.
"""

import argparse
import glob
import json
import os
import shutil
import sys
from typing import Dict, Tuple

import numpy as np

from t5lite.models.config import ModelConfig

FAMILIES = ("t5", "llama", "gpt2")
TOKENIZER_FILES = ("spiece.model", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "vocab.model", "vocab.json", "merges.txt")


class ConversionError(ValueError):
  """A checkpoint cannot be converted (missing / mismatched tensor, unknown architecture)."""


# ---------------------------------------------------------------------------------------------
# Config maps.

def config_from_hf(family: str, hf: Dict) -> ModelConfig:
  """ModelConfig equivalent to a HF config.json dict."""
  if family == "t5":
    act = hf.get("feed_forward_proj", "relu")
    gated = act.startswith("gated-")
    activation = act.replace("gated-", "")
    activation = {"gelu_new": "gelu", "gelu": "gelu", "relu": "relu", "silu": "silu"}.get(
        activation)
    if activation is None:
      raise ConversionError(f"unsupported T5 feed_forward_proj {act!r}")
    return ModelConfig(
        arch="encoder_decoder", vocab_size=hf["vocab_size"], d_model=hf["d_model"],
        num_heads=hf["num_heads"], head_dim=hf["d_kv"], d_ff=hf["d_ff"],
        num_encoder_layers=hf["num_layers"],
        num_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
        activation=activation, gated_mlp=gated, position_encoding="relative",
        relative_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_max_distance=hf.get("relative_attention_max_distance", 128),
        # transformers 5 always ties T5's head to `shared` unless the file holds a different
        # lm_head, and rescales by d_model^-0.5 only when `scale_decoder_outputs` (older
        # configs: tie_word_embeddings) says so. t5lite's tied head always rescales, so "tied"
        # here means "rescaled"; an unscaled head is stored untied (a copy when HF tied it).
        scale_attention=False,
        tie_embeddings=bool(hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True))),
        norm_eps=hf.get("layer_norm_epsilon", 1e-6), dtype="float32",
        pad_id=hf.get("pad_token_id", 0) or 0, eos_id=hf.get("eos_token_id", 1) or 1,
        decoder_start_id=hf.get("decoder_start_token_id", 0) or 0)
  if family == "llama":
    if hf.get("hidden_act", "silu") != "silu":
      raise ConversionError(f"unsupported LLaMA hidden_act {hf.get('hidden_act')!r}")
    heads = hf["num_attention_heads"]
    return ModelConfig(
        arch="decoder_only", vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, d_ff=hf["intermediate_size"],
        num_encoder_layers=0, num_decoder_layers=hf["num_hidden_layers"], activation="silu",
        gated_mlp=True, position_encoding="rope", rope_theta=float(hf.get("rope_theta", 10000.0)),
        scale_attention=True, tie_embeddings=hf.get("tie_word_embeddings", False),
        norm_eps=hf.get("rms_norm_eps", 1e-6), dtype="float32",
        max_length=hf.get("max_position_embeddings", 2048))
  if family == "gpt2":
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
      raise ConversionError(f"unsupported GPT-2 activation_function {act!r} (t5lite's gelu is "
                            f"the tanh approximation)")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
      if hf.get(flag):
        raise ConversionError(f"unsupported GPT-2 option {flag}=True")
    if not hf.get("scale_attn_weights", True):
      raise ConversionError("unsupported GPT-2 option scale_attn_weights=False")
    d, heads = hf["n_embd"], hf["n_head"]
    return ModelConfig(
        arch="decoder_only", vocab_size=hf["vocab_size"], d_model=d, num_heads=heads,
        head_dim=d // heads, d_ff=hf.get("n_inner") or 4 * d, num_encoder_layers=0,
        num_decoder_layers=hf["n_layer"], activation="gelu", gated_mlp=False,
        position_encoding="learned", scale_attention=True,
        tie_embeddings=hf.get("tie_word_embeddings", True), norm="layer",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), use_bias=True, dtype="float32",
        max_length=hf.get("n_positions", 1024), eos_id=hf.get("eos_token_id", 50256))
  raise ConversionError(f"unknown family {family!r}; choose from {FAMILIES}")


def config_to_hf(family: str, cfg: ModelConfig) -> Dict:
  """HF config.json dict for a t5lite ModelConfig."""
  if family == "t5":
    if cfg.arch != "encoder_decoder" or cfg.position_encoding != "relative":
      raise ConversionError("the t5 family needs an encoder-decoder with relative positions")
    return {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5",
            "vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "d_kv": cfg.head_dim,
            "d_ff": cfg.d_ff, "num_layers": cfg.num_encoder_layers,
            "num_decoder_layers": cfg.num_decoder_layers, "num_heads": cfg.num_heads,
            "relative_attention_num_buckets": cfg.relative_buckets,
            "relative_attention_max_distance": cfg.relative_max_distance,
            "dropout_rate": cfg.dropout_rate, "layer_norm_epsilon": cfg.norm_eps,
            "feed_forward_proj": ("gated-" if cfg.gated_mlp else "") + (
                "gelu_new" if cfg.activation == "gelu" else cfg.activation),
            "tie_word_embeddings": cfg.tie_embeddings,
            "scale_decoder_outputs": cfg.tie_embeddings, "pad_token_id": cfg.pad_id,
            "eos_token_id": cfg.eos_id, "decoder_start_token_id": cfg.decoder_start_id,
            "is_encoder_decoder": True}
  if family == "llama":
    if cfg.arch != "decoder_only" or cfg.position_encoding != "rope" or not cfg.gated_mlp:
      raise ConversionError("the llama family needs a decoder-only model with RoPE and SwiGLU")
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
            "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.num_decoder_layers,
            "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.kv_heads,
            "head_dim": cfg.head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta, "max_position_embeddings": cfg.max_length,
            "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False,
            "mlp_bias": False}
  if family == "gpt2":
    if (cfg.arch != "decoder_only" or cfg.position_encoding != "learned" or cfg.gated_mlp
        or cfg.norm != "layer" or not cfg.use_bias or cfg.activation != "gelu"
        or not cfg.tie_embeddings or cfg.kv_heads != cfg.num_heads
        or cfg.head_dim * cfg.num_heads != cfg.d_model):
      raise ConversionError("the gpt2 family needs a decoder-only model with learned positions, "
                            "LayerNorm, biases, plain gelu MLP, tied head, heads*head_dim=d_model")
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": cfg.vocab_size, "n_embd": cfg.d_model, "n_head": cfg.num_heads,
            "n_layer": cfg.num_decoder_layers, "n_inner": cfg.d_ff,
            "n_positions": cfg.max_length, "activation_function": "gelu_new",
            "layer_norm_epsilon": cfg.norm_eps, "tie_word_embeddings": True,
            "scale_attn_weights": True, "bos_token_id": cfg.eos_id, "eos_token_id": cfg.eos_id,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
  raise ConversionError(f"unknown family {family!r}; choose from {FAMILIES}")


# ---------------------------------------------------------------------------------------------
# Tensor maps: (hf name with {i} for the layer, t5lite path, kind). Kinds say how a torch
# Linear weight [out, in] maps onto t5lite's einsum layout.

def _attention(prefix_hf: str, prefix_ours: str):
  return [(f"{prefix_hf}.q.weight", f"{prefix_ours}.query", "q"),
          (f"{prefix_hf}.k.weight", f"{prefix_ours}.key", "kv"),
          (f"{prefix_hf}.v.weight", f"{prefix_ours}.value", "kv"),
          (f"{prefix_hf}.o.weight", f"{prefix_ours}.out", "o")]


def _t5_mlp(prefix_hf, prefix_ours, gated):
  if gated:
    return [(f"{prefix_hf}.wi_0.weight", f"{prefix_ours}.wi_0", "linear"),
            (f"{prefix_hf}.wi_1.weight", f"{prefix_ours}.wi_1", "linear"),
            (f"{prefix_hf}.wo.weight", f"{prefix_ours}.wo", "linear")]
  return [(f"{prefix_hf}.wi.weight", f"{prefix_ours}.wi_0", "linear"),
          (f"{prefix_hf}.wo.weight", f"{prefix_ours}.wo", "linear")]


def tensor_map(family: str, cfg: ModelConfig):
  """(global entries, per-layer entries by stack) for a family."""
  if family == "t5":
    glob_ = [("shared.weight", "token_embed.embedding", "copy"),
             ("encoder.final_layer_norm.weight", "encoder_norm.scale", "copy"),
             ("decoder.final_layer_norm.weight", "decoder_norm.scale", "copy"),
             ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
              "encoder_relpos.embedding", "copy"),
             ("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
              "decoder_relpos.embedding", "copy")]
    if not cfg.tie_embeddings:
      glob_.append(("lm_head.weight", "head.kernel", "copy"))
    enc = ([("encoder.block.{i}.layer.0.layer_norm.weight",
             "encoder.blocks.pre_attention_norm.scale", "copy"),
            ("encoder.block.{i}.layer.1.layer_norm.weight", "encoder.blocks.pre_mlp_norm.scale",
             "copy")]
           + _attention("encoder.block.{i}.layer.0.SelfAttention", "encoder.blocks.attention")
           + _t5_mlp("encoder.block.{i}.layer.1.DenseReluDense", "encoder.blocks.mlp",
                     cfg.gated_mlp))
    dec = ([("decoder.block.{i}.layer.0.layer_norm.weight",
             "decoder.blocks.pre_self_attention_norm.scale", "copy"),
            ("decoder.block.{i}.layer.1.layer_norm.weight",
             "decoder.blocks.pre_cross_attention_norm.scale", "copy"),
            ("decoder.block.{i}.layer.2.layer_norm.weight", "decoder.blocks.pre_mlp_norm.scale",
             "copy")]
           + _attention("decoder.block.{i}.layer.0.SelfAttention",
                        "decoder.blocks.self_attention")
           + _attention("decoder.block.{i}.layer.1.EncDecAttention",
                        "decoder.blocks.cross_attention")
           + _t5_mlp("decoder.block.{i}.layer.2.DenseReluDense", "decoder.blocks.mlp",
                     cfg.gated_mlp))
    return glob_, {"encoder": (cfg.num_encoder_layers, enc),
                   "decoder": (cfg.num_decoder_layers, dec)}
  if family == "llama":
    glob_ = [("model.embed_tokens.weight", "token_embed.embedding", "copy"),
             ("model.norm.weight", "decoder_norm.scale", "copy")]
    if not cfg.tie_embeddings:
      glob_.append(("lm_head.weight", "head.kernel", "copy"))
    p = "model.layers.{i}"
    dec = [(f"{p}.input_layernorm.weight", "decoder.blocks.pre_self_attention_norm.scale", "copy"),
           (f"{p}.post_attention_layernorm.weight", "decoder.blocks.pre_mlp_norm.scale", "copy"),
           (f"{p}.self_attn.q_proj.weight", "decoder.blocks.self_attention.query", "q"),
           (f"{p}.self_attn.k_proj.weight", "decoder.blocks.self_attention.key", "kv"),
           (f"{p}.self_attn.v_proj.weight", "decoder.blocks.self_attention.value", "kv"),
           (f"{p}.self_attn.o_proj.weight", "decoder.blocks.self_attention.out", "o"),
           (f"{p}.mlp.gate_proj.weight", "decoder.blocks.mlp.wi_0", "linear"),
           (f"{p}.mlp.up_proj.weight", "decoder.blocks.mlp.wi_1", "linear"),
           (f"{p}.mlp.down_proj.weight", "decoder.blocks.mlp.wo", "linear")]
    return glob_, {"decoder": (cfg.num_decoder_layers, dec)}
  if family == "gpt2":
    glob_ = [("transformer.wte.weight", "token_embed.embedding", "copy"),
             ("transformer.wpe.weight", "position_embed", "copy"),
             ("transformer.ln_f.weight", "decoder_norm.scale", "copy"),
             ("transformer.ln_f.bias", "decoder_norm.bias", "copy")]
    p, o = "transformer.h.{i}", "decoder.blocks"
    dec = [(f"{p}.ln_1.weight", f"{o}.pre_self_attention_norm.scale", "copy"),
           (f"{p}.ln_1.bias", f"{o}.pre_self_attention_norm.bias", "copy"),
           (f"{p}.ln_2.weight", f"{o}.pre_mlp_norm.scale", "copy"),
           (f"{p}.ln_2.bias", f"{o}.pre_mlp_norm.bias", "copy")]
    # c_attn fuses q, k, v along its output axis; Conv1D weights are already [in, out].
    for part, name in enumerate(("query", "key", "value")):
      dec += [(f"{p}.attn.c_attn.weight", f"{o}.self_attention.{name}", f"fused_w{part}"),
              (f"{p}.attn.c_attn.bias", f"{o}.self_attention.{name}_bias", f"fused_b{part}")]
    dec += [(f"{p}.attn.c_proj.weight", f"{o}.self_attention.out", "conv_o"),
            (f"{p}.attn.c_proj.bias", f"{o}.self_attention.out_bias", "copy"),
            (f"{p}.mlp.c_fc.weight", f"{o}.mlp.wi_0", "copy"),
            (f"{p}.mlp.c_fc.bias", f"{o}.mlp.wi_0_bias", "copy"),
            (f"{p}.mlp.c_proj.weight", f"{o}.mlp.wo", "copy"),
            (f"{p}.mlp.c_proj.bias", f"{o}.mlp.wo_bias", "copy")]
    return glob_, {"decoder": (cfg.num_decoder_layers, dec)}
  raise ConversionError(f"unknown family {family!r}; choose from {FAMILIES}")


def _to_ours(w: np.ndarray, kind: str, cfg: ModelConfig, heads: int) -> np.ndarray:
  if kind == "copy":
    return w
  if kind.startswith("fused_"):  # a third of GPT-2's c_attn: [d, 3d] or [3d]
    part = int(kind[-1])
    w = np.split(w, 3, axis=-1)[part]
    return w.reshape(cfg.num_heads, cfg.head_dim) if kind[6] == "b" else w.reshape(
        cfg.d_model, cfg.num_heads, cfg.head_dim)
  if kind == "conv_o":           # Conv1D [heads*dh, d] -> [heads, dh, d]
    return w.reshape(cfg.num_heads, cfg.head_dim, cfg.d_model)
  if kind == "linear":           # [out, in] -> [in, out]
    return w.T
  if kind in ("q", "kv"):        # [heads*dh, d] -> [d, heads, dh]
    return w.T.reshape(cfg.d_model, heads, cfg.head_dim)
  if kind == "o":                # [d, heads*dh] -> [heads, dh, d]
    return w.T.reshape(cfg.num_heads, cfg.head_dim, cfg.d_model)
  raise ValueError(kind)


def _to_hf(w: np.ndarray, kind: str) -> np.ndarray:
  if kind == "copy":
    return w
  if kind.startswith("fused_"):  # one third; params_to_hf concatenates the three
    return w.reshape(-1) if kind[6] == "b" else w.reshape(w.shape[0], -1)
  if kind == "conv_o":
    return w.reshape(-1, w.shape[-1])
  if kind == "linear":
    return w.T
  if kind in ("q", "kv"):
    return w.reshape(w.shape[0], -1).T
  if kind == "o":
    return w.reshape(-1, w.shape[-1]).T
  raise ValueError(kind)


def _set(tree: Dict, path: str, value):
  keys = path.split(".")
  for k in keys[:-1]:
    tree = tree.setdefault(k, {})
  tree[keys[-1]] = value


def _get(tree: Dict, path: str):
  for k in path.split("."):
    tree = tree[k]
  return tree


def params_from_hf(family: str, cfg: ModelConfig, tensors: Dict[str, np.ndarray]) -> Dict:
  """t5lite parameter dict from HF tensors; every expected tensor must be present and shaped
  as the config says."""
  from t5lite.models.model import Model  # pylint: disable=import-outside-toplevel
  expected = Model(cfg).abstract_params
  glob_, stacks = tensor_map(family, cfg)
  if family == "gpt2" and "wte.weight" in tensors:  # GPT2Model files lack the prefix
    tensors = {f"transformer.{k}": v for k, v in tensors.items()}
  if family == "t5":
    tensors = dict(tensors)
    for alias in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
      if "shared.weight" not in tensors and alias in tensors:
        tensors["shared.weight"] = tensors[alias]
    if "shared.weight" in tensors and "lm_head.weight" in tensors and cfg.tie_embeddings and (
        not np.array_equal(tensors["lm_head.weight"], tensors["shared.weight"])):
      raise ConversionError("the checkpoint rescales decoder outputs (a tied T5 head) but holds "
                            "an lm_head that differs from the shared embedding")
    if not cfg.tie_embeddings and "lm_head.weight" not in tensors and "shared.weight" in tensors:
      tensors["lm_head.weight"] = tensors["shared.weight"]
  out: Dict = {}

  def take(name):
    if name not in tensors:
      raise ConversionError(f"missing tensor {name!r} in the source checkpoint")
    return np.asarray(tensors[name], np.float32)

  def heads_for(path):
    return cfg.num_heads if path.endswith("query") else cfg.kv_heads

  for hf_name, path, kind in glob_:
    _set(out, path, _to_ours(take(hf_name), kind, cfg, heads_for(path)))
  for _, (n, entries) in stacks.items():
    for hf_name, path, kind in entries:
      layers = []
      for i in range(n):
        w = take(hf_name.format(i=i))
        try:
          layers.append(_to_ours(w, kind, cfg, heads_for(path)))
        except ValueError as e:
          raise ConversionError(f"tensor {hf_name.format(i=i)} has shape {w.shape}, which does "
                                f"not fit the config ({e})") from e
      _set(out, path, np.stack(layers))
  _check_shapes(out, expected)
  return out


def _check_shapes(got: Dict, expected: Dict, prefix: str = ""):
  for k, v in expected.items():
    if k not in got:
      raise ConversionError(f"parameter {prefix}{k} was not produced by the conversion")
    if isinstance(v, dict):
      _check_shapes(got[k], v, f"{prefix}{k}.")
    elif tuple(got[k].shape) != tuple(v.shape):
      raise ConversionError(f"parameter {prefix}{k}: converted shape {got[k].shape}, model "
                            f"expects {v.shape}")


def params_to_hf(family: str, cfg: ModelConfig, params: Dict) -> Dict[str, np.ndarray]:
  """HF tensors (name -> float32 array) from t5lite parameters."""
  glob_, stacks = tensor_map(family, cfg)
  out = {}
  fused: Dict[str, list] = {}
  for hf_name, path, kind in glob_:
    out[hf_name] = _to_hf(np.asarray(_get(params, path), np.float32), kind)
  for _, (n, entries) in stacks.items():
    for hf_name, path, kind in entries:
      stacked = np.asarray(_get(params, path), np.float32)
      for i in range(n):
        if kind.startswith("fused_"):
          fused.setdefault(hf_name.format(i=i), []).append(_to_hf(stacked[i], kind))
        else:
          out[hf_name.format(i=i)] = _to_hf(stacked[i], kind)
  for hf_name, parts in fused.items():
    out[hf_name] = np.concatenate(parts, axis=-1)
  if family == "t5" and cfg.tie_embeddings:
    out["lm_head.weight"] = out["shared.weight"]
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# Files.

def read_hf_dir(src: str, allow_pickle: bool = False) -> Tuple[Dict, Dict[str, np.ndarray]]:
  """(config.json dict, tensors) from a HF model directory."""
  cfg_path = os.path.join(src, "config.json")
  if not os.path.exists(cfg_path):
    raise ConversionError(f"no config.json in {src}")
  with open(cfg_path, encoding="utf-8") as f:
    hf_cfg = json.load(f)
  files = sorted(glob.glob(os.path.join(src, "*.safetensors")))
  tensors: Dict[str, np.ndarray] = {}
  if files:
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    for path in files:
      tensors.update(load_file(path))
    return hf_cfg, tensors
  bins = sorted(glob.glob(os.path.join(src, "*.bin")))
  if not bins:
    raise ConversionError(f"no *.safetensors weights in {src}")
  if not allow_pickle:
    raise ConversionError(
        f"{src} holds only pickled .bin weights; loading them can run arbitrary code. Convert "
        f"them to safetensors, or pass --allow_pickle if you trust the source")
  import torch  # pylint: disable=import-outside-toplevel
  for path in bins:
    state = torch.load(path, map_location="cpu", weights_only=True)
    tensors.update({k: v.float().numpy() for k, v in state.items()})
  return hf_cfg, tensors


def hf_to_t5lite(family: str, src: str, dest: str, allow_pickle: bool = False) -> ModelConfig:
  """Converts a HF directory into a t5lite checkpoint directory (written atomically)."""
  import jax  # pylint: disable=import-outside-toplevel
  from t5lite import checkpoints  # pylint: disable=import-outside-toplevel
  hf_cfg, tensors = read_hf_dir(src, allow_pickle)
  model_type = hf_cfg.get("model_type")
  wanted = {"t5": ("t5", "mt5"), "llama": ("llama",), "gpt2": ("gpt2",)}.get(family)
  if wanted is None:
    raise ConversionError(f"unknown family {family!r}; choose from {FAMILIES}")
  if model_type not in wanted:
    raise ConversionError(f"{src} is a {model_type!r} model, not {family}")
  cfg = config_from_hf(family, hf_cfg)
  params = params_from_hf(family, cfg, tensors)
  if os.path.exists(dest):
    raise ConversionError(f"destination {dest} already exists")
  tmp = f"{dest}.partial"
  shutil.rmtree(tmp, ignore_errors=True)
  ckpt = checkpoints.Checkpointer(os.path.join(tmp, "checkpoints"), keep=None, async_save=False)
  ckpt.save(0, {"params": jax.tree.map(np.asarray, params)}, {"cursor": 0, "source": src}, cfg)
  ckpt.close()
  for name in TOKENIZER_FILES:
    if os.path.exists(os.path.join(src, name)):
      shutil.copy(os.path.join(src, name), os.path.join(tmp, name))
  os.replace(tmp, dest)
  return cfg


def load_t5lite(model_dir: str, step=None, mesh=None, rules=None):
  """(ModelConfig, params) of a t5lite run or converted checkpoint, no gin needed. With a `mesh`
  and partitioning `rules`, the parameters are restored straight into their shardings on it,
  none of them ever whole on one device."""
  import jax  # pylint: disable=import-outside-toplevel
  from t5lite import checkpoints, partitioning  # pylint: disable=import-outside-toplevel
  from t5lite.models.model import Model  # pylint: disable=import-outside-toplevel
  ckpt_dir = os.path.join(model_dir, "checkpoints")
  if not os.path.isdir(ckpt_dir):
    ckpt_dir = model_dir
  step = checkpoints.latest_step(ckpt_dir) if step is None else step
  if step is None:
    raise ConversionError(f"no checkpoint in {model_dir}")
  with open(os.path.join(ckpt_dir, str(step), "config", "metadata"), encoding="utf-8") as f:
    cfg = ModelConfig.from_json(json.dumps(json.load(f)["model_config"]))
  model = Model(cfg)
  if mesh is None:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                            model.abstract_params)
  else:
    shardings = partitioning.param_shardings(model.annotated_params, mesh, rules)
    abstract = checkpoints.abstract_with_shardings(model.abstract_params, shardings)
  return cfg, checkpoints.restore_params(ckpt_dir, abstract, step)


def t5lite_to_hf(family: str, src: str, dest: str) -> Dict:
  """Writes a HF directory (config.json + model.safetensors + tokenizer) from a t5lite one."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  cfg, params = load_t5lite(src)
  hf_cfg = config_to_hf(family, cfg)
  import jax  # pylint: disable=import-outside-toplevel
  tensors = params_to_hf(family, cfg, jax.tree.map(np.asarray, params))
  if family == "t5" and cfg.tie_embeddings:
    tensors.pop("lm_head.weight")
  if os.path.exists(dest):
    raise ConversionError(f"destination {dest} already exists")
  tmp = f"{dest}.partial"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  save_file(tensors, os.path.join(tmp, "model.safetensors"))
  with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
    json.dump(hf_cfg, f, indent=1)
  for name in TOKENIZER_FILES:
    if os.path.exists(os.path.join(src, name)):
      shutil.copy(os.path.join(src, name), os.path.join(tmp, name))
  os.replace(tmp, dest)
  return hf_cfg


def main(argv=None) -> int:
  """CLI entry point; returns the exit code (2 for conversion errors)."""
  parser = argparse.ArgumentParser(description="Convert checkpoints between HF and t5lite.")
  parser.add_argument("direction", choices=("hf-to-t5lite", "t5lite-to-hf"))
  parser.add_argument("--family", required=True, choices=FAMILIES)
  parser.add_argument("--allow_pickle", action="store_true")
  parser.add_argument("src")
  parser.add_argument("dest")
  args = parser.parse_args(argv)
  try:
    if args.direction == "hf-to-t5lite":
      cfg = hf_to_t5lite(args.family, args.src, args.dest, args.allow_pickle)
      print(f"wrote t5lite checkpoint {args.dest} ({cfg.arch}, d_model {cfg.d_model})")
    else:
      t5lite_to_hf(args.family, args.src, args.dest)
      print(f"wrote HF model {args.dest}")
  except ConversionError as e:
    print(f"t5lite.convert: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
