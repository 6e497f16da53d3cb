"""The core (models, trainer, partitioning, checkpoints, data pipeline) imports without
TensorFlow, SeqIO or gin: the GPU machines have none of them. The entry points import no JAX
before they restart under the tuned host allocator."""

from conftest import run_cli


def _python(*lines: str) -> str:
  """Runs the statements `lines` in a fresh Python; asserts it succeeded; returns its stdout."""
  r = run_cli(["-c", "\n".join(lines)])
  assert r.returncode == 0, r.stdout + r.stderr
  return r.stdout


def _python_loads_none_of(packages, *lines: str):
  """Runs `lines` in a fresh Python and asserts none of the top-level `packages` got imported."""
  _python("import sys", *lines,
          f"loaded = {{m.split('.')[0] for m in sys.modules}} & {set(packages)!r}",
          "assert not loaded, sorted(loaded)")


def test_core_imports_without_tensorflow_or_gin():
  _python_loads_none_of(("tensorflow", "seqio", "gin", "tensorflow_datasets"),
                        "import t5lite, t5lite.trainer, t5lite.partitioning, t5lite.checkpoints",
                        "import t5lite.data.pipeline, t5lite.models")


def test_entry_points_restart_before_jax_loads():
  # `python -m t5lite.train` (and eval, and the benchmark) restart themselves under the tuned
  # host allocator; what they import before that restart is paid twice (JAX: ~3 s).
  _python_loads_none_of(("jax", "flax", "gin", "numpy"), "import t5lite, t5lite.train, t5lite.eval")


def test_package_names_load_on_first_use():
  out = _python(
      "import sys, t5lite",
      "assert 'jax' not in sys.modules",
      "import t5lite.models.model as model_lib, t5lite.trainer as trainer",
      "assert t5lite.Model is model_lib.Model and t5lite.train_step is trainer.train_step",
      "assert t5lite.checkpoints.Checkpointer is t5lite.Checkpointer",
      "assert set(t5lite.__all__) <= set(dir(t5lite))",
      "missing = [n for n in t5lite.__all__ if getattr(t5lite, n, None) is None]",
      "assert not missing, missing",
      "try:",
      "  t5lite.no_such_name",
      "except AttributeError as e:",
      "  print(e)")
  assert "no attribute 'no_such_name'" in out


def test_metrics_load_no_torch():
  # tensorboardX imported torch when it was installed: ~4 s of every training launch here.
  _python_loads_none_of(("torch", "tensorboardX"), "import tempfile",
                        "from t5lite.summaries import MetricsWriter",
                        "w = MetricsWriter(tempfile.mkdtemp())",
                        "w.write(1, {'loss': 1.0})",
                        "w.close()")
