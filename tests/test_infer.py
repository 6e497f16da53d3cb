"""`t5lite.infer` and `t5lite.chat` on a checkpoint trained here by the quickstart."""

import dataclasses
import json
import os
import re

import jax
import numpy as np
import pytest

from conftest import REPO, run_cli, tiny_config
from test_train import QUICK
from t5lite import checkpoints, serving
from t5lite.kernels import cpu_matvec
from t5lite.models import transformer
from t5lite.models.model import Model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("infer") / "run")
  r = run_cli(QUICK + [f"--gin.MODEL_DIR={d}", "--gin.TRAIN_STEPS=30"])
  assert r.returncode == 0, r.stderr[-3000:]
  assert os.path.exists(os.path.join(d, "spiece.model"))
  return d


def _write(path, lines):
  path.write_text("".join(json.dumps(l, ensure_ascii=False) + "\n" for l in lines),
                  encoding="utf-8")


def test_predict_and_score(trained, tmp_path):
  _write(tmp_path / "in.jsonl", [{"inputs": "老师每天早上<extra_id_0>一封长信。"},
                                 {"input_ids": [5, 6, 7, 1]},
                                 {"inputs": "The teacher <extra_id_0> a long letter."}])
  r = run_cli(["-m", "t5lite.infer", "--checkpoint", trained, "--input_file",
               str(tmp_path / "in.jsonl"), "--output_file", str(tmp_path / "out.jsonl"),
               "--max_decode_len", "8", "--batch_size", "2"])
  assert r.returncode == 0, r.stderr[-3000:]
  out = [json.loads(l) for l in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
  assert len(out) == 3 and all("prediction" in o and "prediction_ids" in o for o in out)
  assert out[0]["inputs"].startswith("老师")
  _write(tmp_path / "sc.jsonl", [{"inputs": "a", "targets": "<extra_id_0> b"},
                                 {"input_ids": [5, 6, 1], "target_ids": [7, 1]}])
  r = run_cli(["-m", "t5lite.infer", "--checkpoint", trained, "--input_file",
               str(tmp_path / "sc.jsonl"), "--output_file", str(tmp_path / "sc_out.jsonl"),
               "--mode", "score"])
  assert r.returncode == 0, r.stderr[-3000:]
  scores = [json.loads(l)["score"] for l in (tmp_path / "sc_out.jsonl").read_text().splitlines()]
  assert len(scores) == 2 and all(s < 0 for s in scores)
  # The head in 3 blocks along the targets: the same scores, with no whole logits.
  r = run_cli(["-m", "t5lite.infer", "--checkpoint", trained, "--input_file",
               str(tmp_path / "sc.jsonl"), "--output_file", str(tmp_path / "sc_chunked.jsonl"),
               "--mode", "score", "--head_chunks", "3"])
  assert r.returncode == 0, r.stderr[-3000:]
  chunked = [json.loads(l)["score"]
             for l in (tmp_path / "sc_chunked.jsonl").read_text().splitlines()]
  assert chunked == pytest.approx(scores, rel=1e-5)
  r = run_cli(["-m", "t5lite.infer", "--checkpoint", trained, "--input_file",
               str(tmp_path / "sc.jsonl"), "--output_file", str(tmp_path / "bad.jsonl"),
               "--mode", "score", "--head_chunks", "-1"])
  assert r.returncode == 2 and "--head_chunks must be >= 0" in r.stderr


@pytest.mark.parametrize("content,message", [("", "no examples"), ("{not json\n", "not valid JSON"),
                                             ('{"foo": 1}\n', "needs 'inputs'"),
                                             ('{"input_ids": [' + ",".join(["5"] * 5000) + "]}\n",
                                              "exceeds")])
def test_bad_input_files_leave_no_output(trained, tmp_path, content, message):
  (tmp_path / "in.jsonl").write_text(content)
  out = tmp_path / "out.jsonl"
  r = run_cli(["-m", "t5lite.infer", "--checkpoint", trained, "--input_file",
               str(tmp_path / "in.jsonl"), "--output_file", str(out)])
  assert r.returncode == 2 and message in r.stderr
  assert not out.exists() and not os.path.exists(f"{out}.partial")


def test_sharded_infer_matches_one_device(trained, tmp_path):
  """`--partitioning` shards the checkpoint over 8 (fake CPU) devices as it is restored; the
  predictions and scores are those of one device. A mesh the devices do not fit is a clear
  error."""
  _write(tmp_path / "in.jsonl", [{"inputs": "老师每天早上<extra_id_0>一封长信。", "targets": "写"},
                                 {"input_ids": [5, 6, 7, 1], "target_ids": [8, 1]},
                                 {"inputs": "The teacher <extra_id_0> a long letter.",
                                  "targets": "<extra_id_0> writes"}])
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}

  def infer(mode, *flags):
    out = tmp_path / f"{mode}{'-'.join(flags)}.jsonl"
    r = run_cli(["-m", "t5lite.infer", "--checkpoint", trained, "--input_file",
                 str(tmp_path / "in.jsonl"), "--output_file", str(out), "--mode", mode,
                 "--max_decode_len", "8", *flags], env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    placed = re.search(r"([\d.]+) of ([\d.]+) MiB per device", r.stderr)
    share = float(placed.group(1)) / float(placed.group(2)) if placed else 1.0
    return [json.loads(l) for l in out.read_text(encoding="utf-8").splitlines()], share

  want, share = infer("predict")
  assert share == 1.0
  got, share = infer("predict", "--partitioning", "fsdp_tensor")
  assert got == want and share < 0.3  # 4-way FSDP x 2-way tensor
  got, share = infer("predict", "--partitioning", "tensor_parallel", "--tensor", "4")
  assert got == want and share < 0.5
  want_scores = [o["score"] for o in infer("score")[0]]
  got, share = infer("score", "--partitioning", "fsdp")
  got = [o["score"] for o in got]
  assert share < 0.3
  assert max(abs(a - b) for a, b in zip(got, want_scores)) < 1e-4
  r = run_cli(["-m", "t5lite.infer", "--checkpoint", trained, "--input_file",
               str(tmp_path / "in.jsonl"), "--output_file", str(tmp_path / "bad.jsonl"),
               "--partitioning", "tensor_parallel", "--tensor", "3"], env=env)
  assert r.returncode == 2 and "do not divide" in r.stderr
  assert not os.path.exists(tmp_path / "bad.jsonl")


def test_compilation_cache_serves_a_second_run(trained, tmp_path):
  """The CLIs store compiled programs in the persistent compilation cache, and a second run
  loads its decoding loop from there; corrupt entries are compiled again (the run succeeds);
  `off` switches the cache off."""
  _write(tmp_path / "in.jsonl", [{"input_ids": [5, 6, 7, 1]}])
  cache = tmp_path / "cc"

  def infer(cache_setting):
    env = {"T5LITE_COMPILATION_CACHE": cache_setting, "T5LITE_CACHE_DIR": str(tmp_path / "base"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",  # the tiny model compiles fast
           "JAX_DEBUG_LOG_MODULES": "jax._src.compiler"}     # logs cache hits
    r = run_cli(["-m", "t5lite.infer", "--checkpoint", trained, "--input_file",
                 str(tmp_path / "in.jsonl"), "--output_file", str(tmp_path / "out.jsonl"),
                 "--max_decode_len", "4"], env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stderr

  hit = "Persistent compilation cache hit for 'jit__sample_loop'"
  assert hit not in infer(str(cache))
  assert any(name.startswith("jit__sample_loop") for name in os.listdir(cache))
  assert hit in infer(str(cache))
  for name in os.listdir(cache):  # corrupt entries: JAX warns and compiles again
    if name.endswith("-cache"):
      (cache / name).write_bytes(b"not an executable")
  assert hit not in infer(str(cache))
  assert hit not in infer("off")
  assert not os.path.exists(tmp_path / "base" / "jax") and not os.path.exists(REPO + "/off")


def test_compilation_cache_directory():
  from t5lite import compilation_cache as cc
  assert cc.cache_dir({"T5LITE_CACHE_DIR": "/data/c"}) == "/data/c/jax"
  assert cc.cache_dir({}) == os.path.expanduser("~/.cache/t5lite/jax")
  assert cc.cache_dir({cc.ENV: "/x", "T5LITE_CACHE_DIR": "/data/c"}) == "/x"
  assert cc.cache_dir({cc.ENV: "off"}) is None and cc.cache_dir({cc.ENV: ""}) is None
  assert cc.enable({cc.ENV: "off", "JAX_COMPILATION_CACHE_DIR": "/mine"}) == "/mine"


def test_chat_reads_stdin_and_keeps_history(trained):
  import subprocess
  import sys
  from conftest import REPO
  env = dict(os.environ, PYTHONPATH=REPO)
  proc = subprocess.run([sys.executable, "-m", "t5lite.chat", "--checkpoint", trained,
                         "--max_decode_len", "6", "--max_input_tokens", "40", "--decode", "sample",
                         "--top_p", "0.9", "--temperature", "0.7"],
                        input="你好\n\n今天天气怎么样？\n" + "很长的问题" * 30 + "\n",
                        capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  replies = [l for l in proc.stdout.splitlines() if l.startswith("小元：")]
  assert len(replies) == 3


def test_chat_prompt_format_and_truncation():
  from t5lite import chat
  prompt = chat.build_prompt([("你好", "你好！\n有什么可以帮你？")], "写一首诗")
  assert prompt == "用户：你好\n小元：你好！\n有什么可以帮你？\n用户：写一首诗\n小元："
  assert chat.escape("a\nb\tc") == "a\\nb\\tc" and chat.unescape("a\\nb\\tc") == "a\nb\tc"


def test_inputs_are_padded_to_few_lengths():
  """Batches are padded to powers of two (at least 8), capped at the model's limit unless the
  longest row is past it, so a file or a chat of varied lengths compiles a handful of programs."""
  lengths = [serving.pad([[1] * n, [2]]).shape[1] for n in (0, 1, 8, 9, 100, 300)]
  assert lengths == [8, 8, 8, 16, 128, 512]
  out = serving.pad([[5, 6, 7]] * 2 + [[1] * 300], limit=400)
  assert out.shape == (3, 400) and out[0].tolist()[:4] == [5, 6, 7, 0] and out[2, 299] == 1
  assert serving.pad([[1] * 450], limit=400).shape == (1, 450)  # decode() then says why
  assert len({serving.pad([[1] * n]).shape for n in range(1, 257)}) == 6


def test_notebook_code_runs_against_a_checkpoint(trained):
  """The notebook's Python cells (not its shell cells) run on a trained checkpoint."""
  import json as json_lib
  from conftest import REPO
  nb = json_lib.load(open(os.path.join(REPO, "notebooks", "quickstart.ipynb"), encoding="utf-8"))
  cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
  code = "\n".join(c for c in cells
                   if not any(line.lstrip().startswith("!") for line in c.splitlines()))
  code = code.replace("runs/notebook", trained).replace("plt.show()", "pass")
  r = run_cli(["-c", code])
  assert r.returncode == 0, r.stderr[-3000:]
  assert "first loss" in r.stdout and "->" in r.stdout


def test_task_mode_decodes_eval_split_and_reports_metrics(trained, tmp_path):
  pytest.importorskip("seqio")  # seqio tasks need it (GPU machines may have no TensorFlow)
  from t5lite import metrics
  sft = tmp_path / "sft-dev.jsonl"
  _write(sft, [{"conversation": [{"role": "user", "content": f"老师每天早上写{i}封长信吗？"},
                                 {"role": "assistant", "content": f"老师每天早上写{i}封长信。"}]}
               for i in range(5)])
  out = tmp_path / "pred.jsonl"
  r = run_cli(["-m", "t5lite.infer", "--checkpoint", trained, "--task", "zh_sft",
               "--gin_file", "gin_configs/experiments/chatyuan_sft_mixture.gin",
               f"--gin.SFT_TRAIN='{sft}'", f"--gin.SFT_EVAL='{sft}'",
               f"--gin.TEXT_TRAIN='{sft}'", "--output_file", str(out), "--max_decode_len", "12",
               "--batch_size", "2"])
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [json.loads(l) for l in out.read_text(encoding="utf-8").splitlines()]
  assert len(rows) == 5 and rows[0]["inputs"].startswith("用户：老师")
  reported = json.loads((tmp_path / "pred.jsonl.metrics.json").read_text())
  targets, preds = [r_["targets"] for r_ in rows], [r_["prediction"] for r_ in rows]
  expected = {**metrics.bleu(targets, preds, language="zh"), **metrics.rouge_l(targets, preds),
              **metrics.exact_match(targets, preds)}
  assert reported["examples"] == 5
  for k, v in expected.items():
    assert reported[k] == pytest.approx(v)
  assert "zh_sft:validation" in r.stderr
  r = run_cli(["-m", "t5lite.infer", "--checkpoint", trained, "--task", "nope",
               "--output_file", str(tmp_path / "x.jsonl")])
  assert r.returncode == 2 and "no seqio task or mixture named 'nope'" in r.stderr


def test_clean_data_perplexity_filter(trained, tmp_path):
  """scripts/clean_data.py drops text the checkpoint finds surprising, keeps corpus-like text."""
  pytest.importorskip("datatrove")  # clean_data's pipelines (not on the GPU machines)
  import random
  from conftest import REPO
  from t5lite import serving
  from t5lite.data import cleaning, corpus
  lines = open(corpus.write_corpus(str(tmp_path / "c.txt")), encoding="utf-8").read().splitlines()
  natural = sorted({l for l in lines if l.endswith(("。", "."))})[:12]
  rng = random.Random(0)
  gibberish = ["".join(chr(rng.randint(0x9000, 0x9FA0)) for _ in range(30)) + "。"
               for _ in range(6)] + [
      " ".join("".join(rng.choice("qxzjvkw") for _ in range(6)) for _ in range(8)) + "."
      for _ in range(6)]
  session = serving.Session(trained)
  ppl_nat = cleaning.perplexities(session, natural)
  ppl_gib = cleaning.perplexities(session, gibberish)
  assert max(ppl_nat) < min(ppl_gib), (ppl_nat, ppl_gib)
  threshold = (max(ppl_nat) * min(ppl_gib)) ** 0.5
  _write(tmp_path / "in.jsonl", [{"id": f"n{i}", "text": t} for i, t in enumerate(natural)] +
         [{"id": f"g{i}", "text": t} for i, t in enumerate(gibberish)])
  out = tmp_path / "out"
  r = run_cli([os.path.join(REPO, "scripts", "clean_data.py"), "--input",
               str(tmp_path / "in.jsonl"), "--output_dir", str(out), "--min_chars", "5",
               "--languages", "", "--max_top_char_fraction", "0.5",
               "--perplexity_checkpoint", trained, "--max_perplexity", str(threshold)])
  assert r.returncode == 0, r.stderr[-3000:]
  def read(folder):
    return [json.loads(l) for f in sorted(os.listdir(folder))
            for l in open(os.path.join(folder, f), encoding="utf-8")]
  dropped = read(out / "dropped" / "perplexity")
  kept = read(out / "kept")
  assert sorted(d["id"] for d in dropped) == sorted(f"g{i}" for i in range(12))
  assert sorted(d["id"] for d in kept) == sorted(f"n{i}" for i in range(len(natural)))
  assert all(d["perplexity"] <= threshold for d in kept)


def _tiny_checkpoint(tmp_path, dtype, seed):
  """A tiny decoder-only model computing in `dtype`, its checkpoint saved under tmp_path, its
  logits far apart (one float rounding's difference flips no token): (cfg, model, params)."""
  cfg = tiny_config(arch="decoder_only", dtype=dtype)
  model = Model(cfg)
  params = model.init(jax.random.key(seed))
  params = jax.tree.map(lambda p: p * 4 if p.ndim == 2 and p.shape[0] == cfg.vocab_size else p,
                        params)
  ckpt = checkpoints.Checkpointer(str(tmp_path / "checkpoints"), keep=None, async_save=False)
  ckpt.save(0, {"params": jax.tree.map(np.asarray, params)}, {"cursor": 0}, cfg)
  ckpt.close()
  return cfg, model, params


def test_session_keeps_weights_in_the_compute_dtype(tmp_path):
  """A bf16 model's session holds its matrices in bf16 (norm scales as stored, float32), layer by
  layer (`Model.unroll`), and decodes as the float32 checkpoint's parameters do and scores
  exactly as they do with the layers run in order (`scan_layers=False`, as the session runs
  them; scanned, within bf16 rounding); on a CPU, by default, with t5lite's kernels, giving the
  same tokens and the scores within bf16 rounding."""
  cfg, model, params = _tiny_checkpoint(tmp_path, "bfloat16", 0)
  prompts = [[5, 6, 7, 8], [9, 10]]
  want = model.predict_batch(params, {"prompt_tokens": serving.pad(prompts, 40)},
                             max_decode_len=6, eos_id=-1)["tokens"]
  rows = [[5, 6, 8, 9, 1], [7, 10, 1]]
  tgt = serving.pad(rows, cfg.max_length)
  weights = np.zeros(tgt.shape, np.float32)
  weights[0, 2:5] = weights[1, 1:3] = 1.0
  batch = {"decoder_input_tokens": np.concatenate([np.zeros((2, 1), np.int32), tgt[:, :-1]], 1),
           "decoder_target_tokens": tgt, "decoder_loss_weights": weights}
  want_scores = np.asarray(model.score_batch(params, batch))
  in_order = np.asarray(
      Model(dataclasses.replace(cfg, scan_layers=False)).score_batch(params, batch))
  for cpu_kernels in (False, True):
    session = serving.Session(str(tmp_path), cpu_kernels=cpu_kernels)
    assert transformer.is_unrolled(session.params)
    dtypes = {str(x.dtype) for x in jax.tree.leaves(session.params)}
    assert dtypes == {"bfloat16", "float32"}, dtypes
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(session.params) if x.ndim == 1)
    assert session.cfg.matvec_kernel == cpu_kernels
    assert (session.cfg.attention_impl == "cpu_kernel") == cpu_kernels
    # On CPUs with AMX, the prompts' forward pass by the AMX matmul kernel too.
    amx = cpu_kernels and cpu_matvec.amx_rows() > 0
    assert session.cfg.matmul_kernel == session.cfg.float32_dot_outputs == amx
    many = {k: np.tile(v, (2, 2)) for k, v in batch.items()}  # 64 tokens: past the matvec's 32
    scoring = jax.jit(Model(session.cfg).score_batch).lower(session.params, many).as_text()
    assert ("t5lite_cpu_matmul" in scoring) == amx
    got = session.predict(prompts, max_decode_len=6, eos_id=-1)
    assert got == [[int(t) for t in row if t != 0] for row in np.asarray(want)]
    scores = session.score([[5, 6], [7]], [[8, 9, 1], [10, 1]])
    np.testing.assert_allclose(scores, want_scores, rtol=2e-2)
    if not cpu_kernels:
      np.testing.assert_array_equal(scores, in_order)


def test_float32_session_runs_its_prompts_on_the_float32_matmul_kernel(tmp_path, kernel_pays):
  """A float32 model's session on a CPU with AVX-512 or AVX2 runs its prompts' projections on
  the float32 matmul kernel (none without the CPU kernels or such a CPU), decoding the same
  tokens as the model under XLA. (The kernel run wherever it takes the operands: on AVX2 it
  runs only products large enough to pay, `cpu_matmul.pays`.)"""
  from t5lite.kernels import cpu_matmul  # pylint: disable=import-outside-toplevel
  _, model, params = _tiny_checkpoint(tmp_path, "float32", 1)
  prompts = [[5, 6, 7, 8], [9, 10]]
  want = model.predict_batch(params, {"prompt_tokens": serving.pad(prompts, 40)},
                             max_decode_len=6, eos_id=-1)["tokens"]
  batch = {"decoder_input_tokens": np.ones((2, 32), np.int32),
           "decoder_target_tokens": np.ones((2, 32), np.int32),
           "decoder_loss_weights": np.ones((2, 32), np.float32)}  # 64 tokens: past the matvec's
  for cpu_kernels in (False, True):
    session = serving.Session(str(tmp_path), cpu_kernels=cpu_kernels)
    on_kernel = cpu_kernels and cpu_matmul.float32_kernel()
    assert session.cfg.matmul_kernel == on_kernel and not session.cfg.float32_dot_outputs
    scoring = jax.jit(Model(session.cfg).score_batch).lower(session.params, batch).as_text()
    assert ("t5lite_cpu_matmul_f32_f32" in scoring) == on_kernel
    got = session.predict(prompts, max_decode_len=6, eos_id=-1)
    assert got == [[int(t) for t in row if t != 0] for row in np.asarray(want)]
