"""Learning-rate schedules (warmup then cosine / linear / rsqrt / constant) and batch ramp-up."""

import dataclasses
from typing import Sequence, Tuple

import jax.numpy as jnp

DECAYS = ("cosine", "linear", "rsqrt", "constant")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
  """Learning rate over steps.

  Attributes:
    learning_rate: peak rate (for rsqrt: the rate at the end of warmup).
    warmup_steps: linear warmup from 0 (rsqrt: constant at the peak during warmup, as T5X).
    decay: one of DECAYS.
    decay_steps: where cosine / linear reach `end_fraction * learning_rate` (default: run length).
    end_fraction: final rate as a fraction of the peak.
  """
  learning_rate: float = 1e-3
  warmup_steps: int = 0
  decay: str = "cosine"
  decay_steps: int = 0
  end_fraction: float = 0.0


def make_schedule(cfg: ScheduleConfig, total_steps: int):
  """An optax-style schedule: step -> learning rate."""
  if cfg.decay not in DECAYS:
    raise ValueError(f"decay must be one of {DECAYS}, got {cfg.decay!r}")
  peak, warmup = cfg.learning_rate, max(cfg.warmup_steps, 0)
  decay_steps = max((cfg.decay_steps or total_steps) - warmup, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    if cfg.decay == "rsqrt":
      return peak * jnp.sqrt(max(warmup, 1) / jnp.maximum(step, max(warmup, 1)))
    ramp = jnp.minimum(1.0, (step + 1) / warmup) if warmup else 1.0
    progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
    end = cfg.end_fraction
    if cfg.decay == "cosine":
      factor = end + (1 - end) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
    elif cfg.decay == "linear":
      factor = 1 - (1 - end) * progress
    else:
      factor = 1.0
    return peak * ramp * factor

  return schedule


def batch_size_at(step: int, batch_size: int, ramp: Sequence[Tuple[int, int]] = ()) -> int:
  """Global batch size at `step`: the last `(start_step, size)` of `ramp` whose start has passed,
  else `batch_size` (ChatYuan style: small batches first, larger later)."""
  size = batch_size
  for start, ramp_size in sorted(ramp):
    if step >= start:
      size = ramp_size
  return size
