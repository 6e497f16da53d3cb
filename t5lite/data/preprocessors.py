"""Pretraining objectives on token ids, in numpy (no TensorFlow): span corruption, prefix LM, LM.

Each preprocessor maps (token ids, numpy Generator) to an `{"inputs", "targets"}` example. The
generator is seeded per example by the stream, so every example is reproducible from
(seed, example index) alone.
"""

import numpy as np

EOS_ID = 1


def random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator):
  """Splits `num_items` into `num_segments` positive lengths, uniformly at random."""
  cuts = np.sort(rng.choice(np.arange(1, num_items), num_segments - 1, replace=False))
  return np.diff(np.concatenate([[0], cuts, [num_items]])).astype(np.int64)


def random_spans_noise_mask(length: int, noise_density: float, mean_span_length: float,
                            rng: np.random.Generator) -> np.ndarray:
  """T5's noise mask: about `noise_density * length` noise tokens in spans of mean length
  `mean_span_length`, alternating with non-noise spans and starting with non-noise."""
  num_noise = int(round(length * noise_density))
  num_noise = min(max(num_noise, 1), length - 1)
  num_spans = max(int(round(num_noise / mean_span_length)), 1)
  num_spans = min(num_spans, num_noise, length - num_noise)
  noise_lengths = random_segmentation(num_noise, num_spans, rng)
  keep_lengths = random_segmentation(length - num_noise, num_spans, rng)
  mask = np.zeros(length, bool)
  pos = 0
  for keep, noise in zip(keep_lengths, noise_lengths):
    pos += keep
    mask[pos:pos + noise] = True
    pos += noise
  return mask


def span_corruption(tokens, rng: np.random.Generator, *, vocab_size: int,
                    noise_density: float = 0.15, mean_span_length: float = 3.0,
                    max_length: int = 0):
  """T5 span corruption.

  Noise spans in the inputs are replaced by one sentinel each (`<extra_id_0>` = vocab_size - 1,
  counting down); the targets list each sentinel followed by the span it hides. Both end in EOS.
  """
  tokens = np.asarray(tokens, np.int32)
  if max_length:
    tokens = tokens[:max_length]
  if len(tokens) < 2:
    return {"inputs": np.append(tokens, EOS_ID).astype(np.int32),
            "targets": np.asarray([EOS_ID], np.int32)}
  mask = random_spans_noise_mask(len(tokens), noise_density, mean_span_length, rng)
  inputs = _replace_spans_with_sentinels(tokens, mask, vocab_size)
  # Targets are the complement: every kept span becomes the sentinel that precedes the noise
  # span after it, giving [<extra_id_0>, span_0..., <extra_id_1>, span_1..., ...].
  targets = _replace_spans_with_sentinels(tokens, ~mask, vocab_size)
  return {"inputs": np.append(inputs, EOS_ID).astype(np.int32),
          "targets": np.append(targets, EOS_ID).astype(np.int32)}


def _replace_spans_with_sentinels(tokens, mask, vocab_size: int):
  """Replaces each run of masked tokens by one sentinel, numbered from the top of the vocab."""
  previous = np.concatenate([[False], mask[:-1]])
  starts = mask & ~previous
  sentinels = vocab_size - np.cumsum(starts)
  return np.where(starts, sentinels, tokens)[~mask | starts]


def prefix_lm(tokens, rng: np.random.Generator, *, max_length: int = 0):
  """Splits a document at a uniformly random point: the prefix is the input, the rest the target."""
  tokens = np.asarray(tokens, np.int32)
  if max_length:
    tokens = tokens[:max_length]
  split = int(rng.integers(1, len(tokens))) if len(tokens) > 1 else len(tokens)
  return {"inputs": tokens[:split],
          "targets": np.append(tokens[split:], EOS_ID).astype(np.int32)}


def causal_lm(tokens, rng: np.random.Generator, *, max_length: int = 0):
  """The whole document is the target (decoder-only language modelling)."""
  del rng
  tokens = np.asarray(tokens, np.int32)
  if max_length:
    tokens = tokens[:max_length]
  return {"inputs": np.zeros((0,), np.int32),
          "targets": np.append(tokens, EOS_ID).astype(np.int32)}
