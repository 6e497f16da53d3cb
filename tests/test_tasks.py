"""SeqIO tasks and mixtures from gin: text, JSONL and TFDS sources, rates, resume, sharding."""

import json
import os

import numpy as np
import pytest

from conftest import REPO, run_cli

seqio = pytest.importorskip("seqio")

from t5lite import gin_setup  # noqa: E402
from t5lite.data import corpus, pipeline, task_specs as ts, tasks  # noqa: E402

MIXTURE_GIN = os.path.join(REPO, "gin_configs/experiments/chatyuan_sft_mixture.gin")


def _conversation(i, turns):
  messages = []
  for t in range(turns):
    messages += [{"role": "user", "content": f"第{i}个问题，第{t}轮"},
                 {"role": "assistant", "content": f"第{i}个回答，第{t}轮。"}]
  return {"conversation": messages}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """Text lines, multi-turn SFT JSONL (with bad lines planted) and a dev file."""
  d = tmp_path_factory.mktemp("seqio_data")
  docs = open(corpus.write_corpus(str(d / "corpus.txt")), encoding="utf-8").read().splitlines()
  for k in range(2):  # two files, so two hosts can shard at the file level
    (d / f"text-{k}.txt").write_text("\n".join(docs[k * 150:(k + 1) * 150]) + "\n\n",
                                     encoding="utf-8")
  with open(d / "sft-train.jsonl", "wb") as f:
    for i in range(40):
      f.write(json.dumps(_conversation(i, 1 + i % 3), ensure_ascii=False).encode() + b"\n")
    f.write(b"{not json\n")
    f.write(b'{"other": 1}\n')
    f.write(b"\xff\xfe broken bytes\n")
    f.write(b"\n")
  with open(d / "sft-dev.jsonl", "w", encoding="utf-8") as f:
    for i in range(8):
      f.write(json.dumps(_conversation(100 + i, 1), ensure_ascii=False) + "\n")
  return d


def _experiment(data_dir, *extra):
  bindings = [f"SFT_TRAIN = '{data_dir}/sft-train.jsonl'",
              f"SFT_EVAL = '{data_dir}/sft-dev.jsonl'",
              f"TEXT_TRAIN = '{data_dir}/text-*.txt'",
              "MODEL_DIR = '/tmp/unused'",
              f"DataConfig.corpus_file = '{data_dir}/corpus.txt'"] + list(extra)
  return gin_setup.parse_gin([MIXTURE_GIN], bindings)


def test_gin_registers_tasks_and_temperature_mixture(data_dir):
  exp = _experiment(data_dir)
  data = pipeline.make_dataset(exp.data, exp.model.arch)
  assert {"zh_sft", "zh_text_span_corruption"} <= set(seqio.TaskRegistry.names())
  # 40 conversations with 1, 2, 3 assistant turns -> one example per turn; 300 text lines.
  n_sft = sum(1 + i % 3 for i in range(40))
  assert tasks.count_examples("zh_sft") == n_sft
  assert tasks.count_examples("zh_text_span_corruption") == 300
  rates = tasks.mixture_rates("zh_sft_mix")
  expected = ts.scaled_rates([n_sft, 300], temperature=2.0)
  assert rates["zh_sft"] == pytest.approx(expected[0])
  assert rates["zh_sft"] > n_sft / (n_sft + 300)  # temperature flattens toward uniform
  # Bad lines were counted, not raised, and good lines all survived.
  report = tasks.READ_REPORTS[f"{data_dir}/sft-train.jsonl"]
  assert (report.records, report.bad_json, report.missing_fields, report.bad_utf8,
          report.empty_lines) == (40, 1, 1, 1, 1)
  # Multi-turn expansion: the third turn sees both earlier turns, in ChatYuan format.
  ds = tasks.dataset("zh_sft", "train", shuffle=False, num_epochs=1)
  examples = list(ds.as_numpy_iterator())
  prompts = [e["inputs_pretokenized"].decode() for e in examples]
  assert len(examples) == n_sft
  third = [p for p in prompts if p.endswith("第2个问题，第2轮\n小元：")]
  assert third == ["用户：第2个问题，第0轮\n小元：第2个回答，第0轮。\n用户：第2个问题，第1轮\n小元："
                   "第2个回答，第1轮。\n用户：第2个问题，第2轮\n小元："]
  assert all(e["targets"][-1] == 1 and e["inputs"][-1] == 1 for e in examples)  # EOS
  assert data.eval is not None and data.vocab.vocab_size <= exp.model.vocab_size


def test_left_truncation_keeps_current_question(data_dir):
  exp = _experiment(data_dir, "SFT_MAX_INPUT_CHARS = 20")
  pipeline.make_dataset(exp.data, exp.model.arch)
  prompts = [e["inputs_pretokenized"].decode() for e in
             tasks.dataset("zh_sft", "train", shuffle=False, num_epochs=1).as_numpy_iterator()]
  assert max(len(p) for p in prompts) == 20
  assert all(p.endswith("轮\n小元：") for p in prompts)


def test_fixed_rates_are_respected(data_dir):
  exp = _experiment(data_dir, "MixtureSpec.rates = [0.25, 0.75]")
  data = pipeline.make_dataset(exp.data, exp.model.arch)
  stream = data.train.examples
  n = 1200
  sft = sum(1 for i in range(n)
            if data.vocab.decode(stream.example(i)["inputs"]).startswith("用户"))
  assert abs(sft / n - 0.25) < 0.05, sft / n


