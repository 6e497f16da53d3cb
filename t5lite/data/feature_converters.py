"""Feature converters: `{"inputs", "targets"}` examples -> model features, with packing.

Output features follow T5X: encoder-decoder rows get `encoder_input_tokens`,
`decoder_input_tokens` (targets shifted right, restarting at every packed segment),
`decoder_target_tokens`, `decoder_loss_weights`, `*_segment_ids` and `*_positions`. Decoder-only
rows concatenate inputs and targets; prefix-LM rows also get `decoder_causal_attention` (1 on the
prefix) and put loss on the targets only.

Packing is greedy and in order, so a batch is a pure function of the examples it consumes.
"""

import dataclasses
from typing import Dict, List

import numpy as np

Example = Dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class FeatureLengths:
  """Row lengths: `inputs` (encoder) and `targets` (decoder, or the whole decoder-only row)."""
  inputs: int = 0
  targets: int = 128


def _shift_right(tokens, segment_ids):
  """Teacher-forcing inputs: previous token, 0 at the start of every segment."""
  shifted = np.concatenate([[0], tokens[:-1]]).astype(np.int32)
  starts = np.concatenate([[True], segment_ids[1:] != segment_ids[:-1]])
  return np.where(starts, 0, shifted).astype(np.int32)


class _RowBuilder:
  """Accumulates packed segments for one row of each feature."""

  def __init__(self, lengths: Dict[str, int]):
    self.lengths = lengths
    self.parts = {k: [] for k in lengths}
    self.used = {k: 0 for k in lengths}

  def fits(self, sizes: Dict[str, int]) -> bool:
    """Whether a segment of these sizes (per feature) still fits in the row."""
    return all(self.used[k] + sizes[k] <= self.lengths[k] for k in sizes)

  def empty(self) -> bool:
    """Whether no segment has been added yet."""
    return all(u == 0 for u in self.used.values())

  def add(self, arrays: Dict[str, np.ndarray]):
    """Appends one example's arrays (per feature) as the next segment."""
    for k, v in arrays.items():
      self.parts[k].append(v)
      self.used[k] += len(v)

  def build(self) -> Dict[str, np.ndarray]:
    """The row: tokens, segment ids (1, 2, ...; 0 = padding) and positions per feature."""
    out = {}
    for k, length in self.lengths.items():
      tokens = np.zeros(length, np.int32)
      seg = np.zeros(length, np.int32)
      pos = np.zeros(length, np.int32)
      offset = 0
      for i, part in enumerate(self.parts[k]):
        tokens[offset:offset + len(part)] = part
        seg[offset:offset + len(part)] = i + 1
        pos[offset:offset + len(part)] = np.arange(len(part))
        offset += len(part)
      out[k] = tokens
      out[k + "_segment_ids"] = seg
      out[k + "_positions"] = pos
    return out


class EncDecFeatureConverter:
  """Encoder-decoder rows (T5). Examples longer than the row are truncated."""

  def __init__(self, lengths: FeatureLengths, pack: bool = True):
    self.lengths = lengths
    self.pack = pack

  def parts(self, ex: Example) -> Dict[str, np.ndarray]:
    """An example's arrays as a row holds them, each cut to its row length."""
    inputs = np.asarray(ex["inputs"], np.int32)[: self.lengths.inputs]
    targets = np.asarray(ex["targets"], np.int32)[: self.lengths.targets]
    return {"inputs": inputs, "targets": targets}

  def new_row(self):
    """An empty row builder."""
    return _RowBuilder({"inputs": self.lengths.inputs, "targets": self.lengths.targets})

  def finish(self, row: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Row arrays -> model features."""
    targets, seg = row["targets"], row["targets_segment_ids"]
    return {
        "encoder_input_tokens": row["inputs"],
        "encoder_segment_ids": row["inputs_segment_ids"],
        "encoder_positions": row["inputs_positions"],
        "decoder_input_tokens": _shift_right(targets, seg),
        "decoder_target_tokens": targets,
        "decoder_segment_ids": seg,
        "decoder_positions": row["targets_positions"],
        "decoder_loss_weights": (targets != 0).astype(np.float32) * (seg > 0),
    }


class DecoderFeatureConverter:
  """Decoder-only rows: inputs ++ targets; loss on targets (and on inputs when `loss_on_inputs`).

  With `prefix_lm`, rows also carry `decoder_causal_attention` marking the visible prefix.
  """

  def __init__(self, lengths: FeatureLengths, pack: bool = True, prefix_lm: bool = False,
               loss_on_inputs: bool = False):
    self.lengths = lengths
    self.pack = pack
    self.prefix_lm = prefix_lm
    self.loss_on_inputs = loss_on_inputs

  def parts(self, ex: Example) -> Dict[str, np.ndarray]:
    """An example's tokens (inputs ++ targets, cut to the row length) and its prefix marks."""
    inputs = np.asarray(ex["inputs"], np.int32)
    targets = np.asarray(ex["targets"], np.int32)
    tokens = np.concatenate([inputs, targets])[: self.lengths.targets]
    is_input = (np.arange(len(tokens)) < len(inputs)).astype(np.int32)
    return {"targets": tokens, "prefix": is_input}

  def new_row(self):
    """An empty row builder."""
    return _RowBuilder({"targets": self.lengths.targets, "prefix": self.lengths.targets})

  def finish(self, row: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Row arrays -> model features."""
    targets, seg, prefix = row["targets"], row["targets_segment_ids"], row["prefix"]
    weights = (seg > 0).astype(np.float32)
    if not self.loss_on_inputs:
      weights = weights * (1 - prefix)
    out = {
        "decoder_input_tokens": _shift_right(targets, seg),
        "decoder_target_tokens": targets,
        "decoder_segment_ids": seg,
        "decoder_positions": row["targets_positions"],
        "decoder_loss_weights": weights.astype(np.float32),
    }
    if self.prefix_lm:
      # The shifted input at a prefix position's successor is still prefix (T5X convention).
      out["decoder_causal_attention"] = np.maximum(
          prefix, np.concatenate([[0], prefix[:-1]]) * (seg > 0)).astype(np.int32)
    return out


def build_rows(converter, examples, num_rows: int):
  """Packs `examples` (an iterator) into `num_rows` rows; returns (rows, examples consumed).

  Greedy in order: an example that does not fit closes the row and opens the next one; with
  packing off every row holds one example. The example that overflowed the last row is not
  consumed, so the next batch starts with it.
  """
  rows: List[Dict[str, np.ndarray]] = []
  consumed = 0
  row = converter.new_row()
  pending = None
  while len(rows) < num_rows:
    if pending is None:
      pending = converter.parts(next(examples))
    sizes = {k: len(v) for k, v in pending.items()}
    if row.fits(sizes) and (converter.pack or row.empty()):
      row.add(pending)
      consumed += 1
      pending = None
      continue
    if row.empty():
      raise AssertionError("an example larger than an empty row after truncation")
    rows.append(converter.finish(row.build()))
    row = converter.new_row()
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}, consumed
