"""Benchmark efft.sparsity: activation memory and step time vs dense, per method and combined.

Memory: on CPU, the bytes autograd keeps for backward during one training forward (counted with
saved_tensors_hooks, parameters excluded, split into decoder layers and the rest: BucketBytes below); on CUDA, also the peak
allocated memory of the step. Time: median wall time of forward+backward over ``--reps`` steps
after one warm-up. A random Llama-architecture model (small hidden size, real vocabulary size),
one sequence per step whose first half is an unlabeled prompt (50% label tokens).

Writes cards/sparsity.json and cards/sparsity.md (with the fine-tuning quality checks of the tests
re-run, unless --no-quality).

    python scripts/bench_sparsity.py                       # CPU defaults, a few minutes
    python scripts/bench_sparsity.py --seqs 512 2048 --reps 1
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from efft.sparsity import apply_sparsity  # noqa: E402

TE = {"keep_ratio": 0.5, "start_layer": 1}
# full fine-tuning: each method alone and combined
METHODS = {
    "dense": {},
    "loss_tokens": {"loss_tokens": {}},
    "token_elimination": {"token_elimination": TE},
    "sampled_linear": {"sampled_linear": {"keep": 0.3}},
    "recompute": {"recompute": {}},
    "combined": {"loss_tokens": {}, "token_elimination": TE, "sampled_linear": {"keep": 0.3}, "recompute": {}},
}
# frozen base: LoRA (alone, with WTA-CRS on its lora_A/lora_B, with everything) vs PaCA at the same
# trained parameter count
ADAPTER_METHODS = {
    "lora": {},
    "lora+sampled_linear": {"sampled_linear": {"keep": 0.3}},
    "lora+recompute": {"recompute": {}},
    "lora+combined": {"loss_tokens": {}, "token_elimination": TE, "sampled_linear": {"keep": 0.3}, "recompute": {}},
    "partial": {"partial": {}},
    "partial+loss_tokens+token_elimination": {"partial": {}, "loss_tokens": {}, "token_elimination": TE},
}


# long context, few labels (LeMo's setting): a deeper model, 10% label tokens at the end
LONG_METHODS = {
    "dense": {},
    "token_elimination": {"token_elimination": TE},
    "token_elimination (unbiased)": {"token_elimination": dict(TE, unbiased=True)},
    "loss_tokens+token_elimination": {"loss_tokens": {}, "token_elimination": TE},
    "recompute": {"recompute": {}},
    "combined": {"loss_tokens": {}, "token_elimination": TE, "sampled_linear": {"keep": 0.3}, "recompute": {}},
}


def build(args, dtype, device, layers=None):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 4, num_hidden_layers=layers or args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, max_position_embeddings=max(args.seqs + [args.lc_seq]),
    )
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(device=device, dtype=dtype)


def batch_for(seq, vocab, device, label_fraction=0.5):
    """One sequence; its last ``label_fraction`` carries labels (the rest is an unlabeled prompt)."""
    g = torch.Generator().manual_seed(seq)
    ids = torch.randint(0, vocab, (1, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq - int(round(label_fraction * seq))] = -100
    return {k: v.to(device) for k, v in {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}.items()}


def prepare(name, base, args):
    """A fresh copy of the base with the method installed (recipe-style dict sections)."""
    model = copy.deepcopy(base)
    table = next(t for t in (METHODS, ADAPTER_METHODS, LONG_METHODS) if name in t)
    sections = copy.deepcopy(table[name])
    if name.startswith("lora"):
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules="all-linear"))
    if "partial" in sections:
        sections["partial"] = {"fraction": 2 * args.lora_r / args.hidden}  # k = 2r columns: r (in + out) parameters
    if sections:
        apply_sparsity(model, {k: dict(enabled=True, **v) for k, v in sections.items()})
    return model


class BucketBytes:
    """Saved-for-backward bytes split into inside the decoder layers and everything else (embedding,
    final norm, LM head + loss); one saved_tensors_hooks context, storages counted once."""

    def __init__(self, model):
        self.skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen, self.where, self.handles = {}, "outside", []
        from efft.sparsity.loss_tokens import decoder_layers, find_causal_lm

        for layer in decoder_layers(find_causal_lm(model)):
            self.handles.append(layer.register_forward_pre_hook(lambda *a: setattr(self, "where", "layers")))
            self.handles.append(layer.register_forward_hook(lambda *a: setattr(self, "where", "outside")))

    def pack(self, t):
        st = t.untyped_storage()
        key = st.data_ptr()
        if key not in self.skip and key not in self.seen:
            self.seen[key] = (self.where, st.nbytes())
        return t

    def __enter__(self):
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)
        for h in self.handles:
            h.remove()

    def total(self, where=None):
        return sum(b for w, b in self.seen.values() if where is None or w == where)


def measure(models, batch, reps, device):
    """One metered step per model (saved bytes), then ``reps`` timed rounds, the models interleaved
    within each round so load changes on a shared machine hit them alike."""
    out = {}
    for name, model in models.items():
        model.train()
        with BucketBytes(model) as meter:
            loss = model(**batch).loss
        loss.backward()
        del loss
        model.zero_grad(set_to_none=True)
        out[name] = {"saved_bytes": meter.total(), "layer_bytes": meter.total("layers"), "times": [], "cuda_peak_bytes": None}
    for _ in range(reps):
        for name, model in models.items():
            gc.collect()
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            loss = model(**batch).loss
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
                out[name]["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
            out[name]["times"].append(time.perf_counter() - t0)
            del loss
            model.zero_grad(set_to_none=True)
    for r in out.values():
        r["step_s"] = statistics.median(r["times"])
    return out


def quality():
    """The fine-tuning checks of tests/sparsity (held-out loss after 40 steps from a pretrained tiny base)."""
    from efft.sparsity import apply_partial, apply_token_elimination
    from tests.sparsity.task import pretrained_base, train_losses

    torch.set_num_threads(1)
    out = {}
    kw = dict(seq=16, vocab=32, strides=(4, 5))
    _, out["paca_start"] = train_losses(pretrained_base(), 0, 1e-3, **kw)
    _, out["paca_full_ft"] = train_losses(pretrained_base(), 40, 3e-3, **kw)
    _, out["paca_0.25"] = train_losses(apply_partial(pretrained_base(), fraction=0.25), 40, 2e-2, **kw)
    import peft

    lora = peft.get_peft_model(pretrained_base(), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    _, out["paca_lora_r4"] = train_losses(lora, 40, 2e-2, **kw)
    from efft.sparsity import apply_sampled_linear

    torch.manual_seed(0)
    _, out["wta_keep0.3"] = train_losses(apply_sampled_linear(pretrained_base(), keep=0.3), 40, 3e-3, **kw)
    kw = dict(seq=32, vocab=32, strides=(4, 5), prompt=16)
    _, out["te_start"] = train_losses(pretrained_base(), 0, 1e-3, **kw)
    _, out["te_dense"] = train_losses(pretrained_base(), 40, 3e-3, **kw)
    _, out["te_keep0.5"] = train_losses(apply_token_elimination(pretrained_base(), keep_ratio=0.5, start_layer=1), 40, 3e-3, **kw)
    _, out["te_keep0.5_unbiased"] = train_losses(
        apply_token_elimination(pretrained_base(), keep_ratio=0.5, start_layer=1, unbiased=True), 40, 3e-3, **kw)
    out["te_scores"] = score_comparison()
    return out


SCORE_SETTINGS = [dict(prompt=16, keep=0.5, start=1), dict(prompt=24, keep=0.4, start=0),
                  dict(prompt=28, keep=0.4, start=0), dict(prompt=24, keep=0.5, start=1)]
SCORE_METHODS = {"dense": None, "mean_distance": {}, "attention": {"score": "attention"},
                 "attention, 4 queries": {"score": "attention", "score_queries": 4}, "unbiased (random)": {"unbiased": True}}


def score_comparison(seeds=range(10)):
    """Token elimination's scores on the task of the quality check (same base, seq 32, strides 4..5,
    40 AdamW steps at 3e-3), per setting and seed: held-out loss (dense layers) of dense fine-tuning,
    mean_distance, attention (every row a query: LeMo's sum exactly), attention over 4 sampled
    queries, and the unbiased option (uniform random tokens, reweighted). Seed s: training batches
    from 1000 s, torch.manual_seed(s) before each run (the same for every method)."""
    from efft.sparsity import apply_token_elimination
    from tests.sparsity.task import pretrained_base, train_losses

    out = []
    for st in SCORE_SETTINGS:
        kw = dict(seq=32, vocab=32, strides=(4, 5), prompt=st["prompt"])
        res = {name: [] for name in SCORE_METHODS}
        for seed in seeds:
            for name, te in SCORE_METHODS.items():
                m = pretrained_base()
                if te is not None:
                    m = apply_token_elimination(m, keep_ratio=st["keep"], start_layer=st["start"], **te)
                torch.manual_seed(seed)
                res[name].append(train_losses(m, 40, 3e-3, seed=1000 * seed, **kw)[1])
            print(f"[quality] scores {st} seed {seed}: " + ", ".join(f"{k} {v[-1]:.4f}" for k, v in res.items()), flush=True)
        out.append(dict(st, seeds=list(seeds), held=res))
    return out


def score_section(rows, command):
    """The card's subsection comparing token elimination's scores (see score_comparison)."""
    import math
    import statistics as st

    def ms(v):
        return f"{st.mean(v):.4f} ± {st.stdev(v):.4f}"

    n = len(rows[0]["seeds"])
    L = ["### Token elimination score: mean_distance vs attention (LeMo's informativeness)", "",
         f"Same base and task as the row above (seq 32, strides 4..5, 40 AdamW steps at 3e-3, held-out loss in nats/token "
         f"evaluated dense), {n} seeds (training batches and torch's generator differ per seed, the same for every method "
         "of a seed); mean ± sample standard deviation over seeds. Forced tokens: the loss rows (seq - prompt) and "
         "position 0; kept per row: max(ceil(keep x 32), forced), the rest chosen by the score. `attention` uses every "
         "row as a query (LeMo's sum exactly); `attention, 4 queries` the estimator with score_queries 4 (loss rows "
         "first). Paired: attention - mean_distance per seed (negative: attention better). Machine: the shared "
         f"2-core CPU of this card (tiny model, ~1-2 minutes in all). Command: `{command}`.", "",
         "| prompt (unlabeled) | keep, from layer | chosen by score / eliminable | " + " | ".join(SCORE_METHODS) +
         " | paired attention - mean_distance | paired t | seeds attention < mean_distance | clearly apart |",
         "|---|---|---|" + "---|" * len(SCORE_METHODS) + "---|---|---|---|"]
    verdicts, chance = [], []
    for r in rows:
        forced = 32 - r["prompt"] + 1
        k = max(math.ceil(r["keep"] * 32), forced)  # as choose_tokens
        d = [a - m for a, m in zip(r["held"]["attention"], r["held"]["mean_distance"])]
        spread = max(st.stdev(d), st.stdev(r["held"]["attention"]), st.stdev(r["held"]["mean_distance"]))
        apart = abs(st.mean(d)) > spread
        verdicts.append(("attention" if st.mean(d) < 0 else "mean_distance") if apart else None)
        se = st.stdev(d) / math.sqrt(len(d))
        if k > forced:  # the score decides: is either score below the uniform random pick?
            best = min(("mean_distance", "attention"), key=lambda m: st.mean(r["held"][m]))
            chance.append((r, best, st.mean(r["held"][best]) < st.mean(r["held"]["unbiased (random)"])))
        L.append(f"| {r['prompt']} | {r['keep']}, {r['start']} | {k - forced} / {32 - forced} | "
                 + " | ".join(ms(r["held"][name]) for name in SCORE_METHODS)
                 + f" | {st.mean(d):+.4f} ± {st.stdev(d):.4f} | " + (f"{st.mean(d) / se:+.1f}" if se > 0 else "-")
                 + f" | {sum(x < 0 for x in d)} / {len(d)} | "
                 + (f"yes, {verdicts[-1]} better" if apart else "no") + " |")
    better = [v for v in verdicts if v]
    L += ["", "Clearly apart: |paired mean| above the largest of the paired differences' and the two methods' standard "
          "deviations over seeds. " + (f"Rows clearly apart: {len(better)} of {len(rows)} ({', '.join(better)} better); "
                                       if better else f"No row is clearly apart ({len(rows)} settings); ")
          + "the default score stays mean_distance unless attention is clearly better where the score decides. "
          "Paired t: the paired mean over its standard error (sd / sqrt(seeds)), a looser reading of the same numbers. "
          + (f"Against chance: where the score picks tokens ({len(chance)} rows), the better score's mean is below the "
             f"uniform random pick's (`unbiased`) in {sum(c[2] for c in chance)}; "
             + ("so on this tiny task the scores do not find redundant tokens better than chance, and their value on real "
                "text is not measured here." if not any(c[2] for c in chance) else "see the rows.")
             if chance else ""), ""]
    return L


def mib(b):
    return f"{b / 2**20:.1f}"


def write_card(res, q, args, device_desc, path, commands):
    long = [r for r in res if r.get("sweep") == "long"]
    res = [r for r in res if r.get("sweep", "main") == "main"]
    seqs = sorted({r["seq"] for r in res})
    peak = any(r.get("cuda_peak_bytes") for r in res)
    L = ["# Card: efft.sparsity (token and activation sparsity)", ""]
    L += [f"Machine: {device_desc}. Commands: " + "; ".join(f"{k} sweep `{v}`" for k, v in sorted(commands.items())) + ". "
          "Each sweep is one run; the methods of a table are timed interleaved, round by round, so load changes hit them alike, "
          "but step times on a shared CPU still vary 10-35%: compare within a row group, not across runs.", ""]
    L += ["How to read it: with hidden size 64 and a 32000-token vocabulary the LM head and loss hold most of the "
          "saved bytes (the *saved* columns), while in a 7B-class model (hidden 4096) the decoder layers hold most of "
          "them; the *layers* columns show what each method does to the layers alone. Loss-token skipping acts on the "
          "head and loss (and the last block past its keys and values), the others on the layers, which is why the combinations multiply.", ""]
    L += [f"Model: random Llama architecture, hidden {args.hidden}, {args.layers} layers, {args.heads} heads, "
          f"MLP {4 * args.hidden}, vocab {args.vocab}, sdpa attention, {args.dtype}; batch 1; the first half of each "
          "sequence is an unlabeled prompt (50% label tokens). **Saved** = bytes autograd keeps for backward in one "
          "training forward (saved_tensors_hooks, parameters excluded, each storage once); **layers** = the part saved "
          "inside the decoder layers (the rest is embedding, final norm, LM head and loss)"
          + ("; CUDA peak = max allocated in a step" if peak else "")
          + f". Step = median forward+backward of {args.reps} timed steps (1 above seq {args.long}) after a metered one.", ""]
    L += ["Settings: loss_tokens chunk 1024; token_elimination keep 0.5 from layer 1 (top-k by score); sampled_linear "
          "(WTA-CRS) keep 0.3, half of it deterministic; recompute: norms and the gated MLP's act(gate) recomputed in "
          "backward (exact); combined = the four together. Frozen-base table: LoRA "
          f"r={args.lora_r} on all linear layers vs PaCA training the same number of parameters "
          f"(fraction {2 * args.lora_r / args.hidden:.3f} of input columns).", ""]

    def table(title, names, ref):
        L.extend([f"## {title}", "",
                  f"| seq | method | saved MiB | less than {ref} | layers MiB | layers less | step s | speed vs {ref} |"
                  + (" CUDA peak MiB |" if peak else ""), "|---|---|---|---|---|---|---|---|" + ("---|" if peak else "")])
        for s in seqs:
            base = next((r for r in res if r["seq"] == s and r["method"] == ref), None)
            for n in names:
                r = next((r for r in res if r["seq"] == s and r["method"] == n), None)
                if r is None or base is None:
                    continue
                row = (f"| {s} | {n} | {mib(r['saved_bytes'])} | {base['saved_bytes'] / r['saved_bytes']:.2f}x | "
                       f"{mib(r['layer_bytes'])} | {base['layer_bytes'] / max(r['layer_bytes'], 1):.2f}x | "
                       f"{r['step_s']:.2f} | {base['step_s'] / r['step_s']:.2f}x |")
                L.append(row + (f" {mib(r['cuda_peak_bytes'] or 0)} |" if peak else ""))
        L.append("")

    table("Full fine-tuning: each method alone and combined, vs dense", list(METHODS), "dense")
    table("Frozen base: LoRA, LoRA + sparsity, PaCA", list(ADAPTER_METHODS), "lora")
    if long:
        d = next(r for r in long if r["method"] == "dense")
        L += ["## Long context, few labels (LeMo's setting)", "",
              f"Same architecture with {args.lc_layers} layers, seq {long[0]['seq']}, the last "
              f"{100 * args.lc_label_fraction:.0f}% of the tokens labeled; token elimination keeps 50% from layer 1; "
              f"{args.lc_reps} timed step(s) per method after a metered one.", "",
              "| method | saved MiB | less than dense | layers MiB | layers less | step s | speed vs dense |",
              "|---|---|---|---|---|---|---|"]
        for r in long:
            L.append(f"| {r['method']} | {mib(r['saved_bytes'])} | {d['saved_bytes'] / r['saved_bytes']:.2f}x | "
                     f"{mib(r['layer_bytes'])} | {d['layer_bytes'] / max(r['layer_bytes'], 1):.2f}x | {r['step_s']:.2f} | "
                     f"{d['step_s'] / r['step_s']:.2f}x |")
        L.append("")
    big = max(seqs)

    def ratio(m, ref="dense", key="saved_bytes", rows=None):
        rows = rows or [r for r in res if r["seq"] == big]
        a = next(r for r in rows if r["method"] == ref)
        b = next(r for r in rows if r["method"] == m)
        return a[key] / max(b[key], 1e-12)

    L += ["## Against the papers' targets", "",
          f"At seq {big}. The papers report end-to-end GPU peak memory on 7B-class models against their own baselines; "
          "here the quantity is activation bytes saved for backward on a tiny model on CPU (weights and optimizer state "
          "excluded) against dense full fine-tuning, so the numbers are comparable in kind only. Each paper's own setting "
          "(its baseline, sequence length, batch, and memory count) is rebuilt in "
          "[sparsity-papers.md](sparsity-papers.md) (`scripts/bench_sparsity_papers.py`).", "",
          "| method | paper | here: saved bytes (layers only), step time |", "|---|---|---|",
          f"| LeMo token elimination (vs dense), seq {big}, 2 layers, 50% labels | 1.93x less memory, 1.36x faster | "
          f"{ratio('token_elimination'):.2f}x less ({ratio('token_elimination', key='layer_bytes'):.2f}x), "
          f"{ratio('token_elimination', key='step_s'):.2f}x speed |"]
    if long:
        L += [f"| LeMo token elimination (vs dense), long-context sweep | 1.93x less memory, 1.36x faster | "
              f"{ratio('token_elimination', rows=long):.2f}x less ({ratio('token_elimination', key='layer_bytes', rows=long):.2f}x), "
              f"{ratio('token_elimination', key='step_s', rows=long):.2f}x speed |"]
    L += [f"| WTA-CRS keep 0.3 on LoRA (vs LoRA) | 2.7x less peak memory | {ratio('lora+sampled_linear', 'lora'):.2f}x less "
          f"({ratio('lora+sampled_linear', 'lora', 'layer_bytes'):.2f}x), "
          f"{ratio('lora+sampled_linear', 'lora', 'step_s'):.2f}x speed |",
          f"| WTA-CRS keep 0.3, full fine-tuning (vs dense) | - | {ratio('sampled_linear'):.2f}x less "
          f"({ratio('sampled_linear', key='layer_bytes'):.2f}x) |",
          f"| PaCA vs LoRA | -16% memory, -22% time | {100 * (1 / ratio('partial', 'lora') - 1):+.0f}% memory "
          f"({100 * (1 / ratio('partial', 'lora', 'layer_bytes') - 1):+.0f}% layers), "
          f"{100 * (1 / ratio('partial', 'lora', 'step_s') - 1):+.0f}% time |",
          f"| recompute, full fine-tuning (vs dense): norms + act(gate) rebuilt in backward | LeMo recomputes the "
          "post-attention norm, WTA-CRS uses an in-place LayerNorm (both inside their headline numbers) | "
          f"{ratio('recompute'):.2f}x less ({ratio('recompute', key='layer_bytes'):.2f}x), "
          f"{ratio('recompute', key='step_s'):.2f}x speed |",
          f"| recompute on LoRA (vs LoRA) | - | {ratio('lora+recompute', 'lora'):.2f}x less "
          f"({ratio('lora+recompute', 'lora', 'layer_bytes'):.2f}x), {ratio('lora+recompute', 'lora', 'step_s'):.2f}x speed |",
          f"| combined, full fine-tuning (vs dense) | - | {ratio('combined'):.2f}x less, {ratio('combined', key='step_s'):.2f}x speed |",
          f"| LoRA + combined (vs LoRA) | - | {ratio('lora+combined', 'lora'):.2f}x less, "
          f"{ratio('lora+combined', 'lora', 'step_s'):.2f}x speed |", ""]
    if q:
        L += ["## Quality (the fine-tuning checks of tests/sparsity, re-run here)", "",
              "Tiny Llama (hidden 32, 2 layers, vocab 32) trained 120 steps on arithmetic sequences with strides 1..3, "
              "then fine-tuned 40 AdamW steps on strides 4..5; held-out loss in nats/token, evaluated with dense layers.", "",
              "| check | before fine-tuning | reference | sparse method | margin the test requires |", "|---|---|---|---|---|",
              f"| PaCA 25% of columns vs full fine-tuning (seq 16) | {q['paca_start']:.3f} | {q['paca_full_ft']:.3f} | "
              f"{q['paca_0.25']:.3f} (LoRA r4, similar size: {q['paca_lora_r4']:.3f}) | within 0.15 of full FT |",
              f"| token elimination keep 0.5 from layer 1 vs dense (seq 32, first 16 unlabeled) | {q['te_start']:.3f} | "
              f"{q['te_dense']:.3f} | {q['te_keep0.5']:.3f} (unbiased option: {q['te_keep0.5_unbiased']:.3f}) | "
              "within 0.2 of dense |"]
        if "wta_keep0.3" in q:
            L += [f"| WTA-CRS keep 0.3 vs exact gradients, full fine-tuning (seq 16) | {q['paca_start']:.3f} | "
                  f"{q['paca_full_ft']:.3f} | {q['wta_keep0.3']:.3f} | within 0.1 of exact |"]
        L.append("")
        if q.get("te_scores"):
            L += score_section(q["te_scores"], commands.get("quality", ""))
    L += ["## Exactness and statistics (tests/sparsity)", "",
          "| method | kind | what the tests check |", "|---|---|---|",
          "| loss_tokens | exact | loss and every parameter gradient = the model's own dense forward, within 1e-5 relative in "
          "fp32 (2e-2 in bf16): llama, qwen2, mistral, gemma, gpt2, gemma2 (softcapping), peft LoRA, transformers.Trainer "
          "with gradient accumulation (num_items_in_batch), label rows from the collator and found on the device; last "
          "block (query projection, attention queries, output projection, norms, MLP on label rows): llama, qwen2, mistral (sliding window "
          "5), gemma, gpt2 in eager and masked sdpa (unmasked sdpa on CPU by default: the call kept whole, the rest on label rows), gemma2 (sliding window, attention softcapping, eager), with right- and "
          "left-padded rows and gradient checkpointing; its attention module's saved bytes at seq 128: 0.59x dense at 50% "
          "labels, 0.37x at 25% (<= 0.65x / 0.45x required), one query row per label row; no host read (aten nonzero / "
          "_local_scalar_dense / ...) in a training forward + backward with the collator's rows, exactly one nonzero "
          "without them; unmasked sdpa with the span path switched on: exact for label spans at the end, middle and start, "
          "MHA and GQA, with checkpointing and recompute; head+loss saved bytes at seq 2048, vocab 32000, 50% labels: "
          ">= 10x less required, ~120x measured |",
          "| token_elimination | approximate | equals an independent masked-dense reference (eliminated keys masked, "
          "eliminated rows passed through) within 1e-5; loss rows and position 0 never dropped; unbiased option: mean "
          "update over 3000 draws = full update (Z-test) |",
          "| sampled_linear | unbiased | mean of 1500 sampled weight gradients = exact (Z < 3, every element within 6 "
          "standard errors; a non-reweighted estimator fails the same test); variance < 0.5x uniform column-row "
          "sampling at the same budget; input and bias gradients exact; linear saved bytes at keep 0.3 ~3.2x below "
          "dense (<= 1/2.5 required); the same unbiasedness test for int8-trainable layers and PEQA's scale gradients "
          "(nf4 block/channel, int8), PEQA layers' saved bytes 3.2x below exact at keep 0.3 |",
          "| partial | exact for what it trains | column gradients = the dense weight gradient's columns; "
          "save/load/merge round trip gives identical logits |",
          "| recompute | exact | loss and every gradient = the unpatched model's within 1e-5 relative in fp32 (2e-2 bf16): "
          "llama, qwen2, mistral, gemma, gemma2, qwen3, gpt2 (norms only), peft LoRA, QLoRA, PEQA, int8-trainable, "
          "checkpointing, loss_tokens (either order), token elimination, activation offload; with sampled_linear the same "
          "samples and gradients as without; a llama fp32 layer saves exactly dense - 2 (4Th + 4T) - 4TI bytes |", ""]
    L += ["## Not done / limits", "",
          "- Last block: the input norm, key/value projections, rotary embedding and residual additions still run on "
          "every position (keys and values are needed); the query projection runs on label rows when it is a plain Linear "
          "outside autocast and the attention takes the label-row path (a custom function keeps only the input the k/v "
          "projections keep anyway), on every row for LoRA or quantized q_proj and under autocast (a gathered copy would "
          "cost memory there; see efft/sparsity/last_block.py); sdpa called without a mask "
          "(no padding, no packing, no short sliding window: transformers uses `is_causal`) computes the queries of the "
          "batch's label span with a lower-right causal mask (`causal_lower_right`) on CUDA (not run on a GPU yet) and "
          "keeps that call whole on CPU, where that mask is materialized (the tests switch it on to check it is exact), "
          "and needs the collator's host label rows; attention implementations other than eager and sdpa (flash, "
          "flex) run on every query (the modules after them still on label rows); GPT-2 with `reorder_and_upcast_attn` "
          "keeps its attention whole (recorded in `last_block.reason`); routed-expert models keep the whole block "
          "unchanged. Rows of a batch are padded to the fullest row's label count for the attention call. The planner "
          "(`efft estimate`) counts the last block as it runs on CPU (post-attention norms and MLP on label rows; eager: "
          "the label rows' queries and output projection too), exact on the tests' configurations; for sdpa without a "
          "mask it counts the whole call, an upper bound on CUDA.",
          "- Host reads: with `LabelRowsCollator` (installed on Trainer's training loader by `EfftPlugin.trainer_kwargs`, "
          "hence in `efft train`) no training forward reads from the device; a batch without it (a custom loop that does "
          "not wrap its collator, accelerate's `dispatch_batches`, this benchmark) costs one read of the label count per "
          "forward. transformers' own sdpa mask code reads the padding mask once per forward when an `attention_mask` is "
          "passed (not efft's; packed rows carry none).",
          "- With token elimination reaching the last layer (start_layer <= last; every combination above), that layer "
          "runs on the kept tokens and the last-block restriction steps aside; the combinations' rows are unchanged by it.",
          "- WTA-CRS applies to trainable nn.Linear layers (including LoRA's lora_A/lora_B), to trainable int8 "
          "layers (Int8TrainableLinear) and to PEQA's trainable scales (their gradient is linear in the sampled dW); a "
          "frozen base, plain or QuantLinear, keeps no input for a weight gradient, so there is nothing to sample there. "
          "Without `recompute`, the norms keep their normalized outputs and the MLP act(gate), which limits what sampling "
          "the linears saves; efft does not sample the attention matmuls (sdpa keeps q, k, v and its output).",
          "- Token elimination scores tokens by their distance from the sequence mean by default; `score: attention` "
          "computes LeMo's informativeness (positive attention logits received, from the layer's own queries and keys) over "
          "sampled query rows instead of LeMo's learned predictor, and keeps the keep_ratio top-k instead of LeMo's "
          "per-layer thresholds.", ""]
    path.write_text("\n".join(L))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--long", type=int, default=2048, help="longer sequences are timed once (CPU time)")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--machine", default=None, help="how to name the machine in the card")
    ap.add_argument("--no-quality", action="store_true")
    ap.add_argument("--lc-seq", type=int, default=4096, help="long-context sweep: sequence length")
    ap.add_argument("--lc-layers", type=int, default=8)
    ap.add_argument("--lc-label-fraction", type=float, default=0.1)
    ap.add_argument("--lc-reps", type=int, default=2)
    ap.add_argument("--only", choices=["all", "main", "long", "card", "quality"], default="all",
                    help="card: rewrite the card from the JSON; quality: re-run only the quality checks")
    ap.add_argument("--reuse", action="store_true", help="keep the other sweep's results (and quality) from the JSON")
    ap.add_argument("--out", default=str(ROOT / "cards" / "sparsity.md"))
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    desc = args.machine or (torch.cuda.get_device_name() if device.type == "cuda"
                            else f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), {args.threads} torch threads")
    out = Path(args.out)
    old = json.loads(out.with_suffix(".json").read_text()) if args.reuse and out.with_suffix(".json").is_file() else {}
    command = "python scripts/bench_sparsity.py " + " ".join(sys.argv[1:])
    commands = dict(old.get("meta", {}).get("commands", {}))
    res = [r for r in old.get("results", []) if args.only != "all" and r.get("sweep", "main") != args.only]

    def report(r):
        res.append(r)
        print(f"[{r['sweep']}] seq {r['seq']:5d} {r['method']:40s} saved {mib(r['saved_bytes']):>8s} MiB "
              f"(layers {mib(r['layer_bytes']):>8s})  step {r['step_s']:.3f} s", flush=True)

    if args.only in ("all", "main"):
        commands["main"] = command
        base = build(args, dtype, device)
        for seq in args.seqs:
            batch = batch_for(seq, args.vocab, device)
            reps = args.reps if seq <= args.long else 1
            for group in (METHODS, ADAPTER_METHODS):
                models = {name: prepare(name, base, args) for name in group}
                for name, r in measure(models, batch, reps, device).items():
                    report(dict(r, seq=seq, method=name, sweep="main"))
                del models
                gc.collect()
    if args.only in ("all", "long"):
        commands["long"] = command
        base = build(args, dtype, device, layers=args.lc_layers)
        batch = batch_for(args.lc_seq, args.vocab, device, label_fraction=args.lc_label_fraction)
        models = {name: prepare(name, base, args) for name in LONG_METHODS}
        for name, r in measure(models, batch, args.lc_reps, device).items():
            report(dict(r, seq=args.lc_seq, method=name, sweep="long"))
        del models
    if args.only in ("card", "quality"):
        old = json.loads(out.with_suffix(".json").read_text())
        res, commands = old["results"], old["meta"].get("commands", {})
        if args.only == "quality":
            commands["quality"] = command
    q = old.get("quality") if args.no_quality or args.only == "card" else quality()
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": desc, "torch": torch.__version__, "args": vars(args), "commands": commands}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": res, "quality": q}, indent=1))
    write_card(res, q, args, desc, out, commands)
    print(f"wrote {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
