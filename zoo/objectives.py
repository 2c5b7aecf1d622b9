"""Training objectives: what the one train step minimises, chosen by `--objective`.

An objective names the batch fields it reads and a loss function

    loss_fn(model, params, batch, rng, *, z_loss) -> (loss_sum, sums)

that returns the SUM of per-target losses and a dict of summed metrics holding at
least "weight", the number of targets. The train step adds these over gradient-
accumulation microbatches and divides by the total weight once, so accumulating
microbatches gives exactly the token-weighted mean of the whole batch (no bias from
microbatches with different numbers of real tokens). Every other entry of `sums`
is reported divided by the weight.

Masked LM, span corruption and classification plug in as further `register(...)`
calls (their data fields come from the pipeline); the train step stays the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from kernels.context import zigzag_order
from zoo import registry
from zoo.nn.losses import cross_entropy_sums, next_token_targets, vocab_cross_entropy_sums  # noqa: F401 (API)
from zoo.sharding import logical_size


@dataclass(frozen=True)
class Objective:
    """A loss for the train step: the batch fields it needs and the function computing it."""

    name: str
    fields: tuple[str, ...]
    loss_fn: Callable
    description: str = ""


OBJECTIVES: dict[str, Objective] = {}


def register(objective: Objective) -> Objective:
    """Adds an objective to the registry (the `--objective` choices)."""
    OBJECTIVES[objective.name] = objective
    return objective


def get(name: str) -> Objective:
    """The objective called `name`; unknown names raise ValueError listing the known ones."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; known: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name]


def check_trains(name: str, cfg) -> None:
    """ValueError unless objective `name` can train `cfg`'s family: its record in zoo.registry lists it."""
    if name not in registry.of(cfg).objectives:
        trains = ", ".join(registry.supporting(objective=name)) or "no"
        raise ValueError(f"objective {name!r} trains {trains} models, not the {cfg.family} model {cfg.name!r}")


AUX_LOSS_COLLECTION = "aux_loss"
# Per-layer expert loads [layers, E] a model sows for a non-gradient router update after the step
# (DeepSeek-V3's auxiliary-loss-free balancing; the family's `after_step`). Models whose config
# says `balances_routers` sow it; it travels in the loss sums under this name.
ROUTER_LOAD = "router_load"


def apply_with_aux_losses(model, params, *args, **kwargs):
    """`model.apply` that also returns the auxiliary losses the model sows.

    A model with auxiliary losses (MoE routers) declares their weights in
    `model.cfg.aux_loss_weights` and sows one scalar per name into the "aux_loss"
    collection. Returns (output, {name: scalar}); models without any apply exactly as before.
    With `model.cfg.balances_routers`, the expert loads the model sows into ROUTER_LOAD come back
    too, under that name (an array, not a loss; `add_aux_losses` passes it on).
    """
    if not getattr(model.cfg, "aux_loss_weights", None):
        return model.apply({"params": params}, *args, **kwargs), {}
    load = getattr(model.cfg, "balances_routers", False)
    mutable = [AUX_LOSS_COLLECTION] + ([ROUTER_LOAD] if load else [])
    out, variables = model.apply({"params": params}, *args, mutable=mutable, **kwargs)
    sown = variables.get(AUX_LOSS_COLLECTION, {})
    losses = {name: sum(jax.tree.leaves(values)) for name, values in sown.items()}
    if load:
        losses[ROUTER_LOAD] = sum(jax.tree.leaves(variables[ROUTER_LOAD]))
    return out, losses


def add_aux_losses(model, total, sums, aux_losses):
    """Adds weight_name * loss_name to the loss for every auxiliary loss, and reports each.

    Both are scaled by the number of targets, like every entry of `sums`, so the train
    step's division by the total weight gives the per-token mean loss plus the weighted
    auxiliary losses (token-weighted over gradient-accumulation microbatches).
    """
    if not aux_losses:
        return total, sums
    weights, sums, aux_losses = model.cfg.aux_loss_weights, dict(sums), dict(aux_losses)
    if ROUTER_LOAD in aux_losses:  # expert counts, summed over microbatches by the step as they are
        sums[ROUTER_LOAD] = aux_losses.pop(ROUTER_LOAD)
    for name, value in aux_losses.items():
        if name not in weights:
            raise ValueError(f"model {model.cfg.name!r} sows auxiliary loss {name!r} but declares no weight for it")
        total = total + weights[name] * value * sums["weight"]
        sums[name] = value * sums["weight"]
    return total, sums


