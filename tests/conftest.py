import atexit
import os
import shutil
import tempfile

# Triton kernels run on CPU tensors under the interpreter in CI; it must be set before triton is imported
# (torch.export imports it), so it is set here, before any test module loads.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

# Every test session gets its own empty cache directory, removed at exit, so a run never sees what an earlier
# run (or the user's own FUSION_CACHE_DIR) left behind: tests that assert a cold compile stay true on a machine
# that ran the suite before. FUSION_TEST_CACHE_DIR names one to keep (e.g. to inspect it after a failure).
_kept = os.environ.get("FUSION_TEST_CACHE_DIR")
os.environ["FUSION_CACHE_DIR"] = _kept or tempfile.mkdtemp(prefix="fusion-test-cache-")
if not _kept:
    atexit.register(shutil.rmtree, os.environ["FUSION_CACHE_DIR"], ignore_errors=True)
torch.set_num_threads(min(2, torch.get_num_threads()))

from fusion.workloads.micro import FunctionModule as Fn  # noqa: E402  (after TRITON_INTERPRET is set)


def aten_graph(f, args, dynamic_shapes=None):
    """The core-ATen graph of the function f on args (torch.export + run_decompositions)."""
    return torch.export.export(Fn(f), tuple(args), dynamic_shapes=dynamic_shapes).run_decompositions().graph_module


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the relative error used everywhere in the project."""
    a, b = a.detach().float(), b.detach().float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.fixture
def assert_close():
    def check(a, b, tol=1e-4):
        assert a.shape == b.shape, (a.shape, b.shape)
        e = rel_err(a, b)
        assert e <= tol, f"relative error {e:.3g} > {tol}"

    return check


@pytest.fixture
def w8a8_first(monkeypatch):
    """Start every linear as W8A8 (tiny test shapes may time weight-only as the faster form)."""
    import fusion.approx.rules as rules

    monkeypatch.setattr(rules, "INT8_LADDER", ("int8", "int8_weight_only"))
