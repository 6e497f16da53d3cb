"""Plain descriptions of SeqIO sources, tasks and mixtures, as gin binds them.

These are frozen dataclasses with no TensorFlow import, so gin can bind them cheaply; only
`t5lite.data.tasks` turns them into registered `seqio.Task`s and `seqio.Mixture`s. A gin file:

    DataConfig.mixture_or_task_name = "zh_sft"
    DataConfig.tasks = [@sft/TaskSpec()]
    sft/TaskSpec.name = "zh_sft"
    sft/TaskSpec.source = @sft/JsonlSource()
    sft/JsonlSource.files = {"train": "data/sft-*.jsonl", "validation": "data/sft-dev.jsonl"}
    sft/JsonlSource.fields = {"messages": "conversation"}
    sft/TaskSpec.preprocessors = ["chatyuan_sft", "tokenize", "append_eos"]
    sft/TaskSpec.metrics = ["bleu_zh", "rouge_l"]
"""

import dataclasses
from typing import Dict, Optional, Tuple, Union

# Preprocessors a TaskSpec may name, in the order a task usually lists them.
TEXT_PREPROCESSORS = ("text_to_targets", "chatyuan_sft", "preference_pair", "ppo_prompt")
TOKEN_PREPROCESSORS = ("tokenize", "span_corruption", "prefix_lm", "causal_lm", "append_eos",
                       "append_eos_inputs")
PREPROCESSORS = TEXT_PREPROCESSORS + TOKEN_PREPROCESSORS
METRICS = ("accuracy", "exact_match", "token_f1", "bleu", "bleu_zh", "rouge_l", "perplexity")


@dataclasses.dataclass(frozen=True)
class TextSource:
  """One example per non-empty line of text files, as {"text": line}.

  Attributes:
    files: split name -> file pattern (a glob, or a comma-separated list of globs).
  """
  files: Dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class JsonlSource:
  """One example per good line of JSONL files; broken lines are counted and skipped.

  Attributes:
    files: split name -> file pattern.
    fields: our feature name -> the record's field (dotted names reach into nested objects);
      values that are not strings (a list of chat messages) are passed on as JSON text.
  """
  files: Dict[str, str] = dataclasses.field(default_factory=dict)
  fields: Dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class TfdsSource:
  """A TensorFlow Datasets dataset (prepared in `data_dir`; nothing is downloaded by us).

  Attributes:
    name: "dataset/config:version", as seqio.TfdsDataSource takes it.
    data_dir: where the prepared dataset lives (empty: TFDS's default).
    fields: our feature name -> the dataset's feature name (others are dropped).
    splits: our split name -> TFDS split expression (default: the dataset's own splits).
  """
  name: str = ""
  data_dir: str = ""
  fields: Dict[str, str] = dataclasses.field(default_factory=dict)
  splits: Dict[str, str] = dataclasses.field(default_factory=dict)


Source = Union[TextSource, JsonlSource, TfdsSource]


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """A SeqIO task: a source, preprocessors by name, a vocabulary and metrics.

  Attributes:
    name: registry name.
    source: a TextSource, JsonlSource or TfdsSource.
    preprocessors: names from PREPROCESSORS, applied in order.
    vocab_file: SentencePiece model; empty means the DataConfig's vocabulary.
    extra_ids: sentinel ids above the pieces (with vocab_file).
    metrics: names from METRICS, computed on decoded predictions by `t5lite.infer --task`.
    max_document_tokens: documents are cut to this many tokens before an objective.
    noise_density / mean_noise_span_length: span corruption settings.
    max_input_chars: ChatYuan prompts longer than this keep their last characters (0: no cut).
  """
  name: str = ""
  source: Optional[Source] = None
  preprocessors: Tuple[str, ...] = ()
  vocab_file: str = ""
  extra_ids: int = 100
  metrics: Tuple[str, ...] = ()
  max_document_tokens: int = 512
  noise_density: float = 0.15
  mean_noise_span_length: float = 3.0
  max_input_chars: int = 0

  def __post_init__(self):
    if not self.name:
      raise ValueError("TaskSpec needs a name")
    if not isinstance(self.source, (TextSource, JsonlSource, TfdsSource)):
      raise ValueError(f"task {self.name!r}: source must be a TextSource, JsonlSource or "
                       f"TfdsSource, got {self.source!r}")
    unknown = [p for p in self.preprocessors if p not in PREPROCESSORS]
    if unknown:
      raise ValueError(f"task {self.name!r}: unknown preprocessors {unknown}; known: "
                       f"{', '.join(PREPROCESSORS)}")
    unknown = [m for m in self.metrics if m not in METRICS]
    if unknown:
      raise ValueError(f"task {self.name!r}: unknown metrics {unknown}; known: "
                       f"{', '.join(METRICS)}")
    object.__setattr__(self, "preprocessors", tuple(self.preprocessors))
    object.__setattr__(self, "metrics", tuple(self.metrics))


@dataclasses.dataclass(frozen=True)
class MixtureSpec:
  """A SeqIO mixture of registered tasks.

  Rates are either fixed (`rates`, one per task) or scaled by example counts with a temperature
  (T5's examples-proportional mixing): rate_i = min(n_i, maximum) ** (1 / temperature), where n_i
  counts the task's training examples. Temperature 1 is proportional; larger flattens toward
  uniform.

  Attributes:
    name: registry name.
    tasks: task names.
    rates: fixed rates, one per task; empty means example-count rates with `temperature`.
    temperature: softens example-count rates.
    maximum: caps each task's example count before scaling (0: no cap).
  """
  name: str = ""
  tasks: Tuple[str, ...] = ()
  rates: Tuple[float, ...] = ()
  temperature: float = 1.0
  maximum: int = 0

  def __post_init__(self):
    if not self.name or not self.tasks:
      raise ValueError("MixtureSpec needs a name and tasks")
    if self.rates and len(self.rates) != len(self.tasks):
      raise ValueError(f"mixture {self.name!r}: {len(self.rates)} rates for "
                       f"{len(self.tasks)} tasks")
    if any(r < 0 for r in self.rates) or (self.rates and not sum(self.rates)):
      raise ValueError(f"mixture {self.name!r}: rates must be >= 0 and not all 0")
    if self.temperature <= 0:
      raise ValueError(f"mixture {self.name!r}: temperature must be > 0")
    object.__setattr__(self, "tasks", tuple(self.tasks))
    object.__setattr__(self, "rates", tuple(self.rates))


def scaled_rates(counts, temperature: float = 1.0, maximum: int = 0):
  """Examples-proportional mixing rates with a temperature, normalized to sum to 1."""
  capped = [min(n, maximum) if maximum else n for n in counts]
  raw = [float(n) ** (1.0 / temperature) for n in capped]
  total = sum(raw)
  if not total:
    raise ValueError("every task of the mixture has 0 examples")
  return [r / total for r in raw]
