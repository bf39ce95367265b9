"""Recipe builders for the memory tests; building and measuring live in efft.memory.validate."""
from __future__ import annotations

from efft.memory.validate import batch_for, build, measure_activations, measure_step  # noqa: F401


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
