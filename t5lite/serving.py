"""What `infer` and `chat` share: load a checkpoint with its own config and vocabulary, and turn
text into padded batches and decoded ids back into text."""

import contextlib
import dataclasses
import os
import sys
from typing import Dict, List, Optional, Sequence

import jax
import numpy as np

from t5lite import convert, decoding, partitioning
from t5lite.models import transformer
from t5lite.models.model import LossConfig, Model

VOCAB_FILES = ("spiece.model", "tokenizer.model", "vocab.model")


class Session:
  """A model, its parameters and its vocabulary, loaded from a checkpoint directory.

  The weights the network reads only in its compute dtype are kept in it (bf16 over a float32
  checkpoint: half the memory, and no cast of every weight in each request's decoding), with the
  same outputs (`transformer.cast_for_compute`), and layer by layer (`Model.unroll`: no request
  copies the layers' weights out of their stacks, so decoding needs about the weights' memory
  plus its cache, not twice the weights). On a CPU, unsharded, it decodes and scores with
  t5lite's CPU kernels (`cpu_execution`) unless `cpu_kernels` is False.

  Args:
    checkpoint: a t5lite MODEL_DIR or a converted checkpoint directory.
    vocab_file: SentencePiece model; default: the one stored in the checkpoint directory.
    step: checkpoint step (default latest).
    mesh_config: a `partitioning.MeshConfig` to shard the parameters over all devices (a model
      too large for one); decoding and scoring then run on that mesh. Default: one device.
    head_chunks: score with the output head and log-softmax in this many blocks along the
      target length (`LossConfig.head_chunks`): no [batch, length, vocab] logits. 0: whole.
    cpu_kernels: on a CPU, without a mesh, run the checkpoint's model with `cpu_execution`.
  """

  def __init__(self, checkpoint: str, vocab_file: str = "", step: Optional[int] = None,
               extra_ids: int = 100,
               mesh_config: Optional[partitioning.MeshConfig] = None, head_chunks: int = 0,
               cpu_kernels: bool = True):
    if not os.path.isdir(checkpoint):
      raise FileNotFoundError(f"checkpoint directory not found: {checkpoint}")
    self.mesh_config = mesh_config
    self.mesh = None if mesh_config is None else partitioning.make_mesh(mesh_config)
    self.cfg, params = convert.load_t5lite(
        checkpoint, step, self.mesh, None if mesh_config is None else mesh_config.rules)
    if cpu_kernels and self.mesh is None and jax.default_backend() == "cpu":
      self.cfg = cpu_execution(self.cfg)
    self.model = Model(self.cfg, LossConfig(head_chunks=head_chunks))
    with self._on_mesh():
      self.params = session_params(self.model, params)
    self.vocab = None
    path = vocab_file or next((os.path.join(checkpoint, n) for n in VOCAB_FILES
                               if os.path.exists(os.path.join(checkpoint, n))), "")
    if path:
      from t5lite.data.vocabulary import SentencePieceVocabulary  # pylint: disable=import-outside-toplevel
      vocab = SentencePieceVocabulary(path, extra_ids)
      self.vocab = vocab if vocab.base_vocab_size + extra_ids <= self.cfg.vocab_size else (
          SentencePieceVocabulary(path, 0))

  @property
  def encoder_decoder(self) -> bool:
    """Whether inputs go to an encoder (else they are a decoder prompt)."""
    return self.cfg.arch == "encoder_decoder"

  def encode_text(self, text: str, add_eos: bool) -> List[int]:
    """Text -> ids (EOS appended when asked)."""
    if self.vocab is None:
      raise ValueError("text input needs a vocabulary: put spiece.model in the checkpoint "
                       "directory or pass --vocab_file")
    ids = self.vocab.encode(text)
    return ids + [self.cfg.eos_id] if add_eos else ids

  def decode_ids(self, ids: Sequence[int]) -> str:
    """Ids -> text (stops at EOS)."""
    if self.vocab is None:
      return ""
    return self.vocab.decode(ids)

  def predict(self, inputs: List[List[int]], **decode_kwargs) -> List[List[int]]:
    """Decodes a batch of input id lists; returns generated ids per row, up to EOS."""
    key = "encoder_input_tokens" if self.encoder_decoder else "prompt_tokens"
    limit = self.cfg.max_length
    if not self.encoder_decoder:  # the start token and the new tokens share the positions
      limit -= 1 + decode_kwargs.get("max_decode_len", decoding.DEFAULT_MAX_DECODE_LEN)
    batch = {key: pad(inputs, limit)}
    with self._on_mesh():
      out = np.asarray(self.model.predict_batch(self.params, batch, **decode_kwargs)["tokens"])
    result = []
    for row in out:
      row = [int(t) for t in row]
      if self.cfg.eos_id in row:
        row = row[: row.index(self.cfg.eos_id)]
      result.append([t for t in row if t != 0])
    return result

  def score(self, inputs: List[List[int]], targets: List[List[int]]) -> np.ndarray:
    """Log-likelihood of each target given its input: [batch]."""
    if self.encoder_decoder:
      tgt = pad(targets, self.cfg.max_length)
      dec_in = np.concatenate([np.zeros((len(targets), 1), np.int32), tgt[:, :-1]], axis=1)
      batch = {"encoder_input_tokens": pad(inputs, self.cfg.max_length),
               "decoder_input_tokens": dec_in,
               "decoder_target_tokens": tgt}
    else:
      rows = [list(i) + list(t) for i, t in zip(inputs, targets)]
      tgt = pad(rows, self.cfg.max_length)
      weights = np.zeros(tgt.shape, np.float32)
      for r, (i, t) in enumerate(zip(inputs, targets)):
        weights[r, len(i):len(i) + len(t)] = 1.0
      dec_in = np.concatenate([np.zeros((len(rows), 1), np.int32), tgt[:, :-1]], axis=1)
      batch = {"decoder_input_tokens": dec_in, "decoder_target_tokens": tgt,
               "decoder_loss_weights": weights}
    with self._on_mesh():
      return np.asarray(self.model.score_batch(self.params, batch))

  def placement(self) -> str:
    """A sharded session's mesh and the parameter bytes each device holds."""
    total = sum(x.nbytes for x in jax.tree.leaves(self.params))
    per_device = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(self.params))
    return (f"parameters sharded ({self.mesh_config.rules}) over mesh {dict(self.mesh.shape)}: "
            f"{per_device / 2**20:.1f} of {total / 2**20:.1f} MiB per device")

  @contextlib.contextmanager
  def _on_mesh(self):
    """The mesh and its activation rules, where the parameters are sharded."""
    if self.mesh is None:
      yield
      return
    with jax.set_mesh(self.mesh), partitioning.activation_rules(self.mesh, self.mesh_config.rules):
      yield


