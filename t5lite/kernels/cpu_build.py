"""Compiles t5lite's C++ kernels for XLA:CPU and caches them: cpu_attention.cc with cpu_matmul.cc
(one library), cpu_transpose.cc.

A kernel's sources are compiled on first use (the attention and matmul library in 11-13 s on
2 cores) with the host's C++ compiler (`g++`, or $CXX) against JAX's XLA FFI headers into
`kernels/` of t5lite's cache directory ($T5LITE_CACHE_DIR, else ~/.cache/t5lite), keyed by the
sources, the compiler, its flags, the JAX version and the CPU's features, so that a cache
directory shared by different CPUs (a home folder on NFS) holds one library each. The library in
the cache is loaded and run: like JAX's compilation cache, a cache directory others can write to
lets them run code as you.
"""

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from typing import Optional, Sequence

FLAGS = ("-O3", "-fno-math-errno", "-std=c++17", "-shared", "-fPIC", "-DNDEBUG")


def cache_dir() -> str:
  """Where built kernels are kept: `kernels/` of $T5LITE_CACHE_DIR, else of ~/.cache/t5lite."""
  return os.path.join(os.path.expanduser(os.environ.get("T5LITE_CACHE_DIR") or "~/.cache/t5lite"),
                      "kernels")


def cpu_features() -> str:
  """What -march=native compiles for: the CPU's feature flags (Linux), else its architecture."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("flags"):
          return line
  except OSError:
    pass
  return platform.machine()


def cpu_flags() -> Optional[frozenset]:
  """The CPU's feature flags (Linux's names: "avx2", "avx512f", ...), or None where
  /proc/cpuinfo does not list them."""
  features = cpu_features()
  return frozenset(features.split(":", 1)[1].split()) if features.startswith("flags") else None


def compiler_flags(march: Optional[str]) -> tuple:
  """FLAGS, with -march=`march` unless it is None (a build for any CPU of the architecture)."""
  return FLAGS + (("-march=" + march,) if march else ())


def headers(source: str) -> list:
  """The headers beside a kernel's source (it includes them as "name.h"), sorted: part of what
  its build is keyed by."""
  folder = os.path.dirname(os.path.abspath(source))
  return sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".h"))


def compiler() -> Optional[str]:
  """The C++ compiler kernels are built with: $CXX, else `g++` or `c++` on the PATH; None if
  there is none."""
  return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def build_once(name: str, key: bytes, command, folder: Optional[str] = None, *,
               before: Sequence[Sequence[str]] = ()) -> str:
  """The shared library `name`-<hash of `key`>.so in `folder` (default `cache_dir()`), built
  by running `command(out)` (the compiler's argument list, writing to `out`) unless it is
  already there; the commands `before` (argument lists: the sources' object files that
  `command` links) run first, side by side. The library appears atomically, so concurrent
  builders leave one complete library. Raises RuntimeError (with the compiler's message) when
  a command fails or names no program, OSError when the folder cannot be written."""
  folder = folder or cache_dir()
  path = os.path.join(folder, f"{name}-{hashlib.sha256(key).hexdigest()[:16]}.so")
  if os.path.exists(path):
    return path
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
  os.close(fd)
  try:
    _run_side_by_side(before)
    _run_side_by_side([command(tmp)])
  except RuntimeError:
    os.unlink(tmp)
    raise
  os.replace(tmp, path)
  return path


def _run_side_by_side(commands) -> None:
  """Runs the commands (argument lists) at once and waits for all; RuntimeError with the first
  failing one's message (the end of its stderr) if any fails or names no program."""
  running, error = [], None
  for cmd in commands:
    try:
      running.append((cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                            text=True)))
    except OSError as e:  # the compiler names no program
      error = error or f"{' '.join(cmd)} failed:\n{e}"
  for cmd, process in running:
    _, stderr = process.communicate()
    if process.returncode and error is None:
      error = f"{' '.join(cmd)} failed:\n{stderr[-2000:]}"
  if error is not None:
    raise RuntimeError(error)


def build(sources, march: Optional[str], folder: Optional[str] = None) -> str:
  """Compiles a kernel's C++ `sources` (one path, or several linked into one library named for
  the first) for `march` (None: no -march) once per sources (with the headers beside the first),
  compiler, flags, JAX version and CPU into `folder` (default `cache_dir()`), and returns the
  path of the shared library. Raises RuntimeError (with the compiler's message) when it
  cannot."""
  import jax  # here, not above: t5lite.host_malloc takes cache_dir() before JAX may be imported
  sources = [sources] if isinstance(sources, str) else list(sources)
  cxx = compiler()
  if not cxx:
    raise RuntimeError("no C++ compiler found (set $CXX)")
  text = b""
  for path in sources + headers(sources[0]):  # each file's name, then its text
    with open(path, "rb") as f:
      text += os.path.basename(path).encode() + b"\0" + f.read() + b"\0"
  flags = compiler_flags(march)
  key = text + " ".join(flags + (cxx, jax.__version__, cpu_features())).encode()
  name = os.path.splitext(os.path.basename(sources[0]))[0]
  # Each source compiled to an object file at once, then linked: the attention's and the
  # matmul's take 11-13 s side by side on 2 cores, 18-22 s one after the other (16-19 s as one
  # file).
  with tempfile.TemporaryDirectory() as scratch:
    objects = [os.path.join(scratch, f"{i}.o") for i in range(len(sources))]
    compiles = [[cxx, *flags, "-isystem", jax.ffi.include_dir(), "-c", source, "-o", obj]
                for source, obj in zip(sources, objects)]
    return build_once(name, key, lambda out: [cxx, *flags, *objects, "-o", out], folder,
                      before=compiles)
