"""The step scripts/benchmark.py times and scripts/benchmark_aot.py compiles: its synthetic
batches, their model FLOPs, the jitted t5lite train step, and the facts every report
starts with (the device, the library versions, the settings gin resolved).
"""

import dataclasses
import functools
from importlib import metadata
import json

import jax
import numpy as np


def model_flops_per_step(cfg, batch: int, inputs: int, targets: int, pairs=None) -> float:
  """Training FLOPs of one step (the formula: scripts/benchmark.py's docstring). `pairs`: the
  (query, key) pairs each attention sees per step, from `attention_pairs` (packed rows); default:
  every query with every key of its row."""
  d, h, k, dh, f, v = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size
  mlp = 2 * d * f * (3 if cfg.gated_mlp else 2)
  if cfg.num_experts:
    mlp = mlp * cfg.experts_per_token + 2 * d * cfg.num_experts
  proj = 2 * d * h * dh + 4 * d * k * dh + 2 * h * dh * d
  if pairs is None:
    pairs = {"encoder": batch * inputs ** 2, "decoder": batch * targets ** 2,
             "cross": batch * inputs * targets}
    if cfg.arch != "encoder_decoder":
      pairs = {"decoder": batch * (inputs + targets) ** 2}
  if cfg.arch == "encoder_decoder":
    enc = batch * inputs * cfg.num_encoder_layers * (proj + mlp)
    enc += cfg.num_encoder_layers * 4 * h * dh * pairs["encoder"]
    cross_kv = batch * inputs * cfg.num_decoder_layers * 4 * d * k * dh
    dec = batch * targets * cfg.num_decoder_layers * (proj + 4 * d * h * dh + mlp)
    dec += cfg.num_decoder_layers * 4 * h * dh * (pairs["decoder"] + pairs["cross"])
    fwd = enc + cross_kv + dec + batch * targets * 2 * d * v
  else:
    length = inputs + targets
    fwd = (batch * length * cfg.num_decoder_layers * (proj + mlp)
           + cfg.num_decoder_layers * 4 * h * dh * pairs["decoder"] + batch * length * 2 * d * v)
  return 3.0 * fwd


def attention_pairs(batch) -> dict:
  """The (query, key) pairs of a batch of packed rows (its *_segment_ids): per attention
  ("encoder", "decoder", "cross"), the sum over rows and examples of the example's query count
  times its key count; segment 0 (padding) sees nothing."""
  def per_segment(segments):
    rows = np.asarray(segments)
    return [np.bincount(row, minlength=rows.max() + 1)[1:] for row in rows]

  pairs = {}
  if "decoder_segment_ids" in batch:
    dec = per_segment(batch["decoder_segment_ids"])
    pairs["decoder"] = float(sum(np.sum(c.astype(np.float64) ** 2) for c in dec))
  if "encoder_segment_ids" in batch:
    enc = per_segment(batch["encoder_segment_ids"])
    pairs["encoder"] = float(sum(np.sum(c.astype(np.float64) ** 2) for c in enc))
    pairs["cross"] = float(sum(np.sum(e[:min(len(e), len(t))].astype(np.float64)
                                      * t[:min(len(e), len(t))]) for e, t in zip(enc, dec)))
  return pairs


def run_batch(cfg, args):
  """The benchmark's synthetic batch for these flags (--batch, --inputs, --targets, --pack)."""
  return synthetic_batch(cfg, args.batch, args.inputs, args.targets, pack=args.pack)


def step_flops(cfg, args) -> float:
  """Model FLOPs of one step on `run_batch` (packed rows: each example's own attention)."""
  pairs = attention_pairs(run_batch(cfg, args)) if args.pack > 1 else None
  return model_flops_per_step(cfg, args.batch, args.inputs, args.targets, pairs)


def _packed_lengths(rng, length: int, examples: int):
  """`examples` random lengths, each at least 1, that fill a row of `length`: 1 plus shares of
  the rest by a Dirichlet(4) draw (most within 0.5-1.5x the mean)."""
  if examples > length:
    raise ValueError(f"cannot pack {examples} examples into a row of {length} tokens")
  extra = np.floor(rng.dirichlet(np.full(examples, 4.0)) * (length - examples)).astype(int)
  extra[-1] += length - examples - extra.sum()
  return 1 + extra


def _packed_fields(lengths_per_row, length: int):
  """(segment ids, positions) [rows, length] of rows holding examples of these lengths."""
  seg = np.zeros((len(lengths_per_row), length), np.int32)
  pos = np.zeros_like(seg)
  for r, lengths in enumerate(lengths_per_row):
    seg[r] = np.repeat(np.arange(1, len(lengths) + 1), lengths)
    pos[r] = np.concatenate([np.arange(n) for n in lengths])
  return seg, pos


