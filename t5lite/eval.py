"""`python -m t5lite.eval --gin_file=F --gin.MODEL_DIR=D [--step N] [--batches K]`.

Restores a checkpoint's parameters and reports loss, perplexity and token accuracy on the
configured eval split; prints one JSON line and writes it to MODEL_DIR/eval_<step>.json.
"""

import json
import os
import sys

from t5lite import compilation_cache, host_malloc

# gin_setup (and with it JAX) is imported where it is used, so that cli() restarts the process
# under the tuned host allocator before JAX loads.


def eval_mesh_config(mesh_config):
  """The mesh to evaluate on: the experiment's, except for rules "auto" (which t5lite.train
  resolves by planning before it trains): FSDP over all devices, the parameters split evenly
  and the batch too. Without gradients or optimizer state that fits wherever training did."""
  from t5lite import partitioning  # pylint: disable=import-outside-toplevel
  if mesh_config.rules != "auto":
    return mesh_config
  return partitioning.MeshConfig(data=1, fsdp=-1, tensor=1, rules="fsdp")


def main(argv=None) -> int:
  """Parses flags and gin, evaluates, and returns the process exit code."""
  from t5lite import gin_setup  # pylint: disable=import-outside-toplevel
  argv = list(sys.argv[1:] if argv is None else argv)
  bindings, rest = gin_setup.split_gin_bindings(argv)
  parser = gin_setup.make_parser("Evaluate a t5lite checkpoint.")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
  parser.add_argument("--batches", type=int, default=0, help="eval batches (default: config)")
  parser.add_argument("--checkpoint_dir", default="", help="default MODEL_DIR/checkpoints")
  args = parser.parse_args(rest)
  try:
    exp = gin_setup.parse_gin(args.gin_file, bindings, args.gin_search_path)
  except gin_setup.ConfigError as e:
    print(f"t5lite.eval: configuration error: {e}", file=sys.stderr)
    return 2
  import jax  # pylint: disable=import-outside-toplevel
  from t5lite import checkpoints, partitioning, trainer  # pylint: disable=import-outside-toplevel
  from t5lite.train import build_run  # pylint: disable=import-outside-toplevel
  try:
    run, _ = build_run(exp)
  except (gin_setup.ConfigError, ValueError, FileNotFoundError) as e:
    print(f"t5lite.eval: configuration error: {e}", file=sys.stderr)
    return 2
  if run.eval_stream is None:
    print("t5lite.eval: the dataset has no eval split", file=sys.stderr)
    return 2
  ckpt_dir = args.checkpoint_dir or os.path.join(exp.model_dir, "checkpoints")
  mesh_config = eval_mesh_config(exp.mesh)
  mesh = partitioning.make_mesh(mesh_config)
  shardings = partitioning.param_shardings(run.model.annotated_params, mesh, mesh_config.rules)
  abstract = checkpoints.abstract_with_shardings(run.model.abstract_params, shardings)
  try:
    params = checkpoints.restore_params(ckpt_dir, abstract, args.step)
  except Exception as e:  # pylint: disable=broad-except
    print(f"t5lite.eval: cannot restore parameters from {ckpt_dir}: {e}", file=sys.stderr)
    return 3
  with jax.set_mesh(mesh), partitioning.activation_rules(mesh, mesh_config.rules,
                                                         mesh_config.pipeline_microbatches):
    result = trainer.evaluate(run.model, params, run.eval_stream,
                              args.batches or exp.train.eval_batches, exp.train.batch_size,
                              partitioning.batch_sharding(mesh), exp.train.compiler_options)
  step = args.step if args.step is not None else checkpoints.latest_step(ckpt_dir)
  result["step"] = step
  print(json.dumps(result))
  if jax.process_index() == 0 and os.path.isdir(exp.model_dir):
    with open(os.path.join(exp.model_dir, f"eval_{step}.json"), "w", encoding="utf-8") as f:
      json.dump(result, f)
  return 0


def cli():
  """`python -m t5lite.eval`: tuned host malloc, the persistent compilation cache, then
  `main`."""
  host_malloc.reexec_with_tuned_malloc()
  compilation_cache.enable()
  sys.exit(main())


if __name__ == "__main__":
  cli()
