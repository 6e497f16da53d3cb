"""The README's commands stay true: every `python -m t5lite...` and `python scripts/...` line in
its shell blocks names an entry point that exists, flags its parser takes, gin files that resolve,
config fields that exist and benchmark suites that exist. (Running them is the other tests' job:
the quickstart, training, decoding, conversion and benchmarks each have theirs.)"""

import dataclasses
import functools
import os
import re
import shlex
import subprocess
import sys

from conftest import REPO, cli_env
from t5lite import gin_setup

sys.path.insert(0, os.path.join(REPO, "scripts"))
import benchmark_suite  # noqa: E402  pylint: disable=wrong-import-position

README = os.path.join(REPO, "README.md")
# Subcommands of the entry points that have them (their flags are the subcommand's).
SUBCOMMANDS = {"inspect", "stats", "train", "merge", "report", "hf-to-t5lite", "t5lite-to-hf"}
CONFIGS = {cls.__name__: cls for cls in gin_setup.CONFIGS}


def readme_commands(text: str):
  """The t5lite commands of `text`'s shell blocks, each as its argument list, with line
  continuations joined, comments dropped, `a && b` split and optional `[--flag x|y]` opened."""
  commands = []
  for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.S):
    for line in block.replace("\\\n", " ").split("\n"):
      line = re.sub(r"\s#.*$", "", line)
      for part in line.split("&&"):
        part = re.sub(r"\[([^\]]*)\]", r"\1", part).replace("|", " ").strip()
        if re.match(r"python3? (-m t5lite|scripts/)", part):
          commands.append(shlex.split(part))
  return commands


def entry_point(argv):
  """(the command that runs it, e.g. ["-m", "t5lite.data", "inspect"], its arguments)."""
  head, rest = (argv[1:3], argv[3:]) if argv[1] == "-m" else (argv[1:2], argv[2:])
  if rest and rest[0] in SUBCOMMANDS:
    head, rest = head + rest[:1], rest[1:]
  return tuple(head), rest


@functools.lru_cache(maxsize=None)
def flags_of(head) -> frozenset:
  """The options an entry point's --help lists."""
  proc = subprocess.run([sys.executable] + list(head) + ["--help"], cwd=REPO, env=cli_env(),
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, f"{' '.join(head)} --help failed:\n{proc.stderr[-2000:]}"
  return frozenset(re.findall(r"(?<![\w-])(--[A-Za-z0-9][\w-]*)", proc.stdout))


def test_readme_commands_are_found():
  """The parser below reads the README's commands (a change to its blocks' shape would leave
  the test checking nothing)."""
  commands = readme_commands(open(README, encoding="utf-8").read())
  heads = {entry_point(argv)[0] for argv in commands}
  assert len(commands) >= 20 and {("-m", "t5lite.train"), ("scripts/benchmark.py",),
                                  ("-m", "t5lite.convert", "hf-to-t5lite")} <= heads, heads


def test_readme_commands_name_what_exists():
  problems = []
  for argv in readme_commands(open(README, encoding="utf-8").read()):
    head, rest = entry_point(argv)
    command = " ".join(argv)
    known = flags_of(head)
    for arg in rest:
      if not arg.startswith("--"):
        continue
      flag, _, value = arg.partition("=")
      if flag.startswith("--gin."):
        problems += _binding_problems(flag[len("--gin."):], command)
      elif flag not in known:
        problems.append(f"{command}: {flag} is not an option of {' '.join(head)}")
      elif flag == "--gin_file" and "..." not in value and not _gin_file_exists(value):
        problems.append(f"{command}: no gin file {value}")
      elif flag == "--suite" and head == ("scripts/benchmark_suite.py",):
        problems += _suite_problems(value, command)
  assert not problems, "\n".join(problems)


def test_the_check_fails_on_a_wrong_command():
  """A renamed flag, a missing gin file and a config field that does not exist are caught."""
  bad = ("```bash\npython -m t5lite.train --gin_file=models/t5_1_1/none.gin \\\n"
         "  --gin.ModelConfig.no_such_field=1 --no_such_flag\n```\n")
  (argv,) = readme_commands(bad)
  head, rest = entry_point(argv)
  assert "--no_such_flag" not in flags_of(head) and "--gin_file" in flags_of(head)
  assert not _gin_file_exists(rest[0].partition("=")[2])
  assert _binding_problems("ModelConfig.no_such_field", "x")
  assert not _binding_problems("ModelConfig.scan_layers", "x")


def _gin_file_exists(path: str) -> bool:
  return any(os.path.exists(os.path.join(folder, path)) for folder in gin_setup.REPO_GIN_PATHS)


def _binding_problems(name: str, command: str):
  """A `--gin.NAME=...` binding: a macro (upper case) or Config.field of a registered config."""
  config, _, field = name.rpartition(".")
  if not config:
    return [] if name.isupper() else [f"{command}: --gin.{name} is neither a macro nor a field"]
  cls = CONFIGS.get(config)
  if cls is None or field not in {f.name for f in dataclasses.fields(cls)}:
    return [f"{command}: --gin.{name}: no such config field"]
  return []


def _suite_problems(name: str, command: str):
  return [] if name in benchmark_suite.SUITES else [f"{command}: no suite {name}"]

