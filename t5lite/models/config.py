"""Frozen model configuration shared by every architecture in the zoo.

One dataclass describes encoder-decoder (T5 v1.1), decoder-only (LLaMA/GPT style) and prefix-LM
networks; gin presets in `gin_configs/models/` fill it. It is plain data so that checkpoints can
record it as JSON and refuse to load into an incompatible model.
"""

import dataclasses
import json
from typing import Any

ARCHITECTURES = ("encoder_decoder", "decoder_only", "prefix_lm")
POSITION_ENCODINGS = ("relative", "rope", "alibi", "learned", "none")
NORMS = ("rms", "layer")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "dots_no_batch_attention",
                  "dots_no_batch_mlp", "dots_no_batch_attention_mlp")
ATTENTION_IMPLEMENTATIONS = (None, "xla", "cudnn", "chunked", "cpu_kernel", "pallas")
GATED_PROJECTIONS = ("stacked", "stacked_autodiff", "split", "split_recompute")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and behaviour of a transformer in the zoo.

  Attributes:
    arch: one of ARCHITECTURES.
    vocab_size: embedding rows (T5 pads 32100 pieces to 32128).
    d_model: residual width.
    num_heads: query heads.
    num_kv_heads: key/value heads (< num_heads gives grouped-query attention); 0 means num_heads.
    head_dim: per-head width (T5's d_kv).
    d_ff: feed-forward hidden width.
    num_encoder_layers: encoder depth (encoder-decoder only).
    num_decoder_layers: decoder depth.
    activation: 'gelu' or 'silu' (gated when `gated_mlp`), or 'relu'.
    gated_mlp: gated feed-forward (T5 v1.1 gated-GELU, LLaMA SwiGLU).
    gated_projection: how a gated feed-forward computes its two input projections (training
      and prefill; one-token decode steps always take two matmuls), one of GATED_PROJECTIONS,
      all giving the same values. 'stacked': one matmul over the kernels stacked [embed, 2,
      mlp], its gradient written by hand as one stack (`layers.gated_activation`; XLA:CPU:
      T5-small's step 14% faster than with two matmuls, and no three passes over the stack
      as autodiff's gradient takes there). 'stacked_autodiff': the same
      matmul, autodiff's gradient of its two halves, which XLA:GPU writes as one loop kernel.
      'split': two matmuls, whose gradients XLA:GPU writes as one multi-output loop kernel.
      'split_recompute': the same, its gradient written by hand to compute the activation again
      in that kernel rather than have the forward pass save part of it (`layers.gated_pair`:
      less memory moved and held). The hand-written stack is a concatenation kernel on
      XLA:GPU, emitted with one element a thread (four in loop kernels): an H200 ran T5-base's
      at about half the memory bandwidth of same-sized loop kernels. The last three are GPU
      levers.
    position_encoding: one of POSITION_ENCODINGS ('learned': GPT-2's absolute position table of
      max_length rows, decoder-only).
    relative_buckets / relative_max_distance: T5 relative position bias buckets.
    rope_theta: RoPE base frequency.
    scale_attention: divide q.k by sqrt(head_dim); T5 folds the scale into its init instead.
    tie_embeddings: share the input embedding and output head.
    norm: 'rms' (T5, LLaMA) or 'layer' (GPT-2: mean-centred, with bias).
    norm_eps: norm epsilon.
    use_bias: biases on the attention and MLP projections (GPT-2).
    dropout_rate: dropout on residual branches and attention probabilities.
    num_experts: 0 for a dense MLP, else a top-k routed MoE feed-forward in every layer.
    experts_per_token: k of top-k routing.
    moe_aux_loss_weight: weight of the load-balancing loss.
    dtype: compute dtype ('bfloat16' or 'float32'); parameters stay float32.
    param_dtype: parameter storage dtype.
    scan_layers: stack layers and run them with lax.scan (compile time flat in depth).
    remat_policy: one of REMAT_POLICIES, applied per layer: 'full' saves nothing, 'dots' every
      matmul's output, 'dots_no_batch' those without batch dimensions (not attention's scores),
      'dots_no_batch_attention' those and fused attention's outputs too (cuDNN's, or the CPU
      attention kernel's: so the backward pass does not run flash attention's forward again;
      elsewhere the same as dots_no_batch); 'dots_no_batch_mlp' and
      'dots_no_batch_attention_mlp' keep the feed-forward block's activation as well (the
      gated product, so the backward pass does not compute it again).
    attention_impl: None (auto), 'xla' or 'cudnn' for jax.nn.dot_product_attention, or
      'chunked' (attention in query blocks, causal ones skipping the keys past the
      diagonal, with a flash-attention backward; CPU), or 'cpu_kernel' (a compiled C++ kernel,
      t5lite.kernels.cpu_attention, falling back to 'chunked' where it does not apply; CPU),
      or 'pallas' (t5lite.kernels.gpu_attention: flash attention in Pallas for GPUs, with T5's
      bias and its gradient; one device; 'cudnn' where its masks or shapes do not apply).
    flat_weight_grads: compute each projection's weight gradient as one matmul over flattened
      tokens (`t5lite.models.projection`; same values), which spares XLA:CPU a transposed copy
      of the gradient. A CPU lever.
    float32_dot_outputs: every projection's matmuls (forward and both gradients) output
      float32, cast to `dtype` after, and the kernels' gradients leave those matmuls in
      param_dtype unrounded; implies flat_weight_grads. A lever for bfloat16 on CPUs with AMX,
      where XLA:CPU runs a bf16 matmul on AMX only when it outputs float32
      (`t5lite.models.projection`, runs/cpu_bf16.gin).
    matvec_kernel: projections of a few tokens (a decoding step at batch <= 32 in float32; in
      bf16 at batch <= 4, <= 32 on CPUs with AMX) by t5lite's CPU kernel
      (`t5lite.kernels.cpu_matvec`), which reads bf16 weights as stored (XLA:CPU widens them
      to float32 for one row) and runs float32 ones 1.2-2x as fast as XLA; on one CPU device,
      where it builds. A CPU lever.
    matmul_kernel: the projections' matmuls by t5lite's CPU kernels
      (`t5lite.kernels.cpu_matmul`): in float32 the forward, the input gradient and (from a
      transposed copy of the activations) the weight gradient of [in, out] kernels (1.1-1.25x
      XLA:CPU's speed on CPUs with AVX-512; on AVX2 with FMA 1.1-1.3x, taken where
      `cpu_matmul.pays`; the output head's where `cpu_matmul.transposed_a_pays`), and with
      float32_dot_outputs in bfloat16 all three (1.3-2.3x, CPUs with AMX); on one CPU device,
      where the kernel builds and the sizes suit it; XLA's matmuls elsewhere (the dots remat
      policies keep its products as they keep dots). Implies flat_weight_grads. A CPU lever
      (runs/cpu.gin).
    max_length: longest sequence the model accepts (decoding and RoPE tables).
    pad_id / eos_id / decoder_start_id: special token ids (HF T5 convention: 0, 1, 0).
  """

  arch: str = "encoder_decoder"
  vocab_size: int = 32128
  d_model: int = 512
  num_heads: int = 6
  num_kv_heads: int = 0
  head_dim: int = 64
  d_ff: int = 1024
  num_encoder_layers: int = 8
  num_decoder_layers: int = 8
  activation: str = "gelu"
  gated_mlp: bool = True
  gated_projection: str = "stacked"
  position_encoding: str = "relative"
  relative_buckets: int = 32
  relative_max_distance: int = 128
  rope_theta: float = 10000.0
  scale_attention: bool = False
  tie_embeddings: bool = False
  norm: str = "rms"
  norm_eps: float = 1e-6
  use_bias: bool = False
  dropout_rate: float = 0.0
  num_experts: int = 0
  experts_per_token: int = 2
  moe_aux_loss_weight: float = 0.01
  dtype: str = "bfloat16"
  param_dtype: str = "float32"
  scan_layers: bool = True
  remat_policy: str = "none"
  attention_impl: Any = None
  flat_weight_grads: bool = False
  float32_dot_outputs: bool = False
  matvec_kernel: bool = False
  matmul_kernel: bool = False
  max_length: int = 2048
  pad_id: int = 0
  eos_id: int = 1
  decoder_start_id: int = 0

  def __post_init__(self):
    if self.arch not in ARCHITECTURES:
      raise ValueError(f"arch must be one of {ARCHITECTURES}, got {self.arch!r}")
    if self.position_encoding not in POSITION_ENCODINGS:
      raise ValueError(
          f"position_encoding must be one of {POSITION_ENCODINGS}, got {self.position_encoding!r}")
    if self.norm not in NORMS:
      raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
    if self.gated_projection not in GATED_PROJECTIONS:
      raise ValueError(f"gated_projection must be one of {GATED_PROJECTIONS}, "
                       f"got {self.gated_projection!r}")
    if self.position_encoding == "learned" and self.arch == "encoder_decoder":
      raise ValueError("learned absolute positions are implemented for decoder-only models")
    if self.use_bias and self.num_experts:
      raise ValueError("use_bias is not supported with mixture-of-experts MLPs")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy must be one of {REMAT_POLICIES}, got {self.remat_policy!r}")
    if self.attention_impl not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLEMENTATIONS}, got "
                       f"{self.attention_impl!r}")
    if self.kv_heads <= 0 or self.num_heads % self.kv_heads:
      raise ValueError(
          f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.kv_heads})")
    if self.num_experts and not 0 < self.experts_per_token <= self.num_experts:
      raise ValueError("experts_per_token must be in [1, num_experts]")
    if self.position_encoding == "rope" and self.head_dim % 2:
      raise ValueError("RoPE needs an even head_dim")

  @property
  def kv_heads(self) -> int:
    """Number of key/value heads (num_heads when not grouped)."""
    return self.num_kv_heads or self.num_heads

  def to_json(self) -> str:
    """Serializes the config (stored next to every checkpoint)."""
    return json.dumps(dataclasses.asdict(self), sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> "ModelConfig":
    """Inverse of `to_json`; unknown keys are an error."""
    fields = json.loads(text)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(fields) - known
    if unknown:
      raise ValueError(f"unknown ModelConfig fields in stored config: {sorted(unknown)}")
    return cls(**fields)

  def shape_differences(self, other: "ModelConfig") -> dict:
    """Fields that change parameter shapes and differ between two configs."""
    shape_fields = ("arch", "vocab_size", "d_model", "num_heads", "num_kv_heads", "head_dim",
                    "d_ff", "num_encoder_layers", "num_decoder_layers", "gated_mlp",
                    "position_encoding", "relative_buckets", "tie_embeddings", "num_experts",
                    "scan_layers", "norm", "use_bias")
    if "learned" in (self.position_encoding, other.position_encoding):
      shape_fields += ("max_length",)  # the rows of the learned position table
    return {f: (getattr(self, f), getattr(other, f))
            for f in shape_fields if getattr(self, f) != getattr(other, f)}
