"""Deterministic, resumable batch streams from tokenized documents.

Example `i` of a stream is a pure function of (seed, i): its document is `i mod N` under an
epoch-seeded shuffle, and its objective (span corruption, ...) draws from a generator seeded with
(seed, i). A batch is a pure function of the stream cursor (examples consumed so far), so saving
the cursor with a checkpoint resumes the stream exactly. Hosts read disjoint examples
(`shard_index` of `num_shards`).
"""

import dataclasses
import functools
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from t5lite.data import corpus as corpus_lib
from t5lite.data import dialogue
from t5lite.data import feature_converters as fc
from t5lite.data import preprocessors
from t5lite.data import vocabulary as vocab_lib

OBJECTIVES = ("span_corruption", "prefix_lm", "causal_lm")


class ExampleStream:
  """Infinite, shuffled, per-host stream of preprocessed examples over a list of documents."""

  def __init__(self, documents: Sequence[np.ndarray], preprocess: Callable, seed: int = 0,
               shuffle: bool = True, shard_index: int = 0, num_shards: int = 1):
    if not documents:
      raise ValueError("the stream has no documents")
    if not 0 <= shard_index < num_shards:
      raise ValueError(f"shard_index {shard_index} not in [0, {num_shards})")
    self.documents = documents
    self.preprocess = preprocess
    self.seed = seed
    self.shuffle = shuffle
    self.shard_index = shard_index
    self.num_shards = num_shards

  @functools.lru_cache(maxsize=4)
  def _order(self, epoch: int) -> np.ndarray:
    n = len(self.documents)
    if not self.shuffle:
      return np.arange(n)
    return np.random.default_rng([self.seed, epoch, 7919]).permutation(n)

  def example(self, local_index: int) -> Dict[str, np.ndarray]:
    """The `local_index`-th example this host reads."""
    i = local_index * self.num_shards + self.shard_index
    epoch, offset = divmod(i, len(self.documents))
    doc = self.documents[self._order(epoch)[offset]]
    return self.preprocess(doc, np.random.default_rng([self.seed, i]))

  def iterate(self, start: int):
    """Examples from local index `start` on."""
    i = start
    while True:
      yield self.example(i)
      i += 1


class BatchStream:
  """Batches of model features from an ExampleStream; resumable from an integer cursor."""

  def __init__(self, examples: ExampleStream, converter):
    self.examples = examples
    self.converter = converter

  def batch(self, cursor: int, batch_size: int) -> Tuple[Dict[str, np.ndarray], int]:
    """(batch of `batch_size` rows, next cursor) starting at example `cursor`."""
    rows, consumed = fc.build_rows(self.converter, self.examples.iterate(cursor), batch_size)
    return rows, cursor + consumed


