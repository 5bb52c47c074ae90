"""The benchmark's variants, built one way for bench/run.py and bench/test_peers.py: eager, Inductor, fusion
and the peers (`pip install -e ".[bench]"`, which holds the `peers` extra and pytest-benchmark):

    inductor_freezing   torch.compile with Inductor's freezing=True, patched for that compile only
    openvino            torch.compile(backend="openvino"), INFERENCE_PRECISION_HINT f32, the bench's thread count
    onnxruntime         torch.onnx.export (dynamo=True, else the TorchScript exporter) -> an InferenceSession:
                        ORT_ENABLE_ALL, intra-op threads = the bench's, inter-op 1, CPUExecutionProvider

build_variant(fn, inputs, variant, threads) compiles AND makes the first call, returning (callable, first output):
a peer that fails is an exception here (PeerMissing when it is not installed), never a quiet fallback. OpenVINO's
backend falls back on its own (to Inductor when its compile raises, to PyTorch when a partition raises at run
time, to PyTorch for the ops it does not support); the first two are turned into failures, the third is its
normal partial offload.

cpu_info()/cpu_line() name the CPU for the tables' headers; caches_line() states warm or cold caches.
"""
from __future__ import annotations

import logging
import os
import platform
import tempfile

import torch

from fusion.workloads.micro import FunctionModule

#: the variants fusion brings (bench/run.py's default set) and the peers (`--peers`, bench/test_peers.py)
OWN = ("eager", "inductor", "fusion")
PEERS = ("inductor_freezing", "openvino", "onnxruntime")
ALL = OWN + PEERS
#: the short names of the "cpu ms" column
SHORT = {"eager": "e", "inductor": "i", "fusion": "f", "inductor_freezing": "ifz", "openvino": "ov",
         "onnxruntime": "ort"}


class PeerMissing(RuntimeError):
    """The variant's runtime is not installed (bench/test_peers.py skips; bench/run.py reports it failed)."""


class PeerFailed(RuntimeError):
    """The peer ran but did not do the work itself (it fell back) or rejected the graph."""


def short(e: BaseException) -> str:
    """'TypeName: first line of the message' (160 characters at most), of the backend's own exception where
    dynamo wrapped it (BackendCompilerFailed's first line is only "backend='...' raised:")."""
    while getattr(e, "inner_exception", None) is not None:
        e = e.inner_exception
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:160] if msg else ''}"


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise PeerMissing(f"not installed: {module} ({short(e)}); pip install -e \".[bench]\"") from e


# ---------------------------------------------------------------------------------------------- builders
def build_variant(fn, inputs: tuple, variant: str, threads: int):
    """(f, out): `variant` of fn compiled (or exported) for `inputs`, and its first output f(*inputs)."""
    if variant == "eager":
        return fn, fn(*inputs)
    if variant == "inductor":
        f = torch.compile(fn)
        return f, f(*inputs)
    if variant == "inductor_freezing":
        # torch.compile's options are Inductor config patches applied around this compile only (compile_fx's
        # config.patch): the global torch._inductor.config.freezing stays as it was
        f = torch.compile(fn, options={"freezing": True})
        return f, f(*inputs)
    if variant == "fusion":
        try:
            import fusion  # noqa: F401  (registers backend="fusion" in un-installed checkouts)
        except Exception as e:                 # the package is being built: report, don't die
            raise RuntimeError(f"import fusion failed: {short(e)}") from e
        f = torch.compile(fn, backend="fusion")
        return f, f(*inputs)
    if variant == "openvino":
        return _openvino(fn, inputs, threads)
    if variant == "onnxruntime":
        f = OrtRunner(fn, inputs, threads)
        return f, f(*inputs)
    raise ValueError(f"unknown variant {variant!r}; choose from {list(ALL)}")


