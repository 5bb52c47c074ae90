"""fusion.pipeline.RECENT keeps lightweight records, not programs: a compiled graph the user dropped is freed
(its kernels, graphs and weights with it), `fusion.explain_last()` still describes it from what was recorded
at compile time, and `fusion.last_compiled()` returns only the graphs still alive."""
from __future__ import annotations

import gc
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

import fusion
import fusion.rewrite  # noqa: F401  (see below)
from fusion import pipeline

# egglog's class bodies keep the frames that imported them: were the e-graph stage first imported inside a
# compile (fusion.pipeline imports it lazily), that compile's frames, and the program on them, would stay
# alive for the whole process. Imported here, the frames it pins are this module's.


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(32, 32)

    def forward(self, x):
        return F.gelu(self.fc(x)).softmax(-1)


def test_dropped_program_is_freed_and_still_explained(tmp_path):
    torch.manual_seed(0)
    opt = fusion.optimize(Block().eval(), (torch.randn(4, 32),), config=fusion.Config(cache_dir=str(tmp_path)))
    (graph,) = opt.graphs
    assert fusion.last_compiled() == [graph] and pipeline.RECENT[-1].compiled is graph
    alive = fusion.explain_last()
    assert "fused kernels" in alive and graph.log.kernels
    freed = weakref.ref(graph)
    del graph, opt
    gc.collect()
    assert freed() is None                                   # RECENT did not keep the program alive
    assert pipeline.RECENT[-1].compiled is None
    assert fusion.last_compiled() == []                      # only live graphs are returned
    assert fusion.explain_last() == alive                    # the same text, from the compile-time record


def test_torch_compile_program_is_freed_after_dynamo_reset(tmp_path):
    torch._dynamo.reset()
    model, x = Block().eval(), torch.randn(4, 32)
    compiled = torch.compile(model, backend="fusion", options={"cache_dir": str(tmp_path)})
    with torch.no_grad():
        compiled(x)
    (graph,) = fusion.last_compiled()
    alive = fusion.explain_last()
    freed = weakref.ref(graph)
    del graph, compiled
    torch._dynamo.reset()                                    # Dynamo drops its compiled code
    gc.collect()
    assert freed() is None and fusion.last_compiled() == []
    assert fusion.explain_last() == alive


def test_record_leaves_out_the_approximate_graph():
    """The approximate stage's graph holds the converted weights: the record's log drops it, the live log
    keeps it, and the summary explain() prints is the same."""
    from fusion.approx import ApproxResult, ApproxSite

    gm = torch.fx.symbolic_trace(lambda x: x + 1)
    approx_gm = torch.fx.symbolic_trace(lambda x: x * 2)
    site = ApproxSite("fc:int8", "int8", ["fc"], 1e-3, False, "")
    log = pipeline.CompileLog("inference", approx=ApproxResult(approx_gm, [site], 1e-3, 1e-3, tolerance=0.5))
    compiled = pipeline.CompiledGraph(gm, gm, log, fusion.Config())
    record = pipeline.CompileRecord.of(compiled)
    assert record.log.approx.gm is None and compiled.log.approx.gm is approx_gm
    assert record.log.approx.summary() == compiled.log.approx.summary()
    assert record.code == gm.code and record.aten_calls == 1 and record.compiled is compiled
