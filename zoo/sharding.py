"""Logical axis names -> mesh axes. The only file in the zoo that names mesh axes.

Models annotate every parameter and block-boundary activation with logical names
(`embed`, `heads`, `mlp`, ...). `RULES` maps each logical name to the mesh axes it is
split over; `make_mesh` builds the named mesh from a `--mesh` string.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, PartitionSpec

MESH_AXES = ("data", "fsdp", "sequence", "tensor", "expert")

# Logical name -> mesh axes. Parameters shard their `embed` dim over fsdp (ZeRO-3),
# their head / mlp / vocab dims over tensor (Megatron); activations shard batch
# over data and fsdp, length over sequence.
RULES: tuple[tuple[str, object], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", "sequence"),
    ("kv_length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("activation_heads", "tensor"),
    ("activation_vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("q_lora", None),  # DeepSeek's latent ranks stay whole: every head reads the latent
    ("kv_lora", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("expert", "expert"),
    ("norm", None),
    ("positions", None),
    ("relpos_buckets", None),
    ("classes", None),
)


def parse_mesh(spec: str, num_devices: int | None = None) -> dict[str, int]:
    """Parses "data=2,fsdp=-1,tensor=1" into ordered axis sizes; -1 fills the rest.

    Raises ValueError with one clear line when the spec is malformed or does not
    divide the device count.
    """
    num_devices = jax.device_count() if num_devices is None else num_devices
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq or name not in MESH_AXES:
            raise ValueError(f"bad --mesh entry {part!r}: expected NAME=SIZE with NAME in {MESH_AXES}")
        if name in sizes:
            raise ValueError(f"--mesh names axis {name!r} twice")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ValueError(f"bad --mesh size {value!r} for axis {name!r}: expected an integer or -1") from None
    fill = [n for n, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise ValueError(f"--mesh {spec!r}: only one axis may be -1")
    if any(s == 0 or s < -1 for s in sizes.values()):
        raise ValueError(f"--mesh {spec!r}: sizes must be positive (or -1)")
    known = math.prod(s for s in sizes.values() if s != -1)
    if fill:
        if num_devices % known:
            raise ValueError(f"--mesh {spec!r}: fixed axes ({known}) do not divide the {num_devices} devices")
        sizes[fill[0]] = num_devices // known
    total = math.prod(sizes.values())
    if total != num_devices:
        raise ValueError(f"--mesh {spec!r} uses {total} devices but {num_devices} are available")
    return {axis: sizes.get(axis, 1) for axis in MESH_AXES}


def make_mesh(spec: str | dict[str, int] = "fsdp=-1", devices: Sequence | None = None) -> Mesh:
    """Builds a mesh with all of MESH_AXES (unnamed ones get size 1), Auto axis types."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh(spec, len(devices)) if isinstance(spec, str) else {a: spec.get(a, 1) for a in MESH_AXES}
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
        from jax.experimental import mesh_utils

        device_array = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # non-physical (fake CPU / AOT) devices: plain order is fine
        device_array = np.asarray(devices).reshape(shape)
    axis_types = getattr(jax.sharding, "AxisType", None)
    if axis_types is not None:
        return Mesh(device_array, MESH_AXES, axis_types=(axis_types.Auto,) * len(MESH_AXES))
    return Mesh(device_array, MESH_AXES)


def logical_to_sharding(logical_specs, mesh: Mesh):
    """Maps a pytree of logical PartitionSpecs to NamedShardings on `mesh`."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, RULES)


def logical_spec(*names: str | None) -> PartitionSpec:
    """PartitionSpec over mesh axes for one array with the given logical names."""
    return nn.logical_to_mesh_axes(names, RULES)


def constrain(x, names: tuple[str | None, ...]):
    """Constrains an activation to its logical sharding (a no-op outside a mesh)."""
    return nn.with_logical_constraint(x, names)


def logical_size(name: str) -> int:
    """How many shards the logical axis `name` has under the mesh and rules in context (1 outside
    a mesh, without rules, or where the rules name no mesh axis of the mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return 1
    entry = nn.logical_to_mesh_axes((name,))[0]
    names = (entry,) if isinstance(entry, str) else tuple(entry or ())
    manual = set(getattr(mesh, "manual_axes", ()))
    return math.prod(mesh.shape[n] for n in names if n in mesh.axis_names and n not in manual)


def check_divisible(cfg, mesh: Mesh) -> None:
    """Fails early, with one clear line, when the mesh cannot split the model."""
    tensor = mesh.shape.get("tensor", 1)
    for field in ("num_heads", "num_kv_heads", "intermediate_size", "vocab_size"):
        value = getattr(cfg, field, None)
        if value is not None and tensor > 1 and value % tensor:
            raise ValueError(f"mesh axis tensor={tensor} does not divide {field}={value} of model {cfg.name!r}")
    experts = mesh.shape.get("expert", 1)
    n_experts = getattr(cfg, "num_experts", None)
    if experts > 1 and (not n_experts or n_experts % experts):
        raise ValueError(f"mesh axis expert={experts} does not divide num_experts={n_experts} of model {cfg.name!r}")
