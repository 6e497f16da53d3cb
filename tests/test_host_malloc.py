"""host_malloc: the allocator is set up once, and XLA:CPU's temp buffer stops faulting per step."""

import json

import pytest

from conftest import run_cli
from t5lite import host_malloc


def test_tuned_environ_adds_the_tunable_once_and_keeps_others():
  env = host_malloc.tuned_environ({"PATH": "/bin"})
  assert env == {"PATH": "/bin", "GLIBC_TUNABLES": host_malloc.TUNABLE}
  env = host_malloc.tuned_environ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
  assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{host_malloc.TUNABLE}"
  assert host_malloc.active_allocator(env) == "hugepages"
  assert host_malloc.tuned_environ(env) is None  # already there: the re-executed run stops
  assert host_malloc.tuned_environ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None
  assert host_malloc.tuned_environ({host_malloc.MODE_VAR: "system"}) is None
  assert host_malloc.tuned_environ({}, glibc=False) is None


def test_tuned_environ_prefers_jemalloc_where_installed_and_keeps_the_users_choices():
  lib = "libjemalloc.so.2"
  found = lambda: lib

  def must_not_look():
    raise AssertionError("find_jemalloc called where the answer cannot matter")

  env = host_malloc.tuned_environ({"PATH": "/bin"}, find_jemalloc=found)
  assert env == {"PATH": "/bin", "LD_PRELOAD": lib, "MALLOC_CONF": host_malloc.JEMALLOC_CONF}
  assert host_malloc.active_allocator(env) == "jemalloc"
  assert host_malloc.tuned_environ(env, find_jemalloc=must_not_look) is None  # re-executed: stop
  env = host_malloc.tuned_environ({"LD_PRELOAD": "libfoo.so", "MALLOC_CONF": "narenas:2"},
                                  find_jemalloc=found, glibc=False)
  assert env["LD_PRELOAD"] == f"{lib}:libfoo.so" and env["MALLOC_CONF"] == "narenas:2"
  # An allocator the user preloads, or the huge-page tunable they set, wins.
  tcmalloc = {"LD_PRELOAD": "/opt/libtcmalloc.so.4"}
  assert host_malloc.tuned_environ(tcmalloc, find_jemalloc=must_not_look) is None
  assert host_malloc.active_allocator(tcmalloc) == "libtcmalloc.so.4"
  hugetlb = {"GLIBC_TUNABLES": host_malloc.TUNABLE}
  assert host_malloc.tuned_environ(hugetlb, find_jemalloc=must_not_look) is None
  # Modes: hugepages skips jemalloc; jemalloc without the library is an error, not a fallback.
  env = host_malloc.tuned_environ({host_malloc.MODE_VAR: "hugepages"}, find_jemalloc=must_not_look)
  assert host_malloc.active_allocator(env) == "hugepages" and "LD_PRELOAD" not in env
  with pytest.raises(ValueError, match="apt install libjemalloc2"):
    host_malloc.tuned_environ({host_malloc.MODE_VAR: "jemalloc"}, find_jemalloc=lambda: None)
  with pytest.raises(ValueError, match="expected one of auto, jemalloc, hugepages, system"):
    host_malloc.tuned_environ({host_malloc.MODE_VAR: "tcmalloc"}, find_jemalloc=found)
  assert host_malloc.active_allocator({}) == "system"


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
with open("/proc/self/maps", encoding="utf-8") as m:
  mapped = "libjemalloc" in m.read()
print(json.dumps({"allocator": host_malloc.active_allocator(os.environ), "jemalloc_mapped": mapped,
                  "tunables": os.environ.get("GLIBC_TUNABLES", ""), "faults": faults}))
"""


def _thp_mode():
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="utf-8") as f:
      return f.read().split("[")[1].split("]")[0]
  except (OSError, IndexError):
    return "never"


_CLEAN = {"GLIBC_TUNABLES": "", "LD_PRELOAD": "", "MALLOC_CONF": "", host_malloc.MODE_VAR: ""}
_PAGES = 65536 * 256 * 4 // 4096  # of the probe's temp buffer, in 4 KB pages


def _probe(**env):
  r = run_cli(["-c", _PROBE], env=dict(_CLEAN, **env), timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not host_malloc.is_glibc() or _thp_mode() == "never",
                    reason="needs glibc and transparent huge pages")
def test_reexec_with_hugepages_cuts_the_temp_buffers_faults_512_fold():
  tuned = _probe(**{host_malloc.MODE_VAR: "hugepages"})
  assert tuned["allocator"] == "hugepages" and tuned["tunables"] == host_malloc.TUNABLE
  assert not tuned["jemalloc_mapped"]
  assert tuned["faults"] < _PAGES / 8, tuned
  if _thp_mode() == "madvise":  # with THP "always" the stock allocator gets huge pages too
    stock = _probe(**{host_malloc.MODE_VAR: "system"})
    assert stock["allocator"] == "system" and stock["tunables"] == ""
    assert stock["faults"] > _PAGES / 2, stock


@pytest.mark.skipif(not host_malloc.is_glibc(), reason="needs glibc")
def test_reexec_by_default_takes_jemalloc_where_installed_else_hugepages():
  auto = _probe()
  if host_malloc.find_jemalloc():
    assert auto["allocator"] == "jemalloc" and auto["jemalloc_mapped"], auto
    assert auto["faults"] < _PAGES / 64, auto  # freed pages are kept and reused: no faults
  else:
    assert auto["allocator"] == "hugepages" and not auto["jemalloc_mapped"], auto
    r = run_cli(["-c", _PROBE], env=dict(_CLEAN, **{host_malloc.MODE_VAR: "jemalloc"}))
    assert r.returncode != 0 and "apt install libjemalloc2" in r.stderr
