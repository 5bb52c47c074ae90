"""Lowering straight to Triton kernels, for tests and the GPU bench: plan (fusion.lower) + build (this
backend) + bind, the same three steps the driver runs as passes.

    res = lower_to_triton(gm, config)      # LowerResult(gm calling TritonKernel modules + ATen, kernels)
"""
from __future__ import annotations

from torch import fx

from fusion.backends import BACKENDS
from fusion.backends.triton import build
from fusion.config import Config
from fusion.lower import KernelPlan, LowerResult, bind_kernels, plan_kernels
from fusion.lower.kernel_ir import KernelIR

_DEVICES = BACKENDS["triton"].devices


def _plan(gm: fx.GraphModule, config: Config) -> KernelPlan:
    return plan_kernels(gm, _DEVICES(config))


def build_kernels(gm: fx.GraphModule, cache_dir: str | None = None,
                  dtypes_from: str = "graph") -> list[tuple[KernelIR, object]]:
    """Schedule gm and build one TritonKernel per group: [(ir, kernel)]."""
    config = Config(cache_dir=cache_dir)
    plan = _plan(gm, config)
    modules = build(plan.irs, plan.specs, config, out_dtypes=dtypes_from)
    return [(ir, modules[ir.name]) for ir in plan.irs]


def lower_to_triton(gm: fx.GraphModule, config: Config | None = None, hw=None,
                    dtypes_from: str = "graph") -> LowerResult:
    """Same result as the driver's lower + build passes with the Triton backend (hw is unused)."""
    config = config or Config()
    plan = _plan(gm, config)
    if not plan.irs:
        return LowerResult(gm, [])
    return bind_kernels(plan, build(plan.irs, plan.specs, config, out_dtypes=dtypes_from))
