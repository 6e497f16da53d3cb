"""`python -m t5lite.infer --checkpoint DIR --input_file IN --output_file OUT [--mode predict|score]`.

Input lines are JSON: text (`{"inputs": ..., "targets": ...}`) or ids
(`{"input_ids": [...], "target_ids": [...]}`). Output is JSONL, one object per input line, with
the prediction (text and ids) or the log-likelihood of the targets. The output is written to a
temporary file and renamed at the end, so a failed run never leaves a file that looks complete.

Task mode: `--task NAME --gin_file F [--gin.X=Y] [--split validation]` decodes the split of a
seqio task registered by the gin files (`DataConfig.tasks`) or `--task_module`, writes each
prediction next to its target and the task's metrics to OUT.metrics.json (and stderr).
Exit codes: 0 done; 2 bad input (nothing written).
"""

import argparse
import json
import os
import sys
from typing import Dict, List, Tuple

import numpy as np

from t5lite import metrics as metrics_lib
from t5lite import compilation_cache, serving


def read_examples(path: str, session: serving.Session, mode: str):
  """Parsed (inputs ids, targets ids, original record) per line; raises ValueError with the line."""
  examples = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n}: not valid JSON ({e})") from e
      if "input_ids" in rec:
        inputs = [int(t) for t in rec["input_ids"]]
        targets = [int(t) for t in rec.get("target_ids", [])]
      elif "inputs" in rec:
        inputs = session.encode_text(rec["inputs"], add_eos=session.encoder_decoder)
        targets = session.encode_text(rec["targets"], add_eos=True) if "targets" in rec else []
      else:
        raise ValueError(f"{path}:{n}: needs 'inputs' (text) or 'input_ids'")
      if mode == "score" and not targets:
        raise ValueError(f"{path}:{n}: score mode needs 'targets' or 'target_ids'")
      examples.append((inputs, targets, rec))
  if not examples:
    raise ValueError(f"{path} holds no examples")
  return examples


def task_examples(args, bindings, session: serving.Session):
  """(examples as read_examples gives them, metric names) for `--task`'s split."""
  from t5lite import gin_setup  # pylint: disable=import-outside-toplevel
  from t5lite.data import tasks  # pylint: disable=import-outside-toplevel  (TensorFlow)
  data_cfg = None
  if args.gin_file:
    data_cfg = gin_setup.parse_gin(args.gin_file, bindings + [
        "experiment.model_dir = '/tmp/unused'"]).data
  tasks.register_all(data_cfg.tasks if data_cfg else (), (), args.task_module,
                     default_vocab=lambda: session.vocab)
  ds = tasks.dataset(args.task, args.split, shuffle=False, num_epochs=1)
  vocab = tasks.vocabulary(args.task)
  examples = []
  for ex in ds.as_numpy_iterator():
    if args.max_examples and len(examples) >= args.max_examples:
      break
    target = ex.get("targets_pretokenized")
    target = target.decode("utf-8") if target is not None else vocab.decode(ex["targets"])
    rec = {"inputs": (ex["inputs_pretokenized"].decode("utf-8") if "inputs_pretokenized" in ex
                      else vocab.decode(ex["inputs"])), "targets": target}
    examples.append(([int(t) for t in ex["inputs"]], [int(t) for t in ex["targets"]], rec))
  if not examples:
    raise ValueError(f"task {args.task!r} split {args.split!r} holds no examples")
  spec = tasks.task_spec(args.task)
  return examples, (spec.metrics if spec else ("exact_match",))


def task_metrics(names, examples, predictions: List[str], scores) -> Dict[str, float]:
  """The task's metrics over decoded predictions (perplexity from the targets' scores)."""
  from t5lite.data import tasks  # pylint: disable=import-outside-toplevel
  targets = [e[2]["targets"] for e in examples]
  out: Dict[str, float] = {}
  for name in names:
    if name == "perplexity":
      out.update(metrics_lib.perplexity(-float(np.sum(scores)), sum(len(e[1]) for e in examples)))
    else:
      out.update(tasks.METRIC_FNS[name](targets, predictions))
  return out


