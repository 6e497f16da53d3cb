"""Metrics on hand-computed cases, Chinese included."""

import math

import pytest

from t5lite import metrics


def test_tokenize_mixed_splits_cjk_into_characters():
  assert metrics.tokenize_mixed("我爱 NLP, OK!") == ["我", "爱", "nlp", ",", "ok", "!"]


def test_accuracy_exact_match_f1():
  assert metrics.accuracy([1, 2, 3, 4], [1, 2, 0, 4])["accuracy"] == 75.0
  assert metrics.exact_match(["The Cat", "狗"], ["the  cat", "猫"])["exact_match"] == 50.0
  # target "a b c d", prediction "a b x": common 2, P 2/3, R 2/4 -> F1 4/7.
  assert metrics.token_f1(["a b c d"], ["a b x"])["f1"] == pytest.approx(100 * 4 / 7)
  # Chinese characters are tokens: target 今天天气 (4), prediction 今天好 (3), common 2.
  assert metrics.token_f1(["今天天气"], ["今天好"])["f1"] == pytest.approx(100 * 2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4))


def test_rouge_l_on_chinese_is_not_zero():
  # LCS of 今天天气很好 / 今天很好 is 4 characters: P 4/4, R 4/6.
  score = metrics.rouge_l(["今天天气很好"], ["今天很好"])["rougeL"]
  assert score == pytest.approx(100 * 2 * 1.0 * (4 / 6) / (1.0 + 4 / 6))
  assert metrics.rouge_l(["a b c"], ["x y"])["rougeL"] == 0.0


def test_bleu_perfect_and_chinese_tokenizer():
  pytest.importorskip("sacrebleu")  # metrics.bleu's scorer (not on the GPU machines)
  assert metrics.bleu(["the cat sat on the mat"], ["the cat sat on the mat"])["bleu"] == pytest.approx(100)
  zh = metrics.bleu(["今天天气很好我们去公园"], ["今天天气很好我们去学校"], language="zh")["bleu"]
  assert 0 < zh < 100


def test_perplexity_and_errors():
  assert metrics.perplexity(2 * math.log(3), 2)["perplexity"] == pytest.approx(3.0)
  with pytest.raises(ValueError):
    metrics.accuracy([1], [1, 2])
  with pytest.raises(ValueError):
    metrics.rouge_l([], [])
