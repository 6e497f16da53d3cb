"""Benchmark the t5lite train step (and optionally HF transformers on the same shapes).

    python scripts/benchmark.py --gin_file=models/t5_1_1/base.gin --batch=64 --inputs=512 \
        --targets=128 [--vs-hf] [--json=out.json] [--gin.ModelConfig.remat_policy=dots]

Synthetic batches, no TensorFlow. Reports the median step time after warm-up (device
synchronized), tokens/s, model FLOPs per token, achieved TFLOP/s, MFU against a matmul peak
measured on the same device (bf16 on GPU; on CPU in the model's dtype, fp32 or bf16 with an
fp32 output; before and after the steps, on CPU also between rounds, the highest counts),
peak device memory and compile time. Memory is in GiB (2^30 bytes, as JAX and XLA count it;
the JSON's `*mem_gb` and `memory_gb` keys), data moved in GB (10^9 bytes, `*step_gb`,
`prompt_gb`). The header echoes the settings that decide speed (dtypes, scanned layers, remat,
attention, flat weight grads, fp32 matmul outputs, the loss's head chunks, master weights) and
the versions of jax, flax and optax (torch and transformers with --vs-hf);
runs/cpu.gin, runs/cpu_bf16.gin or runs/gpu.gin may come before or after the model preset
(presets bind the architecture only; a file rebinding an earlier one's value is warned of).
Where t5lite computes in bf16, HF does too (autocast; bf16 weights for decoding).
On CPU, --vs-hf times the implementations in alternating rounds of consecutive steps
(--rounds), since CPU speed drifts with clocks and neighbours; on GPU they run one after another
(HF first, its memory released before t5lite's step; JAX allocates on demand with --vs-hf).
Like `t5lite.train`, it restarts itself under a host allocator that keeps XLA:CPU's temp buffer
from being faulted in and zeroed every step (t5lite/host_malloc.py: jemalloc where installed,
else the mimalloc wheel, else glibc huge pages; T5LITE_HOST_MALLOC=system opts out). On CPU,
HF (scripts/hf_reference.py) runs in a process of its own (`HFProcess`; --hf-in-process to
share t5lite's), started from this one, so it gets the same allocator but its own heap.
On CPU, torch flushes denormal floats to zero, as XLA:CPU does (see
`hf_reference.torch_device`).
--compile_depths=6,12,24 instead reports the train step's compile time at each depth, layers
scanned and unrolled, from shapes alone (nothing allocated), so T5 v1.1 large is cheap to study.
--aot=h100 instead compiles the train step for one H100 with XLA's GPU compiler on this host (a
CPU will do: t5lite/gpu_aot.py) and reports XLA's memory plan for it, the cuDNN attention
calls of the compiled program and its matmul FLOPs against the model's (their ratio bounds the
MFU it can reach); with --compile_depths, the GPU compiler's compile times. With
--decode_batches (and --no_train for decoding alone) it compiles greedy decoding too, and
reports the device-memory traffic of a token step, which bounds decode speed on that GPU.

Model FLOPs (PaLM appendix B convention; training = 3 x forward; rematerialization not counted;
attention counted in full, causal masks not halved). Forward multiply-adds count 2 FLOPs:
  per layer and token: attention projections 2*d*(H*dh) (q) + 4*d*(K*dh) (k, v) + 2*(H*dh)*d (o),
    attention 4*S*H*dh over the S keys it attends to, MLP 2*d*f*(3 if gated else 2) (x experts
    per token for MoE, plus the router);
  decoder cross-attention: q and o projections per decoder token, k and v projections per
    encoder token, 4*S_enc*H*dh per decoder token;
  output head 2*d*V per target token.
With --pack N (rows of N examples, T5X's pretraining layout) S is the query's own example's
length (its segment's keys), the attention each example needs, whatever a kernel skips.

The batches, the FLOPs and the jitted step are in scripts/benchmark_step.py; --aot and
--compile_depths in scripts/benchmark_aot.py.
"""

import argparse
import dataclasses
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from t5lite import host_malloc  # noqa: E402

if __name__ == "__main__":  # restart under the tuned host allocator before JAX loads
  host_malloc.reexec_with_tuned_malloc()

import jax  # noqa: E402
import numpy as np  # noqa: E402

import benchmark_aot  # noqa: E402  (scripts/, beside this file, as the next three)
from benchmark_step import (load_config, run_batch, run_facts, step_flops,  # noqa: E402
                            t5lite_step, write_json)
