"""Compile-only devices of an accelerator this machine does not have (XLA's deviceless AOT).

XLA's GPU compiler can compile for a GPU it is told about instead of one it finds: the PJRT CUDA
plugin builds a topology from a target description (`TARGETS`), and programs lowered onto that
topology's devices compile to real GPU executables, with the GPU backend's own fusion, cuDNN
custom calls and buffer assignment, without a GPU or a driver. Nothing can run on them.

`python -m jaxdpo.bench --analyze --target h200` uses this for the H200's memory plan, so that the
plan is the GPU compiler's and not the CPU backend's (which runs bf16 matmuls in fp32 and keeps
fp32 copies of bf16 weights that a GPU never makes; BUILD_NOTES "Fast step").

Needs the CUDA plugin of the installed jax, which the project does not install (about 5 GB):

  python -m venv --system-site-packages .gpu-aot
  .gpu-aot/bin/pip install "jax-cuda12-plugin[with-cuda]==$(python -c 'import jax; print(jax.__version__)')"
  JAX_PLATFORMS=cpu JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 .gpu-aot/bin/python -m jaxdpo.bench ... --target h200

`JAX_PLATFORMS=cpu` keeps every computation on the CPU (there is no GPU to initialise), and the
constraints check is skipped because it calls `cuInit`, which fails without a driver.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import jax

# NVIDIA H200 SXM (Hopper, sm_90): 132 SMs, 141 GB HBM3e (the H200 of `shared/bench`), 4.8 TB/s.
# Fields as XLA's `GpuTargetConfigProto` (text format); the shared-memory and register limits are
# those of every sm_90 part.
H200 = """
gpu_device_info {
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
  memory_bandwidth: 4800000000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 150754820096
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 10 }
runtime_version { major: 12 minor: 9 }
device_description_str: "NVIDIA H200"
"""

TARGETS = {"h200": H200}
CAPABILITY = {"h200": (9, 0)}  # the target's CUDA compute capability (as in its target config)


class DevicelessUnavailable(RuntimeError):
  """The CUDA plugin needed for a deviceless GPU compile is missing or cannot start."""


def _how_to() -> str:
  return (f"install the CUDA plugin of this jax ({jax.__version__}) in a separate venv: "
          f"pip install 'jax-cuda12-plugin[with-cuda]=={jax.__version__}', and run with "
          "JAX_PLATFORMS=cpu JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 (see jaxdpo.parallel.deviceless)")


@functools.lru_cache(maxsize=4)
def devices(target: str) -> tuple:
  """Compile-only devices (one) of `target` (a key of `TARGETS`).

  Raises:
    KeyError: an unknown target.
    DevicelessUnavailable: the plugin is not installed or not set up (the message says how).
  """
  if target not in TARGETS:
    raise KeyError(f"unknown deviceless target {target!r}; known: {sorted(TARGETS)}")
  if not os.environ.get("JAX_SKIP_CUDA_CONSTRAINTS_CHECK"):
    raise DevicelessUnavailable("a deviceless GPU compile needs JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 (the plugin's "
                                "version check calls cuInit, which fails without a GPU); " + _how_to())
  from jax.experimental import topologies
  try:
    topo = topologies.get_topology_desc(platform="cuda", target_config=TARGETS[target], topology="1x1x1")
  except (NotImplementedError, RuntimeError) as e:  # no plugin registered / it failed to start
    raise DevicelessUnavailable(f"no deviceless CUDA topology ({e}); " + _how_to()) from e
  return tuple(topo.devices)


@contextlib.contextmanager
def compiling_for(target: str) -> Iterator[None]:
  """Traces the enclosed lowering as for `target`'s GPU.

  jax's cuDNN attention checks the *local* GPU's compute capability when it is traced (e.g. head
  dim 256, Gemma 3's, needs Hopper); with no local GPU it would refuse what the target supports. The
  two checks answer for the target's capability here, and only here.
  """
  from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention
  have = CAPABILITY[target]

  def at_least(capability: str) -> bool:
    return have >= tuple(int(x) for x in capability.split("."))

  def equal(capability: str) -> bool:
    return have == tuple(int(x) for x in capability.split("."))

  saved = cudnn_attention.check_compute_capability, cudnn_attention.is_cuda_compute_capability_equal
  cudnn_attention.check_compute_capability, cudnn_attention.is_cuda_compute_capability_equal = at_least, equal
  try:
    yield
  finally:
    cudnn_attention.check_compute_capability, cudnn_attention.is_cuda_compute_capability_equal = saved