class RowShardedStream:
  """Every host builds the global batch and keeps its own rows.

  Batches (and cursors) are then identical to a single-process run on any host count, at the
  cost of every host preparing the whole batch; the default instead gives each host its own
  examples (ExampleStream sharding).
  """

  def __init__(self, stream: BatchStream, shard_index: int, num_shards: int):
    self.stream = stream
    self.shard_index = shard_index
    self.num_shards = num_shards

  def batch(self, cursor: int, batch_size: int):
    """This host's `batch_size` rows of the global batch at `cursor`, and the next cursor."""
    rows, nxt = self.stream.batch(cursor, batch_size * self.num_shards)
    lo = self.shard_index * batch_size
    return {k: v[lo:lo + batch_size] for k, v in rows.items()}, nxt


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where text comes from and how it becomes batches.

  Attributes:
    corpus_file: one document per line; empty means the built-in bilingual corpus, written to
      `cache_dir` on first use.
    vocab_file: a SentencePiece model; empty means train one on the corpus and cache it.
    vocab_size: pieces of the trained SentencePiece model (sentinels are added on top).
    extra_ids: sentinel ids above the pieces.
    cache_dir: where the built corpus and trained vocabularies are cached; empty means
      $T5LITE_CACHE_DIR, else ~/.cache/t5lite.
    objective: one of OBJECTIVES.
    input_length / target_length: row lengths (decoder-only rows use target_length).
    pack: pack several examples per row.
    max_document_tokens: documents are cut to this many tokens before the objective.
    noise_density / mean_noise_span_length: span corruption settings (T5: 0.15, 3.0).
    eval_documents: the last documents of the corpus, held out as the eval split.
    seed: data seed (shuffle order and objective noise).
    host_sharding: "examples" (each host reads its own examples) or "rows" (each host builds
      the global batch and keeps its rows: identical batches on any number of hosts).
    mixture_or_task_name: read a seqio task or mixture instead of the corpus (the objective
      then comes from the task's preprocessors).
    tasks / mixtures: `task_specs.TaskSpec`s and `MixtureSpec`s to register first.
    task_modules: Python modules to import first (they register tasks the seqio way).
    train_split / eval_split: the task's splits (no eval when the task lacks eval_split).
  """
  corpus_file: str = ""
  vocab_file: str = ""
  vocab_size: int = 1000
  extra_ids: int = 100
  cache_dir: str = ""
  objective: str = "span_corruption"
  input_length: int = 64
  target_length: int = 32
  pack: bool = True
  max_document_tokens: int = 512
  noise_density: float = 0.15
  mean_noise_span_length: float = 3.0
  eval_documents: int = 64
  seed: int = 0
  host_sharding: str = "examples"
  mixture_or_task_name: str = ""
  tasks: Tuple[Any, ...] = ()
  mixtures: Tuple[Any, ...] = ()
  task_modules: Tuple[str, ...] = ()
  train_split: str = "train"
  eval_split: str = "validation"


def load_vocabulary(cfg: DataConfig) -> vocab_lib.SentencePieceVocabulary:
  """The configured vocabulary, training and caching one on the corpus when none is given."""
  if cfg.vocab_file:
    return vocab_lib.SentencePieceVocabulary(cfg.vocab_file, cfg.extra_ids)
  model_file = vocab_lib.cached_sentencepiece(corpus_path(cfg), _cache_dir(cfg),
                                              vocab_size=cfg.vocab_size)
  return vocab_lib.SentencePieceVocabulary(model_file, cfg.extra_ids)


def _cache_dir(cfg: DataConfig) -> str:
  default = os.environ.get("T5LITE_CACHE_DIR") or "~/.cache/t5lite"
  return os.path.expanduser(cfg.cache_dir or default)


def corpus_path(cfg: DataConfig) -> str:
  """Path of the corpus text file (building the built-in corpus if needed)."""
  if cfg.corpus_file:
    if not os.path.exists(cfg.corpus_file):
      raise FileNotFoundError(f"corpus_file not found: {cfg.corpus_file}")
    return cfg.corpus_file
  return corpus_lib.write_corpus(os.path.join(_cache_dir(cfg), "bilingual_corpus.txt"))


def read_documents(path: str) -> Tuple[List[str], int]:
  """Non-empty lines of a UTF-8 text file; undecodable bytes are replaced and counted."""
  report = dialogue.ReadReport()
  docs = list(dialogue.read_text_lines(path, report))
  bad = report.bad_utf8
  return docs, bad


def make_preprocessor(cfg: DataConfig, vocab_size: int) -> Callable:
  """The objective as a function (tokens, rng) -> {"inputs", "targets"}."""
  if cfg.objective == "span_corruption":
    return functools.partial(preprocessors.span_corruption, vocab_size=vocab_size,
                             noise_density=cfg.noise_density,
                             mean_span_length=cfg.mean_noise_span_length,
                             max_length=cfg.max_document_tokens)
  if cfg.objective == "prefix_lm":
    return functools.partial(preprocessors.prefix_lm, max_length=cfg.max_document_tokens)
  if cfg.objective == "causal_lm":
    return functools.partial(preprocessors.causal_lm, max_length=cfg.max_document_tokens)
  raise ValueError(f"objective must be one of {OBJECTIVES}, got {cfg.objective!r}")


def make_converter(cfg: DataConfig, arch: str):
  """The feature converter for a model architecture."""
  lengths = fc.FeatureLengths(cfg.input_length, cfg.target_length)
  if arch == "encoder_decoder":
    return fc.EncDecFeatureConverter(lengths, cfg.pack)
  return fc.DecoderFeatureConverter(lengths, cfg.pack, prefix_lm=arch == "prefix_lm",
                                    loss_on_inputs=cfg.objective == "causal_lm")


@dataclasses.dataclass
class Dataset:
  """A vocabulary with train and eval batch streams built from a DataConfig."""
  vocab: vocab_lib.SentencePieceVocabulary
  train: BatchStream
  eval: Optional[BatchStream]


def make_dataset(cfg: DataConfig, arch: str, shard_index: int = 0,
                 num_shards: int = 1) -> Dataset:
  """Builds the vocabulary and train / eval batch streams for `arch`.

  The examples come from a seqio task or mixture when `mixture_or_task_name` is set, else from
  the corpus file tokenized in memory with `objective`.
  """
  if cfg.host_sharding not in ("examples", "rows"):
    raise ValueError(f"host_sharding must be 'examples' or 'rows', got {cfg.host_sharding!r}")
  # With "rows" sharding every host reads the whole example stream and keeps its rows.
  shard, shards = (shard_index, num_shards) if cfg.host_sharding == "examples" else (0, 1)
  if cfg.mixture_or_task_name:
    from t5lite.data import tasks  # pylint: disable=import-outside-toplevel  (TensorFlow)
    tasks.register_all(cfg.tasks, cfg.mixtures, cfg.task_modules,
                       default_vocab=lambda: load_vocabulary(cfg))
    name = cfg.mixture_or_task_name
    vocab = tasks.vocabulary(name)
    train_examples = tasks.SeqioExampleStream(name, cfg.train_split, cfg.seed, True, shard,
                                              shards)
    eval_examples = None
    if cfg.eval_split in tasks.splits(name):
      eval_examples = tasks.SeqioExampleStream(name, cfg.eval_split, cfg.seed + 1, False,
                                               shard_index, num_shards)
  else:
    vocab = load_vocabulary(cfg)
    texts, _ = read_documents(corpus_path(cfg))
    docs = [np.asarray(vocab.encode(t), np.int32) for t in texts]
    docs = [d for d in docs if len(d)]
    n_eval = min(cfg.eval_documents, len(docs) // 10)
    train_docs, eval_docs = docs[: len(docs) - n_eval], docs[len(docs) - n_eval:]
    preprocess = make_preprocessor(cfg, vocab.vocab_size)
    train_examples = ExampleStream(train_docs, preprocess, cfg.seed, True, shard, shards)
    eval_examples = None
    if eval_docs:
      eval_examples = ExampleStream(eval_docs, preprocess, cfg.seed + 1, False, shard_index,
                                    num_shards)
  converter = make_converter(cfg, arch)
  train = BatchStream(train_examples, converter)
  if cfg.host_sharding == "rows":
    train = RowShardedStream(train, shard_index, num_shards)
  evaluation = BatchStream(eval_examples, converter) if eval_examples is not None else None
  return Dataset(vocab, train, evaluation)
