"""Values of the dialect's graphs: a node's FakeTensor, and sizes that may be symbolic.

One answer everywhere for a size: the scheduler, the cost model and the approximate stage all size a
symbolic dim with `hint` (its example value under torch.compile's dynamic shapes; `UNKNOWN_SIZE` for a
size with no example, such as an unbacked one), so they never price and schedule one shape differently.
None of these add a guard.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import fx

aten = torch.ops.aten

#: the size taken for a symbolic dim without an example value (unbacked): a typical short sequence
UNKNOWN_SIZE = 128


def hint(d: Any, default: int = UNKNOWN_SIZE) -> int:
    """A size as an int: ints as they are, SymInts by their example value, anything else `default`."""
    if isinstance(d, int):
        return d
    node = getattr(d, "node", None)
    if node is None:
        try:
            return int(d)
        except (TypeError, ValueError):
            return default
    try:
        if getattr(node, "is_constant", lambda: False)():
            return int(node.maybe_as_int())
        if getattr(node, "hint", None) is not None:
            return int(node.hint)
        env = getattr(node, "shape_env", None)
        h = env.size_hint(node.expr, allow_none=True) if env is not None else None
        return int(h) if h is not None else default
    except Exception:  # noqa: BLE001 - an expression the shape env cannot size
        return default


#: Symbolic sizes in the rewrite e-graph are ints that multiply as the sizes do: symbol `s<k>` stands for
#: -(SYM_UNIT * the k-th prime) and an expression of symbols (`s0 * s1`, `s1 + 1`) for its value there, so
#: the rules' size arithmetic (`B * H` of a flattened batch) meets the size export wrote (`s0 * 4`).
#: A size is symbolic when it is negative or a non-zero multiple of SYM_UNIT (a prime no real size is a
#: multiple of in practice); three symbols multiplied overflow i64, where egglog's arithmetic fails and the
#: rule does not match.
SYM_UNIT = 1_048_573


def _primes(n: int) -> list[int]:
    out, k = [], 2
    while len(out) < n:
        if all(k % p for p in out if p * p <= k):
            out.append(k)
        k += 1
    return out


_PRIMES = _primes(4096)


def size_id(d: Any) -> int | None:
    """The e-graph int for a size: an int as it is; a SymInt of `s<k>` symbols by its value at
    s<k> = -(SYM_UNIT * prime k); None for one the e-graph cannot stand for (unbacked, non-polynomial)."""
    if isinstance(d, int):
        return d
    import sympy

    expr = getattr(getattr(d, "node", None), "expr", None)
    if expr is None:
        return None
    if not _polynomial(expr):   # FloorDiv, Mod, Min...: their value at the stand-ins is no size of theirs
        return None
    subs = {}
    for sym in expr.free_symbols:
        name = str(sym)
        if not (name.startswith("s") and name[1:].isdigit() and int(name[1:]) < len(_PRIMES)):
            return None
        subs[sym] = sympy.Integer(-SYM_UNIT * _PRIMES[int(name[1:])])
    try:
        value = expr.xreplace(subs)
    except (TypeError, ValueError, AttributeError):
        return None
    if not getattr(value, "is_Integer", False):
        return None
    value = int(value)
    # a symbolic size must stay recognisably symbolic (s1 - s1 + 3 is folded by sympy before it gets here)
    return value if not expr.free_symbols or is_symbolic_id(value) else None


def _polynomial(expr: Any) -> bool:
    """Whether a sympy size expression is built only of symbols, integers, +, * and non-negative integer powers."""
    if expr.is_Symbol or expr.is_Integer:
        return True
    if expr.is_Add or expr.is_Mul:
        return all(_polynomial(a) for a in expr.args)
    if expr.is_Pow:
        base, e = expr.args
        return bool(e.is_Integer) and int(e) >= 0 and _polynomial(base)
    return False


def is_symbolic_id(d: int) -> bool:
    """Whether an e-graph size stands for a symbolic one (see SYM_UNIT)."""
    return d < 0 or (d != 0 and d % SYM_UNIT == 0)


def _key(d: Any) -> Any:
    if isinstance(d, torch.SymInt):
        return ("sym", str(d.node.expr))
    return ("int", int(d))


def same_dim(a: Any, b: Any) -> bool:
    return _key(a) == _key(b)


def shape_key(shape: Any) -> tuple:
    """A hashable, comparable form of a shape whose sizes may be symbolic (a SymInt is not hashable)."""
    return tuple(_key(d) for d in shape)


def same_shape(a, b) -> bool:
    return len(a) == len(b) and all(same_dim(x, y) for x, y in zip(a, b))


def is_one(d: Any) -> bool:
    return _key(d) == ("int", 1)


def broadcastable(s, target) -> bool:
    """Right-aligned broadcasting of shape s to target, without growing target."""
    if len(s) > len(target):
        return False
    off = len(target) - len(s)
    return all(is_one(x) or same_dim(x, target[off + i]) for i, x in enumerate(s))


def tval(n: Any):
    """The FakeTensor of a node (output 0 for native_layer_norm), or None."""
    if not isinstance(n, fx.Node):
        return None
    v = n.meta.get("val")
    if n.target is aten.native_layer_norm.default and isinstance(v, (tuple, list)):
        v = v[0]
    return v if isinstance(v, torch.Tensor) else None
