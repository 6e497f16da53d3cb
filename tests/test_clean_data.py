"""scripts/clean_data.py: datatrove pipeline, filters with reasons, exact / Bloom / MinHash dedup
(precision and recall on planted duplicates), bad input counted, nothing lost."""

import json
import os
import random

import pytest

from conftest import REPO, run_cli

pytest.importorskip("datatrove")

from t5lite.data import cleaning  # noqa: E402

SCRIPT = os.path.join(REPO, "scripts", "clean_data.py")
HAN = [chr(c) for c in range(0x4E00, 0x4E00 + 800)]
WORDS = ["".join(random.Random(i).choice("abcdefghijklmnopqrstuvwxyz") for _ in range(3 + i % 6))
         for i in range(400)]


def _zh(rng):
  body = "".join(rng.choice(HAN) + ("，" if rng.random() < 0.08 else "")
                 for _ in range(rng.randint(150, 300)))
  return body + "。"


def _en(rng):
  return " ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 80))).capitalize() + "."


def _near_copy(text, rng, rate=0.02):
  chars = list(text[:-1])
  pool = HAN if cleaning.script_language(text) == "zh" else list("abcdefghijklmnopqrstuvwxyz")
  for i in rng.sample(range(len(chars)), max(1, int(rate * len(chars)))):
    if chars[i] not in " ，":
      chars[i] = rng.choice(pool)
  return "".join(chars) + text[-1]


def make_corpus(d, seed=0):
  """Three JSONL files; returns the ids of planted duplicate groups and of unique documents."""
  rng = random.Random(seed)
  records, groups = [], []
  for i in range(240):
    text = _zh(rng) if i % 2 else _en(rng)
    records.append({"id": f"u{i}", "text": text})
  for g, base in enumerate(rng.sample(range(240), 50)):
    src = records[base]
    if g < 20:  # exact duplicates, disguised by HTML entities and spacing
      copy = src["text"].replace(" ", "&nbsp; ", 1) if " " in src["text"] else "  " + src["text"]
    else:
      copy = _near_copy(src["text"], rng)
    records.append({"id": f"d{g}", "text": copy})
    groups.append({src["id"], f"d{g}"})
  bad_filters = [
      {"id": "short", "text": "太短了。"},
      {"id": "nopunct", "text": "这是一个没有结尾标点的句子" * 3},
      {"id": "cyrillic", "text": "Это предложение написано по-русски и должно быть удалено."},
      {"id": "repchar", "text": "好" + "哈" * 40 + "。"},
      {"id": "replines", "text": "\n".join(["同一行重复出现了很多次。"] * 6)},
      {"id": "blocked", "text": "This sentence mentions a forbiddenword and is dropped."},
      {"id": "html", "text": "<div><p>网页残留的标签会被去掉，正文会完整地保留下来。</p></div>"},
  ]
  records += bad_filters
  rng.shuffle(records)
  for k in range(3):
    with open(d / f"part-{k}.jsonl", "wb") as f:
      for r in records[k::3]:
        f.write(json.dumps(r, ensure_ascii=False).encode() + b"\n")
      if k == 0:
        f.write(b"{broken json\n\n")
        f.write(b'{"content": "no text field"}\n')
        f.write(b"\xff\xfe not utf-8\n")
  unique = {r["id"] for r in records} - set().union(*groups) - {r["id"] for r in bad_filters}
  return groups, unique, len(records) + 4


def precision_recall(groups, unique, dup_dropped):
  tp = sum(len(g & dup_dropped) for g in groups if len(g - dup_dropped) >= 1)
  fp = len(unique & dup_dropped) + sum(len(g) for g in groups if not g - dup_dropped)
  fn = sum(len(g - dup_dropped) - 1 for g in groups)
  return tp / max(tp + fp, 1), tp / max(tp + fn, 1)


def _read(folder):
  out = []
  for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
    with open(os.path.join(folder, name), encoding="utf-8") as f:
      out += [json.loads(l) for l in f]
  return out


