"""DATASHEET profiles of GPUs: vendor peak numbers, NOT measured on any machine here.

Use them to predict what a fused graph would do on a GPU (reports, what-if extraction) until a GPU is
available to calibrate on. Every profile has measured=False and says where its numbers come from.
Peak numbers are dense (no 2:4 sparsity). Real kernels reach roughly 80-90 % of the HBM bandwidth
and 60-80 % of the tensor-core peak; the launch and call overheads are typical values, not specs.

    get_profile("H100-SXM") -> HardwareProfile        names: A100-40GB, H100-SXM, H200
    DATASHEET_PROFILES: dict[str, HardwareProfile]
"""
from __future__ import annotations

from fusion.costmodel.hardware import HardwareProfile

T = 1e12
_LAUNCH = 4e-6        # s, one CUDA/Triton kernel launch from Python (typical 3-5 µs)
_ATEN = 6e-6          # s, one eager ATen CUDA op from Python (dispatch + launch), typical


def _gpu(name, hbm_bw, l2_bw, l2_bytes, fp32, tf32, bf16, fp8, int8, sm, sfu_clock_hz, src):
    gemm = {"float32": fp32, "tf32": tf32, "bfloat16": bf16, "float16": bf16, "int8": int8}
    if fp8:
        gemm.update({"float8_e4m3fn": fp8, "float8_e5m2": fp8, "fp8": fp8})
    return HardwareProfile(
        name=name,
        copy_bandwidth=hbm_bw,            # bytes/s, HBM peak (read + write)
        cache_bandwidth=l2_bw,            # bytes/s, L2, rough public estimate
        llc_bytes=l2_bytes,
        gemm_flops=gemm,                  # FLOP/s, tensor cores dense ("float32" = non-tensor-core FP32)
        vector_flops=fp32,                # FLOP/s, FP32 CUDA cores
        transcendental_rate=16 * sm * sfu_clock_hz,   # MUFU: 16 evaluations / clock / SM
        kernel_overhead=_LAUNCH,
        aten_overhead=_ATEN,
        page_fault_bandwidth=0.0,         # caching allocator: no page faults in steady state
        launch_overhead=_LAUNCH,
        measured=False,
        source=f"datasheet: {src} (peak, dense; not measured)",
        key=f"datasheet-{name}",
    )


DATASHEET_PROFILES: dict[str, HardwareProfile] = {
    "A100-40GB": _gpu("A100-40GB (SXM4)", 1555e9, 5.0e12, 40 << 20,
                      fp32=19.5 * T, tf32=156 * T, bf16=312 * T, fp8=0.0, int8=624 * T,
                      sm=108, sfu_clock_hz=1.41e9, src="NVIDIA A100 datasheet (HBM2 1555 GB/s)"),
    "H100-SXM": _gpu("H100-SXM5-80GB", 3.35e12, 7.0e12, 50 << 20,
                     fp32=67 * T, tf32=494.7 * T, bf16=989.4 * T, fp8=1978.9 * T, int8=1978.9 * T,
                     sm=132, sfu_clock_hz=1.83e9, src="NVIDIA H100 datasheet (HBM3 3.35 TB/s)"),
    "H200": _gpu("H200-SXM-141GB", 4.8e12, 7.0e12, 50 << 20,
                 fp32=67 * T, tf32=494.7 * T, bf16=989.4 * T, fp8=1978.9 * T, int8=1978.9 * T,
                 sm=132, sfu_clock_hz=1.83e9, src="NVIDIA H200 datasheet (HBM3e 4.8 TB/s)"),
}

_ALIASES = {"a100": "A100-40GB", "a100-40gb": "A100-40GB", "h100": "H100-SXM", "h100-sxm": "H100-SXM",
            "h100-sxm5": "H100-SXM", "h200": "H200", "h200-sxm": "H200"}


def get_profile(name: str) -> HardwareProfile:
    """A datasheet profile by name (case-insensitive; "h100", "A100", "H200" work)."""
    key = _ALIASES.get(name.strip().lower(), name)
    try:
        return DATASHEET_PROFILES[key]
    except KeyError:
        raise KeyError(f"no datasheet profile {name!r}; known: {sorted(DATASHEET_PROFILES)}") from None
