"""The standard benchmark table in one command: each case of a suite through scripts/benchmark.py.

    python scripts/benchmark_suite.py --suite=cpu [--json=cpu.json] [--markdown=cpu.md]
    python scripts/benchmark_suite.py --suite=cpu-compiled              # HF torch.compile too
    python scripts/benchmark_suite.py --suite=cpu-bf16                  # bf16, CPUs with AMX
    python scripts/benchmark_suite.py --suite=cpu-packed                # packed rows (--pack=4)
    python scripts/benchmark_suite.py --suite=gpu --cases=t5_1_1/base   # one case per call
    python scripts/benchmark_suite.py --suite=gpu-levers --budget=500   # what fits in 500 s
    python scripts/benchmark_suite.py --suite=cpu-decode                # or gpu-decode
    python scripts/benchmark_suite.py --suite=cpu-bf16-decode           # bf16 decoding, AMX
    python scripts/benchmark_suite.py --suite=gpu-levers                # or cpu-levers
    python scripts/benchmark_suite.py --suite=gpu --aot=h100   # on any host: XLA's memory plan
    python scripts/benchmark_suite.py --suite=gpu-decode --aot=h100  # decoding's memory traffic
    python scripts/benchmark_suite.py --suite=gpu --no_hf \
        --gin.ModelConfig.remat_policy="'dots_no_batch'"     # a lever against the targets

Each case runs in its own process (fresh device memory, its own host allocator restart) with
`--vs-hf`; the CPU suite hides GPUs from both JAX and torch, and the GPU suite refuses to start
without one. If a case's run with HF fails (e.g. HF out of GPU memory, as HF T5-large nearly is
on an 80 GB H100), the case runs again without HF, so t5lite's numbers survive, and the table
says why HF is missing. The table has the command of every case, t5lite's step time, tokens/s,
MFU and peak memory, HF's best mode, the ratio, and the speed issue's targets with whether each
was met (GPU: MFU, 1.3x HF torch.compile, peak memory; CPU: ahead of HF eager, and in
`cpu-compiled` ahead of HF torch.compile; `--no_hf` runs t5lite alone, and `--gin.X=Y` adds a
binding to every case). The decoding suites time greedy decoding against HF
generate with its default and its static cache (GPU: >= 5x at batch 1, >= 1.5x the static
cache at batch 32; CPU: ahead of HF's default cache).
The lever suites run t5lite alone, with the run config and then with each lever of `LEVERS`
(on GPUs `GPU_LEVERS`) added in gin, so one call measures what each lever gains (3 runs per
preset on CPU, 12 on GPUs, lever by lever across the presets; `--cases=PRESET` runs one preset).
`--aot=h100` compiles a GPU suite's cases for an H100 with XLA's GPU compiler on this host
instead (t5lite/gpu_aot.py; no GPU needed, nothing runs): for training, the table has XLA's
memory plan, checked against the memory targets, the cuDNN attention calls and the MFU the
program's matmul FLOPs allow; for decoding (`gpu-decode`), the memory plan and a token step's
device-memory traffic, which bounds new tokens/s at the GPU's bandwidth.
`--budget=SECONDS` fits a suite into a device lease: no case starts with less than
`--min_case_s` left, no run goes past the budget, and the JSON and markdown are rewritten after
every case; the table lists the cases not run or failed (a failed case no longer stops the
suite; the exit status says it failed).
"""

import argparse
import ast
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Optional, Tuple

