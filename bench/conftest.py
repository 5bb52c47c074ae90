"""bench/test_peers.py's report: the CPU and the caches, under pytest-benchmark's tables and in its JSON
(--benchmark-json: machine_info["fusion_bench"]). Only loaded when pytest collects bench/."""
from __future__ import annotations

import os

import pytest


def _lines() -> list[str]:
    from bench.peers import caches_line, cpu_line

    cold = os.environ.get("FUSION_BENCH_COLD", "") not in ("", "0")
    return [cpu_line(), caches_line(cold), f"threads: {os.environ.get('FUSION_BENCH_THREADS', '2')}"]


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_sep("-", "bench/test_peers.py machine")
    for line in _lines():
        terminalreporter.write_line(line)


@pytest.hookimpl(optionalhook=True)              # a pytest-benchmark hook: absent without it
def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["fusion_bench"] = _lines()
