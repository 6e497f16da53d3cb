"""KV-cache decoding for every architecture: greedy, temperature / top-k / top-p sampling, beam search.

One jitted loop on device (`lax.while_loop`, no Python per token). Encoder-decoder models encode
once and precompute each layer's cross-attention keys; decoder-only and prefix-LM models fill the
prompt in one pass. Prompts of different lengths are left-aligned into a shared slot layout
(left padding) so that every row writes the same cache slot each step; positions stay per row.

Inputs (`Model.predict_batch` calls `decode`):
  encoder-decoder: batch["encoder_input_tokens"] [batch, in_len] (0-padded at the end);
  decoder-only / prefix-LM: batch["prompt_tokens"] [batch, prompt_len] (0-padded at the end).
    The start token 0 is prepended, as the training feature converters do.
"""

import functools
from typing import Dict, Optional

import jax
import jax.numpy as jnp

from t5lite import gpu_aot
from t5lite.models import transformer

METHODS = ("greedy", "sample", "beam")
DEFAULT_MAX_DECODE_LEN = 32
NEG_INF = -1e10


def filter_logits(logits, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
  """Temperature, then top-k, then nucleus (top-p) filtering; removed entries get NEG_INF."""
  logits = logits.astype(jnp.float32) / max(temperature, 1e-6)
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, NEG_INF, logits)
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    sorted_logits = jnp.where(before >= top_p, NEG_INF, sorted_logits)
    inverse = jnp.argsort(order, axis=-1)
    logits = jnp.take_along_axis(sorted_logits, inverse, axis=-1)
  return logits


def first_max(logits):
  """Index of the largest logit over the last axis, the first on ties, as jnp.argmax gives:
  int32. A max and then a min over indices, two plain reductions (argmax's variadic reduce
  costs XLA:CPU 2.3 ms per step over T5's 32,128-way vocabulary at batch 32). Rows without a
  largest value (NaN) give the last index."""
  top = jnp.max(logits, axis=-1, keepdims=True)
  index = jnp.arange(logits.shape[-1], dtype=jnp.int32)
  return jnp.min(jnp.where(logits == top, index, logits.shape[-1] - 1), axis=-1)


def _prepare(model, params, batch, max_decode_len: int, double: bool = False):
  """(first-step logits [b, vocab], cache, step_fn) for the architecture.

  step_fn(tokens [b], cache, i) -> (logits [b, vocab], cache) decodes generated token i.
  `double`: after the prompt, every row is repeated, so the token steps run 2b rows (the
  prompt, prefilled once, is not repeated).
  """
  twice = lambda tree: jax.tree.map(lambda x: jnp.concatenate([x, x]), tree) if double else tree
  cfg = model.cfg
  # Outside the token loop, once: the weights in the compute dtype (bf16 over float32 masters)
  # and each layer's weights sliced out of the layer stack.
  net = model.network(transformer.cast_for_compute(params, cfg))
  blocks = net.decoder.unstack()
  if cfg.arch == "encoder_decoder":
    enc_tokens = jnp.asarray(batch["encoder_input_tokens"])
    encoded, _ = net.encode(enc_tokens)
    lengths = jnp.sum(enc_tokens != 0, axis=-1).astype(jnp.int32)
    cache = net.init_cache(encoded, max_decode_len, blocks)
    start = jnp.full((enc_tokens.shape[0], 1), cfg.decoder_start_id, jnp.int32)
    logits, cache = net.decode_step(start, cache, 0, encoder_lengths=lengths, blocks=blocks)
    logits, cache, lengths = twice((logits, cache, lengths))

    def step(tokens, cache, i):
      out, cache = net.decode_step(tokens[:, None], cache, i + 1, encoder_lengths=lengths,
                                   blocks=blocks)
      return out[:, 0], cache

    return logits[:, 0], cache, step

  prompts = jnp.asarray(batch["prompt_tokens"], jnp.int32)
  b = prompts.shape[0]
  prompts = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), prompts], axis=1)  # start token
  p_len = prompts.shape[1]
  lengths = 1 + jnp.sum(prompts[:, 1:] != 0, axis=-1)
  pad = p_len - lengths                                            # left padding per row
  slots = jnp.arange(p_len)
  src = jnp.clip(slots[None, :] - pad[:, None], 0, p_len - 1)
  left = jnp.where(slots[None, :] >= pad[:, None], jnp.take_along_axis(prompts, src, 1), 0)
  max_len = p_len + max_decode_len
  all_slots = jnp.arange(max_len)
  positions = all_slots[None, :] - pad[:, None]
  key_valid = all_slots[None, :] >= pad[:, None]
  cache = net.init_cache(b, max_len)
  logits, cache = net.decode_step(left, cache, 0, q_positions=positions[:, :p_len],
                                  k_positions=positions, key_valid=key_valid, prefix_slots=p_len,
                                  last_only=True, blocks=blocks)
  logits, cache, positions, key_valid = twice((logits, cache, positions, key_valid))

  def step(tokens, cache, i):
    slot = p_len + i
    q_pos = jax.lax.dynamic_slice_in_dim(positions, slot, 1, axis=1)
    out, cache = net.decode_step(tokens[:, None], cache, slot, q_positions=q_pos,
                                 k_positions=positions, key_valid=key_valid, prefix_slots=p_len,
                                 blocks=blocks)
    return out[:, 0], cache

  return logits[:, -1], cache, step