import benchmark_tables  # scripts/, beside this file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Case:
  """One row of a suite: a model preset, a run config and the batch shape."""
  preset: str
  run: str
  batch: int
  inputs: int
  targets: int
  steps: int
  warmup: int
  hf_modes: str   # "" for t5lite alone
  # Targets from the speed issue: t5lite's MFU, its tokens/s over an HF mode's, peak memory.
  min_mfu: Optional[float] = None
  min_vs_hf: Optional[Tuple[str, float]] = None    # e.g. ("hf-compiled", 1.3)
  max_mem_gb: Optional[float] = None   # GB of 10^9 bytes, as the issue counts them
  # A decoding case (`decode_tokens` > 0): greedy decode of `batch` prompts of `inputs` tokens,
  # no train step; `hf_modes` are then HF generate's caches (dynamic, static).
  decode_tokens: int = 0
  # gin bindings after the run config (a lever suite's variant), e.g. ("LossConfig.head_chunks=8",).
  bindings: Tuple[str, ...] = ()
  # Examples per row (benchmark.py --pack): 0 for one example a row.
  pack: int = 0

  @property
  def label(self) -> str:
    """The preset, and the variant's bindings where it has any."""
    return " ".join((self.preset,) + self.bindings)

  @property
  def gin_files(self) -> Tuple[str, str]:
    """The model preset, then the run config."""
    return (f"models/{self.preset}.gin", f"runs/{self.run}.gin")

  def argv(self, with_hf: bool, aot: str = "") -> Tuple[str, ...]:
    """scripts/benchmark.py's arguments for this case (`aot`: compiled for that GPU instead)."""
    gin = tuple(f"--gin_file={f}" for f in self.gin_files) + tuple(
        f"--gin.{b}" for b in self.bindings)
    if self.decode_tokens:
      return gin + (f"--inputs={self.inputs}", "--no_train", f"--decode_batches={self.batch}",
                    f"--decode_tokens={self.decode_tokens}") + (
                        (f"--aot={aot}",) if aot else
                        ("--vs-hf", f"--hf-generate-caches={self.hf_modes}") if with_hf else ())
    if aot:
      return gin + (f"--batch={self.batch}", f"--inputs={self.inputs}",
                    f"--targets={self.targets}", f"--aot={aot}")
    args = gin + (f"--batch={self.batch}", f"--inputs={self.inputs}", f"--targets={self.targets}",
                  f"--steps={self.steps}", f"--warmup={self.warmup}") + (
                      (f"--pack={self.pack}",) if self.pack else ())
    return args + (("--vs-hf", f"--hf-modes={self.hf_modes}") if with_hf else ())


def _decode_case(preset: str, run: str, batch: int, inputs: int, new_tokens: int,
                 min_vs_hf: Optional[Tuple[str, float]] = None,
                 hf_caches: str = "dynamic,static") -> Case:
  return Case(preset, run, batch, inputs, 0, steps=0, warmup=0, hf_modes=hf_caches,
              min_vs_hf=min_vs_hf, decode_tokens=new_tokens)


def run_compiler_options(run: str) -> dict:
  """The `TrainConfig.compiler_options` gin_configs/runs/<run>.gin binds (a flat dict literal),
  {} where it binds none: a lever that sets the dict replaces the whole of it, so it starts
  from these."""
  with open(os.path.join(REPO, "gin_configs", "runs", f"{run}.gin"), encoding="utf-8") as f:
    found = re.search(r"^TrainConfig\.compiler_options\s*=\s*(\{.*?\})", f.read(),
                      re.MULTILINE | re.DOTALL)
  return ast.literal_eval(found.group(1)) if found else {}


def _compiler_options(options: dict) -> str:
  """The gin binding of `TrainConfig.compiler_options` to `options`."""
  return f"TrainConfig.compiler_options={options!r}"


# The levers of the speed issue that no GPU has measured yet, each against the run config alone,
# t5lite only (HF's runs, torch.compile above all, would take most of a device call): the output
# head and loss in blocks, and bfloat16 parameters on float32 masters.
HEAD_CHUNKS = ("LossConfig.head_chunks=8",)
BF16_PARAMS = ("ModelConfig.param_dtype='bfloat16'", "OptimizerConfig.master_weights=True")
LEVERS = ((), HEAD_CHUNKS, BF16_PARAMS)
# GPU only: runs/gpu.gin, then first what no GPU has timed: T5's biased attention through t5lite's
# Pallas kernel (t5lite/kernels/gpu_attention.py; cuDNN's biased backward took 18.1 of T5-base's
# 84.1 ms on the H100), the gated MLP's two matmuls with autodiff's gradient ("split", which the
# H100 timed; runs/gpu.gin has "split_recompute", from XLA's H100 programs alone), and AdamW's
# first moment in bfloat16 (0.3-0.4 ms and 0.5-2.0 GiB less in those programs). Then each of
# runs/gpu.gin's choices undone or another added, as the seventy-first session's H100 timed them
# on T5-base (runs/gpu.gin says what each gave): the gated MLP's stacked matmul with the
# hand-written gradient and with autodiff's, XLA's dot merger on (runs/gpu.gin turns it off: it
# joins matmuls that share an operand at the cost of concatenating their weights and gradients
# and slicing their outputs), every GEMM a cuBLAS call, the state not donated (its memory), the
# steps back to the configuration the forty-sixth session's H200 timed (scanned layers under
# dots_no_batch; unrolled under dots_no_batch; unrolled keeping cuDNN attention's outputs and the
# feed-forward block's gated product), bfloat16 parameters on float32 masters and the whole
# logits (runs/gpu.gin has the head and loss in 8 blocks). A budget cuts the last.
GPU_OPTIONS = run_compiler_options("gpu")
GPU_LEVERS = (
    (), ("ModelConfig.attention_impl='pallas'",), ("ModelConfig.gated_projection='split'",),
    ("OptimizerConfig.mu_dtype='bfloat16'",), ("ModelConfig.gated_projection='stacked'",),
    ("ModelConfig.gated_projection='stacked_autodiff'",),
    (_compiler_options({k: v for k, v in GPU_OPTIONS.items()
                        if k != "xla_gpu_dot_merger_threshold_mb"}),),
    (_compiler_options({**GPU_OPTIONS, "xla_gpu_enable_triton_gemm": False}),),
    ("TrainConfig.donate_state=False",),
    ("ModelConfig.scan_layers=True", "ModelConfig.remat_policy='dots_no_batch'"),
    ("ModelConfig.remat_policy='dots_no_batch'",),
    ("ModelConfig.remat_policy='dots_no_batch_attention_mlp'",),
    BF16_PARAMS, ("LossConfig.head_chunks=0",))


