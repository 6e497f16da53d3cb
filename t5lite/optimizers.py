"""Optimizers (AdamW, Adafactor) with global-norm clipping, built from a small config."""

import dataclasses

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adamw", "adafactor")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Optimizer choice and hyper-parameters.

  Attributes:
    name: one of OPTIMIZERS.
    b1, b2, eps: AdamW moments.
    weight_decay: decoupled weight decay (AdamW; Adafactor's `weight_decay_rate`).
    clip_norm: global gradient norm clip; 0 disables.
    adafactor_decay_rate: Adafactor second-moment decay exponent (T5: 0.8).
    multiply_by_parameter_scale: Adafactor's relative step size.
  """
  name: str = "adamw"
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.0
  clip_norm: float = 1.0
  adafactor_decay_rate: float = 0.8
  multiply_by_parameter_scale: bool = False


def make_optimizer(cfg: OptimizerConfig, learning_rate) -> optax.GradientTransformation:
  """The optimizer chain: clip by global norm, then the update rule at `learning_rate`."""
  if cfg.name not in OPTIMIZERS:
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {cfg.name!r}")
  if cfg.name == "adamw":
    rule = optax.adamw(learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                       weight_decay=cfg.weight_decay)
  else:
    rule = optax.adafactor(learning_rate, decay_rate=cfg.adafactor_decay_rate,
                           multiply_by_parameter_scale=cfg.multiply_by_parameter_scale,
                           weight_decay_rate=cfg.weight_decay or None, clipping_threshold=None)
  if cfg.clip_norm:
    return optax.chain(clip_by_global_norm(cfg.clip_norm), rule)
  return rule


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
  """optax.clip_by_global_norm (same state, same result), with the gradients scaled by one
  multiply with a scalar factor. XLA fuses a multiply into both AdamW moment updates that read
  the gradient; optax's per-tensor divide it writes out first, one more pass over every gradient
  (46 ms of T5-small's 2.2 s train step on a 2-core CPU).

  A caller that has the gradients' global norm already passes it as the extra argument
  `global_norm` (the trainer does), and it is not computed again.
  """

  def update(updates, state, params=None, *, global_norm=None, **extra_args):
    del params, extra_args
    norm = optax.global_norm(updates) if global_norm is None else global_norm
    factor = jnp.where(norm < max_norm, 1.0, max_norm / norm)
    return jax.tree.map(lambda g: g * factor.astype(g.dtype), updates), state

  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)
