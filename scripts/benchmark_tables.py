"""scripts/benchmark_suite.py's tables: a suite's results as markdown, and its targets checked.

Each function takes the suite's cases (`benchmark_suite.Case`) and the JSON objects their runs of
scripts/benchmark.py wrote, in the same order.
"""

import os


def measured(case, result: dict):
  """(t5lite's row, HF's rows by mode name, the rate both are compared by) of a case's result:
  a train case's step results (tokens/s) or a decoding case's rows at its batch (new tokens/s)."""
  if case.decode_tokens:
    rows = {r["impl"]: r for r in result["decode"]}
    return rows.pop(f"t5lite-decode-b{case.batch}"), rows, "new_tokens_per_s"
  rows = {r["impl"]: r for r in result["results"]}
  return rows.pop("t5lite"), rows, "tokens_per_s"


def gigabytes(gib: float) -> float:
  """GiB (2^30 bytes: benchmark.py's memory figures, as JAX and XLA count device memory) in GB
  (10^9 bytes: the speed issue's memory targets)."""
  return gib * 2 ** 30 / 1e9


def checks(case, result: dict) -> dict:
  """The case's targets, each as (target, measured, met); a ratio whose HF mode failed is
  left out. Peak memory is judged in GB (a 40 GB target is 37.25 GiB)."""
  if "aot" in result:   # compiled, not run: XLA's memory plan is all there is to check
    if case.decode_tokens:
      return {}
    peak = gigabytes(result["memory_gb"]["peak"])
    return {} if case.max_mem_gb is None else {
        "peak GB": (case.max_mem_gb, peak, peak < case.max_mem_gb)}
  ours, rows, rate = measured(case, result)
  out = {}
  if case.min_mfu is not None:
    out["MFU"] = (case.min_mfu, ours["mfu"], ours["mfu"] >= case.min_mfu)
  if case.min_vs_hf is not None and case.min_vs_hf[0] in rows:
    mode, want = case.min_vs_hf
    ratio = ours[rate] / rows[mode][rate]
    out[f"vs {mode}"] = (want, ratio, ratio >= want)
  if case.max_mem_gb is not None:
    peak = gigabytes(ours["peak_mem_gb"])
    out["peak GB"] = (case.max_mem_gb, peak, peak < case.max_mem_gb)
  return out


def _targets(case, result: dict) -> str:
  return "; ".join(f"{name} {'met' if ok else 'NOT met'} ({got:.3g} vs {want:g})"
                   for name, (want, got, ok) in checks(case, result).items()) or "-"


def _commands(results) -> list:
  notes = []
  for result in results:
    notes.append(f"- `{result['command']}`")
    if result["hf_error"]:
      last = result["hf_error"].strip().splitlines()[-1]
      notes.append(f"  - HF failed, t5lite re-run alone: {last}")
    for impl, error in result.get("hf_failed", {}).items():
      notes.append(f"  - {impl} failed, left out: {error.strip().splitlines()[-1]}")
  return ["", "Commands:"] + notes


def _versions(results) -> str:
  """The library versions the cases' runs recorded, for a table's first line ("; jax 0.10.2,
  torch 2.13.0, ..."), or "" where none did."""
  versions = {}
  for result in results:
    versions.update(result.get("versions", {}))
  text = ", ".join(f"{name} {version}" for name, version in versions.items())
  return f"; {text}" if text else ""


def decode_markdown(cases, results) -> str:
  """A decoding suite as a markdown table (new tokens/s, one row per case), commands below."""
  first = results[0]
  lines = [f"Device: {first['device']} ({first['platform']}), host malloc "
           f"{first['host_malloc']}{_versions(results)}; greedy decoding, new tokens/s.", "",
           "| preset | batch | prompt + new | t5lite | HF generate | HF static cache "
           "| targets |", "|---|---|---|---|---|---|---|"]
  for case, result in zip(cases, results):
    ours, rows, rate = measured(case, result)
    hf = [rows.get(f"{name}-b{case.batch}") for name in ("hf-generate", "hf-generate-static")]
    hf = [f"{r[rate]:,.0f} ({ours[rate] / r[rate]:.2f}x)" if r else "-" for r in hf]
    lines.append(f"| {case.preset} | {case.batch} | {case.inputs} + {case.decode_tokens} | "
                 f"{ours[rate]:,.0f} | {hf[0]} | {hf[1]} | {_targets(case, result)} |")
  return "\n".join(lines + _commands(results)) + "\n"


