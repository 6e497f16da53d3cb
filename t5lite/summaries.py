"""Metric sinks: `MODEL_DIR/metrics.jsonl` (one JSON object per logged step) and TensorBoard."""

import json
import math
import os
from typing import Dict

import jax

from t5lite import event_files


class MetricsWriter:
  """Writes scalar metrics from process 0; other processes write nothing.

  Args:
    model_dir: run directory; writes `metrics.jsonl` (appending, so resumed runs keep history)
      and TensorBoard event files under `tensorboard/<split>`.
    split: 'train' or 'eval'.
  """

  def __init__(self, model_dir: str, split: str = "train", tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(model_dir, "metrics.jsonl" if split == "train"
                             else f"metrics_{split}.jsonl")
    self._tb = (event_files.ScalarWriter(os.path.join(model_dir, "tensorboard", split))
                if self.enabled and tensorboard else None)

  def write(self, step: int, metrics: Dict[str, float]):
    """Appends one record {step, **metrics}; non-finite values are written as strings."""
    if not self.enabled:
      return
    values = {k: float(v) for k, v in metrics.items()}
    record = {"step": int(step)}
    record.update((k, v if math.isfinite(v) else str(v)) for k, v in values.items())
    if self._tb is not None:
      self._tb.write(step, values)
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps(record) + "\n")

  def close(self):
    """Closes the TensorBoard event file."""
    if self._tb is not None:
      self._tb.close()
