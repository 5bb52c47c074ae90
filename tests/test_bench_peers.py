"""bench/peers.py and bench/run.py's peer columns, without a model or a peer runtime: the CPU header line, the
--peers selection, and a peer that is missing or raises is reported "failed: ..." in its column (never dropped)."""
from __future__ import annotations

import sys

import torch

from bench import peers, run
from bench.cases import Case

INTEL = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512_vnni amx_tile

processor\t: 1
vendor_id\t: SomethingElse
"""
OLD_AMD = """vendor_id\t: AuthenticAMD
cpu family\t: 23
model\t\t: 49
model name\t: AMD EPYC 7R32
flags\t\t: fpu sse2 avx avx2 fma
"""


def test_cpu_line_names_vendor_family_model_and_avx512():
    line = peers.cpu_line(peers.cpu_info(INTEL))
    assert line.startswith("CPU: Intel(R) Xeon(R) Platinum 8480+ (GenuineIntel, family 6, model 143), ")
    assert line.endswith("AVX-512: yes (avx512_vnni, avx512bw, avx512f)")     # the first processor's flags only
    assert peers.cpu_line(peers.cpu_info(OLD_AMD)).endswith("AVX-512: no")
    assert "family ?" in peers.cpu_line(peers.cpu_info(""))                   # no /proc/cpuinfo: still a line


def test_caches_line_says_cold_or_warm():
    assert "compile cold" in peers.caches_line(True) and "compile warm" in peers.caches_line(False)


def test_peers_flag_adds_the_peers_to_the_default_set():
    ap = run._parser()
    assert run._selection(ap, ap.parse_args(["--only", "softmax"]))[0] == ["eager", "inductor", "fusion"]
    variants, _ = run._selection(ap, ap.parse_args(["--only", "softmax", "--peers"]))
    assert variants == ["eager", "inductor", "fusion", "inductor_freezing", "openvino", "onnxruntime"]
    variants, _ = run._selection(ap, ap.parse_args(["--only", "softmax", "--variants", "eager,onnxruntime"]))
    assert variants == ["eager", "onnxruntime"]


def test_a_missing_or_failing_peer_is_reported_failed(monkeypatch):
    case = Case("tiny", "micro", "relu of 8 floats", lambda: (torch.relu, (torch.randn(8),)))
    args = run._parser().parse_args(["--repeat", "2", "--warmup", "0"])
    monkeypatch.setitem(sys.modules, "onnxruntime", None)                     # not installed
    real = run.build_variant

    def build(fn, inputs, variant, threads):
        if variant == "openvino":
            raise peers.PeerFailed("OpenVINO rejected the graph")
        return real(fn, inputs, variant, threads)

    monkeypatch.setattr(run, "build_variant", build)
    rec = run.run_case(case, ["eager", "onnxruntime", "openvino"], args, copy_bw=1e10)
    res = rec["results"]
    assert "median_s" in res["eager"]
    assert run._ms(res["onnxruntime"]).startswith("failed: PeerMissing: not installed: onnxruntime")
    assert run._ms(res["openvino"]) == "failed: PeerFailed: OpenVINO rejected the graph"
    table = run.markdown([rec], ["eager", "onnxruntime", "openvino"], "### micro")
    assert table.count("failed: ") == 2 and "| onnxruntime ms | openvino ms |" in table
