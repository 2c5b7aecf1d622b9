"""Pretraining: `python train.py` (--task pretrain): an objective on raw text, synthetic tokens or
the Python standard library's sources, with an optional held-out --eval-data."""

from __future__ import annotations

import json
import math
import os
import time

import jax
import numpy as np

import zoo
from zoo import configs, data, objectives, registry
from zoo.checkpoint import Checkpointer
from zoo.hf.convert import config_from_hf
from zoo.sharding import check_divisible, make_mesh
from zoo.training import run_dir
from zoo.training.config import TrainConfig, UsageError
from zoo.training.context import check_context
from zoo.training.distributed import barrier
from zoo.training.loop import Hooks, report_stop, run_loop
from zoo.training.metrics import MetricsLog, peak_flops_per_device, plot_loss
from zoo.training.step import batch_shards, init_state, make_eval_step, make_trainer


def load_model_config(name: str, overrides: dict):
    """A preset, or an HF config.json (or a dir holding one), with dtype/remat overrides."""
    if name.endswith(".json") or os.path.isdir(name):
        path = os.path.join(name, "config.json") if os.path.isdir(name) else name
        if not os.path.isfile(path):
            raise UsageError(f"--model {name}: no config.json there")
        with open(path) as f:
            try:
                cfg = config_from_hf(json.load(f))
            except (ValueError, KeyError) as e:
                raise UsageError(f"--model {path}: {e}") from None
    else:
        try:
            cfg = zoo.config(name)
        except ValueError as e:
            raise UsageError(str(e)) from None
    return with_overrides(cfg, overrides)


def with_overrides(cfg, overrides: dict):
    """`zoo.configs.with_overrides`, its errors as UsageError (one line, status 2)."""
    try:
        return configs.with_overrides(cfg, overrides)
    except ValueError as e:
        raise UsageError(str(e)) from None


def check_objective(cfg, objective: str) -> None:
    """The objective can train this model's family (read from the registry)."""
    if objective not in registry.of(cfg).objectives:
        trains = ", ".join(registry.supporting(objective=objective))
        raise UsageError(f"--objective {objective} trains {trains} models, not the {cfg.family} model {cfg.name!r}")


def check_batch_split(config: TrainConfig, mesh) -> None:
    """Each microbatch splits over the mesh's batch shards and the processes."""
    micro = config.batch_size // config.grad_accum
    shards = batch_shards(mesh)
    if micro % shards:
        raise UsageError(f"microbatch of {micro} rows does not split over the {shards} batch shards of "
                         f"--mesh {config.mesh} (data*fsdp*expert)")
    if config.batch_size % jax.process_count():
        raise UsageError(f"--batch-size {config.batch_size} does not split over {jax.process_count()} processes")


def make_run_mesh(config: TrainConfig, cfg, *, objective: str | None = None, seq_len: int | None = None):
    """--mesh, checked against the model, the batch and (with a context axis, `check_context`) the
    objective and row length: --objective and --seq-len unless given (fine-tuning sets its own)."""
    try:
        mesh = make_mesh(config.mesh)
        check_divisible(cfg, mesh)
        check_batch_split(config, mesh)  # UsageError, not caught here
        check_context(cfg, objective or config.objective, mesh, config.seq_len if seq_len is None else seq_len)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return mesh


