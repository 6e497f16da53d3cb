"""host_malloc: the huge-page tunable is added once, and cuts XLA:CPU's per-step page faults."""

import json

import pytest

from conftest import run_cli
from t5lite import host_malloc


def test_tuned_environ_adds_the_tunable_once_and_keeps_others():
  env = host_malloc.tuned_environ({"PATH": "/bin"})
  assert env == {"PATH": "/bin", "GLIBC_TUNABLES": host_malloc.TUNABLE}
  env = host_malloc.tuned_environ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
  assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{host_malloc.TUNABLE}"
  assert host_malloc.tuned_environ(env) is None  # already there: the re-executed run stops
  assert host_malloc.tuned_environ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None
  assert host_malloc.tuned_environ({host_malloc.OPT_OUT_VAR: "system"}) is None
  assert host_malloc.tuned_environ({}, glibc=False) is None


# Re-executes like an entry point, then runs a jitted function whose 64 MB intermediate
# ([65536, 256] float32, contracted over its first axis by a second matmul) is an XLA:CPU temp
# buffer, and reports the minor page faults per call.
_PROBE = """
import json, os, resource
from t5lite import host_malloc
host_malloc.reexec_with_tuned_malloc()
import jax, jax.numpy as jnp
x = jnp.ones((65536, 64), jnp.float32)
w1 = jnp.full((64, 256), 0.01, jnp.float32)
f = jax.jit(lambda x: jnp.tanh(x @ w1).T @ x)
assert f.lower(x).compile().memory_analysis().temp_size_in_bytes >= 2 ** 26
for _ in range(3):
  f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
  f(x).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
print(json.dumps({"tunables": os.environ.get("GLIBC_TUNABLES", ""), "faults": faults}))
"""


def _thp_mode():
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="utf-8") as f:
      return f.read().split("[")[1].split("]")[0]
  except (OSError, IndexError):
    return "never"


@pytest.mark.skipif(not host_malloc._is_glibc() or _thp_mode() == "never",  # pylint: disable=protected-access
                    reason="needs glibc and transparent huge pages")
def test_reexec_sets_the_tunable_and_temp_buffers_stop_faulting_page_by_page():
  def probe(env):
    r = run_cli(["-c", _PROBE], env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])

  pages = 65536 * 256 * 4 // 4096  # of the temp buffer, in 4 KB pages
  tuned = probe({"GLIBC_TUNABLES": ""})
  assert tuned["tunables"] == host_malloc.TUNABLE
  assert tuned["faults"] < pages / 8, tuned
  if _thp_mode() == "madvise":  # with THP "always" the stock allocator gets huge pages too
    stock = probe({host_malloc.OPT_OUT_VAR: "system", "GLIBC_TUNABLES": ""})
    assert stock["tunables"] == ""
    assert stock["faults"] > pages / 2, stock
