"""Tiny random-init models of transformers architectures, built from configs (no downloads)."""
from __future__ import annotations

import torch
import transformers

FAMILIES = {
    "llama": "LlamaConfig",
    "qwen2": "Qwen2Config",
    "mistral": "MistralConfig",
    "gemma": "GemmaConfig",
    "gemma2": "Gemma2Config",
    "qwen3": "Qwen3Config",
    "gpt2": "GPT2Config",
}


def tiny_config(family: str = "llama", vocab_size: int = 256, hidden: int = 64, layers: int = 2, heads: int = 4, **kw):
    cls = getattr(transformers, FAMILIES[family])
    if family == "gpt2":
        base = dict(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=512, bos_token_id=0, eos_token_id=0)
    else:
        base = dict(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=512,
        )
        if family in ("gemma", "gemma2", "qwen3"):
            base["head_dim"] = hidden // heads
    base.update(kw)
    return cls(**base)


def tiny_model(family: str = "llama", seed: int = 0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    cfg = tiny_config(family, **kw)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    return model.to(dtype)


def tiny_batch(vocab_size: int = 256, batch: int = 2, seq: int = 16, seed: int = 0, label_fraction: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, seq), generator=g)
    labels = ids.clone()
    if label_fraction < 1.0:
        mask = torch.rand(batch, seq, generator=g) >= label_fraction
        labels[mask] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
