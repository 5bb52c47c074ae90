"""Per-op formula tables of the roofline model (fusion.costmodel.roofline uses them): which ATen ops are views,
pointwise (FLOPs and transcendentals per element, and which transcendental function), reductions,
creations, gathers/scatters, GEMMs, convolutions, attention. Leaf module: imports nothing of costmodel.
"""
from __future__ import annotations

import functools
import math
import operator


def op_name(target) -> tuple[str, str]:
    """(namespace, packet name) of an op: aten.add.Tensor -> ("aten", "add")."""
    try:
        if hasattr(target, "_schema"):
            ns, rest = target.name().split("::", 1)
            return ns, rest.split(".", 1)[0]
        q = getattr(target, "_qualified_op_name", None)
        if q:
            ns, rest = q.split("::", 1)
            return ns, rest
    except Exception:
        pass
    return "", getattr(target, "__name__", str(target))


VIEW_OPS = frozenset("""
view _unsafe_view reshape _reshape_alias permute expand expand_as t transpose numpy_T unsqueeze squeeze
slice select as_strided alias detach split split_with_sizes unbind chunk narrow view_as diagonal unfold
lift_fresh movedim flatten unflatten view_as_real view_as_complex real imag _reshape_copy
sym_size sym_numel sym_stride sym_storage_offset _assert_async _assert_scalar sym_constrain_range
sym_constrain_range_for_size _assert_tensor_metadata dim size stride
""".split())

# Pointwise: (FLOPs per output element, transcendentals per output element).
# Arithmetic, comparisons, selects: 1 FLOP. sqrt / rsqrt / reciprocal / div: 1 FLOP (vector units
# have them, at lower throughput, not modelled). exp / tanh / erf / log / sigmoid / sin / ...: 1
# transcendental each, plus the FLOPs around it.
_PW: dict[str, tuple[float, float]] = {}
for _n in """add sub mul div neg abs relu maximum minimum fmax fmin eq ne lt le gt ge logical_and logical_or
logical_not logical_xor bitwise_and bitwise_or bitwise_not bitwise_xor bitwise_left_shift
bitwise_right_shift __and__ __or__ __xor__ __lshift__ __rshift__ where masked_fill rsub sign sgn floor
ceil round trunc frac fmod remainder reciprocal sqrt rsqrt square clamp_min clamp_max threshold
threshold_backward copysign isnan isinf isfinite signbit heaviside floor_divide true_divide relu6
leaky_relu triu tril nan_to_num hypot xlogy""".split():
    _PW[_n] = (1.0, 0.0)
for _n in """clone _to_copy copy to contiguous lift_fresh_copy type_as _to_dim_order_copy alias_copy
view_copy permute_copy expand_copy t_copy transpose_copy unsqueeze_copy squeeze_copy slice_copy
select_copy _unsafe_view_copy convert_element_type repeat flip roll fill fill_ positive
masked_scatter constant_pad_nd pad""".split():
    _PW[_n] = (0.0, 0.0)                    # pure data movement
_PW.update({
    "clamp": (2, 0), "hardtanh": (2, 0), "addcmul": (2, 0), "addcdiv": (2, 0), "lerp": (3, 0),
    "hardsigmoid": (3, 0), "hardswish": (4, 0), "sigmoid_backward": (2, 0), "tanh_backward": (2, 0),
    "exp": (0, 1), "exp2": (0, 1), "expm1": (1, 1), "log": (0, 1), "log2": (0, 1), "log10": (0, 1),
    "log1p": (1, 1), "tanh": (0, 1), "erf": (0, 1), "erfc": (0, 1), "erfinv": (0, 1),
    "sin": (0, 1), "cos": (0, 1), "tan": (0, 1), "asin": (0, 1), "acos": (0, 1), "atan": (0, 1),
    "atan2": (0, 1), "sinh": (0, 1), "cosh": (0, 1), "asinh": (0, 1), "acosh": (0, 1), "atanh": (0, 1),
    "sigmoid": (2, 1),                      # 1 / (1 + exp(-x)): exp, add, div
    "logit": (2, 1), "softplus": (2, 2), "elu": (2, 1), "celu": (2, 1), "selu": (3, 1),
    "mish": (3, 3),                         # x * tanh(softplus(x)): exp, log1p, tanh
    "gelu": (4, 1),                         # 0.5*x*(1+erf(x/sqrt2)): 4 FLOPs + erf   (tanh form below)
    "silu": (3, 1),                         # x / (1 + exp(-x)): neg/add/div... 3 FLOPs + exp
    "gelu_quick": (4, 1),                   # fusion.gelu_quick: x / (1 + exp(-1.702 x)): 4 FLOPs + exp
    "swiglu": (4, 1), "geglu": (5, 1),      # fusion.swiglu / geglu: the activation and the product
    "gelu_backward": (8, 2),                # erf + exp (Gaussian pdf)
    "silu_backward": (5, 1),
    "native_dropout_backward": (2, 0),
    "rand_like": (4, 0), "randn_like": (6, 1), "bernoulli": (5, 0),
})
_GELU_TANH = (7, 1)                         # 0.5*x*(1+tanh(sqrt(2/pi)*(x+0.044715x^3))): 7 FLOPs + tanh

