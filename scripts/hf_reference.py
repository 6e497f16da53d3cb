"""HF transformers on the benchmark's shapes: the reference side of `benchmark.py --vs-hf`.

The same model in HF (T5 v1.1 as T5ForConditionalGeneration, decoder-only as LlamaForCausalLM),
randomly initialized: a train step (`hf_runner`, eager or `torch.compile`, AdamW), `generate`
(`bench_hf_generate`), and `HFProcess`, which runs both in a process of its own for CPU
comparisons. torch and transformers are imported only when used.
"""

import gc
import multiprocessing
import sys
import time
import traceback

import numpy as np


def hf_model(cfg):
  """The HF transformers model with the same shapes (T5 v1.1 or LLaMA), randomly initialized."""
  import transformers
  if cfg.arch == "encoder_decoder":
    hf_cfg = transformers.T5Config(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.head_dim, d_ff=cfg.d_ff,
        num_layers=cfg.num_encoder_layers, num_decoder_layers=cfg.num_decoder_layers,
        num_heads=cfg.num_heads, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
        dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return transformers.T5ForConditionalGeneration(hf_cfg)
  hf_cfg = transformers.LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
      num_hidden_layers=cfg.num_decoder_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim,
      tie_word_embeddings=cfg.tie_embeddings, attn_implementation="sdpa")
  return transformers.LlamaForCausalLM(hf_cfg)


def release_torch_gpu_memory():
  """Frees what a finished HF run left in torch's GPU cache (nothing to do without torch/CUDA)."""
  torch = sys.modules.get("torch")
  if torch is not None and torch.cuda.is_available():
    gc.collect()  # the runner's closures hold the model and optimizer in reference cycles
    torch.cuda.empty_cache()


def torch_device(torch) -> str:
  """'cuda' where torch sees a GPU, else 'cpu'. On CPU, torch is set to flush denormal floats to
  zero, as XLA:CPU does: T5's randomly initialized activations and gradients underflow into
  denormals, which Intel cores compute in microcode (HF T5-tiny's train step on a Xeon: 2.5 s
  with them, 0.25 s without), and the comparison is with HF at its best."""
  if torch.cuda.is_available():
    return "cuda"
  torch.set_flush_denormal(True)
  return "cpu"


def uses_bf16(cfg, device: str) -> bool:
  """Whether HF's side computes in bf16: always on a GPU, on a CPU where t5lite does."""
  return device == "cuda" or cfg.dtype == "bfloat16"


def bench_hf_generate(cfg, args, batch: int, cache: str = "dynamic"):
  """HF `generate` (greedy, KV cache; bf16 weights on GPU and where t5lite computes in bf16) on
  the same prompts and lengths; `cache` 'static' asks for HF's preallocated cache (which recent
  transformers also compile), 'dynamic' for the default one. The first call warms up, the
  second is timed."""
  import torch
  device = torch_device(torch)
  model = hf_model(cfg).to(device).eval()
  if uses_bf16(cfg, device):
    model = model.to(torch.bfloat16)
  rng = np.random.default_rng(0)
  ids = torch.tensor(rng.integers(2, cfg.vocab_size, (batch, args.inputs)), device=device)
  kw = dict(max_new_tokens=args.decode_tokens, min_new_tokens=args.decode_tokens,
            do_sample=False, num_beams=1, eos_token_id=None, pad_token_id=0)
  if cache == "static":
    kw["cache_implementation"] = "static"
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  with torch.no_grad():
    model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    sync()
    t = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    sync()
  step_s = time.perf_counter() - t
  name = "hf-generate" if cache == "dynamic" else f"hf-generate-{cache}"
  return {"impl": f"{name}-b{batch}", "decode_s": step_s,
          "new_tokens_per_s": batch * args.decode_tokens / step_s, "compile_s": 0.0}