def synthetic_batch(cfg, batch: int, inputs: int, targets: int, seed: int = 0, pack: int = 0):
  """Random token batch of the model's features: every token real, one example per row, or with
  `pack` > 1 that many examples of random lengths per row, packed as t5lite's data pipeline
  packs them (segment ids, positions restarting in each example, decoder inputs shifted right
  inside each example; the i-th inputs and i-th targets of a row make one T5 example)."""
  rng = np.random.default_rng(seed)
  length = targets if cfg.arch == "encoder_decoder" else inputs + targets
  tgt = rng.integers(2, cfg.vocab_size, (batch, length)).astype(np.int32)
  shifted = np.concatenate([np.zeros((batch, 1), np.int32), tgt[:, :-1]], 1)
  out = {"decoder_input_tokens": shifted, "decoder_target_tokens": tgt,
         "decoder_loss_weights": np.ones((batch, length), np.float32)}
  if pack > 1:
    lengths = [_packed_lengths(rng, length, pack) for _ in range(batch)]
    seg, pos = _packed_fields(lengths, length)
    out.update(decoder_segment_ids=seg, decoder_positions=pos,
               decoder_input_tokens=np.where(pos == 0, 0, shifted).astype(np.int32))
  if cfg.arch == "encoder_decoder":
    out["encoder_input_tokens"] = rng.integers(2, cfg.vocab_size, (batch, inputs)).astype(np.int32)
    if pack > 1:
      seg, pos = _packed_fields([_packed_lengths(rng, inputs, pack) for _ in range(batch)],
                                inputs)
      out.update(encoder_segment_ids=seg, encoder_positions=pos)
    return out
  if cfg.arch == "prefix_lm":
    # The first inputs / (inputs + targets) of each example is its prefix; the loss is on the
    # rest.
    pos = out.get("decoder_positions", np.arange(length)[None].repeat(batch, 0))
    size = (np.repeat(np.concatenate(lengths), np.concatenate(lengths)).reshape(batch, length)
            if pack > 1 else np.full((batch, length), length))
    prefix = pos < size * inputs // length
    out["decoder_causal_attention"] = prefix.astype(np.int32)
    out["decoder_loss_weights"] = (~prefix).astype(np.float32)
  return out


# The model settings that decide speed, echoed in the report (gin's last binding wins: a file of
# one's own listed after runs/cpu.gin may undo it, with a warning from gin_setup.parse_gin).
SETTINGS = ("dtype", "param_dtype", "scan_layers", "remat_policy", "attention_impl",
            "flat_weight_grads", "float32_dot_outputs", "matvec_kernel", "matmul_kernel")


def t5lite_step(cfg, args):
  """(jitted train step, jitted state init) for the real t5lite step, compiled by
  `trainer.jit_train_step` as `t5lite.train` compiles it (the state donated unless gin's
  `TrainConfig.donate_state` is off, its `compiler_options` passed to XLA), with the loss and
  optimizer settings as gin configures them (z-loss 1e-4 by default), always AdamW (as HF's
  side), at a constant learning rate."""
  from t5lite import optimizers, trainer
  from t5lite.models.model import Model
  model = Model(cfg, args.loss)
  opt = optimizers.make_optimizer(dataclasses.replace(args.optimizer, name="adamw"), 1e-4)
  init = jax.jit(functools.partial(trainer.init_state, model, opt))
  train_cfg = dataclasses.replace(args.train, seed=0, microbatches=args.microbatches)
  return trainer.jit_train_step(model, opt, lambda s: 1e-4, train_cfg), init


def load_config(args, bindings):
  """(ModelConfig, LossConfig, OptimizerConfig, TrainConfig) from gin presets plus bindings."""
  from t5lite import gin_setup
  exp = gin_setup.parse_gin(args.gin_file, ["experiment.model_dir = '/tmp/benchmark'"]
                            + bindings)
  return exp.model, exp.loss, exp.optimizer, exp.train


VERSIONED = ("jax", "jaxlib", "flax", "optax")
HF_VERSIONED = ("torch", "transformers")


def library_versions(with_hf: bool) -> dict:
  """The installed versions of the libraries a timing depends on (HF's side, torch and
  transformers, with --vs-hf): a rate means little without them. From the installed packages'
  metadata, so nothing is imported; a package not installed is left out."""
  versions = {}
  for name in VERSIONED + (HF_VERSIONED if with_hf else ()):
    try:
      versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      pass
  return versions


def run_facts(cfg, args, bindings, settings=SETTINGS) -> dict:
  """What every report records first: the device, the library versions, the gin files and
  bindings, and the model settings that decide speed as gin resolved them."""
  return {"device": str(jax.devices()[0].device_kind), "platform": jax.devices()[0].platform,
          "versions": library_versions(args.vs_hf),
          "gin_files": args.gin_file, "bindings": bindings,
          "model": {k: getattr(cfg, k) for k in settings},
          "loss": {"head_chunks": args.loss.head_chunks},
          "optimizer": {"master_weights": args.optimizer.master_weights},
          "train": {"donate_state": args.train.donate_state,
                    "compiler_options": dict(args.train.compiler_options)}}


def write_json(path: str, result: dict):
  """Writes `result` to --json's path (nothing when it is empty)."""
  if path:
    with open(path, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
