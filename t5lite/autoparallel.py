"""Alpa-style automatic parallelization on what today's XLA exposes.

Alpa searched intra-operator sharding with an ILP; that pass is not in public CPU/GPU XLA builds,
so t5lite searches a structured space instead and lets XLA price each point:

  candidates = factorizations of the device count over (stage, data, fsdp, tensor)
               x rule presets x remat policy x microbatch count;
  for each:    lower and compile the real train step (never run it) and read, from that one
               program (t5lite/hlo_analysis.py),
               - peak memory per device from `compiled.memory_analysis()`,
               - matmul FLOPs and the collectives from the optimized HLO, every loop body
                 counted as often as it runs (a scanned layer stack inside an accumulation
                 loop: layers x microbatches), rematerialization included;
               pipelined candidates (stage > 1) take the per-stage share of the same costs on
               devices / stage devices, times GPipe's bubble (m + stages - 1) / m, plus the
               stage-to-stage activation transfers;
  score:       compute time = FLOPs / peak (for a GPU target, the program's roofline: each
               kernel at the matmul peak or at the GPU's memory bandwidth, whichever binds),
               communication through an alpha-beta model (ring factors per collective), plan
               infeasible if memory exceeds the budget;
  optionally time the best few for real.

    python -m t5lite.autoparallel --gin_file=models/t5_1_1/large.gin --num_devices=8 \
        --device_memory_gb=16 --batch=32 --inputs=512 --targets=128 --output=plan.gin

With `--target=h100` the plan is for 8 H100s from any host: each candidate's full-depth program
is compiled for them by XLA's GPU compiler (t5lite/gpu_aot.py: cuDNN attention, GPU buffer
assignment), so peak memory is the GPU's, not XLA:CPU's (which, for the 1b preset, says twice
what an H100 measured), and so are the FLOPs (cuDNN flash attention recomputes its scores in the
backward pass) and the collectives (the GPU's combiners and asynchronous collectives).
"""

import argparse
import dataclasses
import functools
import os
import sys
import time
from typing import List, Optional, Sequence


