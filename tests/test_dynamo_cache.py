"""torch.compile's warm path (fusion/store/dynamo_cache.py): an inference graph Dynamo compiled before runs its
stored program without AOTAutograd — and only graphs for which that is the identical computation."""
from pathlib import Path

import torch
import torch.nn.functional as F

import fusion

from .conftest import rel_err
from fusion import pipeline


class Block(torch.nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.ln = torch.nn.LayerNorm(d)
        self.fc = torch.nn.Linear(d, 4 * d)
        self.proj = torch.nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.proj(F.gelu(self.fc(self.ln(x)))).softmax(-1)


def _entries(cache_dir) -> list[Path]:
    return sorted((Path(cache_dir) / "dynamo").glob("*.json"))


def _compile_and_run(fn, *args, cache_dir):
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="fusion", options={"cache_dir": str(cache_dir)})
    out = compiled(*args)
    return out, pipeline.RECENT[-1]


def test_second_compile_restores_the_program(tmp_path, assert_close):
    torch.manual_seed(0)
    m, x = Block().eval(), torch.randn(4, 8, 32)
    with torch.no_grad():
        ref = m(x)
        out1, g1 = _compile_and_run(m, x, cache_dir=tmp_path)
        assert len(_entries(tmp_path)) == 1
        out2, g2 = _compile_and_run(m, x, cache_dir=tmp_path)
        assert g2 is not g1 and g2.log.rewrite_stats.get("cache") == "dynamo cache"
        assert g2.log.kernels and g2.log.fired == g1.log.fired      # explain() still has what was done
        assert_close(out1, ref)
        assert_close(out2, ref)
        # the restored program serves other weights of the same architecture (weights are arguments)
        m2 = Block().eval()
        _, g3 = _compile_and_run(m2, x, cache_dir=tmp_path)
        assert g3.log.rewrite_stats.get("cache") == "dynamo cache"
        assert_close(torch.compile(m2, backend="fusion", options={"cache_dir": str(tmp_path)})(x), m2(x))


def test_other_shapes_and_grad_mode_are_other_entries(tmp_path):
    m = Block().eval()
    with torch.no_grad():
        _compile_and_run(m, torch.randn(4, 8, 32), cache_dir=tmp_path)
        _compile_and_run(m, torch.randn(2, 8, 32), cache_dir=tmp_path)
    assert len(_entries(tmp_path)) == 2
    # training: AOTAutograd builds a joint graph; nothing is stored, gradients still flow
    x = torch.randn(4, 8, 32, requires_grad=True)
    torch._dynamo.reset()
    out = torch.compile(m, backend="fusion", options={"cache_dir": str(tmp_path)})(x)
    out.sum().backward()
    assert x.grad is not None and len(_entries(tmp_path)) == 2


def test_mutation_and_aliasing_graphs_are_not_stored(tmp_path, assert_close):
    def mutates(x, y):
        x.add_(1)
        return (x * y).sum(-1)

    def aliases(x):
        return x.view(-1), torch.exp(x)

    with torch.no_grad():
        a, b = torch.randn(8, 16), torch.randn(8, 16)
        a2 = a.clone()
        out, _ = _compile_and_run(mutates, a, b, cache_dir=tmp_path)
        assert_close(out, ((a2 + 1) * b).sum(-1))
        assert torch.equal(a, a2 + 1)
        out = _compile_and_run(aliases, a, cache_dir=tmp_path)[0]
        assert out[0].data_ptr() == a.data_ptr()
    assert _entries(tmp_path) == []


def _user_fn(x):
    return x * 2


torch.fx.wrap("_user_fn")


def test_graphs_calling_user_functions_are_not_stored(tmp_path):
    allowed = torch._dynamo.allow_in_graph(_user_fn)

    def f(x):
        return allowed(torch.tanh(x)) + 1

    torch.manual_seed(0)
    with torch.no_grad():
        x = torch.randn(8, 16)
        out, _ = _compile_and_run(f, x, cache_dir=tmp_path)
    assert rel_err(out, torch.tanh(x) * 2 + 1) <= 1e-5   # (allclose's rtol fails near 0 on the kernel's fp32 tanh)
    assert _entries(tmp_path) == []
    with torch.no_grad():  # the same computation written with torch only is stored
        _compile_and_run(lambda x: torch.tanh(x) * 2 + 1, x, cache_dir=tmp_path)
    assert len(_entries(tmp_path)) == 1


def test_a_corrupted_entry_is_dropped_and_rebuilt(tmp_path, assert_close):
    m, x = Block().eval(), torch.randn(4, 8, 32)
    with torch.no_grad():
        _compile_and_run(m, x, cache_dir=tmp_path)
        (entry,) = _entries(tmp_path)
        entry.write_text(entry.read_text()[: 200])
        out, g = _compile_and_run(m, x, cache_dir=tmp_path)
        assert g.log.rewrite_stats.get("cache") != "dynamo cache"
        assert_close(out, m(x))
    assert len(_entries(tmp_path)) == 1 and _entries(tmp_path)[0].stat().st_size > 1000


def test_off_with_the_structural_cache_and_in_approximate_mode(tmp_path):
    m, x = Block().eval(), torch.randn(4, 8, 32)
    with torch.no_grad():
        torch._dynamo.reset()
        torch.compile(m, backend="fusion", options={"cache_dir": str(tmp_path), "structural_cache": False})(x)
    assert _entries(tmp_path) == []
    assert fusion.Config(structural_cache=False).key() == fusion.Config().key()  # same programs either way
