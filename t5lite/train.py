"""`python -m t5lite.train --gin_file=F [--gin_file=G ...] [--gin.NAME=VALUE ...]`.

Exit codes: 0 done; 2 bad configuration; 3 unusable checkpoint; 4 too many non-finite steps;
143 stopped by SIGTERM after saving a checkpoint (rerun the same command to resume).
"""

import logging
import os
import sys
from typing import TYPE_CHECKING

from t5lite import compilation_cache, host_malloc

# gin_setup (and with it JAX) is imported where it is used, so that cli() restarts the process
# under the tuned host allocator before JAX loads.
if TYPE_CHECKING:
  from t5lite import gin_setup


def build_run(exp: "gin_setup.Experiment", shard_index: int = 0, num_shards: int = 1):
  """Model, optimizer, schedule and data streams for an Experiment. XLA options XLA rejects are
  a ValueError before any data is read."""
  # pylint: disable-next=import-outside-toplevel
  from t5lite import gin_setup, optimizers, schedules, trainer
  from t5lite.data import pipeline  # pylint: disable=import-outside-toplevel
  from t5lite.models import model as model_lib  # pylint: disable=import-outside-toplevel
  trainer.check_compiler_options(exp.train.compiler_options)
  dataset = pipeline.make_dataset(exp.data, exp.model.arch, shard_index, num_shards)
  if dataset.vocab.vocab_size > exp.model.vocab_size:
    raise gin_setup.ConfigError(
        f"vocabulary has {dataset.vocab.vocab_size} ids but ModelConfig.vocab_size is "
        f"{exp.model.vocab_size}")
  schedule = schedules.make_schedule(exp.schedule, exp.train.num_steps)
  run = trainer.Run(model=model_lib.Model(exp.model, exp.loss),
                    optimizer=optimizers.make_optimizer(exp.optimizer, schedule),
                    schedule=schedule, train_stream=dataset.train, eval_stream=dataset.eval,
                    model_dir=exp.model_dir, mesh_config=exp.mesh)
  return run, dataset


