"""`python -m fusion`: user models as package.module:factory, optimize/analyze --json, --save, --progress."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fusion
from fusion.__main__ import load_model, main

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, cache_dir: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    if cache_dir is not None:
        env["FUSION_CACHE_DIR"] = str(cache_dir)
    r = subprocess.run([sys.executable, "-m", "fusion", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout, env=env)
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    return r


def test_analyze_json_with_memory_plot(tmp_path):
    png = tmp_path / "memory.png"
    r = run_cli("analyze", "tests.cli_models:tiny", "--json", "--no-measure", "--seqs", "16,64",
                "--memory-plot", str(png))
    doc = json.loads(r.stdout)
    assert doc["label"] == "TinyDecoder" and doc["totals"]["flops"] > 0 and doc["totals"]["measured_s"] is None
    assert doc["kv_cache"]["bytes_per_token"] == 2 * 2 * 16 * 4          # 2 KV heads of 16, fp32
    assert [m["seq"] for m in doc["memory"]] == [16, 64]
    assert doc["memory"][1]["kv_cache"] == 64 * 2 * 2 * 16 * 4
    assert doc["memory"][0]["activations"] < doc["memory"][1]["activations"]
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_optimize_model_only_factory_json_save_progress(tmp_path):
    from fusion.costmodel.profile_store import load_or_calibrate, profile_path

    load_or_calibrate()                        # a cold cache (every pass runs), with this machine's profile
    cold = tmp_path / "cache"
    (cold / "profiles").mkdir(parents=True)
    shutil.copy(profile_path(), profile_path(str(cold)))
    out = tmp_path / "prog"
    r = run_cli("optimize", "tests.cli_models:tiny_model_only", "--input-shape", "2x32x64", "--json",
                "--save", str(out), "--progress", cache_dir=cold)
    doc = json.loads(r.stdout)
    cmp = doc["comparison"]
    assert cmp["after"]["fused_kernels"] >= 1 and cmp["after"]["kernels"] < cmp["before"]["kernels"]
    assert cmp["after"]["bytes"] < cmp["before"]["bytes"]
    assert doc["kernels"] and all(k["measured_s"] for k in doc["kernels"])
    names = [p["name"] for p in doc["graphs"][0]["passes"] if p["name"] != "merge"]   # merge: shared-input matmuls
    assert names[:6] == ["normalize", "rewrite", "layout", "prepare", "lower", "build"], names
    for stage in ("capture", "normalize", "rewrite", "rewrite: saturate", "rewrite: extract", "prepare", "lower", "build", "done"):
        assert stage in r.stderr                 # --progress: one line per pass when stderr is not a terminal
    assert doc["saved"] == str(out) and (out / "program.json").is_file()
    from tests.cli_models import tiny_model_only

    model, x = tiny_model_only(), torch.randn(2, 32, 64)
    with torch.no_grad():
        ref = model(x)
    again = fusion.load(str(out))(x)
    assert ((again - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_text_commands_with_a_user_model(capsys):
    assert main(["analyze", "tests.cli_models:tiny", "--no-measure", "--top", "5"]) == 0
    text = capsys.readouterr().out
    assert "total:" in text and "KV cache" in text
    assert max(len(line) for line in text.splitlines()) <= 100
    assert main(["bench", "tests.cli_models:tiny", "--variants", "eager,fusion"]) == 0
    text = capsys.readouterr().out
    row = [line for line in text.splitlines() if line.startswith("tiny")]
    assert len(row) == 1 and "ms" in row[0] and max(len(line) for line in text.splitlines()) <= 100
    assert main(["explain", "tests.cli_models:tiny", "--no-progress"]) == 0
    assert "kernels:" in capsys.readouterr().out


def test_model_spec_errors():
    with pytest.raises(SystemExit, match="--input-shape"):
        load_model("tests.cli_models:tiny_model_only")
    with pytest.raises(SystemExit, match="must return"):
        load_model("tests.cli_models:not_a_model")
    with pytest.raises(SystemExit, match="cannot load"):
        load_model("tests.cli_models:missing")
    with pytest.raises(SystemExit, match="unknown model"):
        load_model("gpt5")
    model, inputs = load_model("tests.cli_models:tiny_model_only", ["2x8x64", "3:int64"])
    assert inputs[0].shape == (2, 8, 64) and inputs[1].dtype == torch.int64
    model, inputs = load_model("gpt2")
    assert type(model).__name__ == "GPT2Block" and inputs[0].shape == (4, 128, 768)


# --- what the CLI prints: one actionable line for a missing extra, no library warnings, every command's help


@pytest.mark.parametrize("args, flag", [(["analyze", "gpt2", "--memory-plot"], "--memory-plot"),
                                        (["analyze", "gpt2", "--no-measure", "--plot"], "--plot"),
                                        (["optimize", "gpt2", "--plot"], "--plot")])
def test_missing_matplotlib_is_one_line_and_exit_2(args, flag, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)       # an install without the `plot` extra
    png = tmp_path / "m.png"
    assert main([*args, str(png)]) == 2
    err = capsys.readouterr().err
    assert err == f"fusion: {flag} needs matplotlib: pip install 'fusion[plot]'\n"
    assert not png.exists()


def test_memory_plot_without_matplotlib_says_which_extra(tmp_path, monkeypatch):
    from fusion.analysis.memory import draw_memory_plot
    from fusion.errors import FusionInputError

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(FusionInputError, match=r"matplotlib: pip install 'fusion\[plot\]'"):
        draw_memory_plot(str(tmp_path / "m.png"), [16, 32], 1e6, [1e5, 2e5], None, "t", "KV cache")


def test_input_error_is_one_line_and_exit_2(capsys):
    # two example inputs for a forward(x): fusion.optimize's FusionInputError, not a traceback
    assert main(["explain", "tests.cli_models:tiny_model_only", "--input-shape", "2x8x64",
                 "--input-shape", "3:int64", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fusion: ") and err.count("\n") == 1 and "Traceback" not in err


def test_bench_suite_outside_a_checkout_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "bench", None)            # an installed fusion: no bench/ beside it
    monkeypatch.setitem(sys.modules, "bench.run", None)        # (an earlier test may have imported it)
    assert main(["bench"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fusion: bench without MODEL") and err.count("\n") == 1


def test_cli_prints_no_library_warnings():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    r = subprocess.run([sys.executable, "-m", "fusion", "analyze", "tests.cli_models:tiny", "--no-measure",
                        "--top", "3"], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Warning" not in r.stderr, r.stderr[-3000:]


def test_help_lists_every_command_and_each_help_works(capsys):
    from fusion.__main__ import COMMANDS

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in COMMANDS)
    for name in COMMANDS:
        with pytest.raises(SystemExit) as done:                 # argparse's --help exits 0
            main([name, "--help"])
        assert done.value.code == 0, name
        assert "usage:" in capsys.readouterr().out, name
    assert main([]) == 2 and main(["nope"]) == 2
    assert "python -m fusion COMMAND --help" in capsys.readouterr().err


def test_calibrate_command(capsys):
    assert main(["calibrate", "--json"]) == 0                   # the stored profile (measured once if absent)
    assert json.loads(capsys.readouterr().out)["copy_bandwidth"] > 0
    assert main(["calibrate", "--datasheet", "H200"]) == 0
    assert "H200" in capsys.readouterr().out
