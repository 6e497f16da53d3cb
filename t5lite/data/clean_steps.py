"""datatrove pipeline steps for `scripts/clean_data.py`, over the rules in `cleaning`.

Stage 1 (one task per input file, run in parallel): read -> normalize -> quality filters ->
signatures, writing survivors to an intermediate folder. Stage 2 (one task): exact dedup (a set,
or a Bloom filter in fixed memory) -> MinHash LSH near-dedup -> optional perplexity filter ->
kept. Every dropped record is written with its `reason`. The same steps run under datatrove's
local, Slurm and Ray executors.
"""

import json
import os
from typing import List, Optional, Sequence

import numpy as np
from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.writers.jsonl import JsonlWriter

from t5lite.data import cleaning


def _flat(self, doc: Document) -> dict:  # a JsonlWriter adapter; `self` is the writer
  del self
  return {"id": doc.id, "text": doc.text, **doc.metadata}


def writer(folder: str) -> JsonlWriter:
  """Uncompressed JSONL, one file per task, metadata as top-level fields."""
  return JsonlWriter(folder, output_filename="${rank}.jsonl", compression=None, adapter=_flat)


class InputReader(PipelineStep):
  """Reads this task's share of the input files (JSONL or text lines).

  Bad lines (empty, non-UTF-8, broken JSON, no text field) are written to `dropped` with their
  reason and raw content, so nothing disappears silently. Other JSON fields travel as metadata.
  """

  name = "t5lite input reader"
  type = "📖 - READER"

  def __init__(self, files: Sequence[str], dropped_folder: str, fmt: str = "auto",
               text_field: str = "text", id_field: str = "id"):
    super().__init__()
    self.files, self.fmt = list(files), fmt
    self.text_field, self.id_field = text_field, id_field
    self.dropped = writer(dropped_folder)

  def _format(self, path: str) -> str:
    if self.fmt != "auto":
      return self.fmt
    return "jsonl" if path.endswith((".jsonl", ".json")) else "text"

  def _parse(self, raw: bytes, path: str, n: int):
    """(Document or None, reason)."""
    doc_id = f"{os.path.basename(path)}:{n}"
    if not raw.strip():
      return None, "bad_input_empty"
    try:
      line = raw.decode("utf-8")
    except UnicodeDecodeError:
      return None, "bad_input_non_utf8"
    if self._format(path) == "text":
      return Document(line.rstrip("\n"), doc_id, metadata={"source": path}), None
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      return None, "bad_input_json"
    if not isinstance(record, dict) or not isinstance(record.get(self.text_field), str):
      return None, "bad_input_missing_field"
    text = record.pop(self.text_field)
    doc_id = str(record.pop(self.id_field, doc_id))
    return Document(text, doc_id, metadata={**record, "source": path}), None

  def run(self, data=None, rank: int = 0, world_size: int = 1):
    """Yields the documents of files rank, rank + world_size, ..."""
    if data:
      yield from data
    with self.dropped as dropped:
      for path in self.files[rank::world_size]:
        with open(path, "rb") as f:
          for n, raw in enumerate(f, 1):
            doc, reason = self._parse(raw, path, n)
            self.stat_update("input_records")
            if doc is None:
              self.stat_update(reason)
              text = raw.decode("utf-8", errors="replace").rstrip("\n")
              dropped.write(Document(text, f"{os.path.basename(path)}:{n}",
                                     metadata={"reason": reason, "source": path}), rank)
              continue
            yield doc


class Normalize(PipelineStep):
  """NFKC (keeping CJK punctuation), HTML remnants, whitespace."""

  name = "t5lite normalize"
  type = "🔧 - FORMAT"

  def __init__(self, nfkc: bool = True):
    super().__init__()
    self.nfkc = nfkc

  def run(self, data, rank: int = 0, world_size: int = 1):
    """Normalizes each document's text in place."""
    for doc in data:
      doc.text = cleaning.normalize(doc.text, self.nfkc)
      yield doc


class _ReasonFilter(BaseFilter):
  """A BaseFilter whose dropped documents carry `reason` as a top-level field."""

  def _drop(self, doc: Document, reason: str, **extra):
    doc.metadata.pop("minhash", None)
    doc.metadata.update(reason=reason, **extra)
    return False, reason


class QualityFilter(_ReasonFilter):
  """Length, terminal punctuation, script language, repetition and blocklist rules."""

  name = "t5lite quality filter"

  def __init__(self, cfg: cleaning.FilterConfig, dropped_folder: str):
    super().__init__(exclusion_writer=writer(dropped_folder))
    self.cfg = cfg

  def filter(self, doc: Document):
    """Keeps the document or drops it with the first failing rule's reason."""
    reason = cleaning.first_failed_filter(doc.text, self.cfg)
    return True if reason is None else self._drop(doc, reason)


