"""TensorBoard event files written by t5lite.event_files read back by TensorFlow's own record
reader (which checks every CRC) and protocol buffer parser."""

import glob
import math
import os
import time

import pytest

from t5lite import event_files
from t5lite.summaries import MetricsWriter


def _events(path):
  tf = pytest.importorskip("tensorflow")
  return list(tf.compat.v1.train.summary_iterator(path))


def test_crc32c_check_values():
  # RFC 3720's check value (B.4) and its all-zero and all-ones 32-byte vectors; the masked
  # form is checked by TensorFlow's reader below.
  assert event_files.crc32c(b"123456789") == 0xE3069283
  assert event_files.crc32c(b"") == 0
  assert event_files.crc32c(b"\0" * 32) == 0x8A9136AA
  assert event_files.crc32c(b"\xff" * 32) == 0x62A8AB43


def test_tensorflow_reads_the_scalars_back(tmp_path):
  writer = event_files.ScalarWriter(str(tmp_path))
  before = time.time()
  writer.write(1, {"loss": 7.25, "learning_rate": 3e-3})
  writer.write(2 ** 40, {"loss": -0.5, "grad_norm": math.nan, "big": 1e39, "small": -math.inf})
  # Flushed at every write: a reader sees both steps while the writer is still open (a killed
  # run keeps them).
  first, *steps = _events(writer.path)
  writer.close()
  assert first.file_version == "brain.Event:2" and first.step == 0
  assert [e.step for e in steps] == [1, 2 ** 40]
  assert all(before - 1 <= e.wall_time <= time.time() + 1 for e in steps)
  values = [{v.tag: v.simple_value for v in e.summary.value} for e in steps]
  assert values[0] == {"loss": 7.25, "learning_rate": pytest.approx(3e-3, rel=1e-7)}
  assert values[1]["loss"] == -0.5 and math.isnan(values[1]["grad_norm"])
  assert values[1]["big"] == math.inf and values[1]["small"] == -math.inf
  assert list(values[1]) == ["loss", "grad_norm", "big", "small"]


def test_every_writer_gets_its_own_file(tmp_path):
  writers = [event_files.ScalarWriter(str(tmp_path / "tb")) for _ in range(2)]
  for step, w in enumerate(writers, 1):
    w.write(step, {"loss": float(step)})
    w.close()
  names = sorted(glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*")))
  assert len(names) == 2
  assert sorted(e.step for name in names for e in _events(name)[1:]) == [1, 2]


def test_metrics_writer_writes_jsonl_and_tensorboard(tmp_path):
  w = MetricsWriter(str(tmp_path), "train")
  w.write(3, {"loss": 2.0, "grad_norm": math.inf})
  w.close()
  with open(tmp_path / "metrics.jsonl", encoding="utf-8") as f:
    assert f.read() == '{"step": 3, "loss": 2.0, "grad_norm": "inf"}\n'
  (name,) = os.listdir(tmp_path / "tensorboard" / "train")
  (e,) = _events(str(tmp_path / "tensorboard" / "train" / name))[1:]
  assert e.step == 3 and {v.tag: v.simple_value for v in e.summary.value} == {
      "loss": 2.0, "grad_norm": math.inf}
  MetricsWriter(str(tmp_path), "eval", tensorboard=False).write(3, {"accuracy": 0.5})
  assert os.listdir(tmp_path / "tensorboard") == ["train"]
