"""N processes optimizing one model against one cold cache directory: total CPU time against one process.

    python -m bench.shared_compile --model bert --ranks 1 2 4

Each run starts N processes at once on a fresh cache directory (the hardware profile copied in, so that no
process calibrates). Printed per N: wall time, the CPU time of all N processes together, how many captured
and compiled the model and how many reused the first one's program (structural cache). With the entry
locks (fusion.store.cache.exclusive) one process compiles and the others wait, so the total CPU time is
one compile plus N - 1 imports and lookups.
"""
from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = str(Path(__file__).resolve().parent.parent)

SCRIPT = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
import torch, fusion
from bench.cases import ALL
torch.set_num_threads(1)
model, inputs = ALL[sys.argv[3]].make()
while time.time() < float(sys.argv[4]):
    time.sleep(0.01)
t0 = time.process_time()
opt = fusion.optimize(model, inputs, config=fusion.Config(cache_dir=sys.argv[2]))
print("RESULT", opt.capture_method.replace(" ", "_"), time.process_time() - t0)
"""


def run(model: str, n: int, profile_dir: Path | None) -> dict:
    cache = Path(tempfile.mkdtemp(prefix="fusion-shared-"))
    if profile_dir is not None:
        shutil.copytree(profile_dir, cache / "profiles")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.time() + 6.0
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, ROOT, str(cache), model, str(start)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for _ in range(n)]
    results = []
    for p in procs:
        out, _ = p.communicate()
        results += [line.split()[1:] for line in out.splitlines() if line.startswith("RESULT")]
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    shutil.rmtree(cache, ignore_errors=True)
    return {"n": n, "wall_s": time.perf_counter() - t0 - 6.0, "cpu_s": cpu,   # (less the synchronised start)
            "compiled": sum(1 for m, _ in results if m != "structural_cache"),
            "reused": sum(1 for m, _ in results if m == "structural_cache"),
            "optimize_cpu_s": [round(float(s), 2) for _, s in results]}


def main(argv: list[str] | None = None) -> int:
    from fusion.store import cache

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bert")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    a = ap.parse_args(argv)
    profiles = cache.cache_dir() / "profiles"
    print(f"| processes | wall s | CPU s (all processes) | compiled | reused | optimize CPU s per process |")
    print("| --- | --- | --- | --- | --- | --- |")
    for n in a.ranks:
        r = run(a.model, n, profiles if profiles.is_dir() else None)
        print(f"| {n} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['compiled']} | {r['reused']} | "
              f"{', '.join(map(str, r['optimize_cpu_s']))} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
