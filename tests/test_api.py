"""The public API: optimize / Config / backend registration / errors / fallbacks / training."""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusion
from fusion.errors import FusionFallbackWarning, FusionInputError


class Block(nn.Module):
    """A small pre-LN transformer-style block written by hand (softmax, layer norm, gelu, silu)."""

    def __init__(self, d=32):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x):
        h = self.ln(x)
        s = h @ h.transpose(-1, -2) * 0.125
        m = s.amax(-1, keepdim=True)
        e = (s - m).exp()
        a = (e / e.sum(-1, keepdim=True)) @ h
        return x + self.fc2(F.gelu(self.fc1(a))) + F.silu(x)


def test_optimize_matches_eager(assert_close):
    torch.manual_seed(0)
    m = Block().eval()
    x = torch.randn(2, 8, 32)
    opt = fusion.optimize(m, (x,))
    assert_close(opt(x), m(x))
    x2 = torch.randn(3, 8, 32)  # another batch size: sizes are run-time arguments of the kernels
    assert_close(opt(x2), m(x2))
    text = opt.explain()
    assert "passes:" in text and "program:" in text
    assert isinstance(opt.code, str) and "def forward" in opt.code
    rows = opt.report(print_table=False)
    assert isinstance(rows, list)


def test_weights_are_referenced_not_copied():
    m = Block().eval()
    x = torch.randn(2, 8, 32)
    opt = fusion.optimize(m, (x,))
    before = opt(x).clone()
    with torch.no_grad():
        m.fc2.bias.add_(1.0)  # an in-place update is seen by the optimized module
    after = opt(x)
    torch.testing.assert_close(after, before + 1.0, rtol=1e-4, atol=1e-4)


def test_backend_registered_and_config_options(assert_close):
    assert "fusion" in torch._dynamo.list_backends()
    m = Block().eval()
    x = torch.randn(2, 8, 32)
    torch._dynamo.reset()
    cm = torch.compile(m, backend="fusion", options={"max_iterations": 4})
    with torch.no_grad():
        assert_close(cm(x), m(x))


def test_training_step_matches_eager():
    torch.manual_seed(0)
    m = Block()
    x = torch.randn(2, 8, 32)
    ref = Block()
    ref.load_state_dict(m.state_dict())
    torch._dynamo.reset()
    cm = torch.compile(m, backend="fusion")
    loss = cm(x).pow(2).mean()
    loss.backward()
    loss_ref = ref(x).pow(2).mean()
    loss_ref.backward()
    assert abs(loss.item() - loss_ref.item()) <= 1e-4 * abs(loss_ref.item())
    for (name, p), q in zip(m.named_parameters(), ref.parameters()):
        err = ((p.grad - q.grad).abs().max() / q.grad.abs().max()).item()
        assert err <= 1e-4, f"{name}: grad rel err {err}"


def test_dynamic_shapes(assert_close):
    m = Block().eval()
    torch._dynamo.reset()
    cm = torch.compile(m, backend="fusion", dynamic=True)
    with torch.no_grad():
        for b, s in [(2, 8), (3, 5), (1, 17)]:
            x = torch.randn(b, s, 32)
            assert_close(cm(x), m(x))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: fusion.optimize(lambda x: x, (torch.randn(2),)), "nn.Module"),
        (lambda: fusion.optimize(42, (torch.randn(2),)), "nn.Module"),
        (lambda: fusion.optimize(Block(), (torch.randn(2, 8, 32), torch.randn(2))), "cannot take"),
        (lambda: fusion.optimize(Block(), "x"), "tuple"),
        (lambda: fusion.optimize(Block(), (torch.randn(2, 8, 32),), no_such_option=1), "unknown fusion option"),
        (lambda: fusion.Config(approximate={"int4"}), "unknown approximate"),
        (lambda: fusion.Config(tolerance=5.0), "tolerance"),
        (lambda: fusion.Config(codegen="cuda-graphs"), "codegen"),
    ],
)
def test_bad_input_gets_a_clear_error(call, match):
    with pytest.raises((FusionInputError, fusion.ConfigError)) as info:
        call()
    assert match in str(info.value)


