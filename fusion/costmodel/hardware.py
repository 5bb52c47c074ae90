"""Hardware profiles: what the machine can do, in bytes/s, FLOP/s and seconds per call.

`current_profile()` returns the calibrated profile of this machine (measured once, stored under the
cache dir as JSON, re-measured when missing or from another machine).
"""
from __future__ import annotations

import os
import platform
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch


#: gemm_flops / gemm_curve keys besides the dtypes: fp32 products on oneDNN, fp32 bmm of head-shaped
#: operands, and the fp32 SDPA call behind fusion.attention (calibrate._attention_curves)
ONEDNN_KEY, BMM_KEY, ATTENTION_KEY = "float32_onednn", "float32_bmm", "float32_attention"


@dataclass(frozen=True)


class HardwareProfile:
    name: str
    copy_bandwidth: float          # bytes/s, (bytes read + bytes written) / s of a large copy (DRAM)
    cache_bandwidth: float         # bytes/s when the working set fits in the last-level cache
    llc_bytes: int                 # last-level cache size
    gemm_flops: dict               # dtype name ("float32", "bfloat16", "int8") or a key above -> FLOP/s of a large GEMM
    vector_flops: float            # FLOP/s of vectorised fp32 pointwise arithmetic (all cores)
    transcendental_rate: float     # exp/erf/tanh evaluations per second (all cores, vectorised)
    kernel_overhead: float         # s per generated-kernel call from Python (wrapper + ctypes call)
    aten_overhead: float           # s per ATen op call from Python
    page_fault_bandwidth: float    # bytes/s of first-touching freshly mmapped memory (0 = not modelled)
    # --- optional fields (defaults keep older JSON and hand-written profiles valid) ---
    transcendental_rates: dict = field(default_factory=dict)  # "exp"/"tanh"/"erf" -> evaluations/s
    fresh_write_bandwidth: float = 0.0  # bytes/s writing a freshly allocated large tensor (page faults incl.)
    mmap_threshold: int = 32 << 20      # bytes; allocations at least this big are mmapped fresh every call
    launch_overhead: float = 0.0        # s per device kernel launch (GPU profiles; 0 on CPU)
    measured: bool = True               # False: datasheet numbers, not measured on this machine
    source: str = ""                    # "calibrated <date>" or "datasheet: <where from>"
    key: str = ""                       # machine key the profile was measured for
    calibration_load: float = -1.0      # 1-min load average when measured (-1 unknown); high = noisy
    view_overhead: float = 0.0          # s per view-op call (aten.view/permute...) from Python (0 = free)
    parallel_overhead: float = 0.0      # s per OpenMP parallel region (fork + join of the thread team)
    graph_call_overhead: float = 0.0    # s per call of an FX GraphModule (the program itself)
    schema: int = 0                     # calibrate.SCHEMA the profile was measured with (0: older)
    gemm_curve: dict = field(default_factory=dict)    # gemm_flops key -> [[FLOPs per call, FLOP/s], ...] ascending
    kernel_rates: dict = field(default_factory=dict)  # generated C++ kernels: "flops" FLOP/s, "exp"/... eval/s

    def to_json(self) -> dict:
        return asdict(self)


def achieved_bandwidth(nbytes: float, seconds: float) -> float:
    """Bytes moved per second (bytes read + bytes written, over the measured time)."""
    return nbytes / seconds


def mbu(nbytes: float, seconds: float | None, peak_bandwidth: float) -> float | None:
    """Memory-bandwidth utilisation: achieved bytes/s over `peak_bandwidth` (on CPUs the calibrated copy
    bandwidth, HardwareProfile.copy_bandwidth). Shared by fusion.analyze (and its before/after comparison)
    and bench/run.py's "% copy" column, so their figures agree. None without a time or a bandwidth."""
    if not seconds or not peak_bandwidth:
        return None
    return achieved_bandwidth(nbytes, seconds) / peak_bandwidth


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def llc_bytes() -> int:
    """Size of the largest CPU cache (sysfs), 32 MiB if unknown."""
    best = 0
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for d in base.glob("index*"):
            txt = (d / "size").read_text().strip().upper()
            m = re.match(r"(\d+)([KMG]?)", txt)
            if m:
                mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)]
                best = max(best, int(m.group(1)) * mult)
    except OSError:
        pass
    return best or 32 << 20


def machine_key() -> str:
    """CPU model, logical CPU count, torch threads and torch version, safe as a file name."""
    raw = f"{cpu_model()}-{os.cpu_count()}cpu-{torch.get_num_threads()}thr-torch{torch.__version__}"
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", raw).strip("_")


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return -1.0


def is_noisy(load: float) -> bool:
    """Was (or is) the machine busy enough to distort a calibration? 1-min load >= 0.75 per CPU."""
    return load >= 0.75 * (os.cpu_count() or 1)
