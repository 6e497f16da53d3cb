"""SeqIO sources, tasks and mixtures built from `task_specs`, and resumable streams over them.

This is the only data module that imports TensorFlow and seqio. Tasks are registered in seqio's
global registries (so `seqio.get_mixture_or_task` finds them as usual); the objectives are the
numpy ones of `preprocessors`, run inside tf.data with seqio's per-example seeds, so a task's
examples are a deterministic function of (seed, split, shard).
"""

import atexit
import collections
import json
import sys
import weakref
from typing import Callable, Dict, Iterator, List, Optional

import numpy as np
import seqio
import tensorflow as tf

from t5lite import metrics as metrics_lib
from t5lite.data import dialogue
from t5lite.data import preprocessors as objectives
from t5lite.data import task_specs
from t5lite.data import vocabulary as vocab_lib

# What the JSONL and text readers skipped, per file, from the last full pass over it.
READ_REPORTS: Dict[str, dialogue.ReadReport] = {}
_SPECS: Dict[str, task_specs.TaskSpec] = {}
_OPEN_STREAMS = weakref.WeakSet()

METRIC_FNS: Dict[str, Callable] = {
    "accuracy": metrics_lib.accuracy,
    "exact_match": metrics_lib.exact_match,
    "token_f1": metrics_lib.token_f1,
    "bleu": metrics_lib.bleu,
    "bleu_zh": lambda targets, predictions: metrics_lib.bleu(targets, predictions, language="zh"),
    "rouge_l": metrics_lib.rouge_l,
}


def _patterns(pattern: str):
  return [p.strip() for p in pattern.split(",") if p.strip()]


def _report(path: str, report: dialogue.ReadReport):
  """Keeps a file's read report; logs it once (each epoch re-reads the file)."""
  seen = path in READ_REPORTS
  READ_REPORTS[path] = report
  if not seen and (report.bad_utf8 or report.bad_json or report.missing_fields):
    print(f"t5lite.data: {path}: {report.summary()}", file=sys.stderr)


class JsonlDataSource(seqio.FileDataSource):
  """JSONL files with a field mapping; bad lines are counted in READ_REPORTS, never raised."""

  def __init__(self, files: Dict[str, str], fields: Dict[str, str]):
    if not fields:
      raise ValueError("JsonlSource needs a field mapping, e.g. {'inputs': 'question'}")
    self.fields = dict(fields)
    signature = {k: tf.TensorSpec([], tf.string) for k in self.fields}
    super().__init__(
        read_file_fn=lambda path: tf.data.Dataset.from_generator(
            self._records, args=(path,), output_signature=signature),
        split_to_filepattern={s: _patterns(p) for s, p in files.items()})

  def _records(self, path) -> Iterator[Dict[str, str]]:
    path = path.decode() if isinstance(path, bytes) else str(path)
    report = dialogue.ReadReport()
    for rec in dialogue.read_jsonl(path, self.fields, report):
      yield {k: v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
             for k, v in rec.items()}
    _report(path, report)


class TextDataSource(seqio.FileDataSource):
  """Non-empty lines of text files as {"text": line}; non-UTF-8 bytes are replaced and counted."""

  def __init__(self, files: Dict[str, str]):
    super().__init__(
        read_file_fn=lambda path: tf.data.Dataset.from_generator(
            self._lines, args=(path,), output_signature={"text": tf.TensorSpec([], tf.string)}),
        split_to_filepattern={s: _patterns(p) for s, p in files.items()})

  @staticmethod
  def _lines(path) -> Iterator[Dict[str, str]]:
    path = path.decode() if isinstance(path, bytes) else str(path)
    report = dialogue.ReadReport()
    for line in dialogue.read_text_lines(path, report):
      yield {"text": line}
    _report(path, report)


def make_source(spec) -> seqio.DataSource:
  """The seqio data source for a TextSource, JsonlSource or TfdsSource spec."""
  if isinstance(spec, task_specs.TextSource):
    return TextDataSource(spec.files)
  if isinstance(spec, task_specs.JsonlSource):
    return JsonlDataSource(spec.files, spec.fields)
  if isinstance(spec, task_specs.TfdsSource):
    return seqio.TfdsDataSource(tfds_name=spec.name, tfds_data_dir=spec.data_dir or None,
                                splits=dict(spec.splits) or None)
  raise ValueError(f"unknown source {spec!r}")


