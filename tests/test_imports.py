"""The core (models, trainer, partitioning, checkpoints, data pipeline) imports without
TensorFlow, SeqIO or gin: the GPU machines have none of them."""

from conftest import run_cli


def test_core_imports_without_tensorflow_or_gin():
  code = ("import sys, t5lite, t5lite.trainer, t5lite.partitioning, t5lite.checkpoints, "
          "t5lite.data.pipeline, t5lite.models; "
          "heavy = sorted({m.split('.')[0] for m in sys.modules} & "
          "{'tensorflow', 'seqio', 'gin', 'tensorflow_datasets'}); "
          "print(heavy); assert not heavy, heavy")
  r = run_cli(["-c", code])
  assert r.returncode == 0, r.stdout + r.stderr