def _lever_cases(shapes, run: str, steps: int, warmup: int, levers=LEVERS):
  # Lever by lever, each on every preset: a budget that cuts the suite short cuts whole levers.
  return tuple(Case(preset, run, batch, inputs, targets, steps=steps, warmup=warmup, hf_modes="",
                    bindings=lever)
               for lever in levers for preset, batch, inputs, targets in shapes)


# The CPU presets, with the timed and warm-up steps each takes (b8 x (256+64), fp32): at least
# two a round (--vs-hf's three), so that no runner's median rests on one step of a round (with
# decoder-125m's 4 steps, 2 + 1 + 1, a round's one step of 15.1 s, against 11.6-12.8 s for the
# others, moved t5lite's median from 12.4 to 12.6 s: 0.99x -> 0.97x HF eager's speed).
CPU_PRESETS = (("decoder/tiny", 30, 3), ("t5_1_1/tiny", 30, 3), ("t5_1_1/small", 6, 2),
               ("decoder/125m", 6, 2))


def _cpu_cases(hf_modes: str, ahead_of: str, run: str = "cpu"):
  return tuple(Case(preset, run, 8, 256, 64, steps=steps, warmup=warmup, hf_modes=hf_modes,
                    min_vs_hf=(ahead_of, 1.0))
               for preset, steps, warmup in CPU_PRESETS)