def aot_markdown(cases, results) -> str:
  """A suite compiled for a GPU (--aot) as a markdown table: XLA's memory plan per case, the
  MFU the compiled program's matmul FLOPs allow (model FLOPs / program FLOPs), and the MFU its
  roofline allows (each kernel at the matmul peak or the memory bandwidth, whichever binds)."""
  lines = [f"Compiled for {results[0]['aot']} by XLA's GPU compiler on this host (nothing run: "
           "memory as XLA plans it, no times).", "",
           "| preset | shape | compile s | arguments GiB | temporaries GiB | peak GiB "
           "| program / model FLOPs | MFU ceiling | roofline MFU | cuDNN attention calls "
           "| targets |", "|---|---|---|---|---|---|---|---|---|---|---|"]
  for case, result in zip(cases, results):
    mem = result["memory_gb"]
    calls = ", ".join(f"{k.replace('__cudnn$', '')} x{v}" for k, v in
                      result["cudnn_calls"].items()) or "none"
    lines.append(f"| {case.label} | {case.batch} x ({case.inputs}+{case.targets}) | "
                 f"{result['compile_s']:.1f} | {mem['arguments']:.1f} | {mem['temporaries']:.1f} "
                 f"| {mem['peak']:.1f} | {1 / result['mfu_ceiling']:.3f} "
                 f"| {result['mfu_ceiling']:.1%} | {result['roofline_mfu']:.1%} | {calls} "
                 f"| {_targets(case, result)} |")
  return "\n".join(lines + _commands(results)) + "\n"


def aot_decode_markdown(cases, results) -> str:
  """A decoding suite compiled for a GPU (--aot) as a markdown table: XLA's memory plan, the
  device-memory traffic and kernels of a token step, and the new tokens/s the GPU's memory
  bandwidth allows over that traffic."""
  first = results[0]["decode"][0]
  lines = [f"Greedy decoding compiled for {results[0]['aot']} by XLA's GPU compiler on this host "
           f"(nothing run); a token step's roofline (its kernels' traffic at "
           f"{first['bandwidth_tb_s']:.2f} TB/s, or their matmuls at the peak) bounds new "
           "tokens/s.", "",
           "| preset | batch | prompt + new | peak GiB | token step GB | kernels per step "
           "| prompt GB | at most new tokens/s |", "|---|---|---|---|---|---|---|---|"]
  for case, result in zip(cases, results):
    row = result["decode"][0]
    lines.append(f"| {case.preset} | {case.batch} | {case.inputs} + {case.decode_tokens} | "
                 f"{row['memory_gb']['peak']:.1f} | {row['step_gb']:.2f} | "
                 f"{row['step_kernels']:.0f} | {row['prompt_gb']:.1f} | "
                 f"{row['ceiling_new_tokens_per_s']:,.0f} |")
  return "\n".join(lines + _commands(results)) + "\n"


def markdown(cases, results, not_run=()) -> str:
  """The suite as a markdown table (one row per case that ran), commands and HF failures below
  it, then the cases that failed or were not run (`not_run`: a line each)."""
  missing = ["", "Not measured:"] + [f"- {line}" for line in not_run] if not_run else []
  if not results:
    return "\n".join(["No case ran."] + missing) + "\n"
  return _table(cases, results) + ("\n".join(missing) + "\n" if missing else "")


def _table(cases, results) -> str:
  if "aot" in results[0]:
    return (aot_decode_markdown if cases[0].decode_tokens else aot_markdown)(cases, results)
  if cases[0].decode_tokens:
    return decode_markdown(cases, results)
  first = results[0]
  low, high = (f"{p:.3g}" for p in (min(r["peak_tflops"] for r in results),
                                     max(r["peak_tflops"] for r in results)))
  peak = low if low == high else f"{low}-{high}"
  # A lever suite's rows also say how much faster each lever made the run config's step (the
  # run config: the bindings every case has, those of --gin.X=Y).
  common = tuple(os.path.commonprefix([c.bindings for c in cases]))
  base = {(c.preset, c.batch, c.inputs, c.targets): measured(c, r)[0]["step_s"]
          for c, r in zip(cases, results) if c.bindings == common}
  levers = any(c.bindings != common for c in cases)
  lines = [f"Device: {first['device']} ({first['platform']}), matmul peak {peak} TFLOP/s "
           f"(measured in each case's run), host malloc {first['host_malloc']}"
           f"{_versions(results)}.", "",
           "| preset | shape | t5lite ms | tokens/s | MFU | peak GiB | HF best | HF tokens/s "
           "| t5lite / HF | targets |" + (" vs the run config |" if levers else ""),
           "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if levers else "")]
  for case, result in zip(cases, results):
    ours, rows, _ = measured(case, result)
    run_config = base.get((case.preset, case.batch, case.inputs, case.targets))
    speedup = (f" {run_config / ours['step_s']:.3f}x |" if run_config else " - |") if levers else ""
    best = max(rows.values(), key=lambda r: r["tokens_per_s"]) if rows else None
    hf = (f"{best['impl']} | {best['tokens_per_s']:,.0f} | "
          f"{ours['tokens_per_s'] / best['tokens_per_s']:.2f}x") if best else (
              "failed | - | -" if case.hf_modes else "- | - | -")
    targets = _targets(case, result)
    shape = f"{case.batch} x ({case.inputs}+{case.targets})" + (
        f", {case.pack} a row" if case.pack else "")
    lines.append(f"| {case.label} | {shape} | {ours['step_s'] * 1e3:,.1f} | "
                 f"{ours['tokens_per_s']:,.0f} | {ours['mfu']:.1%} | {ours['peak_mem_gb']:.1f} | "
                 f"{hf} | {targets} |{speedup}")
  return "\n".join(lines + _commands(results)) + "\n"
