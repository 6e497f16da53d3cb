"""scripts/benchmark.py's --aot and --compile_depths: the train step (and greedy decoding)
compiled from shapes alone, nothing allocated or run. With --aot=h100 (t5lite/gpu_aot.py)
XLA's GPU compiler compiles them for one such GPU on this host, GPU or not, and the report
has XLA's memory plan, the cuDNN attention calls, the matmul FLOPs against the model's, the
roofline and the longest kernels (t5lite/hlo_analysis.py); --compile_depths times the
compiles at several depths, layers scanned and unrolled.
"""

import contextlib
import dataclasses
import time

import jax
import jax.numpy as jnp

from benchmark_step import SETTINGS, run_batch, run_facts, step_flops, t5lite_step, write_json


def _on_gpu(target: str):
  """(place, tracing): `place(tree)` puts abstract values on one `target` GPU (t5lite.gpu_aot)
  and `tracing` is the context to trace them in; with no target, the host's as they are."""
  if not target:
    return (lambda tree: tree), contextlib.nullcontext()
  from t5lite import gpu_aot
  sharding = jax.sharding.SingleDeviceSharding(gpu_aot.devices(target, 1)[0])
  place = lambda tree: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
  return place, gpu_aot.tracing_for(target)


def compile_abstract(cfg, args, target: str = ""):
  """(compiled train step, seconds to trace + lower, seconds to compile), from shapes alone:
  nothing is allocated. With a GPU `target` (e.g. "h100", t5lite.gpu_aot) the shapes sit on one
  of its devices and the step is traced as for it, so XLA's GPU compiler compiles it on this
  host, GPU or not."""
  step, init = t5lite_step(cfg, args)
  state = jax.eval_shape(init, jax.random.key(0))
  batch = jax.eval_shape(lambda: run_batch(cfg, args))
  place, tracing = _on_gpu(target)
  t = time.perf_counter()
  with tracing:
    lowered = step.lower(place(state), place(batch))
  lower_s = time.perf_counter() - t
  t = time.perf_counter()
  compiled = lowered.compile()
  return compiled, lower_s, time.perf_counter() - t


def compile_decode_abstract(cfg, args, batch: int, target: str):
  """(compiled greedy decode, seconds to compile) of `batch` prompts of --inputs tokens and
  --decode_tokens new tokens (EOS off, as bench_decode runs it), from shapes alone, for one
  `target` GPU."""
  from t5lite import serving
  from t5lite.models.model import Model
  model = Model(cfg)
  params = jax.eval_shape(lambda: serving.session_params(model, model.init(jax.random.key(0))))
  key = "encoder_input_tokens" if cfg.arch == "encoder_decoder" else "prompt_tokens"
  feed = {key: jax.ShapeDtypeStruct((batch, args.inputs), jnp.int32)}
  decode = jax.jit(lambda p, f: model.predict_batch(p, f, max_decode_len=args.decode_tokens,
                                                    eos_id=-1))
  place, tracing = _on_gpu(target)
  with tracing:
    lowered = decode.lower(place(params), place(feed))
  t = time.perf_counter()
  compiled = lowered.compile()
  return compiled, time.perf_counter() - t


def compile_vs_depth(cfg, args, depths):
  """Seconds to trace + lower and to compile the train step at each depth (every stack of the
  model set to it), with layers scanned and unrolled. Shapes only: nothing is allocated or run,
  so large presets are cheap to study. Scanned, the compile time should stay flat with depth.
  With --aot, XLA's GPU compiler compiles for that GPU."""
  rows = []
  for depth in depths:
    for scan in (True, False):
      sized = dataclasses.replace(cfg, num_decoder_layers=depth, scan_layers=scan, **(
          {"num_encoder_layers": depth} if cfg.arch == "encoder_decoder" else {}))
      _, lower_s, compile_s = compile_abstract(sized, args, args.aot)
      rows.append({"depth": depth, "scan_layers": scan, "lower_s": lower_s,
                   "compile_s": compile_s})
  return rows


