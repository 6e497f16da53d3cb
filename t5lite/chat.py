"""`python -m t5lite.chat --checkpoint DIR`: multi-turn chat in the ChatYuan format.

The prompt is the history plus the new question, `用户：q1\\n小元：a1\\n用户：q\\n小元：`, with
newlines and tabs escaped as ChatYuan does (`\\n` -> `\\\\n`). The oldest turns are dropped (and
then the text cut from the left) until the prompt fits the model. Reads one message per line from
stdin, so it works interactively and when stdin is a file or a pipe. Recommended sampling for
ChatYuan v2: --decode=sample --top_p=0.9 --temperature=0.7.
"""

import argparse
import sys
from typing import List, Tuple

from t5lite import compilation_cache, serving

USER, BOT = "用户：", "小元："


def escape(text: str) -> str:
  """ChatYuan's escaping before tokenization."""
  return text.replace("\n", "\\n").replace("\t", "\\t")


def unescape(text: str) -> str:
  """Inverse of `escape`, applied to generated text."""
  return text.replace("\\n", "\n").replace("\\t", "\t")


def build_prompt(history: List[Tuple[str, str]], question: str) -> str:
  """ChatYuan prompt: earlier turns, then the question and the assistant tag."""
  turns = [f"{USER}{q}\n{BOT}{a}" for q, a in history]
  return "\n".join(turns + [f"{USER}{question}\n{BOT}"])


def fit_prompt(session: serving.Session, history, question: str, max_tokens: int):
  """Ids of the longest prompt (dropping the oldest turns, then cutting left) within max_tokens."""
  history = list(history)
  while True:
    ids = session.encode_text(escape(build_prompt(history, question)),
                              add_eos=session.encoder_decoder)
    if len(ids) <= max_tokens or not history:
      return ids[-max_tokens:], history
    history.pop(0)


def main(argv=None) -> int:
  """CLI entry point; returns the exit code."""
  parser = argparse.ArgumentParser(description="Chat with a t5lite checkpoint (ChatYuan format).")
  parser.add_argument("--checkpoint", required=True)
  parser.add_argument("--max_input_tokens", type=int, default=512)
  serving.add_decode_flags(parser)
  serving.add_mesh_flags(parser)
  args = parser.parse_args(argv)
  try:
    session = serving.open_session(args, "t5lite.chat")
    if session.vocab is None:
      raise ValueError("chat needs a vocabulary (spiece.model in the checkpoint or --vocab_file)")
  except (ValueError, FileNotFoundError) as e:
    print(f"t5lite.chat: {e}", file=sys.stderr)
    return 2
  budget = args.max_input_tokens
  if not session.encoder_decoder:
    budget = min(budget, session.cfg.max_length - args.max_decode_len - 1)
  options = serving.decode_options(args)
  interactive = sys.stdin.isatty()
  history: List[Tuple[str, str]] = []
  while True:
    if interactive:
      print(USER, end="", flush=True)
    line = sys.stdin.readline()
    if not line:
      break
    question = line.rstrip("\n")
    if not question.strip():
      continue
    ids, history = fit_prompt(session, history, question, budget)
    reply = unescape(session.decode_ids(session.predict([ids], **options)[0]))
    print(f"{BOT}{reply}", flush=True)
    history.append((question, reply))
  return 0


if __name__ == "__main__":
  compilation_cache.enable()
  sys.exit(main())