@pytest.mark.parametrize("stage, target", [
    ("rewrite", "fusion.rewrite.rewrite"),
    ("lower", "fusion.lower.plan_kernels"),
])
def test_stage_failure_falls_back_with_one_warning(monkeypatch, tmp_path, stage, target, assert_close):
    import importlib

    mod_name, attr = target.rsplit(".", 1)
    mod = importlib.import_module(mod_name)

    def boom(*a, **k):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(mod, attr, boom)
    m = Block().eval()
    x = torch.randn(2, 8, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = fusion.optimize(m, (x,), config=fusion.Config(cache_dir=str(tmp_path)))  # cold cache: every stage runs
        out = opt(x)
    ours = [w for w in caught if issubclass(w.category, FusionFallbackWarning)]
    assert len(ours) == 1 and stage in str(ours[0].message) and "injected failure" in str(ours[0].message)
    assert_close(out, m(x))
    with pytest.raises(RuntimeError, match="injected"):
        fusion.optimize(m, (x,), config=fusion.Config(fallback=False, cache_dir=str(tmp_path / "again")))


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.export cannot capture it, Dynamo can
            return torch.softmax(x * 2, -1)
        return x - 1


def test_unexportable_model_is_captured_by_dynamo():
    x = torch.randn(4, 8).abs()
    opt = fusion.optimize(DataDependent(), (x,))
    assert opt.capture_method == "dynamo"
    torch.testing.assert_close(opt(x), DataDependent()(x))
    torch.testing.assert_close(opt(-x), DataDependent()(-x))  # the other branch


def test_capture_failure_falls_back(monkeypatch):
    import fusion.api

    def boom(*a, **k):
        raise RuntimeError("injected capture failure")

    monkeypatch.setattr(fusion.api, "capture_module", boom)
    monkeypatch.setattr(fusion.api.OptimizedModule, "_use_dynamo", boom)
    x = torch.randn(4, 8)
    with pytest.warns(FusionFallbackWarning, match="capture"):
        opt = fusion.optimize(DataDependent(), (x,))
    torch.testing.assert_close(opt(x), DataDependent()(x))


def test_flat_args_is_the_graph_argument_list(assert_close, tmp_path, monkeypatch):
    """`flat_args(*inputs)` binds each placeholder of the captured graph: weights by reference (read from the
    module at the call), user inputs in order; the rewritten program run on it gives the model's output."""
    monkeypatch.setenv("FUSION_CACHE_DIR", str(tmp_path))  # a cold cache: the graph is captured, not restored
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)).eval()
    x = torch.randn(3, 8)
    opt = fusion.optimize(m, (x,))
    assert opt.capture_method == "torch.export" and opt.captured is not None
    assert opt.example_inputs == (x,)
    flat = opt.flat_args(x)
    bindings = opt.captured.input_bindings
    assert len(flat) == len(bindings) == len(opt.accessors)
    params = dict(m.named_parameters())
    for (kind, name), value, acc in zip(bindings, flat, opt.accessors):
        assert (acc is None) == (kind == "user")
        assert value is (x if kind == "user" else params[name])
    assert_close(opt.graphs[0].program_gm(*flat)[0], m(x))


def _private_members(cls: type) -> set[str]:
    """The single-underscore attributes and methods `cls` defines (dunders left out)."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    names |= {t.attr for n in ast.walk(tree) if isinstance(n, (ast.Assign, ast.AnnAssign))
              for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
              if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def test_no_other_module_reads_optimized_module_internals():
    """OptimizedModule and LoadedProgram are read from outside through public names (captured, accessors,
    example_inputs, flat_args, compiled, ...): no module but their own touches `x._name` of a private member
    they define (`self._name` inside another class is that class's own business; `torch._dynamo` is torch's)."""
    import ast
    from pathlib import Path

    from fusion.api import OptimizedModule
    from fusion.store.program import LoadedProgram

    root = Path(__file__).resolve().parents[1]
    private = {"fusion/api.py": _private_members(OptimizedModule),
               "fusion/store/program.py": _private_members(LoadedProgram)}
    watched = set().union(*private.values())
    found = []
    for path in sorted([*root.glob("fusion/**/*.py"), *root.glob("bench/**/*.py"), *root.glob("tests/*.py")]):
        rel = path.relative_to(root).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr in watched - private.get(rel, set())
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls", "torch"))):
                found.append(f"{rel}:{node.lineno}: .{node.attr}")
    assert not found, "private members of OptimizedModule / LoadedProgram read elsewhere:\n  " + "\n  ".join(found)


def test_public_api_is_annotated():
    """Every function exported by `fusion` and every public method or property of an exported class has its
    parameters and return type annotated (fusion ships py.typed)."""
    import inspect

    def unannotated(fn, owner: str) -> list[str]:
        sig = inspect.signature(fn)
        bad = [p.name for p in sig.parameters.values()
               if p.name not in ("self", "cls") and p.annotation is inspect.Parameter.empty]
        if sig.return_annotation is inspect.Signature.empty and fn.__name__ != "__init__":
            bad.append("return")
        return [f"{owner}{fn.__name__}: {b}" for b in bad]

    missing = []
    for name in fusion.__all__:
        obj = getattr(fusion, name)
        if inspect.isfunction(obj):
            missing += unannotated(obj, "")
            continue
        for key, member in vars(obj).items() if inspect.isclass(obj) else ():
            fn = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
            if (not key.startswith("_") or key == "__init__") and inspect.isfunction(fn) \
                    and fn.__module__ == obj.__module__:
                missing += unannotated(fn, f"{name}.")
    assert not missing, "unannotated public API:\n  " + "\n  ".join(missing)


def test_inputs_that_require_grad_run_a_differentiable_path_with_one_warning():
    m = Block().eval()
    x = torch.randn(2, 8, 32)
    opt = fusion.optimize(m, (x,))
    xg = x.clone().requires_grad_()
    with pytest.warns(UserWarning, match="inputs that require grad run the original module"):
        y = opt(xg)
    y.sum().backward()
    ref = x.clone().requires_grad_()
    m(ref).sum().backward()
    assert torch.allclose(xg.grad, ref.grad, atol=1e-6)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt(xg)                                  # once per module
        with torch.no_grad():
            assert opt(xg).grad_fn is None       # under no_grad: the optimized program
