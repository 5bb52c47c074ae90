"""The e-graph language: one sort `Tensor`, its constructors, and the shape/dtype functions.

Every constructor has an explicit egglog name (`egg_fn`) so the exported e-graph speaks the same
names as this file: `var`, `scalar`, `none`, `add`, `sub`, `mul`, `div`, `unary`, `reduce`,
`pow_`, `var_`, `mm`, `bmm`, `addmm`, `cast`, and the fused ops `softmax`, `log_softmax`, `layer_norm`, `rms_norm`,
`gelu`, `silu`, `glu`, `attention`; `where`; layout ops `view`, `expand`, `permute`, `unsqueeze`, `clone`;
logical ops (never extracted) `reshape_`, `transpose_`, `matmul`, `repeat_kv`.

Conventions (the inserter in `fusion.rewrite.insert` keeps them):
- leaves are `Tensor.var("fx_node_name")`; no tensor data ever enters the e-graph;
- Python scalars are `Tensor.scalar(f64)` (rank 0, they broadcast and do not change the dtype);
  only floating-point arithmetic is modelled, so an int scalar can be stored as a float;
- dims are `i64` normalised to be >= 0; a reduction is modelled only over a single dim;
- commutative ops are inserted with the scalar last, a leaf before a computed operand, else the
  earlier-defined operand first (`norm(x) * w` is inserted as `w * norm(x)`, `sigmoid(x) * x` as
  `x * sigmoid(x)`); there are no commutativity rules;
- `Tensor.none()` stands for an absent optional tensor (a fused op's weight or bias).

`shape` and `dtype` have no merge function: two different shapes for one e-class are an error
("Illegal merge attempted for function shape"), which is how a wrong rule shows itself.
Symbolic sizes are stored as ints that multiply as the sizes do (`fusion.dialect.values.size_id`:
`s0 * s1` is the product of the ints of s0 and s1), so equality of sizes is meaningful and the rules'
size arithmetic (the flattened batch `B * H`) holds for symbolic batch and sequence sizes too.
"""
from __future__ import annotations

from collections.abc import Iterable

from egglog import (
    Bool,
    BoolLike,
    EGraph,
    Expr,
    RewriteOrRule,
    String,
    StringLike,
    Vec,
    eq,
    f64,
    f64Like,
    function,
    i64,
    i64Like,
    method,
    rule,
    ruleset,
)


class Tensor(Expr, egg_sort="Tensor"):
    """A tensor-valued term. Operators read as the math they build."""

    @method(egg_fn="var")
    @classmethod
    def var(cls, name: StringLike) -> Tensor: ...

    @method(egg_fn="scalar")
    @classmethod
    def scalar(cls, value: f64Like) -> Tensor: ...

    @method(egg_fn="none")
    @classmethod
    def none(cls) -> Tensor: ...

    @method(egg_fn="add")
    def __add__(self, other: Tensor) -> Tensor: ...

    @method(egg_fn="sub")
    def __sub__(self, other: Tensor) -> Tensor: ...

    @method(egg_fn="mul")
    def __mul__(self, other: Tensor) -> Tensor: ...

    @method(egg_fn="div")
    def __truediv__(self, other: Tensor) -> Tensor: ...

    @method(egg_fn="pow_")
    def __pow__(self, exponent: f64Like) -> Tensor: ...


@function(egg_fn="unary")
def unary(op: StringLike, x: Tensor) -> Tensor: ...


@function(egg_fn="reduce")
def reduce(op: StringLike, x: Tensor, dim: i64Like, keepdim: BoolLike) -> Tensor: ...


@function(egg_fn="var_")
def variance(x: Tensor, dim: i64Like, correction: f64Like, keepdim: BoolLike) -> Tensor: ...


@function(egg_fn="mm")
def mm(a: Tensor, b: Tensor) -> Tensor: ...


@function(egg_fn="bmm")
def bmm(a: Tensor, b: Tensor) -> Tensor: ...


@function(egg_fn="addmm")
def addmm(bias: Tensor, a: Tensor, b: Tensor) -> Tensor: ...


# --- layout ops (value-preserving views; physical: they appear in FX graphs) ---------------------
@function(egg_fn="view")
def view(x: Tensor, shape: Vec[i64]) -> Tensor: ...              # aten.view/_unsafe_view/reshape (output shape, no -1)


@function(egg_fn="expand")
def expand(x: Tensor, shape: Vec[i64]) -> Tensor: ...            # aten.expand (output shape, no -1)


@function(egg_fn="permute")
def permute(x: Tensor, dims: Vec[i64]) -> Tensor: ...            # aten.permute (dims >= 0)


@function(egg_fn="unsqueeze")
def unsqueeze(x: Tensor, dim: i64Like) -> Tensor: ...


@function(egg_fn="cast")
def cast(x: Tensor, dtype: StringLike) -> Tensor: ...             # x converted to a float dtype ("bfloat16", ...), round to nearest


@function(egg_fn="clone")
def clone(x: Tensor) -> Tensor: ...                              # a copy (any memory format): same value


# --- logical ops: value semantics only, never extracted (cost LOGICAL_COST), consumed by fusions ---
@function(egg_fn="reshape_")
def reshape_(x: Tensor, shape: Vec[i64]) -> Tensor: ...          # row-major reshape, whatever x's strides


@function(egg_fn="transpose_")
def transpose_(x: Tensor) -> Tensor: ...                         # swap the last two dims


@function(egg_fn="matmul")
def matmul(a: Tensor, b: Tensor) -> Tensor: ...                  # [..., m, k] @ [..., k, n], equal batch dims


