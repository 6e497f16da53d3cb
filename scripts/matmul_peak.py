"""The matmul peak scripts/benchmark.py reports MFU against: the best product at hand on the
device, measured in the same run (`measure_peak_tflops`).

A peak is a best case: random data, the fastest of repeated timings after the clocks have ramped
up. On a GPU, XLA's bf16 product chained in one program and torch's cuBLAS product where torch
is loaded; on a CPU, XLA's product and t5lite's kernel (t5lite/kernels/cpu_matmul.py).
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

import hf_reference  # scripts/, beside this file


def best_seconds(run, warmup: int, reps: int) -> float:
  """The fastest of `reps` timed calls of `run` (which waits for its own results) after
  `warmup` untimed ones: a peak is a best case."""
  for _ in range(warmup):
    run()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    run()
    times.append(time.perf_counter() - t)
  return min(times)


def chained_matmul_tflops(n: int, dtype, chain: int = 8, reps: int = 10) -> float:
  """TFLOP/s of XLA's n x n x n product, `chain` of them back to back in one jitted program (each
  product the next one's left factor; the right one scaled by 1/sqrt(n), so that random values
  stay near unit scale), the best of `reps` timed calls after warm-up. One dispatch and one
  synchronization per `chain` products: timed one by one, XLA's 8192^3 bf16 product (~1.4 ms)
  read 614-689 TFLOP/s on an H200 where torch's cuBLAS reaches 769-798; how much of that gap
  the per-product dispatch and synchronization made is not yet measured."""
  a = jax.random.normal(jax.random.key(1), (n, n), dtype)
  b = (jax.random.normal(jax.random.key(2), (n, n), jnp.float32) / np.sqrt(n)).astype(dtype)

  def products(x, y):
    for _ in range(chain):
      x = x @ y
    return x

  run = jax.jit(products)
  seconds = best_seconds(lambda: run(a, b).block_until_ready(), 3, reps)
  return 2 * n ** 3 * chain / seconds / 1e12


def torch_matmul_tflops(n: int, device: str = "cuda", chain: int = 8, reps: int = 10):
  """The same chain of bf16 products through torch's matmul (cuBLAS on a GPU) on `device`;
  None where torch is not installed or does not see the device. Its memory is handed back to
  the device after."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  if device == "cuda" and not torch.cuda.is_available():
    return None
  seconds = _torch_chain_seconds(torch, n, device, chain, reps)
  hf_reference.release_torch_gpu_memory()  # the operands are gone with the helper's frame
  return 2 * n ** 3 * chain / seconds / 1e12


def measure_peak_tflops(on_gpu: bool, bf16: bool = False, with_torch: bool = False) -> dict:
  """Matmul peaks on this device, TFLOP/s by the matmul that reached them; MFU is against the
  highest, the best matmul at hand (random data; the fastest of repeated timings after the clocks
  have ramped up, as a peak is a best case). On a GPU: bf16 8192^3 through XLA, chained in one
  program (`chained_matmul_tflops`), and (`with_torch`: HF's side is loaded anyway) through
  torch's cuBLAS. On a CPU: 2048^3, fp32 or (`bf16`: the model computes in bf16) bf16 operands
  with an fp32 output, the form XLA:CPU runs on AMX where the CPU has it, through XLA and through
  t5lite's kernel (`cpu_matmul`: AMX for bf16, AVX-512 for fp32, which
  `ModelConfig.matmul_kernel` runs the projections on) where it runs."""
  if on_gpu:
    peaks = {"xla": chained_matmul_tflops(8192, jnp.bfloat16)}
    cublas = torch_matmul_tflops(8192) if with_torch else None
    if cublas is not None:
      peaks["torch"] = cublas
    return peaks
  n, dtype = 2048, jnp.bfloat16 if bf16 else jnp.float32
  a = jax.random.normal(jax.random.key(1), (n, n), dtype)
  b = jax.random.normal(jax.random.key(2), (n, n), dtype)
  matmuls = {"xla": jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
             if bf16 else jax.jit(lambda x, y: x @ y)}
  from t5lite.kernels import cpu_matmul
  if cpu_matmul.supports(a, b) and cpu_matmul.available():
    matmuls["t5lite"] = jax.jit(cpu_matmul.matmul)
  peaks = {}
  for name, f in matmuls.items():
    seconds = best_seconds(lambda f=f: f(a, b).block_until_ready(), 2, 8)
    peaks[name] = 2 * n ** 3 / seconds / 1e12
  return peaks


def _torch_chain_seconds(torch, n: int, device: str, chain: int, reps: int) -> float:
  """`best_seconds` of `chain` bf16 n x n x n products through torch on `device`, each the next
  one's left factor (the right one scaled by 1/sqrt(n)), synchronized after the chain."""
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  gen = torch.Generator(device=device).manual_seed(0)
  a = torch.randn(n, n, device=device, generator=gen).to(torch.bfloat16)
  b = (torch.randn(n, n, device=device, generator=gen) / n ** 0.5).to(torch.bfloat16)

  def products():
    x = a
    for _ in range(chain):
      x = x @ b
    sync()

  return best_seconds(products, 3, reps)
