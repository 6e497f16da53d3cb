"""Compiling for NVIDIA GPUs on a host that has none (XLA's deviceless ahead-of-time compile).

XLA's GPU compiler does not need a GPU: given a target description (the `GpuTargetConfigProto`
a device reports: compute capability, SM count, memory, bandwidth, cuDNN version) it compiles
a program as it would on that GPU, through the same passes (SPMD partitioning, fusion, cuDNN
custom calls, buffer assignment, scheduling), and says how much memory the program needs.
Autotuning is the one pass that needs the device; without it XLA takes its default GEMM
configurations, which changes speed and may change GEMM workspaces, not the program's buffers.
A GPU's measured peak also holds what XLA does not plan (allocator fragmentation, cuDNN and
cuBLAS handles): for T5-base b64 XLA plans 13.0 GiB where an H100 measured 16 GiB.

What this buys on a CPU-only host (CI, a laptop, the planner's host):
  * the memory a train step needs on an H100, from the compiler that will run it (XLA:CPU's
    own memory analysis is no stand-in: it has no fused attention and assigns buffers its own
    way; for the 1b preset it says 60 GiB where an H100 measured 29 GiB, this says 29.5 GiB);
  * that a sharded program compiles for 8 GPUs, cuDNN attention's custom partitioning included.

It needs JAX's CUDA PJRT plugin, without the CUDA libraries (about 180 MB):
    pip install "jax-cuda12-plugin==$(python -c 'import jaxlib; print(jaxlib.__version__)')"
The plugin must match jaxlib's version. Nothing is allocated or run, so `JAX_PLATFORMS=cpu`
(the tests' setting) may stay as it is; on a host without CUDA it must be set (or CUDA left out
of it) before JAX starts a backend, or the plugin fails its check of the CUDA libraries and
takes XLA's GPU compiler with it (`start_jax_on_host`, which `benchmark.py --aot` and the
planner's `--target` call, sets it where it is unset).

JAX checks cuDNN's version and the GPU's compute capability while tracing
`jax.nn.dot_product_attention(implementation="cudnn")`, by asking the local GPU; there is none,
so `tracing_for` answers those questions from the target's description while a program is
traced and lowered.
"""

import contextlib
import contextvars
import importlib.util
import os
import re
from typing import Dict, List, Tuple

# Target descriptions, as XLA's `GpuTargetConfigProto` in text form. The device fields are what
# the CUDA driver reports for these parts (H100 SXM 80 GB: 132 SMs, 3.35 TB/s; H200: the same
# die with 141 GB of HBM3e at 4.8 TB/s); cuDNN 9.10 and CUDA 12.9, versions JAX's CUDA 12
# wheels take (they require cuDNN >= 9.8).
_DEVICE_COMMON = """
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 minor: 0 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
"""
_VERSIONS = """
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 10 }
runtime_version { major: 12 minor: 9 }
"""
TARGETS: Dict[str, str] = {
    "h100": ("gpu_device_info {" + _DEVICE_COMMON
             + "  memory_bandwidth: 3352320000000\n  device_memory_size: 84929347584\n}"
             + _VERSIONS + 'device_description_str: "NVIDIA H100 80GB HBM3"\n'),
    "h200": ("gpu_device_info {" + _DEVICE_COMMON
             + "  memory_bandwidth: 4800000000000\n  device_memory_size: 150754820096\n}"
             + _VERSIONS + 'device_description_str: "NVIDIA H200"\n'),
}


# bf16 dense matmul peak, TFLOP/s, as measured (8192^3 on random data, torch 770-785 on an H100
# SXM; the H200 is the same die): what MFU is measured against, not the 989 of the data sheet.
MATMUL_TFLOPS: Dict[str, float] = {"h100": 780.0, "h200": 780.0}

_TRACING_FOR: contextvars.ContextVar = contextvars.ContextVar("t5lite_gpu_aot_target", default="")


def check_target(target: str) -> str:
  """`target`, or a ValueError naming the known ones."""
  if target not in TARGETS:
    raise ValueError(f"unknown GPU target {target!r}; known: {', '.join(sorted(TARGETS))}")
  return target


def plugin_available() -> bool:
  """Whether JAX's CUDA PJRT plugin (which holds XLA's GPU compiler) is installed."""
  return any(_module_exists(name)
             for name in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_plugins.xla_cuda12",
                          "jax_plugins.xla_cuda13"))


def _module_exists(name: str) -> bool:
  """Whether module `name` can be imported; False also where its parent package is missing
  (find_spec raises then: no `jax_plugins` namespace without a plugin)."""
  try:
    return importlib.util.find_spec(name) is not None
  except ModuleNotFoundError:
    return False


def _field(target: str, name: str) -> Tuple[int, int]:
  """(major, minor) of a version block of the target's description."""
  block = re.search(name + r"\s*\{([^}]*)\}", TARGETS[check_target(target)]).group(1)
  get = lambda key: int((re.search(key + r":\s*(\d+)", block) or [0, 0])[1])
  return get("major"), get("minor")


def compute_capability(target: str) -> Tuple[int, int]:
  """The target's CUDA compute capability, e.g. (9, 0)."""
  return _field(target, "cuda_compute_capability")


