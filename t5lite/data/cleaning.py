"""Text cleaning rules for pretraining corpora, as plain functions (no datatrove, no TensorFlow).

`t5lite.data.clean_steps` wraps them as datatrove pipeline steps and `scripts/clean_data.py`
runs them. Every filter returns None to keep a document or a short reason to drop it.
"""

import dataclasses
import hashlib
import html
import math
import re
import unicodedata
from typing import Iterable, List, Optional, Sequence

import numpy as np

from t5lite import metrics

# Full-width CJK punctuation that NFKC would fold into ASCII (ChatYuan's `用户：` among them).
CJK_PUNCTUATION = set("，。：；！？（）【】「」『』《》、“”‘’…—～·")
TERMINAL_PUNCTUATION = tuple(".!?。！？…\"”’」』)）")
_TAG = re.compile(r"<\s*/?\s*[a-zA-Z][^<>]{0,200}>")
_SPACES = re.compile(r"[ \t\u00a0\u3000]+")
_BLANK_LINES = re.compile(r"\n\s*\n+")


def normalize(text: str, nfkc: bool = True) -> str:
  """NFKC (keeping full-width CJK punctuation), HTML remnants removed, whitespace collapsed."""
  text = html.unescape(text)
  text = _TAG.sub(" ", text)
  if nfkc:
    text = "".join(c if c in CJK_PUNCTUATION else unicodedata.normalize("NFKC", c) for c in text)
  text = text.replace("\r\n", "\n").replace("\r", "\n")
  text = _SPACES.sub(" ", text)
  text = _BLANK_LINES.sub("\n\n", text)
  return "\n".join(line.strip() for line in text.split("\n")).strip()


def is_han(c: str) -> bool:
  """Whether `c` is a CJK unified ideograph (Chinese character)."""
  o = ord(c)
  return 0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0x20000 <= o <= 0x2A6DF


def script_language(text: str, threshold: float = 0.5) -> str:
  """"zh", "en" or "other" by the share of Han characters and Latin letters among letters."""
  han = sum(1 for c in text if is_han(c))
  latin = sum(1 for c in text if c.isascii() and c.isalpha())
  letters = sum(1 for c in text if c.isalpha())
  if not letters:
    return "other"
  if han / letters >= threshold:
    return "zh"
  if latin / letters >= threshold:
    return "en"
  return "other"


@dataclasses.dataclass(frozen=True)
class FilterConfig:
  """Thresholds of the quality filters (0 or empty disables one).

  Attributes:
    min_chars / max_chars: document length bounds, in characters.
    require_terminal_punctuation: the text must end in sentence-final punctuation.
    languages: keep only these script languages ("zh", "en").
    max_duplicate_line_fraction: drop when more of the lines than this repeat another line.
    max_char_run: drop when one character repeats more than this many times in a row.
    max_top_char_fraction: drop when the most common non-space character is more than this
      fraction of the text.
    blocklist: drop documents containing any of these words (case-insensitive substring).
  """
  min_chars: int = 20
  max_chars: int = 100_000
  require_terminal_punctuation: bool = True
  languages: Sequence[str] = ("zh", "en")
  max_duplicate_line_fraction: float = 0.3
  max_char_run: int = 20
  max_top_char_fraction: float = 0.3
  blocklist: Sequence[str] = ()


def length_filter(text: str, cfg: FilterConfig) -> Optional[str]:
  """Too short or too long."""
  if len(text) < cfg.min_chars:
    return "too_short"
  if cfg.max_chars and len(text) > cfg.max_chars:
    return "too_long"
  return None


def punctuation_filter(text: str, cfg: FilterConfig) -> Optional[str]:
  """The text does not end like a complete sentence."""
  if cfg.require_terminal_punctuation and not text.rstrip().endswith(TERMINAL_PUNCTUATION):
    return "no_terminal_punctuation"
  return None


def language_filter(text: str, cfg: FilterConfig) -> Optional[str]:
  """The script language is not one we keep."""
  if cfg.languages and script_language(text) not in cfg.languages:
    return "language"
  return None


