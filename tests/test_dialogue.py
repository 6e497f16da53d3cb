"""SFT formatting (ChatYuan, multi-turn expansion, left truncation), preference pairs, JSONL
reading with bad lines counted."""

from t5lite.data import dialogue


def test_multi_turn_conversation_gives_one_example_per_answer():
  msgs = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
          {"role": "user", "content": "写诗"}, {"role": "assistant", "content": "春眠不觉晓"}]
  ex = dialogue.conversation_examples(msgs)
  assert ex == [{"inputs": "用户：你好\n小元：", "targets": "你好！"},
                {"inputs": "用户：你好\n小元：你好！\n用户：写诗\n小元：", "targets": "春眠不觉晓"}]
  cut = dialogue.conversation_examples(msgs, max_input_chars=10)
  assert cut[1]["inputs"] == ex[1]["inputs"][-10:]
  assert cut[1]["inputs"].endswith("用户：写诗\n小元：")


def test_preference_and_prompt_records():
  pair = dialogue.preference_pair({"prompt": "问", "chosen": "好", "rejected": "坏"})
  assert pair == {"prompt": "用户：问\n小元：", "chosen": "好", "rejected": "坏"}
  assert dialogue.ppo_prompt({"prompt": "问"}) == {"inputs": "用户：问\n小元："}


def test_jsonl_reader_counts_bad_lines(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_bytes(b'{"q": "a", "meta": {"a": "b"}}\n\n{broken\n\xff\xfe\n{"q": "c"}\n'
                   b'{"x": 1}\n')
  report = dialogue.ReadReport()
  rows = list(dialogue.read_jsonl(str(path), {"inputs": "q", "targets": "meta.a"}, report))
  assert rows == [{"inputs": "a", "targets": "b"}]
  assert (report.records, report.empty_lines, report.bad_json, report.bad_utf8,
          report.missing_fields) == (1, 1, 1, 1, 2)
  assert "broken JSON" in report.summary()
