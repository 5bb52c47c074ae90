"""Writes notebooks/relu_attention.ipynb (run: python notebooks/make_relu_attention.py; then execute it with
`jupyter nbconvert --to notebook --execute --inplace notebooks/relu_attention.ipynb`)."""
import nbformat as nbf

cells = []
md = lambda s: cells.append(nbf.v4.new_markdown_cell(s))
code = lambda s: cells.append(nbf.v4.new_code_cell(s))

md("""# ReLU attention vs softmax attention, trained from scratch

`fusion.Config(approximate={"relu_attention"})` rewrites `softmax(s)` over the key dim of attention
scores into `relu(s) / L` (Wortsman et al. 2023, *Replacing softmax with ReLU in Vision Transformers*).
ReLU attention needs no row max, no exp and no row sum — a pure pointwise op, cheaper and trivially fusable —
but it is **a different function**: exact only for models *trained* with it.

This notebook (well under two minutes on 2 idle CPU cores) trains two tiny character-level causal transformers on a small
built-in text — one with softmax attention, one with ReLU attention — compares their loss curves and step
time, and then shows that swapping ReLU into the softmax-trained model breaks it (which is why the rule is
opt-in and guarded by a measured error).""")

code("""import inspect, math, time, statistics
import torch, torch.nn as nn, torch.nn.functional as F
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
torch.manual_seed(0)
torch.set_num_threads(2)

# a small built-in corpus: docstrings of a few standard-library modules (no download)
import collections, functools, itertools, json, os, re, string, textwrap, typing
text = "\\n".join(inspect.getdoc(m) or "" for m in [collections, functools, itertools, json, os, re, string, textwrap, typing])
text += "\\n".join(inspect.getdoc(f) or "" for f in [re.sub, re.split, json.dumps, json.loads, textwrap.fill, functools.reduce, functools.lru_cache, itertools.groupby, os.walk, collections.Counter])
chars = sorted(set(text)); stoi = {c: i for i, c in enumerate(chars)}
data = torch.tensor([stoi[c] for c in text])
split = int(0.9 * len(data)); train_data, val_data = data[:split], data[split:]
print(f"{len(text)} characters, vocabulary {len(chars)}")""")

code("""T, D, H, LAYERS, BATCH = 64, 64, 4, 2, 16

class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D); self.proj = nn.Linear(D, D)
        self.register_buffer("causal", torch.tril(torch.ones(T, T, dtype=torch.bool)))
    def forward(self, x, kind):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, H, D // H).permute(2, 0, 3, 1, 4)
        s = q @ k.transpose(-1, -2) / math.sqrt(D // H)
        mask = self.causal[:t, :t]
        if kind == "softmax":
            p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
        else:  # ReLU attention: relu(s) / L over the key dim (masked keys contribute 0)
            p = torch.relu(s).masked_fill(~mask, 0.0) / t
        return self.proj((p @ v).transpose(1, 2).reshape(b, t, D))

class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn = Attention()
        self.mlp = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))
    def forward(self, x, kind):
        x = x + self.attn(self.ln1(x), kind)
        return x + self.mlp(self.ln2(x))

class TinyLM(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.tok = nn.Embedding(len(chars), D); self.pos = nn.Embedding(T, D)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.ln = nn.LayerNorm(D); self.head = nn.Linear(D, len(chars))
    def forward(self, idx, kind=None):
        kind = kind or self.kind
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for blk in self.blocks:
            x = blk(x, kind)
        return self.head(self.ln(x))

def batch(src, gen):
    ix = torch.randint(len(src) - T - 1, (BATCH,), generator=gen)
    return torch.stack([src[i:i + T] for i in ix]), torch.stack([src[i + 1:i + T + 1] for i in ix])

@torch.no_grad()
def evaluate(model, kind=None, n=8):
    gen = torch.Generator().manual_seed(123)
    model.eval()
    losses = [F.cross_entropy(model(x, kind).flatten(0, 1), y.flatten()).item() for x, y in (batch(val_data, gen) for _ in range(n))]
    model.train()
    return sum(losses) / len(losses)""")

