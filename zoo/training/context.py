"""What context parallelism cannot train, refused before compiling (one line each).

With a mesh whose `context` axis has N > 1 devices the rules split every row's length over them:
each shard holds two of the row's 2N zig-zag chunks (kernels/context.py), attention runs through
`kernels.attention(..., context_parallel=cfg.context_parallel)` ("allgather" or "ring"), and the
causal LM objective puts tokens, positions and targets into that order (zoo.objectives.to_context_order).
`check_context` is the one place that says which runs this covers; pretrain.py (as a UsageError)
and plan.py (as a PlanError) call it where the mesh is checked.
"""

from __future__ import annotations

from zoo import registry

CONTEXT_OBJECTIVE = "clm"  # the objective that reorders its rows (zoo.objectives.causal_lm_loss)


def context_size(mesh) -> int:
    """The size of `mesh`'s context axis (1 where it has none)."""
    return dict(mesh.shape).get("context", 1)


def attention_windows(cfg) -> tuple[int, ...]:
    """The sliding windows the model's layers use (Gemma's local layers, Mistral, GPT-OSS), largest first."""
    if hasattr(cfg, "attention_kinds"):
        windows = {kind[0] for kind in cfg.attention_kinds()[0] if kind[0] is not None}
    else:
        windows = {w for w in (getattr(cfg, "sliding_window", None),) if w is not None}
    return tuple(sorted(windows, reverse=True))


def check_context(cfg, objective: str, mesh, seq_len: int) -> None:
    """Raises ValueError, one line, when `mesh` splits the length over its context axis and the run
    cannot train that way: a family without context parallelism (registry `Family.context_parallel`),
    an objective other than the causal LM, what reads a token's index in the row (Llama 4's attention
    temperature and chunked attention, DeepSeek's multi-token prediction), a row that does not cut
    into 2 x context zig-zag chunks, or a ring over a window longer than a chunk + 1. Nothing when
    the axis has one device."""
    context = context_size(mesh)
    if context <= 1:
        return
    where = f"--mesh context={context}"
    if not registry.of(cfg).context_parallel:
        trains = ", ".join(registry.names(context_parallel=True))
        raise ValueError(f"{where}: context parallelism trains {trains} models, not the {cfg.family} model "
                         f"{cfg.name!r}")
    if objective != CONTEXT_OBJECTIVE:
        raise ValueError(f"{where}: context parallelism trains --objective {CONTEXT_OBJECTIVE} (causal LM), "
                         f"not {objective}")
    for field in ("attn_temperature_tuning", "attention_chunk_size"):
        if getattr(cfg, field, None):
            raise ValueError(f"{where}: model {cfg.name!r} has {field}={getattr(cfg, field)} (Llama 4), which "
                             "reads each token's index in the row; context parallelism reorders the row")
    if getattr(cfg, "num_mtp_layers", 0):
        raise ValueError(f"{where}: model {cfg.name!r} has num_mtp_layers={cfg.num_mtp_layers}: multi-token "
                         "prediction shifts rows, which context parallelism reorders (--override num_mtp_layers=0)")
    if seq_len % (2 * context):
        raise ValueError(f"--seq-len {seq_len} must divide by 2 x context = {2 * context} (zig-zag chunks of "
                         f"{where})")
    chunk = seq_len // (2 * context)
    windows = attention_windows(cfg)
    if cfg.context_parallel == "ring" and windows and windows[0] - 1 > chunk:
        raise ValueError(f"ring context parallelism needs sliding_window - 1 <= seq_len / (2 x context); model "
                         f"{cfg.name!r} has sliding_window={windows[0]} and {seq_len} / {2 * context} = {chunk}: "
                         "use --context-parallel allgather")
