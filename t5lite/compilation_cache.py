"""JAX's persistent compilation cache, switched on by the command-line entry points.

A second run with the same shapes (a resumed `t5lite.train`, `t5lite.eval` of the next
checkpoint, another `t5lite.infer` file, a new `t5lite.chat`) loads its compiled programs from
disk instead of compiling them again: seconds for a decoding loop on a CPU (T5-large's ~10 s),
minutes for a large model's train step.

Where: `$T5LITE_COMPILATION_CACHE` when set (`off` switches the cache off), else `jax/` in
t5lite's cache directory (`$T5LITE_CACHE_DIR`, else `~/.cache/t5lite`). A directory the user
gave JAX itself (`JAX_COMPILATION_CACHE_DIR`) is left as it is. Programs that compiled in under
a second are not stored; past 4 GiB the least recently used entries are evicted (under a file
lock, so concurrent processes can share the directory). JAX runs what it finds there: a cache
directory others can write to lets them run code as you.
"""

import os
from typing import Mapping, Optional

ENV = "T5LITE_COMPILATION_CACHE"
MAX_BYTES = 4 << 30
_OFF = ("", "off", "0", "none", "false")


def cache_dir(environ: Mapping[str, str] = os.environ) -> Optional[str]:
  """The cache directory `environ` asks for, or None when the cache is switched off."""
  if ENV in environ:
    value = environ[ENV].strip()
    return None if value.lower() in _OFF else os.path.expanduser(value)
  base = environ.get("T5LITE_CACHE_DIR") or "~/.cache/t5lite"
  return os.path.join(os.path.expanduser(base), "jax")


def enable(environ: Mapping[str, str] = os.environ) -> Optional[str]:
  """Points JAX's persistent compilation cache at `cache_dir(environ)`; returns the directory
  in use (None: off). Call it before the first compilation, from an entry point."""
  import jax  # pylint: disable=import-outside-toplevel
  if environ.get("JAX_COMPILATION_CACHE_DIR"):
    return environ["JAX_COMPILATION_CACHE_DIR"]
  path = cache_dir(environ)
  if path is not None:
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
  return path