@pytest.mark.parametrize("exact", ["set", "bloom"])
def test_clean_data_pipeline(tmp_path, exact):
  raw = tmp_path / "raw"
  raw.mkdir()
  groups, unique, total = make_corpus(raw)
  (tmp_path / "block.txt").write_text("forbiddenword\n")
  out = tmp_path / "out"
  r = run_cli([SCRIPT, "--input", str(raw / "*.jsonl"), "--output_dir", str(out),
               "--workers", "2", "--blocklist", str(tmp_path / "block.txt"),
               "--exact_dedup", exact, "--bloom_capacity", "10000"], timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  summary = json.loads((out / "summary.json").read_text())
  assert summary["input_records"] == total  # every input line is accounted for
  for reason in ("bad_input_json", "bad_input_empty", "bad_input_missing_field",
                 "bad_input_non_utf8"):
    assert summary[reason] == 1, (reason, summary)
  dropped = {d["id"]: d["reason"] for stage in ("input", "filters", "dedup")
             for d in _read(out / "dropped" / stage)}
  for doc_id, reason in [("short", "too_short"), ("nopunct", "no_terminal_punctuation"),
                         ("cyrillic", "language"), ("repchar", "repeated_characters"),
                         ("replines", "repeated_lines"), ("blocked", "blocklist")]:
    assert dropped[doc_id] == reason
  kept = {d["id"]: d for d in _read(out / "kept")}
  assert kept["html"]["text"] == "网页残留的标签会被去掉，正文会完整地保留下来。"
  assert not any("minhash" in d for d in kept.values())
  dup_dropped = {i for i, reason in dropped.items() if reason.endswith("duplicate")}
  precision, recall = precision_recall(groups, unique, dup_dropped)
  print(f"dedup ({exact}): precision {precision:.3f}, recall {recall:.3f}, "
        f"{len(dup_dropped)} dropped of {sum(len(g) - 1 for g in groups)} planted")
  assert precision >= 0.95 and recall >= 0.9, (precision, recall)
  assert summary["exact_duplicate"] == 20
  assert "outcome" in r.stdout and "near_duplicate" in r.stdout
  # Same settings resume (nothing to do); other settings are refused.
  again = run_cli([SCRIPT, "--input", str(raw / "*.jsonl"), "--output_dir", str(out),
                   "--workers", "2", "--blocklist", str(tmp_path / "block.txt"),
                   "--exact_dedup", exact, "--bloom_capacity", "10000"], timeout=600)
  assert again.returncode == 0 and json.loads((out / "summary.json").read_text()) == summary
  other = run_cli([SCRIPT, "--input", str(raw / "*.jsonl"), "--output_dir", str(out),
                   "--min_chars", "5"])
  assert other.returncode == 2 and "other settings" in other.stderr


def test_missing_input_is_a_clear_error(tmp_path):
  r = run_cli([SCRIPT, "--input", str(tmp_path / "nothing*.jsonl"), "--output_dir",
               str(tmp_path / "o")])
  assert r.returncode == 2 and "no input files match" in r.stderr


def test_rules():
  assert cleaning.normalize("Ａ１ &amp; <b>粗体</b>  用户：你好\r\n\r\n\r\n下一段") == (
      "A1 & 粗体 用户：你好\n\n下一段")
  assert cleaning.script_language("这是中文句子，有一些English。") == "zh"
  assert cleaning.script_language("Plain English text.") == "en"
  hasher = cleaning.MinHasher(128)
  a = "自然语言处理是人工智能的一个重要方向，研究计算机如何理解人类语言。" * 3
  b = a.replace("重要", "关键", 1)
  assert cleaning.estimated_jaccard(hasher.signature(a), hasher.signature(b)) > 0.7
  assert cleaning.estimated_jaccard(hasher.signature(a), hasher.signature(_en(random.Random(1)))) < 0.1
  bloom = cleaning.BloomFilter(1000, 1e-3)
  assert not bloom.add("x") and bloom.add("x")
  false_positives = sum(bloom.add(f"key{i}") for i in range(1000))
  assert false_positives <= 5 and bloom.nbytes < 2000
