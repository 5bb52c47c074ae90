"""Op sweep: every float32 CPU sample of every OpInfo in `op_db`, through `torch.compile(backend="fusion")`,
compared with eager.

Per sample the outcome is one of
    pass      compiled result equals eager (op-suited tolerance, NaN == NaN, mutated inputs too)
    mismatch  compiled result differs from eager, while backend="aot_eager" agrees with eager
    crash     compiling/running through fusion raised, while eager and backend="aot_eager" do not
    skip      not ours to judge: eager raises, the op is random or nondeterministic, Dynamo traced no graph
              that reached our backend (graph break), or Dynamo/AOTAutograd themselves fail or disagree
              (backend="aot_eager" shows the same failure)
A sample that passed after a FusionFallbackWarning is also counted under `fallback` (right result, a stage
was skipped).

    pytest tests/test_opsweep.py                 # the fast subset (~60 ops, first 2 samples each)
    pytest -m slow tests/test_opsweep.py         # the full sweep ($OPSWEEP_MAX_SAMPLES caps samples per op)
    python tests/test_opsweep.py --full [--max-samples N] [--shard I/N] [--json out.json]
    python tests/test_opsweep.py --op nn.functional.gelu [--sample 3]   # one op (one sample), with details
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import sys
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

if __name__ == "__main__":  # script mode: use this checkout's packages, as pytest run from the repo root does
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest
import torch
import torch.utils._pytree as pytree
from torch.testing._internal.common_methods_invocations import op_db

from fusion.errors import FusionFallbackWarning
from fusion.pipeline import RECENT

SAMPLE_TIMEOUT_S = 120

# Ops whose result depends on the RNG or on uninitialized memory (besides those detected by running eager twice).
RANDOM_OPS = {
    "bernoulli", "cauchy", "exponential", "geometric", "log_normal", "multinomial", "normal", "uniform",
    "rand_like", "randn_like", "randint_like", "randint", "randn", "rand", "nn.functional.rrelu",
    "nn.functional.dropout", "nn.functional.dropout2d", "nn.functional.dropout3d", "nn.functional.alpha_dropout",
    "nn.functional.feature_alpha_dropout", "nn.functional.fractional_max_pool2d", "nn.functional.fractional_max_pool3d",
    "empty", "empty_like", "empty_strided", "empty_permuted", "new_empty", "new_empty_strided",
}

# The fast subset run by default: pointwise, reductions, softmax, norms, matmuls, views, select/fill,
# cat/stack, indexing -- the ops the rewrite rules and the kernel generator care about.
FAST_OPS = [
    # pointwise
    "add", "sub", "mul", "div.no_rounding_mode", "neg", "abs", "exp", "log", "sqrt", "rsqrt", "tanh",
    "sigmoid", "erf", "pow", "reciprocal", "clamp", "maximum", "where", "masked_fill", "addcmul",
    "nn.functional.relu", "nn.functional.gelu", "nn.functional.silu", "nn.functional.leaky_relu",
    # reductions
    "sum", "mean", "amax", "amin", "var", "std", "prod", "argmax", "logsumexp", "cumsum",
    # softmax family
    "softmax", "log_softmax", "nn.functional.softmin",
    # norms
    "nn.functional.layer_norm", "nn.functional.rms_norm", "nn.functional.batch_norm", "nn.functional.group_norm",
    "nn.functional.normalize", "linalg.vector_norm",
    # matmuls / attention
    "matmul", "mm", "bmm", "addmm", "baddbmm", "nn.functional.linear", "einsum",
    "nn.functional.scaled_dot_product_attention",
    # views and layout
    "view", "reshape", "transpose", "permute", "unsqueeze", "squeeze", "expand", "flatten", "narrow",
    "contiguous", "t",
    # cat / stack / indexing
    "cat", "stack", "index_select", "gather", "__getitem__", "index_put", "scatter",
]
FAST_SAMPLES = 2


def op_id(op) -> str:
    return op.name + (f".{op.variant_test_name}" if op.variant_test_name else "")


OPS = {op_id(op): op for op in op_db}


# ----------------------------------------------------------------------------------------------
# comparing results


def tolerances(op, dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol relative to max|eager|) for an op's results in `dtype`."""
    if dtype in (torch.float16, torch.bfloat16):
        return 1e-2, 1e-2
    name = op.name
    if name.startswith(("linalg.", "cholesky", "lu", "svd", "pinverse", "inverse", "det", "logdet", "slogdet",
                        "matrix_exp", "triangular_solve", "ormqr", "geqrf", "qr", "eig", "symeig", "lstsq")):
        return 1e-3, 1e-4  # ill-conditioned by nature; only a grossly wrong answer is ours
    return 1e-4, 1e-5


