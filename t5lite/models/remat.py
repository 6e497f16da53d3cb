"""The remat policies of `ModelConfig.remat_policy`: what each layer keeps from its forward
pass for the backward (`jax.checkpoint`'s policies), t5lite's kernels and fused attention
included, so that a policy keeps the same kinds of outputs on every backend.
"""

import jax

from t5lite.models import layers

# The primitive that traced programs hold for cuDNN's fused attention forward in JAX 0.10 and
# 0.11 (its outputs: the attention output and the softmax statistics the fused backward needs).
_FUSED_ATTENTION_FORWARD = "dot_product_attention_fwd_wrapper"


def _ffi_target(prim, params) -> str:
  """The XLA FFI target an equation calls ('' for any other primitive)."""
  return str(params.get("target_name", "")) if prim.name == "ffi_call" else ""


def _dots_no_batch_and_fused_attention(prim, *avals, **params) -> bool:
  """dots_no_batch, and the outputs of fused attention kept too: cuDNN's, and t5lite's CPU
  attention kernel's (`attention_impl="cpu_kernel"`).

  Under dots_no_batch alone, the backward pass runs every layer's flash attention forward again:
  the output projection's kernel gradient needs the attention's output, which is no dot's
  output. Keeping it costs [batch, length, heads, head_dim] plus float32 statistics per head and
  query, per layer. Other attention (XLA's, `chunked`) is matmuls and softmax: there this policy
  is dots_no_batch.
  """
  return (prim.name == _FUSED_ATTENTION_FORWARD
          or _ffi_target(prim, params).startswith("t5lite_cpu_attention_forward")
          or jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *avals, **params))


def _with_matmul_kernel(policy):
  """`policy`, with the outputs of t5lite's CPU matmul kernel (`ModelConfig.matmul_kernel`:
  the projections' matmuls, flat and without batch dimensions) saveable as its dots are.
  Without it the dots policies saved none of them: each layer's forward ran again, as under
  'full'."""
  def saveable(prim, *avals, **params) -> bool:
    return (_ffi_target(prim, params).startswith("t5lite_cpu_matmul")
            or policy(prim, *avals, **params))
  return saveable


def _and_mlp_activation(policy):
  """`policy`, with the feed-forward block's activation (`layers.MLP_ACTIVATION`: the gated
  product, the output projection's input) kept too. Under the dots policies the backward pass
  computes it again from the saved input projections for the output projection's kernel
  gradient: on an H100, T5-base's unrolled step at b64 x (512+128) reads and writes 0.54 GB a
  layer for it. Keeping it costs [batch, length, mlp] per layer."""
  return jax.checkpoint_policies.save_from_both_policies(
      policy, jax.checkpoint_policies.save_only_these_names(layers.MLP_ACTIVATION))


# ModelConfig.remat_policy -> the policy `jax.checkpoint` takes ("none": no remat).
POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": _with_matmul_kernel(jax.checkpoint_policies.checkpoint_dots),
    "dots_no_batch": _with_matmul_kernel(jax.checkpoint_policies.dots_with_no_batch_dims_saveable),
    "dots_no_batch_attention": _with_matmul_kernel(_dots_no_batch_and_fused_attention),
    "dots_no_batch_mlp": _with_matmul_kernel(_and_mlp_activation(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable)),
    "dots_no_batch_attention_mlp": _with_matmul_kernel(_and_mlp_activation(
        _dots_no_batch_and_fused_attention)),
}