# ----- preprocessors (tf.data -> tf.data) -----

def _rekey(fields: Dict[str, str]):
  def rekey(ds):
    return ds.map(lambda x: {ours: x[theirs] for ours, theirs in fields.items()})
  return rekey


def _text_to_targets(ds):
  return ds.map(lambda x: {"targets": x["text"]})


def _chatyuan_prompt(text):
  return tf.strings.join([dialogue.USER, text, "\n", dialogue.BOT])


def _chatyuan_sft(max_input_chars: int):
  """One example per assistant turn: from {"messages": JSON list} or single-turn inputs/targets."""

  def expand(ex):
    def np_expand(*values):
      record = {k: v.decode("utf-8") for k, v in zip(keys, values)}
      if "messages" in record:
        try:
          messages = json.loads(record["messages"])
        except json.JSONDecodeError:
          messages = []
        if not isinstance(messages, list):
          messages = []
        messages = [m for m in messages if isinstance(m, dict)]
      else:
        messages = [{"role": "user", "content": record.get("inputs", "")},
                    {"role": "assistant", "content": record.get("targets", "")}]
      pairs = dialogue.conversation_examples(messages, max_input_chars)
      return (np.array([p["inputs"].encode() for p in pairs], dtype=object),
              np.array([p["targets"].encode() for p in pairs], dtype=object))

    keys = sorted(k for k in ex if k in ("messages", "inputs", "targets"))
    inputs, targets = tf.numpy_function(np_expand, [ex[k] for k in keys], [tf.string, tf.string],
                                        stateful=False)
    inputs.set_shape([None])
    targets.set_shape([None])
    return tf.data.Dataset.from_tensor_slices({"inputs": inputs, "targets": targets})

  return lambda ds: ds.flat_map(expand)


def _preference_pair(ds):
  return ds.map(lambda x: {"prompt": _chatyuan_prompt(x["prompt"]), "chosen": x["chosen"],
                           "rejected": x["rejected"]})


def _ppo_prompt(ds):
  return ds.map(lambda x: {"inputs": _chatyuan_prompt(x["prompt"])})


def _objective(fn: Callable):
  """A numpy objective (tokens, rng) -> {"inputs", "targets"} over tokenized "targets"."""

  @seqio.map_over_dataset(num_seeds=1)
  def apply(ex, seed):
    def np_apply(tokens, s):
      out = fn(tokens, np.random.default_rng([int(v) & 0xFFFFFFFF for v in s]))
      return out["inputs"].astype(np.int32), out["targets"].astype(np.int32)

    inputs, targets = tf.numpy_function(np_apply, [ex["targets"], seed], [tf.int32, tf.int32],
                                        stateful=False)
    inputs.set_shape([None])
    targets.set_shape([None])
    return {**ex, "inputs": inputs, "targets": targets}

  return apply


def _append_eos(keys):
  def append(ds):
    def add(x):
      out = dict(x)
      for k in keys:
        if k in x:
          out[k] = tf.concat([tf.cast(x[k], tf.int32), [vocab_lib.EOS_ID]], axis=0)
      return out
    return ds.map(add)
  return append


def _tokenize(output_features):
  def tokenize(ds):
    return seqio.preprocessors.tokenize(ds, output_features, copy_pretokenized=True,
                                        with_eos=False)
  return tokenize