@dataclasses.dataclass(frozen=True)
class Hardware:
  """Per-device peak FLOP/s, memory and the alpha-beta link model."""
  peak_tflops: float = 800.0
  memory_gb: float = 80.0       # GiB (2^30 bytes), as XLA's memory plans are counted
  link_gbps: float = 300.0      # per-device collective bandwidth, GB/s (NVLink-class)
  alpha_us: float = 10.0        # per-collective latency


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One point of the search space."""
  data: int
  fsdp: int
  tensor: int
  rules: str
  remat: str
  microbatches: int
  stage: int = 1

  @property
  def pipeline_microbatches(self) -> int:
    """GPipe microbatches when pipelined (partitioning's default for the stage count)."""
    from t5lite.partitioning import resolve_pipeline_microbatches  # pylint: disable=import-outside-toplevel
    return resolve_pipeline_microbatches(self.stage) if self.stage > 1 else 0

  def mesh_config(self):
    """The MeshConfig of this candidate."""
    from t5lite.partitioning import MeshConfig  # pylint: disable=import-outside-toplevel
    return MeshConfig(self.data, self.fsdp, self.tensor, self.rules, self.stage,
                      self.pipeline_microbatches)


@dataclasses.dataclass
class Estimate:
  """What XLA says about a candidate."""
  candidate: Candidate
  peak_gb: float = float("nan")   # GiB
  flops: float = float("nan")
  comm_gb: float = float("nan")   # GB (10^9 bytes)
  compute_s: float = float("nan")
  comm_s: float = float("nan")
  step_s: float = float("inf")
  fits: bool = False
  measured_s: Optional[float] = None
  error: str = ""


def candidates(num_devices: int, batch: int, cfg, remats=("none", "full"),
               microbatches=(1, 2), max_tensor: int = 8,
               rules_filter: Sequence[str] = (), stages: Sequence[int] = (1,)) -> List[Candidate]:
  """Every valid candidate: mesh factorizations that match each rule preset's axes, whose batch
  and head / mlp sizes divide; with `stages`, also pipelines whose stage count divides the
  devices and every layer stack."""
  out = []
  for stage in stages:
    depths = [d for d in (cfg.num_encoder_layers, cfg.num_decoder_layers) if d]
    if num_devices % stage or any(d % stage for d in depths):
      continue
    for c in _mesh_candidates(num_devices // stage, batch, cfg, remats, microbatches, max_tensor,
                              rules_filter):
      staged = dataclasses.replace(c, stage=stage)
      if stage > 1 and (batch // (c.data * c.fsdp * c.microbatches)) % (
          staged.pipeline_microbatches):
        continue
      out.append(staged)
  return out


def _mesh_candidates(num_devices, batch, cfg, remats, microbatches, max_tensor, rules_filter):
  out = []
  for data in range(1, num_devices + 1):
    if num_devices % data:
      continue
    for fsdp in range(1, num_devices // data + 1):
      if (num_devices // data) % fsdp:
        continue
      tensor = num_devices // data // fsdp
      if fsdp > 1 and tensor > 1:
        rules = "fsdp_tensor"
      elif fsdp > 1:
        rules = "fsdp"
      elif tensor > 1:
        rules = "tensor_parallel"
      else:
        rules = "data_parallel"
      if tensor > max_tensor or cfg.num_heads % tensor or cfg.d_ff % tensor:
        continue
      if rules_filter and rules not in rules_filter:
        continue
      if fsdp > 1 and cfg.d_model % fsdp:
        continue
      for m in microbatches:
        if batch % (data * fsdp * m):
          continue
        for remat in remats:
          out.append(Candidate(data, fsdp, tensor, rules, remat, m))
  return out


def _compile(model_cfg, cand: Candidate, batch: int, inputs: int, targets: int, devices,
             optimizer_cfg, loss_cfg=None, train_cfg=None, packed: bool = False):
  """Lowers and compiles the sharded train step for abstract inputs, as `trainer.run` compiles
  it (`train_cfg`'s donation and XLA options, the candidate's microbatches; `packed`: rows with
  segment ids and positions); returns the executable."""
  import jax  # pylint: disable=import-outside-toplevel
  from t5lite import checkpoints, optimizers, partitioning, trainer  # pylint: disable=import-outside-toplevel
  from t5lite.models.model import LossConfig, Model  # pylint: disable=import-outside-toplevel
  model = Model(model_cfg, loss_cfg or LossConfig())
  opt = optimizers.make_optimizer(optimizer_cfg, 1e-4)
  mesh = partitioning.make_mesh(cand.mesh_config(), devices)
  abstract, state_sh = trainer.state_shardings(model, opt, mesh, cand.rules)
  rep = state_sh["step"]
  batch_sh = partitioning.batch_sharding(mesh)
  shapes = _batch_shapes(model_cfg, batch, inputs, targets, packed)
  abstract_batch = {k: jax.ShapeDtypeStruct(s, d, sharding=batch_sh) for k, (s, d) in
                    shapes.items()}
  abstract_state = checkpoints.abstract_with_shardings(abstract, state_sh)
  train_cfg = dataclasses.replace(train_cfg or trainer.TrainConfig(),
                                  microbatches=cand.microbatches)
  step = trainer.jit_train_step(model, opt, lambda s: 1e-4, train_cfg,
                                shardings=((state_sh, batch_sh), (state_sh, rep)))
  with jax.set_mesh(mesh), partitioning.activation_rules(mesh, cand.rules):
    compiled = step.lower(abstract_state, abstract_batch).compile()
  return compiled, (step, abstract_state, abstract_batch, mesh)


def _batch_shapes(cfg, batch, inputs, targets, packed: bool = False):
  """The features of a training batch, {name: (shape, dtype)}, as the data pipeline's feature
  converters make them: packed rows carry each stack's segment ids and positions (the attention
  then masks by segment: a different program, on GPUs cuDNN with a mask bias)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  length = targets if cfg.arch == "encoder_decoder" else inputs + targets
  shapes = {"decoder_input_tokens": ((batch, length), np.int32),
            "decoder_target_tokens": ((batch, length), np.int32),
            "decoder_loss_weights": ((batch, length), np.float32)}
  stacks = {"decoder": length}
  if cfg.arch == "encoder_decoder":
    shapes["encoder_input_tokens"] = ((batch, inputs), np.int32)
    stacks["encoder"] = inputs
  if cfg.arch == "prefix_lm":  # its rows' prefix flags: the mask training builds from them
    shapes["decoder_causal_attention"] = ((batch, length), np.int32)
  if packed:
    for stack, n in stacks.items():
      shapes[f"{stack}_segment_ids"] = ((batch, n), np.int32)
      shapes[f"{stack}_positions"] = ((batch, n), np.int32)
  return shapes


def peak_bytes(compiled) -> int:
  """Peak memory per device of a compiled program as XLA plans it: arguments + outputs +
  temporaries, less the outputs that reuse donated arguments."""
  mem = compiled.memory_analysis()
  return (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
          - mem.alias_size_in_bytes)


def _compile_for_target(target: str, model_cfg, cand: Candidate, batch, inputs, targets,
                        num_devices: int, optimizer_cfg, loss_cfg, train_cfg, packed=False):
  """`_compile` for `num_devices` GPUs of `target` with XLA's GPU compiler (t5lite.gpu_aot)."""
  from t5lite import gpu_aot  # pylint: disable=import-outside-toplevel
  with gpu_aot.tracing_for(target):
    return _compile(model_cfg, cand, batch, inputs, targets, gpu_aot.devices(target, num_devices),
                    optimizer_cfg, loss_cfg, train_cfg, packed)


def analyze(model_cfg, cand: Candidate, batch: int, inputs: int, targets: int, devices,
            hw: Hardware, optimizer_cfg, loss_cfg=None, train_cfg=None,
            target: str = "", packed: bool = False) -> Estimate:
  """Compiles a candidate and prices it from the compiled program (see the module docstring).
  With a GPU `target` (e.g. "h100") the program is compiled for len(devices) such GPUs by XLA's
  GPU compiler (t5lite.gpu_aot), so memory, FLOPs and collectives are those of the GPU program;
  `devices` then only count. `packed`: the batch's rows are packed (segment ids, positions)."""
  from t5lite import hlo_analysis  # pylint: disable=import-outside-toplevel
  est = Estimate(cand)
  cfg = dataclasses.replace(model_cfg, remat_policy=cand.remat)
  n = len(devices)
  try:
    if target:
      compiled, _ = _compile_for_target(target, cfg, cand, batch, inputs, targets, n,
                                        optimizer_cfg, loss_cfg, train_cfg, packed)
    else:
      compiled, _ = _compile(cfg, cand, batch, inputs, targets, devices, optimizer_cfg,
                             loss_cfg, train_cfg, packed)
    est.peak_gb = peak_bytes(compiled) / 2 ** 30
    if cand.stage > 1:
      # Memory above is the real pipelined program. Time: one stage's share of the unpipelined
      # plan on devices / stage devices, stretched by the GPipe bubble, plus activation
      # transfers between neighbouring stages (forward and backward, every tick).
      flat = analyze(model_cfg, dataclasses.replace(cand, stage=1), batch, inputs, targets,
                     devices[: n // cand.stage], hw, optimizer_cfg, loss_cfg, train_cfg, target,
                     packed)
      if flat.error:
        raise RuntimeError(flat.error)
      s, mp = cand.stage, cand.pipeline_microbatches
      ticks = cand.microbatches * (mp + s - 1)  # per accumulation microbatch: mp + s - 1
      act_bytes = (batch // (cand.data * cand.fsdp) // (cand.microbatches * mp)
                   * (inputs + targets) * cfg.d_model * (2 if cfg.dtype == "bfloat16" else 4))
      est.flops = flat.flops / s * (mp + s - 1) / mp
      est.comm_gb = flat.comm_gb / s + 2 * ticks * act_bytes / 1e9
      est.compute_s = flat.compute_s / s * (mp + s - 1) / mp
      est.comm_s = (flat.comm_s / s + 2 * ticks * hw.alpha_us * 1e-6
                    + 2 * ticks * act_bytes / (hw.link_gbps * 1e9))
    else:
      program = hlo_analysis.Program(compiled.as_text())
      comm = hlo_analysis.collectives(program, n).values()
      comm_bytes = sum(c["bytes"] for c in comm)
      est.flops = hlo_analysis.matmul_flops(program)["total"]
      est.comm_gb = comm_bytes / 1e9
      est.compute_s = est.flops / (hw.peak_tflops * 1e12)
      if target:   # the GPU's own kernels: each at the matmul peak or at the memory bandwidth
        from t5lite import gpu_aot  # pylint: disable=import-outside-toplevel
        est.compute_s = hlo_analysis.roofline(program, hw.peak_tflops * 1e12,
                                              gpu_aot.memory_bandwidth(target))["seconds"]
      est.comm_s = (sum(c["count"] for c in comm) * hw.alpha_us * 1e-6
                    + comm_bytes / (hw.link_gbps * 1e9))
    est.step_s = est.compute_s + est.comm_s
    est.fits = est.peak_gb <= hw.memory_gb
  except Exception as e:  # pylint: disable=broad-except
    est.error = f"{type(e).__name__}: {str(e)[:200]}"
  return est


def measure(model_cfg, est: Estimate, batch, inputs, targets, devices, optimizer_cfg,
            loss_cfg=None, train_cfg=None, steps: int = 3, packed: bool = False) -> float:
  """Runs a candidate for real and returns its median step time in seconds (random tokens; with
  `packed`, the packed program on rows of one example each: the data's examples per row are
  unknown here)."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from t5lite import optimizers, trainer  # pylint: disable=import-outside-toplevel
  from t5lite.models.model import LossConfig, Model  # pylint: disable=import-outside-toplevel
  cfg = dataclasses.replace(model_cfg, remat_policy=est.candidate.remat)
  compiled, (_, abstract_state, abstract_batch, _) = _compile(
      cfg, est.candidate, batch, inputs, targets, devices, optimizer_cfg, loss_cfg, train_cfg,
      packed)
  model = Model(cfg, loss_cfg or LossConfig())
  opt = optimizers.make_optimizer(optimizer_cfg, 1e-4)
  state_sh = jax.tree.map(lambda x: x.sharding, abstract_state)
  state = jax.jit(functools.partial(trainer.init_state, model, opt),
                  out_shardings=state_sh)(jax.random.key(0))
  rng = np.random.default_rng(0)

  def value(name, shape, dtype):
    if name.endswith("_segment_ids") or dtype != np.int32:
      return np.ones(shape, dtype)
    if name.endswith("_positions"):
      return np.broadcast_to(np.arange(shape[1], dtype=dtype), shape)
    return rng.integers(2, cfg.vocab_size, shape).astype(dtype)

  feed = {k: jax.device_put(value(k, v.shape, v.dtype), v.sharding)
          for k, v in abstract_batch.items()}
  times = []
  for _ in range(steps + 1):
    t = time.perf_counter()
    state, metrics = compiled(state, feed)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  return sorted(times[1:])[len(times[1:]) // 2]


def _analyze_in_worker(args):
  """Process-pool entry: analyzes one candidate on this worker's own (fake) devices."""
  import jax  # pylint: disable=import-outside-toplevel
  model_cfg, cand, batch, inputs, targets, num_devices, hw, *step_cfgs, target, packed = args
  return analyze(model_cfg, cand, batch, inputs, targets, jax.devices()[:num_devices], hw,
                 *step_cfgs, target=target, packed=packed)


def plan(model_cfg, *, batch: int, inputs: int, targets: int, devices, hw: Hardware,
         optimizer_cfg=None, loss_cfg=None, train_cfg=None, remats=("none", "full"),
         microbatches=(1, 2), time_top: int = 0, rules: Sequence[str] = (), workers: int = 1,
         stages: Sequence[int] = (1,), target: str = "", packed: bool = False,
         log=print) -> List[Estimate]:
  """Ranks every candidate; feasible plans first, by estimated (or measured) step time.

  `target` (e.g. "h100"): plan for len(devices) GPUs of that kind from this host, GPU or not;
  each candidate's memory comes from XLA's GPU compiler (see `analyze`). Such plans cannot be
  timed here (`time_top` must be 0).

  The step priced is the one training runs: `optimizer_cfg` (default Adafactor), `loss_cfg`
  (default `LossConfig()`; `head_chunks` changes its memory) and `train_cfg` (default
  `TrainConfig()`: the state donated, so the new state aliases the old; `compiler_options`) as
  the experiment sets them, on the batch layout its data has (`packed`: rows with segment ids
  and positions, `DataConfig.pack`); the candidate sets the microbatches.
  """
  from t5lite import optimizers  # pylint: disable=import-outside-toplevel
  optimizer_cfg = optimizer_cfg or optimizers.OptimizerConfig("adafactor")
  if target and time_top:
    raise ValueError(f"plans for {target} GPUs are compiled, not run, here: time_top must be 0")
  cands = candidates(len(devices), batch, model_cfg, remats, microbatches, rules_filter=rules,
                     stages=stages)
  if not cands:
    raise ValueError(f"no candidate divides batch {batch} over {len(devices)} devices")
  results = []
  if workers > 1:
    # Compilation is mostly single-threaded: analyze candidates in parallel processes, each
    # with the same device setup (XLA_FLAGS is inherited).
    import concurrent.futures  # pylint: disable=import-outside-toplevel
    import multiprocessing  # pylint: disable=import-outside-toplevel
    jobs = [(model_cfg, c, batch, inputs, targets, len(devices), hw, optimizer_cfg, loss_cfg,
             train_cfg, target, packed) for c in cands]
    with concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn")) as pool:
      for i, est in enumerate(pool.map(_analyze_in_worker, jobs)):
        results.append(est)
        log(f"  [{i + 1}/{len(cands)}] {describe(est.candidate)}")
  for i, cand in enumerate(cands if workers <= 1 else []):
    t = time.perf_counter()
    results.append(analyze(model_cfg, cand, batch, inputs, targets, devices, hw, optimizer_cfg,
                           loss_cfg, train_cfg, target, packed))
    log(f"  [{i + 1}/{len(cands)}] {describe(cand)}: {time.perf_counter() - t:.1f}s")
  ranked = sorted(results, key=lambda e: (not e.fits, e.error != "", e.step_s))
  for est in ranked[:time_top]:
    if est.fits:
      est.measured_s = measure(model_cfg, est, batch, inputs, targets, devices, optimizer_cfg,
                               loss_cfg, train_cfg, packed=packed)
  if time_top:
    timed = sorted([e for e in ranked[:time_top] if e.measured_s is not None],
                   key=lambda e: e.measured_s)
    ranked = timed + [e for e in ranked if e not in timed]
  return ranked


def describe(c: Candidate) -> str:
  """Short text for a candidate."""
  return (f"stage={c.stage} data={c.data} fsdp={c.fsdp} tensor={c.tensor} {c.rules} "
          f"remat={c.remat} micro={c.microbatches}")


def table(ranked: Sequence[Estimate]) -> str:
  """The ranked plans as a text table."""
  lines = [f"{'#':>2} {'mesh (s,d,f,t)':<15}{'rules':<16}{'remat':<14}{'micro':>5}"
           f"{'est step s':>11}{'compute s':>10}{'comm s':>9}{'comm GB':>9}{'peak GiB':>9}  fits"]
  for i, e in enumerate(ranked):
    c = e.candidate
    mesh = f"({c.stage},{c.data},{c.fsdp},{c.tensor})"
    if e.error:
      lines.append(f"{i + 1:>2} {mesh:<15}{c.rules:<16}{c.remat:<14}{c.microbatches:>5}  "
                   f"error: {e.error}")
      continue
    measured = f" measured {e.measured_s:.3f}s" if e.measured_s is not None else ""
    lines.append(f"{i + 1:>2} {mesh:<15}{c.rules:<16}{c.remat:<14}{c.microbatches:>5}"
                 f"{e.step_s:>11.4f}{e.compute_s:>10.4f}{e.comm_s:>9.4f}{e.comm_gb:>9.2f}"
                 f"{e.peak_gb:>9.2f}  {'yes' if e.fits else 'NO'}{measured}")
  return "\n".join(lines)


def plan_gin(est: Estimate) -> str:
  """The chosen plan as gin bindings."""
  c = est.candidate
  return (f"# Plan chosen by t5lite.autoparallel: {describe(c)}\n"
          f"# estimated step {est.step_s:.4f}s, peak {est.peak_gb:.2f} GiB per device\n"
          f"experiment.mesh = @MeshConfig()\n"
          f"MeshConfig.data = {c.data}\nMeshConfig.fsdp = {c.fsdp}\nMeshConfig.tensor = {c.tensor}\n"
          f"MeshConfig.rules = \"{c.rules}\"\nMeshConfig.stage = {c.stage}\n"
          f"MeshConfig.pipeline_microbatches = {c.pipeline_microbatches}\n"
          f"ModelConfig.remat_policy = \"{c.remat}\"\n"
          f"TrainConfig.microbatches = {c.microbatches}\n")


def main(argv=None) -> int:
  """CLI: prints the ranked table and writes the best plan as a gin file."""
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(description="Rank parallel plans with XLA's own analyses.")
  parser.add_argument("--gin_file", action="append", default=[])
  parser.add_argument("--num_devices", type=int, default=0, help="default: all devices")
  parser.add_argument("--target", default="",
                      help="plan for GPUs of this kind (e.g. h100) from this host: memory from "
                           "XLA's GPU compiler (t5lite/gpu_aot.py), no GPU needed")
  parser.add_argument("--device_memory_gb", type=float, default=0.0,
                      help="GiB; default: the --target GPU's memory, else 80")
  parser.add_argument("--peak_tflops", type=float, default=800.0)
  parser.add_argument("--link_gbps", type=float, default=300.0)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--inputs", type=int, default=512)
  parser.add_argument("--targets", type=int, default=128)
  parser.add_argument("--packed", action=argparse.BooleanOptionalAction, default=None,
                      help="plan for packed rows (segment ids, positions); default: the gin "
                           "config's DataConfig.pack, as training would load its data")
  parser.add_argument("--remats", default="none,full")
  parser.add_argument("--microbatches", default="1,2")
  parser.add_argument("--time_top", type=int, default=0)
  parser.add_argument("--rules", default="", help="comma-separated presets to consider")
  parser.add_argument("--stages", default="1", help="pipeline stage counts, e.g. 1,2,4")
  parser.add_argument("--workers", type=int, default=1, help="candidates compiled in parallel")
  parser.add_argument("--output", default="plan.gin")
  args, rest = parser.parse_known_args(argv)
  # Fake CPU devices must be requested before jax is imported: re-exec once with the flag.
  if args.num_devices and os.environ.get("T5LITE_PLANNER_CHILD") != "1":
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags and os.environ.get(
        "JAX_PLATFORMS", "cpu") == "cpu":
      env = dict(os.environ, T5LITE_PLANNER_CHILD="1", JAX_PLATFORMS="cpu",
                 XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={args.num_devices}")
      os.execve(sys.executable, [sys.executable, "-m", "t5lite.autoparallel"] + argv, env)
  if args.target:
    from t5lite import gpu_aot  # pylint: disable=import-outside-toplevel
    gpu_aot.start_jax_on_host()   # planning for GPUs runs nothing on a device
  import jax  # pylint: disable=import-outside-toplevel
  from t5lite import gin_setup  # pylint: disable=import-outside-toplevel
  bindings, _ = gin_setup.split_gin_bindings(rest)
  exp = gin_setup.parse_gin(args.gin_file, ["experiment.model_dir = '/tmp/unused'"] + bindings)
  devices = jax.devices()[: args.num_devices or None]
  memory_gb = args.device_memory_gb
  if args.target:
    from t5lite import gpu_aot  # pylint: disable=import-outside-toplevel
    try:
      memory_gb = memory_gb or gpu_aot.memory_gib(args.target)
    except ValueError as e:
      parser.error(f"--target: {e}")
    if args.time_top:
      parser.error("--time_top runs plans; --target plans are compiled, not run")
  hw = Hardware(args.peak_tflops, memory_gb or 80.0, args.link_gbps)
  packed = exp.data.pack if args.packed is None else args.packed
  where = f"{args.target} GPUs (XLA's GPU compiler on this host)" if args.target else "devices"
  print(f"planning {exp.model.arch} (d_model {exp.model.d_model}) batch {args.batch} x "
        f"({args.inputs}+{args.targets}{', packed' if packed else ''}) on {len(devices)} {where} "
        f"of {hw.memory_gb:.1f} GiB, "
        f"{hw.peak_tflops} TFLOP/s, {hw.link_gbps} GB/s links", flush=True)
  ranked = plan(exp.model, batch=args.batch, inputs=args.inputs, targets=args.targets,
                devices=devices, hw=hw, optimizer_cfg=exp.optimizer, loss_cfg=exp.loss,
                train_cfg=exp.train,
                remats=tuple(args.remats.split(",")),
                microbatches=tuple(int(m) for m in args.microbatches.split(",")),
                time_top=args.time_top, rules=tuple(r for r in args.rules.split(",") if r),
                workers=args.workers, stages=tuple(int(x) for x in args.stages.split(",")),
                target=args.target, packed=packed, log=lambda s: print(s, flush=True))
  print(table(ranked))
  best = ranked[0]
  if not best.fits:
    print("no plan fits the memory budget", file=sys.stderr)
    return 1
  with open(args.output, "w", encoding="utf-8") as f:
    f.write(plan_gin(best))
  print(f"chose {describe(best.candidate)}; wrote {args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