def session_params(model: Model, params):
  """`params` as a `Session` holds them: the weights the network reads only in the compute dtype
  cast to it (`transformer.cast_for_compute`), the layers unrolled (`Model.unroll`)."""
  return model.unroll(transformer.cast_for_compute(params, model.cfg))


def pad(rows: List[List[int]], limit: Optional[int] = None) -> np.ndarray:
  """Right-pads id lists with 0 to a shared length: the next power of two, at least 8, but not
  past `limit` (the model's length limit) unless the longest row is. Inputs of any lengths
  (a file's batches, a chat's growing history) so compile a handful of decoding programs."""
  longest = max(1, max(len(r) for r in rows))
  length = max(8, 1 << (longest - 1).bit_length())
  if limit is not None:
    length = max(longest, min(length, limit))
  out = np.zeros((len(rows), length), np.int32)
  for i, r in enumerate(rows):
    out[i, :len(r)] = r
  return out


def cpu_execution(cfg):
  """`cfg` run by t5lite's CPU kernels: attention by the C++ kernel (`attention_impl`
  'cpu_kernel', which falls back to 'chunked' where it does not apply) where the checkpoint left
  it to XLA, a decoding step's projections by the matvec kernel (`matvec_kernel`), and on CPUs
  with AMX a bf16 model's other projections (the prompts' forward pass) by the AMX matmul kernel
  (`float32_dot_outputs` and `matmul_kernel`; T5-small's encoder over 8 x 512 tokens, 2 cores:
  716 -> 290 ms), on CPUs with AVX-512 or AVX2 a float32 model's by the float32 one
  (`matmul_kernel`; the same encoder on AVX-512: 670-682 -> 657-658 ms). How the model runs,
  not what it computes: the same outputs up to float rounding (a checkpoint's gin settings are
  training's, and a converted one has none)."""
  from t5lite.kernels import cpu_matmul  # pylint: disable=import-outside-toplevel
  from t5lite.kernels import cpu_matvec  # pylint: disable=import-outside-toplevel
  attention = "cpu_kernel" if cfg.attention_impl in (None, "xla", "chunked") else (
      cfg.attention_impl)
  matmuls = {}
  if cfg.dtype == "bfloat16" and cpu_matvec.amx_rows() > 0:
    matmuls = dict(float32_dot_outputs=True, matmul_kernel=True)
  elif cfg.dtype == "float32" and cpu_matmul.float32_kernel():
    matmuls = dict(matmul_kernel=True)
  return dataclasses.replace(cfg, attention_impl=attention, matvec_kernel=True, **matmuls)


