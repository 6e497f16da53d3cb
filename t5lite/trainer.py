"""The trainer: a pure, jitted train step and the loop around it.

`train_step` is a module-level pure function of (state, batch): gradient accumulation over
microbatches, global-norm clipping (in the optimizer chain), a NaN/inf guard that keeps the old
parameters and counts the skip, and an RNG derived from the step. `run` drives it: sharded
initialization or resume, batch-size ramp-up, metrics, checkpoint cadence, SIGTERM handling.
"""

import dataclasses
import functools
import signal
import time
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import optax

from t5lite import checkpoints as ckpt_lib
from t5lite import gpu_aot
from t5lite import partitioning
from t5lite import schedules
from t5lite.models.model import Model
from t5lite.summaries import MetricsWriter


class NonFiniteLossError(RuntimeError):
  """Too many consecutive steps had a NaN/inf loss or gradient."""


class PreemptedError(RuntimeError):
  """SIGTERM arrived; a checkpoint was saved before stopping."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The training run.

  Attributes:
    num_steps: total steps (the run stops here; resuming past it does nothing).
    batch_size: global batch size (rows).
    batch_ramp: ((start_step, batch_size), ...) overriding batch_size from each start step.
    microbatches: gradient accumulation steps per batch (batch must divide).
    seed: parameter init and dropout seed.
    log_every: metrics cadence in steps.
    checkpoint_every: checkpoint cadence in steps (0: only at the end).
    keep_checkpoints: checkpoints to keep.
    async_checkpoints: write checkpoints in the background.
    max_nonfinite_steps: stop after this many consecutive non-finite steps.
    eval_every: run eval every this many steps (0: never during training).
    eval_batches: batches per eval.
    init_from: restore parameters only from this checkpoint directory (finetuning).
    progress_bar: show a tqdm bar.
    donate_state: donate the train state's buffers to the step, which writes the new state into
      them (off: the old and the new state are both alive at the step's end).
    compiler_options: XLA options for the train and eval steps' compilation, e.g.
      {"xla_gpu_enable_latency_hiding_scheduler": True}: the XLA_FLAGS of one program, set in
      gin (`check_compiler_options` rejects a name or value XLA does not know).
  """
  num_steps: int = 1000
  batch_size: int = 32
  batch_ramp: Tuple[Tuple[int, int], ...] = ()
  microbatches: int = 1
  seed: int = 0
  log_every: int = 10
  checkpoint_every: int = 1000
  keep_checkpoints: int = 3
  async_checkpoints: bool = True
  max_nonfinite_steps: int = 10
  eval_every: int = 0
  eval_batches: int = 4
  init_from: str = ""
  progress_bar: bool = True
  donate_state: bool = True
  # A dict: left out of the hash (a frozen dataclass hashes its fields), kept in equality.
  compiler_options: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)


def init_state(model: Model, optimizer: optax.GradientTransformation, rng) -> Dict[str, Any]:
  """A fresh train state: step, params, optimizer state and non-finite counters."""
  params = model.init(rng)
  return {"step": jnp.zeros((), jnp.int32), "params": params,
          "opt_state": optimizer.init(params),
          "nonfinite_streak": jnp.zeros((), jnp.int32),
          "nonfinite_total": jnp.zeros((), jnp.int32)}


def state_shardings(model: Model, optimizer: optax.GradientTransformation, mesh, rules,
                    seed: int = 0):
  """(abstract train state, its NamedShardings): parameters by the logical-axis rules,
  optimizer state like its parameters, counters replicated."""
  abstract = jax.eval_shape(functools.partial(init_state, model, optimizer), jax.random.key(seed))
  param_sh = partitioning.param_shardings(model.annotated_params, mesh, rules)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return abstract, {"step": replicated, "params": param_sh,
                    "opt_state": partitioning.optimizer_shardings(
                        optimizer, abstract["params"], param_sh, mesh),
                    "nonfinite_streak": replicated, "nonfinite_total": replicated}