def _max_abs_finite(t: torch.Tensor) -> float:
    if t.numel() == 0 or t.is_sparse or t.layout != torch.strided:
        return 1.0
    v = t.detach().abs().double()
    v = v[torch.isfinite(v)]
    return float(v.max()) if v.numel() else 1.0


def compare(out: Any, ref: Any, op=None) -> str | None:
    """None if `out` matches `ref` (tensors: dtype, shape, values with NaN == NaN), else what differs."""
    lo, so = pytree.tree_flatten(out)
    lr, sr = pytree.tree_flatten(ref)
    if so != sr:
        return f"output structure {so} != {sr}"
    for i, (a, b) in enumerate(zip(lo, lr)):
        if isinstance(b, torch.Tensor):
            if not isinstance(a, torch.Tensor):
                return f"output {i}: {type(a).__name__} instead of a tensor"
            if a.dtype != b.dtype or a.shape != b.shape:
                return f"output {i}: {a.dtype}{list(a.shape)} != eager {b.dtype}{list(b.shape)}"
            if b.is_floating_point() or b.is_complex():
                rtol, atol = tolerances(op, b.dtype) if op is not None else (1e-4, 1e-5)
                atol *= max(1.0, _max_abs_finite(b))
                try:
                    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, equal_nan=True)
                except AssertionError as e:
                    return f"output {i}: " + " ".join(str(e).split("\n")[:4])
            elif not torch.equal(a.to_dense() if a.is_sparse else a, b.to_dense() if b.is_sparse else b):
                return f"output {i}: {b.dtype} values differ"
        elif isinstance(b, float) and isinstance(a, float) and math.isnan(a) and math.isnan(b):
            continue
        elif a != b:
            return f"output {i}: {a!r} != eager {b!r}"
    return None


def same(a: Any, b: Any) -> bool:
    """Bitwise-equal results (NaN == NaN): used to detect random / nondeterministic eager ops."""
    la, sa = pytree.tree_flatten(a)
    lb, sb = pytree.tree_flatten(b)
    if sa != sb:
        return False
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x.layout != torch.strided or y.layout != torch.strided:
                x, y = x.to_dense(), y.to_dense()
            if x.dtype == torch.complex32:  # few kernels exist for ComplexHalf
                x, y = x.to(torch.complex64), y.to(torch.complex64)
            try:
                torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)
            except AssertionError:
                return False
        elif type(x) is not type(y) or (x != y and not (isinstance(x, float) and math.isnan(x) and math.isnan(y))):
            return False
    return True


# ----------------------------------------------------------------------------------------------
# running one sample


def _clone(x: Any) -> Any:
    return pytree.tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, x)


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: int):
    if seconds <= 0 or not hasattr(signal, "SIGALRM") or os.name != "posix":
        yield
        return

    def handler(signum, frame):
        raise _Timeout(f"took more than {seconds} s")

    try:
        old = signal.signal(signal.SIGALRM, handler)
    except ValueError:  # not the main thread
        yield
        return
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        s = f"{str(x.dtype).replace('torch.', '')}{list(x.shape)}"
        if x.layout != torch.strided:
            return s + f"({x.layout})"
        if not x.is_contiguous() and x.numel() > 1:
            s += f"(stride={x.stride()})"
        return s
    if isinstance(x, (list, tuple)):
        inner = ", ".join(_describe(v) for v in x[:6]) + (", ..." if len(x) > 6 else "")
        return f"[{inner}]" if isinstance(x, list) else f"({inner})"
    r = repr(x)
    return r if len(r) <= 60 else r[:57] + "..."


