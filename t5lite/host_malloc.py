"""Host memory: let glibc back large allocations with transparent huge pages.

XLA:CPU allocates each execution's temporaries as one buffer and frees it at the end of the
step (decoder-125m at batch 8 x 320: about 5 GB). glibc serves an allocation that large with a
fresh mmap and unmaps it on free, so every step faults its whole temp buffer back in, one 4 KB
page at a time: 1.2 million minor faults a step for decoder-125m, 30,000 for decoder-tiny, about
a sixth of the step. With the glibc tunable `glibc.malloc.hugetlb=1` those mappings
are advised as transparent huge pages (the kernel's default THP mode, "madvise", honours it) and
the same step takes 2 MB pages, 512 times fewer faults. Memory is still returned to the kernel
on free, so the footprint is unchanged.

Measured on 2 cores (fp32, b8 x (256+64), runs/cpu.gin, one process per setting, alternated):
  decoder-tiny 137 -> 111 ms (median of 4), decoder-125m 16.2 -> 13.7 s (mean of 2).
  HF eager torch gains too where it has tensors over glibc's 32 MB mmap threshold (logits).
  Not kept: `mmap_max=0` + `arena_max=1` + a high `trim_threshold`
  (serve everything from a never-trimmed main heap): faster than stock but slower than huge
  pages on decoder-125m, and its heap grew until the OOM killer stopped one run (24 GB RSS).

glibc reads tunables only when a process starts, so the step-heavy entry points
(`t5lite.train`, `t5lite.eval`, `scripts/benchmark.py`) call
`reexec_with_tuned_malloc()` first: it restarts the same command line (same PID, before any
other work) with the tunable added to `GLIBC_TUNABLES`. Set `T5LITE_HOST_MALLOC=system` to opt
out; in a notebook, export `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` before starting the kernel.
"""

import os
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT_VAR = "T5LITE_HOST_MALLOC"


def _is_glibc() -> bool:
  try:
    return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
  except (AttributeError, ValueError, OSError):  # not Linux, or a libc without the name
    return False


def tuned_environ(environ, *, glibc: bool = True):
  """`environ` with the huge-page tunable added, or None where it does not apply.

  None when the C library is not glibc, when `T5LITE_HOST_MALLOC=system` opts out, or when
  `GLIBC_TUNABLES` already sets `glibc.malloc.hugetlb` (the user's value wins, and a re-executed
  process does not re-execute again). Other tunables in `GLIBC_TUNABLES` are kept.
  """
  if not glibc or environ.get(OPT_OUT_VAR, "") == "system":
    return None
  current = environ.get("GLIBC_TUNABLES", "")
  if any(t.split("=")[0] == "glibc.malloc.hugetlb" for t in current.split(":")):
    return None
  return dict(environ, GLIBC_TUNABLES=f"{current}:{TUNABLE}" if current else TUNABLE)


def reexec_with_tuned_malloc():
  """Restarts this process's command line with `TUNABLE` set, if it is not set already.

  Call it first thing in an entry point's `__main__` block. Returns (doing nothing) where
  `tuned_environ` says the tunable does not apply, or when the program came from stdin.
  """
  environ = tuned_environ(os.environ, glibc=_is_glibc())
  argv = list(getattr(sys, "orig_argv", []))
  if environ is None or not argv or "-" in argv[1:2]:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, argv, environ)
