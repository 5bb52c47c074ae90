"""The approximation pass: find sites, measure them, guard (revert the harmful ones), commit the weights.

    result = apply_approximations(gm, config, weights, example_args)

The contract (what flows in and out, what the caller must respect afterwards) and the steps are described
in the package docstring (fusion/approx/__init__.py), which re-exports this module's public names.

    ApproxSite, ApproxResult      what the pass reports
    output_errors(outs, refs)     (max relative error, min cosine) over the float outputs
    build(gm, sites)              `gm` with sites applied in staged form (weight transforms as graph nodes)
    commit(gm, weights)           fold the weight transforms: weights converted in place, layer by layer
    convert_weight_(t, tag)       one live weight converted in place
"""
from __future__ import annotations

import math
import operator
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from fusion.approx import held
from fusion.approx import ops as approx_ops
from fusion.approx.fuse import fuse
from fusion.approx.held import ReleasedWeightError
from fusion.approx.rules import Emitter, Site, find_sites
from fusion.config import Config

#: when the guard trips, the output error of each site alone is measured (one program run each) first for
#: this many sites, those with the largest local error; later only for a site whose estimated harm leads.
#: Local error is a poor predictor on its own: on all-MiniLM-L6-v2 the FFN down-projections have the
#: smallest local errors (outlier channels dominate max|b|) and the largest harm, so measure them all.
MAX_SOLO_MEASUREMENTS = 64


@dataclass
class ApproxSite:
    """One place an approximation was considered.

    error:        the site's LOCAL relative error (its replacement vs the exact op, on the exact program's own
                  inputs to it; max|a-b|/max|b|), measured on the example inputs. None if not measured.
    output_error: the program's output error with this site ALONE applied (measured only when the guard
                  had to revert something; it is the harm that orders reverts).
    reverted:     True if the guard undid it (the exact op runs there).
    """

    name: str
    kind: str            # "int8" | "int8_weight_only" | "bf16" | "relu_attention"
    nodes: list[str]     # nodes of the input graph it replaces (anchor first, then its weight path)
    error: Optional[float]
    reverted: bool
    note: str
    output_error: Optional[float] = None
    weight: Optional[str] = None


