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


def must_not_look():
  """A find_jemalloc / find_mimalloc for calls where the answer cannot matter."""
  raise AssertionError("an allocator searched for where the answer cannot matter")


def test_tuned_environ_prefers_jemalloc_where_installed_and_keeps_the_users_choices():
  lib = "libjemalloc.so.2"
  found = lambda: lib

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
  with pytest.raises(ValueError, match="expected one of auto, jemalloc, mimalloc, hugepages, system"):
    host_malloc.tuned_environ({host_malloc.MODE_VAR: "tcmalloc"}, find_jemalloc=found)
  assert host_malloc.active_allocator({}) == "system"


def test_tuned_environ_takes_the_mimalloc_wheel_where_no_jemalloc_is_installed():
  lib = "/venv/site-packages/cmeel.prefix/lib/libmimalloc.so"
  found = lambda: lib

  env = host_malloc.tuned_environ({"PATH": "/bin"}, find_mimalloc=found)
  assert env == {"PATH": "/bin", "LD_PRELOAD": lib, **host_malloc.MIMALLOC_OPTIONS}
  assert host_malloc.active_allocator(env) == "mimalloc"
  assert host_malloc.tuned_environ(env, find_jemalloc=must_not_look,
                                   find_mimalloc=must_not_look) is None  # re-executed: stop
  # A system jemalloc comes first; the mimalloc mode does not look for it.
  jemalloc = host_malloc.tuned_environ({}, find_jemalloc=lambda: "libjemalloc.so.2",
                                       find_mimalloc=must_not_look)
  assert host_malloc.active_allocator(jemalloc) == "jemalloc"
  env = host_malloc.tuned_environ({host_malloc.MODE_VAR: "mimalloc", "LD_PRELOAD": "libfoo.so",
                                   "MIMALLOC_PURGE_DELAY": "100"},
                                  find_jemalloc=must_not_look, find_mimalloc=found, glibc=False)
  assert env["LD_PRELOAD"] == f"{lib}:libfoo.so" and env["MIMALLOC_PURGE_DELAY"] == "100"
  assert env["MIMALLOC_ARENA_MAX_OBJECT_SIZE"] == "1TiB"
  # The hugepages mode looks for neither; mimalloc without the wheel is an error.
  env = host_malloc.tuned_environ({host_malloc.MODE_VAR: "hugepages"},
                                  find_jemalloc=must_not_look, find_mimalloc=must_not_look)
  assert host_malloc.active_allocator(env) == "hugepages"
  with pytest.raises(ValueError, match="pip install cmeel-mimalloc"):
    host_malloc.tuned_environ({host_malloc.MODE_VAR: "mimalloc"}, find_jemalloc=must_not_look)


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
  maps = m.read()
print(json.dumps({"allocator": host_malloc.active_allocator(os.environ),
                  "block_cache": host_malloc.block_cache_preloaded(os.environ),
                  "mapped": [a for a in ("jemalloc", "mimalloc") if f"lib{a}" in maps],
                  "tunables": os.environ.get("GLIBC_TUNABLES", ""), "faults": faults}))
"""


def _thp_mode():
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="utf-8") as f:
      return f.read().split("[")[1].split("]")[0]
  except (OSError, IndexError):
    return "never"


_CLEAN = {"GLIBC_TUNABLES": "", "LD_PRELOAD": "", "MALLOC_CONF": "", host_malloc.MODE_VAR: "",
          host_malloc.BLOCK_CACHE_VAR: "", **{name: "" for name in host_malloc.MIMALLOC_OPTIONS}}
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
  assert not tuned["mapped"]
  assert tuned["faults"] < _PAGES / 8, tuned
  if _thp_mode() == "madvise":  # with THP "always" the stock allocator gets huge pages too
    stock = _probe(**{host_malloc.MODE_VAR: "system"})
    assert stock["allocator"] == "system" and stock["tunables"] == ""
    assert stock["faults"] > _PAGES / 2, stock


@pytest.mark.skipif(not host_malloc.is_glibc(), reason="needs glibc")
def test_reexec_by_default_takes_jemalloc_else_the_mimalloc_wheel_else_hugepages():
  expected = ("jemalloc" if host_malloc.find_jemalloc() else
              "mimalloc" if host_malloc.find_mimalloc() else "hugepages")
  auto = _probe()
  assert auto["allocator"] == expected, auto
  if expected == "hugepages":
    assert not auto["mapped"], auto
  else:
    assert auto["mapped"] == [expected], auto
  # t5lite's block cache goes in front of mimalloc only.
  cached = expected == "mimalloc" and host_malloc.build_block_cache() is not None
  assert auto["block_cache"] == cached, auto
  # Freed pages are kept and reused. jemalloc: no faults. mimalloc, in about half of the
  # processes, faults ~3,300 pages again each call (13 MB; 0-40 in the others), with the block
  # cache in front too (so not the 64 MB buffer, which the cache keeps): measured, not
  # understood; glibc faults all of them.
  assert auto["faults"] < (_PAGES / 64 if expected == "jemalloc" else _PAGES / 4), auto
  if expected == "mimalloc":
    alone = _probe(**{host_malloc.BLOCK_CACHE_VAR: "0"})
    assert not alone["block_cache"] and alone["mapped"] == ["mimalloc"], alone
    assert alone["faults"] < _PAGES / 4, alone
  if not host_malloc.find_jemalloc():
    r = run_cli(["-c", _PROBE], env=dict(_CLEAN, **{host_malloc.MODE_VAR: "jemalloc"}))
    assert r.returncode == 2 and "apt install libjemalloc2" in r.stderr
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
  r = run_cli(["-c", _PROBE], env=dict(_CLEAN, **{host_malloc.MODE_VAR: "tcmalloc"}))
  assert r.returncode == 2 and "expected one of auto" in r.stderr and "Traceback" not in r.stderr


# Re-executes like an entry point, then allocates, touches and frees a buffer of 2.25 GiB (as
# large as a bigger model's step buffer, above mimalloc's default 2 GiB limit for its arenas)
# three times, and reports the minor page faults of the last two rounds.
_BIG_PROBE = """
import ctypes, json, os, resource
from t5lite import host_malloc
host_malloc.reexec_with_tuned_malloc()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
size = 9 * 2 ** 28
for i in range(3):
  if i == 1:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  buffer = libc.malloc(size)
  assert buffer
  libc.memset(buffer, 1, size)
  libc.free(buffer)
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 2
print(json.dumps({"allocator": host_malloc.active_allocator(os.environ), "faults": faults}))
"""


@pytest.mark.skipif(not host_malloc.find_mimalloc(), reason="needs the cmeel-mimalloc wheel")
def test_mimalloc_keeps_a_freed_buffer_over_2_gib():
  def probe(**env):
    r = run_cli(["-c", _BIG_PROBE], env=dict(_CLEAN, **{host_malloc.MODE_VAR: "mimalloc",
                                                         host_malloc.BLOCK_CACHE_VAR: "0"}, **env),
                timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])

  tuned = probe()
  assert tuned["allocator"] == "mimalloc" and tuned["faults"] < 64, tuned
  # mimalloc's own limit (kept: an option the user sets wins) maps and unmaps it every round.
  stock = probe(MIMALLOC_ARENA_MAX_OBJECT_SIZE="2GiB")
  assert stock["faults"] > 9 * 2 ** 28 / 2 ** 21 / 2, stock
