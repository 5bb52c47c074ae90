"""fusion: equality-saturation operator fusion for PyTorch.

    torch.compile(model, backend="fusion")                # as a torch.compile backend
    opt = fusion.optimize(model, example_inputs)          # standalone, inspectable
    print(opt.explain()); opt.report()
    fusion.analyze(model, example_inputs); fusion.compare(model, example_inputs)   # analysis, before/after
"""
from fusion.dialect import ops  # noqa: F401  (registers torch.ops.fusion.*)
from fusion.dialect import stacked  # noqa: F401  (registers torch.ops.fusion.stacked_linear)
from fusion.analysis.analyze import Analysis, analyze
from fusion.api import OptimizedModule, optimize
from fusion.analysis.compare import Comparison, compare
from fusion.torch_compile import fusion_backend, register as _register_backend
from fusion.config import Config, ConfigError
from fusion.store.program import LoadedProgram, load
from fusion.errors import FusionError, FusionFallbackWarning, FusionInputError

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # last_compiled's return type, kept out of the package namespace (not re-exported)
    from fusion.pipeline import CompiledGraph

__all__ = [
    "Analysis",
    "Comparison",
    "Config",
    "ConfigError",
    "FusionError",
    "FusionFallbackWarning",
    "FusionInputError",
    "OptimizedModule",
    "analyze",
    "compare",
    "explain_last",
    "last_compiled",
    "fusion_backend",
    "load",
    "LoadedProgram",
    "optimize",
]
__version__ = "0.1.0"

_register_backend()


def explain_last(n: int = 1) -> str:
    """explain() of the last `n` graphs compiled in this process (e.g. by torch.compile(backend="fusion")),
    oldest first. A graph the program has dropped since is explained from what was recorded when it was
    compiled (its log and program code: fusion.pipeline.CompileRecord), so asking never keeps graphs alive."""
    from fusion.pipeline import RECENT
    from fusion.analysis.explain import explain_recorded

    return "\n".join(explain_recorded("torch.compile", r) for r in RECENT[-n:])


def last_compiled(n: int = 1) -> "list[CompiledGraph]":
    """The last `n` graphs compiled in this process (`fusion.pipeline.CompiledGraph`, oldest first): `.code`,
    `.log` (passes, kernels, fallbacks) and, with approximate rewrites, `.log.approx` (`fusion.approx.ApproxResult`:
    every site, kept or reverted, and the measured error and cosine). After `torch.compile(backend="fusion")` this
    is how a program is inspected; `explain_last(n)` prints the same as `OptimizedModule.explain()`. Only graphs
    still alive (held by a compiled model or by the caller) are returned: of the last `n` compiles, one whose
    program was dropped has been freed and is left out (`explain_last` still describes it)."""
    from fusion.pipeline import RECENT

    live = (r.compiled for r in RECENT[-n:]) if n > 0 else ()
    return [g for g in live if g is not None]
