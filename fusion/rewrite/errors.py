"""The one error the rewrite stage raises (the driver catches it and keeps the original graph)."""
from __future__ import annotations


class RewriteError(RuntimeError):
    """A failure in one stage of `rewrites.rewrite`, naming the stage and (if known) the FX node."""

    def __init__(self, stage: str, message: str, node: str | None = None) -> None:
        self.stage, self.node = stage, node
        where = f" at node {node!r}" if node else ""
        super().__init__(f"rewrite stage {stage!r}{where}: {message}")