def describe_sample(sample) -> str:
    parts = [_describe(sample.input)] + [_describe(a) for a in sample.args]
    parts += [f"{k}={_describe(v)}" for k, v in sample.kwargs.items()]
    return ", ".join(parts)


@dataclass
class Outcome:
    status: str          # pass | mismatch | crash | skip
    reason: str = ""     # for skip: why; for mismatch/crash: what
    fallback: bool = False


def _run_compiled(op, sample, backend: str, options: dict | None) -> tuple[Any, Any, list, bool]:
    """(output, inputs after the call, fusion fallback warnings, whether a graph reached the backend)."""
    torch._dynamo.reset()
    RECENT.clear()
    inputs = _clone((sample.input, sample.args, sample.kwargs))

    def fn(x, args, kwargs):
        return op.op(x, *args, **kwargs)

    compiled = torch.compile(fn, backend=backend, options=options) if options is not None else \
        torch.compile(fn, backend=backend)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(0)
        with _time_limit(SAMPLE_TIMEOUT_S):
            out = compiled(*inputs)
    ours = [w for w in caught if issubclass(w.category, FusionFallbackWarning)]
    return out, inputs, ours, bool(RECENT)


def run_sample(op, sample, options: dict | None = None) -> Outcome:
    """Judge one sample; `options` are fusion.Config fields (default: the default config, every stage)."""
    if op.name in RANDOM_OPS or op_id(op) in RANDOM_OPS or getattr(op, "has_nondeterministic_output", False):
        return Outcome("skip", "random")
    # eager, twice with one seed (nondeterminism) and once with another (randomness)
    results = []
    for seed in (0, 0, 1):
        inputs = _clone((sample.input, sample.args, sample.kwargs))
        torch.manual_seed(seed)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with _time_limit(SAMPLE_TIMEOUT_S):
                    results.append((op.op(inputs[0], *inputs[1], **inputs[2]), inputs))
        except _Timeout:
            return Outcome("skip", "eager timeout")
        except Exception as e:  # noqa: BLE001 - the op's own error: not ours to judge
            return Outcome("skip", f"eager raises {type(e).__name__}")
    (ref, ref_inputs), (ref2, _), (ref3, _) = results
    if not same(ref, ref2):
        return Outcome("skip", "nondeterministic")
    if not same(ref, ref3):
        return Outcome("skip", "random")

    try:
        out, inputs, fallbacks, compiled = _run_compiled(op, sample, "fusion", options)
        problem = compare(out, ref, op) or compare(inputs, ref_inputs, op)
        if problem is None:
            if not compiled:
                return Outcome("skip", "no graph reached the backend")
            return Outcome("pass", fallback=bool(fallbacks),
                           reason=" | ".join(sorted({str(w.message).split(";")[0][:200] for w in fallbacks})))
        status, what = "mismatch", problem
    except Exception as e:  # noqa: BLE001
        status, what = "crash", f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"

    # Is it ours? The same program through AOTAutograd with eager ATen (no fusion) tells.
    try:
        out, inputs, _, _ = _run_compiled(op, sample, "aot_eager", None)
        control = compare(out, ref, op) or compare(inputs, ref_inputs, op)
    except Exception as e:  # noqa: BLE001
        control = f"{type(e).__name__}"
    if control is not None:
        return Outcome("skip", f"aot_eager fails too ({status})")
    return Outcome(status, what)


# ----------------------------------------------------------------------------------------------
# sweeping


@dataclass
class OpResult:
    op: str
    counts: Counter = field(default_factory=Counter)
    skip_reasons: Counter = field(default_factory=Counter)
    failures: list = field(default_factory=list)   # (sample index, status, description, reason)
    seconds: float = 0.0


def samples_of(op, max_samples: int | None = None) -> list:
    torch.manual_seed(0)  # sample values are random: fix them so a failure's sample index reproduces it
    out = []
    for s in op.sample_inputs("cpu", torch.float32):
        out.append(s)
        if max_samples is not None and len(out) >= max_samples:
            break
    return out


