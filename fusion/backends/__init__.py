"""Backends: a kernel plan's IRs -> callable kernel modules. One interface, chosen from a table at call time.

    backend = choose(gm, config)                      # by Config.codegen, else the inputs' device
    plan = plan_kernels(gm, backend.devices(config), hw if backend.costed else None)   # fusion.lower
    modules = backend.build(plan.irs, plan.specs, config)   # name -> nn.Module (source_path, kind)

A backend only prints the plan (the kernel IR already says the phases, scratch rows and reach of every
kernel) and builds what it printed: `cpp` renders one C++ translation unit, compiles it with the compiler
`Config.cxx` names and binds each kernel through ctypes; `triton` renders one Triton module per kernel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import fx

from fusion.config import Config
from fusion.dialect.graph_walk import on_cuda
from fusion.lower.kernel_ir import KernelIR
from fusion.lower.specs import KernelSpec

Build = Callable[[list[KernelIR], list[KernelSpec], Config], dict[str, torch.nn.Module]]


@dataclass(frozen=True)
class Backend:
    name: str
    devices: Callable[[Config], tuple]  # what the scheduler may put in this backend's kernels
    costed: bool                        # groups priced by the CPU profile (worth_a_kernel); else by size
    build: Build


def _cpp_devices(config: Config) -> tuple:
    from fusion.lower.schedule import CPU_BF16

    # bf16 buffers in generated CPU kernels only in the approximate "bf16" mode (exact mode never makes one)
    return ("cpu", CPU_BF16) if "bf16" in config.approximate else ("cpu",)


def _cpp_build(irs: list[KernelIR], specs: list[KernelSpec], config: Config) -> dict[str, torch.nn.Module]:
    from fusion.backends import cpp

    return cpp.build(irs, specs, config)


def _triton_build(irs: list[KernelIR], specs: list[KernelSpec], config: Config) -> dict[str, torch.nn.Module]:
    from fusion.backends import triton

    return triton.build(irs, specs, config)


BACKENDS: dict[str, Backend] = {
    "cpp": Backend("cpp", _cpp_devices, True, _cpp_build),
    "triton": Backend("triton", lambda config: ("cpu", "cuda"), False, _triton_build),
}


def choose(gm: fx.GraphModule, config: Config) -> Backend | None:
    """The backend for gm: `Config.codegen` names it, or "auto" takes Triton for CUDA inputs and C++
    otherwise; None for codegen="aten" (no generated kernels)."""
    if config.codegen == "aten":
        return None
    if config.codegen == "triton" or (config.codegen == "auto" and on_cuda(gm)):
        return BACKENDS["triton"]
    return BACKENDS["cpp"]