def _vocab_override(value, tokenizer) -> int | None:
    if value is None:
        return None
    if value == "tokenizer":
        if tokenizer is None:
            raise UsageError("--vocab-size tokenizer needs --tokenizer (or a tokenizer already in --out)")
        return -(-tokenizer.vocab_size // 128) * 128
    try:
        vocab = int(value)
    except ValueError:
        raise UsageError(f"--vocab-size: expected a positive integer or 'tokenizer', got {value!r}") from None
    if vocab <= 0:
        raise UsageError(f"--vocab-size: expected a positive integer or 'tokenizer', got {value!r}")
    return vocab


def _documents(paths, config: TrainConfig, flag: str):
    cap = config.data_max_bytes if config.data_max_bytes is not None else (
        data.STDLIB_MAX_BYTES if paths == [data.STDLIB] else 0)
    try:
        return data.DocumentSource(paths, max_bytes=cap, split_bytes=config.split_bytes)
    except (FileNotFoundError, ImportError, data.DataError) as e:
        raise UsageError(str(e) if flag in str(e) else f"{flag}: {e}") from None


def resolve_inputs(config: TrainConfig):
    """Validates flags and inputs (no compilation): (cfg, mesh, source, eval source, tokenizer or None)."""
    cfg = load_model_config(config.model, config.model_overrides())
    config = config.with_model_objective(cfg)
    check_objective(cfg, config.objective)
    objective = objectives.get(config.objective)
    missing = [f for f in objective.fields if f not in data.BATCH_FIELDS]
    if missing:  # labels / targets come from fine-tuning data, not from raw text
        raise UsageError(f"--objective {config.objective} needs {', '.join(missing)}, which pretraining on raw text "
                         "does not produce; fine-tune with --task classify or --task seq2seq")
    if config.seq_len > cfg.max_seq_len:
        raise UsageError(f"--seq-len {config.seq_len} exceeds max_seq_len={cfg.max_seq_len} of model {cfg.name!r}")
    sampled = registry.of(cfg).causal_lm
    if config.sample_tokens >= cfg.max_seq_len and config.data != ["synthetic"] and sampled:
        raise UsageError(f"--sample-tokens {config.sample_tokens} leaves no room for the prompt in the "
                         f"{cfg.max_seq_len} positions of model {cfg.name!r}")
    run_dir.check_run_out(config)
    mesh = make_run_mesh(config, cfg)
    if config.data == ["synthetic"]:
        if config.eval_data:
            raise UsageError("--eval-data needs text --data (a tokenizer); synthetic tokens have none")
        vocab = _vocab_override(config.vocab_size, None)
        return (cfg.replace(vocab_size=vocab) if vocab else cfg), mesh, None, None, None
    source = _documents(config.data, config, "--data")
    if len(source) < jax.process_count():
        raise UsageError(f"--data holds {len(source)} documents, fewer than the {jax.process_count()} processes")
    eval_source = _documents(config.eval_data, config, "--eval-data") if config.eval_data else None

    tokenizer = None
    tok_path = config.tokenizer or os.path.join(config.out, "tokenizer.model")
    if config.tokenizer and not os.path.isfile(config.tokenizer):
        raise UsageError(f"--tokenizer file does not exist: {config.tokenizer}")
    if os.path.isfile(tok_path):
        try:
            tokenizer = data.Tokenizer(tok_path)
        except Exception as e:  # sentencepiece/tokenizers raise assorted types on a bad file
            raise UsageError(f"cannot load tokenizer {tok_path}: {e}") from None
    vocab = _vocab_override(config.vocab_size, tokenizer)
    if vocab:
        cfg = cfg.replace(vocab_size=vocab)
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise UsageError(f"tokenizer {tok_path} has {tokenizer.vocab_size} tokens but model {cfg.name!r} has "
                         f"vocab_size={cfg.vocab_size}; pass --vocab-size tokenizer")
    _check_sample_fits(config, cfg, tokenizer)
    try:
        check_divisible(cfg, mesh)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return cfg, mesh, source, eval_source, tokenizer


def _check_sample_fits(config: TrainConfig, cfg, tokenizer) -> None:
    """The final sample needs its prompt plus --sample-tokens within the model's positions:
    checked before the first step, not found out at the end of the run."""
    if not config.sample_tokens or tokenizer is None or not registry.of(cfg).causal_lm:
        return
    prompt = len(tokenizer.encode(config.sample_prompt)) or 1
    if prompt + config.sample_tokens > cfg.max_seq_len:
        raise UsageError(f"--sample-prompt ({prompt} tokens) + --sample-tokens {config.sample_tokens} exceed the "
                         f"{cfg.max_seq_len} positions of model {cfg.name!r}; lower --sample-tokens")


def _train_tokenizer(config: TrainConfig, cfg, source):
    """Process 0 trains the run's tokenizer into <out>/tokenizer.model; a corpus it cannot be
    trained on is a UsageError (one line), and nothing is left behind."""
    path = os.path.join(config.out, "tokenizer.model")
    t0 = time.time()
    try:
        tokenizer = data.train_tokenizer(source, path, vocab_size=cfg.vocab_size)
    except RuntimeError as e:  # sentencepiece: too little text for the vocabulary, and the like
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise UsageError(f"--data: cannot train a {cfg.vocab_size}-token tokenizer on {len(source)} documents "
                         f"({reason}); pass more text or --tokenizer FILE") from None
    print(f"trained a {tokenizer.vocab_size}-token sentencepiece BPE tokenizer on {len(source)} documents "
          f"in {time.time() - t0:.1f}s -> {path}")
    return tokenizer


def _tokenizer_for_run(config: TrainConfig, cfg, source, tokenizer):
    """The tokenizer, trained by process 0 when missing (the others wait and load it)."""
    primary = jax.process_index() == 0
    if source is not None and tokenizer is None:
        if primary:
            tokenizer = _train_tokenizer(config, cfg, source)
        barrier("tokenizer")
        if not primary:
            tokenizer = data.Tokenizer(os.path.join(config.out, "tokenizer.model"))
    _check_sample_fits(config, cfg, tokenizer)
    return tokenizer


def sample(model, params, tokenizer, prompt: str, *, max_new_tokens: int, temperature: float, seed: int) -> str:
    """Text continuing `prompt`, sampled with zoo.generate (KV cache) from the trained params."""
    ids = tokenizer.encode(prompt) or [tokenizer.eos_id or 0]
    host_params = jax.device_get(params)  # sampling is a demo: one device, no mesh
    # Only ids the tokenizer can decode: the model's vocabulary may be padded past it.
    new = zoo.generate(model, host_params, np.asarray([ids], np.int32), max_new_tokens=max_new_tokens,
                       temperature=temperature, top_k=40 if temperature > 0 else None, seed=seed,
                       vocab_limit=tokenizer.vocab_size)
    new = [int(t) for t in jax.device_get(new)[0]]
    if tokenizer.eos_id is not None and tokenizer.eos_id in new:
        new = new[: new.index(tokenizer.eos_id)]
    return prompt + tokenizer.decode(new)


# ------------------------------------------------------------------------ held-out evaluation


def packed_rows(source, tokenizer, seq_len: int) -> dict:
    """The held-out documents tokenized (each ending with eos) and packed into rows, in order, once:
    {input_ids, segment_ids, positions} int32 [rows, seq_len]; the last row is padded (segment 0)."""
    ids, seg = [], []
    for k, text in enumerate(source):
        tokens = list(tokenizer.encode(text)) + ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
        ids.extend(tokens)
        seg.extend([k % 1_000_000 + 1] * len(tokens))
    rows = max(math.ceil(len(ids) / seq_len), 1)
    flat_ids, flat_seg = np.zeros(rows * seq_len, np.int32), np.zeros(rows * seq_len, np.int32)
    flat_ids[: len(ids)], flat_seg[: len(seg)] = ids, seg
    seg_RT = flat_seg.reshape(rows, seq_len)
    return {"input_ids": flat_ids.reshape(rows, seq_len), "segment_ids": seg_RT,
            "positions": data.restart_positions(seg_RT)}


class PretrainHooks(Hooks):
    """Held-out loss and perplexity of --eval-data every --eval-every steps."""

    def __init__(self, config: TrainConfig, trainer, rows: dict | None):
        self.trainer, self.rows, self.config = trainer, rows, config
        self.eval_every = (config.eval_every or config.checkpoint_every) if rows is not None else None
        self._step = make_eval_step(trainer, config.objective) if rows is not None else None

    def evaluate(self, state, step: int) -> dict:
        b, n = self.config.batch_size, len(self.rows["input_ids"])
        local = b // jax.process_count()
        first = jax.process_index() * local
        nll = weight = 0.0
        rng = jax.random.PRNGKey(self.config.seed)  # the same masks every time (mlm / span)
        for a in range(0, n, b):
            batch = {}
            for k in self.trainer.batch_fields:
                rows = np.zeros((b, self.rows[k].shape[1]), np.int32)
                chunk = self.rows[k][a:a + b]
                rows[: len(chunk)] = chunk
                batch[k] = jax.make_array_from_process_local_data(self.trainer.batch_sharding,
                                                                  rows[first:first + local])
            s, w = self._step(state["params"], batch, rng)
            nll, weight = nll + float(s), weight + float(w)
        loss = nll / max(weight, 1.0)
        figures = {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0)), "eval_tokens": weight}
        if jax.process_index() == 0:
            print(f"step {step}: eval loss {loss:.4f}, perplexity {figures['eval_perplexity']:.2f} "
                  f"({int(weight)} held-out targets)")
        return figures


