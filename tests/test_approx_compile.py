"""fusion.approx under torch.compile (backend="fusion", options={"approximate": ...}): the same guarded pass as
fusion.optimize, the converted weights held by the compiled program and the fp32 ones released in place."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fusion

from .approx_models import Block, ReluRef
from .conftest import rel_err


def _compile_counts() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _twins(seed=0):
    """Two blocks with the same weights (one for torch.compile, one for fusion.optimize / eager references)."""
    torch.manual_seed(seed)
    a = Block().eval()
    b = Block().eval()
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("kind", ["int8", "bf16", "relu_attention"])
def test_torch_compile_options_approximate(kind, w8a8_first):
    """torch.compile(backend="fusion", options={"approximate": ...}) runs the same guarded pass as fusion.optimize:
    the same program (within rounding), no recompile on repeated calls, the converted weights held by the
    compiled program and the fp32 ones released in place (same Parameter objects, dtype and shape)."""
    from fusion.approx.held import ReleasedWeightError, is_released

    compiled_model, twin = _twins()
    reference = Block().eval()
    reference.load_state_dict(twin.state_dict())
    x = torch.randn(2, 16, 64)
    cfg = fusion.Config(approximate={kind}, tolerance=0.5)
    params = {n: p for n, p in compiled_model.named_parameters()}
    torch._dynamo.reset()
    before = _compile_counts()
    cm = torch.compile(compiled_model, backend="fusion", options={"approximate": {kind}, "tolerance": 0.5})
    with torch.no_grad():
        out = cm(x)
        for _ in range(3):
            assert torch.equal(cm(x), out)
        want = ReluRef(reference)(x) if kind == "relu_attention" else reference(x)
    assert _compile_counts() - before == 1                               # compiled once, never recompiled
    (compiled,) = fusion.last_compiled()
    res = compiled.log.approx
    assert res is not None and res.applied and {s.kind for s in res.applied} == {kind}
    assert [p.name for p in compiled.log.passes][:7] == ["normalize", "rewrite", "approximate", "layout", "prepare", "lower", "build"]
    assert "approximate rewrites" in fusion.explain_last()
    opt = fusion.optimize(twin, (x,), config=cfg)                       # the same pass through fusion.optimize
    with torch.no_grad():
        via_optimize = opt(x)
    assert sorted(s.name.split(":")[0] for s in opt.graphs[0].log.approx.applied) == \
        sorted(s.name.split(":")[0] for s in res.applied)
    assert rel_err(out, via_optimize) < 1e-4
    if kind == "relu_attention":
        assert rel_err(out, want) < 1e-5                                  # exactly ReLU attention
        assert all(p.dtype == torch.float32 and not is_released(p) for p in params.values())
        return
    assert rel_err(out, want) < 2e-2
    # weights: same Parameter objects, metadata unchanged (Dynamo's guards), fp32 originals released
    assert {n: p for n, p in compiled_model.named_parameters()} == params
    linear_weights = [m.weight for m in (compiled_model.q, compiled_model.up, compiled_model.down)]
    assert all(p.dtype == torch.float32 and p.shape[0] in (64, 256) and is_released(p) for p in linear_weights)
    assert not is_released(compiled_model.q.bias)
    held_dtype = torch.int8 if kind == "int8" else torch.bfloat16
    assert {t.dtype for n, t in compiled.gm.named_buffers() if n.startswith("_approx_weight_")} == {held_dtype}
    with pytest.raises(ReleasedWeightError, match="released"):          # eager use: a clear error, not zeros
        compiled_model(x)
    with pytest.raises(ReleasedWeightError, match="state_dict"):
        compiled_model.state_dict()
    with torch.no_grad():
        assert torch.equal(cm(x), out)                                   # the compiled module is unaffected


def test_torch_compile_approximate_new_shapes_reuse_converted_weights(w8a8_first):
    """A recompile (new shapes, here symbolic) finds the weights released: it reads the converted ones the
    registry holds (never the released fp32 memory) and measures only the sites left to decide."""
    compiled_model, reference = _twins(1)
    cm = torch.compile(compiled_model, backend="fusion", options={"approximate": {"int8", "relu_attention"}, "fallback": False,
                                                                 "tolerance": 0.5})
    torch._dynamo.reset()
    with torch.no_grad():
        cm(torch.randn(2, 16, 64))
        first = fusion.last_compiled()[0].log.approx
        n_held = sum(1 for n, _ in fusion.last_compiled()[0].gm.named_buffers() if n.startswith("_approx_weight_"))
        assert n_held == 6 and {s.kind for s in first.applied} >= {"int8", "relu_attention"}
        for t in (24, 40):                                               # 24: recompile (dynamic), 40: same program
            x = torch.randn(2, t, 64)
            out = cm(x)
            want = ReluRef(reference)(x)                                 # ReLU attention, exact linears
            assert rel_err(out, want) < 2e-2
    res = fusion.last_compiled()[0].log.approx
    reused = [s for s in res.sites if "earlier compile" in s.note]
    assert len(reused) == 6 and all(s.kind.startswith("int8") for s in reused)
    assert [s.kind for s in res.applied if s not in reused] == ["relu_attention"]   # symbolic key length


def test_torch_compile_approximate_errors_and_training():

    block, _ = _twins(2)
    x = torch.randn(2, 16, 64)
    for bad, match in (({"approximate": {"int4"}}, "unknown approximate"), ({"approximate": "bf16", "tolerance": 2},
                                                                             "tolerance"), ({"aproximate": {"bf16"}}, "unknown fusion option")):
        torch._dynamo.reset()
        with pytest.raises(Exception, match=match):
            torch.compile(block, backend="fusion", options=bad)(x)
    torch._dynamo.reset()
    cm = torch.compile(block, backend="fusion", options={"approximate": {"bf16"}, "tolerance": 0.5})
    with pytest.warns(UserWarning, match="inference"):                  # records gradients: exact, one warning
        out = cm(x)
    assert out.requires_grad and rel_err(out, block(x)) < 1e-4
    assert all(p.dtype == torch.float32 for p in block.parameters())
    with torch.no_grad():
        cm(x)                                                            # inference: converted, released
    with pytest.raises(Exception, match="released"):                    # and now gradients cannot be had
        cm(x)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="released"):                    # nor an exact compile of the module
        with torch.no_grad():
            torch.compile(block, backend="fusion")(x)


_COMPILE_MEMORY_SCRIPT = textwrap.dedent("""
    import gc, sys, torch, torch.nn as nn
    sys.path.insert(0, {root!r})
    import fusion
    torch.manual_seed(0)
    def rss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    tiny = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)).eval()   # imports, Dynamo, kernels: not weights
    with torch.no_grad():
        torch.compile(tiny, backend="fusion", options={{"approximate": {{"int8"}}, "tolerance": 0.5}})(torch.randn(64, 64))
    L, D = 8, 2048                       # 8 layers x 2048x2048 fp32 = 16 MiB each
    model = nn.Sequential(*[nn.Linear(D, D, bias=False) for _ in range(L)]).eval()
    x = torch.randn(64, D)
    gc.collect()
    base = rss()
    cm = torch.compile(model, backend="fusion", options={{"approximate": {{"int8"}}, "tolerance": 0.5}})
    with torch.no_grad():
        y = cm(x)
    gc.collect()
    after = rss()
    held = sum(b.numel() * b.element_size() for c in fusion.last_compiled() for b in c.gm.buffers())
    print(base, after, L * D * D * 4, held, int(all(p.dtype == torch.float32 for p in model.parameters())))
""")


@pytest.mark.slow
def test_torch_compile_approximate_memory_is_converted_weights_only():
    """After compiling, the process holds the int8 weights, not the fp32 ones (they are released in place)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", _COMPILE_MEMORY_SCRIPT.format(root=root)], capture_output=True,
                         text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr[-3000:]
    base, after, fp32, held, still_fp32 = map(int, out.stdout.split()[-5:])
    assert still_fp32 == 1 and fp32 // 4 <= held <= fp32 // 4 + (1 << 20)   # int8 weights + scales
    # base includes the fp32 weights; after compiling, they are gone and the int8 ones (1/4) are there
    assert after - base <= -0.5 * fp32, (after - base) / fp32   # (measured -0.58: allocator slack)
