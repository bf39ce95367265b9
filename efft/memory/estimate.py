"""The memory planner: will this recipe fit, and if not, what is the cheapest change that makes it fit?

``estimate(recipe, gpu_memory=None) -> Estimate`` builds the recipe's model on the *meta* device
(shapes only, no weights, ~0.2 s even for 70B), then predicts the training peak by category:

- **weights**: every parameter and buffer at its storage dtype; Linear layers that the recipe
  quantizes at the exact bytes their storage takes (4-bit: packed codes + absmax, or with double
  quantization uint8 absmax + float32 nested absmax + offset + the 16-entry and 256-entry code
  tables, as bitsandbytes and efft's QuantLinear store them; int8: 1 byte a weight + a float32
  scale per row, or per block for trainable int8).
- **adapters**: LoRA ``r * (in + out)`` per targeted Linear, float32 (peft keeps adapters in fp32).
- **gradients**: one per trainable element at its parameter's dtype (float32 for int8 carriers);
  with layer-wise updates only the largest parameter's gradient is alive.
- **optimizer state**: AdamW moments; GaLore / APOLLO / APOLLO-Mini / FRUGAL low-rank states as
  efft/optim stores them; 8-bit moments; moved to the host when ``offload.optimizer``.
- **activations**: bytes autograd saves for backward, from an op-by-op model of a decoder layer
  (norms, q/k/v/o, eager or SDPA attention, gated MLP, LM head + loss) as a function of batch,
  sequence, hidden, heads, KV heads, head dim, intermediate, vocab and dtype, with gradient
  checkpointing, loss-token skipping (the head and, as efft.sparsity.last_block restricts it, the
  last block on label rows), token elimination, exact recompute (where a prepared model is given:
  only on the modules it was installed on) and activation offload applied. With ``train.bf16`` /
  ``train.fp16`` the forward runs under autocast (as Trainer runs it): every Linear then keeps a
  compute-dtype cast of its input (a copy per layer: q/k/v do not share one) and of its weight
  (frozen ones too, when their input needs a gradient), attention and MLP tensors have the compute
  dtype, norms, softmax and the loss stay float32, and sampled_linear, PaCA and efft.quant's layers
  keep their input in its own dtype.
  With ``offload.weights`` the int8 decoder layers count 1 + ``weights_prefetch_layers`` layers on
  the device and the rest in ``host``.
- **workspace**: the largest transient buffers (logits gradient, attention scores, MLP gradients,
  a dequantized weight, the optimizer step's temporaries).

Gradients and activations do not peak together (backward frees activations as it creates
gradients), so ``total = static + max(activations + workspace + head gradient, gradients + step
workspace)`` with static = weights + adapters + optimizer state on the device.

Several processes (``nproc_per_node``, torchrun's ``--nproc_per_node``): under DDP a rank holds one
process's bytes plus DDP's gradient buckets (``communication``: Trainer wraps with
``gradient_as_bucket_view=False``, so they are a second copy of the gradients DDP reduces); with
``train.fsdp`` every parameter is sharded on dim 0 as FSDP2 does it (storage and gradients padded to
ceil(rows / N) rows, AdamW state the unpadded shard; rank 0, which holds the most, is shown), buffers
such as packed quantized bases stay whole, and ``communication`` is the full parameters FSDP2 gathers
(the root's and two decoder layers'), alive during forward and backward.

On CPU the weights / gradients / optimizer-state bytes equal the measured tensors exactly and the
activation bytes are within 10% of what saved-tensor hooks count, most settings within 0.1%, CPU bf16
autocast included (tests/memory). GPU peaks
(``torch.cuda.max_memory_allocated``) have not been checked yet: CUDA kernels (flash attention,
cuBLAS workspaces, the caching allocator's rounding) add what the CPU cannot show.
"""
from __future__ import annotations

import json
import math
import re
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from efft.sparsity.partial import partial_columns

from .tracker import format_bytes

__all__ = [
    "Estimate", "estimate", "parse_size", "shipped_configs", "resolve_config", "load_shipped_config",
    "build_meta_model", "quant4_bytes", "int8_rowwise_bytes", "int8_blockwise_bytes",
    "activation_bytes", "Recomputed", "SUPPORTED_ACTIVATION_FAMILIES",
]

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
NESTED_BLOCKSIZE = 256  # bitsandbytes' block size for the absmax of the absmax (double quant)
BUILTIN_ARCH = {"smollm2-135m-instruct": "smollm2-135m-instruct"}
_DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_NBYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


# ------------------------------------------------------------------------------------------ sizes
_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kb": 1000, "kib": 1024,
    "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1024**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1024**4, "tb": 1000**4, "tib": 1024**4,
}


def parse_size(s: Any) -> int:
    """``"24GB"`` -> 24e9, ``"24GiB"`` -> 24 * 2**30, ``"80G"`` -> 80 * 2**30, ``1.5e9`` -> bytes.

    SI suffixes (KB, MB, GB, TB) are powers of 1000 and binary ones (KiB ... TiB) powers of 1024; a
    bare K/M/G/T is binary, as ``nvidia-smi`` and ``free -g`` count (an "80G" card has 80 GiB)."""
    if isinstance(s, bool):
        raise ValueError(f"a memory size is a number of bytes or a string like '24GB', got {s!r}")
    if isinstance(s, (int, float)):
        if not s > 0 or math.isinf(s):
            raise ValueError(f"memory size must be a positive number of bytes, got {s!r}")
        return int(s)
    if not isinstance(s, str):
        raise ValueError(f"a memory size is a number of bytes or a string like '24GB', got {type(s).__name__}")
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", s)
    if not m or not m.group(2) or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read memory size {s!r}: use a number with a unit, e.g. 24GB, 24GiB, 80G, 512MiB")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not value > 0:
        raise ValueError(f"memory size must be positive, got {s!r}")
    return int(value)


# ----------------------------------------------------------------------------------------- models
def shipped_configs() -> list[str]:
    """Names of the architectures shipped in efft/configs (config.json contents, no weights)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def _config_from_dict(d: dict, where: str):
    from transformers import AutoConfig

    d = {k: v for k, v in d.items() if not k.startswith("_")}
    d.pop("architectures", None)
    d.pop("torch_dtype", None)
    model_type = d.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"{where}: the config has no model_type (e.g. llama, qwen2, mistral, gemma2)")
    from huggingface_hub.errors import StrictDataclassError  # transformers' configs validate their fields with it

    try:
        return AutoConfig.for_model(model_type, **d)
    except (ValueError, KeyError, TypeError, StrictDataclassError) as e:
        raise ValueError(f"{where}: cannot build a {model_type!r} config: {e}") from None


def load_shipped_config(name: str):
    """The transformers config of a shipped architecture (``llama-3-8b``, ``gemma-2-9b``, ...)."""
    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        import difflib

        names = shipped_configs()
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown architecture {name!r}{hint} (shipped: {', '.join(names)})")
    return _config_from_dict(json.loads(path.read_text()), f"efft/configs/{name}.json")


def resolve_config(model_cfg: Any):
    """A transformers config for a recipe's ``model`` section, without touching weights.

    Order: ``architecture`` (shipped), ``config`` block, ``path`` (a directory with config.json, a
    config.json file, or a shipped name), ``builtin`` (its shipped config)."""
    arch = getattr(model_cfg, "architecture", None)
    if arch:
        return load_shipped_config(arch)
    block = getattr(model_cfg, "config", None)
    if block is not None:
        return _config_from_dict(dict(block), "model.config")
    path = getattr(model_cfg, "path", None)
    if path:
        p = Path(path).expanduser()
        if p.is_dir() and (p / "config.json").is_file():
            return _config_from_dict(json.loads((p / "config.json").read_text()), f"model.path {p}")
        if p.is_file() and p.suffix == ".json":
            return _config_from_dict(json.loads(p.read_text()), f"model.path {p}")
        if (CONFIG_DIR / f"{path}.json").is_file():
            return load_shipped_config(str(path))
        raise ValueError(f"model.path {path!r}: no config.json there and not a shipped architecture "
                         f"({', '.join(shipped_configs())}); set model.architecture to plan without weights")
    builtin = getattr(model_cfg, "builtin", None)
    if builtin:
        return load_shipped_config(BUILTIN_ARCH.get(builtin, builtin))
    raise ValueError("model: give one of architecture, config, path, builtin")


def build_meta_model(config, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """The causal LM of ``config`` with every tensor on the meta device (no memory, no init)."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    except ValueError as e:
        if "scaled_dot_product_attention" in str(e):
            raise ValueError(f"{config.model_type} does not support attn_implementation: {attn_implementation} in this "
                             "transformers version; set model.attn_implementation: eager") from None
        raise