def test_resumed_stream_equals_uninterrupted(data_dir):
  exp = _experiment(data_dir)
  first = pipeline.make_dataset(exp.data, exp.model.arch).train
  cursor, batches = 0, []
  for _ in range(4):
    rows, cursor = first.batch(cursor, 8)
    batches.append((rows, cursor))
  # A fresh process-like rebuild resumes from the cursor saved after batch 2.
  resumed = pipeline.make_dataset(exp.data, exp.model.arch).train
  rows, nxt = resumed.batch(batches[1][1], 8)
  assert nxt == batches[2][1]
  for k in rows:
    np.testing.assert_array_equal(rows[k], batches[2][0][k])


def test_hosts_read_disjoint_shards(data_dir):
  spec = ts.TaskSpec(name="text_lm", source=ts.TextSource({"train": f"{data_dir}/text-*.txt"}),
                     preprocessors=["text_to_targets", "tokenize", "causal_lm"])
  tasks.register_task(spec, lambda: pipeline.load_vocabulary(
      pipeline.DataConfig(corpus_file=f"{data_dir}/corpus.txt")))
  def texts(index, shards):
    ds = tasks.dataset("text_lm", "train", shuffle=False, num_epochs=1, shard_index=index,
                       num_shards=shards)
    return [e["targets_pretokenized"] for e in ds.as_numpy_iterator()]
  whole, a, b = texts(0, 1), texts(0, 2), texts(1, 2)
  assert len(a) == len(b) == 150 and sorted(a + b) == sorted(whole)
  files = [sorted(l.encode() for l in open(f"{data_dir}/text-{k}.txt", encoding="utf-8")
                  .read().split("\n") if l) for k in range(2)]
  assert sorted([sorted(a), sorted(b)]) == sorted(files)  # each host reads one whole file


def test_tfds_source(data_dir, tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  import tensorflow as tf
  questions = [f"question {i}" for i in range(12)]
  tfds.dataset_builders.store_as_tfds_dataset(
      name="t5lite_tiny_qa", version="1.0.0",
      features=tfds.features.FeaturesDict({"q": tfds.features.Text(),
                                           "a": tfds.features.Text()}),
      split_datasets={"train": tf.data.Dataset.from_tensor_slices(
          {"q": questions, "a": [f"answer {i}" for i in range(12)]})},
      data_dir=str(tmp_path))
  spec = ts.TaskSpec(name="tiny_qa", source=ts.TfdsSource(
      name="t5lite_tiny_qa:1.0.0", data_dir=str(tmp_path),
      fields={"inputs": "q", "targets": "a"}),
      preprocessors=["tokenize", "append_eos"], metrics=["exact_match"])
  tasks.register_task(spec, lambda: pipeline.load_vocabulary(
      pipeline.DataConfig(corpus_file=f"{data_dir}/corpus.txt")))
  assert tasks.count_examples("tiny_qa") == 12
  got = list(tasks.dataset("tiny_qa", "train", shuffle=False, num_epochs=1).as_numpy_iterator())
  vocab = tasks.vocabulary("tiny_qa")
  assert sorted(vocab.decode(e["inputs"]) for e in got) == sorted(questions)


def test_bad_task_configs_fail_clearly(data_dir):
  with pytest.raises(gin_setup.ConfigError, match="unknown preprocessors"):
    _experiment(data_dir, "sft/TaskSpec.preprocessors = ['tokenise']")
  with pytest.raises(gin_setup.ConfigError, match="2 rates for 2 tasks|rates"):
    _experiment(data_dir, "MixtureSpec.rates = [1.0]")
  exp = _experiment(data_dir, "DataConfig.mixture_or_task_name = 'no_such_task'")
  with pytest.raises(ValueError, match="no seqio task or mixture named 'no_such_task'"):
    pipeline.make_dataset(exp.data, exp.model.arch)
  exp = _experiment(data_dir, f"SFT_TRAIN = '{data_dir}/text-0.txt'",
                    "DataConfig.mixture_or_task_name = 'zh_sft'")
  with pytest.raises(ValueError, match="yields no examples"):
    pipeline.make_dataset(exp.data, exp.model.arch).train.batch(0, 4)


@pytest.mark.slow
def test_train_and_inspect_cli_on_mixture(data_dir, tmp_path):
  flags = [f"--gin_file={MIXTURE_GIN}", f"--gin.SFT_TRAIN='{data_dir}/sft-train.jsonl'",
           f"--gin.SFT_EVAL='{data_dir}/sft-dev.jsonl'",
           f"--gin.TEXT_TRAIN='{data_dir}/text-*.txt'",
           f"--gin.DataConfig.corpus_file='{data_dir}/corpus.txt'"]
  out = run_cli(["-m", "t5lite.data", "inspect", "zh_sft"] + flags)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "用户：" in out.stdout and "inputs" in out.stdout
  model_dir = tmp_path / "run"
  out = run_cli(["-m", "t5lite.train"] + flags + [
      f"--gin.MODEL_DIR={model_dir}", "--gin.TRAIN_STEPS=30", "--gin.BATCH_SIZE=16",
      "--gin.CHECKPOINT_PERIOD=30", "--gin.ScheduleConfig.learning_rate=3e-3",
      "--gin.OptimizerConfig.name='adamw'", "--gin.ScheduleConfig.warmup_steps=5",
      "--gin.TrainConfig.log_every=5", "--gin.TrainConfig.eval_every=30",
      "--gin.TrainConfig.eval_batches=2"], optimized=True)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = [json.loads(l) for l in open(model_dir / "metrics.jsonl", encoding="utf-8")]
  losses = [l["loss"] for l in lines if "loss" in l]
  assert losses[-1] < losses[0] * 0.7, losses
  evals = [json.loads(l) for l in open(model_dir / "metrics_eval.jsonl", encoding="utf-8")]
  assert evals and np.isfinite(evals[-1]["loss"])  # eval ran on the sft task's dev split
