"""Processes (or ranks) that compile the same program against one cache directory compile it once: the first
takes the entry's lock and builds it, the others wait and reuse it (fusion.store.cache.exclusive)."""
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = str(Path(__file__).resolve().parent.parent)

OPTIMIZE = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
import torch, fusion
from tests.test_api import Block
torch.manual_seed(int(sys.argv[3]))              # each process its own weights: one architecture
m, x = Block().eval(), torch.randn(2, 8, 32)
while time.time() < float(sys.argv[4]):          # start together
    time.sleep(0.01)
opt = fusion.optimize(m, (x,), config=fusion.Config(cache_dir=sys.argv[2]))
assert ((opt(x) - m(x)).abs().max() / m(x).abs().max()) <= 1e-5
print("CAPTURE", opt.capture_method)
"""

COMPILE = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
import torch, fusion
from tests.test_api import Block
torch.manual_seed(int(sys.argv[3]))
m, x = Block().eval(), torch.randn(2, 8, 32)
f = torch.compile(m, backend="fusion", options={"cache_dir": sys.argv[2]})
while time.time() < float(sys.argv[4]):
    time.sleep(0.01)
with torch.no_grad():
    y = f(x)
    assert ((y - m(x)).abs().max() / m(x).abs().max()) <= 1e-5
(c,) = fusion.last_compiled()
print("HOW", c.log.passes[0].name if c.log.passes[0].name == "dynamo cache" else "compiled")
"""


def _run_together(script: str, cache_dir: Path, n: int) -> list[str]:
    start = time.time() + 8.0                    # every process imported torch by then
    procs = [subprocess.Popen([sys.executable, "-c", script, ROOT, str(cache_dir), str(i), str(start)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(n)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        outs.append(out)
    return outs


@pytest.mark.parametrize("n", [4])
def test_processes_optimizing_one_architecture_compile_it_once(tmp_path, n):
    outs = _run_together(OPTIMIZE, tmp_path, n)
    methods = sorted(line.split(" ", 1)[1] for o in outs for line in o.splitlines() if line.startswith("CAPTURE"))
    assert methods == ["structural cache"] * (n - 1) + ["torch.export"], methods
    assert len(list((tmp_path / "kernels").glob("*.so"))) >= 1


def test_processes_torch_compiling_one_graph_compile_it_once(tmp_path):
    outs = _run_together(COMPILE, tmp_path, 2)
    hows = sorted(line.split(" ", 1)[1] for o in outs for line in o.splitlines() if line.startswith("HOW"))
    assert hows == ["compiled", "dynamo cache"], hows
