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


def _config(kind, window, impl):
    return zoo.config("tiny-llama", dtype="float32", attention_impl=impl, context_parallel=kind,
                      sliding_window=window, layer_types=("sliding_attention", "full_attention"))


@pytest.fixture(scope="module")
def batches():
    return [packed_batch(zoo.config("tiny-llama").vocab_size, t=T, seed=s, docs=DOCS) for s in range(3)]


_ONE_DEVICE = {}


def _one_device(batches, window, impl):
    """The 1-device run (it ignores the variant), once per window and implementation."""
    if (window, impl) not in _ONE_DEVICE:
        _ONE_DEVICE[window, impl] = steps_on_meshes(_config("allgather", window, impl), batches, ("data=1",),
                                                    seq_len=T)[0]
    return _ONE_DEVICE[window, impl]


# The Pallas kernel (interpret mode) in one case of each variant; the reference ("xla") in the others,
# which check the same context-parallel code. One case runs on both CI legs, the others (minutes of
# compiles) on the newest-JAX leg.
_LATER = pytest.mark.newest_jax_leg


@pytest.mark.parametrize("kind,spec,window,impl", [
    ("allgather", "context=4,fsdp=2", 5, "pallas"),  # the window takes the halo (W - 1 <= C)
    pytest.param("ring", "context=2,fsdp=4", 5, "pallas", marks=_LATER),
    pytest.param("ring", "context=4,fsdp=2", 5, "xla", marks=_LATER),
    # passed here; slow in CI: the kernel tests cover both paths (tests/kernels/test_context.py)
    pytest.param("allgather", "context=2,fsdp=4", 5, "xla", marks=pytest.mark.slow),
    pytest.param("allgather", "context=4,fsdp=2", 20, "xla", marks=pytest.mark.slow),  # W - 1 > C: window slices
])
def test_three_steps_equal_one_device(kind, spec, window, impl, batches):
    if jax.device_count() < 8:
        pytest.skip("needs 8 fake CPU devices (tests/conftest.py)")
    (sharded,) = steps_on_meshes(_config(kind, window, impl), batches, (spec,), seq_len=T)
    assert_same_steps(_one_device(batches, window, impl), sharded)


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
