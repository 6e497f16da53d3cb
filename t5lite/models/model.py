"""The model layer: one interface over every architecture (loss, score_batch, predict_batch).

A `Model` holds the network's graph definition; its parameters travel separately as a
nested dict of arrays, so every method is a pure function of (params, batch, rng) that jit can trace.
"""

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from t5lite import losses
from t5lite.models import transformer
from t5lite.models.config import ModelConfig
from t5lite.models.transformer import build_network


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """How the training loss is formed (T5X defaults: z-loss 1e-4, no smoothing, real tokens).

  Attributes:
    z_loss: coefficient of log(Z)^2.
    label_smoothing: mass spread over the other classes.
    normalization: one of `losses.NORMALIZATIONS`.
    head_chunks: 0 forms the [batch, length, vocab] logits whole; N >= 1 runs the output head
      and the cross-entropy in N blocks along the target length (`losses.head_cross_entropy`),
      so only a block's logits exist at a time: a memory lever for long targets and large
      vocabularies, with the same loss and gradients.
  """
  z_loss: float = 1e-4
  label_smoothing: float = 0.0
  normalization: str = "tokens"
  head_chunks: int = 0

  def __post_init__(self):
    if self.head_chunks < 0:
      raise ValueError(f"LossConfig.head_chunks must be >= 0, got {self.head_chunks}")


