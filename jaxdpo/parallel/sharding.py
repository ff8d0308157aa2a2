"""Device meshes and the logical-axis rules that place parameters and batches on them.

The mesh always has the three axes (`data`, `fsdp`, `tensor`); a one-device run is simply a
1x1x1 mesh, so a laptop and a pod share one code path. Parameters carry logical axis names
(see `jaxdpo.models.layers.param`); a rules table maps each name onto zero or more mesh axes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxdpo.errors import MeshConfigError  # noqa: F401  (raised here; kept importable from here)

MESH_AXES = ("data", "fsdp", "tensor")

# Batch rows are split over every axis that holds distinct data; `tensor` shares a batch.
BATCH_AXES = ("data", "fsdp")

DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("vision_embed", "fsdp"),
    ("vision_mlp", "tensor"),
    ("vision_heads", "tensor"),
)


def resolve_mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, int, int]:
  """Resolves `{data, fsdp, tensor}` sizes, one of which may be -1 ("the rest")."""
  unknown = sorted(set(sizes) - set(MESH_AXES))
  if unknown:
    raise MeshConfigError(f"config.mesh: unknown axes {unknown}; the axes are {MESH_AXES}")
  shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
  if shape.count(-1) > 1:
    raise MeshConfigError(f"config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, shape))}")
  if any(s == 0 or s < -1 for s in shape):
    raise MeshConfigError(f"config.mesh: sizes must be positive or -1, got {dict(zip(MESH_AXES, shape))}")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise MeshConfigError(f"config.mesh {dict(zip(MESH_AXES, shape))}: the fixed axes ({known} devices) do not "
                            f"divide the {num_devices} available devices")
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise MeshConfigError(f"config.mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, but "
                          f"{num_devices} are available")
  return tuple(shape)


def make_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """Builds the (data, fsdp, tensor) mesh with explicit (Auto) axis types."""
  devices = list(devices if devices is not None else jax.devices())
  explicit = all(int(sizes.get(a, 1)) > 0 for a in MESH_AXES)
  wanted = math.prod(int(sizes.get(a, 1)) for a in MESH_AXES)
  if explicit and wanted < len(devices) and jax.process_count() == 1:
    # A fully explicit small mesh on a bigger single host (e.g. tests with 8 fake CPU devices)
    # uses the first devices; on many hosts every device must belong to the mesh.
    devices = devices[:wanted]
  shape = resolve_mesh_shape(sizes, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], rules, mesh) -> P:
  """Maps logical axis names of one array onto a PartitionSpec.

  A dimension stays replicated when its rule names no mesh axis, when the mesh axes it names
  are already used by an earlier dimension, or when their size does not divide the dimension
  (tiny test models have odd sizes; full-size models divide cleanly).
  """
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name, dim in zip(axes, shape):
    target = table.get(name) if name is not None else None
    if target is None:
      spec.append(None)
      continue
    mesh_axes = (target,) if isinstance(target, str) else tuple(target)
    mesh_axes = tuple(a for a in mesh_axes if a not in used and mesh.shape[a] > 1)
    size = math.prod(mesh.shape[a] for a in mesh_axes)
    if not mesh_axes or dim % size:
      spec.append(None)
      continue
    used.update(mesh_axes)
    spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
  return P(*spec)


def logical_axes_tree(abstract_params: nnx.State):
  """Pure-dict tree of logical-axis tuples, parallel to `nnx.to_pure_dict(abstract_params)`."""
  def axes_of(v):
    return v.get_metadata().get("logical_axes") or (None,) * len(v.value.shape)
  return nnx.to_pure_dict(jax.tree.map(lambda v: P(*axes_of(v)), abstract_params,
                                       is_leaf=lambda x: isinstance(x, nnx.Variable)))


def param_shardings(abstract_params: nnx.State, rules, mesh):
  """NamedSharding for every parameter (pure-dict tree)."""
  axes = logical_axes_tree(abstract_params)
  shapes = nnx.to_pure_dict(abstract_params)
  return jax.tree.map(lambda a, s: NamedSharding(mesh, logical_to_spec(tuple(a), s.shape, rules, mesh)),
                      axes, shapes, is_leaf=lambda x: isinstance(x, P))


def stacked(shardings: Sequence[NamedSharding]) -> NamedSharding:
  """The sharding of a stacked leaf [L, ...] (`decoder.StackedParams`) from its layers' (equal)
  shardings: the same spec after a leading layer axis that maps to no mesh axis, so each device
  holds every layer's shard, as it did per layer."""
  first = shardings[0]
  if any(s != first for s in shardings[1:]):
    raise ValueError(f"stacked layers have different shardings: {sorted({str(s) for s in shardings})}")
  if not isinstance(first, NamedSharding):  # e.g. one device's arrays: no spec to extend
    return first
  return NamedSharding(first.mesh, P(None, *first.spec))


def batch_sharding(mesh, ndim: int, rules=DEFAULT_RULES) -> NamedSharding:
  """Shards the leading (batch) dimension over the batch mesh axes, the rest replicated."""
  target = dict(rules).get("batch", BATCH_AXES)
  axes = tuple(a for a in ((target,) if isinstance(target, str) else target) if mesh.shape[a] > 1)
  lead = None if not axes else (axes[0] if len(axes) == 1 else axes)
  return NamedSharding(mesh, P(lead, *([None] * (ndim - 1))))


def batch_divisor(mesh, rules=DEFAULT_RULES) -> int:
  target = dict(rules).get("batch", BATCH_AXES)
  return math.prod(mesh.shape[a] for a in ((target,) if isinstance(target, str) else target))


def check_batch(batch_size: int, mesh, rules=DEFAULT_RULES, what: str = "config.train.batch_size"):
  div = batch_divisor(mesh, rules)
  if batch_size % div:
    raise MeshConfigError(f"{what}={batch_size} must be divisible by the data-parallel mesh axes "
                          f"(data x fsdp = {div}, mesh {dict(mesh.shape)})")


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def put_batch(batch: Mapping[str, np.ndarray], mesh, rules=DEFAULT_RULES):
  """Assembles host-local numpy arrays into global arrays sharded on the batch axes.

  Uses `jax.make_array_from_process_local_data`, so on many hosts each process passes only its
  own rows and the result is the global batch.
  """
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v), rules), np.asarray(v))
          for k, v in batch.items()}
