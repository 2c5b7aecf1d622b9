"""Context parallelism in the train step: on 8 CPU devices, three steps of tiny Llama (float32, packed
documents crossing chunk and shard edges, a sliding-window layer and a full layer) with the length
sharded over `context` equal the 1-device steps, for both variants (kernels/context.py)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import zoo
from kernels.context import zigzag_order
from zoo import objectives
from zoo.sharding import make_mesh
from zoo.training.step import mesh_context

from step_utils import assert_same_steps, packed_batch, steps_on_meshes

T = 64  # C = 8 at context=4 and 16 at context=2; documents [0, 27), [27, 50), [50, 60), padding
DOCS = (27, 23, 10)


def _config(kind, window):
    return zoo.config("tiny-llama", dtype="float32", attention_impl="pallas", context_parallel=kind,
                      sliding_window=window, layer_types=("sliding_attention", "full_attention"))


@pytest.fixture(scope="module")
def batches():
    return [packed_batch(zoo.config("tiny-llama").vocab_size, t=T, seed=s, docs=DOCS) for s in range(3)]


@pytest.fixture(scope="module")
def one_device(batches):
    """The 1-device runs, per window (the 1-device step ignores the variant)."""
    return {w: steps_on_meshes(_config("allgather", w), batches, ("data=1",), seq_len=T)[0] for w in (5, 20)}


@pytest.mark.parametrize("kind,spec,window", [
    ("allgather", "context=4,fsdp=2", 5),   # the window takes the halo (W - 1 <= C)
    ("ring", "context=4,fsdp=2", 5),
    ("allgather", "context=2,fsdp=4", 5),
    ("ring", "context=2,fsdp=4", 5),
    ("allgather", "context=4,fsdp=2", 20),  # W - 1 > C: all-gather's static window slices
])
def test_three_steps_equal_one_device(kind, spec, window, batches, one_device):
    if jax.device_count() < 8:
        pytest.skip("needs 8 fake CPU devices (tests/conftest.py)")
    (sharded,) = steps_on_meshes(_config(kind, window), batches, (spec,), seq_len=T)
    assert_same_steps(one_device[window], sharded)


def test_context_order_follows_the_targets(batches):
    """Under a context=4 mesh every token field takes the zig-zag permutation after the next-token
    targets are taken in natural order: the target of each chunk's last token is the natural next one."""
    batch = {k: np.asarray(v[:2]) for k, v in batches[0].items()}
    targets, valid = objectives.next_token_targets(batch["input_ids"], batch["segment_ids"])
    mesh = make_mesh("context=4,fsdp=2", devices=jax.devices()[:8])
    with mesh_context(mesh):
        ids, tgt, ok = jax.jit(objectives.to_context_order)(batch["input_ids"], targets, valid)
    order = zigzag_order(T, 4)
    np.testing.assert_array_equal(ids, batch["input_ids"][:, order])
    np.testing.assert_array_equal(tgt, np.asarray(targets)[:, order])
    np.testing.assert_array_equal(ok, np.asarray(valid)[:, order])
    # the token at zig-zag position p is natural token order[p]; its target is natural token order[p] + 1
    for p in range(T):
        if ok[0, p]:
            assert tgt[0, p] == batch["input_ids"][0, order[p] + 1]
    with mesh_context(make_mesh("fsdp=8", devices=jax.devices()[:8])):
        assert objectives.to_context_order(batch["input_ids"])[0] is batch["input_ids"]
