"""Host memory: stop XLA:CPU from paying the kernel to zero its temp buffer on every step.

XLA:CPU allocates each execution's temporaries as one buffer and frees it at the end of the
step (decoder-125m at batch 8 x 320: one 4.45 GB buffer). glibc serves an allocation that large
with a fresh mmap and unmaps it on free, so every step the kernel faults the whole buffer back
in and zeroes it (`clear_page_erms` was 17% of all CPU samples in a decoder-125m run).

Two remedies, picked by `T5LITE_HOST_MALLOC`:

* `jemalloc` (taken by `auto`, the default, when a system libjemalloc is installed, e.g. Debian's
  `libjemalloc2`): preload jemalloc with `MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1`, so
  freed pages are kept and the next step reuses them without faulting or zeroing. Resident
  memory stays at the step's peak instead of falling back between steps.
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
  Not kept: glibc with `mmap_max=0` + `arena_max=1` + a high `trim_threshold` (serve the buffer
  from a never-trimmed heap). Consecutive steps' buffers overlap briefly and small allocations
  split the freed one, so the heap grew by one temp buffer a step until the OOM killer stopped
  a run (24 GB). mimalloc (from PyPI) returns allocations this large to the kernel whatever its
  options. jemalloc itself is not on PyPI, so it cannot be a dependency.

The loader reads `LD_PRELOAD` and glibc reads its tunables only when a process starts, so the
step-heavy entry points (`t5lite.train`, `t5lite.eval`, `scripts/benchmark.py`) call
`reexec_with_tuned_malloc()` first: it restarts the same command line (same PID, before any
other work) with the environment `tuned_environ` returns. An allocator the user preloads
already (jemalloc, tcmalloc, mimalloc), or a `glibc.malloc.hugetlb` tunable the user sets, wins.
In a notebook, export the variables before the kernel starts.
"""

import ctypes.util
import os
import sys

MODE_VAR = "T5LITE_HOST_MALLOC"
MODES = ("auto", "jemalloc", "hugepages", "system")
TUNABLE = "glibc.malloc.hugetlb=1"
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"


def is_glibc() -> bool:
  """Whether this process runs on glibc (the only libc that reads GLIBC_TUNABLES)."""
  try:
    return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
  except (AttributeError, ValueError, OSError):  # not Linux, or a libc without the name
    return False


def find_jemalloc():
  """The name of an installed libjemalloc that `LD_PRELOAD` can load, or None."""
  return ctypes.util.find_library("jemalloc")


def _mode(environ) -> str:
  mode = environ.get(MODE_VAR, "") or "auto"
  if mode not in MODES:
    raise ValueError(f"{MODE_VAR}={mode!r}: expected one of {', '.join(MODES)}")
  return mode


def _tunables(environ) -> list:
  return environ.get("GLIBC_TUNABLES", "").split(":")


def active_allocator(environ) -> str:
  """What `environ` sets up: 'jemalloc', 'hugepages', another preloaded '*malloc*', or 'system'."""
  for lib in filter(None, environ.get("LD_PRELOAD", "").replace(" ", ":").split(":")):
    name = os.path.basename(lib)
    if "malloc" in name:
      return "jemalloc" if "jemalloc" in name else name
  return "hugepages" if TUNABLE in _tunables(environ) else "system"


def _user_chose(environ) -> bool:
  """Whether the environment already preloads an allocator or sets the huge-page tunable."""
  return (active_allocator(environ) not in ("system", "hugepages")
          or any(t.split("=")[0] == "glibc.malloc.hugetlb" for t in _tunables(environ)))


def tuned_environ(environ, *, glibc: bool = True, find_jemalloc=lambda: None):
  """`environ` set up for the allocator `T5LITE_HOST_MALLOC` picks, or None to change nothing.

  Args:
    environ: the current environment (a mapping; not modified).
    glibc: whether the C library is glibc (`is_glibc()`).
    find_jemalloc: returns a libjemalloc `LD_PRELOAD` can load, or None (entry points pass
      this module's `find_jemalloc`; the default finds none). Called only where the mode could
      take jemalloc, as the search may run ldconfig.

  Returns None for `system`, where the environment already preloads an allocator or sets the
  `glibc.malloc.hugetlb` tunable (the user's choice wins, and a re-executed process does not
  re-execute again), and for `hugepages` (or `auto` without jemalloc) off glibc. Other entries of
  `LD_PRELOAD` and `GLIBC_TUNABLES` are kept; a `MALLOC_CONF` already set is kept.

  Raises:
    ValueError: for an unknown mode, or `jemalloc` asked for but not installed.
  """
  mode = _mode(environ)
  if mode == "system" or _user_chose(environ):
    return None
  jemalloc = find_jemalloc() if mode in ("auto", "jemalloc") else None
  if jemalloc:
    preload = environ.get("LD_PRELOAD", "")
    return dict(environ, LD_PRELOAD=f"{jemalloc}:{preload}" if preload else jemalloc,
                MALLOC_CONF=environ.get("MALLOC_CONF") or JEMALLOC_CONF)
  if mode == "jemalloc":
    raise ValueError(f"{MODE_VAR}=jemalloc, but no libjemalloc is installed (Debian/Ubuntu: "
                     f"apt install libjemalloc2); use {MODE_VAR}=auto to fall back to huge pages")
  if not glibc:
    return None
  current = environ.get("GLIBC_TUNABLES", "")
  return dict(environ, GLIBC_TUNABLES=f"{current}:{TUNABLE}" if current else TUNABLE)


def reexec_with_tuned_malloc():
  """Restarts this process's command line under `tuned_environ`, unless it is tuned already.

  Call it first thing in an entry point's `__main__` block. Returns (doing nothing) where
  `tuned_environ` says nothing should change, or when the program came from stdin.
  """
  environ = tuned_environ(os.environ, glibc=is_glibc(), find_jemalloc=find_jemalloc)
  argv = list(getattr(sys, "orig_argv", []))
  if environ is None or not argv or "-" in argv[1:2]:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, argv, environ)
