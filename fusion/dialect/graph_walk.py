"""One walk over an FX value's users, for the questions several passes ask of a value: does it reach the
graph output through views, is it used outside a kernel, does it feed a matrix product."""
from __future__ import annotations

from collections.abc import Callable

from torch import fx


def reaches(n: fx.Node, found: Callable[[fx.Node], bool], through: Callable[[fx.Node], bool]) -> bool:
    """True if some user of n, or of a user `through` accepts (transitively), satisfies `found`."""
    seen, stack = set(), [n]
    while stack:
        u = stack.pop()
        if u in seen:
            continue
        seen.add(u)
        for w in u.users:
            if found(w):
                return True
            if through(w):
                stack.append(w)
    return False