@function(egg_fn="repeat_kv")
def repeat_kv(x: Tensor, n_rep: i64Like) -> Tensor: ...          # [B, Hkv, L, D] -> [B, Hkv*n_rep, L, D], each head n_rep times


# --- fused ops (fusion/dialect/ops.py) -------------------------------------------------------------------
@function(egg_fn="softmax")
def softmax(x: Tensor, dim: i64Like) -> Tensor: ...


@function(egg_fn="log_softmax")
def log_softmax(x: Tensor, dim: i64Like) -> Tensor: ...


@function(egg_fn="layer_norm")
def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: f64Like) -> Tensor: ...


@function(egg_fn="rms_norm")
def rms_norm(x: Tensor, weight: Tensor, eps: f64Like) -> Tensor: ...


@function(egg_fn="gelu")
def gelu(x: Tensor, approximate: StringLike) -> Tensor: ...


@function(egg_fn="silu")
def silu(x: Tensor) -> Tensor: ...


@function(egg_fn="glu")
def glu(g: Tensor, u: Tensor, act: StringLike) -> Tensor: ...    # act(g) * u, act: "silu" | "gelu" | "gelu_tanh"


@function(egg_fn="where")
def where(cond: Tensor, a: Tensor, b: Tensor) -> Tensor: ...      # aten.where.self; cond is a bool leaf


@function(egg_fn="attention")
def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: f64Like, causal: BoolLike) -> Tensor: ...


# --- analyses: no merge, so a conflicting shape is an error, never a silent choice ----------------
@function(egg_fn="shape")
def shape(x: Tensor) -> Vec[i64]: ...


@function(egg_fn="dtype")
def dtype(x: Tensor) -> String: ...


@function(egg_fn="contig")
def contig(x: Tensor) -> Bool: ...        # only ever set true: x's physical forms are row-major contiguous


@function(egg_fn="fill_kind")
def fill_kind(x: Tensor) -> String: ...   # "neg_big": a constant 0-d leaf <= finfo(dtype).min (incl. -inf): a mask fill


# --- readable helpers for rules -------------------------------------------------------------------
def exp(x: Tensor) -> Tensor: return unary("exp", x)
def log(x: Tensor) -> Tensor: return unary("log", x)
def erf(x: Tensor) -> Tensor: return unary("erf", x)
def tanh(x: Tensor) -> Tensor: return unary("tanh", x)
def sigmoid(x: Tensor) -> Tensor: return unary("sigmoid", x)
def sqrt(x: Tensor) -> Tensor: return unary("sqrt", x)
def rsqrt(x: Tensor) -> Tensor: return unary("rsqrt", x)
def reciprocal(x: Tensor) -> Tensor: return unary("reciprocal", x)
def neg(x: Tensor) -> Tensor: return unary("neg", x)
def sum_(x: Tensor, dim: i64Like, keepdim: BoolLike) -> Tensor: return reduce("sum", x, dim, keepdim)
def mean(x: Tensor, dim: i64Like, keepdim: BoolLike) -> Tensor: return reduce("mean", x, dim, keepdim)
def amax(x: Tensor, dim: i64Like, keepdim: BoolLike) -> Tensor: return reduce("amax", x, dim, keepdim)
def c(value: f64Like) -> Tensor: return Tensor.scalar(value)  # a Python-scalar operand


TRUE = Bool(True)
NONE = Tensor.none()

#: unary ops the inserter models (FX name -> name in the e-graph is the same string)
UNARY_OPS = ("exp", "log", "erf", "tanh", "sigmoid", "sqrt", "rsqrt", "reciprocal", "neg", "relu", "abs")
#: reductions over one dim
REDUCE_OPS = ("sum", "mean", "amax", "amin")
#: fused ops, by e-graph name
FUSED = ("softmax", "log_softmax", "layer_norm", "rms_norm", "gelu", "silu", "glu", "attention")
#: layout ops: free (a view) except clone (a copy)
LAYOUT = ("view", "expand", "permute", "unsqueeze", "clone")
#: logical ops: equalities for rules to match through, never chosen by extraction
LOGICAL = ("reshape_", "transpose_", "matmul", "repeat_kv")


@ruleset
def language(n: String) -> Iterable[RewriteOrRule]:
    """Mentions every constructor and analysis; `declare` runs it for zero iterations so the
    low-level e-graph knows all names before a program text is loaded (see fusion.rewrite.insert)."""
    yield rule(Tensor.var(n), Tensor.none(), eq(shape(Tensor.var(n))).to(shape(Tensor.none())),
               eq(dtype(Tensor.var(n))).to(dtype(Tensor.none())),
               eq(fill_kind(Tensor.var(n))).to(fill_kind(Tensor.none())),
               eq(contig(Tensor.var(n))).to(contig(Tensor.none()))).then(Tensor.none())
    x = Tensor.var(n)
    for t in (x + x, x - x, x * x, x / x, x ** f64(2.0), unary(n, x), reduce(n, x, 0, TRUE), variance(x, 0, 0.0, TRUE),
              mm(x, x), bmm(x, x), addmm(x, x, x), softmax(x, 0), log_softmax(x, 0), layer_norm(x, x, x, 0.0),
              rms_norm(x, x, 0.0), gelu(x, n), silu(x), Tensor.scalar(0.0), view(x, Vec[i64](1)),
              expand(x, Vec[i64](1)), permute(x, Vec[i64](0)), unsqueeze(x, 0), clone(x), reshape_(x, Vec[i64](1)),
              transpose_(x), matmul(x, x), repeat_kv(x, 1), attention(x, x, x, x, 1.0, TRUE), where(x, x, x),
              glu(x, x, n), cast(x, n)):
        yield rule(t).then(t)


def declare(eg: EGraph) -> None:
    eg.run(0, ruleset=language)
