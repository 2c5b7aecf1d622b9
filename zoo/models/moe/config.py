"""Mixture-of-experts decoder configuration (Mixtral, Qwen3-MoE, GPT-OSS) and presets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from zoo.configs import TINY
from zoo.models.llama.config import LlamaConfig


@dataclass(frozen=True, kw_only=True)
class MoEConfig(LlamaConfig):
    """The Llama decoder with every MLP a set of routed SwiGLU experts (zoo/models/moe/model.py).

    Router: softmax over all experts, the top `num_experts_per_tok` kept; Mixtral always
    renormalises the kept probabilities to sum to 1, Qwen3-MoE does when `norm_topk_prob`.
    GPT-OSS (softmax over the top-k logits: the same numbers as renormalising) adds router and
    expert biases, a clamped SwiGLU, attention sinks, YaRN and alternating sliding/full layers.
    `intermediate_size` is one expert's F (HF's `moe_intermediate_size` for Qwen3-MoE).
    Training adds `router_aux_loss_coef` * load-balancing loss (HF's formula) and
    `router_z_loss_coef` * router z-loss (ST-MoE) to the objective.
    """

    family: ClassVar[str] = "moe"
    ARCHITECTURES: ClassVar[tuple[str, ...]] = ("MixtralForCausalLM", "Qwen3MoeForCausalLM", "GptOssForCausalLM")

    architecture: str = "MixtralForCausalLM"
    num_experts: int = 8  # E
    num_experts_per_tok: int = 2  # k
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.001  # HF's default
    router_z_loss_coef: float = 0.001  # ST-MoE's value; not part of HF configs
    router_bias: bool = False  # GPT-OSS: the router has a bias
    expert_bias: bool = False  # GPT-OSS: every expert's gate, up and down projections have biases
    swiglu_limit: float | None = None  # GPT-OSS: clamped SwiGLU (zoo/models/moe/model.py clamped_swiglu)
    swiglu_alpha: float = 1.702

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"{self.name}: num_experts_per_tok={self.num_experts_per_tok} must be in "
                             f"1..num_experts={self.num_experts}")
        if self.router_aux_loss_coef < 0 or self.router_z_loss_coef < 0:
            raise ValueError(f"{self.name}: router loss coefficients must be non-negative")

    @property
    def aux_loss_weights(self) -> dict[str, float]:
        """Weight of each auxiliary loss the model sows (read by zoo/objectives.py)."""
        return {"load_balancing_loss": self.router_aux_loss_coef, "router_z_loss": self.router_z_loss_coef}

    def flops_per_token(self, seq_len: int) -> float:
        """As the dense decoder, with k active experts per token and the router."""
        d, f, e, k = self.hidden_size, self.intermediate_size, self.num_experts, self.num_experts_per_tok
        extra = self.num_layers * ((k - 1) * self.mlp_matrices * d * f + d * e)
        return super().flops_per_token(seq_len) + 6.0 * extra


def _sliding_then_full(num_layers: int) -> tuple[str, ...]:
    """GPT-OSS's layer_types: even layers sliding, odd layers full."""
    return tuple("full_attention" if i % 2 else "sliding_attention" for i in range(num_layers))


_GPT_OSS = dict(vocab_size=201088, hidden_size=2880, num_heads=64, num_kv_heads=8, head_dim=64,
                intermediate_size=2880, num_experts_per_tok=4, attention_bias=True, attention_out_bias=True,
                attention_sinks=True, router_bias=True, expert_bias=True, swiglu_limit=7.0, sliding_window=128,
                rope_theta=150000.0, rope_scaling=("yarn", 32.0, 32.0, 1.0, 4096, False), rms_norm_eps=1e-5,
                max_seq_len=131072, bos_token_id=199998, eos_token_id=200002, pad_token_id=199999)

PRESETS = (
    MoEConfig(name="mixtral-8x7b", vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32,
        num_kv_heads=8, intermediate_size=14336, num_experts=8, num_experts_per_tok=2,
        rope_theta=1000000.0, rms_norm_eps=1e-5, max_seq_len=32768, router_aux_loss_coef=0.02),
    MoEConfig(name="qwen3-30b-a3b", architecture="Qwen3MoeForCausalLM", vocab_size=151936, hidden_size=2048,
        num_layers=48, num_heads=32, num_kv_heads=4, head_dim=128, intermediate_size=768,
        num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, qk_norm=True,
        rope_theta=1000000.0, rms_norm_eps=1e-6, max_seq_len=40960),
    # gpt-oss-20b / -120b (the hub's bf16 counts: 20.91B / 116.83B): 24 / 36 layers of 32 / 128 experts,
    # top-4, sliding (128) and full layers alternating, sinks, YaRN x32 over 4,096 positions.
    MoEConfig(name="gpt-oss-20b", architecture="GptOssForCausalLM", num_layers=24, num_experts=32,
        layer_types=_sliding_then_full(24), **_GPT_OSS),
    MoEConfig(name="gpt-oss-120b", architecture="GptOssForCausalLM", num_layers=36, num_experts=128,
        layer_types=_sliding_then_full(36), **_GPT_OSS),
    MoEConfig(name="tiny-gpt-oss", architecture="GptOssForCausalLM", num_kv_heads=2, num_experts=4,
        num_experts_per_tok=2, attention_bias=True, attention_out_bias=True, attention_sinks=True,
        router_bias=True, expert_bias=True, swiglu_limit=7.0, sliding_window=16,
        layer_types=("sliding_attention", "full_attention"), rope_theta=150000.0,
        rope_scaling=("yarn", 32.0, 32.0, 1.0, 64, False), **TINY),
    MoEConfig(name="tiny-mixtral", num_kv_heads=2, num_experts=4, num_experts_per_tok=2, **TINY),
    # Qwen3-MoE's HF default leaves the kept probabilities unnormalised: the tiny preset exercises that switch.
    MoEConfig(name="tiny-qwen3-moe", architecture="Qwen3MoeForCausalLM", num_kv_heads=2, head_dim=32,
        qk_norm=True, rms_norm_eps=1e-6, num_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
        **{**TINY, "intermediate_size": 64}),
)
