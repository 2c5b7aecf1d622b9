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

MESH_AXES = ("data", "fsdp", "context", "tensor", "expert")
# Older names still accepted by --mesh: `sequence=N` (and `dcn_sequence=N`) is the context axis.
AXIS_ALIASES = {"sequence": "context"}

# Logical name -> mesh axes. Parameters shard their `embed` dim over fsdp (ZeRO-3),
# their head / mlp / vocab dims over tensor (Megatron); activations shard batch
# over data and fsdp, length over context (context parallelism: kernels/context.py).
RULES: tuple[tuple[str, object], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", "context"),
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


DCN = "dcn_"  # --mesh dcn_data=2: the data axis also spans 2 slices, over the data-center network


def parse_hybrid_mesh(spec: str, num_devices: int | None = None) -> tuple[dict[str, int], dict[str, int]]:
    """Parses "dcn_data=2,fsdp=-1,tensor=1" into (ICI sizes within one slice, DCN sizes across slices),
    each over MESH_AXES in order. An axis's size in the mesh is its ICI size times its DCN size; the
    product of the DCN sizes is the number of slices. -1 fills the rest of a slice (ICI axes only).

    Raises ValueError with one clear line when the spec is malformed or does not divide the devices.
    """
    num_devices = jax.device_count() if num_devices is None else num_devices
    ici: dict[str, int] = {}
    dcn: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, eq, value = part.partition("=")
        name = name.strip()
        axis, sizes = (name[len(DCN):], dcn) if name.startswith(DCN) else (name, ici)
        axis = AXIS_ALIASES.get(axis, axis)
        if not eq or axis not in MESH_AXES:
            raise ValueError(f"bad --mesh entry {part!r}: expected NAME=SIZE with NAME in {MESH_AXES} "
                             f"(or {DCN}NAME for an axis across slices)")
        if axis in sizes:
            raise ValueError(f"--mesh names axis {name!r} twice")
        try:
            sizes[axis] = int(value)
        except ValueError:
            raise ValueError(f"bad --mesh size {value!r} for axis {name!r}: expected an integer or -1") from None
    if any(s < 1 for s in dcn.values()):
        raise ValueError(f"--mesh {spec!r}: {DCN}* sizes must be positive (-1 fills ICI axes only)")
    slices = math.prod(dcn.values())
    if num_devices % slices:
        raise ValueError(f"--mesh {spec!r}: {slices} slices do not divide the {num_devices} devices")
    per_slice = num_devices // slices
    fill = [n for n, s in ici.items() if s == -1]
    if len(fill) > 1:
        raise ValueError(f"--mesh {spec!r}: only one axis may be -1")
    if any(s == 0 or s < -1 for s in ici.values()):
        raise ValueError(f"--mesh {spec!r}: sizes must be positive (or -1)")
    known = math.prod(s for s in ici.values() if s != -1)
    where = f"the {per_slice} devices of each of {slices} slices" if slices > 1 else f"the {num_devices} devices"
    if fill:
        if per_slice % known:
            raise ValueError(f"--mesh {spec!r}: fixed axes ({known}) do not divide {where}")
        ici[fill[0]] = per_slice // known
    total = math.prod(ici.values())
    if total != per_slice:
        raise ValueError(f"--mesh {spec!r} uses {total * slices} devices but {num_devices} are available"
                         if slices == 1 else f"--mesh {spec!r} uses {total} devices per slice, not {where}")
    return {a: ici.get(a, 1) for a in MESH_AXES}, {a: dcn.get(a, 1) for a in MESH_AXES}


def parse_mesh(spec: str, num_devices: int | None = None) -> dict[str, int]:
    """Parses "data=2,fsdp=-1,tensor=1" (DCN axes allowed, see parse_hybrid_mesh) into the mesh's
    ordered axis sizes; -1 fills the rest.

    Raises ValueError with one clear line when the spec is malformed or does not
    divide the device count.
    """
    ici, dcn = parse_hybrid_mesh(spec, num_devices)
    return {a: ici[a] * dcn[a] for a in MESH_AXES}


def _slices(devices: list, count: int) -> list[list]:
    """The devices grouped by slice: by `slice_index` where devices have one (TPU slices, libtpu's
    multi-slice topologies), else `count` consecutive groups (CPU devices stand in for slices)."""
    indices = {getattr(d, "slice_index", None) for d in devices}
    if count == 1:
        # TPU slices only: multi-node GPUs may report one slice per node, and their meshes from before
        # DCN axes existed (--mesh data=4,fsdp=8 over 4 nodes) keep working as they were
        if len(indices - {None}) > 1 and devices[0].platform == "tpu":
            raise ValueError(f"the devices form {len(indices)} TPU slices: give --mesh a DCN axis across them "
                             f"(e.g. dcn_data={len(indices)},fsdp=-1), or every axis would cross slices")
        return [devices]
    if None not in indices:
        groups: dict[int, list] = {}
        for d in devices:
            groups.setdefault(d.slice_index, []).append(d)
        if len(groups) != count or len({len(g) for g in groups.values()}) != 1:
            raise ValueError(f"--mesh asks for {count} slices; the {len(devices)} devices form {len(groups)} "
                             f"slices of sizes {sorted(len(g) for g in groups.values())}")
        return [groups[k] for k in sorted(groups)]
    n = len(devices) // count
    return [devices[i * n:(i + 1) * n] for i in range(count)]


def _slice_array(shape: tuple[int, ...], devices: list) -> np.ndarray:
    try:
        from jax.experimental import mesh_utils

        return mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # non-physical (fake CPU / AOT) devices: plain order is fine
        return np.asarray(devices).reshape(shape)


def make_mesh(spec: str | dict[str, int] = "fsdp=-1", devices: Sequence | None = None) -> Mesh:
    """Builds a mesh with all of MESH_AXES (unnamed ones get size 1), Auto axis types.

    With DCN axes (`dcn_data=2`) the mesh is hybrid: each slice's devices are laid out over the ICI
    sizes, and the slices over the DCN sizes as the outer part of each axis, so only collectives
    over an axis with a DCN size cross slices.
    """
    devices = list(jax.devices() if devices is None else devices)
    if isinstance(spec, str):
        ici, dcn = parse_hybrid_mesh(spec, len(devices))
    else:
        ici, dcn = {a: spec.get(a, 1) for a in MESH_AXES}, dict.fromkeys(MESH_AXES, 1)
    ici_shape, dcn_shape = tuple(ici[a] for a in MESH_AXES), tuple(dcn[a] for a in MESH_AXES)
    slices = _slices(devices, math.prod(dcn_shape))
    per_slice = np.stack([_slice_array(ici_shape, s) for s in slices]).reshape(dcn_shape + ici_shape)
    k = len(MESH_AXES)  # (dcn_0..dcn_k, ici_0..ici_k) -> (dcn_0, ici_0, dcn_1, ici_1, ...): DCN outer
    order = [i for pair in zip(range(k), range(k, 2 * k)) for i in pair]
    device_array = per_slice.transpose(order).reshape(tuple(d * i for d, i in zip(dcn_shape, ici_shape)))
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
