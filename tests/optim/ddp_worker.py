"""The DDP test's worker and model: torch only (no transformers import in the spawned processes,
which keeps their start-up short)."""
import os

import torch
import torch.distributed as dist

from efft.optim import APOLLOAdamW, FRUGAL, GaLoreAdamW

STEPS = 6
BUILDERS = {
    "galore": lambda g: GaLoreAdamW(g(rank=4, update_proj_gap=3), projector="rsvd", stagger_refresh=True, weight_decay=0.01),
    "apollo": lambda g: APOLLOAdamW(g(rank=4, update_proj_gap=3), weight_decay=0.01),
    "frugal": lambda g: FRUGAL(g(rank=4, update_proj_gap=3, projector="random"), weight_decay=0.01),
}


class Net(torch.nn.Module):
    def __init__(self, vocab=64, dim=32):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.up = torch.nn.Linear(dim, 2 * dim)
        self.down = torch.nn.Linear(2 * dim, dim)
        self.norm = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, ids, labels):
        h = self.emb(ids)
        h = self.norm(h + self.down(torch.nn.functional.gelu(self.up(h))))
        return torch.nn.functional.cross_entropy(self.head(h).flatten(0, 1), labels.flatten())


def net():
    torch.manual_seed(0)
    return Net()


def groups(m, **lowrank):
    low = [m.up.weight, m.down.weight]
    rest = [p for p in m.parameters() if all(p is not q for q in low)]
    return [{"params": rest}, {"params": low, **lowrank}]


def data(step, size=8, seq=6):
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, 64, (size, seq), generator=g)
    return ids, torch.roll(ids, 1, dims=1)


def train(m, opt, rank=0, world=1, wrapped=None):
    fwd = wrapped or m
    for s in range(STEPS):
        ids, labels = data(s)
        n = ids.shape[0] // world
        fwd(ids[rank * n:(rank + 1) * n], labels[rank * n:(rank + 1) * n]).backward()
        opt.step()
        opt.zero_grad()


def worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for name, build in BUILDERS.items():
            m = net()
            opt = build(lambda **kw: groups(m, **kw))
            train(m, opt, rank, world, torch.nn.parallel.DistributedDataParallel(m))
            torch.save([p.detach() for p in m.parameters()], os.path.join(out_dir, f"{name}-{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while the other still talks to it (an abort in gloo's threads)
        # every result is written and both ranks got past the barrier: what follows is teardown only
        open(os.path.join(out_dir, f"done-{rank}"), "w").close()
    finally:
        dist.destroy_process_group()