def decode_options(args) -> Dict:
  """decode() keyword arguments from parsed CLI flags."""
  return {"method": args.decode, "max_decode_len": args.max_decode_len,
          "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
          "beam_size": args.beam_size, "rng": jax.random.key(args.seed)}


def add_decode_flags(parser):
  """The decoding flags shared by infer and chat."""
  parser.add_argument("--decode", default="greedy", choices=("greedy", "sample", "beam"))
  parser.add_argument("--max_decode_len", type=int, default=64)
  parser.add_argument("--temperature", type=float, default=1.0)
  parser.add_argument("--top_k", type=int, default=0)
  parser.add_argument("--top_p", type=float, default=1.0)
  parser.add_argument("--beam_size", type=int, default=4)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--vocab_file", default="")
  parser.add_argument("--no_cpu_kernels", action="store_true",
                      help="on a CPU, run XLA's attention and projections, not t5lite's kernels")


# --partitioning PRESET -> the mesh: FSDP over all devices, or tensor parallelism over --tensor
# of them (default: all for tensor_parallel, 2 for fsdp_tensor), the rest data parallel.
_MESHES = {
    "data_parallel": lambda tensor: partitioning.MeshConfig(data=-1, rules="data_parallel"),
    "fsdp": lambda tensor: partitioning.MeshConfig(data=1, fsdp=-1, rules="fsdp"),
    "tensor_parallel": lambda tensor: partitioning.MeshConfig(
        data=-1, tensor=tensor or jax.device_count(), rules="tensor_parallel"),
    "fsdp_tensor": lambda tensor: partitioning.MeshConfig(
        data=1, fsdp=-1, tensor=tensor or 2, rules="fsdp_tensor"),
}


def add_mesh_flags(parser):
  """--partitioning and --tensor: shard a checkpoint over this machine's devices."""
  parser.add_argument("--partitioning", default="", choices=("",) + tuple(_MESHES),
                      help="shard the parameters over all devices (default: one device)")
  parser.add_argument("--tensor", type=int, default=0,
                      help="tensor-parallel devices (tensor_parallel: all; fsdp_tensor: 2)")


def open_session(args, prog: str, head_chunks: int = 0) -> Session:
  """The Session the CLI flags ask for (`--checkpoint`, `--vocab_file`, `--partitioning`,
  `--tensor`), scoring in `head_chunks` blocks. A sharded one says on stderr what each device
  holds; a mesh the devices do not fit is a ValueError that gives the reason."""
  mesh_config = _MESHES[args.partitioning](args.tensor) if args.partitioning else None
  session = Session(args.checkpoint, args.vocab_file, mesh_config=mesh_config,
                    head_chunks=head_chunks, cpu_kernels=not args.no_cpu_kernels)
  if session.mesh is not None:
    print(f"{prog}: {session.placement()}", file=sys.stderr)
  return session
