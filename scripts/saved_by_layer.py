"""Saved-for-backward bytes per decoder layer, dense vs token elimination, and which autograd node saved
each tensor: finds the tensors that do not shrink with the kept tokens.

Same model and batch as the long-context sweep of scripts/bench_sparsity.py (random Llama, hidden 64,
4 heads, MLP 256, sdpa, fp32, one sequence whose last 10% is labeled); a small vocabulary by default,
since the decoder layers do not depend on it. Storages are counted once, parameters excluded, each
one in the layer that saved it first (rotary cos/sin shared by dense layers land in layer 0).

    python scripts/saved_by_layer.py                          # seq 4096, 8 layers, keep 0.5 from layer 1
    python scripts/saved_by_layer.py --seq 1024 --detail 0 1 2 --unbiased
"""
from __future__ import annotations

import argparse
import collections
import copy
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench_sparsity  # noqa: E402
from efft.sparsity import apply_token_elimination  # noqa: E402
from efft.sparsity.loss_tokens import decoder_layers, find_causal_lm  # noqa: E402


def saved_by_layer(model, batch):
    """({layer index or 'outside': bytes}, {storage: (layer, bytes, shape, dtype, nodes that saved it)})."""
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, where, hooks = {}, ["outside"], []
    for i, layer in enumerate(decoder_layers(find_causal_lm(model))):
        hooks.append(layer.register_forward_pre_hook(lambda *a, i=i: where.__setitem__(0, i)))
        hooks.append(layer.register_forward_hook(lambda *a: where.__setitem__(0, "outside")))

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip and st.data_ptr() not in seen:
            seen[st.data_ptr()] = [where[0], st.nbytes(), tuple(t.shape), t.dtype, set()]
        return t

    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(**batch).loss
    finally:
        for h in hooks:
            h.remove()
    # name the saving nodes: walk the graph and read each node's _saved_* tensors
    stack, visited = [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        for attr in dir(node):
            if attr.startswith("_saved_"):
                try:
                    v = getattr(node, attr)
                except RuntimeError:  # freed or not a tensor-valued field
                    continue
                for x in v if isinstance(v, (tuple, list)) else [v]:
                    if torch.is_tensor(x) and x.untyped_storage().data_ptr() in seen:
                        seen[x.untyped_storage().data_ptr()][4].add(f"{node.name()}.{attr[7:]}{tuple(x.shape)}")
        stack += [f for f, _ in node.next_functions]
    loss.backward()
    per = collections.Counter()
    for w, nb, *_ in seen.values():
        per[w] += nb
    return per, seen


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--start-layer", type=int, default=1)
    ap.add_argument("--label-fraction", type=float, default=0.1)
    ap.add_argument("--unbiased", action="store_true")
    ap.add_argument("--detail", type=int, nargs="*", default=[1], help="layers whose saved tensors are listed")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = argparse.Namespace(vocab=args.vocab, hidden=64, heads=4, layers=args.layers, seqs=[args.seq], lc_seq=args.seq)
    base = bench_sparsity.build(cfg, torch.float32, torch.device("cpu"))
    batch = bench_sparsity.batch_for(args.seq, args.vocab, torch.device("cpu"), label_fraction=args.label_fraction)
    models = {"dense": base, "token_elimination": apply_token_elimination(
        copy.deepcopy(base), keep_ratio=args.keep, start_layer=args.start_layer, unbiased=args.unbiased)}
    layer_total = {}
    for name, model in models.items():
        per, seen = saved_by_layer(model, batch)
        layer_total[name] = sum(v for k, v in per.items() if k != "outside")
        print(f"{name}: layers {layer_total[name] / 2**20:.3f} MiB, outside {per['outside'] / 2**20:.3f} MiB; "
              "per layer MiB " + " ".join(f"{per[i] / 2**20:.3f}" for i in range(args.layers)))
        for li in args.detail:
            print(f"  {name}, layer {li}:")
            rows = sorted((v for v in seen.values() if v[0] == li), key=lambda v: (-v[1], str(v[2])))
            for _, nb, shape, dtype, nodes in rows:
                print(f"    {nb:>10d} B  {str(shape):18s} {str(dtype).replace('torch.', ''):8s} {'; '.join(sorted(nodes)) or '?'}")
    n_elim = args.layers - args.start_layer
    print(f"layers: dense / token elimination = {layer_total['dense'] / layer_total['token_elimination']:.3f}x "
          f"(all tensors scaling with the tokens: {args.layers / (args.start_layer + n_elim * args.keep):.3f}x)")


if __name__ == "__main__":
    main()