import hf_reference  # noqa: E402
from matmul_peak import measure_peak_tflops  # noqa: E402


def t5lite_runner(cfg, args):
  """(one synchronized train step, facts) for the real t5lite step (AdamW)."""
  step, init = t5lite_step(cfg, args)
  state = init(jax.random.key(0))
  batch = jax.device_put(run_batch(cfg, args))
  t = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t
  holder = {"state": state}

  def run():
    holder["state"], metrics = compiled(holder["state"], batch)
    return float(jax.block_until_ready(metrics)["loss"])

  from t5lite.autoparallel import peak_bytes
  planned = peak_bytes(compiled) / 2 ** 30 if compiled.memory_analysis() else None

  def peak_mem_gb():
    stats = jax.devices()[0].memory_stats() or {}
    mem = stats.get("peak_bytes_in_use")
    return (planned or 0.0) if mem is None else mem / 2 ** 30

  # planned_mem_gb: the step's peak as the compiler that built it plans it (what `--aot` reports
  # for a GPU it has not got), beside the device allocator's measured peak.
  return run, {"impl": "t5lite", "compile_s": compile_s, "peak_mem_gb": peak_mem_gb,
               "planned_mem_gb": planned, "hlo_text": compiled.as_text}


def time_side_by_side(runners, args, flops: float, between_rounds=None):
  """Times the runners in `args.rounds` rounds of consecutive steps (an untimed settling step,
  then steps/rounds timed ones, per runner and round; one round for a single runner). Rounds
  spread drift in the machine's speed (clocks, neighbours) over every implementation alike;
  runs of consecutive steps keep the caches and allocator state a real training loop has.
  Median per runner; each row also has every timed step, round by round (`round_step_s`), so a
  reader sees the spread a median hides. The first runner's row (t5lite's) also gets this
  process's minor page faults and kernel time per step (medians; `getrusage`): XLA:CPU's step
  buffer faulted in again every step shows there (what t5lite/host_malloc.py's allocator
  choice is about). Its per-step faults and CPU seconds (user and kernel, all threads) are
  kept round by round too (`round_host_faults`, `round_host_cpu_s`), which tells a slow step's
  cause: faults where the allocator mapped fresh memory, more CPU seconds for the same work
  where the machine ran slower (a VM's neighbours), neither where the step waited.
  `between_rounds`, where given, is called between one round and the next (the matmul probe)."""
  for run, _ in runners:
    for _ in range(args.warmup):
      run()
  rounds = max(1, min(args.rounds, args.steps)) if len(runners) > 1 else 1
  times = [[[] for _ in range(rounds)] for _ in runners]   # [runner][round] -> step seconds
  faults, kernel_s, cpu_s = ([[] for _ in range(rounds)] for _ in range(3))  # t5lite's, by round
  losses = [0.0] * len(runners)
  for r in range(rounds):
    per_round = args.steps // rounds + (r < args.steps % rounds)
    if r and between_rounds is not None:
      between_rounds()
    for i, (run, _) in enumerate(runners):
      if r:
        run()
      for _ in range(per_round):
        before = resource.getrusage(resource.RUSAGE_SELF)
        t = time.perf_counter()
        losses[i] = run()
        times[i][r].append(time.perf_counter() - t)
        if i == 0:
          after = resource.getrusage(resource.RUSAGE_SELF)
          faults[r].append(after.ru_minflt - before.ru_minflt)
          kernel_s[r].append(after.ru_stime - before.ru_stime)
          cpu_s[r].append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
  tokens = args.batch * (args.inputs + args.targets)
  every = lambda by_round: [x for xs in by_round for x in xs]  # noqa: E731
  rows = []
  for (_, facts), by_round, loss in zip(runners, times, losses):
    step_s = statistics.median(every(by_round))
    rows.append({"impl": facts["impl"], "step_s": step_s, "tokens_per_s": tokens / step_s,
                 "round_step_s": by_round,
                 "model_flops_per_token": flops / tokens, "tflops": flops / step_s / 1e12,
                 "peak_mem_gb": facts["peak_mem_gb"](),
                 "compile_s": facts["compile_s"], "loss": loss,
                 **({"planned_mem_gb": facts["planned_mem_gb"]} if "planned_mem_gb" in facts
                    else {})})
  rows[0].update(host_faults_per_step=statistics.median(every(faults)),
                 host_kernel_s_per_step=statistics.median(every(kernel_s)),
                 round_host_faults=faults, round_host_cpu_s=cpu_s)
  return rows


