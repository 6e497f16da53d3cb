"""What `infer` and `chat` share: load a checkpoint with its own config and vocabulary, and turn
text into padded batches and decoded ids back into text."""

import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from t5lite import convert, decoding
from t5lite.models.model import Model

VOCAB_FILES = ("spiece.model", "tokenizer.model", "vocab.model")


class Session:
  """A model, its parameters and its vocabulary, loaded from a checkpoint directory.

  Args:
    checkpoint: a t5lite MODEL_DIR or a converted checkpoint directory.
    vocab_file: SentencePiece model; default: the one stored in the checkpoint directory.
    step: checkpoint step (default latest).
  """

  def __init__(self, checkpoint: str, vocab_file: str = "", step: Optional[int] = None,
               extra_ids: int = 100):
    if not os.path.isdir(checkpoint):
      raise FileNotFoundError(f"checkpoint directory not found: {checkpoint}")
    self.cfg, self.params = convert.load_t5lite(checkpoint, step)
    self.model = Model(self.cfg)
    self.vocab = None
    path = vocab_file or next((os.path.join(checkpoint, n) for n in VOCAB_FILES
                               if os.path.exists(os.path.join(checkpoint, n))), "")
    if path:
      from t5lite.data.vocabulary import SentencePieceVocabulary  # pylint: disable=import-outside-toplevel
      vocab = SentencePieceVocabulary(path, extra_ids)
      self.vocab = vocab if vocab.base_vocab_size + extra_ids <= self.cfg.vocab_size else (
          SentencePieceVocabulary(path, 0))

  @property
  def encoder_decoder(self) -> bool:
    """Whether inputs go to an encoder (else they are a decoder prompt)."""
    return self.cfg.arch == "encoder_decoder"

  def encode_text(self, text: str, add_eos: bool) -> List[int]:
    """Text -> ids (EOS appended when asked)."""
    if self.vocab is None:
      raise ValueError("text input needs a vocabulary: put spiece.model in the checkpoint "
                       "directory or pass --vocab_file")
    ids = self.vocab.encode(text)
    return ids + [self.cfg.eos_id] if add_eos else ids

  def decode_ids(self, ids: Sequence[int]) -> str:
    """Ids -> text (stops at EOS)."""
    if self.vocab is None:
      return ""
    return self.vocab.decode(ids)

  def predict(self, inputs: List[List[int]], **decode_kwargs) -> List[List[int]]:
    """Decodes a batch of input id lists; returns generated ids per row, up to EOS."""
    key = "encoder_input_tokens" if self.encoder_decoder else "prompt_tokens"
    limit = self.cfg.max_length
    if not self.encoder_decoder:  # the start token and the new tokens share the positions
      limit -= 1 + decode_kwargs.get("max_decode_len", decoding.DEFAULT_MAX_DECODE_LEN)
    batch = {key: pad(inputs, limit)}
    out = np.asarray(self.model.predict_batch(self.params, batch, **decode_kwargs)["tokens"])
    result = []
    for row in out:
      row = [int(t) for t in row]
      if self.cfg.eos_id in row:
        row = row[: row.index(self.cfg.eos_id)]
      result.append([t for t in row if t != 0])
    return result

  def score(self, inputs: List[List[int]], targets: List[List[int]]) -> np.ndarray:
    """Log-likelihood of each target given its input: [batch]."""
    if self.encoder_decoder:
      tgt = pad(targets, self.cfg.max_length)
      dec_in = np.concatenate([np.zeros((len(targets), 1), np.int32), tgt[:, :-1]], axis=1)
      batch = {"encoder_input_tokens": pad(inputs, self.cfg.max_length),
               "decoder_input_tokens": dec_in,
               "decoder_target_tokens": tgt}
    else:
      rows = [list(i) + list(t) for i, t in zip(inputs, targets)]
      tgt = pad(rows, self.cfg.max_length)
      weights = np.zeros(tgt.shape, np.float32)
      for r, (i, t) in enumerate(zip(inputs, targets)):
        weights[r, len(i):len(i) + len(t)] = 1.0
      dec_in = np.concatenate([np.zeros((len(rows), 1), np.int32), tgt[:, :-1]], axis=1)
      batch = {"decoder_input_tokens": dec_in, "decoder_target_tokens": tgt,
               "decoder_loss_weights": weights}
    return np.asarray(self.model.score_batch(self.params, batch))


def pad(rows: List[List[int]], limit: Optional[int] = None) -> np.ndarray:
  """Right-pads id lists with 0 to a shared length: the next power of two, at least 8, but not
  past `limit` (the model's length limit) unless the longest row is. Inputs of any lengths
  (a file's batches, a chat's growing history) so compile a handful of decoding programs."""
  longest = max(1, max(len(r) for r in rows))
  length = max(8, 1 << (longest - 1).bit_length())
  if limit is not None:
    length = max(longest, min(length, limit))
  out = np.zeros((len(rows), length), np.int32)
  for i, r in enumerate(rows):
    out[i, :len(r)] = r
  return out


def decode_options(args) -> Dict:
  """decode() keyword arguments from parsed CLI flags."""
  import jax  # pylint: disable=import-outside-toplevel
  return {"method": args.decode, "max_decode_len": args.max_decode_len,
          "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
          "beam_size": args.beam_size, "rng": jax.random.key(args.seed)}


def add_decode_flags(parser):
  """The decoding flags shared by infer and chat."""
  parser.add_argument("--decode", default="greedy", choices=("greedy", "sample", "beam"))
  parser.add_argument("--max_decode_len", type=int, default=64)
  parser.add_argument("--temperature", type=float, default=1.0)
  parser.add_argument("--top_k", type=int, default=0)
  parser.add_argument("--top_p", type=float, default=1.0)
  parser.add_argument("--beam_size", type=int, default=4)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--vocab_file", default="")
