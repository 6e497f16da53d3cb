"""Networks of the zoo: T5-style encoder-decoder and decoder-only / prefix-LM transformers.

Each network holds its blocks in `blocks.LayerStack`s (scanned, unrolled or pipelined; held layer
by layer for inference after `LayerStack.unroll`). Dropout takes explicit keys, so a forward pass
is a pure function of (parameters, batch, rng).

Batch features follow T5X's feature converters: `encoder_input_tokens`, `decoder_input_tokens`,
`decoder_target_tokens`, `*_segment_ids`, `*_positions`, and for prefix-LM
`decoder_causal_attention` (1 on prefix tokens).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from t5lite.models import attention as attn_lib
from t5lite.models import layers
from t5lite.models import positions as pos_lib
from t5lite.models.blocks import DecoderBlock, EncoderBlock, LayerStack
from t5lite.models.config import ModelConfig


def _empty_self_cache(cfg: ModelConfig, batch: int, max_len: int):
  """Empty self-attention caches, a {"k", "v"} [batch, kv_heads, max_len, head_dim] per layer
  (heads-major)."""
  zeros = jnp.zeros((batch, cfg.kv_heads, max_len, cfg.head_dim), layers.compute_dtype(cfg))
  return tuple({"k": zeros, "v": zeros} for _ in range(cfg.num_decoder_layers))


def _lengths(tokens):
  """Real (non-padding) tokens per row: [batch]."""
  return jnp.sum(tokens != 0, axis=-1).astype(jnp.int32)


def _positions(tokens, positions):
  if positions is not None:
    return positions
  return jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)


class _Head(nnx.Module):
  """Output projection to the vocabulary (untied) or via the embedding (tied)."""

  def __init__(self, cfg: ModelConfig, embed: layers.Embed, *, rngs: nnx.Rngs):
    self.cfg = cfg
    if not cfg.tie_embeddings:
      # Stored [vocab, embed] like the embedding (and HF's lm_head): XLA's CPU backward matmuls
      # are ~2x faster in this layout than with [embed, vocab].
      self.kernel = layers.param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"),
                                 cfg.d_model ** -0.5, jnp.dtype(cfg.param_dtype))

  def __call__(self, x, embed: layers.Embed):
    """x: [batch, length, embed] -> logits [batch, length, vocab] (float32).

    The logits are the float32 sums of the compute dtype's products (bf16 ones on AMX, cuBLAS,
    or XLA's dots with float32 outputs), never rounded to bf16: T5X computes its logits in
    float32 for stability, and `losses.head_cross_entropy` (`LossConfig.head_chunks`) its
    blocks' logits the same way."""
    if self.cfg.tie_embeddings:
      # T5 rescales before a tied head so logits keep unit scale.
      if self.cfg.arch == "encoder_decoder":
        x = x * (self.cfg.d_model ** -0.5)
      return embed.attend(x)
    dt = layers.compute_dtype(self.cfg)
    return layers.project(self.cfg, "bld,vd->blv", x, self.kernel[...].astype(dt),
                          out_dtype=jnp.float32)

  def operands(self, x, embed: layers.Embed):
    """(x, kernel [vocab, embed]) with logits = x @ kernel.T, for `losses.head_cross_entropy`."""
    if self.cfg.tie_embeddings:
      if self.cfg.arch == "encoder_decoder":
        x = x * (self.cfg.d_model ** -0.5)
      return x, embed.embedding[...]
    return x, self.kernel[...]