def vocab_loss_sums(model, params, targets_BT, valid_BT, z_loss, *args, **kwargs):
    """The model applied to (*args, **kwargs), then the summed cross-entropy of its vocabulary
    logits on the targets, plus the auxiliary losses it sows. With cfg.loss_vocab_block > 0 the
    model returns its hidden states and head instead of the logits and the cross-entropy runs over
    vocabulary blocks (zoo/nn/chunked_ce.py): the [B, T, V] logits never exist."""
    block = model.cfg.loss_vocab_block
    if block:
        (h_BTD, head), aux_losses = apply_with_aux_losses(model, params, *args, return_head=True, **kwargs)
        total, sums = vocab_cross_entropy_sums(h_BTD, head, targets_BT, valid_BT, z_loss, vocab_block=block)
    else:
        logits_BTV, aux_losses = apply_with_aux_losses(model, params, *args, **kwargs)
        total, sums = cross_entropy_sums(logits_BTV, targets_BT, valid_BT, z_loss)
    return add_aux_losses(model, total, sums, aux_losses)


def to_context_order(*arrays_BT):
    """[B, T] arrays in the zig-zag row order of context parallelism (`kernels.context`) when the
    mesh and rules in context shard the length; unchanged otherwise. Every per-token quantity of a
    row takes the same static permutation, so sums over tokens are unchanged."""
    shards = logical_size("length")
    if shards == 1:
        return arrays_BT
    order = zigzag_order(arrays_BT[0].shape[1], shards)
    return tuple(nn.with_logical_constraint(x[:, order], ("batch", "length")) for x in arrays_BT)


def causal_lm_loss(model, params, batch, rng, *, z_loss: float = 0.0):
    """Next-token prediction on packed rows (attention and targets stay inside each document),
    plus any auxiliary losses the model sows (MoE load balancing and router z-loss). Targets are
    taken in natural order, then a context-parallel run reorders every token field alike."""
    del rng  # deterministic forward; dropout-style objectives use it
    targets_BT, valid_BT = next_token_targets(batch["input_ids"], batch["segment_ids"])
    ids_BT, positions_BT, segments_BT, targets_BT, valid_BT = to_context_order(
        batch["input_ids"], batch["positions"], batch["segment_ids"], targets_BT, valid_BT)
    return vocab_loss_sums(model, params, targets_BT, valid_BT, z_loss, ids_BT,
                           positions=positions_BT, segment_ids=segments_BT)


register(Objective("clm", ("input_ids", "segment_ids", "positions"), causal_lm_loss,
                   "causal language modelling: next-token cross-entropy within each packed document"))


# --- encoder objectives: masked LM (BERT), span corruption (T5), classification ----------
# Corruption happens inside the step from its rng, so the data pipeline stays the same
# packed rows (input_ids, segment_ids, positions) for every objective.


def _require_model(model, objective: str, head: str | None = None) -> None:
    """The family must support `objective`; `head`: the head it needs (BertConfig.HEADS: mlm, classify)."""
    cfg = model.cfg
    check_trains(objective, cfg)
    if head and getattr(cfg, "head", None) != head:
        need = cfg.with_head(head) if hasattr(cfg, "with_head") else head
        raise ValueError(f"objective {objective!r} needs {need}; model {cfg.name!r} is "
                         f"{getattr(cfg, 'architecture', cfg.family)}")


def mask_tokens(input_ids_BT, segment_ids_BT, rng, *, vocab_size: int, mask_token_id: int, rate: float = 0.15):
    """BERT's corruption: `rate` of the real tokens are selected; of those 80% become
    [MASK], 10% a random token, 10% stay. Returns (corrupted ids, selected mask)."""
    k_select, k_kind, k_random = jax.random.split(rng, 3)
    selected_BT = (jax.random.uniform(k_select, input_ids_BT.shape) < rate) & (segment_ids_BT > 0)
    kind_BT = jax.random.uniform(k_kind, input_ids_BT.shape)
    random_BT = jax.random.randint(k_random, input_ids_BT.shape, 0, vocab_size, input_ids_BT.dtype)
    corrupted_BT = jnp.where(kind_BT < 0.8, mask_token_id, jnp.where(kind_BT < 0.9, random_BT, input_ids_BT))
    return jnp.where(selected_BT, corrupted_BT, input_ids_BT), selected_BT