def doubles_single_rows(rows: int, method: str) -> bool:
  """Whether greedy or sampled decoding of `rows` rows runs its token steps as two identical
  rows: one row, on a GPU (the prompt is filled in once, as one row). With one row every
  projection of a token step is a vector-matrix product, which XLA's GPU compiler rewrites as a
  multiply and a reduction and, for some (the MLP's, the attention output's), leaves the
  multiply unfused: the weight's products are written out and read back. With two rows they
  stay GEMMs that read each weight once. In the programs XLA compiles for an H100
  (`benchmark.py --aot=h100`), a token step of the 1b preset moves 2.49 GB in 476 kernels at one
  row and 2.13 GB in 343 at two; T5 v1.1 base 0.56 GB in 265 kernels and 0.30 GB in 206. On
  CPUs a second row costs its FLOPs, so they decode one."""
  return rows == 1 and method != "beam" and gpu_aot.tracing_platform() == "gpu"


@functools.partial(jax.jit, static_argnames=("model", "max_decode_len", "method", "temperature",
                                             "top_k", "top_p", "eos_id", "double"))
def _sample_loop(model, params, batch, rng, *, max_decode_len, method, temperature, top_k,
                 top_p, eos_id, double=False):
  """The greedy / sampling loop. `double`: the token steps run the one row of `batch` as two
  identical rows (see `doubles_single_rows`); both take the tokens chosen from the first row's
  logits, so the result is the one row's, sampled with the same random numbers."""
  logits, cache, step = _prepare(model, params, batch, max_decode_len, double)
  b = logits.shape[0]
  rows = 1 if double else b

  def choose(logits, i):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    if method == "greedy":
      token = first_max(logits)
    else:
      filtered = filter_logits(logits, temperature, top_k, top_p)
      token = jax.random.categorical(jax.random.fold_in(rng, i), filtered).astype(jnp.int32)
    return token, jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]

  def select(state):
    """Token i of every row (0 in finished rows): (tokens, state with them recorded)."""
    i, logits, cache, out, done, score = state
    token, token_logp = (jnp.broadcast_to(x, (b,)) for x in choose(logits[:rows], i))
    token = jnp.where(done, 0, token)
    return token, (i, logits, cache, out.at[:, i].set(token), done | (token == eos_id),
                   score + jnp.where(done, 0.0, token_logp))

  def body(state):
    token, (i, _, cache, out, done, score) = select(state)
    logits, cache = step(token, cache, i)
    return i + 1, logits, cache, out, done, score

  def cond(state):
    i, _, _, _, done, _ = state
    return (i < max_decode_len - 1) & ~jnp.all(done)

  init = (jnp.int32(0), logits, cache, jnp.zeros((b, max_decode_len), jnp.int32),
          jnp.zeros((b,), bool), jnp.zeros((b,), jnp.float32))
  # The loop steps the model after each token but the last, which is chosen after it (a no-op
  # where every row has finished): no conditional inside the loop, one step per token.
  _, (_, _, _, out, _, score) = select(jax.lax.while_loop(cond, body, init))
  return {"tokens": out[:rows], "scores": score[:rows]}


def _expand(tree, k):
  return jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), tree)


@functools.partial(jax.jit, static_argnames=("model", "max_decode_len", "beam_size",
                                             "length_penalty", "eos_id"))
