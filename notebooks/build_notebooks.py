"""Writes the narrative notebooks from the cell lists below (run: python notebooks/build_notebooks.py).

Keeping the source here (plain Python strings) makes the notebooks reviewable in diffs; CI executes the
generated .ipynb files (tests/test_notebooks.py), each under 2 minutes.
"""
from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

QUICKSTART = [
    ("md", "# fusion quickstart\n\nReference model → optimized program → correctness check → time. "
           "Everything runs on the CPU in fp32 with 2 threads."),
    ("code", "import time, torch, fusion\nfrom fusion.workloads.blocks import BertBlock, bert_block_inputs\n"
             "torch.set_num_threads(2); torch.manual_seed(0)\n"
             "model = BertBlock(d=256, heads=4, ffn=1024).eval()\nx, mask = bert_block_inputs(batch=4, seq=128, d=256)"),
    ("md", "## Optimize\n`fusion.optimize` captures the model with `torch.export`, rewrites the hand-written "
           "softmax, layer norms and GELU into fused ops, and lowers bandwidth-bound groups into C++ kernels."),
    ("code", "opt = fusion.optimize(model, (x, mask))\nprint(opt.code)"),
    ("md", "## Correctness: exact mode matches eager"),
    ("code", "with torch.no_grad():\n    ref = model(x, mask)\nout = opt(x, mask)\n"
             "err = ((out - ref).abs().max() / ref.abs().max()).item()\nprint(f'relative error {err:.2e}')\nassert err <= 1e-4"),
    ("md", "## What the optimizer did"),
    ("code", "print(opt.explain())"),
    ("code", "rows = opt.report()"),
    ("md", "## Time: eager vs fusion (median of 10 calls)"),
    ("code", "def median_time(f, *a, n=10):\n    with torch.no_grad():\n        f(*a)\n        ts = []\n"
             "        for _ in range(n):\n            t0 = time.perf_counter(); f(*a); ts.append(time.perf_counter() - t0)\n"
             "    return sorted(ts)[n // 2]\n\nte, tf = median_time(model, x, mask), median_time(opt, x, mask)\n"
             "print(f'eager {te*1e3:.2f} ms, fusion {tf*1e3:.2f} ms, speed-up {te/tf:.2f}x')"),
    ("code", "import matplotlib.pyplot as plt\nfig, ax = plt.subplots(figsize=(4, 3))\n"
             "ax.bar(['eager', 'fusion'], [te * 1e3, tf * 1e3], color=['gray', 'tab:blue'])\n"
             "ax.set_ylabel('time per call (ms)'); ax.set_title('BERT-style block, fp32, 2 threads'); plt.tight_layout()"),
]

EGRAPH = [
    ("md", "# The e-graph and the rules\n\nA hand-written softmax and layer norm go into egglog as terms; "
           "weights and inputs are leaves referenced by name. We look at what fired, then switch a rule "
           "family off and watch the predicted cost change."),
    ("code", "import torch, torch.nn as nn, fusion\nfrom fusion.capture import capture_module\nfrom fusion.rewrite import rewrite\n\n"
             "class M(nn.Module):\n    def __init__(self):\n        super().__init__(); self.w = nn.Parameter(torch.ones(64)); self.b = nn.Parameter(torch.zeros(64))\n"
             "    def forward(self, x):\n        e = (x - x.amax(-1, keepdim=True)).exp()\n        p = e / e.sum(-1, keepdim=True)\n"
             "        mu = p.mean(-1, keepdim=True); var = ((p - mu) ** 2).mean(-1, keepdim=True)\n"
             "        return (p - mu) / torch.sqrt(var + 1e-5) * self.w + self.b\n\n"
             "x = torch.randn(32, 64)\ncap = capture_module(M().eval(), (x,))\nprint(cap.gm.code)"),
    ("md", "## Saturate and extract"),
    ("code", "result = rewrite(cap.gm, fusion.Config())\nfor rule, nodes in result.fired.items():\n"
             "    print(f'{rule:<24} on {nodes}')\nprint({k: v for k, v in result.stats.items() if not isinstance(v, (dict, list))})\n"
             "print(result.gm.code)"),
    ("md", "## Ablation: switch the softmax family off"),
    ("code", "for disabled in [frozenset(), frozenset({'softmax'}), frozenset({'layer_norm'}), frozenset({'softmax', 'layer_norm'})]:\n"
             "    r = rewrite(capture_module(M().eval(), (x,)).gm, fusion.Config(disable_rules=disabled))\n"
             "    fused = [n for n in r.gm.graph.nodes if n.op == 'call_function' and ('softmax' in str(n.target) or 'layer_norm' in str(n.target))]\n"
             "    label = ', '.join(sorted(disabled)) or 'nothing'\n"
             "    print(f\"disabled {label:<22} predicted cost {r.stats['cost_before']*1e6:8.1f} us -> {r.stats['cost_after']*1e6:8.1f} us, fused ops {len(fused)}\")"),
]

ROOFLINE = [
    ("md", "# Cost model and roofline\n\n`fusion.analyze` gives FLOPs, bytes, arithmetic intensity, predicted "
           "and measured time, and MBU for every node. The roofline puts each node under this machine's "
           "measured bandwidth and GEMM roofs."),
    ("code", "import torch, fusion\nfrom fusion.workloads.blocks import LlamaBlock\ntorch.set_num_threads(2); torch.manual_seed(0)\n"
             "model = LlamaBlock(d=256, heads=4, ffn=704).eval()\nx = torch.randn(4, 128, 256)\n"
             "a = fusion.analyze(model, (x,))\nprint(a.table(top=15))"),
    ("code", "from IPython.display import Image\na.roofline_plot('roofline.png', title='LLaMA-style block: nodes')\nImage('roofline.png')"),
    ("md", "## Predicted vs measured, per node"),
    ("code", "import matplotlib.pyplot as plt\npts = [(s.predicted_s, s.measured_s) for s in a.nodes if s.measured_s and s.predicted_s > 0]\n"
             "fig, ax = plt.subplots(figsize=(4.5, 4))\nax.loglog([p[0] * 1e6 for p in pts], [p[1] * 1e6 for p in pts], 'o', alpha=0.6)\n"
             "lim = [min(min(p) for p in pts) * 1e6, max(max(p) for p in pts) * 1e6]\nax.plot(lim, lim, 'k--', lw=1, label='y = x')\n"
             "ax.set_xlabel('predicted (µs)'); ax.set_ylabel('measured (µs)'); ax.legend(); ax.set_title('per-node time'); plt.tight_layout()"),
    ("md", "## Before and after fusion"),
    ("code", "opt = fusion.optimize(model, (x,))\nrows = opt.report()\nprint(f\"{len(rows)} fused kernels; total bytes {sum(r['bytes'] for r in rows)/1e6:.1f} MB\")"),
]


def write(name: str, cells: list[tuple[str, str]]) -> Path:
    nb = new_notebook()
    nb.cells = [new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = HERE / f"{name}.ipynb"
    nbformat.write(nb, path)
    return path


if __name__ == "__main__":
    for name, cells in [("quickstart", QUICKSTART), ("egraph_and_rules", EGRAPH), ("costmodel_roofline", ROOFLINE)]:
        print("wrote", write(name, cells))