def _split_microbatches(batch, n: int):
  def split(x):
    if x.shape[0] % n:
      raise ValueError(f"batch of {x.shape[0]} rows does not split into {n} microbatches")
    return x.reshape((n, x.shape[0] // n) + x.shape[1:])
  return jax.tree.map(split, batch)


def _apply_optimizer(optimizer, grads, grad_norm, params, opt_state):
  """(params, optimizer state) after one optimizer update with `grads`.

  The gradients' norm goes along as the extra argument `global_norm`, so that clipping
  (`optimizers.clip_by_global_norm`) does not compute it again inside the cond, where XLA
  cannot share it with the trainer's own; transformations that take no extra arguments ignore it.
  """
  updates, new_opt = optax.with_extra_args_support(optimizer).update(
      grads, opt_state, params, global_norm=grad_norm)
  return optax.apply_updates(params, updates), new_opt


def _skip_update(grads, grad_norm, params, opt_state):
  """(params, optimizer state) unchanged: the step of a non-finite loss or gradient."""
  del grads, grad_norm
  return params, opt_state


def _keep_if(finite, update, grads, grad_norm, params, opt_state):
  """(params, optimizer state) after `update` where `finite`, else unchanged, by the form each
  compiler handles best.
  XLA:CPU: a cond. With a select per tensor it fused each new moment into the parameter update
  as well as into the moment's own (donated, updated in place) buffer, and so copied every
  moment first (T5-small train step on 2 CPU cores, in-process A/B: 2,798 -> 2,753 ms median,
  temporaries 1,644 -> 1,510 MB; decoder-125m 10,645 -> 10,551 ms).
  GPUs (and TPUs): a select per tensor, fused into the update. A cond's result lives in its
  own buffers, so XLA's GPU compiler copies every parameter and moment from them into the
  donated state's after it: in the programs it compiles for an H100, 13.2 GB of copies per step
  at the 1b preset (8 ms at 3.35 TB/s, ~4% of its step) and 3.0 GB at T5 v1.1 base b64, gone
  with selects (peak memory 29.5 -> 29.0 and 13.0 -> 12.9 GiB)."""
  if gpu_aot.tracing_platform() == "cpu":
    return jax.lax.cond(finite, update, _skip_update, grads, grad_norm, params, opt_state)
  return jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                      update(grads, grad_norm, params, opt_state), (params, opt_state))


def train_step(state, batch, *, model: Model, optimizer: optax.GradientTransformation,
               schedule: Callable, seed: int, microbatches: int = 1):
  """One optimizer step. Pure: returns (new_state, metrics).

  The loss is normalized by the whole batch's denominator (real target tokens by default), so
  accumulating microbatch gradients gives exactly the full-batch gradient.
  """
  step = state["step"]
  rng = jax.random.fold_in(jax.random.key(seed), step)
  denom = model.denominator(batch)

  def loss_fn(params, micro, micro_rng):
    loss_sum, metrics = model.loss_terms(params, micro, micro_rng)
    return loss_sum / denom, metrics

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if microbatches == 1:
    (loss, metrics), grads = grad_fn(state["params"], batch, rng)
    # Low-precision parameters have low-precision gradients: norm and update them in float32.
    grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
  else:
    micro = _split_microbatches(batch, microbatches)
    rngs = jax.random.split(rng, microbatches)
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state["params"])

    def accumulate(carry, xs):
      grads_acc, loss_acc, metrics_acc = carry
      (loss, metrics), grads = grad_fn(state["params"], xs[0], xs[1])
      grads_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads)
      metrics_acc = jax.tree.map(jnp.add, metrics_acc, metrics)
      return (grads_acc, loss_acc + loss, metrics_acc), None

    metric_zeros = jax.tree.map(lambda x: jnp.zeros_like(x),
                                jax.eval_shape(lambda: grad_fn(
                                    state["params"], jax.tree.map(lambda x: x[0], micro),
                                    rngs[0])[0][1]))
    (grads, loss, metrics), _ = jax.lax.scan(
        accumulate, (zeros, jnp.zeros((), jnp.float32), metric_zeros), (micro, rngs))
    metrics = dict(metrics, moe_aux=metrics["moe_aux"] / microbatches)

  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new_params, new_opt = _keep_if(finite, functools.partial(_apply_optimizer, optimizer), grads,
                                 grad_norm, state["params"], state["opt_state"])
  new_state = {
      "step": step + 1,
      "params": new_params,
      "opt_state": new_opt,
      "nonfinite_streak": jnp.where(finite, 0, state["nonfinite_streak"] + 1),
      "nonfinite_total": state["nonfinite_total"] + (1 - finite.astype(jnp.int32)),
  }
  tokens = jnp.maximum(metrics["token_count"], 1.0)
  out = {
      "loss": loss,
      "nll": metrics["nll_sum"] / tokens,
      "z_loss": metrics["z_loss_sum"] / denom,
      "accuracy": metrics["correct_sum"] / tokens,
      "grad_norm": grad_norm,
      "learning_rate": schedule(step),
      "target_tokens": metrics["token_count"],
      "skipped": 1 - finite.astype(jnp.int32),
      "nonfinite_streak": new_state["nonfinite_streak"],
  }
  if model.cfg.num_experts:
    out["moe_aux"] = metrics["moe_aux"]
  return new_state, out


