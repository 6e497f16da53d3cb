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


def test_entry_points_restart_before_jax_loads():
  # `python -m t5lite.train` (and eval, and the benchmark) restart themselves under the tuned
  # host allocator; what they import before that restart is paid twice (JAX: ~3 s).
  code = ("import sys, t5lite, t5lite.train, t5lite.eval; "
          "loaded = {m.split('.')[0] for m in sys.modules} & {'jax', 'flax', 'gin', 'numpy'}; "
          "assert not loaded, sorted(loaded)")
  r = run_cli(["-c", code])
  assert r.returncode == 0, r.stdout + r.stderr


def test_package_names_load_on_first_use():
  code = ("import sys, t5lite; assert 'jax' not in sys.modules; "
          "import t5lite.models.model as model_lib, t5lite.trainer as trainer; "
          "assert t5lite.Model is model_lib.Model and t5lite.train_step is trainer.train_step; "
          "assert t5lite.checkpoints.Checkpointer is t5lite.Checkpointer; "
          "assert set(t5lite.__all__) <= set(dir(t5lite)); "
          "missing = [n for n in t5lite.__all__ if getattr(t5lite, n, None) is None]; "
          "assert not missing, missing; "
          "exec('try:\\n  t5lite.no_such_name\\nexcept AttributeError as e:\\n  print(e)')")
  r = run_cli(["-c", code])
  assert r.returncode == 0, r.stdout + r.stderr
  assert "no attribute 'no_such_name'" in r.stdout