def _preprocessors(spec: task_specs.TaskSpec, output_features, vocab_size: int) -> List[Callable]:
  steps = []
  if isinstance(spec.source, (task_specs.TfdsSource,)) and spec.source.fields:
    steps.append(_rekey(spec.source.fields))
  table = {
      "text_to_targets": lambda: _text_to_targets,
      "chatyuan_sft": lambda: _chatyuan_sft(spec.max_input_chars),
      "preference_pair": lambda: _preference_pair,
      "ppo_prompt": lambda: _ppo_prompt,
      "tokenize": lambda: _tokenize(output_features),
      "span_corruption": lambda: _objective(lambda t, rng: objectives.span_corruption(
          t, rng, vocab_size=vocab_size, noise_density=spec.noise_density,
          mean_span_length=spec.mean_noise_span_length, max_length=spec.max_document_tokens)),
      "prefix_lm": lambda: _objective(lambda t, rng: objectives.prefix_lm(
          t, rng, max_length=spec.max_document_tokens)),
      "causal_lm": lambda: _objective(lambda t, rng: objectives.causal_lm(
          t, rng, max_length=spec.max_document_tokens)),
      "append_eos": lambda: _append_eos(["targets", "chosen", "rejected"]),
      "append_eos_inputs": lambda: _append_eos(["inputs"]),
  }
  steps.extend(table[name]() for name in spec.preprocessors)
  return steps


# ----- registration -----

def register_task(spec: task_specs.TaskSpec,
                  default_vocab: Optional[Callable[[], vocab_lib.SentencePieceVocabulary]] = None
                  ) -> seqio.Task:
  """Registers (or re-registers) a seqio Task from a TaskSpec."""
  if spec.vocab_file:
    vocab = seqio.SentencePieceVocabulary(spec.vocab_file, extra_ids=spec.extra_ids)
  elif default_vocab is not None:
    ours = default_vocab()
    vocab = seqio.SentencePieceVocabulary(ours.model_file, extra_ids=ours.extra_ids)
  else:
    raise ValueError(f"task {spec.name!r} has no vocab_file and no default vocabulary")
  if "preference_pair" in spec.preprocessors:
    names = ("prompt", "chosen", "rejected")
  elif "ppo_prompt" in spec.preprocessors:
    names = ("inputs",)
  else:
    names = ("inputs", "targets")
  features = {n: seqio.Feature(vocab, add_eos=False, required=False) for n in names}
  seqio.TaskRegistry.remove(spec.name)
  _SPECS[spec.name] = spec
  return seqio.TaskRegistry.add(
      spec.name, source=make_source(spec.source), output_features=features,
      preprocessors=_preprocessors(spec, features, vocab.vocab_size),
      metric_fns=[METRIC_FNS[m] for m in spec.metrics if m in METRIC_FNS])


def count_examples(name: str, split: str = "train") -> int:
  """Number of examples of a registered task's split (the source's count when it knows it)."""
  task = seqio.get_mixture_or_task(name)
  known = task.source.num_input_examples(split)
  if known:
    return int(known)
  ds = task.get_dataset(sequence_length=None, split=split, shuffle=False, num_epochs=1,
                        try_in_mem_cache=False)
  return int(ds.reduce(np.int64(0), lambda n, _: n + 1).numpy())


def register_mixture(spec: task_specs.MixtureSpec) -> seqio.Mixture:
  """Registers (or re-registers) a seqio Mixture with fixed or temperature-scaled rates."""
  for t in spec.tasks:
    _provider(t)
  if spec.rates:
    rates = list(spec.rates)
  else:
    counts = [count_examples(t) for t in spec.tasks]
    rates = task_specs.scaled_rates(counts, spec.temperature, spec.maximum)
  seqio.MixtureRegistry.remove(spec.name)
  return seqio.MixtureRegistry.add(spec.name, list(zip(spec.tasks, rates)))


def mixture_rates(name: str) -> Dict[str, float]:
  """Normalized rates of a registered mixture, by task name."""
  mixture = seqio.get_mixture_or_task(name)
  rates = {t.name: mixture.get_rate(t) for t in mixture.tasks}
  total = sum(rates.values())
  return {k: v / total for k, v in rates.items()}


def register_all(tasks=(), mixtures=(), modules=(), default_vocab=None):
  """Imports task modules, then registers the given TaskSpecs and MixtureSpecs (in order)."""
  import importlib  # pylint: disable=import-outside-toplevel
  for module in modules:
    importlib.import_module(module)
  for spec in tasks:
    register_task(spec, default_vocab)
  for spec in mixtures:
    register_mixture(spec)


def _provider(name: str):
  try:
    return seqio.get_mixture_or_task(name)
  except ValueError:
    known = sorted(seqio.TaskRegistry.names() | seqio.MixtureRegistry.names())
    raise ValueError(f"no seqio task or mixture named {name!r}; registered: "
                     f"{', '.join(known) or 'none'}") from None


