"""SentencePiece vocabulary (T5 layout, no TensorFlow) and cached tokenizer training.

Layout as in T5: pad 0, eos 1, unk 2, then the SentencePiece pieces, then `extra_ids` sentinel
ids at the top of the vocabulary, counted down (`<extra_id_0>` is the largest id).
"""

import hashlib
import io
import json
import os
import re
from typing import Iterable, List, Sequence

import sentencepiece as spm

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
_SENTINEL = re.compile(r"<extra_id_(\d+)>")


class SentencePieceVocabulary:
  """A SentencePiece model plus T5-style sentinel ids.

  Args:
    model_file: path of a `.model` file.
    extra_ids: number of sentinel ids appended above the SentencePiece pieces.
  """

  def __init__(self, model_file: str, extra_ids: int = 100):
    if not os.path.exists(model_file):
      raise FileNotFoundError(f"sentencepiece model not found: {model_file}")
    self.model_file = model_file
    self.extra_ids = extra_ids
    self._sp = spm.SentencePieceProcessor(model_file=model_file)

  @property
  def base_vocab_size(self) -> int:
    """Pieces in the SentencePiece model."""
    return self._sp.get_piece_size()

  @property
  def vocab_size(self) -> int:
    """Pieces plus sentinels."""
    return self.base_vocab_size + self.extra_ids

  @property
  def pad_id(self) -> int:
    """Padding id (0)."""
    return PAD_ID

  @property
  def eos_id(self) -> int:
    """End-of-sequence id (1)."""
    return EOS_ID

  def sentinel_id(self, i: int) -> int:
    """Id of `<extra_id_i>`: counted down from the top of the vocabulary."""
    if not 0 <= i < self.extra_ids:
      raise ValueError(f"sentinel {i} out of range (extra_ids={self.extra_ids})")
    return self.vocab_size - 1 - i

  def encode(self, text: str) -> List[int]:
    """Text -> ids (no EOS appended); `<extra_id_N>` in the text becomes sentinel N."""
    ids: List[int] = []
    for i, part in enumerate(_SENTINEL.split(text)):
      if i % 2:
        ids.append(self.sentinel_id(int(part)))
      elif part:
        ids.extend(self._sp.encode(part))
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    """Ids -> text; stops at EOS, skips padding, renders sentinels as `<extra_id_i>`."""
    pieces, run = [], []
    for i in ids:
      i = int(i)
      if i == EOS_ID:
        break
      if i == PAD_ID:
        continue
      if i >= self.base_vocab_size:
        pieces.append(self._sp.decode(run))
        run = []
        pieces.append(f"<extra_id_{self.vocab_size - 1 - i}>")
      else:
        run.append(i)
    pieces.append(self._sp.decode(run))
    return "".join(pieces)


def train_sentencepiece(lines: Iterable[str], model_prefix: str, vocab_size: int = 1000,
                        model_type: str = "unigram", character_coverage: float = 0.9995,
                        byte_fallback: bool = True, split_digits: bool = True,
                        user_defined_symbols: Sequence[str] = (),
                        normalization: str = "identity") -> str:
  """Trains a T5-layout SentencePiece model with Chinese-aware settings; returns the .model path.

  `normalization` defaults to identity rather than SentencePiece's nmt_nfkc, because NFKC folds
  full-width punctuation (ChatYuan's `用户：`) into ASCII and breaks the round trip; clean text
  before training instead.

  The model file is written atomically, so a killed training never leaves a half-written model.
  """
  os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
  buffer = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(list(lines)), model_writer=buffer, vocab_size=vocab_size,
      model_type=model_type, character_coverage=character_coverage, byte_fallback=byte_fallback,
      split_digits=split_digits, user_defined_symbols=list(user_defined_symbols),
      normalization_rule_name=normalization, pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1, hard_vocab_limit=False,
      minloglevel=2)
  path = model_prefix + ".model"
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(buffer.getvalue())
  os.replace(tmp, path)
  return path


def cached_sentencepiece(corpus_file: str, cache_dir: str, vocab_size: int = 1000,
                         **options) -> str:
  """Trains a SentencePiece model on `corpus_file` once; later calls reuse the cached model.

  The cache key is a hash of the corpus bytes and the training options.
  """
  with open(corpus_file, "rb") as f:
    digest = hashlib.sha256(f.read())
  digest.update(json.dumps({"vocab_size": vocab_size, **options}, sort_keys=True).encode())
  prefix = os.path.join(cache_dir, f"spm_{vocab_size}_{digest.hexdigest()[:12]}")
  if os.path.exists(prefix + ".model"):
    return prefix + ".model"
  with open(corpus_file, encoding="utf-8") as f:
    lines = [line.rstrip("\n") for line in f if line.strip()]
  return train_sentencepiece(lines, prefix, vocab_size=vocab_size, **options)
