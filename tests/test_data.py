"""Quickstart data: span corruption statistics, packing, resumable streams, vocabulary."""

import numpy as np
import pytest

from t5lite.data import feature_converters as fc
from t5lite.data import pipeline, preprocessors


def test_span_corruption_statistics():
  vocab_size, length = 1000, 200
  noise, spans = [], []
  for i in range(300):
    tokens = np.arange(10, 10 + length)
    ex = preprocessors.span_corruption(tokens, np.random.default_rng([0, i]),
                                       vocab_size=vocab_size, noise_density=0.15,
                                       mean_span_length=3.0)
    inputs, targets = ex["inputs"][:-1], ex["targets"][:-1]
    sentinels_in = inputs[inputs >= vocab_size - 100]
    sentinels_out = targets[targets >= vocab_size - 100]
    # Sentinels count down from the top and match between inputs and targets.
    np.testing.assert_array_equal(sentinels_in, vocab_size - 1 - np.arange(len(sentinels_in)))
    np.testing.assert_array_equal(sentinels_in, sentinels_out)
    hidden = targets[targets < vocab_size - 100]
    kept = inputs[inputs < vocab_size - 100]
    # Every token is either kept or hidden, in order.
    np.testing.assert_array_equal(np.sort(np.concatenate([kept, hidden])), tokens)
    noise.append(len(hidden) / length)
    spans.append(len(hidden) / len(sentinels_out))
  assert abs(np.mean(noise) - 0.15) < 0.01
  assert abs(np.mean(spans) - 3.0) < 0.2


def test_packing_rows_and_resumable_stream(tmp_path):
  docs = [np.arange(3, 3 + n, dtype=np.int32) for n in (5, 9, 4, 12, 7, 3, 8)]
  stream = pipeline.BatchStream(
      pipeline.ExampleStream(docs, lambda d, r: preprocessors.span_corruption(
          d, r, vocab_size=200), seed=3),
      fc.EncDecFeatureConverter(fc.FeatureLengths(16, 8)))
  batch, cursor = stream.batch(0, 2)
  seg = batch["encoder_segment_ids"]
  assert seg.max() >= 2  # several examples per row
  # Decoder inputs restart at each segment: position 0 of every segment is 0.
  starts = batch["decoder_positions"] == 0
  assert np.all(batch["decoder_input_tokens"][starts] == 0)
  assert np.all(batch["decoder_loss_weights"][batch["decoder_segment_ids"] == 0] == 0)
  # The stream is a pure function of its cursor: resuming equals continuing.
  b2, c2 = stream.batch(cursor, 2)
  b2_again, c2_again = stream.batch(cursor, 2)
  assert c2 == c2_again
  for k in b2:
    np.testing.assert_array_equal(b2[k], b2_again[k])
  # Hosts read disjoint examples.
  a = pipeline.ExampleStream(docs, lambda d, r: {"inputs": d, "targets": d}, 0, True, 0, 2)
  b = pipeline.ExampleStream(docs, lambda d, r: {"inputs": d, "targets": d}, 0, True, 1, 2)
  seen_a = {tuple(a.example(i)["inputs"]) for i in range(3)}
  seen_b = {tuple(b.example(i)["inputs"]) for i in range(3)}
  assert not seen_a & seen_b


def test_prefix_lm_converter_marks_prefix():
  conv = fc.DecoderFeatureConverter(fc.FeatureLengths(0, 12), pack=True, prefix_lm=True)
  examples = iter([{"inputs": np.array([5, 6, 7]), "targets": np.array([8, 9, 1])},
                   {"inputs": np.array([10, 11]), "targets": np.array([12, 1])}] * 3)
  batch, consumed = fc.build_rows(conv, examples, 1)
  assert consumed == 2
  np.testing.assert_array_equal(batch["decoder_target_tokens"][0, :10],
                                [5, 6, 7, 8, 9, 1, 10, 11, 12, 1])
  np.testing.assert_array_equal(batch["decoder_loss_weights"][0, :10],
                                [0, 0, 0, 1, 1, 1, 0, 0, 1, 1])
  np.testing.assert_array_equal(batch["decoder_causal_attention"][0, :10],
                                [1, 1, 1, 1, 0, 0, 1, 1, 1, 0])


def test_vocabulary_round_trip_chinese_english_code(tmp_path):
  cfg = pipeline.DataConfig(cache_dir=str(tmp_path))
  vocab = pipeline.load_vocabulary(cfg)
  assert vocab.vocab_size == vocab.base_vocab_size + 100
  for text in ["今天天气很好，我们一起去公园散步吧。", "The quick brown fox jumps.",
               "def f(x): return x + 1"]:
    assert vocab.decode(vocab.encode(text)) == text
  assert vocab.decode([vocab.sentinel_id(0), 1, 55]) == "<extra_id_0>"
  # Cached: a second load reuses the model file.
  assert pipeline.load_vocabulary(cfg).model_file == vocab.model_file


def test_bad_utf8_lines_are_kept_and_counted(tmp_path):
  path = tmp_path / "c.txt"
  path.write_bytes("好的\n".encode() + b"\xff\xfe broken\n\n" + b"fine\n")
  docs, bad = pipeline.read_documents(str(path))
  assert bad == 1 and len(docs) == 3


def test_missing_corpus_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="corpus_file"):
    pipeline.corpus_path(pipeline.DataConfig(corpus_file=str(tmp_path / "nope.txt")))


def test_data_cli_inspect_and_stats():
  from conftest import run_cli
  r = run_cli(["-m", "t5lite.data", "inspect", "--gin_file=gin_configs/experiments/quickstart.gin",
               "--examples=2"])
  assert r.returncode == 0, r.stderr[-2000:]
  assert "--- example 1" in r.stdout and "<extra_id_0>" in r.stdout and "p95" in r.stdout
  r = run_cli(["-m", "t5lite.data", "stats", "--gin_file=gin_configs/experiments/quickstart.gin",
               "--batches=5"])
  assert r.returncode == 0 and "tokens/s" in r.stdout
  r = run_cli(["-m", "t5lite.data", "stats", "--gin_file=gin_configs/experiments/quickstart.gin",
               "--gin.DataConfig.objective='bogus'"])
  assert r.returncode == 2 and "objective" in r.stderr
