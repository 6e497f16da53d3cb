"""`python -m t5lite.infer --checkpoint DIR --input_file IN --output_file OUT [--mode predict|score]`.

Input lines are JSON: text (`{"inputs": ..., "targets": ...}`) or ids
(`{"input_ids": [...], "target_ids": [...]}`). Output is JSONL, one object per input line, with
the prediction (text and ids) or the log-likelihood of the targets. The output is written to a
temporary file and renamed at the end, so a failed run never leaves a file that looks complete.
Exit codes: 0 done; 2 bad input (nothing written).
"""

import argparse
import json
import os
import sys

from t5lite import serving


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


def main(argv=None) -> int:
  """CLI entry point; returns the exit code."""
  parser = argparse.ArgumentParser(description="Batch inference with a t5lite checkpoint.")
  parser.add_argument("--checkpoint", required=True)
  parser.add_argument("--input_file", required=True)
  parser.add_argument("--output_file", required=True)
  parser.add_argument("--mode", default="predict", choices=("predict", "score"))
  parser.add_argument("--batch_size", type=int, default=16)
  serving.add_decode_flags(parser)
  args = parser.parse_args(argv)
  try:
    session = serving.Session(args.checkpoint, args.vocab_file)
    examples = read_examples(args.input_file, session, args.mode)
    limit = session.cfg.max_length
    for inputs, _, _ in examples:
      if len(inputs) > limit:
        raise ValueError(f"an input of {len(inputs)} tokens exceeds the model's limit {limit}")
  except (ValueError, FileNotFoundError) as e:
    print(f"t5lite.infer: {e}", file=sys.stderr)
    return 2
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  tmp = f"{args.output_file}.partial"
  options = serving.decode_options(args)
  try:
    with open(tmp, "w", encoding="utf-8") as out:
      for start in tqdm(range(0, len(examples), args.batch_size), unit="batch"):
        chunk = examples[start:start + args.batch_size]
        inputs = [e[0] for e in chunk]
        if args.mode == "score":
          scores = session.score(inputs, [e[1] for e in chunk])
          results = [{"score": float(s)} for s in scores]
        else:
          ids = session.predict(inputs, **options)
          results = [{"prediction": session.decode_ids(p), "prediction_ids": p} for p in ids]
        for (_, _, rec), res in zip(chunk, results):
          out.write(json.dumps({**rec, **res}, ensure_ascii=False) + "\n")
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
  sys.exit(main())