# ------------------------------------------------------------------------------- the run


def run(config: TrainConfig) -> dict:
    """Pretrains as `config` says; returns the summary (UsageError / NonFiniteStop on failure)."""
    cfg, mesh, source, eval_source, tokenizer = resolve_inputs(config)
    config = config.with_model_objective(cfg)
    with run_dir.run_dir(config.out, jax.process_index() == 0):
        return _run_locked(config, cfg, mesh, source, eval_source, tokenizer)


def _run_locked(config: TrainConfig, cfg, mesh, source, eval_source, tokenizer) -> dict:
    primary = jax.process_index() == 0
    ckpt_dir = os.path.join(config.out, "checkpoints")
    if primary and os.path.isdir(ckpt_dir):
        run_dir.remove_incomplete_saves(ckpt_dir)
    barrier("stale-saves")
    start = run_dir.restorable_step(config, cfg, ckpt_dir, config.seq_len)
    if start is not None:
        run_dir.check_resume_flags(config, start, config.steps)
    tokenizer = _tokenizer_for_run(config, cfg, source, tokenizer)
    if primary:
        run_dir.write_args(config, cfg, tokenizer, resumed=start is not None)
    ckpt = Checkpointer(ckpt_dir, keep=config.keep_checkpoints)

    local_batch = config.batch_size // jax.process_count()
    if source is None:
        batches = data.SyntheticIterator(vocab_size=cfg.vocab_size, seq_len=config.seq_len, batch_size=local_batch,
                                         seed=config.seed, process_index=jax.process_index())
    else:
        batches = data.DataIterator(data.text_dataset(
            source, tokenizer, seq_len=config.seq_len, batch_size=local_batch, seed=config.seed,
            process_index=jax.process_index(), process_count=jax.process_count(),
            shuffle_window=config.shuffle_window))

    t0 = time.time()
    trainer = make_trainer(cfg, mesh, config.optim(), objective=config.objective, batch_size=config.batch_size,
                           seq_len=config.seq_len, grad_accum=config.grad_accum, z_loss=config.z_loss)
    compile_s = time.time() - t0
    if start is None:
        state, start = init_state(trainer, mesh, config.seed), 0
    else:
        state = run_dir.restore(ckpt, start, trainer, batches, config.out)
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    peak, peak_src = peak_flops_per_device(config.peak_flops)
    if primary:
        print(f"model {cfg.name}: {n_params / 1e6:.2f}M params, mesh {dict(mesh.shape)}, {jax.device_count()} "
              f"devices in {jax.process_count()} process(es), step compiled in {compile_s:.1f}s; "
              f"MFU peak {peak:.3g} FLOP/s/device ({peak_src})")
    if start >= config.steps and primary:
        print(f"{config.out} already holds a checkpoint at step {start} >= --steps {config.steps}: nothing to train "
              "(pass --out DIR for a fresh run, or a larger --steps)")

    rows = packed_rows(eval_source, tokenizer, config.seq_len) if eval_source is not None else None
    # A resumed run's log restarts at its checkpoint: records of steps the killed run took
    # after it are dropped (they are retrained), in metrics.jsonl and TensorBoard alike.
    log = MetricsLog(config.out, resume_step=start) if primary else None
    result = run_loop(trainer, mesh, state, batches, start=start, total=config.steps, ckpt=ckpt, log=log,
                      checkpoint_every=config.checkpoint_every, log_every=config.log_every,
                      max_nonfinite=config.max_nonfinite, flops_per_token=cfg.flops_per_token(config.seq_len),
                      peak_flops=peak, hooks=PretrainHooks(config, trainer, rows),
                      progress=primary and not config.no_progress)
    history = log.history() if log is not None else []
    if log is not None:
        log.close()
    if history:
        plot_loss(history, os.path.join(config.out, "loss.png"))
    last = report_stop(result, config.out)
    summary = {"start_step": start, "steps": config.steps, "last_step": last, "losses": result.losses,
               "out": config.out, "stopped": result.stopped,
               "eval": [{k: r[k] for k in r if k == "step" or k.startswith("eval_")}
                        for r in result.records if "eval_loss" in r]}
    if history and primary:
        print(f"loss {history[0]['loss']:.3f} (step {history[0]['step']}) -> {history[-1]['loss']:.3f} "
              f"(step {history[-1]['step']}); metrics in {log.path}")
    # Sampling is a one-device demo; with several processes the params are not all on this host.
    if (not result.stopped and jax.process_count() == 1 and config.sample_tokens and tokenizer is not None
            and registry.of(cfg).causal_lm):
        text = sample(trainer.model, result.state["params"], tokenizer, config.sample_prompt,
                      max_new_tokens=config.sample_tokens, temperature=config.temperature, seed=config.seed)
        summary["sample"] = text
        print("---- sample " + "-" * 60)
        print(text)
        print("-" * 72)
    return summary