def _beam_loop(model, params, batch, *, max_decode_len, beam_size, length_penalty, eos_id):
  k = beam_size
  first_key = "encoder_input_tokens" if model.cfg.arch == "encoder_decoder" else "prompt_tokens"
  batch = {first_key: _expand(jnp.asarray(batch[first_key]), k)}
  logits, cache, step = _prepare(model, params, batch, max_decode_len)
  bk, vocab = logits.shape
  b = bk // k

  def cache_gather(cache, rows):
    # Every layer's caches are [batch*beam, ...].
    return jax.tree.map(lambda x: jnp.take(x, rows, axis=0), cache)

  def select(state):
    """Extends every beam by one token and keeps the k best: (tokens [b*k], new state)."""
    i, logits, cache, tokens, scores, finished = state
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(b, k, vocab)
    only_pad = jnp.where(jnp.arange(vocab) == 0, 0.0, NEG_INF)
    logp = jnp.where(finished[..., None], only_pad, logp)
    candidates = (scores[..., None] + logp).reshape(b, k * vocab)
    top_scores, top_idx = jax.lax.top_k(candidates, k)
    beam, token = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
    rows = (jnp.arange(b)[:, None] * k + beam).reshape(-1)
    tokens = jnp.take_along_axis(tokens, beam[..., None], axis=1).at[:, :, i].set(token)
    finished = jnp.take_along_axis(finished, beam, axis=1) | (token == eos_id)
    return token.reshape(-1), (i, logits, cache_gather(cache, rows), tokens, top_scores, finished)

  def body(state):
    token, (i, _, cache, tokens, scores, finished) = select(state)
    logits, cache = step(token, cache, i)
    return i + 1, logits, cache, tokens, scores, finished

  def cond(state):
    i, *_, finished = state
    return (i < max_decode_len - 1) & ~jnp.all(finished)

  scores = jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1), jnp.float32), (b, 1))
  init = (jnp.int32(0), logits, cache, jnp.zeros((b, k, max_decode_len), jnp.int32), scores,
          jnp.zeros((b, k), bool))
  # As in `_sample_loop`, the last token is chosen after the loop (where all beams finished
  # early, it extends each with padding at no cost to its score).
  _, (_, _, _, tokens, scores, _) = select(jax.lax.while_loop(cond, body, init))
  lengths = jnp.sum(jnp.cumsum(tokens == eos_id, axis=-1) == 0, axis=-1) + 1
  lengths = jnp.minimum(lengths, max_decode_len).astype(jnp.float32)
  normalized = scores / (((5.0 + lengths) / 6.0) ** length_penalty)  # GNMT length penalty
  best = jnp.argmax(normalized, axis=-1)
  return {"tokens": jnp.take_along_axis(tokens, best[:, None, None], axis=1)[:, 0],
          "scores": jnp.take_along_axis(scores, best[:, None], axis=1)[:, 0]}


def decode(model, params, batch: Dict, *, max_decode_len: int = DEFAULT_MAX_DECODE_LEN,
           method: str = "greedy", temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           beam_size: int = 4, length_penalty: float = 0.6, rng=None,
           eos_id: Optional[int] = None):
  """Decodes up to `max_decode_len` tokens per row.

  Returns {"tokens": int [batch, max_decode_len] (0 after EOS), "scores": float [batch]
  (log-likelihood of the tokens)}.
  """
  if method not in METHODS:
    raise ValueError(f"decode method must be one of {METHODS}, got {method!r}")
  key = "encoder_input_tokens" if model.cfg.arch == "encoder_decoder" else "prompt_tokens"
  if key not in batch:
    raise ValueError(f"{model.cfg.arch} decoding needs batch[{key!r}]")
  prompt_len = jnp.shape(batch[key])[1] + (0 if key == "encoder_input_tokens" else 1)
  total = prompt_len + (max_decode_len if key == "prompt_tokens" else 0)
  if total > model.cfg.max_length or (key == "encoder_input_tokens"
                                       and max_decode_len > model.cfg.max_length):
    raise ValueError(f"prompt of {prompt_len} tokens plus {max_decode_len} new tokens exceeds "
                     f"the model's max_length {model.cfg.max_length}")
  eos = model.cfg.eos_id if eos_id is None else eos_id
  if method == "beam":
    return _beam_loop(model, params, batch, max_decode_len=max_decode_len, beam_size=beam_size,
                      length_penalty=length_penalty, eos_id=eos)
  if rng is None:
    rng = jax.random.key(0)
  return _sample_loop(model, params, batch, rng, max_decode_len=max_decode_len, method=method,
                      temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos,
                      double=doubles_single_rows(jnp.shape(batch[key])[0], method))
