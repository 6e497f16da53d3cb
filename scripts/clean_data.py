"""Clean a pretraining corpus with datatrove: normalize, filter, dedup, perplexity-filter.

    python scripts/clean_data.py --input 'raw/*.jsonl' --output_dir clean/ --workers 8 \
        [--text_field text] [--languages zh,en] [--blocklist words.txt] \
        [--exact_dedup set|bloom|none] [--bloom_capacity 100000000] \
        [--perplexity_checkpoint runs/lm --max_perplexity 1000] \
        [--executor local|slurm|ray] [--slurm_partition gpu --slurm_time 10:00:00]

Stage 1 runs one datatrove task per input file (`--workers` at a time locally; one array job
per file on Slurm; one Ray task per file): read (JSONL or text lines; bad lines are set aside with
a reason) -> normalize (NFKC keeping CJK punctuation, HTML remnants, whitespace) -> filters
(length, terminal punctuation, script language, repeated lines/characters, blocklist) ->
exact hash + MinHash signature. Stage 2 (one task, after stage 1) drops exact duplicates (a hash
set, or a fixed-memory Bloom filter for corpora whose hashes do not fit in memory), near
duplicates by MinHash LSH on character 5-grams (Chinese has no spaces), and, with a checkpoint,
documents whose perplexity exceeds `--max_perplexity`.

Output: OUTPUT_DIR/kept/*.jsonl (id, text, other input fields), OUTPUT_DIR/dropped/{input,
filters,dedup,perplexity}/*.jsonl (each record with its `reason`), summary.json and a summary
table on stdout. Re-running with the same arguments resumes (datatrove skips finished tasks);
different arguments on an existing OUTPUT_DIR are refused unless --overwrite.
"""

import argparse
import glob
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from t5lite.data import clean_steps, cleaning  # noqa: E402


def parse_args(argv=None):
  """Command-line flags."""
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--input", required=True, action="append",
                 help="file glob (repeatable); .jsonl/.json are JSONL, anything else text lines")
  p.add_argument("--output_dir", required=True)
  p.add_argument("--format", default="auto", choices=("auto", "jsonl", "text"))
  p.add_argument("--text_field", default="text")
  p.add_argument("--id_field", default="id")
  p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
  p.add_argument("--no_nfkc", action="store_true")
  p.add_argument("--min_chars", type=int, default=20)
  p.add_argument("--max_chars", type=int, default=100_000)
  p.add_argument("--no_terminal_punctuation", action="store_true",
                 help="keep texts that do not end in sentence-final punctuation")
  p.add_argument("--languages", default="zh,en", help="comma list; empty keeps every script")
  p.add_argument("--max_duplicate_line_fraction", type=float, default=0.3)
  p.add_argument("--max_char_run", type=int, default=20)
  p.add_argument("--max_top_char_fraction", type=float, default=0.3)
  p.add_argument("--blocklist", default="", help="file with one blocked word per line")
  p.add_argument("--exact_dedup", default="set", choices=("set", "bloom", "none"))
  p.add_argument("--bloom_capacity", type=int, default=10_000_000)
  p.add_argument("--bloom_error", type=float, default=1e-4)
  p.add_argument("--no_near_dedup", action="store_true")
  p.add_argument("--num_perm", type=int, default=128)
  p.add_argument("--bands", type=int, default=32)
  p.add_argument("--ngram", type=int, default=5)
  p.add_argument("--minhash_threshold", type=float, default=0.7)
  p.add_argument("--perplexity_checkpoint", default="")
  p.add_argument("--max_perplexity", type=float, default=1000.0)
  p.add_argument("--executor", default="local", choices=("local", "slurm", "ray"))
  p.add_argument("--slurm_partition", default="")
  p.add_argument("--slurm_time", default="10:00:00")
  p.add_argument("--overwrite", action="store_true")
  return p.parse_args(argv)


def input_files(patterns):
  """Sorted files matching the globs; raises when none match."""
  files = sorted({f for p in patterns for f in glob.glob(p) if os.path.isfile(f)})
  if not files:
    raise FileNotFoundError(f"no input files match {patterns}")
  return files


def build_stages(args, files):
  """(stage 1 pipeline, stage 2 pipeline) of datatrove steps."""
  out = args.output_dir
  dropped = os.path.join(out, "dropped")
  filters = cleaning.FilterConfig(
      min_chars=args.min_chars, max_chars=args.max_chars,
      require_terminal_punctuation=not args.no_terminal_punctuation,
      languages=tuple(l for l in args.languages.split(",") if l),
      max_duplicate_line_fraction=args.max_duplicate_line_fraction,
      max_char_run=args.max_char_run, max_top_char_fraction=args.max_top_char_fraction,
      blocklist=tuple(_read_blocklist(args.blocklist)))
  stage1 = [
      clean_steps.InputReader(files, os.path.join(dropped, "input"), args.format,
                              args.text_field, args.id_field),
      clean_steps.Normalize(nfkc=not args.no_nfkc),
      clean_steps.QualityFilter(filters, os.path.join(dropped, "filters")),
      clean_steps.Signatures(args.num_perm, args.ngram),
      clean_steps.writer(os.path.join(out, "work", "filtered")),
  ]
  from datatrove.pipeline.readers import JsonlReader  # pylint: disable=import-outside-toplevel
  stage2 = [
      JsonlReader(os.path.join(out, "work", "filtered"), glob_pattern="*.jsonl"),
      clean_steps.Deduplicate(os.path.join(dropped, "dedup"), exact=args.exact_dedup,
                              bloom_capacity=args.bloom_capacity, bloom_error=args.bloom_error,
                              near=not args.no_near_dedup, num_perm=args.num_perm,
                              bands=args.bands, threshold=args.minhash_threshold),
  ]
  if args.perplexity_checkpoint:
    stage2.append(clean_steps.PerplexityFilter(args.perplexity_checkpoint, args.max_perplexity,
                                               os.path.join(dropped, "perplexity")))
  stage2.append(clean_steps.writer(os.path.join(out, "kept")))
  return stage1, stage2