SUITES = {
    # The CPU comparison every session reports: ahead of HF eager.
    "cpu": _cpu_cases("eager", "hf-eager"),
    # The same against HF under torch.compile too (inductor's C++ kernels; each HF model takes
    # 30 s or more to compile): the CPU side of the GPU targets' comparison.
    "cpu-compiled": _cpu_cases("eager,compiled", "hf-compiled"),
    # bf16 on CPUs with AMX (runs/cpu_bf16.gin) against HF eager under bf16 autocast.
    "cpu-bf16": _cpu_cases("eager", "hf-eager", run="cpu_bf16"),
    # Packed rows (T5X's pretraining layout: --pack=4, 4 examples a row) against HF, which has
    # no segment masks and sees the same tokens as whole rows.
    "cpu-packed": tuple(Case(preset, "cpu", 8, 256, 64, steps=20, warmup=3,
                             hf_modes="eager,compiled", min_vs_hf=("hf-eager", 1.0), pack=4)
                        for preset in ("decoder/tiny", "t5_1_1/tiny", "prefix_lm_tiny")),
    # The speed issue's GPU targets, on one H100 (bf16).
    "gpu": (
        Case("t5_1_1/base", "gpu", 64, 512, 128, steps=10, warmup=3, hf_modes="eager,compiled",
             min_mfu=0.45, min_vs_hf=("hf-compiled", 1.3)),
        Case("t5_1_1/large", "gpu", 32, 512, 128, steps=10, warmup=3, hf_modes="eager,compiled",
             min_mfu=0.45, min_vs_hf=("hf-compiled", 1.3), max_mem_gb=40.0),
        Case("decoder/1b", "gpu", 8, 0, 2048, steps=10, warmup=3, hf_modes="eager,compiled",
             min_mfu=0.60, min_vs_hf=("hf-compiled", 1.3), max_mem_gb=40.0),
    ),
    # Decoding (the decoding issue): greedy, new tokens/s against HF generate. CPU: ahead of
    # HF's default cache; GPU (bf16, 512-token prompts, 128 new tokens): >= 5x HF generate at
    # batch 1 and >= 1.5x HF generate with a static cache at batch 32.
    "cpu-decode": tuple(
        _decode_case(preset, "cpu", batch, 64, 32, (f"hf-generate-b{batch}", 1.0))
        for preset in ("decoder/tiny", "t5_1_1/tiny", "t5_1_1/small", "decoder/125m")
        for batch in (1, 32)),
    # bf16 decoding (runs/cpu_bf16.gin) against HF generate with bf16 weights.
    "cpu-bf16-decode": tuple(
        _decode_case(preset, "cpu_bf16", batch, 64, 32, (f"hf-generate-b{batch}", 1.0))
        for preset in ("t5_1_1/small", "decoder/125m") for batch in (1, 32)),
    # On a GPU each case times only the HF cache its target names (HF's static cache compiles
    # its model in every case's process: minutes of a device lease).
    "gpu-decode": tuple(
        _decode_case(preset, "gpu", batch, 512, 128, target, hf_caches=cache)
        for preset in ("t5_1_1/base", "t5_1_1/large", "decoder/1b")
        for batch, target, cache in ((1, ("hf-generate-b1", 5.0), "dynamic"),
                                     (32, ("hf-generate-static-b32", 1.5), "static"))),
    # runs/gpu.gin and each lever on top of it: T5-base b64 x (512+128), 1b b8 x 2048.
    "gpu-levers": _lever_cases((("t5_1_1/base", 64, 512, 128), ("decoder/1b", 8, 0, 2048)),
                               "gpu", steps=5, warmup=2, levers=GPU_LEVERS),
    # The same on CPU, float32 (bfloat16 parameters are cast up for every use there).
    "cpu-levers": _lever_cases((("decoder/tiny", 8, 256, 64), ("t5_1_1/tiny", 8, 256, 64)),
                               "cpu", steps=10, warmup=2),
}


# What each platform's suites' runs may see: the CPU suites hide GPUs from JAX and torch alike,
# so on a GPU host they still measure the CPU.
SUITE_ENV = {"cpu": {"JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": ""}, "gpu": {}}


def jax_backend() -> str:
  """JAX's default backend, asked in a short-lived process (one that stayed would hold on to
  GPU memory the benchmark runs need)."""
  proc = subprocess.run([sys.executable, "-c", "import jax; print(jax.default_backend())"],
                        capture_output=True, text=True, check=True)
  return proc.stdout.strip().splitlines()[-1]


def run_case(case: Case, timeout_s: float, env=None, aot: str = "",
             deadline: Optional[float] = None) -> dict:
  """Runs one case (with HF, else without; `aot`: compiled for that GPU, see --aot) with `env`
  added to the environment, each run stopped after `timeout_s` or at `deadline` (a
  `time.monotonic()` time), whichever comes first; returns benchmark.py's JSON plus `command`
  and, where HF failed, `hf_error` (its output's end). Raises RuntimeError if t5lite's run
  fails or no time is left for it."""
  hf_error = ""
  for with_hf in (True, False) if case.hf_modes and not aot else (False,):
    limit = timeout_s if deadline is None else min(timeout_s, deadline - time.monotonic())
    if limit < 1:
      raise RuntimeError(f"{case.label}: no time left to run it{' alone' if hf_error else ''} "
                         f"(HF's run: {hf_error.strip().splitlines()[-1] if hf_error else '-'})")
    with tempfile.TemporaryDirectory() as tmp:
      out = os.path.join(tmp, "result.json")
      argv = ["scripts/benchmark.py", *case.argv(with_hf, aot), f"--json={out}"]
      try:
        proc = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True,
                              timeout=limit, check=False, env=dict(os.environ, **(env or {})))
        failure = "" if proc.returncode == 0 else (proc.stdout + proc.stderr)[-1500:]
      except subprocess.TimeoutExpired:
        failure = f"timed out after {limit:.0f} s"
      if not failure:
        with open(out, encoding="utf-8") as f:
          result = json.load(f)
        return dict(result, command="python " + " ".join(argv[:-1]), hf_error=hf_error)
    if not with_hf:
      raise RuntimeError(f"{case.preset}: scripts/benchmark.py failed without HF too:\n{failure}")
    hf_error = failure


