"""A float64 numpy DeepSeek layer, independent of the zoo's modules: transformers' routing
(`np_route`), multi-head latent attention in the expanded form with half-split RoPE (no YaRN),
DeepSeekMoE, and the multi-token-prediction depth with its masked cross-entropy. It reads the
zoo's parameter tree (names only) and nothing else of the zoo."""

from __future__ import annotations

import numpy as np


def np_route(logits, bias, k, method, groups, topk_group, normalize, scale):
    """transformers' DeepseekV3TopkRouter (noaux_tc) and DeepseekV2Moe gating, in float64."""
    n, e = logits.shape
    if method == "noaux_tc":
        s = 1 / (1 + np.exp(-logits))
        c = s + bias
        group_score = np.sort(c.reshape(n, groups, e // groups), -1)[..., -2:].sum(-1)
    else:
        s = np.exp(logits - logits.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        c = s.copy()
        group_score = c.reshape(n, groups, e // groups).max(-1) if method == "group_limited_greedy" else None
    if group_score is not None:
        keep = np.zeros((n, groups), bool)
        keep[np.arange(n)[:, None], np.argsort(-group_score, -1)[:, :topk_group]] = True
        c = np.where(np.repeat(keep, e // groups, -1), c, -np.inf)
    idx = np.argsort(-c, -1, kind="stable")[:, :k]
    w = np.take_along_axis(s, idx, -1)
    if normalize:
        w = w / (w.sum(-1, keepdims=True) + 1e-20)
    return idx, w * scale


def rms_norm(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * scale


def silu(x):
    return x / (1 + np.exp(-x))


def rope(x_TNr, positions_T, theta):
    """Half-split rotary embedding of [T, N, r] at integer positions."""
    r = x_TNr.shape[-1]
    angles = positions_T[:, None] * theta ** (-np.arange(0, r, 2) / r)
    cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]
    x1, x2 = x_TNr[..., :r // 2], x_TNr[..., r // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def mla(p, cfg, x_TD, positions_T, seg_T):
    """Causal multi-head latent attention of one row, within segments (id 0 attends nowhere)."""
    eps = 1e-6  # the latent norms' eps, whatever rms_norm_eps
    src = x_TD
    if cfg.q_lora_rank:
        src = rms_norm(x_TD @ p["q_a_proj"]["kernel"], p["q_a_norm"]["scale"], eps)
    q_nope = np.einsum("tq,qnd->tnd", src, p["q_nope_proj"]["kernel"])
    q_rope = rope(np.einsum("tq,qnd->tnd", src, p["q_rope_proj"]["kernel"]), positions_T, cfg.rope_theta)
    c = rms_norm(x_TD @ p["kv_a_proj"]["kernel"], p["kv_a_norm"]["scale"], eps)
    k_rope = rope(np.einsum("td,dxr->txr", x_TD, p["k_rope_proj"]["kernel"]), positions_T, cfg.rope_theta)
    k_nope = np.einsum("tr,rnd->tnd", c, p["k_nope_proj"]["kernel"])
    v = np.einsum("tr,rnd->tnd", c, p["v_proj"]["kernel"])
    logits = (np.einsum("tnd,snd->nts", q_nope, k_nope) + np.einsum("tnd,sxd->nts", q_rope, k_rope)) * \
        (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    t = len(seg_T)
    allowed = np.tril(np.ones((t, t), bool)) & (seg_T[:, None] == seg_T[None]) & (seg_T[:, None] > 0)
    logits = np.where(allowed[None], logits, -np.inf)
    m = np.max(logits, -1, keepdims=True)
    w = np.where(allowed[None], np.exp(logits - np.where(np.isfinite(m), m, 0)), 0.0)
    w = w / np.maximum(w.sum(-1, keepdims=True), 1e-300)
    out = np.einsum("nts,snv->tnv", w, v)
    return np.einsum("tnv,nvd->td", out, p["o_proj"]["kernel"])


def moe(p, cfg, x_TD):
    """DeepSeekMoE: routed experts chosen by np_route plus the shared experts."""
    bias = p.get("correction_bias", np.zeros(cfg.num_experts))
    idx, w = np_route(x_TD @ p["router"]["kernel"], bias, cfg.num_experts_per_tok, cfg.topk_method, cfg.n_group,
                      cfg.topk_group, cfg.norm_topk_prob, cfg.routed_scaling_factor)
    y = np.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        for e, weight in zip(idx[t], w[t]):
            h = silu(x_TD[t] @ p["gate_proj"][e]) * (x_TD[t] @ p["up_proj"][e])
            y[t] += weight * (h @ p["down_proj"][e])
    s = p["shared_experts"]
    shared = (silu(x_TD @ s["gate_proj"]["kernel"]) * (x_TD @ s["up_proj"]["kernel"])) @ s["down_proj"]["kernel"]
    return y + shared


def moe_block(p, cfg, x_TD, positions_T, seg_T):
    x_TD = x_TD + mla(p["attn"], cfg, rms_norm(x_TD, p["attn_norm"]["scale"], cfg.rms_norm_eps), positions_T, seg_T)
    return x_TD + moe(p["mlp"], cfg, rms_norm(x_TD, p["mlp_norm"]["scale"], cfg.rms_norm_eps))


def mtp_loss(params, cfg, h_BTD, ids_BT, seg_BT, positions_BT):
    """The mean over depths of each depth's masked next-next-token cross-entropy (DeepSeek-V3 §2.2),
    from the main model's final normed hidden states h."""
    params = {k: v for k, v in params.items()}
    emb, head = params["embed_tokens"]["embedding"], params["lm_head"]["kernel"]
    b, t, _ = h_BTD.shape
    losses = []
    h = h_BTD
    for j in range(cfg.num_mtp_layers):
        p = params[f"mtp_{j}"]
        nll, count, new_h = 0.0, 0, np.zeros_like(h)
        for r in range(b):
            ahead = np.array([ids_BT[r, i + j + 1] if i + j + 1 < t else 0 for i in range(t)])
            u = np.concatenate([rms_norm(emb[ahead], p["enorm"]["scale"], cfg.rms_norm_eps),
                                rms_norm(h[r], p["hnorm"]["scale"], cfg.rms_norm_eps)], -1) @ p["eh_proj"]["kernel"]
            g = rms_norm(moe_block(p["block"], cfg, u, positions_BT[r] + j + 1, seg_BT[r]), p["head_norm"]["scale"],
                         cfg.rms_norm_eps)
            new_h[r] = g
            logits = g @ head
            logits = logits - logits.max(-1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
            for i in range(t - j - 2):
                if seg_BT[r, i] > 0 and all(seg_BT[r, i + m] == seg_BT[r, i] for m in range(1, j + 3)):
                    nll -= logp[i, ids_BT[r, i + j + 2]]
                    count += 1
        losses.append(nll / max(count, 1))
        h = new_h
    return float(np.mean(losses))