class _Capture(logging.Handler):
    """The last message OpenVINO's torchdynamo loggers emit (they log the reason of each fallback at debug)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.last = ""

    def emit(self, record):
        self.last = record.getMessage().splitlines()[0][:200]


def _openvino(fn, inputs, threads: int):
    """torch.compile(backend="openvino") with the f32 hint; its two quiet fallbacks raise PeerFailed."""
    _require("openvino")
    _require("openvino.torch")                 # registers backend="openvino"
    from openvino.frontend.pytorch.torchdynamo import backend as ov_backend
    from openvino.frontend.pytorch.torchdynamo import execute as ov_execute

    loggers = [logging.getLogger(m.__name__) for m in (ov_backend, ov_execute)]
    cap = _Capture()
    saved = [(lg, lg.level) for lg in loggers]
    original = ov_backend.compile_fx

    def no_inductor(*a, **k):                  # fx_openvino's except branch: it would compile with Inductor
        raise PeerFailed(f"OpenVINO rejected the graph ({cap.last or 'no reason logged'}); its backend "
                         "would have run Inductor instead")

    before = set(ov_execute.partitioned_modules)
    options = {"config": {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": str(threads)}}
    try:
        for lg in loggers:
            lg.addHandler(cap)
            lg.setLevel(logging.DEBUG)
        ov_backend.compile_fx = no_inductor
        f = torch.compile(fn, backend="openvino", options=options)
        out = f(*inputs)
    finally:
        ov_backend.compile_fx = original
        for lg, level in saved:
            lg.removeHandler(cap)
            lg.setLevel(level)
    new = [m for k, m in ov_execute.partitioned_modules.items() if k not in before]
    parts = [p for gm in new for p in gm.modules() if isinstance(p, ov_execute.OpenVINOGraphModule)]
    if any(p.perm_fallback for p in parts):
        raise PeerFailed(f"OpenVINO failed at run time ({cap.last or 'no reason logged'}); it ran PyTorch instead")
    if new and not parts:
        raise PeerFailed("OpenVINO took no part of the graph (every op ran in PyTorch)")
    return f, out


class OrtRunner:
    """fn exported to ONNX (a temporary file, kept while the session lives) and run by ONNX Runtime.
    Calling it takes the case's tensors and returns the first output as a tensor (zero-copy both ways)."""

    def __init__(self, fn, inputs: tuple, threads: int):
        ort = _require("onnxruntime")
        _require("onnx")
        model = fn if isinstance(fn, torch.nn.Module) else FunctionModule(fn)
        self._dir = tempfile.TemporaryDirectory(prefix="bench-ort-")
        path = os.path.join(self._dir.name, "model.onnx")
        self.exporter = export_onnx(model, inputs, path)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]
        n = sum(isinstance(t, torch.Tensor) for t in inputs)
        if len(self.names) != n:
            raise PeerFailed(f"the ONNX model takes {len(self.names)} inputs, the case gives {n}")

    def __call__(self, *inputs):
        feeds = {k: t.detach().contiguous().numpy() for k, t in
                 zip(self.names, (t for t in inputs if isinstance(t, torch.Tensor)))}
        return torch.from_numpy(self.session.run(None, feeds)[0])


def export_onnx(model: torch.nn.Module, inputs: tuple, path: str) -> str:
    """torch.onnx.export to `path`: the dynamo exporter (needs onnxscript), else the TorchScript one. Returns
    which exporter wrote it ("dynamo" | "torchscript"); raises with both reasons when neither could."""
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter's translator)

        torch.onnx.export(model, inputs, path, dynamo=True, verbose=False)
        return "dynamo"
    except Exception as e:                    # noqa: BLE001  (any exporter error: try the other one)
        first = short(e)
    try:
        torch.onnx.export(model, inputs, path, dynamo=False)
        return "torchscript"
    except Exception as e:
        raise PeerFailed(f"torch.onnx.export failed: dynamo ({first}); torchscript ({short(e)})") from e


# ---------------------------------------------------------------------------------------------- headers
def cpu_info(text: str | None = None) -> dict:
    """vendor, family, model, model_name and the avx512* flags of the first processor in /proc/cpuinfo
    (or `text`); where there is no /proc/cpuinfo, platform's processor name and no flags."""
    if text is None:
        try:
            with open("/proc/cpuinfo") as f:
                text = f.read()
        except OSError:
            text = ""
    fields: dict[str, str] = {}
    for line in text.split("\n\n")[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    flags = (fields.get("flags") or fields.get("Features") or "").split()
    return {"vendor": fields.get("vendor_id", "?"), "family": fields.get("cpu family", "?"),
            "model": fields.get("model", "?"),
            "model_name": fields.get("model name") or platform.processor() or platform.machine() or "?",
            "avx512": sorted(f for f in flags if f.startswith("avx512")), "nproc": os.cpu_count()}


def cpu_line(info: dict | None = None) -> str:
    """'CPU: AMD EPYC (AuthenticAMD, family 25, model 17), 2 CPUs, AVX-512: yes (avx512f, ...)'."""
    i = cpu_info() if info is None else info
    avx = f"yes ({', '.join(i['avx512'])})" if i["avx512"] else "no"
    return (f"CPU: {i['model_name']} ({i['vendor']}, family {i['family']}, model {i['model']}), "
            f"{i['nproc']} CPUs, AVX-512: {avx}")


def caches_line(cold: bool) -> str:
    """Which caches the figures were taken with."""
    comp = ("cold: Inductor's on-disk caches disabled (--cold)" if cold else
            "warm: Inductor's on-disk caches on (earlier runs may have filled them)")
    return (f"Caches: compile {comp}; OpenVINO and ONNX Runtime compile from scratch every run. Timings: warm "
            "CPU caches (the same inputs every call, after the warm-up calls)")
