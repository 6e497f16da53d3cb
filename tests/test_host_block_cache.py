"""t5lite's host block cache (t5lite/host_block_cache.c), preloaded into a Python process: large
freed blocks come back without faults, from any thread, and its limit, zeroing, realloc and fork
behave."""

import json
import os

import pytest

from conftest import run_cli
from t5lite import host_malloc

pytestmark = pytest.mark.skipif(not host_malloc.is_glibc(), reason="needs glibc")

# Runs `CHECK` (below) under the cache and prints what it found as JSON.
_PROBE = r"""
import ctypes, json, os, resource, threading
import numpy as np

libc = ctypes.CDLL(None)
for name, res, args in [("malloc", ctypes.c_void_p, [ctypes.c_size_t]),
                        ("calloc", ctypes.c_void_p, [ctypes.c_size_t, ctypes.c_size_t]),
                        ("realloc", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t]),
                        ("aligned_alloc", ctypes.c_void_p, [ctypes.c_size_t, ctypes.c_size_t]),
                        ("malloc_usable_size", ctypes.c_size_t, [ctypes.c_void_p]),
                        ("free", None, [ctypes.c_void_p]),
                        ("t5lite_host_block_cache_kept", ctypes.c_size_t, [])]:
  if hasattr(libc, name):  # the last one only where the cache is preloaded
    getattr(libc, name).restype, getattr(libc, name).argtypes = res, args
MB = 1 << 20

def view(p, n):
  return np.ctypeslib.as_array(ctypes.cast(p, ctypes.POINTER(ctypes.c_uint8)), (n,))

def faults():
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def on_thread(fn):
  out = []
  t = threading.Thread(target=lambda: out.append(fn()))
  t.start()
  t.join()
  return out[0]

found = {}
CHECK
print(json.dumps(found))
"""

# A step's buffer asked for before the last one is back, as XLA:CPU does: after two blocks are
# faulted in, every later round reuses them (one of them allocated on one thread and freed on
# another), and small requests between them do not take them apart.
_REUSE = """
size = 96 * MB
last = libc.malloc(size)
view(last, size)[:] = 1
addresses, round_faults = set(), []
for i in range(8):
  before = faults()
  p = on_thread(lambda: libc.malloc(size)) if i % 2 else libc.malloc(size)
  view(p, size)[:] = 2
  small = libc.malloc(20 * MB)
  view(small, 20 * MB)[:] = 3
  libc.free(small)
  on_thread(lambda: libc.free(last))
  last = p
  addresses.add(p)
  round_faults.append(faults() - before)
found.update(addresses=len(addresses), faults=round_faults[2:],
             kept=libc.t5lite_host_block_cache_kept())
libc.free(last)
"""


