"""DeepSeek-family configuration (DeepSeek-V3, DeepSeek-V2, Kimi K2, Moonlight) and presets."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from zoo.configs import TINY, ModelConfig
from zoo.models.deepseek.routing import METHODS


def yarn_mscale(factor: float, mscale: float | None = 1.0) -> float:
    """DeepSeek's YaRN magnitude correction: 0.1 * mscale * ln(factor) + 1 (1 when not scaled)."""
    return 1.0 if factor <= 1 else 0.1 * (mscale or 0.0) * math.log(factor) + 1.0


@dataclass(frozen=True, kw_only=True)
class DeepSeekConfig(ModelConfig):
    """Multi-head latent attention (zoo/nn/mla.py) and DeepSeekMoE (zoo/models/deepseek/model.py).

    The first `first_k_dense_replace` layers have a dense MLP of `intermediate_size`; the others
    route over `num_experts` experts of `moe_intermediate_size` (zoo/models/deepseek/routing.py)
    beside `n_shared_experts` shared ones. Attention: q through a low-rank latent (`q_lora_rank`;
    None: a full projection), keys and values through one joint latent of `kv_lora_rank`, each
    head's q/k split into `qk_nope_head_dim` dims without RoPE and `qk_rope_head_dim` with it (the
    RoPE key shared by all heads), values of `v_head_dim`. `head_dim` is the q/k head dim.
    """

    family: ClassVar[str] = "deepseek"
    ARCHITECTURES: ClassVar[tuple[str, ...]] = ("DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM")

    architecture: str = "DeepseekV3ForCausalLM"
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope_theta: float = 10000.0
    rope_scaling: tuple | None = None  # ("yarn", factor, beta_fast, beta_slow, original_max, truncate) or None
    yarn_mscale: float | None = None  # HF rope_parameters' mscale: the cos/sin factor (with mscale_all_dim)
    yarn_mscale_all_dim: float | None = None  # HF's mscale_all_dim: the softmax scale's correction
    rope_interleave: bool = True  # V3's interleaved RoPE pairs (V2 always); import reorders the rows
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    first_k_dense_replace: int = 3
    moe_intermediate_size: int = 2048
    num_experts: int = 256  # E (HF n_routed_experts)
    num_experts_per_tok: int = 8  # k
    n_shared_experts: int = 1
    topk_method: str = "noaux_tc"  # routing.METHODS
    n_group: int = 8
    topk_group: int = 4
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    router_aux_loss_coef: float = 0.001  # HF aux_loss_alpha (the load-balancing loss, zoo/models/moe/model.py)
    router_z_loss_coef: float = 0.0
    # auxiliary-loss-free balancing (topk_method "noaux_tc"): after each train step the correction bias
    # moves by this much toward balanced load, b += rate * sign(mean load - load) (0: off)
    bias_update_rate: float = 0.001
    # multi-token prediction (training only): depths whose loss, averaged, is added times mtp_loss_weight
    num_mtp_layers: int = 0  # HF num_nextn_predict_layers (DeepSeek-V3's release has 1)
    mtp_loss_weight: float = 0.3
    kv_cache: str = "latent"  # decoding keeps [c_kv | k_rope] a token ("full": expanded K/V; zoo/nn/mla.py)

    def __post_init__(self):
        if isinstance(self.rope_scaling, list):  # JSON gives lists back
            object.__setattr__(self, "rope_scaling", tuple(self.rope_scaling))
        qk = self.qk_nope_head_dim + self.qk_rope_head_dim
        if self.head_dim not in (0, qk):
            raise ValueError(f"{self.name}: head_dim is qk_nope_head_dim + qk_rope_head_dim = {qk}, got "
                             f"{self.head_dim}")
        object.__setattr__(self, "head_dim", qk)
        super().__post_init__()
        if self.architecture not in self.ARCHITECTURES:
            raise ValueError(f"{self.name}: architecture {self.architecture!r} is not one of {self.ARCHITECTURES}")
        if self.num_kv_heads != self.num_heads:
            raise ValueError(f"{self.name}: multi-head latent attention has no grouped kv heads (num_kv_heads must "
                             f"be {self.num_heads})")
        if self.qk_rope_head_dim % 2 or min(self.kv_lora_rank, self.qk_nope_head_dim, self.v_head_dim) <= 0:
            raise ValueError(f"{self.name}: kv_lora_rank, qk_nope_head_dim, v_head_dim must be positive and "
                             f"qk_rope_head_dim even")
        if self.hidden_act != "silu":
            raise ValueError(f"{self.name}: hidden_act must be 'silu', got {self.hidden_act!r}")
        if self.topk_method not in METHODS:
            raise ValueError(f"{self.name}: topk_method must be one of {METHODS}, got {self.topk_method!r}")
        e, g = self.num_experts, self.n_group
        if not (g >= 1 and e % g == 0 and 1 <= self.topk_group <= g and self.topk_group * (e // g) >=
                self.num_experts_per_tok and 0 < self.num_experts_per_tok <= e):
            raise ValueError(f"{self.name}: routing needs n_group dividing num_experts={e}, 1 <= topk_group <= "
                             f"n_group and topk_group * num_experts / n_group >= num_experts_per_tok")
        if self.topk_method == "noaux_tc" and e // g < 2:
            raise ValueError(f"{self.name}: noaux_tc scores a group by its two best experts (needs >= 2 per group)")
        if not 0 <= self.first_k_dense_replace < self.num_layers:
            raise ValueError(f"{self.name}: first_k_dense_replace must be in 0..num_layers-1")
        if self.num_mtp_layers < 0 or not self.mtp_loss_weight >= 0:
            raise ValueError(f"{self.name}: num_mtp_layers and mtp_loss_weight must be >= 0")
        if not self.bias_update_rate >= 0:
            raise ValueError(f"{self.name}: bias_update_rate must be >= 0, got {self.bias_update_rate}")
        if self.kv_cache not in ("latent", "full"):
            raise ValueError(f"{self.name}: kv_cache must be 'latent' or 'full', got {self.kv_cache!r}")
        if self.rope_scaling is not None and not (self.rope_scaling[0] == "yarn" and len(self.rope_scaling) == 6):
            raise ValueError(f"{self.name}: rope_scaling is ('yarn', factor, beta_fast, beta_slow, original_max, "
                             f"truncate) or None")

    @property
    def hf_architecture(self) -> str:  # type: ignore[override]
        return self.architecture

    @property
    def moe_layers(self) -> int:
        return self.num_layers - self.first_k_dense_replace

    @property
    def softmax_scale(self) -> float:
        """(qk head dim)^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN (HF's `scaling`)."""
        scale = self.head_dim ** -0.5
        if self.rope_scaling is not None and self.yarn_mscale_all_dim:
            scale *= yarn_mscale(self.rope_scaling[1], self.yarn_mscale_all_dim) ** 2
        return scale

    @property
    def rope_factor(self) -> float:
        """What the rotated q and k are multiplied by (HF's YaRN attention_factor)."""
        if self.rope_scaling is None:
            return 1.0
        factor = self.rope_scaling[1]
        if self.yarn_mscale and self.yarn_mscale_all_dim:
            return yarn_mscale(factor, self.yarn_mscale) / yarn_mscale(factor, self.yarn_mscale_all_dim)
        return yarn_mscale(factor)

    @property
    def inactive_param_count(self) -> int:
        """What one token's forward skips (zoo.active_param_count): the E - k unchosen routed experts of
        each MoE layer, the MTP depths (training only) and the input embedding table (a lookup, as
        DeepSeek counts "37B activated": V3 36.63B, Kimi K2 31.69B, V2-Lite 2.45B)."""
        d = self.hidden_size
        expert = 3 * d * self.moe_intermediate_size
        mtp = 0
        if self.num_mtp_layers:  # enorm, hnorm, eh_proj, head_norm and one MoE layer (its attention, norms, MoE)
            q, n, r = self.q_lora_rank, self.num_heads, self.kv_lora_rank
            dn, dr, dv = self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim
            attn = (d * q + q + q * n * (dn + dr) if q else d * n * (dn + dr)) + d * (r + dr) + r + \
                r * n * (dn + dv) + n * dv * d
            bias = self.num_experts if self.topk_method == "noaux_tc" else 0
            moe = self.num_experts * expert + d * self.num_experts + bias + expert * self.n_shared_experts
            mtp = self.num_mtp_layers * (3 * d + 2 * d * d + attn + 2 * d + moe)
        lookup = 0 if self.tie_word_embeddings else self.vocab_size * d  # tied: the table is the LM head too
        return (self.num_experts - self.num_experts_per_tok) * expert * self.moe_layers + lookup + mtp

    @property
    def balances_routers(self) -> bool:
        """Whether the train step updates the correction bias (zoo/models/deepseek/model.py `balance_routers`)."""
        return self.topk_method == "noaux_tc" and self.bias_update_rate > 0

    @property
    def aux_loss_weights(self) -> dict[str, float]:
        """Weight of each auxiliary loss the model sows (read by zoo/objectives.py)."""
        mtp = {"mtp_loss": self.mtp_loss_weight} if self.num_mtp_layers else {}
        return {"load_balancing_loss": self.router_aux_loss_coef, "router_z_loss": self.router_z_loss_coef, **mtp}

    def flops_per_token(self, seq_len: int) -> float:
        """6 x the matmul params a token meets (k routed + the shared experts) + attention (QK^T over
        the q/k head dim, PV over v_head_dim)."""
        d, n, r, q = self.hidden_size, self.num_heads, self.kv_lora_rank, self.q_lora_rank
        dn, dr, dv = self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim
        attn = (d * q + q * n * (dn + dr) if q else d * n * (dn + dr)) + d * (r + dr) + r * n * (dn + dv) + n * dv * d
        moe = d * self.num_experts + 3 * d * self.moe_intermediate_size * (self.num_experts_per_tok +
                                                                            self.n_shared_experts)
        dense = 3 * d * self.intermediate_size
        matmul = self.num_layers * attn + self.first_k_dense_replace * dense + self.moe_layers * moe + \
            d * self.vocab_size
        keys = self.attended_keys(seq_len)
        return 6.0 * matmul + 6.0 * self.num_layers * n * (dn + dr + dv) * keys


_TINY_DEEPSEEK = {**TINY, "num_layers": 3, "first_k_dense_replace": 1, "q_lora_rank": 32, "kv_lora_rank": 16,
                  "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "moe_intermediate_size": 32,
                  "num_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1, "n_group": 4, "topk_group": 2,
                  "rope_scaling": ("yarn", 4.0, 32.0, 1.0, 64, True), "yarn_mscale": 1.0, "yarn_mscale_all_dim": 0.8}

_V3 = dict(vocab_size=129280, hidden_size=7168, num_layers=61, num_heads=128, intermediate_size=18432,
           rope_scaling=("yarn", 40.0, 32.0, 1.0, 4096, True), yarn_mscale=1.0, yarn_mscale_all_dim=1.0,
           max_seq_len=163840, bos_token_id=0, eos_token_id=1)

PRESETS = (
    # DeepSeek-V3 / R1 (671B, 37B active; the release's multi-token-prediction layer is not counted)
    DeepSeekConfig(name="deepseek-v3-671b", **_V3),
    # DeepSeek-V2-Lite (15.7B, 2.4B active): full q projection, softmax greedy top-6 of 64, 2 shared
    DeepSeekConfig(name="deepseek-v2-lite-16b", architecture="DeepseekV2ForCausalLM", vocab_size=102400,
        hidden_size=2048, num_layers=27, num_heads=16, intermediate_size=10944, q_lora_rank=None,
        first_k_dense_replace=1, moe_intermediate_size=1408, num_experts=64, num_experts_per_tok=6,
        n_shared_experts=2, topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False,
        routed_scaling_factor=1.0, rope_scaling=("yarn", 40.0, 32.0, 1.0, 4096, True), yarn_mscale=0.707,
        yarn_mscale_all_dim=0.707, max_seq_len=163840, bos_token_id=100000, eos_token_id=100001),
    # Moonlight-16B-A3B (V3 architecture at V2-Lite size)
    DeepSeekConfig(name="moonlight-16b-a3b", vocab_size=163840, hidden_size=2048, num_layers=27, num_heads=16,
        intermediate_size=11264, q_lora_rank=None, first_k_dense_replace=1, moe_intermediate_size=1408,
        num_experts=64, num_experts_per_tok=6, n_shared_experts=2, n_group=1, topk_group=1,
        routed_scaling_factor=2.446, rope_theta=50000.0, rms_norm_eps=1e-5, max_seq_len=8192,
        bos_token_id=163584, eos_token_id=163585),
    # Kimi K2 (1.03T, 32B active): V3 with 384 experts, 64 heads, one dense layer
    DeepSeekConfig(name="kimi-k2-1t", **{**_V3, "vocab_size": 163840, "num_heads": 64, "rope_theta": 50000.0,
        "rope_scaling": ("yarn", 32.0, 1.0, 1.0, 4096, True), "max_seq_len": 131072, "bos_token_id": 163584,
        "eos_token_id": 163585}, first_k_dense_replace=1, num_experts=384, n_group=1, topk_group=1,
        routed_scaling_factor=2.827),
    DeepSeekConfig(name="tiny-deepseek", **_TINY_DEEPSEEK),
    DeepSeekConfig(name="tiny-deepseek-v2", architecture="DeepseekV2ForCausalLM", **{
        **_TINY_DEEPSEEK, "q_lora_rank": None, "topk_method": "group_limited_greedy", "norm_topk_prob": False,
        "routed_scaling_factor": 1.0, "n_shared_experts": 2, "yarn_mscale": 0.707, "yarn_mscale_all_dim": 0.707}),
)