def masked_lm_loss(model, params, batch, rng, *, z_loss: float = 0.0):
    """Masked LM (*ForMaskedLM): cross-entropy on the selected positions only."""
    _require_model(model, "mlm", "mlm")
    cfg = model.cfg
    inputs_BT, selected_BT = mask_tokens(batch["input_ids"], batch["segment_ids"], rng, vocab_size=cfg.vocab_size,
                                         mask_token_id=cfg.mask_token_id)
    return vocab_loss_sums(model, params, batch["input_ids"], selected_BT, z_loss, inputs_BT,
                           positions=batch["positions"], segment_ids=batch["segment_ids"])


def random_spans_noise_mask(rng, length: int, noise_density: float = 0.15, mean_span_length: float = 3.0):
    """T5's noise mask for one row of static `length`: round(length * density) noise
    tokens in round(noise / mean_span_length) spans, span and gap lengths drawn as
    random partitions, alternating gap, span, gap, ... Returns bool [length]."""
    num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    num_spans = max(int(round(num_noise / mean_span_length)), 1)

    def partition(key, items: int):  # `items` split into num_spans positive parts
        first_BT = jax.random.permutation(key, jnp.arange(items - 1) < num_spans - 1)
        part_ids = jnp.cumsum(jnp.concatenate([jnp.zeros((1,), jnp.int32), first_BT.astype(jnp.int32)]))
        return jax.ops.segment_sum(jnp.ones(items, jnp.int32), part_ids, num_segments=num_spans)

    k_noise, k_gaps = jax.random.split(rng)
    lengths = jnp.stack([partition(k_gaps, length - num_noise), partition(k_noise, num_noise)], axis=1).reshape(-1)
    starts = jnp.cumsum(lengths)[:-1]
    span_number = jnp.cumsum(jnp.zeros(length, jnp.int32).at[starts].set(1))
    return span_number % 2 == 1


def span_corruption(input_ids_BT, segment_ids_BT, rng, *, first_sentinel_id: int, decoder_start_id: int,
                    noise_density: float = 0.15, mean_span_length: float = 3.0):
    """T5 span corruption of packed rows, on device with static shapes.

    Each noise span (never crossing a document) becomes one sentinel in the encoder
    input, <extra_id_0>, <extra_id_1>, ... counting down from first_sentinel_id and
    restarting in every document; the targets are each sentinel followed by the
    tokens it hid. Both are compacted to the left of a [B, T] row (0-padded; they
    always fit) and every token keeps its document's segment id, so cross-attention
    and decoder self-attention stay inside one document.

    Returns dict(input_ids, segment_ids, decoder_input_ids, decoder_segment_ids, targets).
    """
    b, t = input_ids_BT.shape
    real_BT = segment_ids_BT > 0
    noise_BT = jax.vmap(lambda k: random_spans_noise_mask(k, t, noise_density, mean_span_length))(
        jax.random.split(rng, b)) & real_BT
    same_doc_BT = jnp.pad(segment_ids_BT[:, 1:] == segment_ids_BT[:, :-1], ((0, 0), (1, 0)))
    prev_noise_BT = jnp.pad(noise_BT[:, :-1], ((0, 0), (1, 0)))
    start_BT = noise_BT & ~(prev_noise_BT & same_doc_BT)
    # Sentinel number: spans started so far in the row minus those before this document.
    started_BT = jnp.cumsum(start_BT, axis=1)
    before_doc_BT = jax.lax.cummax(jnp.where(~same_doc_BT, started_BT - start_BT, 0), axis=1)
    sentinel_BT = first_sentinel_id - (started_BT - 1 - before_doc_BT)

    def compact(values_BT, keep_BT, dest_BT):
        dest_BT = jnp.where(keep_BT, dest_BT, t)  # out of range: dropped
        rows_BT = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
        return jnp.zeros((b, t), values_BT.dtype).at[rows_BT, dest_BT].set(values_BT, mode="drop")

    keep_enc_BT = real_BT & (~noise_BT | start_BT)
    enc_dest_BT = jnp.cumsum(keep_enc_BT, axis=1) - 1
    enc_ids_BT = compact(jnp.where(start_BT, sentinel_BT, input_ids_BT), keep_enc_BT, enc_dest_BT)
    enc_seg_BT = compact(segment_ids_BT, keep_enc_BT, enc_dest_BT)

    tok_dest_BT = jnp.cumsum(noise_BT.astype(jnp.int32) * (1 + start_BT), axis=1) - 1  # sentinel first
    targets_BT = compact(input_ids_BT, noise_BT, tok_dest_BT)
    targets_BT = jnp.maximum(targets_BT, compact(sentinel_BT, start_BT, tok_dest_BT - 1))
    dec_seg_BT = compact(segment_ids_BT, noise_BT, tok_dest_BT)
    dec_seg_BT = jnp.maximum(dec_seg_BT, compact(segment_ids_BT, start_BT, tok_dest_BT - 1))

    shifted_same_BT = jnp.pad(dec_seg_BT[:, 1:] == dec_seg_BT[:, :-1], ((0, 0), (1, 0)))
    dec_in_BT = jnp.where(shifted_same_BT, jnp.pad(targets_BT[:, :-1], ((0, 0), (1, 0))), decoder_start_id)
    return dict(input_ids=enc_ids_BT, segment_ids=enc_seg_BT, decoder_input_ids=dec_in_BT,
                decoder_segment_ids=dec_seg_BT, targets=targets_BT)