def time_one_at_a_time(makers, args, flops: float, failed=None):
  """The GPU way: each runner built, timed and dropped in turn, so it has the device's memory
  to itself. `makers` are (impl, make) pairs, t5lite's first. HF's (makers[1:]) go first and
  torch's cache is emptied after each, so JAX's step (makers[0], allocating on demand) comes
  last and finds the memory free. An HF runner that raises (torch.compile on a new torch, out
  of memory) is left out of the rows and its error kept in `failed` (impl -> message), so that
  t5lite's row is still measured; t5lite's own errors propagate. Rows in makers' order."""
  rows = []
  for impl, make in makers[1:] + makers[:1]:
    try:
      rows += time_side_by_side([make()], args, flops)
    except Exception as e:  # pylint: disable=broad-except
      if impl == makers[0][0] or failed is None:
        raise
      failed[impl] = f"{type(e).__name__}: {e}"[:2000]
      print(f"{impl} failed, left out: {failed[impl]}", flush=True)
    hf_reference.release_torch_gpu_memory()
  return rows[-1:] + rows[:-1]


def bench_decode(cfg, args, batch: int):
  """Greedy KV-cache decode: `--inputs` prompt tokens, `--decode_tokens` new tokens (EOS off),
  on the parameters as `serving.Session` holds them (`serving.session_params`: the weights in
  the compute dtype, as HF's side gets bf16 weights)."""
  from t5lite import serving
  from t5lite.models.model import Model
  model = Model(cfg)
  params = serving.session_params(model, jax.jit(model.init)(jax.random.key(0)))
  rng = np.random.default_rng(0)
  prompts = rng.integers(2, cfg.vocab_size, (batch, args.inputs)).astype(np.int32)
  key = "encoder_input_tokens" if cfg.arch == "encoder_decoder" else "prompt_tokens"
  feed = {key: jax.device_put(prompts)}
  run = lambda: model.predict_batch(params, feed, max_decode_len=args.decode_tokens, eos_id=-1)
  t = time.perf_counter()
  jax.block_until_ready(run())
  compile_s = time.perf_counter() - t
  times = []
  for _ in range(3):
    t = time.perf_counter()
    jax.block_until_ready(run())
    times.append(time.perf_counter() - t)
  step_s = statistics.median(times)
  return {"impl": f"t5lite-decode-b{batch}", "decode_s": step_s,
          "new_tokens_per_s": batch * args.decode_tokens / step_s, "compile_s": compile_s}


def without_command_buffers(args):
  """`args` with `profiling.NO_COMMAND_BUFFERS` added to gin's TrainConfig.compiler_options: the
  step a GPU profile traces (an H200's T5-base trace with command buffers came back as 1,799
  `command_buffer` ops and no kernels)."""
  from t5lite import profiling
  train = dataclasses.replace(args.train, compiler_options={**args.train.compiler_options,
                                                           **profiling.NO_COMMAND_BUFFERS})
  return argparse.Namespace(**{**vars(args), "train": train})


def profile_step(run, facts, args, peak_tflops: float, remake=None) -> dict:
  """--profile: --profile_steps more steps of t5lite's timed runner (`t5lite_runner`'s `run`
  and `facts`, warm) traced; the ops that took longest per step, by kind (a custom call by its
  target: t5lite's CPU kernels, cuBLAS, cuDNN) and by op, printed (the first 15 kinds) and
  returned (the first 40 of each). With `remake` (on a GPU: `args` -> a new runner), the traced
  step is compiled again without command buffers (`without_command_buffers`) and run once
  before the trace; its times then include the kernel launches the buffers save. On a CPU, the
  ops traced for less time than their matmul FLOPs take at `peak_tflops` (XLA:CPU's own dots,
  whose events time their dispatch) are listed apart (`profiling.outrun_matmuls`)."""
  from t5lite import hlo_analysis, profiling
  options = {}
  if remake is not None:
    run, facts = remake(without_command_buffers(args))
    run()
    options = dict(profiling.NO_COMMAND_BUFFERS)
  trace = profiling.trace_steps(run, args.profile_steps, args.profile)
  hlo_text = facts["hlo_text"]()
  kinds = profiling.op_times(trace, args.profile_steps, by_kind=True,
                             kinds=profiling.custom_call_targets(hlo_text))
  ops = profiling.op_times(trace, args.profile_steps)
  outrun = profiling.outrun_matmuls(ops, hlo_analysis.matmul_flops_by_op(hlo_text), peak_tflops)
  where = kinds[0]["where"] if kinds else "-"
  print(f"# profile: {args.profile_steps} steps traced into {trace}; op time per step on "
        f"{where}, by kind (ops run side by side add up to more than the step):")
  for row in kinds[:15]:
    print(f"  {row['ms_per_step']:9.2f} ms  x{row['runs_per_step']:<6g} {row['op']}")
  note = profiling.command_buffer_note(kinds)
  for line in (note, profiling.outrun_note(outrun)):
    if line:
      print(f"# profile: {line}")
  return {"trace": trace, "steps": args.profile_steps, "compiler_options": options,
          "by_kind": kinds[:40], "ops": ops[:40], "note": note, "outrun_matmuls": outrun}


