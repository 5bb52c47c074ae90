"""Seed 000: weights are never copied, hashed or read while optimizing — a tripwire proves it.

The weights are moved into a memory mapping made unreadable (PROT_NONE) while `fusion.optimize`
captures, rewrites, extracts and compiles: any read, copy or hash of weight data would kill the
process. torch.export traces with fake tensors and the e-graph holds weights as names, so it survives;
then the mapping is made readable again and the optimized program must match eager.
"""
import torch
import torch.nn as nn

import fusion
from tests.test_api import Block


TRIPWIRE = r"""
import ctypes, mmap, sys, torch
sys.path.insert(0, sys.argv[1])
import fusion
from tests.test_api import Block

torch.manual_seed(0)
model = Block(d=64).eval()
x = torch.randn(2, 16, 64)
ref = model(x).detach()
params = list(model.parameters())
# every weight moves into one anonymous mapping that we can make unreadable
sizes = [((p.numel() * p.element_size() + 4095) // 4096) * 4096 for p in params]
mm = mmap.mmap(-1, sum(sizes))
addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
off = 0
for p, size in zip(params, sizes):
    view = torch.frombuffer(mm, dtype=p.dtype, count=p.numel(), offset=off).view(p.shape)
    view.copy_(p.data)
    p.data = view
    off += size
libc = ctypes.CDLL(None)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
assert libc.mprotect(addr, sum(sizes), 0) == 0          # PROT_NONE: any read, copy or hash of a weight segfaults
opt = fusion.optimize(model, (x,), config=fusion.Config(cache_dir=sys.argv[2]))
assert libc.mprotect(addr, sum(sizes), 3) == 0          # PROT_READ | PROT_WRITE: now the program may run
out = opt(x)
err = ((out - ref).abs().max() / ref.abs().max()).item()
assert err <= 1e-4, err
kernels = sum(len(g.log.kernels) for g in opt.graphs)
print(f"TRIPWIRE-OK capture={opt.capture_method} kernels={kernels} err={err:.1e}")
"""


def test_optimize_never_reads_weight_data(tmp_path):
    """Weights live in memory mapped PROT_NONE while optimizing: touching their data would kill the process."""
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parent.parent)
    r = subprocess.run([sys.executable, "-c", TRIPWIRE, root, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "TRIPWIRE-OK capture=torch.export" in r.stdout, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    assert "kernels=0" not in r.stdout  # the tripwire covered code generation too


def test_weights_never_enter_the_egraph_or_printed_program():
    model = Block(d=64).eval()
    with torch.no_grad():
        model.fc1.weight.fill_(1234.5)  # a value that would show up if data were printed or interned
    opt = fusion.optimize(model, (torch.randn(2, 16, 64),))
    text = opt.explain() + opt.code
    assert "1234.5" not in text
    assert all(n.op != "get_attr" for g in opt.graphs for n in g.gm.graph.nodes if "weight" in n.name)


def test_optimize_on_meta_parameters_reaches_code_generation():
    """Parameters on the meta device have no data at all: optimizing must still work up to compiled kernels."""
    with torch.device("meta"):
        model = Block(d=64).eval()
        x = torch.empty(2, 16, 64)
    from fusion.capture import capture_module
    from fusion.config import Config
    from fusion.pipeline import compile_graph

    cap = capture_module(model, (x,))
    for n in cap.gm.graph.nodes:  # compile the graph as if it ran on CPU: same shapes, no data
        v = n.meta.get("val")
        if isinstance(v, torch.Tensor) and v.device.type == "meta":
            n.meta["val"] = torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="meta")
    compiled = compile_graph(cap.gm, Config())
    assert compiled.log.fired or compiled.log.kernels or not compiled.log.fallbacks
    assert all(isinstance(p, nn.Parameter) and p.is_meta for p in model.parameters())