class Model:
  """A network plus its loss; parameters are passed in, never stored.

  Args:
    cfg: network shape.
    loss_cfg: loss options.
  """

  def __init__(self, cfg: ModelConfig, loss_cfg: LossConfig = LossConfig()):
    self.cfg = cfg
    self.loss_cfg = loss_cfg
    abstract = nnx.eval_shape(lambda: build_network(cfg, nnx.Rngs(0)))
    # `annotated` keeps the Variables (with their `logical_axes`) for partitioning; parameters
    # themselves travel as plain nested dicts of arrays.
    self.graphdef, self.annotated_params = nnx.split(abstract)
    self.abstract_params = nnx.to_pure_dict(self.annotated_params)
    # Filled by t5lite.decoding when it is imported (keeps the model layer free of decoding).
    self.decode_fn: Optional[Callable] = None
    self._unrolled_graphdef = None  # the graph of `unroll`'s parameters, built on first use

  def init(self, rng) -> dict:
    """Fresh parameters (a nested dict of arrays) from a PRNG key."""
    return nnx.to_pure_dict(nnx.split(build_network(self.cfg, nnx.Rngs(params=rng)))[1])

  def network(self, params) -> nnx.Module:
    """The live network module for `params`, stacked or unrolled (`unroll`)."""
    if transformer.is_unrolled(params):
      if self._unrolled_graphdef is None:
        self._unrolled_graphdef = nnx.split(nnx.eval_shape(
            lambda: _unrolled(build_network(self.cfg, nnx.Rngs(0)))))[0]
      return nnx.merge(self._unrolled_graphdef, params)
    return nnx.merge(self.graphdef, params)

  def unroll(self, params) -> dict:
    """`params` with each layer stack held layer by layer (`LayerStack.unroll`): what inference
    reads from a fixed set of weights (`serving.Session` holds them so). Every method takes them
    and computes what the stacked ones do, the layers run in order (as with `scan_layers=False`:
    the same values, in bf16 to rounding against a scan); decoding then copies no layer's weights
    out of a stack per call (peak memory about the weights plus the KV cache, not twice the
    weights). Sharded arrays stay sharded. Training and checkpoints keep the stacked form."""
    if transformer.is_unrolled(params):
      return params
    return jax.jit(lambda p: nnx.to_pure_dict(nnx.split(_unrolled(self.network(p)))[1]))(params)

  def apply(self, params, batch, rng=None):
    """Forward pass: (logits [batch, len, vocab] float32, aux_loss). rng=None disables dropout."""
    return self.network(params)(batch, rng)

  def head_operands(self, params, batch, rng=None):
    """The output head's operands, logits = x @ kernel.T, without forming the logits.

    Returns:
      (x [batch, len, embed], kernel [vocab, embed], aux_loss); a tied T5 head's rescale is
      already in x.
    """
    net = self.network(params)
    x, aux = net.features(batch, rng)
    x, kernel = net.head.operands(x, net.token_embed)
    return x, kernel, aux

  def loss_terms(self, params, batch, rng=None):
    """Summed (not averaged) loss terms of a batch, so microbatches can be added up.

    Returns:
      (loss_sum, metrics) where loss_sum is the weighted token loss sum plus the MoE balancing
      term scaled by the batch's real token count, and metrics holds sums for logging.
    """
    targets = batch["decoder_target_tokens"]
    weights, _ = losses.loss_weights(targets, batch.get("decoder_loss_weights"),
                                     self.loss_cfg.normalization)
    options = {"z_loss": self.loss_cfg.z_loss, "label_smoothing": self.loss_cfg.label_smoothing}
    if self.loss_cfg.head_chunks:
      x, kernel, aux = self.head_operands(params, batch, rng)
      loss_sum, (token_loss, z_term, top) = losses.head_cross_entropy(
          x, kernel, targets, weights, chunks=self.loss_cfg.head_chunks,
          dtype=self.cfg.dtype, **options)
    else:
      logits, aux = self.apply(params, batch, rng)
      token_loss, z_term = losses.cross_entropy_with_logits(logits, targets, **options)
      top = losses.target_is_top(logits, targets)
      loss_sum = jnp.sum(token_loss * weights)
    real = (batch.get("decoder_loss_weights", targets != 0)).astype(jnp.float32)
    correct = top * real
    denominator = self.denominator(batch)
    moe = self.cfg.moe_aux_loss_weight * aux * denominator if self.cfg.num_experts else 0.0
    metrics = {
        "loss_sum": loss_sum,
        "z_loss_sum": jnp.sum(z_term * weights),
        "nll_sum": jnp.sum((token_loss - z_term) * real),
        "correct_sum": jnp.sum(correct),
        "token_count": jnp.sum(real),
        "moe_aux": jnp.asarray(aux, jnp.float32),
    }
    return loss_sum + moe, metrics

  def denominator(self, batch):
    """The loss denominator of a (full, not micro) batch under the configured normalization."""
    targets = batch["decoder_target_tokens"]
    _, denom = losses.loss_weights(targets, batch.get("decoder_loss_weights"),
                                   self.loss_cfg.normalization)
    return jnp.maximum(denom, 1.0)

  def loss(self, params, batch, rng=None):
    """Mean loss of one batch and its metric sums."""
    loss_sum, metrics = self.loss_terms(params, batch, rng)
    return loss_sum / self.denominator(batch), metrics

  def score_batch(self, params, batch):
    """Per-sequence log-likelihood of the targets: [batch] (sum over real target tokens).

    Packed batches are scored per row; score unpacked batches to get one value per example.
    With `LossConfig.head_chunks`, the head and the log-softmax run in blocks along the length,
    as in training, so no [batch, length, vocab] logits are formed.
    """
    targets = batch["decoder_target_tokens"]
    weights = batch.get("decoder_loss_weights", targets != 0).astype(jnp.float32)
    if self.loss_cfg.head_chunks:
      x, kernel, _ = self.head_operands(params, batch, None)
      # Without z-loss and smoothing, the per-token loss is -log p(target).
      _, (token_nll, _, _) = losses.head_cross_entropy(
          x, kernel, targets, weights, chunks=self.loss_cfg.head_chunks, dtype=self.cfg.dtype)
      token_logp = -token_nll
    else:
      logits, _ = self.apply(params, batch, None)
      logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
      token_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(token_logp * weights, axis=-1)

  def predict_batch(self, params, batch, **decode_kwargs):
    """Decodes outputs for a batch of inputs; the decoding module provides the algorithm."""
    if self.decode_fn is None:
      from t5lite import decoding  # pylint: disable=import-outside-toplevel
      self.decode_fn = decoding.decode
    return self.decode_fn(self, params, batch, **decode_kwargs)


def _unrolled(net):
  """`net` with its layer stacks unrolled in place (`LayerStack.unroll`)."""
  for stack in transformer.layer_stacks(net):
    stack.unroll()
  return net


def build_model(cfg: ModelConfig, loss_cfg: LossConfig = LossConfig()) -> Model:
  """A `Model` for `cfg`."""
  return Model(cfg, loss_cfg)