def _read_blocklist(path):
  if not path:
    return []
  with open(path, encoding="utf-8") as f:
    return [w.strip() for w in f if w.strip()]


def make_executors(args, stage1, stage2, num_tasks):
  """datatrove executors for both stages; stage 2 depends on stage 1."""
  logs = os.path.join(args.output_dir, "logs")
  if args.executor == "local":
    from datatrove.executor import LocalPipelineExecutor  # pylint: disable=import-outside-toplevel
    first = LocalPipelineExecutor(stage1, tasks=num_tasks, workers=min(args.workers, num_tasks),
                                  logging_dir=os.path.join(logs, "stage1"))
    second = LocalPipelineExecutor(stage2, tasks=1, workers=1, depends=first,
                                   logging_dir=os.path.join(logs, "stage2"))
  elif args.executor == "slurm":
    if not args.slurm_partition:
      raise ValueError("--executor slurm needs --slurm_partition")
    from datatrove.executor import SlurmPipelineExecutor  # pylint: disable=import-outside-toplevel
    env = f"source {os.environ['VIRTUAL_ENV']}/bin/activate" if "VIRTUAL_ENV" in os.environ else None
    first = SlurmPipelineExecutor(stage1, tasks=num_tasks, time=args.slurm_time,
                                  partition=args.slurm_partition, env_command=env,
                                  job_name="t5lite_clean_1",
                                  logging_dir=os.path.join(logs, "stage1"))
    second = SlurmPipelineExecutor(stage2, tasks=1, time=args.slurm_time,
                                   partition=args.slurm_partition, env_command=env,
                                   mem_per_cpu_gb=16, depends=first, job_name="t5lite_clean_2",
                                   logging_dir=os.path.join(logs, "stage2"))
  else:
    from datatrove.executor import RayPipelineExecutor  # pylint: disable=import-outside-toplevel
    first = RayPipelineExecutor(stage1, tasks=num_tasks, logging_dir=os.path.join(logs, "stage1"))
    second = RayPipelineExecutor(stage2, tasks=1, depends=first, mem_per_cpu_gb=16,
                                 logging_dir=os.path.join(logs, "stage2"))
  return first, second


def summarize(output_dir: str) -> dict:
  """Counts per outcome from the written files (so a resumed run reports the whole run)."""
  counts = {"kept": clean_steps.count_records(os.path.join(output_dir, "kept"))}
  for stage in ("input", "filters", "dedup", "perplexity"):
    clean_steps.count_reasons(os.path.join(output_dir, "dropped", stage), counts)
  return counts


def _check_output_dir(args, settings):
  path = os.path.join(args.output_dir, "settings.json")
  if args.overwrite and os.path.exists(args.output_dir):
    shutil.rmtree(args.output_dir)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      if json.load(f) != settings:
        raise ValueError(f"{args.output_dir} holds a run with other settings; pass --overwrite "
                         f"or choose another --output_dir")
  elif os.path.isdir(args.output_dir) and os.listdir(args.output_dir):
    raise ValueError(f"{args.output_dir} is not empty and holds no clean_data run; pass "
                     f"--overwrite or choose another --output_dir")
  os.makedirs(args.output_dir, exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(settings, f, indent=1)


def main(argv=None) -> int:
  """CLI entry point; returns the exit code (2 on bad arguments or inputs)."""
  args = parse_args(argv)
  try:
    files = input_files(args.input)
    settings = {k: v for k, v in vars(args).items()
                if k not in ("workers", "overwrite", "executor", "slurm_partition", "slurm_time")}
    settings["files"] = files
    _check_output_dir(args, settings)
    stage1, stage2 = build_stages(args, files)
    first, second = make_executors(args, stage1, stage2, len(files))
  except (ValueError, FileNotFoundError) as e:
    print(f"clean_data: {e}", file=sys.stderr)
    return 2
  second.run()  # runs stage 1 first (depends)
  if args.executor != "local":
    print("clean_data: submitted; when both stages finish, re-run with --executor local to "
          "print the summary (finished tasks are skipped)")
    return 0
  counts = summarize(args.output_dir)
  total = sum(counts.values())
  with open(os.path.join(args.output_dir, "summary.json"), "w", encoding="utf-8") as f:
    json.dump({"input_records": total, **counts}, f, indent=1)
  print(cleaning.summary_table(counts, total))
  return 0


if __name__ == "__main__":
  sys.exit(main())
