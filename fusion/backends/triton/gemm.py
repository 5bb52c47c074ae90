"""GEMM + epilogue on the GPU: y = act(x @ w^T + bias) + residual (nn.Linear layout, w: [N, K]).

    triton_linear_epilogue(x, w, bias, act, residual)   one Triton kernel: tiled matmul, fp32 accumulate,
                                                        the epilogue applied to the accumulator tile
    vendor_linear_epilogue(x, w, bias, act, residual)   torch.mm (cuBLAS) + one fused Triton epilogue kernel
    linear_epilogue(x, w, bias, act, residual, hw=None) picks one of the two with the roofline cost model
    choose_strategy(M, N, K, dtype, has_bias, has_residual, hw) -> ("triton" | "vendor", {name: seconds})

act: None | "relu" | "gelu" (erf) | "gelu_tanh" | "silu". x: [..., K]; residual: broadcastable to [..., N].
Output dtype = x's dtype. fp32 inputs use IEEE fp32 dots (not TF32).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

ACTS = {None: 0, "none": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4}

#: fraction of the vendor GEMM's throughput a generated Triton GEMM reaches (assumption, not measured;
#: recalibrate with bench/gpu.py on the target GPU)
TRITON_GEMM_EFFICIENCY = 0.8


@triton.jit
def _act(y, ACT: tl.constexpr):
    if ACT == 1:
        y = tl.where(y < 0.0, 0.0, y)
    elif ACT == 2:
        y = 0.5 * y * (1.0 + tl.erf(y * 0.7071067811865476))
    elif ACT == 3:
        u = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        y = 0.5 * y * (2.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))
    elif ACT == 4:
        y = y / (1.0 + tl.exp(-y))
    return y


@triton.jit
def _linear_kernel(X, W, Bias, Res, Y, M, N, K, sxm, sxk, swn, swk, srm, srn, sym, syn,
                   HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   GROUP_M: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n                                   # grouped ordering: reuse w tiles in L2
    first_m = (pid // group) * GROUP_M
    gsize = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % gsize
    pid_n = (pid % group) // gsize
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(X + rm[:, None] * sxm + kk[None, :] * sxk, mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        b = tl.load(W + rn[None, :] * swn + kk[:, None] * swk, mask=(rn[None, :] < N) & (kk[:, None] < K), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    y = acc
    if HAS_BIAS:
        y = y + tl.load(Bias + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    y = _act(y, ACT)
    om = (rm[:, None] < M) & (rn[None, :] < N)
    if HAS_RES:
        y = y + tl.load(Res + rm[:, None] * srm + rn[None, :] * srn, mask=om, other=0.0).to(tl.float32)
    tl.store(Y + rm[:, None] * sym + rn[None, :] * syn, y.to(Y.dtype.element_ty), mask=om)


@triton.jit
def _epilogue_kernel(A, Bias, Res, Y, M, N, sam, san, srm, srn,
                     HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rm = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    om = (rm[:, None] < M) & (rn[None, :] < N)
    y = tl.load(A + rm[:, None] * sam + rn[None, :] * san, mask=om, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(Bias + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    y = _act(y, ACT)
    if HAS_RES:
        y = y + tl.load(Res + rm[:, None] * srm + rn[None, :] * srn, mask=om, other=0.0).to(tl.float32)
    tl.store(Y + rm[:, None] * N + rn[None, :], y.to(Y.dtype.element_ty), mask=om)


def _prep(x, w, residual):
    K = x.shape[-1]
    N = w.shape[0]
    if w.shape[1] != K:
        raise ValueError(f"linear: x [..., {K}] and w {tuple(w.shape)} do not match")
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    r2 = None
    if residual is not None:
        r2 = residual.expand(*x.shape[:-1], N).reshape(M, N)
    return x2, r2, M, N, K


def _act_code(act) -> int:
    if act not in ACTS:
        raise ValueError(f"unknown activation {act!r}; known: {sorted(a for a in ACTS if a)}")
    return ACTS[act]


def triton_linear_epilogue(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                           act: str | None = None, residual: torch.Tensor | None = None,
                           block_m: int | None = None, block_n: int | None = None,
                           block_k: int | None = None) -> torch.Tensor:
    """act(x @ w^T + bias) + residual in one Triton kernel."""
    x2, r2, M, N, K = _prep(x, w, residual)
    big = M >= 128 and N >= 128 and x.dtype != torch.float32
    block_m, block_n, block_k = block_m or (128 if big else 64), block_n or (128 if big else 64), \
        block_k or (64 if big else 32)
    warps = 8 if block_m * block_n >= 128 * 128 else 4
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    rs = r2.stride() if r2 is not None else (0, 0)
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    _linear_kernel[grid](x2, w, bias if bias is not None else y, r2 if r2 is not None else y, y,
                         M, N, K, *x2.stride(), *w.stride(), *rs, *y.stride(),
                         HAS_BIAS=bias is not None, HAS_RES=r2 is not None, ACT=_act_code(act),
                         BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
                         PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                         num_warps=warps, num_stages=3)
    return y.reshape(*x.shape[:-1], N)


def vendor_linear_epilogue(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                           act: str | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """torch.mm (cuBLAS / MKL) then one fused Triton epilogue kernel (bias, act, residual)."""
    x2, r2, M, N, _ = _prep(x, w, residual)
    a = torch.mm(x2, w.t())
    if bias is None and r2 is None and _act_code(act) == 0:
        return a.reshape(*x.shape[:-1], N)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    rs = r2.stride() if r2 is not None else (0, 0)
    BM, BN = 32, 128
    _epilogue_kernel[(triton.cdiv(M, BM), triton.cdiv(N, BN))](
        a, bias if bias is not None else y, r2 if r2 is not None else y, y, M, N, *a.stride(), *rs,
        HAS_BIAS=bias is not None, HAS_RES=r2 is not None, ACT=_act_code(act), BLOCK_M=BM, BLOCK_N=BN,
        num_warps=4)
    return y.reshape(*x.shape[:-1], N)


def default_profile(device: torch.device | None = None):
    """A GPU profile for the cost model: the datasheet profile matching the device name, else H100."""
    from fusion.costmodel.datasheets import get_profile

    name = ""
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(device).lower()
    for key in ("h200", "a100", "h100"):
        if key in name:
            return get_profile(key)
    return get_profile("h100")


def choose_strategy(M: int, N: int, K: int, dtype: torch.dtype, has_bias: bool, has_residual: bool,
                    hw=None, act: str | None = None) -> tuple[str, dict]:
    """("triton" | "vendor", predicted seconds of both) from the roofline model on `hw`.

    triton: one kernel; reads x, w, bias, residual, writes y; GEMM at TRITON_GEMM_EFFICIENCY of peak.
    vendor: the GEMM writes the [M, N] intermediate, the epilogue reads it back (+ bias, residual) and
    writes y: two launches and 2*M*N more elements moved, at full vendor GEMM throughput."""
    from fusion.costmodel.roofline import Cost

    hw = hw or default_profile()
    es = torch.tensor([], dtype=dtype).element_size()
    gdt = {torch.float16: "float16", torch.bfloat16: "bfloat16"}.get(dtype, "float32")
    fl = 2.0 * M * N * K
    ep_flops = M * N * (1 + (act is not None) * 8 + has_residual)
    ep_tr = M * N if act in ("gelu", "gelu_tanh", "silu") else 0
    inputs = (M * K + N * K + has_bias * N + has_residual * M * N) * es
    fused = Cost(bytes_read=inputs, bytes_written=M * N * es, flops=ep_flops,
                 gemm_flops=fl / TRITON_GEMM_EFFICIENCY, transcendentals=ep_tr, calls=1, gemm_dtype=gdt)
    gemm = Cost(bytes_read=(M * K + N * K) * es, bytes_written=M * N * es, gemm_flops=fl, calls=1,
                gemm_dtype=gdt)
    needs_epi = has_bias or has_residual or act not in (None, "none")
    epi = Cost(bytes_read=(M * N + has_bias * N + has_residual * M * N) * es, bytes_written=M * N * es,
               flops=ep_flops, transcendentals=ep_tr, calls=1) if needs_epi else Cost()
    t = {"triton": fused.time(hw), "vendor": gemm.time(hw) + (epi.time(hw) if needs_epi else 0.0)}
    return min(t, key=t.get), t


def linear_epilogue(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                    act: str | None = None, residual: torch.Tensor | None = None, hw=None,
                    strategy: str = "auto") -> torch.Tensor:
    """act(x @ w^T + bias) + residual, by the strategy the cost model predicts faster (or the one named)."""
    if strategy == "auto":
        M = x.numel() // x.shape[-1]
        strategy, _ = choose_strategy(M, w.shape[0], x.shape[-1], x.dtype, bias is not None,
                                      residual is not None, hw or default_profile(x.device), act)
    fn = triton_linear_epilogue if strategy == "triton" else vendor_linear_epilogue
    return fn(x, w, bias, act, residual)