class EncoderDecoder(nnx.Module):
  """T5 v1.1 encoder-decoder with a shared token embedding."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.token_embed = layers.Embed(cfg, rngs=rngs)
    self.encoder = LayerStack(lambda r: EncoderBlock(cfg, rngs=r), cfg.num_encoder_layers, cfg,
                              rngs=rngs)
    self.encoder_norm = layers.make_norm(cfg, rngs)
    self.decoder = LayerStack(lambda r: DecoderBlock(cfg, cross_attention=True, rngs=r),
                              cfg.num_decoder_layers, cfg, rngs=rngs)
    self.decoder_norm = layers.make_norm(cfg, rngs)
    self.head = _Head(cfg, self.token_embed, rngs=rngs)
    if cfg.position_encoding == "relative":
      self.encoder_relpos = pos_lib.RelativePositionBias(
          cfg.relative_buckets, cfg.relative_max_distance, cfg.num_heads, True, rngs=rngs,
          param_dtype=jnp.dtype(cfg.param_dtype))
      self.decoder_relpos = pos_lib.RelativePositionBias(
          cfg.relative_buckets, cfg.relative_max_distance, cfg.num_heads, False, rngs=rngs,
          param_dtype=jnp.dtype(cfg.param_dtype))

  def _bias(self, which: str, q_pos, k_pos):
    cfg = self.cfg
    if cfg.position_encoding == "relative":
      module = self.encoder_relpos if which == "encoder" else self.decoder_relpos
      return module(q_pos, k_pos)
    if cfg.position_encoding == "alibi":
      return pos_lib.alibi_bias(q_pos, k_pos, cfg.num_heads)
    return None

  def _sequence_bias(self, which: str, pos):
    """Position bias of a whole sequence attending to itself (training, scoring, encoding)."""
    if self.cfg.position_encoding == "relative":
      module = self.encoder_relpos if which == "encoder" else self.decoder_relpos
      return module.for_sequence(pos.shape[1])
    return self._bias(which, pos, pos)

  def encode(self, tokens, segment_ids=None, positions=None, rng=None):
    """tokens: [batch, in_len] -> (encoded [batch, in_len, embed], aux_loss).

    Without segment ids the rows are taken as unpacked and padded at the end.
    """
    pos = _positions(tokens, positions)
    r = jax.random.split(rng, 2) if rng is not None else [None, None]
    x = layers.dropout(self.token_embed(tokens), self.cfg.dropout_rate, r[0])
    if segment_ids is None:
      mask = attn_lib.Mask(kv_lengths=_lengths(tokens))
    else:
      mask = attn_lib.segment_mask(segment_ids, segment_ids)
    x, aux = self.encoder(x, r[1], mask=mask, bias=self._sequence_bias("encoder", pos),
                          positions=pos)
    return self.encoder_norm(x), aux

  def decoder_features(self, encoded, tokens, *, encoder_tokens=None, encoder_segment_ids=None,
                       segment_ids=None, positions=None, rng=None):
    """Teacher-forced decoder up to the output head: tokens [batch, out_len] -> (hidden states
    [batch, out_len, embed], aux_loss).

    Packed rows pass both segment id arrays; unpacked rows pass `encoder_tokens` (for the
    encoder padding) and use a causal mask.
    """
    pos = _positions(tokens, positions)
    r = jax.random.split(rng, 3) if rng is not None else [None] * 3
    x = layers.dropout(self.token_embed(tokens), self.cfg.dropout_rate, r[0])
    if segment_ids is None:
      mask = attn_lib.Mask(causal=True)
      cross_mask = attn_lib.Mask(kv_lengths=_lengths(encoder_tokens))
    else:
      mask = attn_lib.segment_mask(segment_ids, segment_ids, causal=True)
      cross_mask = attn_lib.segment_mask(segment_ids, encoder_segment_ids)
    x, aux = self.decoder(x, r[1], mask=mask, bias=self._sequence_bias("decoder", pos),
                          positions=pos, encoded=encoded, cross_mask=cross_mask)
    return layers.dropout(self.decoder_norm(x), self.cfg.dropout_rate, r[2]), aux

  def features(self, batch, rng=None):
    """batch of T5X encoder-decoder features -> (decoder hidden states before the output head
    [b, out_len, embed], aux_loss)."""
    r = jax.random.split(rng) if rng is not None else [None, None]
    enc_tokens = batch["encoder_input_tokens"]
    packed = "encoder_segment_ids" in batch
    enc_seg = batch["encoder_segment_ids"] if packed else None
    encoded, enc_aux = self.encode(enc_tokens, enc_seg, batch.get("encoder_positions"), r[0])
    dec_seg = batch["decoder_segment_ids"] if packed else None
    x, dec_aux = self.decoder_features(
        encoded, batch["decoder_input_tokens"], encoder_tokens=enc_tokens,
        encoder_segment_ids=enc_seg, segment_ids=dec_seg,
        positions=batch.get("decoder_positions"), rng=r[1])
    return x, enc_aux + dec_aux

  def __call__(self, batch, rng=None):
    """batch of T5X encoder-decoder features -> (logits [b, out_len, vocab], aux_loss)."""
    x, aux = self.features(batch, rng)
    return self.head(x, self.token_embed), aux

  def init_cache(self, encoded, max_len: int, blocks=None):
    """Decoding cache: empty self-attention slots and each layer's cross-attention keys.
    `blocks`: the decoder's `unstack()`, taken once by a decoding loop."""

    def cross(block):  # heads-major, like the self-attention cache
      k, v = block.cross_attention.project_kv(encoded)
      return {"k": k.transpose(0, 2, 1, 3), "v": v.transpose(0, 2, 1, 3)}

    return {"self": _empty_self_cache(self.cfg, encoded.shape[0], max_len),
            "cross": tuple(cross(block) for block in blocks or self.decoder.unstack())}

  def decode_step(self, tokens, cache, index, *, encoder_lengths, blocks=None):
    """Decoder on tokens [batch, q] at slots index.. with a cache -> (logits, new cache).
    `blocks`: the decoder's `unstack()`, taken once by a decoding loop."""
    b, q = tokens.shape
    max_len = cache["self"][0]["k"].shape[2]
    q_pos = jnp.broadcast_to(index + jnp.arange(q), (b, q))
    k_pos = jnp.broadcast_to(jnp.arange(max_len), (b, max_len))
    mask = attn_lib.Mask(dense=(k_pos[:, None, :] <= q_pos[:, :, None])[:, None])
    x = self.token_embed(tokens)
    x, cache = self.decoder.decode_step(
        x, cache, index, blocks=blocks, mask=mask, bias=self._bias("decoder", q_pos, k_pos),
        positions=q_pos, cross_mask=attn_lib.Mask(kv_lengths=encoder_lengths))
    return self.head(self.decoder_norm(x), self.token_embed), cache