def _autoplan(exp, run):
  """Replaces the mesh (and remat / microbatches) by the planner's choice; writes plan.gin."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from t5lite import autoparallel, gin_setup  # pylint: disable=import-outside-toplevel
  from t5lite.models import model as model_lib  # pylint: disable=import-outside-toplevel
  stats = jax.local_devices()[0].memory_stats() or {}
  memory_gb = stats.get("bytes_limit", 0) / 2 ** 30 or (
      os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30 / jax.local_device_count())
  enc_dec = exp.model.arch == "encoder_decoder"
  ranked = autoparallel.plan(
      exp.model, batch=exp.train.batch_size, inputs=exp.data.input_length if enc_dec else 0,
      targets=exp.data.target_length, devices=jax.devices(),
      hw=autoparallel.Hardware(memory_gb=memory_gb), optimizer_cfg=exp.optimizer,
      loss_cfg=exp.loss, train_cfg=exp.train,
      remats=(exp.model.remat_policy,), microbatches=(exp.train.microbatches,),
      packed=exp.data.pack, log=lambda s: None)
  best = ranked[0]
  print(autoparallel.table(ranked[:5]), flush=True)
  if not best.fits:
    raise gin_setup.ConfigError(f"no parallel plan fits {memory_gb:.1f} GiB per device")
  c = best.candidate
  exp = dataclasses.replace(
      exp, mesh=c.mesh_config(), model=dataclasses.replace(exp.model, remat_policy=c.remat),
      train=dataclasses.replace(exp.train, microbatches=c.microbatches))
  if jax.process_index() == 0:
    with open(os.path.join(exp.model_dir, "plan.gin"), "w", encoding="utf-8") as f:
      f.write(autoparallel.plan_gin(best))
  print(f"t5lite.train: auto plan {autoparallel.describe(c)} (saved to plan.gin)", flush=True)
  run.mesh_config = exp.mesh
  run.model = model_lib.Model(exp.model, exp.loss)
  return exp, run


def _store_vocabulary(model_file: str, model_dir: str):
  """Copies the SentencePiece model next to the checkpoints, so infer/chat need no gin."""
  import shutil  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_index() == 0:
    shutil.copy(model_file, f"{model_dir}/spiece.model")


def _exit_together(code: int):
  """Ends every process of a job that stopped on a failed save, now. Orbax's background threads
  on the processes whose writes succeeded still wait in a barrier for the ones that failed, and
  Python's exit would wait for those threads (up to the save timeout); every process gets here
  (they agreed on the failure), meets the others once more and leaves without waiting."""
  import jax  # pylint: disable=import-outside-toplevel
  sys.stdout.flush()
  sys.stderr.flush()
  jax.distributed.shutdown()
  os._exit(code)  # pylint: disable=protected-access


def main(argv=None) -> int:
  """Parses flags and gin, trains, and returns the process exit code."""
  from t5lite import gin_setup  # pylint: disable=import-outside-toplevel
  argv = list(sys.argv[1:] if argv is None else argv)
  bindings, rest = gin_setup.split_gin_bindings(argv)
  parser = gin_setup.make_parser("Train a t5lite model.")
  parser.add_argument("--coordinator_address", default=None)
  parser.add_argument("--num_processes", type=int, default=None)
  parser.add_argument("--process_id", type=int, default=None)
  parser.add_argument("--multihost", action="store_true",
                      help="call jax.distributed.initialize() (auto-detects SLURM, MPI, TPU)")
  args = parser.parse_args(rest)
  logging.basicConfig(level=logging.WARNING)
  try:
    exp = gin_setup.parse_gin(args.gin_file, bindings, args.gin_search_path)
    gin_setup.prepare_model_dir(exp.model_dir)
  except gin_setup.ConfigError as e:
    print(f"t5lite.train: configuration error: {e}", file=sys.stderr)
    return 2

  import jax  # pylint: disable=import-outside-toplevel
  if args.coordinator_address or args.multihost:
    jax.distributed.initialize(coordinator_address=args.coordinator_address,
                               num_processes=args.num_processes, process_id=args.process_id)
  from t5lite import checkpoints, trainer  # pylint: disable=import-outside-toplevel
  try:
    run, dataset = build_run(exp, jax.process_index(), jax.process_count())
    if exp.mesh.rules == "auto":
      exp, run = _autoplan(exp, run)
  except (gin_setup.ConfigError, ValueError, FileNotFoundError) as e:
    print(f"t5lite.train: configuration error: {e}", file=sys.stderr)
    return 2
  gin_setup.write_config(exp.model_dir)
  _store_vocabulary(dataset.vocab.model_file, exp.model_dir)
  print(f"t5lite.train: {exp.model.arch} model, {exp.train.num_steps} steps, "
        f"batch {exp.train.batch_size}, writing to {exp.model_dir}", flush=True)
  try:
    summary = trainer.run(run, exp.train)
  except checkpoints.CheckpointError as e:
    print(f"t5lite.train: checkpoint error: {e}", file=sys.stderr)
    if isinstance(e, checkpoints.CheckpointSaveError) and jax.process_count() > 1:
      _exit_together(3)
    return 3
  except trainer.NonFiniteLossError as e:
    print(f"t5lite.train: stopped: {e}", file=sys.stderr)
    return 4
  except trainer.PreemptedError as e:
    print(f"t5lite.train: preempted: {e}", file=sys.stderr)
    return 143
  gin_setup.write_operative_config(exp.model_dir)
  if summary["steps_run"]:
    print(f"t5lite.train: done at step {summary['final_step']}: loss "
          f"{summary['first_loss']:.4f} (first logged) -> {summary['last_loss']:.4f} (last), "
          f"{summary['wall_s']:.1f}s; metrics in {exp.model_dir}/metrics.jsonl", flush=True)
  else:
    print(f"t5lite.train: {exp.model_dir} is already at step {summary['final_step']}; "
          f"nothing to do", flush=True)
  if summary.get("eval"):
    print(f"t5lite.train: eval {summary['eval']}", flush=True)
  return 0


def cli():
  """The console script and `python -m t5lite.train`: tuned host malloc, the persistent
  compilation cache, then `main`."""
  host_malloc.reexec_with_tuned_malloc()
  compilation_cache.enable()
  sys.exit(main())


if __name__ == "__main__":
  cli()
