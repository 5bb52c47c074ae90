"""`fusion.Config`: every knob of the optimizer, passed explicitly (never read from module globals)."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Mapping

APPROXIMATIONS = frozenset({"int8", "bf16", "relu_attention"})


def resolve_cxx(cxx: str | None = None) -> str:
    """The C++ compiler to run: `cxx` (Config.cxx) when given, else $FUSION_CXX, else g++. Read when a
    compile happens (never at import), so setting $FUSION_CXX later in the process takes effect."""
    return cxx or os.environ.get("FUSION_CXX") or "g++"


class ConfigError(ValueError):
    """A `fusion.Config` (or an option dict) that cannot be used, with what to do about it."""


@dataclass(frozen=True)
class Config:
    """Options for `fusion.optimize` and `torch.compile(backend="fusion", options=...)`.

    approximate:   opt-in approximate rewrites, a subset of {"int8", "bf16", "relu_attention"}.
                   Exact mode (the default, empty set) never changes results beyond fp32 rounding.
    tolerance:     largest relative error the approximate program may show on the example inputs.
    max_iterations / max_enodes / time_limit_s:  equality-saturation limits; hitting one keeps the
                   best graph found so far (never an error).
    extract_time_limit_s: time limit of the ILP extraction (greedy result used past it).
    rewrites:      run the e-graph stage at all (False: schedule and codegen the captured graph as is).
    disable_rules: rule families to switch off by name, e.g. {"softmax"} (ablations).
    codegen:       "auto" (C++ on CPU, Triton on CUDA), "cpp", "triton" or "aten" (no generated kernels).
    num_threads:   threads for generated CPU kernels; None = torch.get_num_threads() at call time.
    cache_dir:     where compiled kernels and profiles live; None = $FUSION_CACHE_DIR or ~/.cache/fusion.
    cache_limit_mb: size limit of that directory, least recently used entries evicted past it
                   (fusion/store/bounded.py); None = $FUSION_CACHE_LIMIT_MB or 2048.
    cxx:           C++ compiler for generated CPU kernels; None = $FUSION_CXX or g++ (resolved when used,
                   never at import: `resolve_cxx`).
    fallback:      on an internal failure run the original graph with one warning (True) or raise (False).
    verbose:       print each pass and its timing.
    tune:          time what the roofline cannot settle (which GEMM library runs each fp32 CPU product) on the
                   program's own shapes at compile time, and keep the result in the tuning cache
                   (<cache>/tuning/<CPU identity>: shared by every process and model on this machine); False:
                   the calibrated profile's rates decide (fusion/costmodel/tuning.py, fusion/passes/gemm.py).
    tune_budget_s: seconds of such measuring one compiled graph may spend (shapes already in the tuning cache
                   cost nothing); past it the profile decides.
    structural_cache: look the module up in the structural cache before capturing it (fusion/store/structural.py):
                   the same architecture optimized before, with any weights, skips torch.export, rewriting
                   and lowering. The key is the module's computation traced on fake tensors, never weights.
                   Under torch.compile it also turns on the warm path for inference graphs Dynamo compiled
                   before (fusion/store/dynamo_cache.py: keyed by the Dynamo graph's code; skips AOTAutograd).
    """

    approximate: frozenset[str] = frozenset()
    tolerance: float = 1e-2
    max_iterations: int = 12
    max_enodes: int = 200_000
    time_limit_s: float = 5.0
    extract_time_limit_s: float = 2.0
    rewrites: bool = True
    disable_rules: frozenset[str] = frozenset()
    codegen: str = "auto"
    num_threads: int | None = None
    cache_dir: str | None = None
    cache_limit_mb: float | None = None
    cxx: str | None = None
    fallback: bool = True
    verbose: bool = False
    structural_cache: bool = True
    tune: bool = True
    tune_budget_s: float = 10.0

    def __post_init__(self) -> None:
        approx = self.approximate
        if isinstance(approx, str):
            approx = {approx}
        if not isinstance(approx, (set, frozenset, list, tuple)):
            raise ConfigError(
                f"Config.approximate must be a set of names from {sorted(APPROXIMATIONS)}, "
                f"got {type(approx).__name__}"
            )
        unknown = set(approx) - APPROXIMATIONS
        if unknown:
            raise ConfigError(
                f"unknown approximate rewrite(s) {sorted(unknown)}; choose from {sorted(APPROXIMATIONS)}"
            )
        object.__setattr__(self, "approximate", frozenset(approx))
        object.__setattr__(self, "disable_rules", frozenset(self.disable_rules))
        if not isinstance(self.tolerance, (int, float)) or not (0.0 < float(self.tolerance) < 1.0):
            raise ConfigError(f"Config.tolerance must be a number in (0, 1), got {self.tolerance!r}")
        for name in ("max_iterations", "max_enodes"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ConfigError(f"Config.{name} must be a non-negative int, got {v!r}")
        for name in ("time_limit_s", "extract_time_limit_s"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v <= 0:
                raise ConfigError(f"Config.{name} must be a positive number of seconds, got {v!r}")
        if self.codegen not in ("auto", "cpp", "triton", "aten"):
            raise ConfigError(f"Config.codegen must be one of auto, cpp, triton, aten; got {self.codegen!r}")
        if self.num_threads is not None and (not isinstance(self.num_threads, int) or self.num_threads < 1):
            raise ConfigError(f"Config.num_threads must be a positive int or None, got {self.num_threads!r}")
        if self.cache_limit_mb is not None and (isinstance(self.cache_limit_mb, bool) or not isinstance(
                self.cache_limit_mb, (int, float)) or self.cache_limit_mb <= 0):
            raise ConfigError(f"Config.cache_limit_mb must be a positive number of MB or None, got {self.cache_limit_mb!r}")
        if self.cxx is not None and (not isinstance(self.cxx, str) or not self.cxx):
            raise ConfigError(f"Config.cxx must be a compiler command (a non-empty str) or None, got {self.cxx!r}")
        if not isinstance(self.structural_cache, bool):
            raise ConfigError(f"Config.structural_cache must be True or False, got {self.structural_cache!r}")
        if not isinstance(self.tune, bool):
            raise ConfigError(f"Config.tune must be True or False, got {self.tune!r}")
        if not isinstance(self.tune_budget_s, (int, float)) or isinstance(self.tune_budget_s, bool) \
                or self.tune_budget_s < 0:
            raise ConfigError(f"Config.tune_budget_s must be a number of seconds >= 0, got {self.tune_budget_s!r}")

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | "Config" | None) -> "Config":
        """Build a Config from `torch.compile(..., options={...})`; unknown keys are an error."""
        if options is None:
            return cls()
        if isinstance(options, Config):
            return options
        if not isinstance(options, Mapping):
            raise ConfigError(f"options must be a dict of Config fields, got {type(options).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(options) - known
        if unknown:
            raise ConfigError(
                f"unknown fusion option(s) {sorted(unknown)}; valid options are {sorted(known)}"
            )
        return cls(**dict(options))

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)

    def key(self) -> str:
        """A stable string for cache keys."""
        parts = []
        for f in dataclasses.fields(self):
            if f.name in ("verbose", "cache_dir", "cache_limit_mb", "fallback", "structural_cache", "tune_budget_s"):  # never change the program
                continue
            v = getattr(self, f.name)
            if f.name == "cxx":   # the compiler that will run: None and its resolved name key the same
                v = resolve_cxx(v)
            if isinstance(v, frozenset):
                v = sorted(v)
            parts.append(f"{f.name}={v!r}")
        return ";".join(parts)
