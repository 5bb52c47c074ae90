"""pytest-benchmark suite: fusion and its peers on the HF models of bench/cases.py, side by side in one process.

    pip install -e ".[bench]"                                    # the peers + pytest-benchmark
    python -m pytest bench/test_peers.py --benchmark-only        # every model x variant (long: minutes each)
    python -m pytest bench/test_peers.py -k "bert and (eager or onnxruntime)" --benchmark-only
    python -m pytest bench/test_peers.py --benchmark-disable -q  # smoke: build + one call each, no timing

Not under tests/, so the default `pytest` run (testpaths = ["tests"]) never collects it. The variants are
bench/peers.py's build_variant (the same builders as `python -m bench.run --peers`). A peer that is not
installed is skipped with the reason; a variant that raises, or whose output is off eager's by more than
REL_TOL, is an xfail with the reason (a fusion or Inductor one fails outright). Each benchmark's extra_info
holds the relative error against eager, the compile time (build + first call), the CPU line and the caches.

Environment: FUSION_BENCH_ROUNDS (default 5 timed rounds after 1 warm-up round), FUSION_BENCH_THREADS
(default 2: torch's, ONNX Runtime's intra-op and OpenVINO's threads), FUSION_BENCH_COLD=1 (Inductor's on-disk
caches off for the session).
"""
from __future__ import annotations

import functools
import gc
import os
import time

import pytest

pytest.importorskip("pytest_benchmark")      # the `benchmark` fixture

import torch

from bench.cases import MODELS
from bench.peers import OWN, PEERS, PeerMissing, build_variant, caches_line, cpu_line, short
from bench.run import rel_err

MODEL_NAMES = ("bert", "gpt2", "llama")
VARIANTS = ("eager", "inductor", "inductor_freezing", "openvino", "onnxruntime", "fusion")
ROUNDS = int(os.environ.get("FUSION_BENCH_ROUNDS", "5"))
THREADS = int(os.environ.get("FUSION_BENCH_THREADS", "2"))
COLD = os.environ.get("FUSION_BENCH_COLD", "") not in ("", "0")
#: fp32 everywhere: more than this relative error against eager is a wrong result, not rounding
REL_TOL = 1e-3
assert set(VARIANTS) == set(OWN + PEERS)


@pytest.fixture(scope="module", autouse=True)
def _setup():
    torch.set_num_threads(THREADS)
    if COLD:
        import torch._inductor.config as ic

        with ic.patch(force_disable_caches=True):
            yield
    else:
        yield


@functools.lru_cache(maxsize=1)
def _case(name: str):
    """(model, inputs, eager output) of bench/cases.py's model `name` (the last one built stays cached)."""
    fn, inputs = next(c for c in MODELS if c.name == name).make()
    with torch.no_grad():
        return fn, inputs, fn(*inputs)


def _give_up(variant: str, model: str, reason: str):
    if variant in PEERS:
        pytest.xfail(f"{variant} failed on {model}: {reason}")
    pytest.fail(f"{variant} failed on {model}: {reason}")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("model", MODEL_NAMES)
def test_peer(benchmark, model, variant):
    fn, inputs, ref = _case(model)
    torch._dynamo.reset()
    gc.collect()
    benchmark.group = model
    benchmark.extra_info.update(cpu=cpu_line(), caches=caches_line(COLD), threads=THREADS)
    with torch.no_grad():
        t0 = time.perf_counter()
        try:
            f, out = build_variant(fn, inputs, variant, THREADS)
        except PeerMissing as e:
            pytest.skip(f"{variant}: {e}")
        except Exception as e:  # noqa: BLE001              # a peer that fails is reported, not hidden
            _give_up(variant, model, short(e))
        benchmark.extra_info["compile_s"] = time.perf_counter() - t0
        err = rel_err(out, ref)
        benchmark.extra_info["rel_err"] = err
        if getattr(f, "exporter", None):
            benchmark.extra_info["exporter"] = f.exporter
        if not err <= REL_TOL:
            _give_up(variant, model, f"relative error {err:.1e} against eager (> {REL_TOL:g})")
        benchmark.pedantic(f, args=inputs, rounds=ROUNDS, iterations=1, warmup_rounds=1)
