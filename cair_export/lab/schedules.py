"""Schedules (n, m, k) against CAIR alone and DeepCache alone: the grid, the Pareto analysis, the report.

A schedule of the runtime is a cache step n (planning steps 1..n), a guidance stop m (guided up to
step m, n..T; needs an export with fidelity CFG) and a deep interval k (after n a full fidelity step
every k-th, shallow steps between; needs an export with a deep branch), with DeepCache's two skip
modes. ``cair-export evaluate --schedules`` measures a grid of them (``cair_export.lab.evaluate``);
this module parses the grid, finds the Pareto front of quality (shape and colour accuracy, FID)
against MACs, says for each peer point whether a combined schedule beats it, and writes the report.
Nothing here runs a model.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from cair_export.lab.harness import report_heading
from cair_runtime.errors import InvalidInputError
from cair_runtime.schedule import SKIP_MODES, Schedule

CAIR = "CAIR runtime"  # CAIR alone: m = n, k = 1
SCHEDULE = "CAIR schedule"  # the combined schedules of --schedules
DEEPCACHE = "DeepCache"  # DeepCacheSDHelper on the diffusers pipeline: n = 0, guided every step (m = T)
TGATE = "T-GATE (tgate)"
PARETO_METHODS = (CAIR, SCHEDULE, DEEPCACHE)  # T-GATE gives CAIR's images (docs/quality.md): left out
SCHEDULE_SYNTAX = ("N:M:K[:MODE[:KP]] (N: a step or T; M: a step, n or T; MODE: uniform or non-uniform; KP: the "
                   "planning interval, default 1; a field may be a set {a,b,...})")


@dataclass(frozen=True)
class GridPoint:
    """One point of the ``--schedules`` grid, the CLI's ``N:M:K[:MODE[:KP]]``, before T is known."""

    cache_step: int | None  # n: steps 1..n plan (full UNet, CFG) and cache the cross-attention; None: T
    guidance_stop: int | None = None  # m in n..T: guided (batch 2B) up to step m; None: T
    deep_interval: int = 1  # k: after n, a full fidelity step every k-th, shallow steps between
    skip_mode: str = "uniform"  # where the full steps go (both phases), DeepCache's "uniform" or "non-uniform"
    planning_interval: int = 1  # k_p: before n, a full planning step every k_p-th, guided shallow ones between

    def schedule(self, steps: int) -> Schedule:
        """The runtime's schedule at T = ``steps`` (checked): n and m filled in (None: T), k = 1 where
        no shallow fidelity step can run (n = T), and uniform where no shallow step runs at all."""
        n = steps if self.cache_step is None else self.cache_step
        stop = steps if self.guidance_stop is None else self.guidance_stop
        k = 1 if n == steps else self.deep_interval
        mode = self.skip_mode if max(k, self.planning_interval) > 1 else "uniform"
        return Schedule(steps, n, stop, k, mode, planning_interval=self.planning_interval)

    def as_dict(self) -> dict[str, Any]:
        """The row fields that name the point (peers' rows, whose n may be 0)."""
        return {"cache_step": self.cache_step, "guidance_stop": self.guidance_stop,
                "deep_interval": self.deep_interval, "skip_mode": self.skip_mode,
                "planning_interval": self.planning_interval}


def _field(item: str, text: str, what: str) -> list[str]:
    """One field of an item: a value, or the values of a ``{a,b,...}`` set."""
    if text.startswith("{") and text.endswith("}"):
        values = [v.strip() for v in text[1:-1].split(",")]
    else:
        values = [text.strip()]
    if not all(values) or any(c in v for v in values for c in "{}"):
        raise InvalidInputError(f"schedule {item!r}: {what} {text!r} is empty or malformed; expected {SCHEDULE_SYNTAX}",
                                field="schedules")
    return values


