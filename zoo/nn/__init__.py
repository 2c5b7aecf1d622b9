"""Shared building blocks of the model families; import each from its module.

    linear.py     Dense with logical axis names, param_with_axes, default_init
    norms.py      RMSNorm, LayerNorm
    embed.py      Embed (token / position / type tables)
    rope.py       rope_frequencies, apply_rope
    mlp.py        MLP (gated or plain), ACTIVATIONS
    attention.py  SelfAttention through kernels.attention, with a KV cache for decoding
    blocks.py     DecoderBlock (pre-norm)
    masks.py      default_positions, mask_to_segment_ids, encoder_segment_ids, check_inputs
    scan.py       scan_layers (nn.scan + remat), CHECKPOINT_POLICIES
    mla.py        MLAttention (DeepSeek's multi-head latent attention, latent KV cache)
    vocab_head.py VocabHead (the output projection, described), VocabProjection, lm_head
    chunked_ce.py vocab_stats: cross-entropy statistics over vocabulary blocks (custom_vjp)
    losses.py     next_token_targets, cross_entropy_sums, vocab_cross_entropy_sums

Letter legend (STYLE.md): B batch, T/S length, D model dim, N heads, K kv heads,
H head dim, F mlp, V vocab, L layers.
"""