def main(argv=None) -> int:
  """CLI entry point; returns the exit code."""
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(description="Batch inference with a t5lite checkpoint.")
  parser.add_argument("--checkpoint", required=True)
  parser.add_argument("--input_file", default="")
  parser.add_argument("--output_file", required=True)
  parser.add_argument("--mode", default="predict", choices=("predict", "score"))
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--task", default="", help="decode this seqio task's split, report metrics")
  parser.add_argument("--split", default="validation")
  parser.add_argument("--gin_file", action="append", default=[])
  parser.add_argument("--task_module", action="append", default=[])
  parser.add_argument("--max_examples", type=int, default=0)
  parser.add_argument("--head_chunks", type=int, default=0,
                      help="score with the output head in N blocks along the targets (a "
                           "large vocabulary's logits never whole); 0: whole")
  serving.add_decode_flags(parser)
  serving.add_mesh_flags(parser)
  from t5lite.gin_setup import split_gin_bindings  # pylint: disable=import-outside-toplevel
  bindings, rest = split_gin_bindings(argv)
  args = parser.parse_args(rest)
  metric_names: Tuple[str, ...] = ()
  try:
    if bool(args.task) == bool(args.input_file):
      raise ValueError("give exactly one of --input_file or --task")
    if args.head_chunks < 0:
      raise ValueError(f"--head_chunks must be >= 0, got {args.head_chunks}")
    session = serving.open_session(args, "t5lite.infer", args.head_chunks)
    if args.task:
      examples, metric_names = task_examples(args, bindings, session)
    else:
      examples = read_examples(args.input_file, session, args.mode)
    limit = session.cfg.max_length
    for inputs, _, _ in examples:
      if len(inputs) > limit:
        raise ValueError(f"an input of {len(inputs)} tokens exceeds the model's limit {limit}")
  except (ValueError, FileNotFoundError) as e:
    print(f"t5lite.infer: {e}", file=sys.stderr)
    return 2
  mode = "predict" if args.task else args.mode
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  tmp = f"{args.output_file}.partial"
  options = serving.decode_options(args)
  predictions, scores = [], []
  try:
    with open(tmp, "w", encoding="utf-8") as out:
      for start in tqdm(range(0, len(examples), args.batch_size), unit="batch"):
        chunk = examples[start:start + args.batch_size]
        inputs = [e[0] for e in chunk]
        if mode == "score":
          batch_scores = session.score(inputs, [e[1] for e in chunk])
          results = [{"score": float(s)} for s in batch_scores]
        else:
          ids = session.predict(inputs, **options)
          results = [{"prediction": session.decode_ids(p), "prediction_ids": p} for p in ids]
          predictions += [r["prediction"] for r in results]
          if "perplexity" in metric_names:
            scores += list(session.score(inputs, [e[1] for e in chunk]))
        for (_, _, rec), res in zip(chunk, results):
          out.write(json.dumps({**rec, **res}, ensure_ascii=False) + "\n")
    if args.task:
      metrics = task_metrics(metric_names, examples, predictions, scores)
      with open(f"{args.output_file}.metrics.json", "w", encoding="utf-8") as f:
        json.dump({"task": args.task, "split": args.split, "examples": len(examples),
                   **metrics}, f, indent=1)
      print(f"t5lite.infer: {args.task}:{args.split} " + ", ".join(
          f"{k} {v:.4g}" for k, v in metrics.items()), file=sys.stderr)
    os.replace(tmp, args.output_file)
  except ValueError as e:
    print(f"t5lite.infer: {e}", file=sys.stderr)
    return 2
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  print(f"t5lite.infer: wrote {len(examples)} results to {args.output_file}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  compilation_cache.enable()
  sys.exit(main())
