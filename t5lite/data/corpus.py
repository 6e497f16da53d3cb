"""A small bilingual (Chinese and English) corpus built locally for the quickstart and tests.

No download is possible or needed: the corpus is written from hand-made sentences and a
deterministic template grammar, in both languages, so that a tiny model has real structure to
learn (word order, agreement, Chinese measure words). `write_corpus` puts it in a text file that
any text-line source reads, exactly like a user's own corpus.
"""

import os
import random

_EN_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Language models learn the statistics of text by predicting missing words.",
    "A transformer mixes information between tokens with attention.",
    "The encoder reads the input and the decoder writes the output one token at a time.",
    "Span corruption replaces random spans of text with sentinel tokens.",
    "Checkpoints let a long training run survive a preempted machine.",
    "Data parallelism copies the model and splits the batch across devices.",
    "Tensor parallelism splits each weight matrix across devices.",
    "The learning rate warms up, then decays as training goes on.",
    "Good tokenizers keep Chinese characters and English words short.",
    "Rain fell on the quiet city all night, and the streets shone in the morning.",
    "She opened the window and the smell of fresh bread came in from the bakery.",
    "Mountains in the west turn gold when the sun goes down.",
    "Reading a book on a train makes a long journey feel short.",
    "The library opens at nine in the morning and closes at six in the evening.",
    "Engineers measure before they optimize, and they measure again afterwards.",
]

_ZH_SENTENCES = [
    "今天天气很好，我们一起去公园散步吧。",
    "语言模型通过预测被遮住的词来学习文本的规律。",
    "注意力机制让每个词都能看到句子里的其他词。",
    "编码器读取输入，解码器一个词一个词地生成输出。",
    "训练中断以后，可以从最近的检查点继续训练。",
    "数据并行把同一个模型复制到多个设备上，并把一个批次分开计算。",
    "学习率先预热，然后随着训练逐渐下降。",
    "好的分词器能把中文和英文都切分得很短。",
    "春天来了，河边的柳树发出了嫩绿的新芽。",
    "他每天早上六点起床，先跑步，再吃早饭。",
    "这家小店的面条很好吃，价格也很便宜。",
    "我们的目标是让每个人都能训练自己的模型。",
    "图书馆早上九点开门，晚上六点关门。",
    "工程师在优化之前先测量，优化之后再测量一次。",
    "秋天的北京天很高，云很淡。",
    "小元是一个乐于助人的对话助手。",
]

_EN_SUBJECTS = ["The teacher", "My sister", "The old farmer", "A young engineer", "The children",
                "Our neighbour", "The doctor", "A student", "The captain", "The cook"]
_EN_VERBS = ["reads", "writes", "finds", "carries", "paints", "repairs", "buys", "sells",
             "remembers", "describes"]
_EN_OBJECTS = ["a long letter", "the red bicycle", "three small boxes", "an old map",
               "the new computer", "a bowl of rice", "the wooden table", "a short poem",
               "the broken clock", "two green apples"]
_EN_PLACES = ["in the kitchen", "at the station", "near the river", "in the garden",
              "at school", "in the city", "on the mountain", "by the sea"]
_EN_TIMES = ["every morning", "on Sunday", "after dinner", "before the rain", "at night",
             "in spring", "last week", "today"]

_ZH_SUBJECTS = ["老师", "我的妹妹", "老农民", "年轻的工程师", "孩子们", "我们的邻居", "医生",
                "一个学生", "船长", "厨师"]
_ZH_VERBS = ["读", "写", "找到", "带着", "画", "修理", "买", "卖", "记得", "描述"]
_ZH_OBJECTS = ["一封长信", "那辆红色的自行车", "三个小盒子", "一张旧地图", "新电脑", "一碗米饭",
               "那张木桌子", "一首短诗", "坏了的钟", "两个青苹果"]
_ZH_PLACES = ["在厨房里", "在车站", "在河边", "在花园里", "在学校", "在城里", "在山上", "在海边"]
_ZH_TIMES = ["每天早上", "星期天", "晚饭后", "下雨前", "晚上", "春天", "上个星期", "今天"]


def generate_lines(num_lines: int = 4000, seed: int = 0):
  """Deterministic list of bilingual lines: hand-written sentences plus template sentences.

  The template sentences come in aligned English/Chinese pairs, so the corpus also holds
  translation-like structure.
  """
  rng = random.Random(seed)
  lines = list(_EN_SENTENCES) + list(_ZH_SENTENCES)
  while len(lines) < num_lines:
    s, v, o = rng.randrange(10), rng.randrange(10), rng.randrange(10)
    p, t = rng.randrange(8), rng.randrange(8)
    en = f"{_EN_SUBJECTS[s]} {_EN_VERBS[v]} {_EN_OBJECTS[o]} {_EN_PLACES[p]} {_EN_TIMES[t]}."
    zh = f"{_ZH_SUBJECTS[s]}{_ZH_TIMES[t]}{_ZH_PLACES[p]}{_ZH_VERBS[v]}{_ZH_OBJECTS[o]}。"
    kind = rng.random()
    if kind < 0.4:
      lines.append(en)
    elif kind < 0.8:
      lines.append(zh)
    else:
      lines.append(f"{en} {zh}")
    if rng.random() < 0.05:
      lines.append(rng.choice(_EN_SENTENCES + _ZH_SENTENCES))
  return lines[:num_lines]


def write_corpus(path: str, num_lines: int = 4000, seed: int = 0) -> str:
  """Writes the corpus to `path` (one line per document) unless it exists; returns path."""
  if not os.path.exists(path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
      f.write("\n".join(generate_lines(num_lines, seed)) + "\n")
    os.replace(tmp, path)
  return path
