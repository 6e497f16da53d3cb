"""Host memory: stop XLA:CPU from paying the kernel to zero its temp buffer on every step.

XLA:CPU allocates each execution's temporaries as one buffer and frees it at the end of the
step (decoder-125m at batch 8 x 320: one 4.45 GB buffer). glibc serves an allocation that large
with a fresh mmap and unmaps it on free, so every step the kernel faults the whole buffer back
in and zeroes it (`clear_page_erms` was 17% of all CPU samples in a decoder-125m run).

Remedies, picked by `T5LITE_HOST_MALLOC`:

* `jemalloc` (taken by `auto`, the default, when a system libjemalloc is installed, e.g. Debian's
  `libjemalloc2`): preload jemalloc with `MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1`, so
  freed pages are kept and the next step reuses them without faulting or zeroing. Resident
  memory stays at the step's peak instead of falling back between steps.
* `mimalloc` (what `auto` takes next): preload the libmimalloc of the `cmeel-mimalloc` wheel (a
  t5lite dependency on x86-64 Linux, so `pip install` brings it) with `MIMALLOC_OPTIONS`:
  allocations of any size from its arenas (by default it maps those over 2 GiB on their own and
  unmaps them on free), freed arena pages never purged, no transparent huge pages. The same
  reuse as jemalloc's for large buffers (a decoder-125m step faults nothing); in about half of
  the processes a 64 MB buffer still has ~13 MB of it faulted again each call
  (tests/test_host_malloc.py).
* `hugepages` (what `auto` falls back to): glibc with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`,
  which advises those mappings as transparent huge pages (the kernel's default THP mode,
  "madvise", honours it): 2 MB faults, 512 times fewer, but still zeroed every step, and memory
  returns to the kernel on free.
* `system`: change nothing.

Measured on 2 cores (fp32, b8 x (256+64), runs/cpu.gin):
  stock glibc -> hugepages (one process per setting, alternated): decoder-tiny 137 -> 111 ms
    (median of 4), decoder-125m 16.2 -> 13.7 s (mean of 2); page faults 1.2 million -> 3,000
    a step on decoder-125m.
  hugepages -> jemalloc (median of 30 steps, two processes each, alternated): decoder-tiny
    82-99 -> 72 ms, T5-tiny 197 -> 191 ms; decoder-125m 11.3-11.9 -> 9.9 s, with kernel time
    per step 2.3 s -> 0.02 s and resident memory 2.4 -> 7.4 GB between steps.
  hugepages / mimalloc / jemalloc (twenty-eighth session, Intel Xeon, one process each,
    alternated, two rounds): decoder-125m 10.45 / 7.38 / 7.84 s and 10.41 / 8.76 / 8.95 s a step
    (median of 4), peak resident 5.5 / 6.1 / 9.4 GB; decoder-tiny (median of 30) 78 / 69 / 58 and
    73 / 61 / 58 ms, then within this shared machine's noise (62-100 ms for each).
  mimalloc with / without transparent huge pages (decoder-125m, 6 steps in one process each):
    first step 18.5 s with 15.2 s of kernel time (compaction for 3,604 huge-page faults) / 12.7 s
    with 2.0 s (855,386 faults); then no faults and 0.02-0.04 s of kernel time a step either way,
    steps 8.7-13.1 / 8.8-10.1 s.
  Not kept: glibc with `mmap_max=0` + `arena_max=1` + a high `trim_threshold` (serve the buffer
  from a never-trimmed heap). Consecutive steps' buffers overlap briefly and small allocations
  split the freed one, so the heap grew by one temp buffer a step until the OOM killer stopped
  a run (24 GB). mimalloc with its default options unmaps allocations over 2 GiB on free (a
  decoder-125m step buffer). jemalloc itself is not on PyPI.

In front of mimalloc goes t5lite's host block cache
(`host_block_cache.c`, built with the C compiler on the first run, left out without one or with
`T5LITE_HOST_CACHE_MB=0`). XLA:CPU frees a step's buffer from another thread a little after the
step's outputs are ready, so the next step sometimes asks for its buffer before the last one is
back; mimalloc then took fresh memory, more than once (T5-small, b8 x (256+64), a 1.37 GB
buffer: faulted in again at 3-4 of the first 15 steps in each of six processes, and at steps 1,
11 and 14 of a 40-step run; on this session's VM such a step ran 8-17 s instead of ~4, at up to
45 us a fault). The cache serves requests of 16 MiB and more from address space of its own,
keeps a freed block resident, whole, for the next request it fits (at least half its size, from
any thread), and, before it takes fresh memory, returns kept blocks over its limit (default a
quarter of physical memory) to the kernel, oldest first (returning them at free() returned one
of decoder-125m's two overlapping 4.45 GB step buffers every step): with it the same runs
faulted their step buffer in twice, in the first 4 steps (the second for the overlap), and
never again (three processes). That second time came at a step of its own choosing (the
eighty-seventh session, T5-small: 368,598 and 372,037 faults, steps of 4.5 and 5.4 s in place of
~3.4, the 4th and 6th of 6 timed steps), so the cache now makes it at the second step: the first
time a block is taken again while it is the only one of its size, it faults in a spare of that
size (one `madvise` call) and keeps it, within the limit, for the overlap to take. T5-small's
second warm-up step faults 381,209 pages, then none of 12 timed steps did; decoder-125m's the
same (857,944, then none of 6). Resident memory holds one more step buffer from the second step
on, as it did from the overlap on before.

The loader reads `LD_PRELOAD` and glibc reads its tunables only when a process starts, so the
step-heavy entry points (`t5lite.train`, `t5lite.eval`, `scripts/benchmark.py`) call
`reexec_with_tuned_malloc()` first: it restarts the same command line (same PID, before any
other work) with the environment `tuned_environ` returns. An allocator the user preloads
already (jemalloc, tcmalloc, mimalloc), or a `glibc.malloc.hugetlb` tunable the user sets, wins.
In a notebook, export the variables before the kernel starts.
"""