def report_aot(cfg, args, bindings):
  """--aot: compiles for one GPU of that kind with XLA's GPU compiler, from shapes (no GPU
  needed, nothing runs, so no time), and writes --json. The train step (unless --no_train):
  XLA's memory plan, the cuDNN attention calls and the matmul FLOPs of the compiled program
  (t5lite/hlo_analysis.py) against the model FLOPs; model FLOPs / program FLOPs bounds the MFU
  the program can reach (the rest is rematerialization and flash attention's recomputed
  scores); with the kernels' device-memory traffic too, the roofline (`hlo_analysis.roofline`)
  bounds it lower. Greedy decoding at each of --decode_batches: see `aot_decode`."""
  result = dict(run_facts(cfg, args, bindings), device=f"{args.aot} (compiled, not run)",
                platform="gpu-aot", aot=args.aot, batch=args.batch, inputs=args.inputs,
                targets=args.targets, dtype=cfg.dtype, decode=[])
  settings = ", ".join(f"{k}={v}" for k, v in {**result["model"], **result["loss"],
                                                 **result["optimizer"], **result["train"]}.items())
  print(f"# compiled for {args.aot} by XLA's GPU compiler on this host (nothing run); "
        f"{' '.join(args.gin_file + bindings)} ({settings})")
  if not args.no_train:
    result.update(aot_train(cfg, args))
  for batch in (int(b) for b in args.decode_batches.split(",") if b):
    result["decode"].append(aot_decode(cfg, args, batch))
  write_json(args.json, result)
  return result


def aot_train(cfg, args) -> dict:
  """The train step compiled for --aot's GPU (see `report_aot`), printed; its facts."""
  from t5lite import gpu_aot, hlo_analysis
  compiled, lower_s, compile_s = compile_abstract(cfg, args, args.aot)
  text = compiled.as_text()
  parsed = hlo_analysis.Program(text)
  memory = gpu_aot.memory_gb(compiled)
  program = hlo_analysis.matmul_flops(parsed)
  model = step_flops(cfg, args)
  peak = gpu_aot.MATMUL_TFLOPS[args.aot] * 1e12
  bound = hlo_analysis.roofline(parsed, peak, gpu_aot.memory_bandwidth(args.aot))
  result = dict(lower_s=lower_s, compile_s=compile_s, memory_gb=memory,
                cudnn_calls=gpu_aot.cudnn_attention_calls(text), model_flops=model,
                program_flops=program, mfu_ceiling=model / program["total"],
                roofline=bound, roofline_mfu=model / peak / bound["seconds"])
  print(f"train step, batch {args.batch} x ({args.inputs}+{args.targets}): lower {lower_s:.1f} s, "
        f"compile {compile_s:.1f} s; memory per device (GiB): "
        + ", ".join(f"{k} {v:.2f}" for k, v in memory.items()))
  print("cuDNN attention calls: " + (", ".join(f"{k} x{v}" for k, v in
                                              result["cudnn_calls"].items()) or "none"))
  print(f"matmul FLOPs per step: program {program['total'] / 1e12:.3g} TFLOP ("
        + ", ".join(f"{k} {program[k] / 1e12:.3g}" for k in ("dot", "gemm", "attention"))
        + f"), model {model / 1e12:.3g} TFLOP: MFU can reach at most {result['mfu_ceiling']:.1%}")
  print(f"roofline at {peak / 1e12:.0f} TFLOP/s and "
        f"{gpu_aot.memory_bandwidth(args.aot) / 1e12:.2f} TB/s: a step takes at least "
        f"{bound['seconds'] * 1e3:.1f} ms ({bound['matmul_s'] * 1e3:.1f} in matmul-bound "
        f"kernels, {bound['memory_s'] * 1e3:.1f} in memory-bound ones): MFU at most "
        f"{result['roofline_mfu']:.1%}")
  result["top_kernels"] = hlo_analysis.top_kernels(parsed, peak,
                                                   gpu_aot.memory_bandwidth(args.aot))
  traffic = hlo_analysis.memory_traffic(parsed)
  result["kernels_per_step"], result["step_gb"] = traffic["kernels"], traffic["bytes"] / 1e9
  print(f"{result['kernels_per_step']:.0f} kernels a step moving {result['step_gb']:.1f} GB of "
        "device memory; the longest in that bound (all runs):")
  for row in result["top_kernels"]:
    print(f"  {row['seconds'] * 1e3:6.2f} ms {row['bound']:<6} x{row['runs']:<3} "
          f"{row['bytes'] / 1e6:8.1f} MB {row['flops'] / 1e9:7.1f} GFLOP  "
          f"{row['op_name'][-80:] or row['opcode'] + ' ' + row['shape'][:60]}")
  return result