def task_spec(name: str) -> Optional[task_specs.TaskSpec]:
  """The TaskSpec a task was registered from (None for tasks registered elsewhere)."""
  return _SPECS.get(name)


def vocabulary(name: str) -> vocab_lib.SentencePieceVocabulary:
  """Our vocabulary class over a task's or mixture's SentencePiece model."""
  features = _provider(name).output_features
  vocab = next(iter(features.values())).vocabulary
  return vocab_lib.SentencePieceVocabulary(vocab.sentencepiece_model_file, vocab.extra_ids)


def splits(name: str):
  """The splits a task or mixture provides."""
  return tuple(_provider(name).splits)


def dataset(name: str, split: str, *, seed: int = 0, shuffle: bool = True, shard_index: int = 0,
            num_shards: int = 1, num_epochs: Optional[int] = None) -> tf.data.Dataset:
  """A task's or mixture's preprocessed examples (untrimmed; our feature converters pack)."""
  provider = _provider(name)
  if split not in provider.splits:
    raise ValueError(f"{name!r} has no split {split!r}; it has {sorted(provider.splits)}")
  shard = seqio.ShardInfo(shard_index, num_shards) if num_shards > 1 else None
  with tf.device("/cpu:0"):
    return provider.get_dataset(sequence_length=None, split=split, shuffle=shuffle, seed=seed,
                                shard_info=shard, num_epochs=num_epochs, use_cached=False)


_FEATURES = ("inputs", "targets", "prompt", "chosen", "rejected", "inputs_pretokenized",
             "targets_pretokenized")


@atexit.register
def _close_streams():
  # A tf.data iterator whose threads run py_functions can hang interpreter shutdown.
  for stream in list(_OPEN_STREAMS):
    stream.close()
  import gc  # pylint: disable=import-outside-toplevel
  gc.collect()


class SeqioExampleStream:
  """Examples of a seqio task or mixture by index, resumable from any cursor.

  Example `i` is the i-th element of the seeded, repeated, per-host dataset. Reading on from the
  last index continues the open tf.data iterator; any other index rebuilds the pipeline and
  skips to it (deterministic because seqio's shuffles and per-example seeds are seeded). The last
  few examples are kept, because batch packing looks one example ahead.
  """

  def __init__(self, name: str, split: str, seed: int = 0, shuffle: bool = True,
               shard_index: int = 0, num_shards: int = 1):
    _provider(name)
    self.name, self.split, self.seed, self.shuffle = name, split, seed, shuffle
    self.shard_index, self.num_shards = shard_index, num_shards
    self._iter = None
    self._next = 0
    self._recent = collections.deque(maxlen=512)
    _OPEN_STREAMS.add(self)

  def close(self):
    """Drops the open tf.data iterator (its prefetch threads call back into Python)."""
    self._iter = None
    self._recent.clear()

  def _fetch(self, i: int) -> Dict[str, np.ndarray]:
    if self._recent and self._recent[0][0] <= i < self._next:
      return self._recent[i - self._recent[0][0]][1]
    if self._iter is None or i != self._next:
      ds = dataset(self.name, self.split, seed=self.seed, shuffle=self.shuffle,
                   shard_index=self.shard_index, num_shards=self.num_shards)
      self._iter = ds.skip(i).prefetch(tf.data.AUTOTUNE).as_numpy_iterator()
      self._next = i
      self._recent.clear()
    try:
      ex = {k: v for k, v in next(self._iter).items() if k in _FEATURES}
    except StopIteration:
      raise ValueError(f"{self.name!r} split {self.split!r} yields no examples (check the file "
                       f"patterns and the field mapping; read reports: {READ_REPORTS})") from None
    self._recent.append((i, ex))
    self._next += 1
    return ex

  def example(self, local_index: int) -> Dict[str, np.ndarray]:
    """The `local_index`-th example this host reads."""
    return self._fetch(local_index)

  def iterate(self, start: int):
    """Examples from local index `start` on."""
    i = start
    while True:
      yield self._fetch(i)
      i += 1