import ctypes.util
import importlib.metadata
import os
import shutil
import sys
from typing import Optional

from t5lite.kernels import cpu_build

MODE_VAR = "T5LITE_HOST_MALLOC"
MODES = ("auto", "jemalloc", "mimalloc", "hugepages", "system")
TUNABLE = "glibc.malloc.hugetlb=1"
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
# mimalloc 3: serve allocations of any size from its arenas (by default those over 2 GiB get
# their own mapping, unmapped on free), never purge freed arena pages, and no transparent huge
# pages (the kernel compacting memory for them cost decoder-125m's first step 15 s).
MIMALLOC_OPTIONS = {"MIMALLOC_ARENA_MAX_OBJECT_SIZE": "1TiB", "MIMALLOC_PURGE_DELAY": "-1",
                    "MIMALLOC_ALLOW_THP": "0"}
MIMALLOC_DISTRIBUTION = "cmeel-mimalloc"
BLOCK_CACHE_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "host_block_cache.c")
# The most bytes of freed large blocks the block cache keeps, in MiB (default: a quarter of
# physical memory); 0 leaves the cache out.
BLOCK_CACHE_VAR = "T5LITE_HOST_CACHE_MB"


def is_glibc() -> bool:
  """Whether this process runs on glibc (the only libc that reads GLIBC_TUNABLES)."""
  try:
    return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
  except (AttributeError, ValueError, OSError):  # not Linux, or a libc without the name
    return False


def find_jemalloc():
  """The name of an installed libjemalloc that `LD_PRELOAD` can load, or None."""
  return ctypes.util.find_library("jemalloc")


def find_mimalloc():
  """The path of the libmimalloc the `cmeel-mimalloc` wheel installed (a t5lite dependency on
  x86-64 Linux), or None."""
  try:
    files = importlib.metadata.distribution(MIMALLOC_DISTRIBUTION).files or ()
  except importlib.metadata.PackageNotFoundError:
    return None
  for file in files:
    if file.name == "libmimalloc.so":
      path = str(file.locate())
      if os.path.isfile(path):
        return path
  return None


def build_block_cache(folder: Optional[str] = None) -> Optional[str]:
  """The path of t5lite's host block cache (host_block_cache.c) built as a shared library for
  `LD_PRELOAD`, compiled once per source and compiler into `folder` (default the kernels'
  `cpu_build.cache_dir()`); None off Linux, without a C compiler ($CC, `cc`, `gcc`) or where it
  fails to build (the process then runs without it)."""
  cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
  if not cc or not sys.platform.startswith("linux"):
    return None
  with open(BLOCK_CACHE_SOURCE, "rb") as f:
    text = f.read()
  flags = ("-O2", "-shared", "-fPIC", "-fvisibility=hidden")
  try:
    return cpu_build.build_once(
        "host_block_cache", text + " ".join(flags + (cc,)).encode(),
        lambda out: [cc, *flags, BLOCK_CACHE_SOURCE, "-o", out, "-ldl", "-lpthread"], folder)
  except (RuntimeError, OSError):
    return None


def block_cache_preloaded(environ) -> bool:
  """Whether `environ` preloads t5lite's host block cache."""
  return any(os.path.basename(lib).startswith("host_block_cache")
             for lib in environ.get("LD_PRELOAD", "").replace(" ", ":").split(":"))


def _mode(environ) -> str:
  mode = environ.get(MODE_VAR, "") or "auto"
  if mode not in MODES:
    raise ValueError(f"{MODE_VAR}={mode!r}: expected one of {', '.join(MODES)}")
  return mode


def _tunables(environ) -> list:
  return environ.get("GLIBC_TUNABLES", "").split(":")


def active_allocator(environ) -> str:
  """What `environ` sets up: 'jemalloc', 'mimalloc', 'hugepages', another preloaded '*malloc*',
  or 'system'."""
  for lib in filter(None, environ.get("LD_PRELOAD", "").replace(" ", ":").split(":")):
    name = os.path.basename(lib)
    for known in ("jemalloc", "mimalloc"):
      if known in name:
        return known
    if "malloc" in name:
      return name
  return "hugepages" if TUNABLE in _tunables(environ) else "system"


