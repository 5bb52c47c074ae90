"""GPU benchmark: eager vs Inductor vs fusion (Triton kernels), side by side in one run.

    python bench/gpu.py                          # everything, on cuda:0, writes bench_gpu.md
    python bench/gpu.py --only micro,attention   # groups: micro, attention, gemm, models
    python bench/gpu.py --dry-run                # CPU smoke test: tiny sizes, TRITON_INTERPRET=1, no Inductor

Timing: CUDA events around each call, --warmup calls first, then the median of --repeat calls
(time.perf_counter on CPU in --dry-run). Relative error max|a-b|/max|b| against eager.
Bandwidth: achieved = minimal bytes (inputs read once + output written once) / median time, shown in
GB/s and as a fraction of the measured device-to-device copy bandwidth ((read + write) bytes / s of a
large `dst.copy_(src)`), measured at the start of the run.

Variants:
  eager     the PyTorch function as written
  inductor  torch.compile(fn) (default mode)
  fusion    micro/attention/gemm: the fusion kernels themselves: the function is captured on the CPU
            in fp32 (torch.export -> normalize -> rewrites when available), scheduled into KernelIR,
            rendered to Triton (fusion.backends.triton.lower.lower_to_triton) and then called with the
            CUDA tensors (the kernels are device- and dtype-agnostic); attention runs
            fusion.backends.triton.attention, GEMM+epilogue fusion.backends.triton.gemm.linear_epilogue.
            models: fusion.optimize(model, inputs) as users call it (Triton kernels only once lower.py
            picks the Triton backend on CUDA; the "kernels" column shows how many it made).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DRY = "--dry-run" in sys.argv
if DRY:
    os.environ["TRITON_INTERPRET"] = "1"          # before triton is imported anywhere

import torch
import torch.nn.functional as F

from fusion.workloads.micro import MICRO, FunctionModule, dims


# ----------------------------------------------------------------------------------------- timing
class Timer:
    def __init__(self, device: torch.device, warmup: int, repeat: int):
        self.device, self.warmup, self.repeat = device, warmup, repeat

    def __call__(self, fn, *args) -> float:
        """Median seconds of fn(*args)."""
        for _ in range(self.warmup):
            fn(*args)
        ts = []
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            for _ in range(self.repeat):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn(*args)
                b.record()
                b.synchronize()
                ts.append(a.elapsed_time(b) / 1e3)
        else:
            for _ in range(self.repeat):
                t = time.perf_counter()
                fn(*args)
                ts.append(time.perf_counter() - t)
        return statistics.median(ts)


def copy_bandwidth(device: torch.device, nbytes: int, timer: Timer) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = timer(lambda: dst.copy_(src))
    return 2 * nbytes / t


def nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))


def relerr(a, b) -> float:
    if isinstance(a, (tuple, list)):
        a = a[0]
    if isinstance(b, (tuple, list)):
        b = b[0]
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------------------- cases
#: bench_gpu.md's label and the --dry-run main shape of each shared micro case (fusion.workloads.micro;
#: full runs use its benchmark shape)
GPU_MICRO = {
    "softmax": ("softmax", (8, 64)),
    "rmsnorm": ("rmsnorm", (8, 32)),
    "layernorm": ("layer_norm", (8, 32)),
    "gelu_bias_res": ("gelu(x+b)+r", (8, 32)),
    "swiglu": ("silu(g)*a", (8, 48)),
    "attn_softmax": ("softmax(s*0.125+mask)", (2, 2, 8, 8)),
}


def micro_cases(dry: bool):
    """(name, fn, shapes); shapes are of the inputs (all fp16 on GPU, fp32 + fp16 in --dry-run). Every input,
    the attention mask too, is drawn at random here (as this bench always did)."""
    out = []
    for case_name, (label, dry_shape) in GPU_MICRO.items():
        case = MICRO[case_name]
        shape = dry_shape if dry else case.shape
        out.append((f"{label} {dims(shape)}", case.fn, case.input_shapes(shape)))
    return out


def fusion_triton(fn, shapes, cache_dir=None):
    """fn captured on CPU fp32 (the scheduler's dtypes), lowered to Triton kernels; (callable, #kernels)."""
    from fusion.capture import normalize
    from fusion.backends.triton.lower import lower_to_triton
    from fusion.config import Config

    cpu = tuple(torch.randn(s) for s in shapes)
    gm = normalize(torch.export.export(FunctionModule(fn), cpu).run_decompositions().graph_module)
    cfg = Config(cache_dir=cache_dir)
    try:
        from fusion import rewrite as rewrites

        gm = rewrites.rewrite(gm, cfg).gm
    except Exception as e:  # noqa: BLE001 - the rewrite stage is optional here
        print(f"  (rewrites skipped: {type(e).__name__}: {e})", file=sys.stderr)
    res = lower_to_triton(gm, cfg, dtypes_from="inputs")
    out_gm = res.gm

    def call(*a):
        out = out_gm(*a)
        return out[0] if isinstance(out, (tuple, list)) and len(out) == 1 else out

    return call, len(res.kernels)


# ----------------------------------------------------------------------------------------- runner
class Bench:
    def __init__(self, args):
        self.dry = args.dry_run
        self.device = torch.device("cpu" if self.dry else "cuda")
        self.dtype = torch.float16
        self.variants = [v for v in args.variants.split(",") if v]
        if self.dry and "inductor" in self.variants and not args.inductor_on_cpu:
            self.variants.remove("inductor")
        self.timer = Timer(self.device, 1 if self.dry else args.warmup, 2 if self.dry else args.repeat)
        self.rows: list[dict] = []
        self.copy_bw = copy_bandwidth(self.device, (16 << 20) if self.dry else (1 << 30), self.timer)

    def add(self, group, name, variant, fn, args, ref, min_bytes, kernels=""):
        row = {"group": group, "case": name, "variant": variant, "kernels": kernels}
        try:
            out = fn(*args)
            row["err"] = relerr(out, ref) if ref is not None else 0.0
            t = self.timer(fn, *args)
            row["ms"] = t * 1e3
            if min_bytes:
                row["GB/s"] = min_bytes / t / 1e9
                row["%copy"] = 100 * min_bytes / t / self.copy_bw
        except Exception as e:  # noqa: BLE001 - one failing variant does not stop the run
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
            if os.environ.get("BENCH_TRACEBACK"):
                traceback.print_exc()
        self.rows.append(row)
        print(_fmt_row(row), flush=True)
        return row

    def compiled(self, fn):
        return torch.compile(fn)

    # -------------------------------------------------------------------- groups
    def micro(self):
        g = torch.Generator().manual_seed(0)
        for name, fn, shapes in micro_cases(self.dry):
            xs = tuple(torch.randn(s, generator=g).to(self.device, self.dtype) for s in shapes)
            ref = fn(*[x.float() for x in xs])
            mb = nbytes(*xs) + ref.numel() * xs[0].element_size()
            for v in self.variants:
                if v == "eager":
                    self.add("micro", name, v, fn, xs, ref, mb)
                elif v == "inductor":
                    self.add("micro", name, v, self.compiled(fn), xs, ref, mb)
                elif v == "fusion":
                    try:
                        f, nk = fusion_triton(fn, shapes)
                    except Exception as e:  # noqa: BLE001
                        f, nk = _raiser(e), "?"
                    self.add("micro", name, v, f, xs, ref, mb, kernels=nk)

    def attention(self):
        from fusion.backends.triton.attention import triton_attention

        B, H, S, D = (1, 2, 32, 16) if self.dry else (4, 16, 2048, 64)
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, H, S, D, generator=g).to(self.device, self.dtype) for _ in range(3))
        name = f"attention B={B} H={H} S=L={S} D={D} causal"
        sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)

        def math(q, k, v):
            s = (q @ k.transpose(-1, -2)) * D ** -0.5
            s = s.masked_fill(torch.ones(S, S, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
            return torch.softmax(s.float(), -1).to(q.dtype) @ v

        ref = sdpa(q.float(), k.float(), v.float())
        mb = nbytes(q, k, v) + ref.numel() * q.element_size()
        for var in self.variants:
            if var == "eager":
                self.add("attention", name, "eager (SDPA)", sdpa, (q, k, v), ref, mb)
                self.add("attention", name, "eager (math)", math, (q, k, v), ref, mb)
            elif var == "inductor":
                self.add("attention", name, var, self.compiled(math), (q, k, v), ref, mb)
            elif var == "fusion":
                self.add("attention", name, var, lambda q, k, v: triton_attention(q, k, v, None, D ** -0.5, True),
                         (q, k, v), ref, mb, kernels=1)

    def gemm(self):
        from fusion.backends.triton import gemm as TG

        M, N, K = (32, 48, 64) if self.dry else (8192, 4096, 1024)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(M, K, generator=g).to(self.device, self.dtype)
        w = (torch.randn(N, K, generator=g) * K ** -0.5).to(self.device, self.dtype)
        b = torch.randn(N, generator=g).to(self.device, self.dtype)
        r = torch.randn(M, N, generator=g).to(self.device, self.dtype)
        name = f"gelu(linear(x,w,b))+r M={M} N={N} K={K}"
        eager = lambda x, w, b, r: F.gelu(F.linear(x, w, b)) + r
        ref = eager(x.float(), w.float(), b.float(), r.float())
        mb = nbytes(x, w, b, r) + M * N * x.element_size()
        pick, pred = TG.choose_strategy(M, N, K, self.dtype, True, True, TG.default_profile(self.device), "gelu")
        for var in self.variants:
            if var == "eager":
                self.add("gemm", name, var, eager, (x, w, b, r), ref, mb)
            elif var == "inductor":
                self.add("gemm", name, var, self.compiled(eager), (x, w, b, r), ref, mb)
            elif var == "fusion":
                for strat, fn in (("triton", TG.triton_linear_epilogue), ("vendor", TG.vendor_linear_epilogue)):
                    tag = f"fusion {strat}" + (" (chosen)" if strat == pick else "")
                    self.add("gemm", name, tag, lambda x, w, b, r, fn=fn: fn(x, w, b, "gelu", r), (x, w, b, r),
                             ref, mb, kernels=f"pred {pred[strat] * 1e3:.3f} ms")

    def models(self):
        import fusion

        for name, build in model_builders(self.dry):
            try:
                torch.manual_seed(0)
                model = build().eval().to(self.device, self.dtype)
            except Exception as e:  # noqa: BLE001 (transformers missing or too old)
                self.rows.append({"group": "models", "case": name, "variant": "-", "error": repr(e)[:120]})
                continue
            ids = torch.randint(0, 1000, (1 if self.dry else 4, 16 if self.dry else 128), device=self.device)
            fn = lambda ids, m=model: m(input_ids=ids).last_hidden_state
            with torch.no_grad():
                ref = fn(ids)
                for var in self.variants:
                    if var == "eager":
                        self.add("models", name, var, fn, (ids,), ref, 0)
                    elif var == "inductor":
                        self.add("models", name, var, self.compiled(fn), (ids,), ref, 0)
                    elif var == "fusion":
                        try:
                            opt = fusion.optimize(_LastHidden(model), (ids,))
                            nk = sum(1 for m in opt.modules() if type(m).__name__ in ("FusedKernel", "TritonKernel"))
                            f = opt
                        except Exception as e:  # noqa: BLE001
                            f, nk = _raiser(e), "?"
                        self.add("models", name, var, f, (ids,), ref, 0, kernels=nk)


class _LastHidden(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, ids):
        return self.m(input_ids=ids).last_hidden_state


def model_builders(dry: bool):
    from transformers import (
        BertConfig,
        BertModel,
        GPT2Config,
        GPT2Model,
        LlamaConfig,
        LlamaModel,
    )

    small = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4}
    if dry:
        return [("BertModel (tiny)", lambda: BertModel(BertConfig(**small, attn_implementation="eager"),
                                                       add_pooling_layer=False)),
                ("GPT2Model (tiny)", lambda: GPT2Model(GPT2Config(n_layer=2, n_embd=64, n_head=4,
                                                                  attn_implementation="eager"))),
                ("LlamaModel (tiny, GQA)", lambda: LlamaModel(LlamaConfig(**small, num_key_value_heads=2,
                                                                          vocab_size=1000,
                                                                          attn_implementation="eager")))]
    return [("BertModel base (12 layers)", lambda: BertModel(BertConfig(attn_implementation="eager"),
                                                            add_pooling_layer=False)),
            ("GPT2Model (12 layers)", lambda: GPT2Model(GPT2Config(attn_implementation="eager"))),
            ("LlamaModel 1.1B-shape (22 layers, GQA 32/4)",
             lambda: LlamaModel(LlamaConfig(num_hidden_layers=22, hidden_size=2048, intermediate_size=5632,
                                            num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                                            attn_implementation="eager")))]


def _raiser(e):
    def f(*a):
        raise e
    return f


def _fmt_row(r: dict) -> str:
    if "error" in r:
        return f"{r['group']:9} {r['case'][:40]:40} {r['variant']:22} error: {r['error']}"
    bw = f"{r['GB/s']:8.1f} GB/s {r['%copy']:5.1f}%" if "GB/s" in r else ""
    return f"{r['group']:9} {r['case'][:40]:40} {r['variant']:22} {r['ms']:9.4f} ms  err {r['err']:.1e} {bw} {r['kernels']}"


def markdown(rows: list[dict], header: str) -> str:
    L = [header, "", "| group | case | variant | median ms | speedup vs eager | GB/s | % of copy BW | rel. err | kernels / note |",
         "|---|---|---|---:|---:|---:|---:|---:|---|"]
    base = {}
    for r in rows:
        if r.get("variant", "").startswith("eager") and "ms" in r:
            base.setdefault((r["group"], r["case"]), r["ms"])
    for r in rows:
        if "error" in r:
            L.append(f"| {r['group']} | {r['case']} | {r.get('variant', '')} | error | | | | | {r['error']} |")
            continue
        b = base.get((r["group"], r["case"]))
        sp = f"{b / r['ms']:.2f}x" if b else ""
        gb = f"{r['GB/s']:.0f}" if "GB/s" in r else ""
        pc = f"{r['%copy']:.0f}%" if "%copy" in r else ""
        L.append(f"| {r['group']} | {r['case']} | {r['variant']} | {r['ms']:.4f} | {sp} | {gb} | {pc} | "
                 f"{r['err']:.1e} | {r['kernels']} |")
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU smoke test: tiny sizes, Triton interpreter")
    ap.add_argument("--only", default="micro,attention,gemm,models")
    ap.add_argument("--variants", default="eager,inductor,fusion")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--inductor-on-cpu", action="store_true", help="keep Inductor in --dry-run")
    ap.add_argument("--out", default="bench_gpu.md")
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA GPU (use --dry-run for a CPU smoke test)", file=sys.stderr)
        return 2
    b = Bench(args)
    dev = "CPU (dry run, Triton interpreter)" if b.dry else torch.cuda.get_device_name(0)
    print(f"device: {dev}; copy bandwidth {b.copy_bw / 1e9:.1f} GB/s; torch {torch.__version__}", flush=True)
    for grp in args.only.split(","):
        with torch.no_grad():
            getattr(b, grp)()
    head = (f"# fusion GPU benchmark\n\ndevice: {dev}; dtype fp16; measured device-to-device copy bandwidth "
            f"{b.copy_bw / 1e9:.1f} GB/s (read + write); medians of {b.timer.repeat} calls after "
            f"{b.timer.warmup} warm-up calls; torch {torch.__version__}")
    with open(args.out, "w") as f:
        f.write(markdown(b.rows, head))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