def sweep_op(op, max_samples: int | None = None, options: dict | None = None, only: int | None = None) -> OpResult:
    res = OpResult(op_id(op))
    t0 = time.perf_counter()
    if torch.float32 not in op.supported_dtypes("cpu"):
        res.counts["skip"] += 1
        res.skip_reasons["no float32 on cpu"] += 1
        return res
    try:
        samples = samples_of(op, max_samples if only is None else only + 1)
    except Exception as e:  # noqa: BLE001
        res.counts["skip"] += 1
        res.skip_reasons[f"sample_inputs raises {type(e).__name__}"] += 1
        return res
    for i, s in enumerate(samples):
        if only is not None and i != only:
            continue
        o = run_sample(op, s, options)
        res.counts[o.status] += 1
        if o.status == "skip":
            res.skip_reasons[o.reason] += 1
        elif o.status in ("mismatch", "crash"):
            res.failures.append((i, o.status, describe_sample(s), o.reason))
        if o.fallback:
            res.counts["fallback"] += 1
            res.failures.append((i, "fallback", describe_sample(s), o.reason))
    torch._dynamo.reset()
    res.seconds = time.perf_counter() - t0
    return res


def repro(op_name: str, index: int) -> str:
    return (f"python tests/test_opsweep.py --op {op_name} --sample {index}   # or:\n"
            f"    op = OPS[{op_name!r}]; s = samples_of(op)[{index}]\n"
            f"    torch.compile(lambda x, a, k: op.op(x, *a, **k), backend='fusion')(s.input, s.args, s.kwargs)")


COLUMNS = ("pass", "mismatch", "crash", "skip", "fallback")


def format_table(results: list[OpResult], all_rows: bool = True) -> str:
    width = max([len(r.op) for r in results] + [10])
    lines = [f"{'op':<{width}} " + " ".join(f"{c:>8}" for c in COLUMNS) + "     s"]
    total = Counter()
    for r in results:
        total.update(r.counts)
        if all_rows or r.counts["mismatch"] or r.counts["crash"]:
            lines.append(f"{r.op:<{width}} " + " ".join(f"{r.counts[c]:>8}" for c in COLUMNS) + f" {r.seconds:5.1f}")
    lines.append(f"{'TOTAL (' + str(len(results)) + ' ops)':<{width}} " + " ".join(f"{total[c]:>8}" for c in COLUMNS))
    ops_failing = sum(1 for r in results if r.counts["mismatch"] or r.counts["crash"])
    lines.append(f"ops with a mismatch or crash: {ops_failing}")
    return "\n".join(lines)


def format_failures(results: list[OpResult]) -> str:
    lines = []
    for r in results:
        for i, status, desc, reason in r.failures:
            if status == "fallback":
                continue
            lines.append(f"{status.upper():8} {r.op} sample {i}: ({desc})\n    {reason}\n    repro: {repro(r.op, i)}")
    return "\n".join(lines) or "no mismatches or crashes"


def format_skips(results: list[OpResult]) -> str:
    reasons = Counter()
    for r in results:
        reasons.update(r.skip_reasons)
    return "\n".join(f"{n:6} {why}" for why, n in reasons.most_common())


# ----------------------------------------------------------------------------------------------
# pytest


@pytest.mark.parametrize("name", FAST_OPS)
def test_fast_op_subset(name):
    assert name in OPS, f"{name} is not in op_db (renamed?)"
    res = sweep_op(OPS[name], max_samples=FAST_SAMPLES)
    bad = [f for f in res.failures if f[1] in ("mismatch", "crash")]
    assert not bad, "\n".join(f"{s} sample {i} ({d}): {why}" for i, s, d, why in bad)
    if res.counts["pass"] == 0:
        pytest.skip(f"no sample of {name} could be judged: {dict(res.skip_reasons)}")


def test_sweep_reports_wrong_results_and_crashes(monkeypatch):
    """The harness itself: a backend that computes a wrong graph, or raises, must be reported as such."""
    from fusion import pipeline

    op = OPS["exp"]
    sample = samples_of(op, 1)[0]
    assert run_sample(op, sample).status == "pass"
    real_normalize = pipeline.normalize

    def wrong_normalize(gm):  # exp(x) -> expm1(x): off by one everywhere
        for node in gm.graph.nodes:
            if node.target is torch.ops.aten.exp.default:
                node.target = torch.ops.aten.expm1.default
        gm.recompile()
        return real_normalize(gm)

    monkeypatch.setattr(pipeline, "normalize", wrong_normalize)
    assert run_sample(op, sample).status == "mismatch"

    def broken_compile(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(pipeline, "compile_graph", broken_compile)
    o = run_sample(op, sample)
    assert o.status == "crash" and "injected" in o.reason
    monkeypatch.undo()
    torch._dynamo.reset()
    assert compare(torch.tensor([float("nan"), 1.0]), torch.tensor([float("nan"), 1.0])) is None
    assert compare(torch.tensor([float("nan"), 1.0]), torch.tensor([0.0, 1.0])) is not None
    assert compare(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.001])) is not None