def _probe(check: str, *, cache: bool = True, **env):
  environ = {"LD_PRELOAD": "", host_malloc.BLOCK_CACHE_VAR: "", **env}
  if cache:
    library = host_malloc.build_block_cache()
    if library is None:
      pytest.skip("no C compiler to build the block cache")
    mimalloc = host_malloc.find_mimalloc()
    environ["LD_PRELOAD"] = ":".join(filter(None, [library, mimalloc]))
    environ.update(host_malloc.MIMALLOC_OPTIONS if mimalloc else {})
  r = run_cli(["-c", _PROBE.replace("CHECK", check)], env=environ, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  return json.loads(r.stdout.strip().splitlines()[-1])


def test_a_freed_block_comes_back_faulted_in_from_any_thread():
  found = _probe(_REUSE)
  assert found["addresses"] == 2, found
  assert max(found["faults"]) < 200, found  # of 24,576 pages; numpy's own allocations fault a few
  assert found["kept"] >= 96 * 2 ** 20, found  # the 20 MB block and a step buffer


def test_without_the_cache_the_probe_faults_the_blocks_in_again():
  # The same rounds with glibc's malloc, which unmaps each large block on free: the probe can
  # tell a kept block from a fresh one.
  found = _probe(_REUSE.replace("libc.t5lite_host_block_cache_kept()", "0"), cache=False)
  assert min(found["faults"]) > 20_000, found


def test_the_limit_returns_kept_blocks_to_the_kernel_before_taking_fresh_space():
  # A 32 MB limit: a freed 64 MB block stays kept and is reused; a request it cannot serve
  # returns it to the kernel before taking fresh space, so the next 64 MB request faults.
  found = _probe("""
p = libc.malloc(64 * MB)
view(p, 64 * MB)[:] = 1
libc.free(p)
found["kept"] = libc.t5lite_host_block_cache_kept()
before = faults()
q = libc.malloc(64 * MB)
view(q, 64 * MB)[:] = 1
found["reuse_faults"] = faults() - before
found["reused"] = q == p
libc.free(q)
big = libc.malloc(200 * MB)
found["kept_after_fresh"] = libc.t5lite_host_block_cache_kept()
libc.free(big)
before = faults()
p = libc.malloc(64 * MB)
view(p, 64 * MB)[:] = 1
found["faults"] = faults() - before
found["kept_at_end"] = libc.t5lite_host_block_cache_kept()
libc.free(p)
""", **{host_malloc.BLOCK_CACHE_VAR: "32"})
  assert found["kept"] == 64 << 20 and found["reused"], found
  assert found["reuse_faults"] < 200, found
  assert found["kept_after_fresh"] == 0, found  # the 64 MB block went back to the kernel
  assert found["faults"] > 15_000 and found["kept_at_end"] == 0, found  # and the 200 MB one


def test_two_overlapping_buffers_over_the_limit_are_not_faulted_in_again():
  # decoder-125m's case: the step buffer (4.45 GB) asked for before the last one is back, two of
  # them over the limit (6 GB). Evicting at free() returned one of them every step, and the
  # next overlapping step faulted it in again (917,000 faults a step, 2.3x the step time).
  found = _probe(_REUSE, **{host_malloc.BLOCK_CACHE_VAR: "100"})
  assert found["addresses"] == 2, found
  assert max(found["faults"]) < 200, found
  assert found["kept"] >= 96 << 20, found


def test_a_recurring_size_gets_a_spare_so_the_first_overlap_does_not_fault():
  # A step buffer freed after each step (here on another thread), then asked for before the
  # last one is back: the first reuse faults in a spare of its size, which the overlap takes.
  found = _probe("""
size = 96 * MB
a = libc.malloc(size)
view(a, size)[:] = 1
on_thread(lambda: libc.free(a))
found["kept_before"] = libc.t5lite_host_block_cache_kept()
a2 = libc.malloc(size)           # the kept block again: its size recurs
view(a2, size)[:] = 2
found["same"] = a2 == a
found["kept_spare"] = libc.t5lite_host_block_cache_kept()
before = faults()
b = libc.malloc(size)            # before a2 is back
view(b, size)[:] = 3
found["overlap_faults"] = faults() - before
found["distinct"] = b not in (a, 0)
libc.free(a2)
libc.free(b)
c = libc.malloc(size)            # two blocks of the size now: no further spare
found["kept_beside_two"] = libc.t5lite_host_block_cache_kept()
libc.free(c)
""")
  assert found["same"] and found["distinct"], found
  assert found["kept_before"] == 96 << 20 and found["kept_spare"] == 96 << 20, found
  assert found["overlap_faults"] < 200, found  # of 24,576 pages
  assert found["kept_beside_two"] == 96 << 20, found


def test_no_spare_beyond_the_limit():
  # With a 64 MB limit, a 96 MB spare would keep more than the limit: none is made, and the
  # overlap takes fresh space (faulted in), as it did before spares.
  found = _probe("""
size = 96 * MB
a = libc.malloc(size)
view(a, size)[:] = 1
libc.free(a)
a = libc.malloc(size)
found["kept"] = libc.t5lite_host_block_cache_kept()
before = faults()
b = libc.malloc(size)
view(b, size)[:] = 2
found["overlap_faults"] = faults() - before
libc.free(a)
libc.free(b)
""", **{host_malloc.BLOCK_CACHE_VAR: "64"})
  assert found["kept"] == 0 and found["overlap_faults"] > 20_000, found


def test_calloc_zeroes_a_kept_block_and_realloc_keeps_contents():
  found = _probe("""
p = libc.malloc(40 * MB)
view(p, 40 * MB)[:] = 7
libc.free(p)
q = libc.calloc(10, 4 * MB)
found["reused"] = q == p
found["zero"] = not view(q, 40 * MB).any()
view(q, 40 * MB)[:] = np.arange(40 * MB, dtype=np.uint64).astype(np.uint8)
r = libc.realloc(q, 100 * MB)
found["usable"] = libc.malloc_usable_size(r)
found["moved_intact"] = bool((view(r, 40 * MB) ==
                              np.arange(40 * MB, dtype=np.uint64).astype(np.uint8)).all())
found["shrunk_in_place"] = libc.realloc(r, 50 * MB) == r
a = libc.aligned_alloc(1 << 21, 30 * MB)
found["aligned"] = a % (1 << 21) == 0
libc.free(a)
libc.free(r)
small = libc.malloc(1000)
found["small_usable"] = libc.malloc_usable_size(small) >= 1000
libc.free(small)
""")
  assert found == {"reused": True, "zero": True, "usable": 100 * 2 ** 20, "moved_intact": True,
                   "shrunk_in_place": True, "aligned": True, "small_usable": True}, found


def test_a_kept_block_serves_requests_of_at_least_half_its_size():
  found = _probe("""
big = libc.malloc(200 * MB)
view(big, 200 * MB)[:] = 7
libc.free(big)
small = libc.malloc(64 * MB)  # too small for it: fresh space, the kept block left whole
view(small, 64 * MB)[:] = 7
libc.free(small)
found["small_elsewhere"] = small != big
found["kept_mb"] = libc.t5lite_host_block_cache_kept() // MB
again = libc.calloc(1, 150 * MB)
found["big_again"] = again == big
found["zero"] = not view(again, 150 * MB).any()
libc.free(again)
""")
  assert found == {"small_elsewhere": True, "kept_mb": 264, "big_again": True, "zero": True}


def test_small_blocks_freed_beside_a_kept_big_one_are_reused():
  # T5-tiny's benchmark step, before kept blocks stopped merging: each 16 MB request took fresh
  # space, and its freed block merged into the kept step buffer beside it (54,000 faults and
  # 2.5 s of kernel time a step). The second round faults in the 16 MB block's spare.
  found = _probe("""
big = libc.malloc(300 * MB)
view(big, 300 * MB)[:] = 1
libc.free(big)
addresses, round_faults = set(), []
for i in range(6):
  before = faults()
  p = libc.malloc(16 * MB)
  view(p, 16 * MB)[:] = 1
  libc.free(p)
  addresses.add(p)
  round_faults.append(faults() - before)
found.update(addresses=len(addresses), faults=round_faults[2:], spare=round_faults[1])
""")
  assert found["addresses"] == 1 and max(found["faults"]) < 200, found
  assert found["spare"] >= (16 << 20) // os.sysconf("SC_PAGE_SIZE"), found  # 16 MB of pages


def test_threads_and_fork():
  found = _probe("""
import random
def work(seed):
  rng = random.Random(seed)
  held = []
  for i in range(60):
    size = rng.choice([1000, 5 * MB, 17 * MB, 33 * MB, 70 * MB])
    p = libc.malloc(size)
    view(p, size)[::4096] = seed
    held.append((p, size))
    if len(held) > 3:
      q, n = held.pop(rng.randrange(len(held)))
      assert (view(q, n)[::4096] == seed).all(), "a block changed under its owner"
      libc.free(q)
  for q, n in held:
    libc.free(q)
  return True
threads = [threading.Thread(target=work, args=(s,)) for s in range(1, 7)]
for t in threads:
  t.start()
pid = os.fork()
if pid == 0:  # the child allocates while the parent's threads hold and release the lock
  p = libc.malloc(50 * MB)
  libc.free(p)
  os._exit(0)
_, status = os.waitpid(pid, 0)
for t in threads:
  t.join()
found["child_status"] = status
found["kept"] = libc.t5lite_host_block_cache_kept()
""")
  assert found["child_status"] == 0 and found["kept"] > 0, found


def test_freeing_a_pointer_inside_a_block_aborts_with_a_message():
  library = host_malloc.build_block_cache()
  if library is None:
    pytest.skip("no C compiler to build the block cache")
  r = run_cli(["-c", _PROBE.replace("CHECK", "libc.free(libc.malloc(32 * MB) + 4096)")],
              env={"LD_PRELOAD": library}, timeout=120)
  assert r.returncode != 0 and "free() of a pointer it did not allocate" in r.stderr


def test_the_entry_points_preload_it_in_front_of_the_allocator():
  lib = "/cache/host_block_cache-0123.so"
  mimalloc = "/venv/lib/libmimalloc.so"
  env = host_malloc.tuned_environ({"LD_PRELOAD": "libfoo.so"}, find_mimalloc=lambda: mimalloc,
                                  find_block_cache=lambda: lib)
  assert env["LD_PRELOAD"] == f"{lib}:{mimalloc}:libfoo.so"
  assert host_malloc.active_allocator(env) == "mimalloc"
  assert host_malloc.block_cache_preloaded(env)
  off = host_malloc.tuned_environ({host_malloc.BLOCK_CACHE_VAR: "0"},
                                  find_mimalloc=lambda: mimalloc, find_block_cache=lambda: lib)
  assert off["LD_PRELOAD"] == mimalloc and not host_malloc.block_cache_preloaded(off)
  # Not in front of jemalloc (its freed extents serve any thread), glibc's huge pages (it kept
  # glibc's mmap threshold low), nor off glibc.
  must_not_build = lambda: pytest.fail("the block cache built where it is not used")
  env = host_malloc.tuned_environ({host_malloc.MODE_VAR: "hugepages"},
                                  find_block_cache=must_not_build)
  assert "LD_PRELOAD" not in env and host_malloc.active_allocator(env) == "hugepages"
  env = host_malloc.tuned_environ({}, find_jemalloc=lambda: "libjemalloc.so.2",
                                  find_block_cache=must_not_build)
  assert env["LD_PRELOAD"] == "libjemalloc.so.2"
  env = host_malloc.tuned_environ({}, glibc=False, find_mimalloc=lambda: mimalloc,
                                  find_block_cache=must_not_build)
  assert env["LD_PRELOAD"] == mimalloc


def test_build_block_cache_builds_once_and_gives_none_without_a_compiler(tmp_path, monkeypatch):
  first = host_malloc.build_block_cache(str(tmp_path))
  if first is None:
    pytest.skip("no C compiler to build the block cache")
  stamp = os.stat(first).st_mtime_ns
  assert host_malloc.build_block_cache(str(tmp_path)) == first
  assert os.stat(first).st_mtime_ns == stamp
  monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
  assert host_malloc.build_block_cache(str(tmp_path / "other")) is None
  monkeypatch.setenv("CC", "false")
  assert host_malloc.build_block_cache(str(tmp_path / "other")) is None
  assert not [n for n in os.listdir(tmp_path / "other") if n.endswith(".so")]