def hf_runner(cfg, batch, compiled: bool):
  """(one synchronized train step, facts) for the same shapes in HF transformers (T5 v1.1 /
  LLaMA), AdamW, bf16 autocast on GPU and where t5lite computes in bf16, on `batch` (the
  benchmark's synthetic batch: packed rows too, which HF, having no segment masks, sees as
  whole rows); the first step (torch.compile's) counts as compile."""
  import torch
  device = torch_device(torch)
  model = hf_model(cfg)
  model.to(device).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
  if cfg.arch == "encoder_decoder":
    feed = {"input_ids": torch.tensor(batch["encoder_input_tokens"], dtype=torch.long),
            "labels": torch.tensor(batch["decoder_target_tokens"], dtype=torch.long)}
  else:
    feed = {"input_ids": torch.tensor(batch["decoder_input_tokens"], dtype=torch.long),
            "labels": torch.tensor(batch["decoder_target_tokens"], dtype=torch.long)}
  feed = {k: v.to(device) for k, v in feed.items()}
  forward = torch.compile(model) if compiled else model
  use_bf16 = uses_bf16(cfg, device)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

  def run():
    with torch.autocast(device, dtype=torch.bfloat16, enabled=use_bf16):
      loss = forward(**feed).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()
    return float(loss.detach())

  t = time.perf_counter()
  run()
  compile_s = time.perf_counter() - t
  mem = lambda: torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else float("nan")
  return run, {"impl": "hf-compiled" if compiled else "hf-eager", "compile_s": compile_s,
               "peak_mem_gb": mem}


class HFProcess:
  """HF's side of a CPU comparison, in a Python process of its own (multiprocessing 'spawn').

  Apart, each side keeps its own heap and threads, as in a user's run of either: in one
  process, torch's allocations between t5lite's steps can take pages of the step buffer
  XLA:CPU frees after each step, so that t5lite's next step faults a new one in (decoder-125m,
  b8 x (256+64), mimalloc: 10.0-10.8 s a step beside HF against 8.05 s alone in the
  twenty-eighth session; in the twenty-ninth, 0 faults a step either way).
  `runner` and `generate` have `hf_runner`'s and `bench_hf_generate`'s signatures and results;
  a runner's step is one round trip through a pipe (tens of microseconds) inside the time the
  parent measures. A failure in the child raises RuntimeError here with its traceback."""

  def __init__(self):
    context = multiprocessing.get_context("spawn")  # no fork of a process running XLA's threads
    self._conn, child_end = context.Pipe()
    self._process = context.Process(target=_serve_hf, args=(child_end,), daemon=True)
    self._process.start()
    child_end.close()

  def _call(self, request: str, *args):
    try:
      self._conn.send((request, args))
      ok, value = self._conn.recv()
    except (EOFError, OSError):  # the pipe closed or reset: the child is gone
      self._process.join(5)
      raise RuntimeError(f"the HF process exited (status {self._process.exitcode}) during "
                         f"{request!r}") from None
    if not ok:
      raise RuntimeError(f"HF process, {request!r}:\n{value}")
    return value

  def runner(self, cfg, batch, compiled: bool):
    """`hf_runner` in the child: (one train step there, returning its loss; facts)."""
    facts = self._call("runner", cfg, batch, compiled)
    impl = facts["impl"]
    return (lambda: self._call("step", impl)), dict(
        facts, peak_mem_gb=lambda: self._call("memory", impl))

  def generate(self, cfg, args, batch: int, cache: str = "dynamic"):
    """`bench_hf_generate` in the child."""
    return self._call("generate", cfg, args, batch, cache)

  def close(self):
    """Stops the child (it also dies with this process: daemonic)."""
    if self._process.is_alive():
      try:
        self._conn.send(("stop", ()))
      except OSError:
        pass
      self._process.join(30)
    if self._process.is_alive():
      self._process.kill()
    self._conn.close()


def _serve_hf(conn):
  """The child's loop: answers `HFProcess` requests with (True, result) or (False, traceback)."""
  steps, memory = {}, {}
  while True:
    request, args = conn.recv()
    if request == "stop":
      return
    try:
      if request == "runner":
        run, facts = hf_runner(*args)
        steps[facts["impl"]], memory[facts["impl"]] = run, facts.pop("peak_mem_gb")
        value = facts
      elif request == "step":
        value = steps[args[0]]()
      elif request == "memory":
        value = memory[args[0]]()
      elif request == "generate":
        value = bench_hf_generate(*args)
      else:
        raise ValueError(f"unknown request {request!r}")
    except Exception:  # pylint: disable=broad-except
      conn.send((False, traceback.format_exc()))
    else:
      conn.send((True, value))
