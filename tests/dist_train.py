"""One rank of a small distributed training run, eager and compiled with backend="fusion", side by side.

    python -m tests.dist_train MODE RANK WORLD INIT_FILE OUT_JSON

MODE is "ddp" (DistributedDataParallel, small buckets so Dynamo splits the graph at their boundaries),
"fsdp2" (fully_shard per layer and at the root) or "tp" (an MLP and an attention block split over the ranks
with DTensor: column-wise then row-wise, so the graphs hold functional collectives). Ranks talk over gloo on
a file rendezvous (no network). Each rank trains the same model twice from the same initial weights and
data, once eagerly and once compiled, and writes both runs' losses, the largest relative difference of its
gradients and parameters, and what the fusion backend compiled (kernels, collectives it saw) to OUT_JSON.
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

STEPS = 3
D, H, HEADS = 32, 64, 4


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(D, H)
        self.down = nn.Linear(H, D)
        self.norm = nn.LayerNorm(D)

    def forward(self, x):
        return self.norm(x + self.down(F.gelu(self.up(x))))


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.o = nn.Linear(D, D)

    def forward(self, x):
        b, s, _ = x.shape
        heads = lambda t: t.view(b, s, -1, D // HEADS).transpose(1, 2)   # noqa: E731 (local heads under TP)
        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        a = torch.softmax(q @ k.transpose(-1, -2) / (D // HEADS) ** 0.5, dim=-1) @ v
        return x + self.o(a.transpose(1, 2).reshape(b, s, -1))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Attention()
        self.mlp1 = MLP()
        self.mlp2 = MLP()
        self.head = nn.Linear(D, 1)

    def forward(self, x):
        return self.head(self.mlp2(self.mlp1(self.attn(x)))).mean()


def _data(rank: int, step: int) -> torch.Tensor:
    return torch.randn(4, 8, D, generator=torch.Generator().manual_seed(1000 * rank + step))


def _wrap(mode: str, model: Net, world: int) -> nn.Module:
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        dist._DEFAULT_FIRST_BUCKET_BYTES = 16 * 1024   # (DDP's and Dynamo's first bucket: at most the others)
        return DDP(model, bucket_cap_mb=0.02)          # ~3 buckets of this 50 kB model: Dynamo splits the graph
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    if mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in (model.attn, model.mlp1, model.mlp2):
            fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan = {"attn.q": ColwiseParallel(), "attn.k": ColwiseParallel(), "attn.v": ColwiseParallel(),
            "attn.o": RowwiseParallel(), "mlp1.up": ColwiseParallel(), "mlp1.down": RowwiseParallel(),
            "mlp2.up": ColwiseParallel(), "mlp2.down": RowwiseParallel()}
    return parallelize_module(model, mesh, plan)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _train(mode: str, rank: int, world: int, compiled: bool) -> dict:
    torch.manual_seed(0)                               # same initial weights on every rank and in both runs
    model = _wrap(mode, Net(), world)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = torch.compile(model, backend="fusion") if compiled else model
    losses, grads = [], {}
    for step in range(STEPS):
        x = _data(0 if mode == "tp" else rank, step)   # TP: every rank sees the same batch
        loss = run(x)
        loss.backward()
        grads = {n: _full(p.grad).detach().clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
        losses.append(float(_full(loss).detach()))
    params = {n: _full(p).detach().clone() for n, p in model.named_parameters()}
    return {"losses": losses, "grads": grads, "params": params}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def main(argv: list[str]) -> int:
    mode, rank, world, init_file, out = argv[0], int(argv[1]), int(argv[2]), argv[3], argv[4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        import fusion

        eager = _train(mode, rank, world, compiled=False)
        dist.barrier()
        seen: list = []
        from fusion import pipeline

        real = pipeline.remember

        def spy(compiled):
            seen.append(compiled)
            return real(compiled)
        pipeline.remember = spy
        comp = _train(mode, rank, world, compiled=True)
        pipeline.remember = real
        dist.barrier()
        def collectives_of(gm):
            return [str(n.target) for n in gm.graph.nodes if n.op == "call_function" and "c10d" in str(n.target)]
        collectives = sum(len(collectives_of(c.gm)) for c in seen)
        # passed through as they came: the same collectives in the same order as in the captured graph
        order_kept = all(collectives_of(c.gm) == collectives_of(c.source_gm) for c in seen)
        result = {
            "eager_losses": eager["losses"], "compiled_losses": comp["losses"],
            # over all gradients at once: some are ~0 by symmetry (the key bias: softmax ignores a shift)
            "grad_rel": max(float((comp["grads"][n] - g).abs().max()) for n, g in eager["grads"].items())
            / max(float(g.abs().max()) for g in eager["grads"].values()),
            "param_rel": max(_rel(comp["params"][n], p) for n, p in eager["params"].items()),
            "graphs": len(seen),
            "kernels": sum(len(c.log.kernels) for c in seen),
            "collectives": collectives,
            "collective_order_kept": order_kept,
            "fallbacks": sum(len(c.log.fallbacks) for c in seen),
            # graphs whose e-graph work this rank did, and those it read from another rank's (or its own) result
            "rewritten": sum(1 for c in seen if c.log.rewrite_stats and c.log.rewrite_stats.get("cache") != "hit"),
            "rewrite_hits": sum(1 for c in seen if (c.log.rewrite_stats or {}).get("cache") == "hit"),
            "fusion": fusion.__name__,
        }
        with open(out, "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.exit(main(sys.argv[1:]))