def repetition_filter(text: str, cfg: FilterConfig) -> Optional[str]:
  """Repeated lines, long runs of one character, or one character dominating the text."""
  lines = [l for l in text.split("\n") if l.strip()]
  if len(lines) > 1 and cfg.max_duplicate_line_fraction:
    duplicates = len(lines) - len(set(lines))
    if duplicates / len(lines) > cfg.max_duplicate_line_fraction:
      return "repeated_lines"
  if cfg.max_char_run and re.search(r"(.)\1{%d,}" % cfg.max_char_run, text):
    return "repeated_characters"
  chars = [c for c in text if not c.isspace()]
  if chars and cfg.max_top_char_fraction:
    top = max(np.unique(np.array(chars), return_counts=True)[1])
    if len(chars) >= 20 and top / len(chars) > cfg.max_top_char_fraction:
      return "repeated_characters"
  return None


def blocklist_filter(text: str, cfg: FilterConfig) -> Optional[str]:
  """Contains a blocked keyword."""
  lowered = text.lower()
  if any(word.lower() in lowered for word in cfg.blocklist if word):
    return "blocklist"
  return None


FILTERS = (length_filter, punctuation_filter, language_filter, repetition_filter,
           blocklist_filter)


def first_failed_filter(text: str, cfg: FilterConfig) -> Optional[str]:
  """The reason of the first filter that drops `text`, or None to keep it."""
  for f in FILTERS:
    reason = f(text, cfg)
    if reason:
      return reason
  return None


# ----- deduplication -----

def exact_hash(text: str) -> str:
  """A 128-bit hex digest of the text (after normalization)."""
  return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


