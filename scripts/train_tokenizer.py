"""Train a SentencePiece tokenizer (Chinese-aware), merge vocabularies, report tokens per char.

    python scripts/train_tokenizer.py train --input corpus.txt --model_prefix out/spm \
        --vocab_size 32000 [--model_type unigram|bpe] [--user_defined_symbols 用户：,小元：]
    python scripts/train_tokenizer.py merge --base llama.model --extra zh.model --output merged.model
    python scripts/train_tokenizer.py report --model out/spm.model --zh zh.txt --en en.txt --code code.txt

Training uses T5's id layout (pad 0, eos 1, unk 2; sentinels are added on top by t5lite),
character coverage 0.9995, byte fallback, split digits. Merging appends the pieces of the extra
model that the base lacks, with score 0, as Chinese-LLaMA extended LLaMA's vocabulary.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from t5lite.data import vocabulary  # noqa: E402


def merge(base: str, extra: str, output: str) -> int:
  """Writes base + pieces of extra missing from base; returns the merged size."""
  from sentencepiece import sentencepiece_model_pb2 as model_pb2  # pylint: disable=import-outside-toplevel
  base_proto, extra_proto = model_pb2.ModelProto(), model_pb2.ModelProto()
  with open(base, "rb") as f:
    base_proto.ParseFromString(f.read())
  with open(extra, "rb") as f:
    extra_proto.ParseFromString(f.read())
  have = {p.piece for p in base_proto.pieces}
  for p in extra_proto.pieces:
    if p.piece not in have and p.type == model_pb2.ModelProto.SentencePiece.NORMAL:
      new = model_pb2.ModelProto.SentencePiece()
      new.piece, new.score = p.piece, 0.0
      base_proto.pieces.append(new)
      have.add(p.piece)
  tmp = f"{output}.tmp"
  with open(tmp, "wb") as f:
    f.write(base_proto.SerializeToString())
  os.replace(tmp, output)
  return len(base_proto.pieces)


def tokens_per_char(model: str, path: str) -> float:
  """Tokens per character of a held-out text file (lower is better)."""
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  sp = spm.SentencePieceProcessor(model_file=model)
  with open(path, encoding="utf-8") as f:
    lines = [l.rstrip("\n") for l in f if l.strip()]
  chars = sum(len(l) for l in lines)
  return sum(len(sp.encode(l)) for l in lines) / max(chars, 1)


def main(argv=None) -> int:
  """CLI entry point."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  t = sub.add_parser("train")
  t.add_argument("--input", action="append", required=True)
  t.add_argument("--model_prefix", required=True)
  t.add_argument("--vocab_size", type=int, default=32000)
  t.add_argument("--model_type", default="unigram", choices=("unigram", "bpe"))
  t.add_argument("--character_coverage", type=float, default=0.9995)
  t.add_argument("--no_byte_fallback", action="store_true")
  t.add_argument("--no_split_digits", action="store_true")
  t.add_argument("--user_defined_symbols", default="")
  m = sub.add_parser("merge")
  m.add_argument("--base", required=True)
  m.add_argument("--extra", required=True)
  m.add_argument("--output", required=True)
  r = sub.add_parser("report")
  r.add_argument("--model", required=True)
  for lang in ("zh", "en", "code"):
    r.add_argument(f"--{lang}", default="")
  args = parser.parse_args(argv)
  if args.command == "train":
    lines = []
    for path in args.input:
      with open(path, encoding="utf-8", errors="replace") as f:
        lines.extend(l.rstrip("\n") for l in f if l.strip())
    symbols = [s for s in args.user_defined_symbols.split(",") if s]
    out = vocabulary.train_sentencepiece(
        lines, args.model_prefix, vocab_size=args.vocab_size, model_type=args.model_type,
        character_coverage=args.character_coverage, byte_fallback=not args.no_byte_fallback,
        split_digits=not args.no_split_digits, user_defined_symbols=symbols)
    print(f"wrote {out}")
  elif args.command == "merge":
    print(f"wrote {args.output} with {merge(args.base, args.extra, args.output)} pieces")
  else:
    for lang in ("zh", "en", "code"):
      path = getattr(args, lang)
      if path:
        print(f"{lang}: {tokens_per_char(args.model, path):.3f} tokens per character")
  return 0


if __name__ == "__main__":
  sys.exit(main())