class Signatures(PipelineStep):
  """Adds the exact hash and the MinHash signature to each document's metadata."""

  name = "t5lite signatures"
  type = "🫂 - DEDUP"

  def __init__(self, num_perm: int = 128, ngram: int = 5, seed: int = 1):
    super().__init__()
    self.hasher = cleaning.MinHasher(num_perm, ngram, seed)

  def run(self, data, rank: int = 0, world_size: int = 1):
    """Annotates documents; drops nothing."""
    for doc in data:
      doc.metadata["exact_hash"] = cleaning.exact_hash(doc.text)
      doc.metadata["minhash"] = [int(v) for v in self.hasher.signature(doc.text)]
      yield doc


class Deduplicate(_ReasonFilter):
  """Exact (set or Bloom filter) then MinHash-LSH near-duplicate removal; keeps the first seen.

  Runs as a single task over the signatures of every shard, so duplicates across shards and
  files are found. Memory: one hash per kept document (or the fixed Bloom bit array) plus
  num_perm integers per kept document for LSH.
  """

  name = "t5lite dedup"

  def __init__(self, dropped_folder: str, exact: str = "set", bloom_capacity: int = 0,
               bloom_error: float = 1e-4, near: bool = True, num_perm: int = 128,
               bands: int = 32, threshold: float = 0.7):
    super().__init__(exclusion_writer=writer(dropped_folder))
    if exact not in ("set", "bloom", "none"):
      raise ValueError(f"exact dedup must be set, bloom or none, got {exact!r}")
    self.exact, self.near = exact, near
    self.bloom_capacity, self.bloom_error = bloom_capacity, bloom_error
    self.num_perm, self.bands, self.threshold = num_perm, bands, threshold
    self._seen = None
    self._lsh = None

  def filter(self, doc: Document):
    """Drops exact and near duplicates of earlier documents."""
    if self._seen is None:
      self._seen = (cleaning.BloomFilter(self.bloom_capacity, self.bloom_error)
                    if self.exact == "bloom" else set())
      self._lsh = cleaning.LshIndex(self.num_perm, self.bands, self.threshold)
    digest = doc.metadata.pop("exact_hash", None) or cleaning.exact_hash(doc.text)
    signature = np.asarray(doc.metadata.pop("minhash"), np.uint64)
    if self.exact == "bloom":
      if self._seen.add(digest):
        return self._drop(doc, "exact_duplicate")
    elif self.exact == "set":
      if digest in self._seen:
        return self._drop(doc, "exact_duplicate")
      self._seen.add(digest)
    if self.near:
      original = self._lsh.query_and_insert(doc.id, signature)
      if original is not None:
        return self._drop(doc, "near_duplicate", duplicate_of=original)
    return True


class PerplexityFilter(_ReasonFilter):
  """Drops documents a t5lite checkpoint finds too surprising (per-token perplexity)."""

  name = "t5lite perplexity filter"

  def __init__(self, checkpoint: str, max_perplexity: float, dropped_folder: str,
               batch_size: int = 32):
    super().__init__(exclusion_writer=writer(dropped_folder), batch_size=batch_size)
    self.checkpoint, self.max_perplexity = checkpoint, max_perplexity
    self._session = None

  def filter(self, doc: Document):
    """Single-document form of filter_batch."""
    return self.filter_batch([doc])[0]

  def filter_batch(self, batch: List[Document]):
    """Scores the batch in one forward pass; records each perplexity in the metadata."""
    if self._session is None:
      from t5lite import serving  # pylint: disable=import-outside-toplevel  (JAX, lazily)
      self._session = serving.Session(self.checkpoint)
    results = []
    for doc, ppl in zip(batch, cleaning.perplexities(self._session, [d.text for d in batch],
                                                     len(batch))):
      doc.metadata["perplexity"] = round(ppl, 3)
      results.append(True if ppl <= self.max_perplexity else
                     self._drop(doc, "perplexity"))
    return results


def count_reasons(folder: str, counts: Optional[dict] = None) -> dict:
  """Records per `reason` over the JSONL files of a dropped folder."""
  counts = {} if counts is None else counts
  if not os.path.isdir(folder):
    return counts
  for name in sorted(os.listdir(folder)):
    if name.endswith(".jsonl"):
      with open(os.path.join(folder, name), encoding="utf-8") as f:
        for line in f:
          reason = json.loads(line).get("reason", "unknown")
          counts[reason] = counts.get(reason, 0) + 1
  return counts


def count_records(folder: str) -> int:
  """Lines over the JSONL files of a folder."""
  if not os.path.isdir(folder):
    return 0
  total = 0
  for name in os.listdir(folder):
    if name.endswith(".jsonl"):
      with open(os.path.join(folder, name), "rb") as f:
        total += sum(1 for _ in f)
  return total
