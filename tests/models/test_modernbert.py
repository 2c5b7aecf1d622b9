"""ModernBERT beyond the contract suite: packed rows, its local windows, the classification
objective through the shared train step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

import zoo
from zoo.sharding import make_mesh
from zoo.training.optimizer import OptimConfig
from zoo.training.step import init_state, make_trainer, mesh_context


def _init(name, length=12):
    cfg = zoo.config(name)
    model = zoo.build(cfg)
    return cfg, model, model.init(jax.random.key(0), jnp.ones((1, length), jnp.int32))["params"]


def test_packed_row_equals_its_documents_alone():
    """Positions restart per document and segment ids keep attention (global and local) inside it."""
    cfg, model, params = _init("tiny-modernbert")
    rng = np.random.default_rng(0)
    a, b = rng.integers(4, 512, size=19), rng.integers(4, 512, size=13)
    packed = model.apply({"params": params}, jnp.asarray(np.concatenate([a, b])[None]),
                         positions=jnp.asarray([list(range(19)) + list(range(13))]),
                         segment_ids=jnp.asarray([[1] * 19 + [2] * 13]))
    for doc, out in ((a, packed[0, :19]), (b, packed[0, 19:])):
        alone = model.apply({"params": params}, jnp.asarray(doc[None]))[0]
        np.testing.assert_allclose(np.asarray(out), np.asarray(alone), atol=1e-5)


def test_local_layers_see_half_the_window_each_way():
    """One local layer (the model's second) on its own: token i's output moves when a token
    local_attention // 2 away changes, and not when one a step further does."""
    cfg = zoo.config("tiny-modernbert").replace(architecture="ModernBertModel", num_layers=2)
    model = zoo.build(cfg)
    assert cfg.attention_kinds()[1] == (0, 1) and cfg.local_attention // 2 == 8
    ids = jnp.asarray(np.random.default_rng(1).integers(4, 512, size=(1, 40)))
    params = nn.unbox(model.init(jax.random.key(0), ids)["params"])
    # the first (global) layer's attention output zeroed: only the local window carries information
    params["first_layer"]["attn"]["o_proj"]["kernel"] = jnp.zeros_like(params["first_layer"]["attn"]["o_proj"]
                                                                       ["kernel"])
    run = lambda x: model.apply({"params": params}, x)
    base, i = run(ids), 20
    moved = {j: float(jnp.abs(run(ids.at[0, j].set(7)) - base)[0, i].max()) for j in (i - 9, i - 8, i + 8, i + 9)}
    assert moved[i - 9] == moved[i + 9] == 0.0, moved
    assert moved[i - 8] > 1e-4 and moved[i + 8] > 1e-4, moved


def test_classification_learns_through_the_shared_train_step():
    cfg = zoo.config("tiny-modernbert-cls")
    mesh = make_mesh("fsdp=1", jax.devices()[:1])
    trainer = make_trainer(cfg, mesh, OptimConfig(lr=3e-3, warmup_steps=0, decay_steps=40), objective="cls",
                           batch_size=16, seq_len=16)
    state = init_state(trainer, mesh, seed=0)
    rng = np.random.default_rng(0)
    ids = rng.integers(4, 512, size=(16, 16)).astype(np.int32)
    labels = rng.integers(0, 2, size=16).astype(np.int32)
    seg = np.ones_like(ids)
    seg[8:, 12:] = 0
    batch = {"input_ids": ids, "segment_ids": seg, "labels": np.repeat(labels[:, None], 16, 1)}
    losses = []
    for _ in range(40):
        with mesh_context(mesh):
            state, metrics = trainer.step(state, {k: jax.device_put(v, trainer.batch_sharding)
                                                  for k, v in batch.items()})
        losses.append(float(metrics["loss"]))
    assert np.mean(losses[-5:]) < 0.3 * np.mean(losses[:5])


def test_mean_pooling_skips_padding_and_empty_rows_stay_finite():
    """Mean pooling averages real tokens only (what padding holds does not matter), and a row with
    no real token (fine-tuning's filler rows) gives finite logits and a finite loss."""
    from zoo import objectives

    cfg = zoo.config("tiny-modernbert-cls").replace(classifier_pooling="mean")
    model = zoo.build(cfg)
    ids = jnp.asarray(np.random.default_rng(2).integers(4, 512, size=(3, 10)))
    seg = jnp.asarray([[1] * 10, [1] * 6 + [0] * 4, [0] * 10])
    params = model.init(jax.random.key(0), ids)["params"]
    out = model.apply({"params": params}, ids, segment_ids=seg)
    other = model.apply({"params": params}, ids.at[1, 6:].set(9), segment_ids=seg)
    np.testing.assert_allclose(np.asarray(out[1]), np.asarray(other[1]), atol=1e-5)
    assert np.isfinite(np.asarray(out)).all()
    batch = {"input_ids": ids, "segment_ids": seg, "labels": jnp.zeros((3, 10), jnp.int32)}
    loss, _ = objectives.get("cls").loss_fn(model, params, batch, jax.random.key(0))
    assert np.isfinite(float(loss))