def _user_chose(environ) -> bool:
  """Whether the environment already preloads an allocator or sets the huge-page tunable."""
  return (active_allocator(environ) not in ("system", "hugepages")
          or any(t.split("=")[0] == "glibc.malloc.hugetlb" for t in _tunables(environ)))


def tuned_environ(environ, *, glibc: bool = True, find_jemalloc=lambda: None,
                  find_mimalloc=lambda: None, find_block_cache=lambda: None):
  """`environ` set up for the allocator `T5LITE_HOST_MALLOC` picks, or None to change nothing.

  Args:
    environ: the current environment (a mapping; not modified).
    glibc: whether the C library is glibc (`is_glibc()`).
    find_jemalloc: returns a libjemalloc `LD_PRELOAD` can load, or None (entry points pass
      this module's `find_jemalloc`; the default finds none). Called only where the mode could
      take jemalloc, as the search may run ldconfig.
    find_mimalloc: the same for libmimalloc (entry points pass `find_mimalloc`). Called only
      where the mode could take mimalloc.
    find_block_cache: returns t5lite's host block cache for `LD_PRELOAD`, or None (entry points
      pass `build_block_cache`). Called only where it goes in front of mimalloc, on glibc, and
      `T5LITE_HOST_CACHE_MB` is not 0.

  `auto` takes a system jemalloc, else the mimalloc wheel, else glibc's huge pages, and on glibc
  puts the block cache in front of mimalloc. Returns None
  for `system`, where the environment already preloads an allocator or sets the
  `glibc.malloc.hugetlb` tunable (the user's choice wins, and a re-executed process does not
  re-execute again), and for `hugepages` (or `auto` without either allocator) off glibc. Other
  entries of `LD_PRELOAD` and `GLIBC_TUNABLES` are kept, and so are allocator options already
  set (`MALLOC_CONF`, each `MIMALLOC_*` option).

  Raises:
    ValueError: for an unknown mode, or `jemalloc` / `mimalloc` asked for but not installed.
  """
  mode = _mode(environ)
  if mode == "system" or _user_chose(environ):
    return None
  if mode in ("auto", "jemalloc"):
    jemalloc = find_jemalloc()
    if jemalloc:
      return _preload(environ, jemalloc, {"MALLOC_CONF": JEMALLOC_CONF})
    if mode == "jemalloc":
      raise ValueError(f"{MODE_VAR}=jemalloc, but no libjemalloc is installed (Debian/Ubuntu: "
                       f"apt install libjemalloc2); use {MODE_VAR}=auto to fall back")
  if mode in ("auto", "mimalloc"):
    mimalloc = find_mimalloc()
    if mimalloc:
      return _with_block_cache(_preload(environ, mimalloc, MIMALLOC_OPTIONS), glibc,
                               find_block_cache)
    if mode == "mimalloc":
      raise ValueError(f"{MODE_VAR}=mimalloc, but the {MIMALLOC_DISTRIBUTION} wheel is not "
                       f"installed (pip install {MIMALLOC_DISTRIBUTION}); use {MODE_VAR}=auto "
                       "to fall back")
  if not glibc:
    return None
  current = environ.get("GLIBC_TUNABLES", "")
  # Not in front of glibc: it kept glibc's mmap threshold low, so a 13 MB buffer of the
  # tests' probe was mapped and faulted in every call (3,300 faults against <2,048).
  return dict(environ, GLIBC_TUNABLES=f"{current}:{TUNABLE}" if current else TUNABLE)


def _with_block_cache(environ, glibc: bool, find_block_cache) -> dict:
  """`environ` with the block cache first in `LD_PRELOAD`, where glibc runs, the user has not
  set `T5LITE_HOST_CACHE_MB` to 0 and it is built."""
  if not glibc or environ.get(BLOCK_CACHE_VAR, "").strip() == "0":
    return environ
  library = find_block_cache()
  return _preload(environ, library, {}) if library else environ


def _preload(environ, library: str, options) -> dict:
  """`environ` with `library` first in `LD_PRELOAD` and `options` where not set already."""
  preload = environ.get("LD_PRELOAD", "")
  tuned = dict(environ, LD_PRELOAD=f"{library}:{preload}" if preload else library)
  for name, value in options.items():
    tuned[name] = environ.get(name) or value
  return tuned


def reexec_with_tuned_malloc():
  """Restarts this process's command line under `tuned_environ`, unless it is tuned already.

  Call it first thing in an entry point's `__main__` block. Returns (doing nothing) where
  `tuned_environ` says nothing should change, or when the program came from stdin. Exits with
  status 2 and the reason (no traceback) for a `T5LITE_HOST_MALLOC` it cannot honour.
  """
  try:
    environ = tuned_environ(os.environ, glibc=is_glibc(), find_jemalloc=find_jemalloc,
                            find_mimalloc=find_mimalloc, find_block_cache=build_block_cache)
  except ValueError as e:
    print(f"t5lite: {e}", file=sys.stderr)
    sys.exit(2)
  argv = list(getattr(sys, "orig_argv", []))
  if environ is None or not argv or "-" in argv[1:2]:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, argv, environ)