def _whole(item: str, text: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise InvalidInputError(f"schedule {item!r}: {what} {text!r} is not a whole number; expected {SCHEDULE_SYNTAX}",
                                field="schedules") from None
    if value < 1:
        raise InvalidInputError(f"schedule {item!r}: {what} {value} must be at least 1", field="schedules")
    return value


def _items(text: str) -> list[str]:
    """Split at the commas outside braces."""
    items, depth, current = [], 0, ""
    for char in text:
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth not in (0, 1):
            raise InvalidInputError(f"schedules {text!r}: unbalanced or nested braces; expected {SCHEDULE_SYNTAX}",
                                    field="schedules")
        if char == "," and depth == 0:
            items.append(current.strip())
            current = ""
        else:
            current += char
    if depth:
        raise InvalidInputError(f"schedules {text!r}: a brace is not closed; expected {SCHEDULE_SYNTAX}", field="schedules")
    return [item for item in items + [current.strip()] if item]


def parse_schedules(text: str) -> tuple[GridPoint, ...]:
    """``N:M:K[:MODE[:KP]],...`` -> schedules in order, duplicates dropped.

    N is a step or ``T`` (no fidelity step: with KP > 1, DeepCache's own schedule). M is a step,
    ``n`` (= N: guidance stops at the cache step) or ``T`` (all steps guided). A field
    may be a set ``{a,b,...}``: the item stands for the product, less the combinations with m < n
    (``{3,10}:{n,5,T}:2`` is 3:3:2, 3:5:2, 3:T:2, 10:10:2, 10:T:2). n, m <= T is checked when T is known.
    """
    schedules: dict[GridPoint, None] = {}
    items = _items(text)
    if not items:
        raise InvalidInputError(f"no schedule in {text!r}; expected {SCHEDULE_SYNTAX}", field="schedules")
    for item in items:
        fields = item.split(":")
        if len(fields) not in (3, 4, 5):
            raise InvalidInputError(f"schedule {item!r} has {len(fields)} fields; expected {SCHEDULE_SYNTAX}",
                                    field="schedules")
        ns = [None if v == "T" else _whole(item, v, "cache step N (a step or T)")
              for v in _field(item, fields[0], "cache step N")]
        ms = _field(item, fields[1], "guidance stop M")
        ks = [_whole(item, v, "deep interval K") for v in _field(item, fields[2], "deep interval K")]
        modes = _field(item, fields[3], "skip mode") if len(fields) >= 4 else ["uniform"]
        kps = [_whole(item, v, "planning interval KP") for v in _field(item, fields[4], "planning interval KP")] \
            if len(fields) == 5 else [1]
        for mode in modes:
            if mode not in SKIP_MODES:
                raise InvalidInputError(f"schedule {item!r}: skip mode {mode!r} is unknown; expected one of "
                                        f"{', '.join(SKIP_MODES)}", field="schedules")
        for n, m, k, mode, kp in itertools.product(ns, ms, ks, modes, kps):
            stop = n if m == "n" else None if m == "T" else _whole(item, m, "guidance stop M (a step, n or T)")
            if n is None and stop is not None:  # n = T: guidance to the end
                if len(ns) == len(ms) == 1:
                    raise InvalidInputError(f"schedule {item!r}: with N = T the guidance stop is T too", field="schedules")
                continue
            if stop is not None and n is not None and stop < n:
                if len(ns) == len(ms) == 1:  # asked for explicitly: an error, not a silent drop
                    raise InvalidInputError(f"schedule {item!r}: guidance stop {stop} is before cache step {n}; "
                                            "use n <= m <= T", field="schedules")
                continue
            schedules[GridPoint(n, stop, k, mode, kp)] = None
    if not schedules:
        raise InvalidInputError(f"schedules {text!r} leave nothing once m < n is dropped", field="schedules")
    return tuple(schedules)


# --- the analysis ------------------------------------------------------------------------------


def row_label(row: dict[str, Any]) -> str:
    """``CAIR n=5``, ``DeepCache k=3``, ``n=5 m=25 k=3 (non-uniform)``: how the report names a row."""
    n, m, k = row["cache_step"], row["guidance_stop"], row["deep_interval"]
    if row["method"] == DEEPCACHE:
        return f"DeepCache k={k}"
    if row["method"] in (CAIR, TGATE):
        return f"{'CAIR' if row['method'] == CAIR else 'T-GATE'} n={n}"
    mode = " (non-uniform)" if row["skip_mode"] == "non-uniform" else ""
    planning = f" k_p={row['planning_interval']}" if row.get("planning_interval", 1) > 1 else ""
    return f"n={n} m={m} k={k}{planning}{mode}"


def _as_good(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """``a`` at least as accurate as ``b`` in shape and colour, and its FID no worse."""
    return (a["accuracy"]["shape"] >= b["accuracy"]["shape"] and a["accuracy"]["colour"] >= b["accuracy"]["colour"]
            and a["fid"] <= b["fid"])


def dominates(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Pareto dominance over (shape accuracy, colour accuracy, FID, GMACs): no worse in any, better in one."""
    if not (_as_good(a, b) and a["gmacs_per_image"] <= b["gmacs_per_image"]):
        return False
    return (a["accuracy"]["shape"] > b["accuracy"]["shape"] or a["accuracy"]["colour"] > b["accuracy"]["colour"]
            or a["fid"] < b["fid"] or a["gmacs_per_image"] < b["gmacs_per_image"])


def pareto_front(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows no other row dominates, cheapest first."""
    front = [row for row in rows if not any(dominates(other, row) for other in rows if other is not row)]
    return sorted(front, key=lambda row: row["gmacs_per_image"])


def cheaper_and_as_good(peer: dict[str, Any], candidates: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Candidates at least as accurate as ``peer`` (shape, colour; FID no worse) and strictly cheaper, cheapest first."""
    return sorted((c for c in candidates if _as_good(c, peer) and c["gmacs_per_image"] < peer["gmacs_per_image"]),
                  key=lambda row: row["gmacs_per_image"])


def cheapest_within(rows: Sequence[dict[str, Any]], baseline: dict[str, Any], points: float) -> dict[str, Any] | None:
    """The cheapest row whose shape accuracy is at most ``points`` below the baseline's (None: none is)."""
    bound = baseline["accuracy"]["shape"] - points / 100
    inside = [row for row in rows if row["accuracy"]["shape"] >= bound - 1e-12]
    return min(inside, key=lambda row: row["gmacs_per_image"], default=None)


def pareto_analysis(rows: Sequence[dict[str, Any]], steps: int, points: float = 1.0,
                    target_reduction: float = 2.2) -> dict[str, Any]:
    """The front, each peer point against the combined schedules, and the cheapest schedule within ``points``.

    The baseline is CAIR's n = T row. Peers: CAIR alone at each n < T, DeepCache at each interval
    k > 1. "Beaten" means some combined schedule is at least as accurate (shape and colour), has an
    FID no worse and costs fewer MACs. Reductions are the baseline's MACs over the row's.
    """
    baseline = next((r for r in rows if r["method"] == CAIR and r["cache_step"] == steps), None)
    if baseline is None:
        raise InvalidInputError(f"no CAIR row at n = T = {steps}: the Pareto analysis needs the baseline")
    pool = [r for r in rows if r["method"] in PARETO_METHODS]
    combined = [r for r in rows if r["method"] == SCHEDULE]

    def point(row: dict[str, Any] | None) -> dict[str, Any] | None:
        if row is None:
            return None
        return {"label": row_label(row), "gmacs_per_image": row["gmacs_per_image"],
                "mac_reduction": baseline["gmacs_per_image"] / row["gmacs_per_image"],
                "shape": row["accuracy"]["shape"], "colour": row["accuracy"]["colour"], "fid": row["fid"]}

    peers = []
    for row in rows:
        if (row["method"] == CAIR and row["cache_step"] < steps) or (row["method"] == DEEPCACHE and row["deep_interval"] > 1):
            better = cheaper_and_as_good(row, combined)
            peers.append({**point(row), "beaten_by": [row_label(b) for b in better],
                          "cheapest_better": point(better[0] if better else None)})
    runtime = [r for r in rows if r["method"] in (CAIR, SCHEDULE)]
    within = point(cheapest_within(runtime, baseline, points))
    return {
        "baseline": point(baseline), "points": points, "target_reduction": target_reduction,
        "front": [point(row) for row in pareto_front(pool)],
        "peers": peers,
        "cheapest_within": within,
        "target_met": within is not None and within["mac_reduction"] >= target_reduction,
        "cheapest_within_by_method": {method: point(cheapest_within([r for r in rows if r["method"] == method],
                                                                    baseline, points))
                                      for method in PARETO_METHODS if any(r["method"] == method for r in rows)},
    }


# --- the report --------------------------------------------------------------------------------


def _accuracy_error(rows: Sequence[dict[str, Any]], baseline: dict[str, Any]) -> float:
    """Standard error (points) of the baseline's shape accuracy at the grid's image count."""
    images = max(r["images"] for r in rows if r["method"] in (CAIR, SCHEDULE))
    p = baseline["shape"]
    return 100 * math.sqrt(p * (1 - p) / images)


def pareto_lines(analysis: dict[str, Any], rows: Sequence[dict[str, Any]]) -> list[str]:
    """The Pareto front, the peers' lines and the target line, as markdown."""
    base = analysis["baseline"]

    def describe(p: dict[str, Any]) -> str:
        return (f"{p['label']} ({p['gmacs_per_image']:.3f} GMACs, {p['mac_reduction']:.2f}x fewer; shape "
                f"{p['shape']:.1%}, colour {p['colour']:.1%}, FID {p['fid']:.2f})")

    lines = [f"Baseline: {describe(base)}. Standard error of its shape accuracy: about "
             f"{_accuracy_error(rows, base):.1f} points (every row uses the same seeds and prompts, so differences "
             "between rows are paired and vary less).", "",
             "**Pareto front** of (shape accuracy, colour accuracy, FID) against GMACs, cheapest first "
             f"({', '.join(PARETO_METHODS)}):", ""]
    lines += [f"- {describe(p)}" for p in analysis["front"]]
    lines += ["", "**Peers against the combined schedules** (a combined schedule at least as accurate in shape and "
              "colour, FID no worse, fewer MACs):", ""]
    for peer in analysis["peers"]:
        better = peer["cheapest_better"]
        verdict = (f"beaten by {len(peer['beaten_by'])}; cheapest: {describe(better)}" if better else "**not beaten**")
        lines.append(f"- {describe(peer)}: {verdict}")
    if not analysis["peers"]:
        lines.append("- no peer point measured")
    within, points = analysis["cheapest_within"], analysis["points"]
    lines += ["", f"**Target**: the cheapest runtime schedule within {points:g} point of the baseline's shape "
              f"accuracy ({base['shape']:.1%}) with >= {analysis['target_reduction']:g}x fewer MACs:"]
    if within is None:
        lines.append("- none within the bound -> MISSED")
    else:
        lines.append(f"- {describe(within)} -> {'met' if analysis['target_met'] else 'MISSED'}")
    for method, p in analysis["cheapest_within_by_method"].items():
        lines.append(f"- cheapest {method} row within {points:g} point: {describe(p) if p else 'none'}")
    return lines


def format_schedules_markdown(figures: dict[str, Any], command: str) -> str:
    """The schedule grid's table (one row per method and schedule) and the Pareto analysis."""
    cfg, rows = figures["config"], figures["rows"]
    analysis = figures["pareto"]
    attributes = [a for a in rows[0]["accuracy"] if a != "all"]
    front = {p["label"] for p in analysis["front"]}
    check = figures.get("plain_check")
    check_text = ("" if check is None else
                  f" CAIR alone (m = n, k = 1) on this engine against the plain engine `{check['engine']}`, first "
                  f"{check['images']} images at n = {', '.join(map(str, check['cache_steps']))}: largest pixel "
                  f"difference {check['max_abs_difference']} ({'identical images' if check['identical'] else 'NOT identical'}).")
    lines = [
        *report_heading("Schedules (n, m, k) against CAIR alone and DeepCache alone (`shapes`)", figures, command),
        f"T = {cfg['steps']}, guidance {cfg['guidance_scale']:g}, model `{cfg['model']}`, engine `{figures['engine']}` "
        f"(onnxruntime CPU, batch {cfg['max_batch']}, fidelity CFG, deep branch {cfg['deep_branch']}).{check_text} "
        f"Images: held-out single-object prompts, cycled; image k from seed {cfg['seed']} + k, the same for every row "
        "(DeepCache and T-GATE from the same initial noise). FID in the attribute classifier's 128-wide penultimate "
        f"features against {figures['real']['images']} generator drawings of the same scenes (real-vs-real floor "
        f"{figures['real']['fid_real_vs_real']:.3f}). PSNR/SSIM against the CAIR n = T image of the same seed.", "",
        f"MACs: UNet conv+linear per image. {figures['macs']}", "",
        f"DeepCache: {figures['deepcache']}. T-GATE: {figures['tgate']}.", "",
        "| method | n | m | k | mode | images | GMACs/img | MAC reduction | latency/img (s) | "
        + " | ".join(attributes) + " | all | FID | PSNR (dB) | SSIM | front |",
        "|---|---|---|---|---|---|---|---|---|" + "---|" * (len(attributes) + 5),
    ]
    base = analysis["baseline"]["gmacs_per_image"]
    order = {method: i for i, method in enumerate((CAIR, SCHEDULE, DEEPCACHE, TGATE))}
    for row in sorted(rows, key=lambda r: (order.get(r["method"], 9), -r["gmacs_per_image"], row_label(r))):
        acc = row["accuracy"]
        lines.append(
            f"| {row['method']} | {row['cache_step']} | {row['guidance_stop']} | {row['deep_interval']} | "
            f"{row['skip_mode']} | {row['images']} | {row['gmacs_per_image']:.3f} | "
            f"{base / row['gmacs_per_image']:.2f}x | {row['latency_s_per_image']:.4f} | "
            + " | ".join(f"{acc[a]:.1%}" for a in attributes)
            + f" | {acc['all']:.1%} | {row['fid']:.3f} | {row['psnr_db']:.1f} | {row['ssim']:.4f} | "
            f"{'yes' if row['method'] in PARETO_METHODS and row_label(row) in front else ''} |")
    lines += ["", *pareto_lines(analysis, rows)]
    return "\n".join(lines) + "\n"


def plot_schedules(figures: dict[str, Any], path: Path) -> None:
    """Shape accuracy, colour accuracy and FID against GMACs (top) and latency (bottom); the front ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, analysis = figures["rows"], figures["pareto"]
    front = {p["label"] for p in analysis["front"]}
    base = analysis["baseline"]
    metrics = (("shape accuracy (%)", lambda r: 100 * r["accuracy"]["shape"]),
               ("colour accuracy (%)", lambda r: 100 * r["accuracy"]["colour"]),
               ("FID (classifier features)", lambda r: r["fid"]))
    axes_x = (("GMACs per image (UNet, conv+linear)", "gmacs_per_image"), ("latency per image (s)", "latency_s_per_image"))
    styles = {CAIR: ("o", "tab:blue"), SCHEDULE: (".", "tab:orange"), DEEPCACHE: ("s", "tab:green"),
              TGATE: ("x", "tab:gray")}
    fig, axes = plt.subplots(len(axes_x), len(metrics), figsize=(15, 8.5), constrained_layout=True)
    for row_index, (xlabel, xkey) in enumerate(axes_x):
        for col, (ylabel, value) in enumerate(metrics):
            axis = axes[row_index][col]
            for method in dict.fromkeys(r["method"] for r in rows):
                marker, colour = styles.get(method, ("^", "black"))
                chosen = sorted((r for r in rows if r["method"] == method), key=lambda r: r["gmacs_per_image"])
                xs, ys = [r[xkey] for r in chosen], [value(r) for r in chosen]
                axis.scatter(xs, ys, marker=marker, color=colour, s=40 if method != SCHEDULE else 60, label=method,
                             zorder=3)
                if method in (CAIR, DEEPCACHE) and xkey == "gmacs_per_image":  # the peers' curves over n and k
                    axis.plot(xs, ys, color=colour, alpha=0.5, zorder=2)
            on_front = sorted((r for r in rows if r["method"] in PARETO_METHODS and row_label(r) in front),
                              key=lambda r: r[xkey])
            axis.scatter([r[xkey] for r in on_front], [value(r) for r in on_front], s=140, facecolors="none",
                         edgecolors="black", linewidths=1.2, label="Pareto front (all three metrics and GMACs)",
                         zorder=4)
            for r in on_front if xkey == "gmacs_per_image" else ():  # labels once, on the MAC axis
                axis.annotate(row_label(r).replace("DeepCache ", "DC "), (r[xkey], value(r)), fontsize=6,
                              xytext=(3, 3), textcoords="offset points")
            if col == 0:
                axis.axhline(100 * base["shape"] - analysis["points"], color="gray", linestyle=":",
                             label=f"baseline - {analysis['points']:g} point")
            if xkey == "gmacs_per_image":
                axis.axvline(base["gmacs_per_image"] / analysis["target_reduction"], color="red", linestyle=":",
                             label=f"{analysis['target_reduction']:g}x fewer MACs")
            axis.set_xlabel(xlabel)
            axis.set_ylabel(ylabel)
            axis.grid(alpha=0.3)
            if row_index == 0 and col == 0:
                axis.legend(fontsize=7)
    fig.suptitle(f"shapes: quality against cost over schedules (n, m, k), T = {figures['config']['steps']}; "
                 "CAIR alone, combined schedules, DeepCache alone")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
