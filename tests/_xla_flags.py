"""XLA flags of every test process (no imports here: conftest reads this before jax is imported).

The tests' models are tiny, so compiling costs more than running: without LLVM's optimisation of
the CPU code a compile takes about half the time (a mesh test: 47 s -> 25 s of CPU on the 2-core
box). The programs compute the same values; only the machine code is less tuned.
"""

FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def with_devices(devices: int) -> str:
  """XLA_FLAGS for a CPU process with `devices` fake devices."""
  return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"