@pytest.mark.slow
def test_full_sweep():
    """Every op of op_db, every float32 CPU sample ($OPSWEEP_MAX_SAMPLES caps the samples per op)."""
    cap = os.environ.get("OPSWEEP_MAX_SAMPLES")
    results = [sweep_op(op, int(cap) if cap else None) for op in op_db]
    print("\n" + format_table(results, all_rows=False))
    print(format_failures(results))
    bad = [(r.op, f) for r in results for f in r.failures if f[1] in ("mismatch", "crash")]
    assert not bad, format_failures(results)


# ----------------------------------------------------------------------------------------------
# script mode


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="every op of op_db (default: the fast subset)")
    p.add_argument("--op", action="append", help="only this op (op_db name[.variant]); repeatable")
    p.add_argument("--sample", type=int, help="with --op: only this sample index")
    p.add_argument("--max-samples", type=int, default=None, help="samples per op (default: all; fast subset: 2)")
    p.add_argument("--shard", default="0/1", help="I/N: run every N-th op starting at I")
    p.add_argument("--json", help="write the per-op results here")
    p.add_argument("--all-rows", action="store_true", help="print every op's row, not only failing ones")
    a = p.parse_args(argv)

    if a.op:
        unknown = [n for n in a.op if n not in OPS]
        if unknown:
            p.error(f"unknown op(s) {unknown}")
        ops = [OPS[n] for n in a.op]
    elif a.full:
        ops = list(op_db)
    else:
        ops = [OPS[n] for n in FAST_OPS]
        a.max_samples = a.max_samples or FAST_SAMPLES
    i, n = (int(v) for v in a.shard.split("/"))
    ops = ops[i::n]
    print(f"{len(ops)} ops", flush=True)
    warnings.filterwarnings("ignore")
    torch._logging.set_logs(dynamo=logging.ERROR, aot=logging.ERROR)
    results = []
    t0 = time.perf_counter()
    for k, op in enumerate(ops):
        try:
            r = sweep_op(op, a.max_samples, only=a.sample)
        except Exception:  # noqa: BLE001 - the harness must finish the sweep
            r = OpResult(op_id(op))
            r.counts["crash"] += 1
            r.failures.append((-1, "crash", "harness", traceback.format_exc(limit=3)))
        results.append(r)
        flag = " <-- " + ",".join(f"{c}={r.counts[c]}" for c in ("mismatch", "crash") if r.counts[c]) \
            if (r.counts["mismatch"] or r.counts["crash"]) else ""
        print(f"[{k + 1}/{len(ops)} {time.perf_counter() - t0:6.0f}s] {r.op}: "
              + " ".join(f"{c}={r.counts[c]}" for c in COLUMNS if r.counts[c]) + flag, flush=True)
    print("\n" + format_table(results, all_rows=a.all_rows or bool(a.op)))
    print("\nskip reasons:\n" + format_skips(results))
    print("\nfailures:\n" + format_failures(results))
    fb = Counter(m for r in results for f in r.failures if f[1] == "fallback" for m in f[3].split(" | "))
    if fb:
        print(f"\nfallback warnings (samples that passed after a stage fell back): {sum(fb.values())}")
        for why, k in fb.most_common(30):
            print(f"  {k:6} {why}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump([{"op": r.op, "counts": dict(r.counts), "skips": dict(r.skip_reasons),
                        "failures": r.failures, "seconds": r.seconds} for r in results], f, indent=1)
    print(f"\n{time.perf_counter() - t0:.0f} s")
    return 1 if any(r.counts["mismatch"] or r.counts["crash"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