def main(argv=None):
  """Runs the suite's cases, prints the markdown table; returns the results."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--suite", choices=sorted(SUITES), required=True)
  parser.add_argument("--cases", default="", help="comma-separated presets (default: all)")
  parser.add_argument("--steps", type=int, default=0,
                      help="a quick look: this many timed steps per case, one warm-up step")
  parser.add_argument("--timeout", type=float, default=1800, help="seconds per benchmark run")
  parser.add_argument("--budget", type=float, default=0,
                      help="seconds for the whole suite (e.g. a device lease's): no case starts "
                           "with less than --min_case_s left, and none runs past it")
  parser.add_argument("--min_case_s", type=float, default=60)
  parser.add_argument("--json", default="")
  parser.add_argument("--markdown", default="")
  parser.add_argument("--aot", default="", metavar="GPU",
                      help="a GPU suite compiled for this GPU (e.g. h100) by XLA's GPU compiler "
                           "on this host, no GPU needed: memory targets, FLOPs and (decoding) "
                           "memory traffic")
  parser.add_argument("--no_hf", action="store_true",
                      help="t5lite alone (no HF runs; the HF ratio targets are then not judged)")
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parser.parse_args([a for a in argv if not a.startswith("--gin.")])
  # --gin.Config.field=value: added to every case before its own bindings (a lever suite's
  # levers then vary on top of them), checked by benchmark.py as it runs the case.
  extra = tuple(a[len("--gin."):] for a in argv if a.startswith("--gin."))
  cases = tuple(dataclasses.replace(c, bindings=extra + c.bindings,
                                    hf_modes="" if args.no_hf else c.hf_modes)
                for c in SUITES[args.suite])
  if args.cases:
    wanted = args.cases.split(",")
    unknown = sorted(set(wanted) - {c.preset for c in cases})
    if unknown:
      parser.error(f"--cases: {', '.join(unknown)} not in the {args.suite} suite "
                   f"({', '.join(dict.fromkeys(c.preset for c in cases))})")
    cases = tuple(c for c in cases if c.preset in wanted)
  platform = args.suite.split("-")[0]
  if args.aot:
    if platform != "gpu":
      parser.error("--aot compiles the GPU suites (gpu, gpu-levers, gpu-decode)")
    platform = "cpu"   # the host compiles; its own GPU, if any, stays out of it
  backend = jax_backend() if platform == "gpu" else "cpu"
  if backend != platform:
    parser.error(f"--suite={args.suite} needs a GPU; JAX's backend here is {backend}")
  if args.steps:
    cases = tuple(dataclasses.replace(c, steps=args.steps, warmup=1) for c in cases)
  deadline = time.monotonic() + args.budget if args.budget else None
  ran, results, skipped, failed = [], [], [], []
  for case in cases:
    left = deadline - time.monotonic() if deadline else None
    if left is not None and left < args.min_case_s:
      skipped.append(f"{case.label}: not run ({left:.0f} s of --budget left)")
    else:
      print(f"# {case.preset} ...", flush=True)
      try:
        results.append(run_case(case, args.timeout, SUITE_ENV[platform], args.aot, deadline))
        ran.append(case)
      except RuntimeError as e:
        failed.append(f"{case.label}: failed: {str(e).strip().splitlines()[-1][:300]}")
        print(str(e), file=sys.stderr, flush=True)
    # After every case, so that a suite killed with its device lease keeps what it measured.
    write_outputs(args, ran, results, failed + skipped)
  print(benchmark_tables.markdown(ran, results, failed + skipped))
  if failed:
    raise SystemExit(f"{len(failed)} case(s) failed: see above")
  return results


def write_outputs(args, cases, results, not_run):
  """Writes --markdown and --json (where given) with what has been measured so far."""
  if args.markdown:
    with open(args.markdown, "w", encoding="utf-8") as f:
      f.write(benchmark_tables.markdown(cases, results, not_run))
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"suite": args.suite, "cases": [dataclasses.asdict(c) for c in cases],
                 "results": results, "not_run": not_run}, f, indent=1)


if __name__ == "__main__":
  main()
