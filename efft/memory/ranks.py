"""What each rank holds under FSDP2 and DDP, measured, for the planner's per-rank predictions
(tests/memory/test_estimate_ranks.py and the card's sharded table, ``python -m efft.memory.card``).

Run under torchrun, one launch for several recipes (process start-up dominates):
``python -m torch.distributed.run --nproc_per_node 2 ... -m efft.memory.ranks cases.json out_dir``.
Each case builds the recipe's model as training does (efft.memory.validate.build: quantize, adapters),
shards it with efft's own ``shard_model`` (FSDP2) or wraps it in DDP as Trainer does (accelerate's
default ``gradient_as_bucket_view=False``), builds efft's optimizer, runs one step, and writes this
rank's local bytes to ``out_dir/rank{R}.json``: weights (parameters' shards + buffers), gradients
(before the step), optimizer state; under FSDP2 the full parameters each unit gathers; under DDP the
reducer's gradient buckets, and those of them whose storage no gradient shares."""
import json
import sys
from pathlib import Path


def _bucket_bytes(ddp, model, batch) -> tuple[int, int]:
    """(bytes of bucket buffers whose storage no gradient shares, bytes of all bucket buffers), seen
    through a communication hook on a step after the first (DDP rebuilds its buckets after step 1)."""
    import torch
    import torch.distributed as dist

    from efft.memory.tracker import storage_key, tensor_bytes

    seen = []

    def hook(state, bucket):
        seen.append(bucket.buffer())
        fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])

    ddp.register_comm_hook(None, hook)
    for _ in range(2):
        seen.clear()
        ddp(**batch).loss.backward()
    grad_keys = {storage_key(p.grad) for p in model.parameters() if p.grad is not None}
    separate = [b for b in seen if storage_key(b) not in grad_keys]
    return tensor_bytes(separate), tensor_bytes(seen)


def _watch_gathered(model, layers) -> dict:
    """Forward pre-hooks on each decoder layer, run after FSDP2's own (which all-gathers the layer):
    the bytes of the layer's gathered (plain, not DTensor) parameters, and of the root's, which are
    gathered before the first layer runs. Filled in during the forward."""
    from torch.distributed.tensor import DTensor

    from efft.memory.tracker import tensor_bytes

    out = {"gathered_layers": [], "gathered_root": 0, "gathered_at_once": 0}

    def hook(layer, args, kwargs):
        gathered = [p for p in model.parameters() if not isinstance(p, DTensor)]
        in_layers = {id(p) for other in layers for p in other.parameters()}  # FSDP2 swaps them when it gathers
        out["gathered_layers"].append(tensor_bytes(p for p in layer.parameters() if not isinstance(p, DTensor)))
        out["gathered_root"] = max(out["gathered_root"], tensor_bytes(p for p in gathered if id(p) not in in_layers))
        out["gathered_at_once"] = max(out["gathered_at_once"], tensor_bytes(gathered))

    for layer in layers:
        layer.register_forward_pre_hook(hook, with_kwargs=True)
    return out


def main(cases_path: str, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from efft.integrations.fsdp import decoder_layers, shard_model
    from efft.memory.tracker import gradient_bytes, optimizer_state_bytes, weight_bytes
    from efft.memory.validate import batch_for, build
    from efft.optim.factory import build_optimizer

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = {}
    for name, case in json.loads(Path(cases_path).read_text()).items():
        r, cfg, model = build(case["recipe"])
        batch = batch_for(r, cfg, seed=rank)
        out = {}
        if case["mode"] == "fsdp":
            layers = decoder_layers(model)  # before sharding: FSDP2 renames the classes it shards
            shard_model(model)
            opt = build_optimizer(model, r.optim, lr=1e-3)
            gathered = _watch_gathered(model, layers)
            model(**batch).loss.backward()
            out.update(gathered)
        else:  # the optimizer first: a layer-wise one takes its parameters out of DDP before the wrap
            opt = build_optimizer(model, r.optim, lr=1e-3)
            ddp = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=case.get("bucket_view", False))
            out["buckets_separate"], out["buckets_all"] = _bucket_bytes(ddp, model, batch)
        out["gradients"] = gradient_bytes(model)
        opt.step()
        w = weight_bytes(model)
        out.update(weights=w["total"], weights_trainable=w["trainable"], optimizer_state=optimizer_state_bytes(opt))
        results[name] = out
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def _odd_block() -> dict:
    """A tiny llama with odd row counts (vocab 255, intermediate 97) so that dim-0 shards are uneven."""
    return dict(model_type="llama", hidden_size=66, num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1,
                intermediate_size=97, vocab_size=255, max_position_embeddings=1024)


def _nf4_block() -> dict:
    """Rows of the quantized linears a multiple of the NF4 block (their codes are whole buffers anyway)."""
    return {**_odd_block(), "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96}


def _recipe(block: dict, dtype: str = "float32", **sections) -> dict:
    r = {"model": {"config": block, "dtype": dtype, "attn_implementation": "sdpa"},
         "data": {"path": "-", "max_seq_length": 8}, "train": {"per_device_train_batch_size": 1}}
    r.update(sections)
    return r


_NF4 = {"type": "nf4", "compute_dtype": "float32", "blocksize": 32}
_LORA = {"type": "lora", "r": 3}
# name -> recipe, sharded over 2 processes (train.fsdp is set by who plans them)
SHARDED = {
    "full FT AdamW": _recipe(_odd_block()),
    "full FT AdamW, bf16": _recipe(_odd_block(), "bfloat16"),
    "LoRA r3": _recipe(_odd_block(), adapter=_LORA),
    "QLoRA r3 (NF4)": _recipe(_nf4_block(), quant=_NF4, adapter=_LORA),
    "PEQA (NF4)": _recipe(_nf4_block(), quant=_NF4, adapter={"type": "peqa"}),
    "qwen2 full FT AdamW (q/k/v biases, tied head)": _recipe({**_odd_block(), "model_type": "qwen2",
                                                              "tie_word_embeddings": True}),
}


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