_MAX64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
  """A strong 64-bit mixing function (wrapping arithmetic), used as a seeded hash family."""
  with np.errstate(over="ignore"):
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class MinHasher:
  """MinHash signatures over character n-gram shingles (whitespace removed, lowercased).

  Character shingles work for Chinese (no word boundaries) and English alike. The k-th hash
  function is splitmix64(shingle XOR seed_k). (A linear (a * h + b) mod p family with 32-bit
  a is not enough: for small h it preserves the order of h, so every function picks the same
  minimum and the estimate collapses to 0 or 1.)
  """

  def __init__(self, num_perm: int = 128, ngram: int = 5, seed: int = 1):
    rng = np.random.default_rng(seed)
    self.seeds = rng.integers(0, np.iinfo(np.int64).max, num_perm, dtype=np.int64).astype(
        np.uint64)
    self.ngram = ngram
    self.num_perm = num_perm

  def shingles(self, text: str) -> np.ndarray:
    """Unique 64-bit hashes of the text's character n-grams."""
    s = re.sub(r"\s+", "", text.lower())
    codes = np.frombuffer(s.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    n = max(1, len(codes) - self.ngram + 1)
    h = np.zeros(n, np.uint64)
    with np.errstate(over="ignore"):
      for j in range(min(self.ngram, len(codes))):
        h = h * np.uint64(1_000_003) + codes[j:j + n]
    return np.unique(_splitmix64(h))

  def signature(self, text: str) -> np.ndarray:
    """[num_perm] uint64 MinHash signature."""
    sh = self.shingles(text)
    if not len(sh):
      return np.full(self.num_perm, _MAX64, np.uint64)
    return _splitmix64(sh[None, :] ^ self.seeds[:, None]).min(axis=1)


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> float:
  """Share of equal MinHash values: an unbiased estimate of the shingle sets' Jaccard."""
  return float(np.mean(a == b))


class LshIndex:
  """Locality-sensitive hashing over MinHash bands, in memory.

  A document is a near-duplicate when it shares a band with a kept document whose estimated
  Jaccard similarity is at least `threshold`. With b bands of r rows, two documents of Jaccard J
  become candidates with probability 1 - (1 - J^r)^b.
  """

  def __init__(self, num_perm: int = 128, bands: int = 32, threshold: float = 0.7):
    if num_perm % bands:
      raise ValueError(f"num_perm {num_perm} is not a multiple of bands {bands}")
    self.bands, self.rows, self.threshold = bands, num_perm // bands, threshold
    self.tables: List[dict] = [{} for _ in range(bands)]
    self.signatures: List[np.ndarray] = []
    self.keys: List[str] = []

  def query_and_insert(self, key: str, sig: np.ndarray) -> Optional[str]:
    """The key of a kept near-duplicate of `sig`, or None (then `sig` is kept and indexed)."""
    band_keys = [sig[i * self.rows:(i + 1) * self.rows].tobytes() for i in range(self.bands)]
    seen = set()
    for table, bk in zip(self.tables, band_keys):
      for idx in table.get(bk, ()):
        if idx not in seen:
          seen.add(idx)
          if estimated_jaccard(sig, self.signatures[idx]) >= self.threshold:
            return self.keys[idx]
    idx = len(self.signatures)
    self.signatures.append(sig)
    self.keys.append(key)
    for table, bk in zip(self.tables, band_keys):
      table.setdefault(bk, []).append(idx)
    return None


class BloomFilter:
  """A fixed-memory set for exact dedup of corpora larger than memory.

  Sized for `capacity` items at false-positive rate `error`: m = -n ln p / (ln 2)^2 bits and
  k = m/n ln 2 hashes (double hashing of one digest). A false positive drops a unique document,
  at most at rate `error` while fewer than `capacity` items are stored.
  """

  def __init__(self, capacity: int, error: float = 1e-4):
    if capacity <= 0 or not 0 < error < 1:
      raise ValueError("BloomFilter needs capacity > 0 and 0 < error < 1")
    self.num_bits = max(8, int(math.ceil(-capacity * math.log(error) / math.log(2) ** 2)))
    self.num_hashes = max(1, round(self.num_bits / capacity * math.log(2)))
    self.bits = np.zeros((self.num_bits + 7) // 8, np.uint8)

  @property
  def nbytes(self) -> int:
    """Memory held by the bit array."""
    return self.bits.nbytes

  def _positions(self, key: str) -> np.ndarray:
    d = hashlib.blake2b(key.encode("utf-8"), digest_size=16).digest()
    h1, h2 = int.from_bytes(d[:8], "little"), int.from_bytes(d[8:], "little") | 1
    return np.array([(h1 + i * h2) % self.num_bits for i in range(self.num_hashes)], np.int64)

  def add(self, key: str) -> bool:
    """Adds `key`; returns True when it was (probably) present already."""
    pos = self._positions(key)
    byte, bit = pos // 8, (pos % 8).astype(np.uint8)
    present = bool(np.all(self.bits[byte] & (np.uint8(1) << bit)))
    np.bitwise_or.at(self.bits, byte, np.uint8(1) << bit)
    return present


def summary_table(counts: dict, total: int) -> str:
  """A text table of documents per outcome, with the share of all input records."""
  width = max([len(k) for k in counts] + [20])
  lines = [f"{'outcome':{width}s} {'records':>9s} {'share':>7s}", "-" * (width + 18)]
  for k, v in counts.items():
    lines.append(f"{k:{width}s} {v:9d} {100.0 * v / max(total, 1):6.2f}%")
  lines.append(f"{'input records':{width}s} {total:9d}")
  return "\n".join(lines)


def perplexities(session, texts: Iterable[str], batch_size: int = 32) -> List[float]:
  """Per-token perplexity of each text under a t5lite checkpoint (`serving.Session`).

  Decoder-only models score the text left to right. Encoder-decoder models are span-corruption
  denoisers, not left-to-right LMs, so they score what they were trained on: the text with 15%
  of its tokens in noise spans (fixed seed), perplexity over the target spans.
  """
  from t5lite.data import preprocessors  # pylint: disable=import-outside-toplevel
  texts = list(texts)
  limit = session.cfg.max_length - 1
  out: List[float] = []
  for start in range(0, len(texts), batch_size):
    inputs, targets = [], []
    for t in texts[start:start + batch_size]:
      ids = session.encode_text(t, add_eos=False)[:limit]
      if session.encoder_decoder:
        ex = preprocessors.span_corruption(ids, np.random.default_rng(0),
                                           vocab_size=session.vocab.vocab_size)
        inputs.append([int(i) for i in ex["inputs"]])
        targets.append([int(i) for i in ex["targets"]])
      else:
        inputs.append([])
        targets.append(ids + [session.cfg.eos_id])
    scores = session.score(inputs, targets)
    out += [metrics.perplexity(-float(s), len(t))["perplexity"] for s, t in zip(scores, targets)]
  return out