def cudnn_version(target: str) -> int:
  """The target's cuDNN version as cuDNN numbers it (9.10 -> 91000)."""
  major, minor = _field(target, "dnn_version_info")
  return major * 10000 + minor * 100


def memory_gib(target: str) -> float:
  """The target GPU's memory in GiB (as the driver reports it: 79.1 for an H100 80GB)."""
  size = re.search(r"device_memory_size:\s*(\d+)", TARGETS[check_target(target)]).group(1)
  return int(size) / 2 ** 30


def memory_bandwidth(target: str) -> float:
  """The target GPU's device-memory bandwidth in bytes/s (3.35e12 for an H100 SXM)."""
  return float(re.search(r"memory_bandwidth:\s*(\d+)", TARGETS[check_target(target)]).group(1))


def start_jax_on_host():
  """For a process that only compiles for GPUs: JAX starts on the CPU where JAX_PLATFORMS is
  unset (a setting of the user's own stays). Call it before JAX starts a backend: JAX's CUDA
  plugin checks the local CUDA libraries then unless the platforms asked for leave CUDA out, and
  on a host without CUDA the failed check takes XLA's GPU compiler with it."""
  import jax  # pylint: disable=import-outside-toplevel
  if not os.environ.get("JAX_PLATFORMS"):
    jax.config.update("jax_platforms", "cpu")


def devices(target: str = "h100", count: int = 1) -> List:
  """`count` devices of one host of `target` GPUs, to shard and compile for (not to run on)."""
  if not plugin_available():
    raise RuntimeError(
        "compiling for a GPU without one needs JAX's CUDA plugin: pip install "
        "\"jax-cuda12-plugin==$(python -c 'import jaxlib; print(jaxlib.__version__)')\"")
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  config = TARGETS[check_target(target)]
  try:
    topology = topologies.get_topology_desc(platform="cuda", target_config=config,
                                            topology=f"1x1x{count}")
  except NotImplementedError as e:
    raise RuntimeError(
        "JAX's CUDA plugin is installed but did not start: on a host without CUDA its version "
        "check fails unless JAX_PLATFORMS leaves CUDA out; run with JAX_PLATFORMS=cpu") from e
  return list(topology.devices)


@contextlib.contextmanager
def tracing_for(target: str = "h100"):
  """While active, JAX's cuDNN attention checks see `target`'s cuDNN version and compute
  capability instead of asking a local GPU, and `tracing_platform()` says "gpu". Trace and
  lower inside it; compiling needs it not.

  These checks are private JAX functions (`jax._src.cudnn.fused_attention_stablehlo`); a JAX
  that renames them fails here, loudly, rather than tracing a program for the wrong GPU."""
  from jax._src.cudnn import fused_attention_stablehlo as fused  # pylint: disable=import-outside-toplevel
  version, capability = cudnn_version(target), compute_capability(target)
  parse = lambda text: tuple(int(x) for x in text.split("."))
  stand_ins = {"check_cudnn_version": lambda: version,
               "check_compute_capability": lambda c: capability >= parse(c),
               "is_cuda_compute_capability_equal": lambda c: capability == parse(c)}
  missing = [name for name in stand_ins if not hasattr(fused, name)]
  if missing:
    raise RuntimeError(f"this JAX has no {', '.join(missing)} in {fused.__name__}; "
                       "t5lite.gpu_aot needs updating for it")
  saved = {name: getattr(fused, name) for name in stand_ins}
  token = _TRACING_FOR.set(target)
  try:
    for name, fn in stand_ins.items():
      setattr(fused, name, fn)
    yield
  finally:
    _TRACING_FOR.reset(token)
    for name, fn in saved.items():
      setattr(fused, name, fn)


def tracing_platform() -> str:
  """The platform a program traced now is for: "gpu" inside `tracing_for`, else JAX's default
  backend ("cpu", "gpu", "tpu"). For code that traces differently for GPUs."""
  if _TRACING_FOR.get():
    return "gpu"
  import jax  # pylint: disable=import-outside-toplevel
  return jax.default_backend()


def memory_gb(compiled) -> Dict[str, float]:
  """XLA's memory plan of a compiled program, per device, in GiB: arguments, outputs, aliased
  (donated inputs reused as outputs), temporaries, and the peak they add up to."""
  from t5lite.autoparallel import peak_bytes  # pylint: disable=import-outside-toplevel
  m = compiled.memory_analysis()
  gb = lambda b: b / 2 ** 30
  return {"arguments": gb(m.argument_size_in_bytes), "outputs": gb(m.output_size_in_bytes),
          "aliased": gb(m.alias_size_in_bytes), "temporaries": gb(m.temp_size_in_bytes),
          "peak": gb(peak_bytes(compiled))}


def cudnn_attention_calls(hlo_text: str) -> Dict[str, int]:
  """{cuDNN fused-attention custom call target: count} in a compiled program's HLO text."""
  counts: Dict[str, int] = {}
  for name in re.findall(r'custom_call_target="(__cudnn\$fmha\w*)"', hlo_text):
    counts[name] = counts.get(name, 0) + 1
  return counts