class DecoderOnly(nnx.Module):
  """Causal decoder (GPT/LLaMA) or prefix-LM (causal with a fully visible prefix)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.token_embed = layers.Embed(cfg, rngs=rngs)
    self.decoder = LayerStack(lambda r: DecoderBlock(cfg, cross_attention=False, rngs=r),
                              cfg.num_decoder_layers, cfg, rngs=rngs)
    self.decoder_norm = layers.make_norm(cfg, rngs)
    self.head = _Head(cfg, self.token_embed, rngs=rngs)
    if cfg.position_encoding == "relative":
      self.decoder_relpos = pos_lib.RelativePositionBias(
          cfg.relative_buckets, cfg.relative_max_distance, cfg.num_heads,
          cfg.arch == "prefix_lm", rngs=rngs, param_dtype=jnp.dtype(cfg.param_dtype))
    if cfg.position_encoding == "learned":
      self.position_embed = layers.param(rngs, (cfg.max_length, cfg.d_model),
                                         ("position", "embed"), 0.01,
                                         jnp.dtype(cfg.param_dtype))

  def _embed(self, tokens, positions):
    """Token embeddings, plus the learned position table's rows when configured."""
    x = self.token_embed(tokens)
    if self.cfg.position_encoding == "learned":
      # Clipped: left-padding slots of decoding prompts carry negative positions.
      rows = jnp.clip(positions, 0, self.cfg.max_length - 1)
      x = x + jnp.take(self.position_embed[...], rows, axis=0).astype(x.dtype)
    return x

  def _bias(self, q_pos, k_pos):
    """Position bias [batch, heads, q, k] (relative or ALiBi), None for RoPE."""
    if self.cfg.position_encoding == "relative":
      return self.decoder_relpos(q_pos, k_pos)
    if self.cfg.position_encoding == "alibi":
      return pos_lib.alibi_bias(q_pos, k_pos, self.cfg.num_heads)
    return None

  def _sequence_bias(self, pos):
    """Position bias of the whole sequence attending to itself (training and scoring)."""
    if self.cfg.position_encoding == "relative":
      return self.decoder_relpos.for_sequence(pos.shape[1])
    return self._bias(pos, pos)

  def mask(self, batch) -> attn_lib.Mask:
    """Self-attention mask for the architecture and batch layout.

    Unpacked causal rows (padded at the end) need only the causal flag: real tokens never see the
    padding after them. Packed rows and prefix-LM rows need a dense mask (packed rows carry their
    segment ids, and prefix-LM rows their prefix flags too, for the CPU kernel).
    """
    seg = batch.get("decoder_segment_ids")
    prefix = batch.get("decoder_causal_attention") if self.cfg.arch == "prefix_lm" else None
    if seg is None and prefix is None:
      return attn_lib.Mask(causal=True)
    if seg is None:
      seg = jnp.where(batch["decoder_target_tokens"] != 0, 1, 0).astype(jnp.int32)
      seg = seg.at[:, 0].set(1)
    if prefix is not None:
      return attn_lib.prefix_lm(seg, prefix)
    return attn_lib.segment_mask(seg, seg, causal=True)

  def __call__(self, batch, rng=None):
    """batch of decoder-only features -> (logits [b, len, vocab], aux_loss)."""
    x, aux = self.features(batch, rng)
    return self.head(x, self.token_embed), aux

  def features(self, batch, rng=None):
    """batch of decoder-only features -> (hidden states before the output head [b, len, embed],
    aux_loss)."""
    cfg = self.cfg
    tokens = batch["decoder_input_tokens"]
    pos = _positions(tokens, batch.get("decoder_positions"))
    r = jax.random.split(rng, 3) if rng is not None else [None] * 3
    x = layers.dropout(self._embed(tokens, pos), cfg.dropout_rate, r[0])
    x, aux = self.decoder(x, r[1], mask=self.mask(batch), bias=self._sequence_bias(pos),
                          positions=pos)
    return layers.dropout(self.decoder_norm(x), cfg.dropout_rate, r[2]), aux

  def init_cache(self, batch: int, max_len: int):
    """Empty self-attention cache slots for every layer."""
    return {"self": _empty_self_cache(self.cfg, batch, max_len)}

  def decode_step(self, tokens, cache, index, *, q_positions, k_positions, key_valid,
                  prefix_slots=0, last_only=False, blocks=None):
    """Tokens [batch, q] at cache slots index.. -> (logits [batch, q, vocab], new cache).

    Prompts are left-padded so every row's prompt ends at the same slot; `key_valid`
    [batch, max_len] masks the padding slots and `*_positions` give each row's own positions.
    With `prefix_slots` (prefix-LM) the first slots see each other bidirectionally. With
    `last_only`, logits of the last token only ([batch, 1, vocab]): all a prompt's fill needs,
    and the output head is the largest matmul of a small model's fill. `blocks`: the decoder's
    `unstack()`, taken once by a decoding loop.
    """
    cfg = self.cfg
    q = tokens.shape[1]
    max_len = key_valid.shape[1]
    slot_q = index + jnp.arange(q)
    slot_k = jnp.arange(max_len)
    allowed = slot_k[None, :] <= slot_q[:, None]
    if cfg.arch == "prefix_lm":
      allowed = allowed | ((slot_k[None, :] < prefix_slots) & (slot_q[:, None] < prefix_slots))
    mask = attn_lib.Mask(dense=(allowed[None] & key_valid[:, None, :])[:, None])
    if isinstance(index, int) and index == 0 and q > 1:
      # A prompt's fill: the same mask as segment ids too (the left padding is segment 0), so
      # the CPU kernel takes it (with the prefix flags of a prefix LM), and causal for a causal
      # decoder (cuDNN's causal mask type).
      valid = key_valid.astype(jnp.int32)
      prefix = None
      if cfg.arch == "prefix_lm":
        prefix = jnp.broadcast_to((slot_q < prefix_slots).astype(jnp.int32), (tokens.shape[0], q))
      mask = mask._replace(causal=prefix is None, segments=(valid[:, :q], valid), prefix=prefix)
    x = self._embed(tokens, q_positions)
    x, cache = self.decoder.decode_step(x, cache, index, blocks=blocks, mask=mask,
                                        bias=self._bias(q_positions, k_positions),
                                        positions=q_positions)
    if last_only:
      x = x[:, -1:]
    return self.head(self.decoder_norm(x), self.token_embed), cache


