"""One record per model family. Every "which family is this" decision reads it.

Adding a family means its own folder under zoo/models/ plus one `Family(...)` entry
below; the trainer, the CLI, evaluation, generation, HF import/export and the
contract test suite (tests/models/test_contract.py) find it here.

    >>> from zoo import registry
    >>> registry.of(zoo.config("tiny-llama")).kind
    'decoder'
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from zoo.configs import ModelConfig
from zoo.hf.rules import ArchSpec
from zoo.models.bert import config as bert_config
from zoo.models.bert import hf as bert_hf
from zoo.models.bert.model import build_bert
from zoo.models.deepseek import config as deepseek_config
from zoo.models.deepseek import hf as deepseek_hf
from zoo.models.deepseek.model import DeepSeek
from zoo.models.deepseek.model import balance_routers as deepseek_balance_routers
from zoo.models.gemma import config as gemma_config
from zoo.models.gemma import hf as gemma_hf
from zoo.models.gpt2 import config as gpt2_config
from zoo.models.gpt2 import hf as gpt2_hf
from zoo.models.gpt2.model import GPT2
from zoo.models.llama import config as llama_config
from zoo.models.llama import hf as llama_hf
from zoo.models.llama.model import Llama
from zoo.models.modernbert import config as modernbert_config
from zoo.models.modernbert import hf as modernbert_hf
from zoo.models.modernbert.model import build_modernbert
from zoo.models.moe import config as moe_config
from zoo.models.moe import hf as moe_hf
from zoo.models.moe.model import MoEDecoder
from zoo.models.t5 import config as t5_config
from zoo.models.t5 import hf as t5_hf
from zoo.models.t5.model import T5

KINDS = ("decoder", "encoder", "encoder-decoder")


@dataclass(frozen=True)
class Family:
    """What the rest of the zoo needs to know about one model family."""

    name: str  # the value of its config class's `family`
    config_class: type[ModelConfig]
    build: Callable[[ModelConfig], object]  # cfg -> flax.linen Module
    kind: str  # one of KINDS
    objectives: tuple[str, ...]  # objectives (zoo.objectives) that can train it; the first is its pretraining default
    tasks: tuple[str, ...]  # train.py --task values it supports
    eval_task: str | None  # what `python -m zoo eval --task auto` measures (None: depends on the head)
    hf_specs: dict[str, ArchSpec]  # HF `architectures` name -> its table (zoo/models/<family>/hf.py)
    presets: tuple[ModelConfig, ...] = ()  # its named presets (zoo/models/<family>/config.py), tiny ones included
    learned_positions: bool = False  # absolute learned position table: prompt + new tokens must fit max_seq_len
    # HF classes that import into this family as one of its own (Gemma 3's multimodal class: its text
    # tower, a Gemma3ForCausalLM); never exported under that name
    hf_imports: dict[str, ArchSpec] = dataclasses.field(default_factory=dict)
    # (cfg, params, router load [layers, E]) -> params: the train step's non-gradient update after the
    # optimizer, for configs with `balances_routers` (zoo/objectives.py ROUTER_LOAD)
    after_step: Callable | None = None
    # trains with the length split over the mesh's context axis (zoo/training/context.py): causal
    # attention through kernels.attention's context_parallel, every other layer per token
    context_parallel: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"family {self.name}: kind {self.kind!r} is not one of {KINDS}")
        if self.config_class.family != self.name:
            raise ValueError(f"family {self.name}: {self.config_class.__name__}.family is "
                             f"{self.config_class.family!r}")
        for preset in self.presets:
            if not isinstance(preset, self.config_class):
                raise ValueError(f"family {self.name}: preset {preset.name!r} is a {type(preset).__name__}")

    @property
    def hf_architectures(self) -> tuple[str, ...]:
        """The HF `architectures` names it imports and exports."""
        return tuple(self.hf_specs)

    def spec(self, arch: str) -> ArchSpec:
        """The table of HF class `arch`: one it round-trips, or an import-only one."""
        return self.hf_specs[arch] if arch in self.hf_specs else self.hf_imports[arch]

    @property
    def generates(self) -> bool:
        """True when it produces text token by token (decoders and encoder-decoders)."""
        return self.kind != "encoder"

    @property
    def causal_lm(self) -> bool:
        """True for decoder-only LMs: sampling during training, perplexity evaluation."""
        return self.kind == "decoder"


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    if family.name in FAMILIES:
        raise ValueError(f"family {family.name!r} is registered twice")
    FAMILIES[family.name] = family
    return family


def of(cfg_or_model) -> Family:
    """The record for a config, a model (anything with `.cfg`) or a family name."""
    if isinstance(cfg_or_model, str):
        name = cfg_or_model
    else:
        cfg = getattr(cfg_or_model, "cfg", cfg_or_model)
        name = getattr(cfg, "family", None)
    if name not in FAMILIES:
        raise ValueError(f"no model family {name!r} (known: {', '.join(sorted(FAMILIES))})")
    return FAMILIES[name]


def names(**where) -> tuple[str, ...]:
    """Family names whose record matches every keyword, e.g. names(kind="decoder")."""
    return tuple(n for n, f in FAMILIES.items() if all(getattr(f, k) == v for k, v in where.items()))


def supporting(*, task: str | None = None, objective: str | None = None) -> tuple[str, ...]:
    """Family names that support a train.py task and/or an objective."""
    return tuple(n for n, f in FAMILIES.items()
                 if (task is None or task in f.tasks) and (objective is None or objective in f.objectives))


def by_architecture(arch: str) -> Family:
    """The family that imports the HF class `arch` (ValueError naming the supported ones if none);
    its table is `by_architecture(arch).spec(arch)`."""
    for f in FAMILIES.values():
        if arch in f.hf_specs or arch in f.hf_imports:
            return f
    raise ValueError(f"unsupported architecture {arch!r}; supported: {', '.join(architectures())}")


def config_class(class_name: str) -> type[ModelConfig] | None:
    """The config class called `class_name` (as `type(cfg).__name__` wrote it), or None."""
    return next((f.config_class for f in FAMILIES.values() if f.config_class.__name__ == class_name), None)


def architectures() -> tuple[str, ...]:
    """Every HF `architectures` name some family imports, sorted."""
    return tuple(sorted(a for f in FAMILIES.values() for a in (*f.hf_specs, *f.hf_imports)))


register(Family("gpt2", gpt2_config.GPT2Config, GPT2, kind="decoder", objectives=("clm",), tasks=("pretrain",),
                eval_task="perplexity", hf_specs=gpt2_hf.ARCHITECTURES,
                presets=gpt2_config.PRESETS, learned_positions=True, context_parallel=True))
register(Family("llama", llama_config.LlamaConfig, Llama, kind="decoder", objectives=("clm",), tasks=("pretrain",),
                eval_task="perplexity", hf_specs=llama_hf.ARCHITECTURES,
                presets=llama_config.PRESETS, context_parallel=True))
register(Family("gemma", gemma_config.GemmaConfig, Llama, kind="decoder", objectives=("clm",), tasks=("pretrain",),
                eval_task="perplexity", hf_specs=gemma_hf.ARCHITECTURES,
                presets=gemma_config.PRESETS, hf_imports=gemma_hf.IMPORTS, context_parallel=True))
register(Family("moe", moe_config.MoEConfig, MoEDecoder, kind="decoder", objectives=("clm",), tasks=("pretrain",),
                eval_task="perplexity", hf_specs=moe_hf.ARCHITECTURES,
                presets=moe_config.PRESETS, hf_imports=moe_hf.IMPORTS, context_parallel=True))
register(Family("deepseek", deepseek_config.DeepSeekConfig, DeepSeek, kind="decoder", objectives=("clm",),
                tasks=("pretrain",), eval_task="perplexity", hf_specs=deepseek_hf.ARCHITECTURES,
                presets=deepseek_config.PRESETS, after_step=deepseek_balance_routers,
                context_parallel=True))
register(Family("bert", bert_config.BertConfig, build_bert, kind="encoder", objectives=("mlm", "cls"),
                tasks=("pretrain", "classify"), eval_task=None, hf_specs=bert_hf.ARCHITECTURES,
                presets=bert_config.PRESETS))
register(Family("modernbert", modernbert_config.ModernBertConfig, build_modernbert, kind="encoder",
                objectives=("mlm", "cls"), tasks=("pretrain", "classify"), eval_task=None,
                hf_specs=modernbert_hf.ARCHITECTURES, presets=modernbert_config.PRESETS))
register(Family("t5", t5_config.T5Config, T5, kind="encoder-decoder", objectives=("span", "seq2seq"),
                tasks=("pretrain", "seq2seq"), eval_task="seq2seq", hf_specs=t5_hf.ARCHITECTURES,
                presets=t5_config.PRESETS))