# ---------------------------------------------------------------------------------- quant formats
def quant4_bytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """Bytes of one 4-bit weight as bitsandbytes / efft QuantLinear store it (bias excluded).

    Packed codes ``ceil(n/2)`` uint8 + 16 float32 code values; absmax one float32 per block, or with
    double quantization one uint8 per block + float32 nested absmax per 256 blocks + float32 offset
    + the 256-entry float32 dynamic map."""
    blocks = -(-numel // blocksize)
    total = (numel + 1) // 2 + 16 * 4
    if double_quant:
        total += blocks + 4 * -(-blocks // NESTED_BLOCKSIZE) + 4 + 256 * 4
    else:
        total += 4 * blocks
    return total


def int8_rowwise_bytes(out_features: int, in_features: int) -> int:
    """LLM.int8() layout (bitsandbytes Int8Params / efft QuantLinear int8): int8 codes + float32 SCB per row."""
    return out_features * in_features + 4 * out_features


def int8_blockwise_bytes(out_features: int, in_features: int, blocksize: int = 64) -> int:
    """Trainable int8 (efft.quant.trainable): int8 codes, a float32 scale per block, the int64
    [seed, counter] rounding state and the 4-byte stride-0 gradient carrier."""
    n = out_features * in_features
    return n + 4 * -(-n // blocksize) + 16 + 4


# ---------------------------------------------------------------------------------- FSDP2 shards
def fsdp_shard_rows(rows: int, nproc: int, rank: int) -> int:
    """Rows of ``rank``'s dim-0 FSDP2 shard: ``torch.chunk`` gives ceil(rows / nproc) rows to each
    rank in turn, so the last ranks get fewer, or none."""
    c = -(-rows // nproc)
    return max(0, min(c, rows - rank * c))


def fsdp_shard_numel(shape, nproc: int, rank: Optional[int] = None) -> int:
    """Elements of one parameter's FSDP2 shard on ``rank`` (the optimizer state is shaped like it),
    or padded (``rank=None``): every rank stores its shard, and receives its gradient, padded to
    rank 0's ceil(rows / nproc) rows."""
    shape = tuple(shape) or (1,)
    rows = -(-shape[0] // nproc) if rank is None else fsdp_shard_rows(shape[0], nproc, rank)
    return rows * math.prod(shape[1:])


# ------------------------------------------------------------------------------- module matching
def _name_matches(name: str, targets) -> bool:
    """peft's rule: the module name equals a target or ends with ``.target``."""
    return any(name == t or name.endswith("." + t) for t in targets)


def _is_skipped(name: str, skip) -> bool:
    """efft.quant's rule: an entry of ``skip`` is a whole dotted run of the name."""
    padded = "." + name + "."
    return any(("." + s.strip(".") + ".") in padded for s in skip if s)


def _output_layer_names(model) -> set[str]:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {n for n, m in model.named_modules() if out is not None and m is out}


# ---------------------------------------------------------------------------------- the estimate
@dataclass
class Estimate:
    """Predicted bytes by category, the peak, and the verdict against ``gpu_memory``."""

    weights: int
    adapters: int
    gradients: int
    optimizer_state: int
    activations: int
    workspace: int
    total: int
    host: int = 0
    gpu_memory: Optional[int] = None
    fits: Optional[bool] = None
    verdict: str = ""
    suggestion: Optional[str] = None
    suggestion_changes: list[str] = field(default_factory=list)
    suggestion_total: Optional[int] = None
    communication: int = 0
    nproc_per_node: int = 1
    details: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    CATEGORIES = ("weights", "adapters", "gradients", "optimizer_state", "activations", "workspace", "communication")

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.CATEGORIES}
        d.update(nproc_per_node=self.nproc_per_node, total=self.total, host=self.host, gpu_memory=self.gpu_memory,
                 fits=self.fits, verdict=self.verdict,
                 suggestion=self.suggestion, suggestion_changes=list(self.suggestion_changes),
                 suggestion_total=self.suggestion_total, details=self.details, notes=list(self.notes))
        return d

    def format_table(self) -> str:
        labels = {"weights": "weights", "adapters": "adapters", "gradients": "gradients",
                  "optimizer_state": "optimizer state", "activations": "activations", "workspace": "workspace",
                  "communication": "DDP buckets" if not self.details.get("fsdp") else "FSDP gathered params"}
        rows = [(labels[k], getattr(self, k)) for k in self.CATEGORIES if k != "communication" or self.communication]
        rows.append(("peak (predicted)", self.total))
        if self.host:
            rows.append(("host memory (offload)", self.host))
        if self.gpu_memory is not None:
            rows.append(("GPU memory", self.gpu_memory))
        w = max(len(r[0]) for r in rows)
        head = self.details.get("summary", "")
        lines = [head] if head else []
        for label, v in rows:
            pct = f"  {100 * v / self.total:5.1f}%" if self.total and label in labels.values() else ""
            lines.append(f"  {label:<{w}}  {format_bytes(v):>11}{pct}")
        if self.details.get("peak_note"):
            lines.append(f"  ({self.details['peak_note']})")
        lines.append(self.verdict)
        if self.suggestion:
            lines.append(self.suggestion)
        for n in self.notes:
            lines.append(f"note: {n}")
        return "\n".join(lines)


@dataclass
class _Arch:
    family: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    layers: int
    tied: bool
    gemma_norm: bool
    norms_per_layer: int
    attn_softcap: Optional[float]
    final_softcap: Optional[float]
    attention_dropout: float

    @classmethod
    def of(cls, cfg) -> "_Arch":
        mt = cfg.model_type
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return cls(
            family=mt, hidden=cfg.hidden_size, heads=heads, kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=head_dim, intermediate=cfg.intermediate_size, vocab=cfg.vocab_size, layers=cfg.num_hidden_layers,
            tied=bool(getattr(cfg, "tie_word_embeddings", False)), gemma_norm=mt.startswith("gemma"),
            norms_per_layer=4 if mt in ("gemma2", "gemma3_text") else 2,
            attn_softcap=getattr(cfg, "attn_logit_softcapping", None), final_softcap=getattr(cfg, "final_logit_softcapping", None),
            attention_dropout=float(getattr(cfg, "attention_dropout", 0.0) or 0.0),
        )


SUPPORTED_ACTIVATION_FAMILIES = ("llama", "mistral", "qwen2", "gemma", "gemma2")
_LAYER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# a decoder layer's norms in the order the activation model counts them (= call order), by norms per layer
_LAYER_NORMS = {2: ("input_layernorm", "post_attention_layernorm"),
                4: ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")}


@dataclass
class Recomputed:
    """Where efft.sparsity.recompute was installed: per decoder layer its norms (flags in
    ``_LAYER_NORMS`` order) and its gated MLP, and the final norm. It installs per module only
    where a probe shows the recompute exact, so a prepared model can have it on some modules only."""

    norms: list[tuple[bool, ...]]
    mlps: list[bool]
    final_norm: bool


# ---------------------------------------------------------------------------------- activations
def activation_bytes(
    arch: _Arch,
    batch: int,
    seq: int,
    *,
    dtype_bytes: int = 4,
    attn: str = "sdpa",
    linears: Optional[dict[str, str]] = None,
    lora_r: int = 16,
    lora_bytes: int = 4,
    norms_trainable: bool = True,
    embed_trainable: bool = True,
    head_trainable: bool = True,
    input_requires_grad: bool = True,
    checkpointing: bool = False,
    loss_tokens: bool = False,
    label_fraction: float = 1.0,
    keep_ratio: float = 1.0,
    keep_start_layer: int = 0,
    sampled_keep: Union[float, dict[str, float]] = 1.0,
    gqa_in_sdpa: bool = True,
    autocast_bytes: Optional[int] = None,
    partial: tuple = (None, None),
    te_extra_per_token: int = 0,
    recompute_norms: bool = False,
    recompute_mlp: bool = False,
    recomputed: Optional[Recomputed] = None,
    quantized: frozenset = frozenset(),
    head_plain: bool = True,
    peqa_bytes: Optional[int] = None,
) -> dict[str, int]:
    """Bytes saved for backward (live peak) by a llama-like causal LM, component by component.

    ``linears`` maps each decoder Linear (q_proj ... down_proj) to ``full`` (trainable weight: saves
    its input), ``lora`` (frozen base + LoRA: lora_A saves the input in the adapter's dtype, lora_B
    the rank-r product), ``partial`` (PaCA: saves only its trained input columns, a copy) or
    ``frozen`` (saves nothing of its input). Each saved storage counts once,
    as the tracker counts it. ``input_requires_grad``: the embedding output needs a gradient (the
    embedding trains, or checkpointing made the inputs require grad). ``recompute_norms`` /
    ``recompute_mlp`` (efft.sparsity.recompute): each norm keeps only its input; the gated MLP keeps
    gate and up but not act(gate); ``recomputed`` (read from a prepared model) says module by module
    where it is installed instead (the two flags then count for nothing).

    ``autocast_bytes``: the forward runs under autocast to a compute dtype of that many bytes a
    value (``train.bf16`` / ``train.fp16``, as Trainer enters it around the forward); ``dtype_bytes``
    stays the weights' (and so the residual stream's) dtype. ``quantized``: the names of
    ``linears`` whose layer (or LoRA base) is one of efft.quant's modules (QuantLinear, trainable
    int8, PEQA), which under autocast return their input's dtype and keep no cast weight;
    ``head_plain``: the LM head is a plain ``nn.Linear``. ``peqa_bytes``: the ``quantized`` layers
    are PEQA's, computing in a dtype of that many bytes (they keep their input cast to it).

    ``loss_tokens``: besides the head on label rows (``label_fraction`` of the positions), the last
    decoder block runs as efft.sparsity.last_block does it: everything after the attention (the
    post-attention norms, the MLP) on the label rows only and, with eager attention, the queries of
    the label rows only (the output projection reads that compact output; keys and values stay on
    every row). sdpa without a mask (no padding, as assumed here) runs whole: on CPU the label span's
    lower-right causal mask is off (UNMASKED_SDPA_ON_CPU); on CUDA the span's queries only, so there
    this is an upper bound. The query rows are those of the label rows spread evenly over the batch's
    rows, as the collator's label rows index them (K per row = the largest count). The query
    projection on label rows only keeps the input the key/value projections keep and the label-row
    index the head keeps: no bytes of its own.

    Returns ``layer`` (one decoder layer), ``layers`` (all), ``head`` (final norm + LM head + loss),
    ``globals`` (token ids, rotary tables), ``forward`` (what is saved at the end of forward) and
    ``peak`` (the live maximum over forward and backward)."""
    if arch.family not in SUPPORTED_ACTIVATION_FAMILIES:
        raise ValueError(f"no activation model for model_type {arch.family!r}; supported: "
                         f"{', '.join(SUPPORTED_ACTIVATION_FAMILIES)}")
    if attn not in ("eager", "sdpa"):
        raise ValueError(f"attn_implementation must be eager or sdpa, got {attn!r}")
    linears = linears or {k: "full" for k in _LAYER_LINEARS}
    e = dtype_bytes
    h, H, K, d, I, V = arch.hidden, arch.heads, arch.kv_heads, arch.head_dim, arch.intermediate, arch.vocab
    b, s = batch, seq
    ac = autocast_bytes is not None
    c = autocast_bytes if ac else e  # bytes a value of what matmuls (and the attention) produce
    fan_out = {"q_proj": H * d, "k_proj": K * d, "v_proj": K * d, "o_proj": h, "gate_proj": I, "up_proj": I,
               "down_proj": h}

    def keep_of(nm: str) -> float:
        """sampled_linear's keep for linear ``nm`` (1.0: not sampled; a dict names it per linear)."""
        return sampled_keep.get(nm, 1.0) if isinstance(sampled_keep, dict) else sampled_keep

    def rc_norm(i: int, pos: int) -> bool:
        """Whether norm ``pos`` of layer ``i`` (``i`` = layers: the final norm) keeps only its input."""
        if recomputed is None:
            return recompute_norms
        if i == arch.layers:
            return recomputed.final_norm
        return i < len(recomputed.norms) and recomputed.norms[i][pos]

    def mlp_inner(i: int) -> int:
        """Intermediate-sized tensors the MLP keeps: gate, act(gate), up (recompute: act(gate) is rebuilt in backward)."""
        on = recompute_mlp if recomputed is None else i < len(recomputed.mlps) and recomputed.mlps[i]
        return 2 if on else 3

    def norm(T: int, x_grad: bool, out_dtype_bytes: int = e, recompute: bool = False) -> int:
        """RMSNorm: fp32 copy of x (= x itself in fp32), rsqrt; the normalized tensor when the
        weight trains (gemma: fp32 product with (1 + w), which also keeps (1 + w))."""
        if not x_grad and not norms_trainable:
            return 0
        if recompute:
            return e * T * h  # its input only (the output is recomputed in backward)
        n = 0
        if x_grad:
            n += 4 * T * h + 4 * T
        if norms_trainable:
            n += (4 if arch.gemma_norm else out_dtype_bytes) * T * h
        if arch.gemma_norm and x_grad:
            n += 4 * h
        return n

    def sample(nbytes: int, T: int, width: int, kp: float) -> int:
        """One sampled_linear sample of a [T, width] tensor: its kept rows (a copy in the tensor's
        dtype), their int64 indices and float32 scales."""
        rows = max(1, int(round(kp * T)))
        return rows * (nbytes * width + 8 + 4)

    def linear_group(T: int, fan_in: int, names: tuple[str, ...]) -> int:
        """Inputs saved by Linear layers that read one tensor (q/k/v, gate/up, o, down)."""
        kinds = [linears.get(nm, "full") for nm in names]
        keeps = [keep_of(nm) for nm in names]
        n = 0
        if peqa_bytes is not None and peqa_bytes != e:
            # PEQA in another compute dtype keeps its own cast of x (a copy per layer), or, sampled, one
            # sample of x cast to it (shared: keyed on x)
            peqa = [kp for nm, k, kp in zip(names, kinds, keeps) if k == "full" and nm in quantized]
            n += sum(peqa_bytes * T * fan_in for kp in peqa if kp >= 1)
            if any(kp < 1 for kp in peqa):
                n += sample(peqa_bytes, T, fan_in, min(kp for kp in peqa if kp < 1))
            kinds = [None if k == "full" and nm in quantized else k for nm, k in zip(names, kinds)]
        # layers reading x itself (full, or lora_A in x's dtype): an unsampled one keeps x, the sampled
        # ones (lora_A too) one shared sample of its rows, a copy
        reads_x = [kp for k, kp in zip(kinds, keeps) if k == "full" or (k == "lora" and lora_bytes == e)]
        if any(kp >= 1 for kp in reads_x):
            n += e * T * fan_in
        if any(kp < 1 for kp in reads_x):
            n += sample(e, T, fan_in, min(kp for kp in reads_x if kp < 1))
        n += sum(sample(lora_bytes, T, fan_in, kp) if kp < 1 else lora_bytes * T * fan_in
                 for k, kp in zip(kinds, keeps) if k == "lora" and lora_bytes != e)
        n += sum(sample(lora_bytes, T, lora_r, kp) if kp < 1 else lora_bytes * T * lora_r
                 for k, kp in zip(kinds, keeps) if k == "lora")  # lora_B: sampled too
        n += sum(e * T * partial_columns(fan_in, *partial) for k in kinds if k == "partial")
        return n

    def linear_group_autocast(T: int, fan_in: int, names: tuple[str, ...], xb: int, x_grad: bool,
                              x_counted: bool = False) -> tuple[int, int]:
        """Under autocast: (bytes kept, bytes a value of the output) for the Linear layers reading one
        tensor x of ``xb`` bytes a value; ``x_grad``: x requires grad; ``x_counted``: x itself is
        already kept by another op (the sdpa output o_proj reads). Storages several layers keep
        count once (keyed in ``kept``)."""
        kept: dict = {}
        out = c
        for nm in names:
            k, kp, fo, quant = linears.get(nm, "full"), keep_of(nm), fan_out[nm], nm in quantized
            if k == "partial":  # PaCA: its trained input columns, a copy in x's dtype (no cast kept)
                kept["cols", nm] = xb * T * partial_columns(fan_in, *partial)
            elif k == "full" and quant:
                # trainable int8 / PEQA: autograd functions of efft's that keep x (or its sample) and return
                # x's dtype; the weight is rebuilt from its codes in backward. PEQA keeps x cast to its
                # compute dtype: a copy per layer where x has another (a sample: one, keyed on x)
                out = xb
                pb = xb if peqa_bytes is None else peqa_bytes
                if kp < 1:
                    kept["xs"] = sample(pb, T, fan_in, kp)
                else:
                    kept["x" if pb == xb else ("peqa", nm)] = pb * T * fan_in
            elif k == "full":
                if kp < 1:  # sampled_linear: a sample of x itself, in x's dtype; keeps the weight parameter, no cast
                    kept["xs"] = sample(xb, T, fan_in, kp)
                else:
                    # autocast casts x for each layer (its cast cache holds only leaf tensors): a copy
                    # each, or x itself where it already has the compute dtype
                    kept["x" if xb == c else ("cast", nm)] = c * T * fan_in
                    if e != c:  # and the weight's cast copy (a leaf: cached for the forward), kept for dx
                        kept["w", nm] = c * fo * fan_in
            elif k == "lora":
                if quant:  # QuantLinear base: keeps nothing, returns x's dtype
                    out = xb
                elif x_grad and e != c:  # frozen base: its cast weight, kept for dx when x needs a gradient
                    kept["w", nm] = c * fo * fan_in
                # lora_A's input: peft casts x to the adapter's dtype (a new tensor per layer) unless x has
                # it; efft's QuantLoraLinear passes x itself under autocast
                own = quant or xb == lora_bytes
                lb = xb if own else lora_bytes
                if kp < 1:  # sampled: lora_A keeps a sample of its input, lora_B one of A's output (compute dtype)
                    kept["xs" if own else ("las", nm)] = sample(lb, T, fan_in, kp)
                    kept["lbs", nm] = sample(c, T, lora_r, kp)
                else:
                    kept[("x" if own else ("la", nm)) if lb == c else ("lacast", nm)] = c * T * fan_in
                    kept["lb", nm] = c * T * lora_r  # A's output, in the compute dtype
                    if lora_bytes != c:  # the adapters' cast weights: A's for dx when x needs a gradient, B's always
                        kept["wa", nm] = c * lora_r * fan_in if x_grad else 0
                        kept["wb", nm] = c * fo * lora_r
            elif quant:  # frozen quantized: keeps nothing, returns x's dtype
                out = xb
            elif x_grad and e != c:  # frozen nn.Linear: its cast weight, kept for dx when x needs a gradient
                kept["w", nm] = c * fo * fan_in
        if x_counted:
            kept.pop("x", None)
        return sum(kept.values()), out

    def layer(T: int, bb: int, ss: int, first: bool, i: int, rows: Optional[int] = None,
              queries: Optional[int] = None) -> int:
        """Layer ``i`` on T = bb x ss rows. ``rows``: what runs after the attention runs on that many
        rows only; ``queries``: the (eager) attention computes that many query rows, bb x queries/bb
        (loss_tokens' last block: both the label rows)."""
        x_grad = input_requires_grad or not first
        qkv_grad = x_grad or any(linears.get(k) in ("full", "lora", "partial") for k in ("q_proj", "k_proj", "v_proj"))
        P = T if rows is None else rows  # rows of everything after the attention
        n = norm(T, x_grad, recompute=rc_norm(i, 0))
        if ac:
            n += linear_group_autocast(T, h, ("q_proj", "k_proj", "v_proj"), e, x_grad)[0]
        else:
            n += linear_group(T, h, ("q_proj", "k_proj", "v_proj"))
        # (under autocast the attention's matmuls keep compute-dtype casts, c bytes: of the rotated q and k,
        # which are float32 with the float32 rotary tables, and of v)
        if qkv_grad:
            if attn == "eager":
                Q = T if queries is None else queries
                scores = bb * H * (Q // bb) * ss
                n += c * Q * H * d + 2 * c * T * H * d  # rotated q (the query rows), repeated k, repeated v
                n += 4 * scores  # softmax output (fp32)
                if c != 4:
                    n += c * scores  # its cast back to the compute dtype, saved by the matmul with v
                if arch.attn_softcap:
                    n += c * scores  # tanh output of the logit soft-capping (on the matmul's output)
                if arch.attention_dropout > 0:
                    n += scores if ac else (1 + e) * scores  # mask (+ output; under autocast the matmul's cast, above)
                if queries is not None:
                    n += 8 * Q  # the query rows' flat index (index_select keeps only it, not q)
                    if Q != P:
                        n += 8 * P  # where the label rows sit among the query rows (padded rows dropped)
                o_in_new = True
            else:
                Q = T
                kv = K if gqa_in_sdpa else H
                n += c * T * H * d + 2 * c * T * kv * d  # q, k, v
                n += c * T * H * d + 4 * bb * H * ss  # output, logsumexp
                o_in_new = False  # o_proj reads a view of the attention output
            o_kind = linears.get("o_proj", "full")
            if ac:  # the attention's output has the compute dtype; sdpa keeps it itself
                n += linear_group_autocast(Q, H * d, ("o_proj",), c, True, x_counted=not o_in_new)[0]
            elif o_in_new or (o_kind == "lora" and lora_bytes != e) or o_kind == "partial":
                n += linear_group(Q, H * d, ("o_proj",))  # on the attention's compact output
            else:
                n += sum(lora_bytes * T * lora_r for k in (o_kind,) if k == "lora")
                if o_kind == "full" and (keep_of("o_proj") < 1 or ("o_proj" in quantized and peqa_bytes not in (None, e))):
                    # what it keeps is a copy beside the output sdpa keeps: its sample, or PEQA's cast
                    n += linear_group(T, H * d, ("o_proj",))
        elif ac:
            n += linear_group_autocast(T, H * d, ("o_proj",), c, False)[0]
        else:
            n += linear_group(T, H * d, ("o_proj",))
        mlp_norm = 1
        if arch.norms_per_layer == 4:
            n += norm(P, True, recompute=rc_norm(i, 1))  # post-attention norm on the attention output
            mlp_norm = 2
        n += norm(P, True, recompute=rc_norm(i, mlp_norm))  # pre-MLP norm
        if ac:
            # gate/up return the compute dtype (plain nn.Linear, peft LoRA on one) or x's (efft.quant's
            # layers): the MLP's inner tensors and down_proj's input have that dtype
            kb, po = linear_group_autocast(P, h, ("gate_proj", "up_proj"), e, True)
            n += kb + mlp_inner(i) * po * P * I
            n += linear_group_autocast(P, I, ("down_proj",), po, True)[0]
        else:
            n += linear_group(P, h, ("gate_proj", "up_proj"))
            n += mlp_inner(i) * e * P * I  # gate output (activation input), activation output, up output
            n += linear_group(P, I, ("down_proj",))
        if arch.norms_per_layer == 4:
            n += norm(P, True, recompute=rc_norm(i, 3))  # post-feedforward norm
        return n

    T = b * s
    kept_T = max(1, int(round(T * keep_ratio)))
    kept_s = max(1, int(round(s * keep_ratio)))
    label_rows = min(T, max(1, int(round(T * label_fraction))))
    per_layer = []
    for i in range(arch.layers):
        if keep_ratio < 1 and i >= keep_start_layer:
            # (an eliminating last block gets a shorter sequence than the label rows index: it runs whole)
            per_layer.append(layer(kept_T, b, kept_s, i == 0, i) + te_extra_per_token * kept_T)
        elif loss_tokens and i == arch.layers - 1:
            # efft.sparsity.last_block; its label-row index is the head's (one storage, counted there)
            queries = b * -(-label_rows // b) if attn == "eager" else None
            per_layer.append(layer(T, b, s, i == 0, i, rows=label_rows, queries=queries))
        else:
            per_layer.append(layer(T, b, s, i == 0, i))
    layers_total = sum(per_layer)

    # final norm + LM head + loss
    head = norm(T, True, recompute=rc_norm(arch.layers, 0))
    if loss_tokens:
        rows = max(1, int(round(T * label_fraction)))
        head += e * rows * h  # gradient of the gathered hidden rows, formed in forward
        head += 8 * rows  # row indices
        head += 4  # the loss's float32 denominator (label count or num_items_in_batch)
        if head_trainable:
            head += 4 * V * h  # head weight gradient (float32), formed in forward
    else:
        if head_trainable:
            head += c * T * h  # lm_head input (view of the final norm output; under autocast its cast copy)
        if ac and e != c and head_plain:
            head += c * V * h  # under autocast the head weight's cast copy, kept for the gradient of its input
        if arch.final_softcap:
            head += c * T * V  # tanh output (of the logits: compute dtype)
        head += 4 * T * V + 8 * T + 4  # log_softmax output (fp32), targets, total weight
    glob = 0
    if embed_trainable:
        glob += 8 * T  # token ids saved by the embedding
    rope = 2 * e * s * d  # cos and sin, shared by every layer (position ids of batch 1)
    glob += rope

    fwd = layers_total + head + glob
    out = {"layer": per_layer[-1] if per_layer else 0, "layers": layers_total, "head": head, "globals": glob,
           "rope": rope, "all_but_last_layer": layers_total - (per_layer[-1] if per_layer else 0)}
    if not checkpointing:
        out["forward"] = fwd
        out["peak"] = fwd
        out["checkpoint_inputs"] = 0
        return out
    # checkpointing: only each layer's input is kept; backward recomputes one layer at a time
    inputs = arch.layers * e * T * h
    ck_fwd = inputs + head + (8 * T if embed_trainable else 0)
    # the first norm keeps the (fp32) layer input itself: shared storage with the checkpoint input
    shared_in = [e * T * h if (e == 4 or rc_norm(i, 0)) else 0 for i in range(arch.layers)]
    recompute = max((p - sh for p, sh in zip(per_layer, shared_in)), default=0) + rope
    # while layer i recomputes, inputs of layers 0..i are alive (later ones were freed)
    during = max(((i + 1) * e * T * h + per_layer[i] + rope - shared_in[i]) for i in range(arch.layers)) \
        if arch.layers else 0
    out.update(forward=ck_fwd, checkpoint_inputs=inputs, recompute=recompute,
               peak=max(ck_fwd, during + (8 * T if embed_trainable else 0)))
    return out


# ------------------------------------------------------------------------------ optimizer state
def _lowrank_state(shape: tuple[int, int], param_bytes: int, o, rank: int, projector: Optional[str] = None,
                   bits: Optional[int] = None) -> tuple[int, int]:
    """(state bytes, workspace bytes) for one 2-D low-rank parameter, as efft/optim stores it:
    float32 moments of the projected shape, the basis (parameter dtype) when it is stored (GaLore;
    APOLLO / FRUGAL with ``svd``), APOLLO's norm-growth scalar; FRUGAL ``block``: moments of the
    ``density`` share of rows/columns of the larger side."""
    projector = projector or o.projector
    bits = o.state_bits if bits is None else bits
    m, n = shape
    r = min(rank, m, n)
    side = _side(shape, o.proj_type)
    proj_shape = (r, n) if side == "left" else (m, r)
    basis_shape = (m, r) if side == "left" else (r, n)
    moments = 2 * _moment_bytes(proj_shape[0] * proj_shape[1], bits)
    name = o.name
    if name == "galore":
        return moments + param_bytes * basis_shape[0] * basis_shape[1], 4 * m * n
    if name in ("apollo", "apollo_mini"):
        basis = param_bytes * basis_shape[0] * basis_shape[1] if projector == "svd" else 0
        limiter = 4 if o.norm_growth_limit is not None else 0
        return moments + basis + limiter, 4 * m * n + param_bytes * basis_shape[0] * basis_shape[1]
    if name == "frugal":
        if projector == "block":
            dim = 0 if m >= n else 1
            k = max(1, min(shape[dim], round(o.density * shape[dim])))
            sub = k * (n if dim == 0 else m)
            return 2 * _moment_bytes(sub, bits), 4 * m * n
        basis = param_bytes * basis_shape[0] * basis_shape[1] if projector == "svd" else 0
        return moments + basis, 4 * m * n
    raise ValueError(f"optimizer {name!r} has no low-rank state")


_DEFAULT_PROJECTOR = {"galore": "svd", "apollo": "random", "apollo_mini": "random", "frugal": "block"}
_NEVER_LOWRANK = ("lm_head", "embed", "wte", "wpe", "lora_", "modules_to_save")


def _int8_layers_are_lowrank() -> bool:
    """Whether efft.optim's factory projects the int8 layers' gradient carriers (it projects only
    Linear-like modules); asked of the code itself so the planner follows it when it changes."""
    try:
        from efft.optim.factory import _linear_like
        from efft.quant.trainable import Int8TrainableLinear

        return bool(_linear_like(Int8TrainableLinear(8, 8, False, device="meta")))
    except Exception:
        return False


def _efft_8bit_available() -> bool:
    try:
        from efft.optim import moments

        return 8 in moments.BITS
    except Exception:
        return False


def _side(shape, proj_type: str) -> str:
    m, n = shape
    if proj_type == "std":
        return "left" if m < n else "right"
    if proj_type == "reverse_std":
        return "right" if m < n else "left"
    return proj_type


def _moment_bytes(numel: int, bits: int) -> int:
    """One Adam moment of ``numel`` elements: float32, or 8-bit codes + a float32 absmax per 256."""
    if bits == 8:
        return numel + 4 * -(-numel // 256)
    return 4 * numel


# -------------------------------------------------------------------------------- main entry
def _recipe_from(recipe: Any):
    from efft import config as C

    if isinstance(recipe, C.Recipe):
        return recipe
    if isinstance(recipe, (str, Path)):
        return C.load_recipe(recipe, weights=False)
    if isinstance(recipe, dict):
        data = dict(recipe)
        data.setdefault("data", {"path": "(not needed for an estimate)"})
        try:
            r = C.Recipe.model_validate(data)
        except Exception as e:  # pydantic ValidationError -> the recipe's own message format
            from pydantic import ValidationError

            if isinstance(e, ValidationError):
                raise C.RecipeError([C._format_error(err) for err in e.errors()]) from None
            raise
        problems = C._combination_problems(r)
        if problems:
            raise C.RecipeError(problems)
        return r
    raise ValueError(f"estimate() takes a Recipe, a recipe dict or a YAML path, got {type(recipe).__name__}")


def estimate(recipe: Any, gpu_memory: Any = None, *, nproc_per_node: int = 1, label_fraction: float = 1.0,
             suggest: bool = True, config=None, model=None) -> Estimate:
    """Predict the training peak of ``recipe`` (a Recipe, a dict or a YAML path) by category.

    ``gpu_memory`` (bytes or "24GB") turns on the verdict and, when it does not fit, the search
    for the cheapest change that fits. ``label_fraction``: share of positions with a label (only
    loss-token skipping uses it; 1.0 is the conservative default). ``config``: a transformers
    config to use instead of resolving ``recipe.model`` (tests). ``nproc_per_node``: the processes the
    run is launched with (torchrun's ``--nproc_per_node``); the bytes are per rank: one process's plus
    DDP's gradient buckets, or with ``train.fsdp`` the shards of rank 0 (it holds the most) plus the
    parameters FSDP2 gathers. ``model``: the model as efft.compose.prepare_model prepared it for this
    recipe, where there is one: what efft.sparsity installed per module (``sparsity.recompute``) is
    then read from it instead of assumed (suggestions are still planned from the recipe)."""
    if isinstance(nproc_per_node, bool) or not isinstance(nproc_per_node, int) or nproc_per_node < 1:
        raise ValueError(f"nproc_per_node must be a positive integer, got {nproc_per_node!r}")
    r = _recipe_from(recipe)
    if r.train.fsdp:
        from efft.integrations.fsdp import fsdp_problems

        refused = fsdp_problems(r)
        if refused:  # what training would refuse has no plan
            raise ValueError("train.fsdp: " + "; ".join(f"{k}: {why}" for k, why in refused))
    gpu = parse_size(gpu_memory) if gpu_memory is not None else None
    cfg = config if config is not None else resolve_config(r.model)
    est = _estimate(r, cfg, label_fraction, nproc=nproc_per_node, prepared=model)
    est.gpu_memory = gpu
    if gpu is None:
        est.fits = None
        est.verdict = f"predicted peak {format_bytes(est.total)} (give --gpu-memory for a verdict)"
        return est
    est.fits = est.total <= gpu
    if est.fits:
        est.verdict = f"fits: predicted peak {format_bytes(est.total)} of {format_bytes(gpu)} ({100 * est.total / gpu:.0f}%)"
        return est
    est.verdict = (f"does not fit: predicted peak {format_bytes(est.total)} > {format_bytes(gpu)} "
                   f"(over by {format_bytes(est.total - gpu)})")
    if suggest:
        found = _suggest(r, cfg, gpu, label_fraction, nproc_per_node)
        if found is None:
            est.suggestion = ("no single change or combination of the usual ones (checkpointing, loss-token skipping, "
                              "smaller batch, 8-bit / low-rank / layer-wise optimizer, offload, NF4 + LoRA, shorter "
                              "sequences) brings it under the limit: use a smaller model or a larger GPU")
        else:
            changes, total, why = found
            est.suggestion_changes = changes
            est.suggestion_total = total
            est.suggestion = (f"cheapest change that fits: {why} -> predicted {format_bytes(total)}\n"
                              f"  overrides: {' '.join(changes)}")
    return est


def _dtype_bytes(r) -> tuple[torch.dtype, int, Optional[int]]:
    """(weights' dtype, its bytes, the autocast compute dtype's bytes or None): with train.bf16 /
    train.fp16 Trainer runs the forward under autocast, also over bf16 weights (the fp32 LoRA
    adapters and efft.quant's modules still see it)."""
    dt = _DTYPE[r.model.dtype]
    autocast = 2 if (r.train.bf16 or r.train.fp16) else None
    return dt, _NBYTES[dt], autocast


def _estimate(r, cfg, label_fraction: float, cache: Optional[dict] = None, nproc: int = 1, prepared=None) -> Estimate:
    if cfg.model_type not in SUPPORTED_ACTIVATION_FAMILIES:
        raise ValueError(f"no activation model for model_type {cfg.model_type!r}; supported: "
                         f"{', '.join(SUPPORTED_ACTIVATION_FAMILIES)}")
    dtype, e, autocast = _dtype_bytes(r)
    key = (id(cfg), dtype, r.model.attn_implementation)
    if cache is not None and key in cache:
        model = cache[key]
    else:
        model = build_meta_model(cfg, dtype, r.model.attn_implementation)  # read only: never modified here
        if cache is not None:
            cache[key] = model
    arch = _Arch.of(cfg)
    q, a, o, t, sp, off = r.quant, r.adapter, r.optim, r.train, r.sparsity, r.offload
    out_names = _output_layer_names(model)
    notes: list[str] = []

    # -------------------------------------------------------------------- classify parameters
    lin_of_param: dict[int, tuple[str, torch.nn.Module]] = {}
    linears = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            linears.append((name, mod))
            lin_of_param[id(mod.weight)] = (name, mod)
    quant4 = q.type in ("nf4", "fp4")
    int8 = q.type == "int8"
    quantized = {name for name, _ in linears if q.type != "none" and not _is_skipped(name, q.skip)}
    lora = a.type in ("lora", "dora")
    if lora:
        if a.target_modules == "all-linear":
            targets = {name for name, _ in linears if name not in out_names}
        else:
            targets = {name for name, _ in linears if _name_matches(name, a.target_modules)}
        if not targets:
            raise ValueError(f"adapter.target_modules {a.target_modules!r} matches no Linear layer of this model")
    else:
        targets = set()

    full_ft = a.type == "none" and not sp.partial.enabled
    int8_train = int8 and q.trainable
    emb_mode = q.embeddings if int8_train else None  # frozen | trainable | host (trainable int8 only)
    host_params: list[tuple[str, tuple]] = []  # quant.embeddings: host: float32 in host memory
    weights = 0
    buffers = 0
    trainable: list[tuple[str, tuple, int]] = []  # (name, shape, bytes per element of its gradient)
    frozen_bytes = 0
    kept_params: list[tuple[str, tuple, int]] = []  # parameters that stay parameters (FSDP2 shards these)
    seen = set()
    for pname, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        shape, eb = tuple(p.shape), p.element_size()
        owner = lin_of_param.get(id(p))
        is_weight_of_quantized = owner is not None and owner[0] in quantized and pname.endswith("weight")
        if is_weight_of_quantized:
            out_f, in_f = shape
            if a.type == "peqa":
                # efft.quant.peqa: frozen codes (+ 4-bit code table); the scales become float32
                # parameters (counted as adapters), the double-quant statistics are dropped
                weights += (out_f * in_f + 1) // 2 + 16 * 4 if quant4 else out_f * in_f
            elif quant4:
                weights += quant4_bytes(out_f * in_f, q.blocksize, q.double_quant)
            elif int8_train:
                weights += int8_blockwise_bytes(out_f, in_f, q.blocksize)
                trainable.append((pname, shape, 4))  # float32 gradient through the carrier
            else:
                weights += int8_rowwise_bytes(out_f, in_f)
            continue
        kept_params.append((pname, shape, eb))
        nbytes = p.numel() * eb
        if owner is not None and owner[0] in quantized and pname.endswith("bias"):
            if int8_train:
                weights += 4 * p.numel()  # trainable int8 keeps the bias in float32
                trainable.append((pname, shape, 4))
            else:
                weights += nbytes
            continue
        weights += nbytes
        if full_ft and not int8_train:
            trainable.append((pname, shape, eb))
        elif int8_train:
            is_embedding_or_head = p.dim() == 2 and owner is None or (owner is not None and owner[0] in out_names)
            if not is_embedding_or_head:
                trainable.append((pname, shape, eb))  # norms (and biases) stay trainable
            elif emb_mode == "trainable":
                trainable.append((pname, shape, eb))  # full precision on the device
            elif emb_mode == "host":
                weights -= nbytes  # efft.offload.host_embeddings: float32 in host memory, never whole on the device
                host_params.append((pname, shape))
            else:
                frozen_bytes += nbytes
        else:
            frozen_bytes += nbytes
    for _, buf in model.named_buffers():
        buffers += buf.numel() * buf.element_size()
    weights += buffers
    streamed_host, streamed_layer = 0, 0
    if off.weights and int8_train:
        # efft.offload.weights: each decoder layer's int8 codes, block scales and rounding state live
        # in host memory; the device holds 1 + weights_prefetch_layers layers of them at a time (the
        # 4-byte carriers, biases and norms stay on the device)
        per_layer = _streamed_layer_bytes(model, quantized, q.blocksize)
        streamed_host, streamed_layer = sum(per_layer), max(per_layer, default=0)
        weights += (1 + off.weights_prefetch_layers) * streamed_layer - streamed_host
        notes.append(f"offload.weights: int8 decoder layers in host memory, {1 + off.weights_prefetch_layers} "
                     "layer(s) on the device at a time")

    # adapters
    adapter_params: list[tuple[str, tuple, int]] = []
    if lora:
        for name, mod in linears:
            if name in targets:
                adapter_params.append((name + ".lora_A", (a.r, mod.in_features), 4))
                adapter_params.append((name + ".lora_B", (mod.out_features, a.r), 4))
                if a.type == "dora":
                    adapter_params.append((name + ".lora_magnitude", (mod.out_features,), 4))
        for mts in a.modules_to_save:
            for name, mod in model.named_modules():
                if _name_matches(name, [mts]):
                    for pn, p in mod.named_parameters():
                        adapter_params.append((f"{name}.{pn}(copy)", tuple(p.shape), p.element_size()))
    elif a.type == "peqa":
        for name, mod in linears:
            if name in quantized:
                # one float32 scale per block (4-bit) or per row (int8), the only trainable tensors
                blocks = -(-mod.in_features * mod.out_features // q.blocksize) if quant4 else mod.out_features
                adapter_params.append((name + ".block_scales", (blocks,), 4))
    adapters = sum(math.prod(s) * b for _, s, b in adapter_params)
    partial_targets = set()
    if sp.partial.enabled:
        # PaCA (efft.sparsity.partial): base frozen; per target Linear a trainable (out x k) copy of
        # k columns (r, or round(fraction * in)) in the weight's dtype, and their int64 column indices.
        for name, mod in linears:
            if name not in out_names and (sp.partial.target_modules == "all-linear" or _name_matches(name, sp.partial.target_modules)):
                cols = partial_columns(mod.in_features, sp.partial.fraction, sp.partial.r)
                adapter_params.append((name + ".paca_weight", (mod.out_features, cols), mod.weight.element_size()))
                weights += 8 * cols
                partial_targets.add(name)
        adapters = sum(math.prod(s) * b for _, s, b in adapter_params)

    train_params = trainable + adapter_params
    if not train_params:
        raise ValueError("this recipe trains no parameter (check adapter.target_modules / quant)")
    fsdp = t.fsdp
    if fsdp and nproc < 2:
        raise ValueError("train.fsdp: FSDP2 shards over several processes; give the number the run is launched with "
                         "(efft estimate --nproc-per-node N, estimate(..., nproc_per_node=N))")
    if fsdp:
        # efft.integrations.fsdp: every parameter is sharded on dim 0 (padded storage on every rank);
        # buffers (packed quantized bases and their statistics) stay whole on each rank
        weights += sum((fsdp_shard_numel(s, nproc) - math.prod(s)) * b for _, s, b in kept_params)
        adapters = sum(fsdp_shard_numel(s, nproc) * b for _, s, b in adapter_params)

    # -------------------------------------------------------------------------------- gradients
    grad_sizes = [(fsdp_shard_numel(s, nproc) if fsdp else math.prod(s)) * b for _, s, b in train_params]
    if o.layerwise:
        gradients = max(grad_sizes)
    else:
        gradients = sum(grad_sizes)

    # ------------------------------------------------------------------------- optimizer state
    # Mirrors efft.optim.factory: adamw -> torch.optim.AdamW (moments in the parameter's dtype + a
    # float32 step tensor), adamw8bit or adamw + 8-bit -> bitsandbytes AdamW8bit, adamw layer-wise
    # and the projected optimizers -> efft's (float32 moments, python-int steps). Low-rank: trainable
    # 2-D weights of Linear layers, never embeddings / LM head / adapters.
    projected = o.name in ("galore", "apollo", "apollo_mini", "frugal")
    projector = o.projector if "projector" in o.model_fields_set else _DEFAULT_PROJECTOR.get(o.name, o.projector)
    lowrank_names = set()
    if projected:
        int8_lowrank = _int8_layers_are_lowrank() if int8_train else True
        for name, mod in linears:
            if name in out_names or any(tag in name for tag in _NEVER_LOWRANK) or any(x in name for x in o.exclude_modules):
                continue
            if name in quantized and not (int8_train and int8_lowrank):
                continue
            if o.target_modules == "all-linear" or any(tm in name for tm in o.target_modules):
                lowrank_names.add(name + ".weight")
        if int8_train and not int8_lowrank:
            notes.append("efft.optim treats the int8 layers' gradient carriers as plain AdamW parameters (full-size "
                         "float32 moments), not low-rank: the factory does not recognise Int8TrainableLinear as a Linear")
    rank = 1 if o.name == "apollo_mini" else o.rank
    bnb8 = o.name == "adamw8bit" or (o.name == "adamw" and o.state_bits == 8 and not o.layerwise)
    torch_adamw = o.name == "adamw" and o.state_bits == 32 and not o.layerwise
    efft_bits = 32 if bnb8 or torch_adamw else o.state_bits
    if efft_bits == 8 and not _efft_8bit_available():
        notes.append("8-bit moments are not available yet in efft.optim (moments.BITS); predicted with the planned "
                     "layout: 1 byte per element + a float32 absmax per 256")

    def state_on(shard_rank: Optional[int]):
        """(state bytes, step workspace, foreach temporaries, any 8-bit, per parameter) on ``shard_rank`` of
        an FSDP2 run (state shaped like the unpadded shard), or of one process (``None``)."""
        opt_state, step_ws, plain_bytes_tmp, any_8bit, per_param = 0, 0, 0, False, []
        for pname, shape, gb in train_params:
            numel = math.prod(shape) if shard_rank is None else fsdp_shard_numel(shape, nproc, shard_rank)
            st, ws, tmp, is8 = _param_state(pname, shape, gb, numel)
            opt_state += st
            step_ws = max(step_ws, ws)
            plain_bytes_tmp += tmp
            any_8bit = any_8bit or is8
            per_param.append((gb * numel, st))  # (parameter bytes, its state bytes), for offload placement
        return opt_state, step_ws, plain_bytes_tmp, any_8bit, per_param

    def _param_state(pname, shape, gb, numel):
        ws, tmp, is8 = 0, 0, False
        if pname in lowrank_names and len(shape) == 2:
            st, ws = _lowrank_state(shape, gb, o, rank, projector, efft_bits)
        elif bnb8:
            if numel >= 4096:  # bitsandbytes' min_8bit_size
                st = 2 * numel + 2 * 4 * -(-numel // 256)
                is8 = True
            else:
                st = 2 * 4 * numel
        elif torch_adamw:
            st = 2 * gb * numel + 4
            tmp = gb * numel  # foreach sqrt(v) over the group: one moment-sized temporary
        else:
            st = 2 * _moment_bytes(numel, efft_bits)
            # efft's foreach AdamW part: float32 copies of non-fp32 gradients + sqrt(v)
            tmp = (4 if gb == 4 else 8) * numel
        return st, ws, tmp, is8

    # an FSDP2 rank's state: rank 0 holds the most (every other rank's shard has at most its rows)
    opt_state, step_ws, plain_bytes_tmp, any_8bit, per_param = state_on(0 if fsdp else None)
    if any_8bit:
        opt_state += 2 * 256 * 4  # the two quantization maps, shared by all parameters
    if o.layerwise:
        step_ws = max(step_ws, 8 * max(math.prod(s) for _, s, _ in train_params))
    else:
        step_ws = max(step_ws, plain_bytes_tmp)
    host = streamed_host

    def offloaded(per_param) -> list[tuple[int, int]]:
        """efft.offload.optimizer: a parameter of at least keep_small_params_on_device_bytes gets a
        host copy, a host gradient buffer and its state on the host; smaller parameters, and
        parameters whose state is smaller than that (low-rank states), stay on the device."""
        keep = max(off.keep_small_params_on_device_bytes, 1)
        return [(pb, st) for pb, st in per_param if pb >= keep and st >= keep] if off.optimizer else []

    per_rank_state = None
    if fsdp:  # the device's optimizer state on each rank
        per_rank_state = []
        for k in range(nproc):
            st_k, _, _, is8_k, pp_k = state_on(k)
            per_rank_state.append(st_k + (2 * 256 * 4 if is8_k else 0) - sum(st for _, st in offloaded(pp_k)))
    if off.optimizer:
        on_host = offloaded(per_param)
        host_state = sum(st for pb, st in on_host)
        host += host_state + sum(2 * pb for pb, st in on_host)
        opt_state_device = opt_state - host_state
        step_ws = 0
        notes.append("offload.optimizer: states of parameters >= keep_small_params_on_device_bytes on the host")
    else:
        opt_state_device = opt_state
    host_embedding_bytes = 0
    if host_params:
        # efft.offload.host_optimizer: float32 weight + float32 gradient + the CPU optimizer's state
        # (the main optimizer's plain-AdamW part: efft's moments at optim.state_bits; torch AdamW's
        # float32 moments + step when the main optimizer is torch's or bitsandbytes'). The gradient
        # is HostGrad's pooled buffers, one set per host weight (tied: one): the main buffer, and
        # with train.gradient_accumulation_steps > 1 a second float32 buffer of the weight's size
        # that each later micro-batch sums into, allocated at the first step's second micro-batch
        # and kept. Trainer's zero_grad sets the gradient to None, so the first micro-batch of a step
        # writes into the main buffer and accumulation 1 never takes the second.
        grad_buffers = 2 if t.gradient_accumulation_steps > 1 else 1
        for _, shape in host_params:
            numel = math.prod(shape)
            st = 2 * 4 * numel + 4 if (bnb8 or torch_adamw) else 2 * _moment_bytes(numel, efft_bits)
            host_embedding_bytes += 4 * numel + grad_buffers * 4 * numel + st
        host += host_embedding_bytes
        notes.append("quant.embeddings: host: embedding/LM head weights, gradients (two buffers each with gradient "
                     "accumulation) and their AdamW state in host memory; "
                     "the device holds at most two LM-head chunks of quant.head_chunk_rows rows")

    # ------------------------------------------------------------------------------ activations
    kinds = {}
    for nm in _LAYER_LINEARS:
        names = [n for n, _ in linears if n.endswith("." + nm)]
        if not names:
            kinds[nm] = "frozen"
            continue
        n0 = names[0]
        if n0 in targets:
            kinds[nm] = "lora"
        elif a.type == "peqa" and n0 in quantized:
            kinds[nm] = "full"  # PEQA saves the layer input for the scale gradients
        elif full_ft and n0 not in quantized:
            kinds[nm] = "full"
        elif int8_train and n0 in quantized:
            kinds[nm] = "full"
        elif n0 in partial_targets:
            kinds[nm] = "partial"
        else:
            kinds[nm] = "frozen"
    embed_trainable = (full_ft and not int8_train) or emb_mode == "trainable"
    head_name = next(iter(out_names), None)
    head_trainable = embed_trainable if arch.tied else (full_ft and head_name not in quantized and not int8_train)
    head_trainable = head_trainable or emb_mode == "trainable"
    if a.modules_to_save and head_name and _name_matches(head_name, a.modules_to_save):
        head_trainable = True
    ckpt = t.gradient_checkpointing
    input_grad = embed_trainable or ckpt or emb_mode == "host"
    # host mode: the head saves its input on the device (a plain head would too) but, with
    # loss_tokens, runs the generic per-chunk path (no weight gradient formed on the device)
    act_head_trainable = head_trainable or (emb_mode == "host" and not sp.loss_tokens.enabled)
    te = sp.token_elimination
    keep = 1.0
    te_extra = 0
    if te.enabled and r.data.max_seq_length >= te.min_seq_length:
        keep = te.keep_ratio if isinstance(te.keep_ratio, (int, float)) else sum(te.keep_ratio) / len(te.keep_ratio)
        keep = max(keep, min(1.0, label_fraction))  # positions that feed the loss are never eliminated
        # each eliminating layer gathers its own rotary tables and keeps int64 gather/scatter indices
        te_extra = 2 * e * arch.head_dim + 8 * 2
        notes.append("token elimination: layers from start_layer on run max(keep_ratio, label fraction) of the tokens")
    sampled = sp.sampled_linear.keep if sp.sampled_linear.enabled else 1.0
    if sp.sampled_linear.enabled and sp.sampled_linear.target_modules != "all-linear":  # only the targets sample
        from efft.sparsity.sampled_linear import _name_matches as _sampled_match

        first = {nm: next((n for n, _ in linears if n.endswith("." + nm)), nm) for nm in _LAYER_LINEARS}
        sampled = {nm: sampled if _sampled_match(first[nm], sp.sampled_linear.target_modules) else 1.0 for nm in _LAYER_LINEARS}
    if sp.sampled_linear.enabled:
        notes.append("sampled-activation linears: saved inputs scaled by keep (approximate)")
    if autocast is not None:
        # autocast's weight-cast cache (trainable float32 weights, until the forward ends) is not counted:
        # without checkpointing the casts are saved anyway; with it they are at most half the gradients'
        # bytes, which the step holds later
        notes.append(f"train.{'bf16' if t.bf16 else 'fp16'}: the forward under autocast; counted are the casts each "
                     "layer keeps for backward (inputs and weights in the compute dtype)")
        if e == 2 and dtype != (torch.bfloat16 if t.bf16 else torch.float16):  # the model sees bytes, not dtypes
            notes.append(f"{r.model.dtype} weights under {'bf16' if t.bf16 else 'fp16'} autocast: counted as if the "
                         "weights had the autocast dtype (the per-layer casts between the two are not counted)")
    rc = sp.recompute
    recomputed = None
    if rc.enabled:
        if prepared is None:
            notes.append("sparsity.recompute: counted on every norm and gated MLP; efft installs it per module only "
                         "where a probe shows it exact (estimate(..., model=<prepared model>) counts where it did)")
        else:
            recomputed, note = _recomputed(prepared, arch)
            notes.append(note)
    b, s = t.per_device_train_batch_size, r.data.max_seq_length
    act = activation_bytes(
        arch, b, s, dtype_bytes=e, attn=r.model.attn_implementation, linears=kinds, lora_r=a.r, lora_bytes=4,
        norms_trainable=full_ft or int8_train, embed_trainable=embed_trainable, head_trainable=act_head_trainable,
        input_requires_grad=input_grad, checkpointing=ckpt, loss_tokens=sp.loss_tokens.enabled,
        label_fraction=label_fraction, keep_ratio=keep, keep_start_layer=te.start_layer, sampled_keep=sampled,
        autocast_bytes=autocast, partial=(sp.partial.fraction, sp.partial.r), te_extra_per_token=te_extra,
        recompute_norms=rc.enabled and rc.norms, recompute_mlp=rc.enabled and rc.gated_mlp, recomputed=recomputed,
        quantized=frozenset(nm for nm in _LAYER_LINEARS
                            if any(n.endswith("." + nm) and n in quantized for n, _ in linears)),
        head_plain=head_name not in quantized,
        peqa_bytes=_NBYTES[_DTYPE[q.compute_dtype]] if a.type == "peqa" else None,
    )
    if sp.loss_tokens.enabled and not (keep < 1 and te.start_layer <= arch.layers - 1):
        notes.append("loss_tokens: the last block runs its post-attention norms and MLP"
                     + (", and its attention's queries and output projection," if r.model.attn_implementation == "eager" else "")
                     + " on the label rows only (label rows spread evenly over the batch)"
                     + ("; sdpa without padding counted with every query, as CPU runs it (CUDA: the label span's, fewer bytes)"
                        if r.model.attn_implementation == "sdpa" else ""))
    activations = act["peak"]
    if off.activations and s >= off.min_seq_length:
        # efft.offload.activations: tensors saved inside every decoder layer but the last go to the
        # host in forward (with checkpointing that is each layer's input; the rotary tables once);
        # backward fetches them back prefetch_layers ahead, and recomputation stays on the device.
        layer_in = e * b * s * arch.hidden
        if ckpt:
            offloaded = (arch.layers - 1) * layer_in
            resident = (1 + off.prefetch_layers) * layer_in
        else:
            offloaded = act["all_but_last_layer"] + (act["rope"] if arch.layers > 1 else 0)
            resident = (1 + off.prefetch_layers) * act["layer"] + act["head"] + act["globals"]
            if off.activation_mode == "checkpoint_inputs":
                offloaded, resident = 0, activations  # without checkpointing there are no checkpoint inputs
        host += offloaded
        details_act_host = offloaded
        activations = min(activations, max(activations - offloaded, resident + (act["peak"] - act["forward"]) if ckpt else resident))
        notes.append("offload.activations: tensors saved in all decoder layers but the last on the host, fetched back "
                     f"{off.prefetch_layers} layer(s) ahead")
    else:
        details_act_host = 0

    # ------------------------------------------------------------------------------- workspace
    T = b * s
    ws = []
    if sp.loss_tokens.enabled:
        ws.append(3 * 4 * min(T, sp.loss_tokens.chunk_size) * arch.vocab)
    else:
        # loss backward: the dense float32 gradient reaching log_softmax and the one it returns
        ws.append(2 * 4 * T * arch.vocab)
    if r.model.attn_implementation == "eager":
        ws.append(2 * 4 * b * arch.heads * s * s)
    head_chunks = 0
    if emb_mode == "host":
        # the LM head streamed from the host: a ring of min(2, chunks) float32 chunks, the chunk in the
        # compute dtype when that is not float32, and (backward) one chunk's float32 dW on its way to
        # the host; alongside the loss's own workspace
        rows = min(q.head_chunk_rows, arch.vocab)
        n_chunks = -(-arch.vocab // rows)
        head_chunks = (min(2, n_chunks) * 4 + (e if e != 4 else 0) + 4) * rows * arch.hidden
        ws[0] += head_chunks
    ws.append(3 * e * T * arch.intermediate)
    if quant4 or (int8 and not q.trainable):
        cd = _NBYTES[_DTYPE[q.compute_dtype]]
        biggest = max((m.in_features * m.out_features for n, m in linears if n in quantized), default=0)
        ws.append(cd * biggest)  # one dequantized weight (torch path; the fused kernel needs none)
    if int8_train:
        biggest = max((m.in_features * m.out_features for n, m in linears if n in quantized), default=0)
        ws.append(4 * biggest)  # the layer materialized for its update
    workspace = max(ws)

    head_grad = 0
    if not o.layerwise and head_trainable and head_name:
        hm = dict(linears)[head_name]
        head_grad = hm.in_features * hm.out_features * hm.weight.element_size()
    static = weights + adapters + opt_state_device
    during_bwd = activations + workspace + head_grad
    during_step = gradients + step_ws
    communication, units = 0, None
    if fsdp:
        # FSDP2 all-gathers a unit's full (padded) parameters for its forward and again for its
        # backward: the root's (embeddings, final norm, head: efft.integrations.fsdp shards it last,
        # FSDP2 keeps the root gathered from forward to the end of backward) and, with
        # reshard_after_forward, two decoder layers (the one computing and the one prefetched), else
        # every layer, held from its forward to its backward
        units = _fsdp_unit_bytes(model, kept_params, adapter_params, nproc)
        layers = sorted(units["layers"])
        communication = units["root"] + (sum(layers[-2:]) if t.fsdp_config.reshard_after_forward else sum(layers))
        during_bwd += communication
        notes.append(f"train.fsdp over {nproc} processes: parameters, gradients and AdamW state sharded on dim 0 "
                     "(padded to equal shards; rank 0 shown, it holds the most); buffers, such as packed "
                     "quantized bases, whole on every rank")
    elif nproc > 1:
        # DDP as Trainer builds it (accelerate: gradient_as_bucket_view=False): the reducer's buckets
        # are a second copy of the gradients it reduces, allocated for the model's lifetime. Layer-wise
        # optimizers keep their parameters out of DDP (efft.integrations.ddp.split_for_ddp decides).
        from efft.integrations.ddp import split_for_ddp

        reduced = train_params
        if o.layerwise:
            metas = [(torch.empty(shape, device="meta"), (pn, shape, b)) for pn, shape, b in train_params]
            _, left = split_for_ddp([m for m, _ in metas])
            left_ids = {id(m) for m in left}
            reduced = [sb for m, sb in metas if id(m) in left_ids]
        communication = sum(math.prod(s) * b for _, s, b in reduced)
        static += communication
        notes.append(f"DDP over {nproc} processes: each rank holds one process's bytes plus DDP's gradient buckets")
    total = static + max(during_bwd, during_step)

    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(math.prod(s) for _, s, _ in train_params)
    what = ("QLoRA" if quant4 and lora else "LoRA" if lora else "PEQA" if a.type == "peqa" else
            "int8 full fine-tune" if int8_train else "full fine-tune")
    summary = (f"{cfg.model_type} {n_params / 1e9:.2f}B params, {what}, optim {o.name}"
               f"{' layer-wise' if o.layerwise else ''}{' 8-bit state' if o.state_bits == 8 else ''}, "
               f"{r.model.dtype}, batch {b} x seq {s}{', checkpointing' if ckpt else ''}, "
               f"{r.model.attn_implementation}; {n_train / 1e6:.1f}M trainable"
               + (f"; per rank of {nproc} ({'FSDP2' if fsdp else 'DDP'})" if nproc > 1 else ""))
    peak_note = "peak = weights + adapters + optimizer state + max(activations + workspace, gradients + step temporaries)"
    if fsdp:
        peak_note = ("peak = weights + adapters + optimizer state (shards) + max(activations + workspace + "
                     "gathered params, gradient shards + step temporaries)")
    elif nproc > 1:
        peak_note = ("peak = weights + adapters + optimizer state + DDP buckets + max(activations + workspace, "
                     "gradients + step temporaries)")
    details = {
        "summary": summary, "params": n_params, "trainable_params": n_train, "buffers": buffers,
        "frozen_weight_bytes": frozen_bytes, "quantized_linears": len(quantized), "lora_modules": len(targets),
        "lowrank_params": len(lowrank_names), "optimizer_state_total": opt_state, "step_workspace": step_ws,
        "activation_parts": act, "head_grad": head_grad, "activation_host_bytes": details_act_host,
        "streamed_weight_host_bytes": streamed_host, "streamed_layer_bytes": streamed_layer,
        "host_embedding_bytes": host_embedding_bytes, "head_chunk_workspace": head_chunks,
        "peak_note": peak_note, "fsdp": fsdp,
    }
    if fsdp:
        details["fsdp_units"] = units  # full (padded) parameter bytes each unit gathers
        details["per_rank"] = [{"weights": weights, "adapters": adapters, "gradients": gradients, "optimizer_state": st}
                               for st in per_rank_state]
    return Estimate(weights=weights, adapters=adapters, gradients=gradients, optimizer_state=opt_state_device,
                    activations=activations, workspace=workspace, total=total, host=host, details=details, notes=notes,
                    communication=communication, nproc_per_node=nproc)


def _recomputed(model, arch: _Arch) -> tuple[Recomputed, str]:
    """Where efft.sparsity.recompute is installed on a prepared ``model`` (its ``recompute_state``),
    and a note saying so; nowhere when the model has none."""
    from efft.sparsity.loss_tokens import decoder_layers, find_causal_lm
    from efft.sparsity.recompute import recompute_state

    state = recompute_state(model)
    lm = find_causal_lm(model)
    layers = list(decoder_layers(lm) or [])
    if state is None:
        return (Recomputed([(False,) * arch.norms_per_layer] * len(layers), [False] * len(layers), False),
                "sparsity.recompute: enabled, but the model given has none installed: counted nowhere")
    name_of = {id(m): n for n, m in lm.named_modules()}
    norms, mlps = set(state.norms), set(state.mlps)
    order = _LAYER_NORMS[arch.norms_per_layer]
    per_norms = [tuple(name_of.get(id(getattr(layer, k, None))) in norms for k in order) for layer in layers]
    per_mlp = [name_of.get(id(getattr(layer, "mlp", None))) in mlps for layer in layers]
    inside = {name_of[id(m)] for layer in layers for m in layer.modules()}
    final = any(n not in inside for n in norms)
    note = (f"sparsity.recompute (read from the model): on {sum(map(sum, per_norms)) + final} norms and "
            f"{sum(per_mlp)} of {len(layers)} gated MLPs")
    if state.skipped:
        shown = list(state.skipped.items())[:3]
        note += "; left alone: " + "; ".join(f"{k}: {v}" for k, v in shown) + (" ..." if len(state.skipped) > 3 else "")
    return Recomputed(per_norms, per_mlp, final), note


def _fsdp_unit_bytes(model, kept_params, adapter_params, nproc: int) -> dict:
    """Full parameter bytes each FSDP2 unit all-gathers: ``layers`` (one entry per decoder layer, as
    efft.integrations.fsdp shards them) and ``root`` (the rest). A gathered parameter is ``nproc``
    padded shards."""
    from efft.integrations.fsdp import decoder_layers

    ids = {id(m) for m in decoder_layers(model)}
    prefixes = [n + "." for n, m in model.named_modules() if id(m) in ids]
    layers = dict.fromkeys(prefixes, 0)
    root = 0
    for name, shape, b in list(kept_params) + list(adapter_params):
        full = nproc * fsdp_shard_numel(shape, nproc) * b
        owner = next((p for p in prefixes if name.startswith(p)), None)
        if owner is None:
            root += full
        else:
            layers[owner] += full
    return {"root": root, "layers": list(layers.values())}


def _streamed_layer_bytes(model, quantized: set, blocksize: int) -> list[int]:
    """Per decoder layer, the bytes weight streaming keeps in host memory: each trainable int8
    Linear's codes, float32 block scales and int64 rounding state (its carrier stays)."""
    from efft.offload.activations import find_decoder_layers

    _, layers = find_decoder_layers(model)
    name_of = {id(m): n for n, m in model.named_modules()}
    out = []
    for layer in layers:
        total = 0
        for m in layer.modules():
            if isinstance(m, torch.nn.Linear) and name_of[id(m)] in quantized:
                total += int8_blockwise_bytes(m.out_features, m.in_features, blocksize) - 4
        out.append(total)
    return out


# --------------------------------------------------------------------------------- suggestions
def _candidates(r, nproc: int = 1) -> list[tuple[float, str, list[tuple[str, Any]]]]:
    """(cost, description, [(dotted key, value)]) changes, cheapest first: exact speed-neutral ones,
    then compute-for-memory trades, then method changes. Sharding is offered over the processes the
    run already has; _apply drops it where efft's FSDP refusals (fsdp_problems) forbid the recipe."""
    c = []
    t, o, q, a, sp, off = r.train, r.optim, r.quant, r.adapter, r.sparsity, r.offload
    if nproc > 1 and not t.fsdp:
        c.append((2.5, f"shard with train.fsdp over {nproc} GPUs (FSDP2: weights, gradients and optimizer state "
                       f"split {nproc} ways; gathers each layer's weights in forward and backward)",
                  [("train.fsdp", True)]))
    if not sp.loss_tokens.enabled:
        c.append((1, "loss-token skipping (exact; no batch x seq x vocab logits)", [("sparsity.loss_tokens.enabled", True)]))
    if not sp.recompute.enabled and not t.gradient_checkpointing:
        c.append((1.5, "recompute norms and the gated MLP's activation in backward (exact; a few % more compute)",
                  [("sparsity.recompute.enabled", True)]))
    if not t.gradient_checkpointing:
        c.append((2, "gradient checkpointing (~30% more compute)", [("train.gradient_checkpointing", True)]))
    bs = t.per_device_train_batch_size
    while bs > 1:
        nb = bs // 2
        c.append((3 + (t.per_device_train_batch_size // nb) * 0.1,
                  f"batch {nb} with gradient accumulation x{t.gradient_accumulation_steps * t.per_device_train_batch_size // nb} "
                  "(same effective batch)",
                  [("train.per_device_train_batch_size", nb),
                   ("train.gradient_accumulation_steps", t.gradient_accumulation_steps * t.per_device_train_batch_size // nb)]))
        bs = nb
    if o.state_bits == 32 and o.name != "adamw8bit" and (
            (o.name == "adamw" and not o.layerwise) or _efft_8bit_available()):
        c.append((4, "8-bit optimizer moments", [("optim.state_bits", 8)]))
    if not o.layerwise and o.name != "adamw8bit":
        c.append((4.5, "layer-wise optimizer updates (one parameter's gradient alive)", [("optim.layerwise", True)]))
    if a.type == "none" and o.name in ("adamw", "adamw8bit", "galore", "apollo", "frugal"):
        c.append((5, "APOLLO-Mini (rank-1 optimizer state)", [("optim.name", "apollo_mini")]))
    if not off.optimizer:
        c.append((6, "optimizer state offloaded to the host", [("offload.optimizer", True)]))
    if not off.activations:
        c.append((6.5, "activation offload to the host", [("offload.activations", True)]))
    if q.type == "int8" and q.trainable and q.embeddings == "trainable":
        c.append((6.2, "embedding and LM head kept in host memory, updated on the CPU (streamed in chunks)",
                  [("quant.embeddings", "host")]))
    if q.type == "int8" and q.trainable and o.layerwise and not off.weights:
        c.append((8, "int8 decoder layers streamed from host memory (copies every layer twice a step)",
                  [("offload.weights", True)]))
    if q.type == "none" and a.type == "none":
        c.append((7, "NF4 base + LoRA r16 (QLoRA: trains an adapter, not the weights)",
                  [("quant.type", "nf4"), ("adapter.type", "lora"), ("adapter.r", 16), ("optim.name", "adamw"),
                   ("optim.layerwise", False)]))
    if q.type == "none" and a.type == "lora":
        c.append((6.8, "NF4 base (QLoRA)", [("quant.type", "nf4")]))
    seq = r.data.max_seq_length
    while seq > 256:
        seq //= 2
        c.append((9 + r.data.max_seq_length / seq * 0.1, f"max_seq_length {seq} (truncates longer examples)",
                  [("data.max_seq_length", seq)]))
    return sorted(c, key=lambda x: x[0])


def _apply(r, changes: list[tuple[str, Any]]):
    from efft import config as C

    d = r.model_dump(mode="json", exclude_unset=True)  # keeps "not set" distinct (factory defaults)
    for key, value in changes:
        node = d
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    new = C.Recipe.model_validate(d)
    if C._combination_problems(new):
        return None
    from efft.compose import recipe_problems  # what a plugin would refuse is no suggestion either

    if recipe_problems(new):
        return None
    return new


def _suggest(r, cfg, gpu: int, label_fraction: float, nproc: int = 1):
    """The cheapest single change that fits; else changes added cheapest-first until it fits."""
    cands = _candidates(r, nproc)
    cache: dict = {}

    def total_of(changes):
        new = _apply(r, changes)
        if new is None:
            return None
        try:
            return _estimate(new, cfg, label_fraction, cache, nproc).total
        except ValueError:
            return None

    for cost, why, ch in cands:
        tot = total_of(ch)
        if tot is not None and tot <= gpu:
            return [f"{k}={_fmt(v)}" for k, v in ch], tot, why
    acc: list[tuple[str, Any]] = []
    whys: list[str] = []
    keys_done: set[str] = set()
    best = None
    for cost, why, ch in cands:
        if any(k in keys_done for k, _ in ch):
            continue
        trial = acc + ch
        tot = total_of(trial)
        if tot is None:
            continue
        if best is None or tot < best:
            acc, best = trial, tot
            whys.append(why)
            keys_done.update(k for k, _ in ch)
            if tot <= gpu:
                return [f"{k}={_fmt(v)}" for k, v in acc], tot, " + ".join(whys)
    return None


def _fmt(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


# ``efft.memory.estimate(recipe)`` calls this module's estimate(); ``from efft.memory import
# estimate as est; est.parse_size(...)`` still reaches the module's other names.
class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return estimate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