def main(argv=None):
  """Parses the command line, runs the benchmark, prints the table; returns the result."""
  argv = list(sys.argv[1:] if argv is None else argv)
  bindings = [a for a in argv if a.startswith("--gin.")]
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--gin_file", action="append", default=[])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--inputs", type=int, default=512, help="encoder length (decoder: prefix)")
  parser.add_argument("--targets", type=int, default=128)
  parser.add_argument("--pack", type=int, default=0,
                      help="rows of this many examples of random lengths, packed as T5X packs "
                           "pretraining data (segment ids; model FLOPs count each example's "
                           "own attention); HF, which has no segment masks, gets the same tokens "
                           "as whole rows")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--microbatches", type=int, default=1)
  parser.add_argument("--rounds", type=int, default=3,
                      help="CPU --vs-hf: alternate the implementations in this many rounds")
  parser.add_argument("--vs-hf", dest="vs_hf", action="store_true")
  parser.add_argument("--hf-modes", dest="hf_modes", default="eager,compiled")
  parser.add_argument("--hf-in-process", dest="hf_in_process", action="store_true",
                      help="CPU --vs-hf: run HF in this process, not in a child (HFProcess)")
  parser.add_argument("--json", default="")
  parser.add_argument("--decode_batches", default="", help="e.g. 1,32: also time decoding")
  parser.add_argument("--decode_tokens", type=int, default=128)
  parser.add_argument("--hf-generate-caches", dest="hf_generate_caches", default="dynamic",
                      help="--vs-hf decoding: HF generate with these caches (dynamic, static)")
  parser.add_argument("--no_train", action="store_true", help="skip the train step")
  parser.add_argument("--compile_depths", default="",
                      help="e.g. 6,12,24: instead of timing steps, the train step's compile time "
                           "at these depths, layers scanned and unrolled (shapes only)")
  parser.add_argument("--profile", default="", metavar="DIR",
                      help="after the timed steps, trace --profile_steps more of t5lite's under "
                           "the JAX profiler into DIR (Perfetto; TensorBoard reads it too) and "
                           "report the ops that took longest per step (t5lite/profiling.py), "
                           "and apart those traced for less than their matmul FLOPs need (on "
                           "a CPU, XLA's dots, whose events time their dispatch); on a GPU, of "
                           "the step compiled again without command buffers")
  parser.add_argument("--profile_steps", type=int, default=3)
  parser.add_argument("--aot", default="", metavar="GPU",
                      help="e.g. h100: instead of timing steps, compile the train step for one "
                           "such GPU with XLA's GPU compiler, on this host (no GPU needed), and "
                           "report its memory plan (t5lite/gpu_aot.py); with --compile_depths, "
                           "its compile time; with --decode_batches, decoding's memory traffic")
  args = parser.parse_args([a for a in argv if not a.startswith("--gin.")])
  if args.aot:
    from t5lite import gpu_aot
    gpu_aot.start_jax_on_host()   # --aot runs nothing on a device
    try:
      gpu_aot.check_target(args.aot)
    except ValueError as e:
      parser.error(f"--aot: {e}")
    if args.vs_hf:
      parser.error("--aot compiles and runs nothing (no --vs-hf)")
  unknown = sorted(set(args.hf_modes.split(",")) - {"eager", "compiled"})
  if unknown:
    parser.error(f"--hf-modes: unknown {', '.join(unknown)} (expected eager, compiled)")
  unknown = sorted(set(args.hf_generate_caches.split(",")) - {"dynamic", "static"})
  if unknown:
    parser.error(f"--hf-generate-caches: unknown {', '.join(unknown)} (expected dynamic, static)")
  if args.vs_hf:
    # JAX would otherwise take 75% of a GPU's memory at its first use and keep it, leaving HF
    # (torch) the rest; on demand, each side gets what it uses (no effect on CPU).
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  from t5lite import gin_setup
  parsed = [gin_setup.parse_binding(b) for b in bindings]
  cfg, args.loss, args.optimizer, args.train = load_config(args, parsed)
  from t5lite import trainer
  try:
    trainer.check_compiler_options(args.train.compiler_options)
  except ValueError as e:
    parser.error(str(e))
  rows = [args.inputs, args.targets] if cfg.arch == "encoder_decoder" else [args.inputs + args.targets]
  if args.pack < 0 or args.pack > min(rows):
    parser.error(f"--pack {args.pack}: rows of {' and '.join(map(str, rows))} tokens hold 1 to "
                 f"{min(rows)} examples")
  if args.profile and (args.no_train or args.aot or args.compile_depths):
    parser.error("--profile traces the train step: not with --no_train, --aot or "
                 "--compile_depths")
  if args.compile_depths:
    return benchmark_aot.report_compile_vs_depth(cfg, args, bindings)
  if args.aot:
    return benchmark_aot.report_aot(cfg, args, bindings)
  on_gpu = jax.devices()[0].platform == "gpu"
  hf = hf_reference.HFProcess() if args.vs_hf and not on_gpu and not args.hf_in_process else None
  try:
    return run_benchmarks(cfg, args, bindings, on_gpu, hf)
  finally:
    if hf is not None:
      hf.close()


