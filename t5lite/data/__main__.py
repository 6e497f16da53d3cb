"""`python -m t5lite.data inspect|stats [TASK_OR_MIXTURE] --gin_file=F [--gin.NAME=VALUE ...]`.

inspect: decodes a few examples of the configured training stream (or of the named seqio task or
mixture, registered by the gin files' `DataConfig.tasks` / `task_modules`) and prints
token-length statistics of inputs and targets. stats: times the input pipeline (examples/s and tokens/s of
packed batches), to compare with the trainer's tokens/s.
"""

import argparse
import sys
import time

import numpy as np

from t5lite import gin_setup
from t5lite.data import pipeline


def main(argv=None) -> int:
  """CLI entry point."""
  argv = list(sys.argv[1:] if argv is None else argv)
  bindings, rest = gin_setup.split_gin_bindings(argv)
  parser = argparse.ArgumentParser(description="Inspect or time the t5lite input pipeline.")
  parser.add_argument("command", choices=("inspect", "stats"))
  parser.add_argument("name", nargs="?", default="",
                      help="a seqio task or mixture (default: the gin files' data)")
  parser.add_argument("--gin_file", action="append", default=[])
  parser.add_argument("--examples", type=int, default=3)
  parser.add_argument("--batches", type=int, default=50)
  args = parser.parse_args(rest)
  if args.name:
    bindings.append(f"DataConfig.mixture_or_task_name = {args.name!r}")
  if not args.gin_file:
    args.gin_file = ["models/t5_1_1/tiny.gin"]
  try:
    exp = gin_setup.parse_gin(args.gin_file, bindings + ["experiment.model_dir = '/tmp/unused'"])
  except gin_setup.ConfigError as e:
    print(f"t5lite.data: configuration error: {e}", file=sys.stderr)
    return 2
  try:
    data = pipeline.make_dataset(exp.data, exp.model.arch)
  except (ValueError, FileNotFoundError) as e:
    print(f"t5lite.data: {e}", file=sys.stderr)
    return 2
  examples = data.train.examples if hasattr(data.train, "examples") else data.train.stream.examples
  if args.command == "inspect":
    features = [k for k in ("inputs", "targets", "prompt", "chosen", "rejected")
                if k in examples.example(0)]
    for i in range(args.examples):
      ex = examples.example(i)
      print(f"--- example {i}")
      for k in features:
        print(f"{k:8s} ({len(ex[k])} tokens): {data.vocab.decode(ex[k])}")
    lengths = {k: [len(examples.example(i)[k]) for i in range(500)] for k in features}
    for k, v in lengths.items():
      print(f"{k}: mean {np.mean(v):.1f}, p50 {np.percentile(v, 50):.0f}, "
            f"p95 {np.percentile(v, 95):.0f}, max {max(v)} tokens (first 500 examples)")
    return 0
  cursor, tokens, t = 0, 0, time.perf_counter()
  for _ in range(args.batches):
    batch, cursor = data.train.batch(cursor, exp.train.batch_size)
    tokens += sum(int(np.sum(v != 0)) for k, v in batch.items() if k.endswith("input_tokens"))
  elapsed = time.perf_counter() - t
  print(f"{cursor / elapsed:.0f} examples/s, {tokens / elapsed:.0f} non-padding tokens/s "
        f"({args.batches} batches of {exp.train.batch_size})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
