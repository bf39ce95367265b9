"""Build the real thing a recipe describes on CPU and measure it, for comparison with the estimate."""
from __future__ import annotations

import torch

from efft.memory import estimate as est
from efft.memory.tracker import count_saved_tensors, gradient_bytes, optimizer_state_bytes, tensor_bytes

FAMILY_KW = {
    "llama": {},
    "qwen2": {},
    "mistral": {},
    "gemma": {},
    "gemma2": {"attn_logit_softcapping": None},
}


def tiny_block(family="llama", hidden=64, layers=2, heads=4, kv=2, inter=128, vocab=256, **kw):
    d = dict(model_type=family, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
             num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab, max_position_embeddings=1024)
    if family.startswith("gemma"):
        d["head_dim"] = hidden // heads
    d.update(kw)
    return d


def recipe(block, batch=2, seq=32, attn="sdpa", ckpt=False, dtype="float32", **sections):
    r = {"model": {"config": block, "dtype": dtype, "attn_implementation": attn},
         "data": {"path": "-", "max_seq_length": seq},
         "train": {"per_device_train_batch_size": batch, "gradient_checkpointing": ckpt}}
    for k, v in sections.items():
        r.setdefault(k, {}).update(v)
    return r


def build(recipe_dict, seed=0):
    """The model the recipe trains (full FT or peft LoRA), real tensors on CPU."""
    from transformers import AutoModelForCausalLM

    r = est._recipe_from(recipe_dict)
    cfg = est.resolve_config(r.model)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=est._DTYPE[r.model.dtype],
                                             attn_implementation=r.model.attn_implementation)
    if r.adapter.type == "lora":
        from peft import LoraConfig, get_peft_model

        targets = r.adapter.target_modules
        model = get_peft_model(model, LoraConfig(r=r.adapter.r, lora_alpha=r.adapter.lora_alpha, lora_dropout=0.0,
                                                 target_modules=targets))
    if r.train.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:  # transformers >= 5.2x name
            enable(activation_checkpointing_kwargs={"use_reentrant": True})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()
    model.train()
    return r, cfg, model


def batch_for(r, cfg, seed=0, label_fraction=1.0):
    """Random ids; labels on the last ``label_fraction`` of each row (a prompt without labels before)."""
    g = torch.Generator().manual_seed(seed)
    b, s = r.train.per_device_train_batch_size, r.data.max_seq_length
    ids = torch.randint(0, cfg.vocab_size, (b, s), generator=g)
    labels = ids.clone()
    labels[:, : s - int(round(label_fraction * s))] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def measure_activations(recipe_dict, seed=0, label_fraction=1.0):
    """Peak live saved-tensor bytes over one forward + backward (reentrant checkpointing so the
    recompute is seen), and the estimate's prediction. The recipe's sparsity section is applied
    with efft.sparsity."""
    r, cfg, model = build(recipe_dict, seed)
    s = r.sparsity
    if any(getattr(s, k).enabled for k in ("loss_tokens", "token_elimination", "sampled_linear", "partial")):
        from efft.sparsity import apply_sparsity

        apply_sparsity(model, s)
    batch = batch_for(r, cfg, seed, label_fraction)
    with count_saved_tensors(model) as c:
        model(**batch).loss.backward()
    pred = est.estimate(recipe_dict, label_fraction=label_fraction).details["activation_parts"]["peak"]
    return pred, c.peak_bytes