def span_corruption_loss(model, params, batch, rng, *, z_loss: float = 0.0):
    """T5 span corruption (noise density 0.15, mean span 3): cross-entropy on the targets."""
    _require_model(model, "span")
    cfg = model.cfg
    s = span_corruption(batch["input_ids"], batch["segment_ids"], rng, first_sentinel_id=cfg.first_sentinel_id,
                        decoder_start_id=cfg.decoder_start_token_id)
    return vocab_loss_sums(model, params, s["targets"], s["decoder_segment_ids"] > 0, z_loss, s["input_ids"],
                           decoder_input_ids=s["decoder_input_ids"], segment_ids=s["segment_ids"],
                           decoder_segment_ids=s["decoder_segment_ids"])


def classification_loss(model, params, batch, rng, *, z_loss: float = 0.0):
    """Sequence classification: cross-entropy of the class logits on `labels`.

    One example per row; `labels` is [B, T] like every batch field (the label repeated
    along the row, only column 0 is read); rows with no real token carry no weight.
    """
    del rng
    _require_model(model, "cls", "classify")
    logits_BC = model.apply({"params": params}, batch["input_ids"], segment_ids=batch["segment_ids"])
    valid_B1 = jnp.any(batch["segment_ids"] > 0, axis=1, keepdims=True)
    return cross_entropy_sums(logits_BC[:, None, :], batch["labels"][:, :1], valid_B1, z_loss)


register(Objective("mlm", ("input_ids", "segment_ids", "positions"), masked_lm_loss,
                   "masked LM (BERT): 15% of tokens, 80% [MASK] / 10% random / 10% kept; loss on those only"))
register(Objective("span", ("input_ids", "segment_ids"), span_corruption_loss,
                   "T5 span corruption: noise density 0.15, mean span 3, sentinels per document"))
register(Objective("cls", ("input_ids", "segment_ids", "labels"), classification_loss,
                   "sequence classification: cross-entropy of the class logits on labels[:, 0]"))


# --- supervised text-to-text (T5 fine-tuning; train.py --task seq2seq) ----------------


def seq2seq_loss(model, params, batch, rng, *, z_loss: float = 0.0):
    """Teacher-forced cross-entropy of an encoder-decoder on (input, target) pairs.

    No corruption: the pipeline gives the encoder rows (input_ids, segment_ids) and the
    decoder rows (decoder_input_ids = targets shifted right within each pair,
    decoder_segment_ids) with `targets`; the loss covers every real target token.
    """
    del rng
    _require_model(model, "seq2seq")
    return vocab_loss_sums(model, params, batch["targets"], batch["decoder_segment_ids"] > 0, z_loss,
                           batch["input_ids"], decoder_input_ids=batch["decoder_input_ids"],
                           segment_ids=batch["segment_ids"], decoder_segment_ids=batch["decoder_segment_ids"])


register(Objective("seq2seq", ("input_ids", "segment_ids", "decoder_input_ids", "decoder_segment_ids", "targets"),
                   seq2seq_loss, "supervised seq2seq (T5): teacher-forced cross-entropy on the target tokens"))
