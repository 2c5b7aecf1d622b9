"""Mixture-of-experts decoder configuration (Mixtral, Qwen3-MoE, GPT-OSS, Llama 4) and presets."""

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
    Llama 4: a sigmoid of each kept logit scales the expert's input (`router_type="sigmoid"`), a
    shared expert (`shared_expert_size`) sees every token, and with `moe_layer_step` = s only
    layers s-1, 2s-1, ... are routed, the others dense MLPs of `dense_intermediate_size`.
    `intermediate_size` is one expert's F (HF's `moe_intermediate_size` for Qwen3-MoE).
    Training adds `router_aux_loss_coef` * load-balancing loss (HF's formula) and
    `router_z_loss_coef` * router z-loss (ST-MoE) to the objective.
    """

    family: ClassVar[str] = "moe"
    ARCHITECTURES: ClassVar[tuple[str, ...]] = ("MixtralForCausalLM", "Qwen3MoeForCausalLM", "GptOssForCausalLM",
                                                "Llama4ForCausalLM")

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
    router_type: str = "softmax"  # "sigmoid" (Llama 4): sigmoid(kept logit) scales the expert's input
    shared_expert_size: int | None = None  # Llama 4: a dense gated MLP of this size beside the experts
    moe_layer_step: int = 1  # Llama 4 Maverick: 2 (every other layer routed, from layer 1)
    dense_intermediate_size: int | None = None  # the other layers' dense MLP when moe_layer_step > 1

    def __post_init__(self):
        super().__post_init__()
        if self.router_type not in ("softmax", "sigmoid"):
            raise ValueError(f"{self.name}: router_type must be 'softmax' or 'sigmoid', got {self.router_type!r}")
        if self.moe_layer_step < 1 or self.num_layers % self.moe_layer_step:
            raise ValueError(f"{self.name}: moe_layer_step={self.moe_layer_step} must divide num_layers="
                             f"{self.num_layers}")
        if self.moe_layer_step > 1 and not self.dense_intermediate_size:
            raise ValueError(f"{self.name}: moe_layer_step > 1 needs dense_intermediate_size (the dense layers' MLP)")
        if self.moe_layer_step > 1 and self.architecture != "Llama4ForCausalLM":
            raise ValueError(f"{self.name}: dense and routed layers interleave only in Llama4ForCausalLM")
        if not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"{self.name}: num_experts_per_tok={self.num_experts_per_tok} must be in "
                             f"1..num_experts={self.num_experts}")
        if self.router_aux_loss_coef < 0 or self.router_z_loss_coef < 0:
            raise ValueError(f"{self.name}: router loss coefficients must be non-negative")

    @property
    def aux_loss_weights(self) -> dict[str, float]:
        """Weight of each auxiliary loss the model sows (read by zoo/objectives.py)."""
        return {"load_balancing_loss": self.router_aux_loss_coef, "router_z_loss": self.router_z_loss_coef}

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """The routed layers (the others have a dense MLP)."""
        return tuple(range(self.moe_layer_step - 1, self.num_layers, self.moe_layer_step))

    def flops_per_token(self, seq_len: int) -> float:
        """As the dense decoder, with k active experts (and the shared one) per token and the router
        in the routed layers, and the dense layers' own MLP size."""
        d, f, e, k = self.hidden_size, self.intermediate_size, self.num_experts, self.num_experts_per_tok
        routed = len(self.moe_layers)
        extra = routed * ((k - 1) * self.mlp_matrices * d * f + d * e)
        extra += routed * self.mlp_matrices * d * (self.shared_expert_size or 0)
        extra += (self.num_layers - routed) * self.mlp_matrices * d * ((self.dense_intermediate_size or f) - f)
        return super().flops_per_token(seq_len) + 6.0 * extra


def _sliding_then_full(num_layers: int) -> tuple[str, ...]:
    """GPT-OSS's layer_types: even layers sliding, odd layers full."""
    return tuple("full_attention" if i % 2 else "sliding_attention" for i in range(num_layers))


_GPT_OSS = dict(vocab_size=201088, hidden_size=2880, num_heads=64, num_kv_heads=8, head_dim=64,
                intermediate_size=2880, num_experts_per_tok=4, attention_bias=True, attention_out_bias=True,
                attention_sinks=True, router_bias=True, expert_bias=True, swiglu_limit=7.0, sliding_window=128,
                rope_theta=150000.0, rope_scaling=("yarn", 32.0, 32.0, 1.0, 4096, False), rms_norm_eps=1e-5,
                max_seq_len=131072, bos_token_id=199998, eos_token_id=200002, pad_token_id=199999)

def _llama4_layers(num_layers: int, nope_every: int = 4) -> dict:
    """Llama 4's layer pattern: every `nope_every`-th layer NoPE with full attention, the others
    RoPE with chunked attention."""
    nope = tuple(range(nope_every - 1, num_layers, nope_every))
    return dict(nope_layers=nope, layer_types=tuple("full_attention" if i in nope else "chunked_attention"
                                                     for i in range(num_layers)))


_LLAMA4 = dict(architecture="Llama4ForCausalLM", vocab_size=202048, hidden_size=5120, num_layers=48, num_heads=40,
               num_kv_heads=8, head_dim=128, intermediate_size=8192, shared_expert_size=8192, num_experts_per_tok=1,
               router_type="sigmoid", attention_chunk_size=8192, attn_temperature_tuning=True, floor_scale=8192,
               attn_scale=0.1, rope_theta=500000.0, rms_norm_eps=1e-5, bos_token_id=200000,
               eos_token_id=(200001, 200007, 200008), pad_token_id=200018, **_llama4_layers(48))

# 4 layers: chunked RoPE (chunk 16) x3, then NoPE with full attention and the temperature (floor 32)
_TINY_LLAMA4 = {**_LLAMA4, **TINY, **_llama4_layers(4), "num_layers": 4, "num_kv_heads": 2, "head_dim": 16,
                "intermediate_size": 64, "shared_expert_size": 64, "num_experts": 4, "attention_chunk_size": 16,
                "floor_scale": 32, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}

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
    # Llama 4 text (107.8B / 400.7B without the vision tower, 17B active): 48 layers, every 4th NoPE
    # with full attention, the rest chunked (8,192) RoPE; Scout routes every layer over 16 experts,
    # Maverick every other one over 128 (dense MLP of 16,384 between); top-1 plus a shared expert.
    MoEConfig(name="llama4-scout-17b-16e", num_experts=16, qk_l2_norm=True, rope_scaling=(16.0, 1.0, 1.0, 8192),
        max_seq_len=10485760, **_LLAMA4),
    MoEConfig(name="llama4-maverick-17b-128e", num_experts=128, moe_layer_step=2, dense_intermediate_size=16384,
        max_seq_len=1048576, **_LLAMA4),
    MoEConfig(name="tiny-llama4", qk_l2_norm=True, **_TINY_LLAMA4),
    MoEConfig(name="tiny-llama4-maverick", **{**_TINY_LLAMA4, "num_experts_per_tok": 2}, moe_layer_step=2,
        dense_intermediate_size=128),
    MoEConfig(name="tiny-mixtral", num_kv_heads=2, num_experts=4, num_experts_per_tok=2, **TINY),
    # Qwen3-MoE's HF default leaves the kept probabilities unnormalised: the tiny preset exercises that switch.
    MoEConfig(name="tiny-qwen3-moe", architecture="Qwen3MoeForCausalLM", num_kv_heads=2, head_dim=32,
        qk_norm=True, rms_norm_eps=1e-6, num_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
        **{**TINY, "intermediate_size": 64}),
)
