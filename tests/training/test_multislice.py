"""Multi-slice meshes: `--mesh dcn_data=2,...` lays slices out as the outer part of an axis; a step on
such a mesh equals the 1-device step; a 2-slice TPU plan compiles and only reductions and gathers
cross the data-center network."""

from __future__ import annotations

import jax
import pytest

import zoo
from zoo.sharding import make_mesh, parse_hybrid_mesh, parse_mesh
from zoo.training import plan
from zoo.training.collectives import dcn_transfers
from zoo.training.step import make_trainer

from step_utils import OPT, assert_same_steps, packed_batch, steps_on_meshes


def test_dcn_axes_multiply_the_ici_axes():
    ici, dcn = parse_hybrid_mesh("dcn_data=2,fsdp=-1,tensor=2", 16)
    assert (ici["data"], ici["fsdp"], ici["tensor"]) == (1, 4, 2) and (dcn["data"], dcn["fsdp"]) == (2, 1)
    assert parse_mesh("dcn_data=2,fsdp=-1,tensor=2", 16) == {"data": 2, "fsdp": 4, "context": 1, "tensor": 2,
                                                             "expert": 1}
    assert parse_mesh("dcn_fsdp=2,fsdp=2,dcn_data=2", 8)["fsdp"] == 4


@pytest.mark.parametrize("spec, words", [
    ("dcn_data=-1,fsdp=-1", "dcn_* sizes must be positive"),
    ("dcn_data=3,fsdp=-1", "3 slices do not divide the 8 devices"),
    ("dcn_foo=2", "bad --mesh entry 'dcn_foo=2'"),
    ("dcn_data=2,fsdp=8", "uses 8 devices per slice, not the 4 devices of each of 2 slices"),
    ("dcn_data=2,dcn_data=2", "names axis 'dcn_data' twice"),
])
def test_bad_dcn_specs_get_one_line(spec, words):
    with pytest.raises(ValueError, match=words.replace("*", r"\*")):
        parse_hybrid_mesh(spec, 8)


def test_slices_are_the_outer_part_of_their_axis():
    devices = jax.devices()[:8]
    # data = 2 slices x 2 within a slice: rows 0-1 in slice 0 (devices 0-3), rows 2-3 in slice 1
    mesh = make_mesh("dcn_data=2,data=2,fsdp=2", devices=devices)
    assert [[d.id for d in row.flat] for row in mesh.devices] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    # fsdp = 2 slices x 2: each data row's fsdp axis runs slice 0's devices, then slice 1's
    mesh = make_mesh("dcn_fsdp=2,fsdp=2,data=2", devices=devices)
    assert [[d.id for d in row.flat] for row in mesh.devices] == [[0, 1, 4, 5], [2, 3, 6, 7]]
    mesh = make_mesh("dcn_data=2,fsdp=2,tensor=2", devices=devices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "context": 1, "tensor": 2, "expert": 1}
    # CPU devices stand in for slices in consecutive groups: slice s holds data row s
    for s in range(2):
        assert {d.id for d in mesh.devices[s].flat} == {d.id for d in devices[4 * s:4 * s + 4]}


@pytest.mark.tpu_aot
def test_tpu_slices_come_from_slice_index():
    devices = plan.topology_devices("2xv5p-8")
    assert len(devices) == 8 and {d.slice_index for d in devices} == {0, 1}
    mesh = make_mesh("fsdp=-1,dcn_data=2", devices=devices)
    for s in range(2):
        assert {d.slice_index for d in mesh.devices[s].flat} == {s}
    with pytest.raises(ValueError, match="asks for 4 slices; the 8 devices form 2 slices"):
        make_mesh("dcn_data=4,fsdp=-1", devices=devices)
    with pytest.raises(ValueError, match="the devices form 2 TPU slices: give --mesh a DCN axis"):
        make_mesh("fsdp=-1", devices=devices)


def test_three_steps_on_two_slices_equal_one_device():
    if jax.device_count() < 8:
        pytest.skip("needs 8 fake CPU devices (tests/conftest.py)")
    cfg = zoo.config("tiny-llama", dtype="float32")
    batches = [packed_batch(cfg.vocab_size, seed=s) for s in range(3)]
    one, two = steps_on_meshes(cfg, batches, ("data=1", "dcn_data=2,fsdp=2,tensor=2"), seq_len=32)
    assert_same_steps(one, two)


def test_multi_slice_topology_names():
    assert plan.canonical_topology("2xv5p-8") == "2xv5p:2x2x1"
    assert plan.canonical_topology("4xv6e:2x2") == "4xv6e:2x2"
    with pytest.raises(plan.PlanError, match="slices must be positive"):
        plan.canonical_topology("0xv5p-8")


@pytest.mark.tpu_aot
def test_two_slice_plan_sends_only_reductions_and_gathers_over_dcn():
    cfg = zoo.config("tiny-llama")
    r = plan.plan(cfg, "2xv5p-8", mesh="dcn_data=2,fsdp=2,tensor=2", batch_size=8, seq_len=64)
    assert r["status"] == "compiled" and r["chips"] == 8 and r["devices"] == 8
    dcn = r["dcn_transfers"]
    assert dcn is not None, r.get("dcn_note")
    # the gradient all-reduce over data crosses slices; tensor-parallel traffic (all-to-all,
    # permutes, reduce-scatters) stays on each slice's ICI
    assert dcn.get("ALL_REDUCE", {}).get("count", 0) > 0, dcn
    assert set(dcn) <= {"ALL_REDUCE", "ALL_GATHER"}, dcn
    assert "between slices (DCN)" in plan.format_plan(r)
    # the same mesh on one 8-chip slice: the same kinds of collectives, none of them a DCN transfer
    mesh = make_mesh("data=2,fsdp=2,tensor=2", devices=plan.topology_devices("v5p:2x2x2"))
    text = make_trainer(cfg, mesh, OPT, batch_size=8, seq_len=64).step.as_text()
    assert "all-reduce" in text and dcn_transfers(text) == {}