def run_benchmarks(cfg, args, bindings, on_gpu: bool, hf: "hf_reference.HFProcess | None"):
  """Decoding (--decode_batches) then the train step, printed and written (--json); HF's side
  in `hf` where given, else in this process."""
  generate = hf.generate if hf is not None else hf_reference.bench_hf_generate
  runner = hf.runner if hf is not None else hf_reference.hf_runner
  hf_facts = {"hf_process": "child" if hf is not None else "same"} if args.vs_hf else {}
  bf16 = cfg.dtype == "bfloat16"
  peaks = [measure_peak_tflops(on_gpu, bf16, with_torch=args.vs_hf)]
  decode_rows = []
  for b in (int(b) for b in args.decode_batches.split(",") if b):
    ours = bench_decode(cfg, args, b)
    decode_rows.append(ours)
    for cache in args.hf_generate_caches.split(",") if args.vs_hf else ():
      decode_rows.append(generate(cfg, args, b, cache))
      hf_reference.release_torch_gpu_memory()
      decode_rows[-1]["vs_t5lite"] = ours["new_tokens_per_s"] / decode_rows[-1][
          "new_tokens_per_s"]
  for r in decode_rows:
    ratio = f"; t5lite is {r['vs_t5lite']:.2f}x" if "vs_t5lite" in r else ""
    print(f"{r['impl']}: {r['new_tokens_per_s']:.0f} new tokens/s ({args.inputs}-token prompts, "
          f"{args.decode_tokens} new tokens, {r['decode_s']:.2f}s per batch, compile "
          f"{r['compile_s']:.1f}s){ratio}")
  if args.no_train:
    result = dict(run_facts(cfg, args, bindings), **hf_facts, inputs=args.inputs,
                  decode_tokens=args.decode_tokens,
                  host_malloc=host_malloc.active_allocator(os.environ), decode=decode_rows)
    write_json(args.json, result)
    return result
  timed = {}   # with --profile, t5lite's runner is kept for it after the timed steps

  def make_t5lite():
    made = t5lite_runner(cfg, args)
    if args.profile:
      timed["t5lite"] = made
    return made

  makers = [("t5lite", make_t5lite)]
  if args.vs_hf:
    makers += [(f"hf-{mode}", lambda mode=mode: runner(cfg, run_batch(cfg, args),
                                                       compiled=mode == "compiled"))
               for mode in args.hf_modes.split(",")]
  flops = step_flops(cfg, args)
  hf_failed = {}
  if on_gpu:
    rows = time_one_at_a_time(makers, args, flops, hf_failed)
  else:       # in alternating rounds: CPU speed drifts with clocks and neighbours
    rows = time_side_by_side([make() for _, make in makers], args, flops, between_rounds=lambda:
                             peaks.append(measure_peak_tflops(on_gpu, bf16)))
  # The peak again after the steps (on a CPU also between rounds), and the highest counts: a
  # peak measured while the machine was slowed for a moment would inflate MFU (on a VM whose
  # speed drifts, past 100%: decoder/125m's step once read 0.156 TFLOP/s where probes before and
  # after it read 0.151 and 0.141).
  peaks.append(measure_peak_tflops(on_gpu, bf16, with_torch=args.vs_hf))
  peak_by = max(((tflops, name) for p in peaks for name, tflops in p.items()))
  peak = peak_by[0]
  readings = [max(p.values()) for p in peaks]
  for r in rows:
    r["mfu"] = r["tflops"] / peak
  if args.vs_hf:
    for r in rows:
      r["vs_t5lite"] = r["tokens_per_s"] / rows[0]["tokens_per_s"]
  result = {**run_facts(cfg, args, bindings), **hf_facts, "batch": args.batch,
            "inputs": args.inputs, "targets": args.targets, "pack": args.pack, "dtype": cfg.dtype,
            "peak_tflops": peak, "peak_tflops_before_after": [readings[0], readings[-1]],
            "peak_tflops_between_rounds": readings[1:-1],
            "peak_by_matmul": peaks, "peak_matmul": peak_by[1],
            "peak_dtype": "bf16" if on_gpu or bf16 else "fp32",
            "host_malloc": host_malloc.active_allocator(os.environ),
            "host_block_cache": host_malloc.block_cache_preloaded(os.environ),
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
            "malloc_conf": os.environ.get("MALLOC_CONF", ""),
            "results": rows, "hf_failed": hf_failed, "decode": decode_rows}
  head = (f"{'impl':<12}{'step ms':>9}{'tokens/s':>12}{'TFLOP/s':>9}{'MFU':>7}{'mem GiB':>8}"
          f"{'compile s':>10}")
  settings = ", ".join(f"{k}={v}" for k, v in {**result["model"], **result["loss"],
                                                 **result["optimizer"], **result["train"]}.items())
  print(f"# {result['device']} peak {peak:.3g} TFLOP/s ({result['peak_dtype']} matmul, "
        f"{result['peak_matmul']}'s); "
        f"{' '.join(args.gin_file + bindings)} ({settings}) batch {args.batch} x "
        f"({args.inputs}+{args.targets}){f', {args.pack} examples a row' if args.pack > 1 else ''}"
        f"; model FLOPs/token {rows[0]['model_flops_per_token']:.3g}; "
        f"host malloc {result['host_malloc']}"
        f"{' + t5lite block cache' if result['host_block_cache'] else ''}"
        f"{'; HF in its own process' if result.get('hf_process') == 'child' else ''}; "
        + ", ".join(f"{name} {version}" for name, version in result["versions"].items()))
  print(head)
  for r in rows:
    print(f"{r['impl']:<12}{r['step_s'] * 1e3:>9.1f}{r['tokens_per_s']:>12.0f}{r['tflops']:>9.2f}"
          f"{r['mfu'] * 100:>6.1f}%{r['peak_mem_gb']:>8.2f}{r['compile_s']:>10.1f}")
  if max(r["mfu"] for r in rows) > 1:
    print(f"MFU over 100%: a step ran faster than any of the {len(peaks)} matmul probes (the "
          f"host's speed drifted while they ran; more --rounds probe it more often)")
  if on_gpu and rows[0].get("planned_mem_gb"):
    print(f"t5lite's step as XLA planned it: {rows[0]['planned_mem_gb']:.2f} GiB (the device's "
          f"measured peak above: {rows[0]['peak_mem_gb']:.2f} GiB)")
  if not on_gpu:
    print(f"t5lite's process a step: {rows[0]['host_faults_per_step']:,.0f} page faults, "
          f"{rows[0]['host_kernel_s_per_step']:.2f} s in the kernel")
  if args.vs_hf:
    print("t5lite / HF tokens/s: " + ", ".join(
        f"{r['impl']} {rows[0]['tokens_per_s'] / r['tokens_per_s']:.2f}x" for r in rows[1:]))
  if args.profile:
    result["profile"] = profile_step(*timed.pop("t5lite"), args, peak,
                                     remake=(lambda a: t5lite_runner(cfg, a)) if on_gpu else None)
  write_json(args.json, result)
  return result


if __name__ == "__main__":
  main()