@dataclass
class ApproxResult:
    """gm: the approximate graph (committed: weights converted in place); sites: every site considered.

    exact_error:  output error with ALL candidate sites applied, before the guard reverted any
                  (vs the exact graph on the example inputs; 0.0 when nothing applied).
    final_error:  output error of the returned program (<= tolerance unless nothing could be kept).
    final_cosine: the smallest cosine similarity over the outputs of the returned program.
    """

    gm: fx.GraphModule
    sites: list[ApproxSite]
    exact_error: float
    final_error: float
    final_cosine: float = 1.0
    tolerance: float = 0.0
    seconds: float = 0.0
    converted: dict[str, str] = field(default_factory=dict)   # placeholder -> new dtype ("int8"/"bf16")

    @property
    def applied(self) -> list[ApproxSite]:
        return [s for s in self.sites if not s.reverted]

    def summary(self) -> str:
        lines = [f"approximations: {len(self.applied)}/{len(self.sites)} sites kept; error with all sites "
                 f"{self.exact_error:.3g}, final {self.final_error:.3g} (tolerance {self.tolerance:g}), "
                 f"min cosine {self.final_cosine:.6f}; {self.seconds:.1f} s"]
        for s in self.sites:
            e = "-" if s.error is None else f"{s.error:.2e}"
            oe = "" if s.output_error is None else f" output_error={s.output_error:.2e}"
            lines.append(f"  {'REVERTED ' if s.reverted else ''}{s.name} [{s.kind}] local_error={e}{oe}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# measuring


def output_errors(outs: Any, refs: Any) -> tuple[float, float]:
    """(max over float outputs of max|a-b|/max|b|, min over them of cosine similarity)."""
    err, cos = 0.0, 1.0
    for a, b in zip(pytree.tree_leaves(outs), pytree.tree_leaves(refs)):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or not b.dtype.is_floating_point:
            continue
        a64, b64 = a.detach().double().flatten(), b.detach().double().flatten()
        if a64.shape != b64.shape:
            return math.inf, -1.0
        if b64.numel() == 0:
            continue
        if not torch.isfinite(a64).all() and not torch.equal(torch.isfinite(a64), torch.isfinite(b64)):
            return math.inf, -1.0
        fin = torch.isfinite(b64)
        a64, b64 = a64[fin], b64[fin]
        den = b64.abs().max().clamp_min(1e-30)
        err = max(err, ((a64 - b64).abs().max() / den).item() if b64.numel() else 0.0)
        na, nb = a64.norm(), b64.norm()
        c = 1.0 if (na == 0 and nb == 0) else (a64 @ b64 / (na * nb).clamp_min(1e-300)).item()
        cos = min(cos, c)
    return err, cos


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return output_errors(a, b)[0]


def _fake_mode(gm: fx.GraphModule) -> Any:
    from torch._guards import detect_fake_mode

    return detect_fake_mode([n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"])


def _copy_graph(gm: fx.GraphModule) -> tuple[fx.Graph, dict[str, fx.Node]]:
    import copy

    g = fx.Graph()
    vm: dict[fx.Node, fx.Node] = {}
    out = g.graph_copy(gm.graph, vm)
    old_out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    new_out = g.output(out)
    new_out.meta = dict(old_out.meta)
    g._codegen = copy.deepcopy(gm.graph._codegen)
    return g, {n.name: vm[n] for n in gm.graph.nodes if n in vm}


def build(gm: fx.GraphModule, sites: Sequence[Site], fake_mode: Any = None) -> fx.GraphModule:
    """A new GraphModule: `gm` with `sites` applied in staged form (weight transforms as graph nodes)."""
    if fake_mode is None:
        fake_mode = _fake_mode(gm)
    g, by_name = _copy_graph(gm)
    replaced: dict[str, fx.Node] = {}
    for s in sites:
        anchor = by_name[s.anchor]
        ins = [replaced.get(i, by_name[i]) for i in s.inputs]
        with g.inserting_before(anchor):
            out = s.emit(Emitter(g, fake_mode), ins)
        out.meta.setdefault("approx_site", s.name)
        anchor.replace_all_uses_with(out)
        replaced[s.anchor] = out
        g.erase_node(anchor)
    g.eliminate_dead_code()
    g.lint()
    new = fx.GraphModule(gm, g, class_name=type(gm).__name__)
    return new


def _mini(site: Site, gm: fx.GraphModule, fake_mode: Any) -> fx.GraphModule:
    """A graph that computes just the site's replacement from its inputs."""
    g = fx.Graph()
    nodes = {n.name: n for n in gm.graph.nodes}
    ins = []
    for name in site.inputs:
        p = g.placeholder(name)
        p.meta = dict(nodes[name].meta)
        ins.append(p)
    g.output(site.emit(Emitter(g, fake_mode), ins))
    return fx.GraphModule(torch.nn.Module(), g)


class _LocalErrors(fx.Interpreter):
    """Runs the exact graph; at each site anchor also runs the site's replacement on the same inputs."""

    def __init__(self, gm: fx.GraphModule, sites: Sequence[Site], fake_mode: Any, args: Sequence[Any]):
        super().__init__(gm)
        self.by_anchor = {s.anchor: s for s in sites}
        self.minis = {s.name: _mini(s, gm, fake_mode) for s in sites}
        self.nodes = {n.name: n for n in gm.graph.nodes}
        phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.placeholder_vals = {p.name: a for p, a in zip(phs, args)}
        self.local: dict[str, float] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        s = self.by_anchor.get(n.name)
        if s is not None:
            try:
                ins = [self.placeholder_vals[i] if i in self.placeholder_vals else self.env[self.nodes[i]]
                       for i in s.inputs]
                with torch.no_grad():
                    self.local[s.name] = _rel(self.minis[s.name](*ins), out)
            except Exception:  # noqa: BLE001 - a site we cannot measure locally is judged by the outputs
                pass
        return out


# ----------------------------------------------------------------------------------------------
# committing: weights converted in place


def convert_weight_(t: torch.Tensor, tag: str, kn: bool = False) -> Optional[torch.Tensor]:
    """Convert the live weight `t` in place (its storage replaced; the fp32 one freed if nothing else holds
    it). int8: returns the per-channel scales (fp32 [N]); bf16: returns None."""
    if t.requires_grad:
        t.requires_grad_(False)
    if tag == "int8":
        q, s = approx_ops._quantize_weight(t, kn)
        t.data = q
        return s
    if tag == "bf16":
        t.data = t.detach().to(torch.bfloat16)
        return None
    raise ValueError(tag)


def commit(gm: fx.GraphModule, weights: dict[str, torch.Tensor], fake_mode: Any = None, *,
           hold: bool = False, held_out: Optional[dict[str, held.Held]] = None) -> dict[str, str]:
    """Fold the weight transforms of a staged approximate graph: convert weights in place, layer by layer.

    A transform is folded only if its placeholder feeds nothing but transforms of the same kind and
    arguments (otherwise it stays in the graph and runs per call: correct, slower). Returns
    {placeholder: new dtype}.

    hold=True (torch.compile, see `held.py`): the LIVE weight is not changed; its converted form (reused from
    `held.REGISTRY` when an earlier compile made it) becomes a buffer ``_approx_weight_<placeholder>`` of
    `gm` read with ``get_attr``, and the placeholder stays with no users. The caller releases the fp32
    original (`held.release_`) once the program is final; `held_out` receives {placeholder: converted form}.
    A weight released by an earlier compile is always taken from the registry (its fp32 data is gone)."""
    fake_mode = fake_mode if fake_mode is not None else _fake_mode(gm)
    g = gm.graph
    converted: dict[str, str] = {}
    held_entries: dict[str, held.Held] = held_out if held_out is not None else {}
    for node in list(g.nodes):
        users = _foldable_users(node, weights, converted)
        if users is None:
            continue
        w, tag = node.args[0], node.meta["approx_weight_transform"]
        live = weights[w.name]
        kn = bool(node.args[1]) if tag == "int8" else None
        source: fx.Node = w            # where the converted weight is read: the placeholder, or a get_attr
        if hold or held.is_released(live):
            entry = _held_entry(live, w.name, tag, kn)
            source = _buffer(gm, f"_approx_weight_{w.name}", entry.weight, users[0], fake_mode)
            scale = entry.scale
            held_entries[w.name] = entry
        elif tag == "int8":
            scale = convert_weight_(live, "int8", kn=bool(kn))
        else:
            scale = convert_weight_(live, "bf16")
        if tag == "int8":
            ga = _buffer(gm, f"_approx_scale_{w.name}", scale, users[0], fake_mode)
            for u in users:            # (weight, scale) = quantize(W): each getitem reads its buffer instead
                for gi in list(u.users):
                    assert gi.target is operator.getitem
                    gi.replace_all_uses_with(source if gi.args[1] == 0 else ga)
                    g.erase_node(gi)
                g.erase_node(u)
        else:
            for u in users:
                u.replace_all_uses_with(source)
                g.erase_node(u)
        if fake_mode is not None and source is w:
            with fake_mode:
                w.meta["val"] = torch.empty_strided(tuple(live.shape), tuple(live.stride()), dtype=live.dtype)
        converted[w.name] = tag
    g.lint()
    gm.recompile()
    return converted


def _foldable_users(node: fx.Node, weights: dict[str, torch.Tensor], converted: dict[str, str]) -> Optional[list[fx.Node]]:
    """The users of the weight placeholder `node` transforms, when `commit` can fold them: `node` is a weight
    transform of a weight in `weights` not converted yet, and every user of that placeholder is the same
    transform (kind, target, arguments). Else None (the transform stays in the graph)."""
    if node.graph is None or node.op != "call_function":
        return None
    tag = node.meta.get("approx_weight_transform")
    if tag is None or node.args[0].op != "placeholder" or node.args[0].name not in weights:
        return None
    w = node.args[0]
    if w.name in converted:
        return None
    users = list(w.users)
    if not all(u.meta.get("approx_weight_transform") == tag and u.target is node.target
               and u.args[1:] == node.args[1:] and u.kwargs == node.kwargs for u in users):
        return None
    return users


def _held_entry(live: torch.Tensor, name: str, tag: str, kn: Optional[bool]) -> held.Held:
    """The converted form of `live` the program holds: the registry's when it matches (`tag`, and for int8
    the layout `kn`), else converted now; a released weight without a matching form raises."""
    entry = held.lookup(live)
    if entry is None or entry.tag != tag or (tag == "int8" and entry.kn != kn):
        if held.is_released(live):
            raise ReleasedWeightError(
                f"fusion: weight {name} was converted to {entry.tag} by an earlier approximate compile "
                f"and its fp32 original released; this graph needs it as {tag}")
        entry = held.convert(live, tag, kn=bool(kn))
    return entry


def _buffer(gm: fx.GraphModule, attr: str, t: torch.Tensor, before: fx.Node, fake_mode: Any) -> fx.Node:
    """`t` registered as buffer `attr` of `gm` and read by a get_attr node inserted before `before`."""
    gm.register_buffer(attr, t)
    with gm.graph.inserting_before(before):
        ga = gm.graph.get_attr(attr)
    if fake_mode is not None:
        ga.meta["val"] = fake_mode.from_tensor(t)
    return ga


# ----------------------------------------------------------------------------------------------
# the pass


def apply_approximations(gm: fx.GraphModule, config: Config, weights: dict[str, torch.Tensor],
                         example_args: Sequence[Any], *, metric: Optional[Callable[[Any, Any], tuple[float, float]]] = None,
                         hold_weights: bool = False) -> ApproxResult:
    """Apply the approximations named in ``config.approximate`` to ``gm``; guard them with
    ``config.tolerance``; convert weights in place. See the module docstring for the contract.

    metric: (approx outputs, exact outputs) -> (error, cosine); default `output_errors` (every float output,
    max|a-b|/max|b|). Pass one when only part of the outputs matters (e.g. padding positions do not).

    hold_weights (torch.compile, `held.py`): the program holds the converted weights and the fp32 originals
    are released (same Parameter objects, same metadata, memory freed) instead of converted in place.
    Weights released by an earlier compile (a recompile for new shapes) are read converted whatever the
    guard would say — their fp32 data is gone — and the guard measures the other sites against that program.

    Exact mode (``config.approximate`` empty) returns ``gm`` itself, untouched, with no sites."""
    t0 = time.perf_counter()
    kinds = frozenset(config.approximate)
    tol = float(config.tolerance)
    if not kinds:
        return ApproxResult(gm, [], 0.0, 0.0, 1.0, tol, 0.0)
    fake_mode = _fake_mode(gm)
    released = {ph for ph, t in weights.items() if held.is_released(t)}
    reused: list[ApproxSite] = []
    if released:   # a recompile: those weights exist only converted
        gm, reused = _reuse_released(gm, weights, kinds, released, fake_mode)
    candidates = {ph: t for ph, t in weights.items() if ph not in released and not (hold_weights and held.is_pinned(t))}
    sites = find_sites(gm, candidates, kinds)
    if not sites:
        _pin_fp32_readers(gm, weights, hold_weights)
        return ApproxResult(gm, reused, 0.0, 0.0, 1.0, tol, time.perf_counter() - t0)
    with torch.no_grad():
        guard = _Guard(gm, sites, fake_mode, list(example_args), metric or output_errors)
        all_err = guard.run(tol)
        final, converted = _commit_kept(gm, guard.active, candidates, fake_mode, hold_weights)
    return ApproxResult(final, reused + _site_reports(sites, guard), all_err, guard.err, guard.cos, tol,
                        time.perf_counter() - t0, converted)


class _Guard:
    """The accuracy guard (step 3 of the package docstring) over `sites` on `gm`: runs the exact program
    once (its outputs `ref`, each site's `local` error), then `run(tol)` reverts the most harmful site —
    or replaces it by its fallback — until the output error is within `tol`. Afterwards: `active` (the
    sites kept, fallbacks in place), `err` / `cos` (their program's error and cosine), `solo` (measured
    harm by site name), `reverted` (names) and `downgraded` (site name -> the fallback that replaced it)."""

    def __init__(self, gm: fx.GraphModule, sites: Sequence[Site], fake_mode: Any, args: list[Any],
                 compare: Callable[[Any, Any], tuple[float, float]]):
        self.gm, self.fake_mode, self.args, self.compare = gm, fake_mode, args, compare
        interp = _LocalErrors(gm, sites, fake_mode, args)
        self.ref = interp.run(*args)
        self.local: dict[str, float] = interp.local
        self.active: list[Site] = list(sites)
        self.solo: dict[str, float] = {}
        self.reverted: set[str] = set()
        self.downgraded: dict[str, Site] = {}
        self.budget = 3 * MAX_SOLO_MEASUREMENTS
        self.err, self.cos = 0.0, 1.0

    def measure(self, active: Sequence[Site]) -> tuple[float, float]:
        """(error, cosine) of the program with `active` applied, against the exact outputs."""
        if not active:
            return 0.0, 1.0
        return self.compare(build(self.gm, active, self.fake_mode)(*self.args), self.ref)

    def measure_solo(self, s: Site) -> None:
        self.solo[s.name] = self.measure([s])[0]
        self.budget -= 1

    def harm(self, s: Site) -> float:
        """Measured output error of the site alone, else its local error scaled like the measured ones'."""
        if s.name in self.solo:
            return self.solo[s.name]
        ratios = sorted(self.solo[n] / self.local[n] for n in self.solo if self.local.get(n))
        return self.local.get(s.name, math.inf) * (ratios[len(ratios) // 2] if ratios else 1.0)

    def run(self, tol: float) -> float:
        """Revert until the output error is within `tol` (or nothing is left); -> the error with every site."""
        self.err, self.cos = self.measure(self.active)
        all_err = self.err
        while self.err > tol and self.active:
            self.revert(self.most_harmful())
            self.err, self.cos = self.measure(self.active)
        return all_err

    def most_harmful(self) -> Site:
        """The active site of largest harm, measuring solo harms first where only an estimate leads."""
        if not self.solo:  # measured harm: the output error of a site alone (the most suspicious ones)
            for s in sorted(self.active, key=lambda s: -self.local.get(s.name, math.inf))[:MAX_SOLO_MEASUREMENTS]:
                self.measure_solo(s)
        worst = max(self.active, key=self.harm)
        while worst.name not in self.solo and self.budget > 0:   # an estimate leads: measure it, then choose again
            self.measure_solo(worst)
            worst = max(self.active, key=self.harm)
        return worst

    def revert(self, worst: Site) -> None:
        """Undo `worst`: its fallback takes its place when it has one, else the exact op runs there."""
        i = self.active.index(worst)
        self.reverted.add(worst.name)
        if worst.fallback is not None:   # e.g. W8A8 -> weight-only int8 before the exact op
            fb = worst.fallback
            self.active[i] = fb
            self.downgraded[worst.name] = fb
            self.measure_solo(fb)   # (its local error is not measured: one run less)
        else:
            self.active.pop(i)


def _commit_kept(gm: fx.GraphModule, active: list[Site], weights: dict[str, torch.Tensor], fake_mode: Any,
                 hold_weights: bool) -> tuple[fx.GraphModule, dict[str, str]]:
    """(the final program, {placeholder: new dtype}): `gm` with the kept sites applied, their weights
    committed (converted in place, or held) and the graph fused; `gm` itself when nothing was kept."""
    converted: dict[str, str] = {}
    new_held: dict[str, held.Held] = {}
    if active:
        final = build(gm, active, fake_mode)
        converted = commit(final, weights, fake_mode, hold=hold_weights, held_out=new_held)
        fuse(final, fake_mode)   # shared conversions merged, activation + re-quantization in int8 epilogues
    else:
        final = gm
    for ph, entry in new_held.items():   # the program is final: free the fp32 originals it no longer reads
        held.release_(weights[ph], entry)
    held.guard_modules([weights[ph] for ph in new_held])   # eager use of their modules raises
    _pin_fp32_readers(final, weights, hold_weights)
    return final, converted


def _site_reports(sites: Sequence[Site], guard: _Guard) -> list[ApproxSite]:
    """One ApproxSite per site considered, and one per fallback that replaced it, with what the guard did."""
    out_sites = []
    for s in sites:
        chain = [s]
        while chain[-1].name in guard.downgraded:
            chain.append(guard.downgraded[chain[-1].name])
        for j, c in enumerate(chain):
            why = ""
            if c.name in guard.reverted:
                why = ("; replaced by its fallback " + chain[j + 1].kind) if j + 1 < len(chain) else \
                    "; reverted by the accuracy guard (the exact op runs)"
            elif j > 0:
                why = f"; fallback chosen by the accuracy guard for {s.kind}"
            out_sites.append(ApproxSite(c.name, c.kind, list(c.nodes), guard.local.get(c.name), c.name in guard.reverted,
                                        c.note + why, guard.solo.get(c.name), c.weight))
    return out_sites


def _reuse_released(gm: fx.GraphModule, weights: dict[str, torch.Tensor], kinds: frozenset[str], released: set[str],
                    fake_mode: Any) -> tuple[fx.GraphModule, list[ApproxSite]]:
    """`gm` with every linear on a released weight in the form its converted weight allows (the first of the
    site's fallback chain whose weight transform matches it), committed to read the held weight. Raises
    `ReleasedWeightError` if a released weight is read some other way (its fp32 data is gone)."""
    forced: list[Site] = []
    for s in find_sites(gm, {ph: weights[ph] for ph in released}, kinds & {"int8", "bf16"}):
        if s.weight not in released:
            continue
        entry = held.lookup(weights[s.weight])
        c: Optional[Site] = s
        while c is not None and not (_weight_tag(c) == entry.tag and (entry.tag != "int8" or c.kn == entry.kn)):
            c = c.fallback
        if c is not None:
            forced.append(c)
    base = build(gm, forced, fake_mode) if forced else gm
    if forced:
        commit(base, {ph: weights[ph] for ph in released}, fake_mode, hold=True)
    phs = {n.name: n for n in base.graph.nodes if n.op == "placeholder"}
    still = sorted(ph for ph in released if ph in phs and phs[ph].users)
    if still:
        raise ReleasedWeightError(
            f"fusion: this graph reads weight(s) {still} as fp32, but an earlier approximate compile converted them "
            f"({', '.join(sorted({held.lookup(weights[p]).tag for p in still}))}) and released the fp32 originals; "
            "compile with the same Config.approximate as before, or load the fp32 weights into a fresh model")
    note = ("weight converted by an earlier compile of this module (its fp32 original is released), reused; "
            "the guard measures the other sites against this program")
    return base, [ApproxSite(c.name, c.kind, list(c.nodes), None, False, f"{c.note}; {note}", None, c.weight)
                  for c in forced]


def _weight_tag(s: Site) -> Optional[str]:
    if s.weight is None:
        return None
    return "bf16" if s.kind == "bf16" else "int8"


def _pin_fp32_readers(gm: fx.GraphModule, weights: dict[str, torch.Tensor], hold_weights: bool) -> None:
    """torch.compile: the weights the program still reads as fp32 must never be released by a later compile."""
    if not hold_weights:
        return
    for n in gm.graph.nodes:
        if n.op == "placeholder" and n.users and n.name in weights and not held.is_released(weights[n.name]):
            held.pin(weights[n.name])
