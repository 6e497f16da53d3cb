"""Text metrics that tasks declare: perplexity, accuracy, exact match, token F1, BLEU, ROUGE-L.

Chinese needs care: BLEU uses sacrebleu's `zh` tokenizer, and ROUGE-L / F1 split CJK text into
characters (rouge-score's default tokenizer drops CJK characters and scores Chinese 0).
Every metric returns a dict of floats in [0, 100] except perplexity.
"""

import collections
import math
import re
import unicodedata
from typing import Dict, List, Sequence

_CJK = re.compile(r"([\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3000-\u303f\uff00-\uffef])")


def tokenize_mixed(text: str) -> List[str]:
  """Lower-cased words for Latin text, single characters for CJK text and punctuation."""
  text = unicodedata.normalize("NFKC", text).lower()
  tokens = []
  for piece in _CJK.sub(r" \1 ", text).split():
    tokens.extend(t for t in re.findall(r"\w+|[^\w\s]", piece) if t)
  return tokens


def perplexity(total_nll: float, num_tokens: int) -> Dict[str, float]:
  """exp(mean negative log-likelihood)."""
  return {"perplexity": math.exp(min(total_nll / max(num_tokens, 1), 80.0))}


def accuracy(targets: Sequence, predictions: Sequence) -> Dict[str, float]:
  """Percentage of predictions equal to their targets."""
  _check(targets, predictions)
  return {"accuracy": 100.0 * sum(t == p for t, p in zip(targets, predictions)) / len(targets)}


def exact_match(targets: Sequence[str], predictions: Sequence[str]) -> Dict[str, float]:
  """Percentage of predictions equal to their target after whitespace/case normalization."""
  _check(targets, predictions)
  norm = lambda s: " ".join(tokenize_mixed(s))
  return {"exact_match": 100.0 * sum(norm(t) == norm(p) for t, p in zip(targets, predictions))
          / len(targets)}


def token_f1(targets: Sequence[str], predictions: Sequence[str]) -> Dict[str, float]:
  """Mean bag-of-tokens F1 (SQuAD style; CJK characters are tokens)."""
  _check(targets, predictions)
  scores = []
  for t, p in zip(targets, predictions):
    tt, pt = tokenize_mixed(t), tokenize_mixed(p)
    common = sum((collections.Counter(tt) & collections.Counter(pt)).values())
    if not tt or not pt:
      scores.append(float(tt == pt))
      continue
    if common == 0:
      scores.append(0.0)
      continue
    precision, recall = common / len(pt), common / len(tt)
    scores.append(2 * precision * recall / (precision + recall))
  return {"f1": 100.0 * sum(scores) / len(scores)}


def bleu(targets: Sequence[str], predictions: Sequence[str], language: str = "en"
         ) -> Dict[str, float]:
  """Corpus BLEU with sacrebleu (`zh` tokenizer for Chinese, 13a otherwise)."""
  import sacrebleu  # pylint: disable=import-outside-toplevel
  _check(targets, predictions)
  tokenize = "zh" if language.startswith("zh") else "13a"
  return {"bleu": sacrebleu.corpus_bleu(list(predictions), [list(targets)],
                                        tokenize=tokenize).score}


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
  prev = [0] * (len(b) + 1)
  for x in a:
    cur = [0]
    for j, y in enumerate(b):
      cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
    prev = cur
  return prev[-1]


def rouge_l(targets: Sequence[str], predictions: Sequence[str]) -> Dict[str, float]:
  """Mean ROUGE-L F-measure over mixed tokens (characters for CJK text)."""
  _check(targets, predictions)
  scores = []
  for t, p in zip(targets, predictions):
    tt, pt = tokenize_mixed(t), tokenize_mixed(p)
    lcs = _lcs(tt, pt)
    if not lcs:
      scores.append(0.0)
      continue
    precision, recall = lcs / len(pt), lcs / len(tt)
    scores.append(2 * precision * recall / (precision + recall))
  return {"rougeL": 100.0 * sum(scores) / len(scores)}


METRICS = {"accuracy": accuracy, "exact_match": exact_match, "f1": token_f1, "bleu": bleu,
           "rouge_l": rouge_l}


def _check(targets, predictions):
  if len(targets) != len(predictions):
    raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions")
  if not targets:
    raise ValueError("no examples to score")