def aot_decode(cfg, args, batch: int) -> dict:
  """Greedy decoding of `batch` prompts compiled for --aot's GPU, printed; its facts: XLA's
  memory plan, and the device-memory traffic and kernels of one token step (the decode loop's
  body) and of the rest (the prompt, once). A token step at batch 32 or less is bound by that
  traffic (every weight and the KV cache are read, for a few FLOPs each): its roofline
  (`hlo_analysis.roofline`) bounds the new tokens/s the program can reach."""
  from t5lite import gpu_aot, hlo_analysis
  compiled, compile_s = compile_decode_abstract(cfg, args, batch, args.aot)
  program = hlo_analysis.Program(compiled.as_text())
  loops = program.unknown_loops   # the token loop: it stops when every row has ended
  if len(loops) != 1:
    raise RuntimeError(f"expected one token loop without a known trip count, found {loops}")
  step = hlo_analysis.memory_traffic(program, loops[0])
  whole = hlo_analysis.memory_traffic(program)          # the prompt and one token step
  bandwidth = gpu_aot.memory_bandwidth(args.aot)
  bound = hlo_analysis.roofline(program, gpu_aot.MATMUL_TFLOPS[args.aot] * 1e12, bandwidth,
                                loops[0])
  row = {"impl": f"t5lite-decode-b{batch}", "batch": batch, "compile_s": compile_s,
         "memory_gb": gpu_aot.memory_gb(compiled), "step_gb": step["bytes"] / 1e9,
         "step_kernels": step["kernels"], "prompt_gb": (whole["bytes"] - step["bytes"]) / 1e9,
         "bandwidth_tb_s": bandwidth / 1e12, "step_roofline": bound,
         "ceiling_new_tokens_per_s": batch / bound["seconds"]}
  print(f"greedy decode, batch {batch}, {args.inputs}-token prompts, {args.decode_tokens} new "
        f"tokens: compile {compile_s:.1f} s, peak {row['memory_gb']['peak']:.2f} GiB; a token "
        f"step moves {row['step_gb']:.3g} GB in {step['kernels']:.0f} kernels (the prompt "
        f"{row['prompt_gb']:.3g} GB) and takes at least {bound['seconds'] * 1e3:.2f} ms at "
        f"{row['bandwidth_tb_s']:.2f} TB/s: at most {row['ceiling_new_tokens_per_s']:,.0f} new "
        "tokens/s")
  return row


def report_compile_vs_depth(cfg, args, bindings):
  """Runs `compile_vs_depth` for --compile_depths, prints its table, writes --json."""
  depths = [int(d) for d in args.compile_depths.split(",") if d]
  rows = compile_vs_depth(cfg, args, depths)
  result = dict(run_facts(cfg, args, bindings, [k for k in SETTINGS if k != "scan_layers"]),
                batch=args.batch, inputs=args.inputs, targets=args.targets,
                compile_vs_depth=rows)
  if args.aot:
    result.update(device=f"{args.aot} (XLA's GPU compiler on this host)", aot=args.aot)
  settings = ", ".join(f"{k}={v}" for k, v in result["model"].items())
  print(f"# train step compile time on {result['device']}; {' '.join(args.gin_file + bindings)} "
        f"({settings}) batch {args.batch} x ({args.inputs}+{args.targets}); depth = layers per "
        "stack")
  print(f"{'depth':>6}{'scanned lower s':>17}{'compile s':>11}{'unrolled lower s':>18}{'compile s':>11}")
  for scanned, unrolled in zip(rows[::2], rows[1::2]):
    print(f"{scanned['depth']:>6}{scanned['lower_s']:>17.1f}{scanned['compile_s']:>11.1f}"
          f"{unrolled['lower_s']:>18.1f}{unrolled['compile_s']:>11.1f}")
  write_json(args.json, result)
  return result