# Parameters the network reads only in the compute dtype: cast before their matmul, or added to
# its bf16 output. The norms' scales and biases, the relative position bias and the MoE router
# are read in float32 and are not among them.
_COMPUTE_DTYPE_NAMES = frozenset({
    "query", "key", "value", "out", "wi_0", "wi_1", "wo", "query_bias", "key_bias", "value_bias",
    "out_bias", "wi_0_bias", "wi_1_bias", "wo_bias"})
_COMPUTE_DTYPE_PATHS = frozenset({("token_embed", "embedding"), ("head", "kernel")})


def cast_for_compute(params, cfg: ModelConfig):
  """`params` with every parameter the network reads only in the compute dtype cast to it.

  The network computes exactly the same outputs from them. A decoding loop casts once, before
  its token loop, so that no step reads float32 master weights to write their bf16 copy (a
  batch-1 decoding step is bound by the bytes of weights it reads). Identity in float32.
  """
  dt = layers.compute_dtype(cfg)

  def cast(path, x):
    names = tuple(getattr(k, "key", None) for k in path)
    if names[-1] in _COMPUTE_DTYPE_NAMES or names[-2:] in _COMPUTE_DTYPE_PATHS:
      return x.astype(dt)
    return x

  return jax.tree_util.tree_map_with_path(cast, params)


def layer_stacks(net) -> list:
  """The network's layer stacks (the encoder's, then the decoder's)."""
  return [m for m in (getattr(net, "encoder", None), net.decoder) if isinstance(m, LayerStack)]


def is_unrolled(params) -> bool:
  """Whether `params` (a nested dict) holds its decoder's layers one by one (`Model.unroll`)
  rather than stacked."""
  blocks = params["decoder"]["blocks"]
  return bool(blocks) and all(isinstance(k, int) for k in blocks)


def build_network(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
  """The network for `cfg.arch`."""
  if cfg.arch == "encoder_decoder":
    return EncoderDecoder(cfg, rngs=rngs)
  return DecoderOnly(cfg, rngs=rngs)
