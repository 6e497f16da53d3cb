"""scripts/train_tokenizer.py: BPE and unigram training, chat symbols, vocabulary merge, report."""

import sentencepiece as spm

from conftest import run_cli
from t5lite.data import corpus


def test_train_merge_report(tmp_path):
  text = tmp_path / "c.txt"
  text.write_text("\n".join(corpus.generate_lines(800)) + "\n", encoding="utf-8")
  for kind, size in (("bpe", 700), ("unigram", 600)):
    r = run_cli(["scripts/train_tokenizer.py", "train", "--input", str(text), "--model_prefix",
                 str(tmp_path / kind), "--vocab_size", str(size), "--model_type", kind,
                 "--user_defined_symbols", "用户：,小元："])
    assert r.returncode == 0, r.stderr[-2000:]
  sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "bpe.model"))
  for s in ["用户：你好\n小元：今天天气很好。", "The teacher reads 123 letters.", "def f(x): return x"]:
    assert sp.decode(sp.encode(s)) == s.replace("\n", " ") or sp.decode(sp.encode(s)) == s
  assert "用户：" in [sp.id_to_piece(i) for i in sp.encode("用户：你好")]
  r = run_cli(["scripts/train_tokenizer.py", "merge", "--base", str(tmp_path / "bpe.model"),
               "--extra", str(tmp_path / "unigram.model"), "--output", str(tmp_path / "m.model")])
  assert r.returncode == 0, r.stderr[-2000:]
  merged = spm.SentencePieceProcessor(model_file=str(tmp_path / "m.model"))
  base_pieces = {sp.id_to_piece(i) for i in range(sp.get_piece_size())}
  assert merged.get_piece_size() > sp.get_piece_size()
  assert all(merged.id_to_piece(i) == sp.id_to_piece(i) for i in range(sp.get_piece_size()))
  assert base_pieces < {merged.id_to_piece(i) for i in range(merged.get_piece_size())}
  (tmp_path / "zh.txt").write_text("今天天气很好。\n", encoding="utf-8")
  (tmp_path / "en.txt").write_text("The teacher reads.\n", encoding="utf-8")
  r = run_cli(["scripts/train_tokenizer.py", "report", "--model", str(tmp_path / "m.model"),
               "--zh", str(tmp_path / "zh.txt"), "--en", str(tmp_path / "en.txt")])
  assert r.returncode == 0 and "zh:" in r.stdout and "tokens per character" in r.stdout