def eval_step(params, batch, *, model: Model):
  """Summed eval statistics of one batch: nll, correct and real target token counts."""
  _, metrics = model.loss_terms(params, batch, None)
  return {k: metrics[k] for k in ("nll_sum", "correct_sum", "token_count")}


def summarize_eval(totals: Dict[str, float]) -> Dict[str, float]:
  """Loss, perplexity and token accuracy from summed eval statistics."""
  tokens = max(float(totals["token_count"]), 1.0)
  loss = float(totals["nll_sum"]) / tokens
  return {"loss": loss, "perplexity": float(np.exp(min(loss, 80.0))),
          "accuracy": float(totals["correct_sum"]) / tokens, "tokens": tokens}


class _PreemptionNotice:
  """Tells the loop at which step to checkpoint and stop for a preemption notice (SIGTERM).

  One process: its own SIGTERM handler, read at the next step boundary. Several processes: JAX's
  preemption sync manager (started by `jax.distributed.initialize`), which hears SIGTERM on any
  of them and names one step, after every process's current one, at which all of them stop; a
  process stopping on its own would save a step the others never join, and the job would hang.
  """

  def __init__(self, start_step: int, log: Callable[[str], None]):
    self._raised = False
    self._previous = None
    self._start = start_step
    self._synced = False
    self._at_start = False
    if jax.process_count() > 1:
      # The manager counts the steps this run has taken (0 here, on every process alike), so a
      # notice heard before the first step names a count the loop reaches; if it names this
      # one, 0, every process stops after its first step.
      try:
        self._at_start = multihost_utils.reached_preemption_sync_point(0)
        self._synced = True
      except RuntimeError as e:
        log(f"WARNING: no preemption sync manager ({e}); a SIGTERM that reaches only some of "
            f"the processes will not stop the others")

  def reached(self, step: int) -> bool:
    """Whether to checkpoint `step` (just run) and stop; called once after every step."""
    if self._synced:
      return (multihost_utils.reached_preemption_sync_point(step - self._start)
              or self._at_start)
    return self._raised

  def __enter__(self):
    if self._synced:  # the manager's own SIGTERM handler stays in place
      return self
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self._raised = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _to_global(batch: Dict[str, np.ndarray], sharding) -> Dict[str, jax.Array]:
  """Host-local numpy rows -> global arrays (each process contributes its own rows)."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def jit_train_step(model: Model, optimizer: optax.GradientTransformation, schedule: Callable,
                   cfg: TrainConfig, shardings=None):
  """`train_step` jitted as `run` compiles it: the state donated unless `cfg.donate_state` is
  off, `cfg.compiler_options` passed to XLA, and `shardings` = (in_shardings, out_shardings)
  when given. `run`, the benchmark and the parallel planner all compile this one."""
  sharding_args = {} if shardings is None else {"in_shardings": shardings[0],
                                                "out_shardings": shardings[1]}
  return jax.jit(
      functools.partial(train_step, model=model, optimizer=optimizer, schedule=schedule,
                        seed=cfg.seed, microbatches=cfg.microbatches),
      donate_argnums=(0,) if cfg.donate_state else (),
      compiler_options=dict(cfg.compiler_options) or None, **sharding_args)


def check_compiler_options(options: Mapping[str, Any]):
  """Raises ValueError, before any data or model is touched, where XLA rejects an option's name
  or value (XLA would otherwise fail only when the first step compiles)."""
  if not options:
    return
  try:
    jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(0).compile()
  except jax.errors.JaxRuntimeError as e:
    raise ValueError(f"TrainConfig.compiler_options {dict(options)}: "
                     f"{str(e).splitlines()[0]}") from e


@dataclasses.dataclass
class Run:
  """Everything `run` needs besides configs: model, optimizer, data streams and where to write."""
  model: Model
  optimizer: optax.GradientTransformation
  schedule: Callable
  train_stream: Any
  eval_stream: Any = None
  model_dir: str = ""
  mesh_config: partitioning.MeshConfig = partitioning.MeshConfig()


def run(r: Run, cfg: TrainConfig, log: Callable[[str], None] = print) -> Dict[str, Any]:
  """Trains to `cfg.num_steps`, resuming from `r.model_dir` when it holds a checkpoint.

  Returns a summary: first and last logged loss, steps run, final step, wall time, and the last
  eval metrics when eval ran.
  """
  mesh = partitioning.make_mesh(r.mesh_config)
  rules = r.mesh_config.rules
  model = r.model
  abstract_state, state_sh = state_shardings(model, r.optimizer, mesh, rules, cfg.seed)
  param_sh, replicated = state_sh["params"], state_sh["step"]
  batch_sh = partitioning.batch_sharding(mesh)
  checkpointer = ckpt_lib.Checkpointer(f"{r.model_dir}/checkpoints", cfg.keep_checkpoints,
                                       cfg.async_checkpoints)
  restored = checkpointer.restore_latest(
      ckpt_lib.abstract_with_shardings(abstract_state, state_sh), model.cfg)
  if restored is not None:
    start, state, data = restored
    cursors = data.get("cursors") or [data["cursor"]]
    if len(cursors) != jax.process_count():
      raise ckpt_lib.CheckpointError(
          f"checkpoint step {start} holds data positions of {len(cursors)} hosts, this run has "
          f"{jax.process_count()}; restore parameters only (TrainConfig.init_from) instead")
    cursor = int(cursors[jax.process_index()])
    log(f"resumed from {checkpointer.directory} step {start} (data cursor {cursor})")
  else:
    init = jax.jit(functools.partial(init_state, model, r.optimizer), out_shardings=state_sh)
    state = init(jax.random.key(cfg.seed))
    start, cursor = 0, 0
    if cfg.init_from:
      params = ckpt_lib.restore_params(
          cfg.init_from, ckpt_lib.abstract_with_shardings(abstract_state["params"], param_sh))
      state["params"] = params
      state["opt_state"] = jax.jit(r.optimizer.init, out_shardings=state_sh["opt_state"])(params)
      log(f"initialized parameters from {cfg.init_from}")

  step_fn = jit_train_step(model, r.optimizer, r.schedule, cfg,
                           shardings=((state_sh, batch_sh), (state_sh, replicated)))
  writer = MetricsWriter(r.model_dir, "train")
  summary = {"start_step": start, "first_loss": None, "last_loss": None, "eval": None}
  progress = None
  if cfg.progress_bar and jax.process_index() == 0 and start < cfg.num_steps:
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    progress = tqdm(total=cfg.num_steps, initial=start, unit="step", dynamic_ncols=True,
                    mininterval=1.0)

  def save(step_done: int):
    # Every host reads its own examples, so every host's position is saved.
    if jax.process_count() > 1:
      cursors = [int(c) for c in multihost_utils.process_allgather(np.int64(cursor))]
    else:
      cursors = [cursor]
    checkpointer.save(step_done, state, {"cursor": cursors[0], "cursors": cursors,
                                         "step": step_done}, model.cfg)

  t_start = time.time()
  t_log, tokens_since = time.time(), 0
  step = start
  pending = None  # metrics of the previous step, read one step late to keep dispatch async
  with (_PreemptionNotice(start, log) as preemption, jax.set_mesh(mesh),
        partitioning.activation_rules(mesh, rules, r.mesh_config.pipeline_microbatches)):
    while step < cfg.num_steps:
      bs = schedules.batch_size_at(step, cfg.batch_size, cfg.batch_ramp)
      local_bs = bs // jax.process_count()
      host_batch, cursor = r.train_stream.batch(cursor, local_bs)
      tokens_since += sum(v.size for k, v in host_batch.items() if k.endswith("input_tokens"))
      state, metrics = step_fn(state, _to_global(host_batch, batch_sh))
      step += 1
      checkpointer.check_saved()  # a failed save stops every process here, at this step
      if pending is not None:
        _check_finite(pending, cfg)
      pending = metrics
      if step % cfg.log_every == 0 or step == cfg.num_steps or step == start + 1:
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        _check_finite(metrics, cfg)
        now = time.time()
        values["tokens_per_s"] = tokens_since * jax.process_count() / max(now - t_log, 1e-9)
        values["batch_size"] = bs
        t_log, tokens_since = now, 0
        writer.write(step, values)
        summary["first_loss"] = summary["first_loss"] or values["loss"]
        summary["last_loss"] = values["loss"]
        if progress is not None:
          progress.set_postfix(loss=f"{values['loss']:.3f}", tok_s=f"{values['tokens_per_s']:.0f}")
      if progress is not None:
        progress.update(1)
      if cfg.eval_every and r.eval_stream is not None and step % cfg.eval_every == 0:
        summary["eval"] = evaluate(model, state["params"], r.eval_stream, cfg.eval_batches,
                                   bs, batch_sh, cfg.compiler_options)
        MetricsWriter(r.model_dir, "eval", tensorboard=False).write(step, summary["eval"])
      if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
        save(step)
      if preemption.reached(step):
        save(step)
        checkpointer.close()
        raise PreemptedError(f"SIGTERM: saved checkpoint at step {step} in "
                             f"{checkpointer.directory}; rerun the same command to resume")
    if start < cfg.num_steps:
      save(step)
  checkpointer.close()
  writer.close()
  if progress is not None:
    progress.close()
  summary.update(final_step=step, steps_run=step - start, wall_s=time.time() - t_start)
  return summary


def _check_finite(metrics, cfg: TrainConfig):
  streak = int(jax.device_get(metrics["nonfinite_streak"]))
  if streak >= cfg.max_nonfinite_steps:
    raise NonFiniteLossError(
        f"{streak} consecutive steps had a non-finite loss or gradient (limit "
        f"max_nonfinite_steps={cfg.max_nonfinite_steps}); their updates were skipped and the "
        f"last checkpoint is intact. Lower the learning rate or check the data.")


def evaluate(model: Model, params, stream, num_batches: int, batch_size: int,
             batch_sh, compiler_options: Optional[Mapping[str, Any]] = None) -> Dict[str, float]:
  """Loss, perplexity and accuracy over the first `num_batches` batches of `stream`."""
  fn = jax.jit(functools.partial(eval_step, model=model),
               compiler_options=dict(compiler_options or {}) or None)
  totals = {"nll_sum": 0.0, "correct_sum": 0.0, "token_count": 0.0}
  cursor = 0
  for _ in range(num_batches):
    batch, cursor = stream.batch(cursor, max(batch_size // jax.process_count(), 1))
    out = jax.device_get(fn(params, _to_global(batch, batch_sh)))
    totals = {k: totals[k] + float(out[k]) for k in totals}
  return summarize_eval(totals)
