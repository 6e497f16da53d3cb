"""Instruction and preference data: ChatYuan-format SFT examples, preference pairs, PPO prompts,
and JSONL / text readers that count (never crash on) bad lines.

ChatYuan format: the prompt is the earlier turns then the question,
`用户：q1\\n小元：a1\\n用户：q2\\n小元：`, and the target is the assistant's answer. One conversation
gives one example per assistant turn; context that does not fit is cut from the left.
"""

import dataclasses
import json
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

USER, BOT = "用户：", "小元："


@dataclasses.dataclass
class ReadReport:
  """What a reader saw: good records and each kind of bad line, counted."""
  records: int = 0
  empty_lines: int = 0
  bad_utf8: int = 0
  bad_json: int = 0
  missing_fields: int = 0

  def summary(self) -> str:
    """One line for logs."""
    return (f"{self.records} records; skipped {self.empty_lines} empty, {self.bad_utf8} non-UTF-8, "
            f"{self.bad_json} broken JSON, {self.missing_fields} missing fields")


def read_text_lines(path: str, report: Optional[ReadReport] = None) -> Iterator[str]:
  """Yields the stripped non-empty lines of a text file; undecodable bytes are replaced and
  counted in `report` (the line is kept), empty lines counted and skipped."""
  report = report if report is not None else ReadReport()
  with open(path, "rb") as f:
    for raw in f:
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError:
        line = raw.decode("utf-8", errors="replace")
        report.bad_utf8 += 1
      line = line.strip()
      if not line:
        report.empty_lines += 1
        continue
      report.records += 1
      yield line


def read_jsonl(path: str, fields: Dict[str, str], report: Optional[ReadReport] = None
               ) -> Iterator[Dict]:
  """Yields {our_name: record[their_name]} for every good line of a JSONL file.

  `fields` maps our field names to the file's (e.g. {"inputs": "question", "targets": "answer"});
  a dotted name reaches into nested objects. Bad lines are counted in `report`, never raised.
  """
  report = report if report is not None else ReadReport()
  with open(path, "rb") as f:
    for raw in f:
      if not raw.strip():
        report.empty_lines += 1
        continue
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError:
        report.bad_utf8 += 1
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        report.bad_json += 1
        continue
      out = {}
      for ours, theirs in fields.items():
        value = record
        for key in theirs.split("."):
          value = value.get(key) if isinstance(value, dict) else None
        if value is None:
          break
        out[ours] = value
      if len(out) != len(fields):
        report.missing_fields += 1
        continue
      report.records += 1
      yield out


def format_turns(turns: Sequence[Tuple[str, str]], question: str) -> str:
  """ChatYuan prompt for `question` after the (question, answer) `turns`."""
  return "\n".join([f"{USER}{q}\n{BOT}{a}" for q, a in turns] + [f"{USER}{question}\n{BOT}"])


def conversation_examples(messages: List[Dict[str, str]], max_input_chars: int = 0
                          ) -> List[Dict[str, str]]:
  """One {"inputs", "targets"} example per assistant turn of a conversation.

  `messages` are {"role": "user"|"assistant", "content": str} in order (a single-turn record is
  just two messages). With `max_input_chars`, the prompt keeps its last characters (left
  truncation), so the current question always survives.
  """
  examples, turns, question = [], [], None
  for m in messages:
    role, content = m.get("role"), m.get("content", "")
    if role == "user":
      question = content
    elif role == "assistant" and question is not None:
      prompt = format_turns(turns, question)
      if max_input_chars and len(prompt) > max_input_chars:
        prompt = prompt[-max_input_chars:]
      examples.append({"inputs": prompt, "targets": content})
      turns.append((question, content))
      question = None
  return examples


def preference_pair(record: Dict[str, str]) -> Dict[str, str]:
  """A reward-model example: the ChatYuan prompt and the chosen and rejected answers."""
  return {"prompt": format_turns([], record["prompt"]), "chosen": record["chosen"],
          "rejected": record["rejected"]}


def ppo_prompt(record: Dict[str, str]) -> Dict[str, str]:
  """A PPO rollout prompt (no target)."""
  return {"inputs": format_turns([], record["prompt"])}