# Reductions: FLOPs (and transcendentals) per INPUT element; read input, write the (small) output.
_RED: dict[str, tuple[float, float]] = {
    **{n: (1, 0) for n in """sum mean amax amin max min argmax argmin prod any all cumsum cumprod
    nansum count_nonzero aminmax cummax cummin""".split()},
    "var": (3, 0), "std": (3, 0), "var_mean": (3, 0), "std_mean": (3, 0),
    "norm": (2, 0), "linalg_vector_norm": (2, 0), "logsumexp": (3, 1),
}

# Ops that only create an output: write it (no reads). empty*: nothing is written.
_CREATE = frozenset("""full zeros ones zeros_like ones_like full_like new_zeros new_ones new_full arange
scalar_tensor linspace eye _efficientzerotensor rand randn randint randperm""".split())
_EMPTY = frozenset("empty empty_like new_empty empty_strided empty_permuted".split())

# Gathers: read the gathered elements (output-sized) + indices, write the output.
_GATHER = frozenset("embedding index_select gather index _unsafe_index take".split())
# Scatters: read self + source (+ indices), write output.
_SCATTER = frozenset("""scatter scatter_add scatter_reduce index_put _unsafe_index_put index_add
index_copy slice_scatter select_scatter diagonal_scatter as_strided_scatter embedding_dense_backward
masked_scatter_backward""".split())
_CONCAT = frozenset("cat stack concat concatenate hstack vstack".split())

_GEMM = frozenset("""mm bmm addmm baddbmm addbmm matmul linear _int_mm _weight_int8pack_mm _scaled_mm
mv addmv dot vdot _linear_pointwise stacked_linear stacked_linear_impl""".split())
_CONV = frozenset("convolution conv1d conv2d conv3d _convolution conv_transpose1d conv_transpose2d".split())
_SDPA = frozenset("""scaled_dot_product_attention _scaled_dot_product_flash_attention_for_cpu
_scaled_dot_product_flash_attention _scaled_dot_product_efficient_attention
_scaled_dot_product_cudnn_attention _scaled_dot_product_attention_math
_scaled_dot_product_fused_attention_overrideable sdpa attention decomposed_attention""".split())


def is_view_target(target) -> bool:
    try:
        return _is_view_cached(target)
    except TypeError:                       # unhashable target
        return _is_view_uncached(target)


@functools.lru_cache(maxsize=4096)
def _is_view_cached(target) -> bool:
    return _is_view_uncached(target)


def _is_view_uncached(target) -> bool:
    if target is operator.getitem:
        return True
    ns, name = op_name(target)
    if name in VIEW_OPS:
        return True
    if ns and getattr(target, "is_view", False):
        return True
    return False

# Which transcendental function an op evaluates, keyed as in hw.transcendental_rates. "gelu", "silu" and
# "softmax" (and "sigmoid") are ATen's own vectorised approximations inside those ops (measured per op: they are faster
# than torch.erf / torch.exp); BASE_FN says which plain function each is, for profiles without the op
# rate and for generated kernels (which call glibc's expf/erff/tanhf). Ops not listed: harmonic mean.
TRANSCENDENTAL_FN: dict[str, str] = {
    **{n: "exp" for n in """exp exp2 expm1 silu_backward elu celu selu softplus mish logit
    logsumexp _log_softmax log_softmax special_log_softmax _log_softmax_backward_data randn_like""".split()},
    **{n: "softmax" for n in "_softmax softmax _safe_softmax special_softmax".split()},
    "silu": "silu", "gelu": "gelu", "sigmoid": "sigmoid", "gelu_quick": "exp", "swiglu": "silu", "geglu": "gelu",
    **{n: "tanh" for n in "tanh tanh_backward".split()},
    **{n: "erf" for n in "erf erfc erfinv gelu_backward".split()},
}
BASE_FN: dict[str, str] = {"gelu": "erf", "silu": "exp", "sigmoid": "exp", "softmax": "exp"}


def gemm_rate(curve, flops_per_gemm: float, peak: float) -> float:
    """FLOP/s of one GEMM of `flops_per_gemm` FLOPs: log-log interpolation in the measured
    [[flops, FLOP/s], ...] points (ascending), extrapolated flat below the smallest point's rate scaled
    by size (fixed cost dominates), the peak above the largest."""
    pts = sorted((float(f), float(r)) for f, r in (curve or []) if f > 0 and r > 0)
    if not pts or flops_per_gemm <= 0:
        return peak
    if flops_per_gemm >= pts[-1][0]:
        return max(pts[-1][1], peak)
    if flops_per_gemm <= pts[0][0]:
        return pts[0][1] * flops_per_gemm / pts[0][0]       # below the smallest size: constant time
    for (f0, r0), (f1, r1) in zip(pts, pts[1:]):
        if f0 <= flops_per_gemm <= f1:
            w = math.log(flops_per_gemm / f0) / math.log(f1 / f0)
            return math.exp(math.log(r0) + w * math.log(r1 / r0))
    return peak