code("""STEPS, BUDGET_S = 200, 90   # at most STEPS steps each, stopping early past BUDGET_S seconds (CI: < 2 min a cell)
# the two models train side by side, one step each in turn, so both see the same machine load
# (the step-time comparison stays fair on a shared machine)
models = {kind: None for kind in ("softmax", "relu")}
state = {}
for kind in models:
    torch.manual_seed(0)
    model = TinyLM(kind)
    state[kind] = dict(model=model, opt=torch.optim.AdamW(model.parameters(), lr=3e-3),
                       gen=torch.Generator().manual_seed(0), losses=[], times=[])
t_start = time.perf_counter()
for step in range(STEPS):
    if time.perf_counter() - t_start > BUDGET_S:
        print(f"time budget reached after {step} steps each")
        break
    for kind, st in state.items():
        x, y = batch(train_data, st["gen"])
        t0 = time.perf_counter()
        loss = F.cross_entropy(st["model"](x).flatten(0, 1), y.flatten())
        st["opt"].zero_grad(set_to_none=True); loss.backward(); st["opt"].step()
        st["times"].append(time.perf_counter() - t0)
        st["losses"].append(loss.item())
results = {kind: (st["model"], st["losses"], st["times"]) for kind, st in state.items()}
print(f"trained both in {time.perf_counter() - t_start:.0f} s")
for kind, (model, losses, times) in results.items():
    print(f"{kind:8s} final train loss {statistics.mean(losses[-20:]):.3f}  val loss {evaluate(model):.3f}  "
          f"median step {statistics.median(times) * 1e3:.1f} ms")""")

code("""fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
smooth = lambda v, k=20: [statistics.mean(v[max(0, i - k):i + 1]) for i in range(len(v))]
for kind, (model, losses, times) in results.items():
    ax[0].plot(smooth(losses), label=f"{kind} attention")
    ax[1].hist([t * 1e3 for t in times[10:]], bins=40, alpha=0.6, label=kind)
ax[0].set_xlabel("step"); ax[0].set_ylabel("train loss (20-step mean)"); ax[0].legend(); ax[0].set_title("loss")
ax[1].set_xlabel("training step time (ms)"); ax[1].set_title("step time (fwd+bwd+AdamW)"); ax[1].legend()
plt.tight_layout(); plt.show()""")

md("""Inference-only attention cost: the probabilities step alone (softmax vs relu/L) on the same scores —
the part `relu_attention` rewrites. ReLU is one pointwise pass; softmax is max, exp, sum and divide.""")

code("""s = torch.randn(32, H, T, T)
mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
fns = {"softmax": lambda: torch.softmax(s.masked_fill(~mask, float("-inf")), -1),
       "relu/L": lambda: torch.relu(s).masked_fill(~mask, 0.0) / T}
ts = {k: [] for k in fns}
for _ in range(200):          # interleaved, medians: fair on a shared machine
    for k, f in fns.items():
        t0 = time.perf_counter(); f(); ts[k].append(time.perf_counter() - t0)
print(", ".join(f"{k} {statistics.median(v) * 1e6:.0f} us" for k, v in ts.items()), f"per call on {tuple(s.shape)}")""")

md("""## Swapping ReLU into the softmax-trained model breaks it""")

code("""softmax_model = results["softmax"][0]
print(f"softmax-trained model: val loss {evaluate(softmax_model, 'softmax'):.3f} with softmax -> {evaluate(softmax_model, 'relu'):.3f} with ReLU attention swapped in (uniform guess = {math.log(len(chars)):.3f})")""")

md("""The same thing through the optimizer: `fusion.approx.apply_approximations` with `relu_attention` on the
softmax-trained model. The accuracy guard measures the error against the exact graph and reverts the sites.""")

code("""import fusion
from fusion.approx import optimize_approx
x, _ = batch(val_data, torch.Generator().manual_seed(1))
softmax_model.eval()
opt = optimize_approx(softmax_model, (x,), fusion.Config(approximate={"relu_attention"}, tolerance=1e-2))
print(opt.result.summary())""")

nb = nbf.v4.new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
nbf.write(nb, __file__.replace("make_relu_attention.py", "relu_attention.ipynb"))
