"""Human-readable outputs of a compression search: a Markdown table and a Pareto plot.

The JSON written by ``compression.search`` is the record; this module only renders it. A row
is one variant (a technique alone or a recipe) with its exported ``.tflite`` figures.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt  # noqa: E402

_LOGGER = logging.getLogger(__name__)

# Objectives of the frontier: (key, +1 = higher is better / -1 = lower is better).
OBJECTIVES = (("tflite_bytes", -1), ("ndcg10", +1), ("hr10", +1), ("host_p50_ms", -1))


def dominates(a: Mapping, b: Mapping, objectives: Sequence[tuple[str, int]] = OBJECTIVES) -> bool:
    """True when ``a`` is at least as good as ``b`` on every objective and better on one."""
    better = False
    for key, sign in objectives:
        va, vb = a.get(key), b.get(key)
        if va is None or vb is None:
            return False
        if sign * va < sign * vb:
            return False
        if sign * va > sign * vb:
            better = True
    return better


def pareto_front(rows: Sequence[Mapping], objectives: Sequence[tuple[str, int]] = OBJECTIVES) -> list[str]:
    """Names of the rows no other row dominates (rows without figures are never on it)."""
    complete = [r for r in rows if all(r.get(k) is not None for k, _ in objectives)]
    return [r["name"] for r in complete
            if not any(dominates(other, r, objectives) for other in complete if other is not r)]


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _runtimes(row: Mapping) -> str:
    runtimes = row.get("runtimes") or {}
    if not runtimes:
        return "-"
    return ", ".join(f"{name.split('==')[0]} {'yes' if info.get('loads') else 'NO'}"
                     for name, info in sorted(runtimes.items()))


def _table_row(row: Mapping, ref: Mapping, on_front: bool) -> str:
    techniques = ", ".join(row.get("techniques", []))
    if row.get("error"):
        return f"| {row['name']} | {techniques} |" + " - |" * 10 + f" | failed: {row['error'][:80]} |"
    size, ref_ndcg = row["tflite_bytes"], ref["ndcg10"]
    gzip_kib = row["gzip_bytes"] / 1024 if row.get("gzip_bytes") else None
    cells = [row["name"], techniques, row.get("quantization", "none"), f"{size / 1024:.1f}",
             _fmt(gzip_kib, ".1f"),
             f"{ref['tflite_bytes'] / size:.1f}", f"{row['hr10']:.4f}", f"{row['ndcg10']:.4f}",
             f"{row['ndcg10'] / ref_ndcg:.3f}", f"{row['mrr']:.4f}", _fmt(row.get("host_p50_ms"), ".3f"),
             "*" if on_front else "", _runtimes(row)]
    return "| " + " | ".join(cells) + " |"


def markdown_table(result: Mapping) -> str:
    """The search result as Markdown: reference, baselines, every variant, the best pick."""
    ref = result["reference"]
    floor = result.get("floor")
    ref_bytes, ref_ndcg = ref["tflite_bytes"], ref["ndcg10"]
    lines = [f"# Compression search `{result.get('run', '')}`", ""]
    lines.append(f"Reference: {ref_bytes / 1024:.1f} KiB, HR@10 {ref['hr10']:.4f}, NDCG@10 {ref_ndcg:.4f}, "
                 f"MRR {ref['mrr']:.4f}, host p50 {_fmt(ref.get('host_p50_ms'), '.3f')} ms. "
                 f"Data: {result.get('data', {})}.")
    arch = ref.get("architecture")
    if arch:
        lines.append(f"Reference architecture: {arch}.")
    lines += ["", *baseline_table(result.get("baselines", {}), ref), ""]
    candidates = (ref.get("training") or {}).get("candidates") or {}
    if candidates:
        lines += ["Reference candidates (chosen by validation NDCG@10):", "",
                  "| candidate | params | best epoch | val NDCG@10 | test HR@10 | test NDCG@10 | test MRR | "
                  "float32 KiB | tflite-runtime 2.14 |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for name, cand in candidates.items():
            export = cand.get("export") or {}
            legacy = [info.get("loads") for key, info in (export.get("runtimes") or {}).items()
                      if key.startswith("tflite-runtime")]
            lines.append(f"| {name} | {cand.get('params')} | {cand.get('best_epoch')} | "
                         f"{cand['val']['ndcg10']:.4f} | {cand['test']['hr10']:.4f} | {cand['test']['ndcg10']:.4f} | "
                         f"{cand['test']['mrr']:.4f} | {_fmt(export.get('tflite_bytes', 0) / 1024 or None, '.1f')} | "
                         f"{'-' if not legacy else ('yes' if legacy[0] else 'NO')} |")
        lines.append("")
    if floor is not None:
        lines.append(f"Floor: NDCG@10 >= {floor} x reference = {floor * ref_ndcg:.4f}.")
    lines += ["", "| variant | techniques | export | tflite KiB | gzip KiB | x smaller | HR@10 | NDCG@10 | "
              "NDCG / ref | MRR | host p50 ms | Pareto | loads in |",
              "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: | --- |"]
    front = set(result.get("pareto", []))
    for row in sorted(result.get("variants", []), key=lambda r: (r.get("tflite_bytes") is None,
                                                                 r.get("tflite_bytes") or 0)):
        lines.append(_table_row(row, ref, row["name"] in front))
    best = result.get("best")
    lines.append("")
    if best:
        lines.append(f"**Best** (smallest meeting the floor): `{best['name']}` = "
                     f"{' -> '.join(best['recipe'])}, {best['tflite_bytes'] / 1024:.1f} KiB "
                     f"({ref_bytes / best['tflite_bytes']:.1f}x smaller), "
                     f"NDCG@10 {best['ndcg10']:.4f} ({best['ndcg10'] / ref_ndcg:.3f} x ref); "
                     f"artifact `{best.get('artifact')}`.")
    else:
        lines.append("**No variant met the floor.**")
    notes = [f"- `{row['name']}`: {row['size_note']}"
             for row in result.get("variants", []) if row.get("size_note")]
    if notes:
        lines += ["", "Notes:"] + notes
    return "\n".join(lines) + "\n"


def baseline_points(baselines: Mapping) -> list[tuple[str, int, float]]:
    """(label, device bytes, test NDCG@10) of every baseline that has a device form."""
    points = []
    tuned = baselines.get("itemknn_tuned")
    if tuned:
        for key, table in sorted(tuned.get("tables", {}).items()):
            points.append((f"item-to-item {key} table", table["bytes"], table["ndcg10"]))
    sknn = baselines.get("sknn")
    if sknn and sknn.get("device_bytes"):
        points.append(("session-kNN store", sknn["device_bytes"], sknn["ndcg10"]))
    return points


def baseline_table(baselines: Mapping, ref: Mapping) -> list[str]:
    """Markdown lines: every baseline with its tuned setting, test figures and device bytes."""
    lines = ["| baseline | setting (tuned on validation) | HR@10 | NDCG@10 | MRR | NDCG / ref | device bytes |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, fig in sorted(baselines.items()):
        setting = ", ".join(f"{k}={fig[k]}" for k in ("normalised", "decay", "k") if k in fig)
        if name == "itemknn":
            setting += " (untuned)"
        size = fig.get("table_bytes") or fig.get("device_bytes")
        lines.append(f"| {name} | {setting or '-'} | {fig['hr10']:.4f} | {fig['ndcg10']:.4f} | {fig['mrr']:.4f} | "
                     f"{fig['ndcg10'] / ref['ndcg10']:.3f} | {_fmt(size, 'd')} |")
        for key, table in sorted(fig.get("tables", {}).items()):
            lines.append(f"| {name} {key} (int16 ids + float16 weights) | as above | {table['hr10']:.4f} | "
                         f"{table['ndcg10']:.4f} | {table['mrr']:.4f} | {table['ndcg10'] / ref['ndcg10']:.3f} | "
                         f"{table['bytes']} |")
    return lines


def pareto_plot(result: Mapping, path: Path) -> Path:
    """Scatter of .tflite size vs NDCG@10 (log x), frontier, floor and baselines marked."""
    ref = result["reference"]
    rows = [r for r in result.get("variants", []) if not r.get("error")]
    front = set(result.get("pareto", []))
    fig, ax = plt.subplots(figsize=(10, 6.5), dpi=110)
    for row in rows:
        on_front = row["name"] in front
        ax.scatter(row["tflite_bytes"] / 1024, row["ndcg10"], s=40 if on_front else 22, zorder=3,
                   c="tab:blue" if on_front else "tab:gray", edgecolors="black" if on_front else "none")
        ax.annotate(row["name"], (row["tflite_bytes"] / 1024, row["ndcg10"]), fontsize=6.5,
                    xytext=(3, 3), textcoords="offset points", color="black" if on_front else "dimgray")
    # 2-D frontier (size vs NDCG) as a staircase: the best NDCG reachable at each size.
    pts = sorted((r["tflite_bytes"] / 1024, r["ndcg10"]) for r in rows)
    stair, best = [], float("-inf")
    for x, y in pts:
        if y > best:
            stair.append((x, y))
            best = y
    if stair:
        ax.step([p[0] for p in stair], [p[1] for p in stair], where="post", color="tab:blue", alpha=0.5,
                label="size/NDCG frontier")
    ax.scatter([ref["tflite_bytes"] / 1024], [ref["ndcg10"]], marker="*", s=220, c="tab:red", zorder=4,
               label="float32 reference")
    if result.get("floor") is not None:
        ax.axhline(result["floor"] * ref["ndcg10"], color="tab:red", ls=":",
                   label=f"floor {result['floor']} x ref")
    colors = ("tab:olive", "tab:purple", "tab:brown")
    for (name, figures), color in zip(sorted(result.get("baselines", {}).items()), colors, strict=False):
        ax.axhline(figures["ndcg10"], color=color, ls="--", lw=1, label=f"baseline {name}")
    for label, size, ndcg in baseline_points(result.get("baselines", {})):
        ax.scatter([size / 1024], [ndcg], marker="s", s=60, c="tab:orange", edgecolors="black", zorder=4)
        ax.annotate(label, (size / 1024, ndcg), fontsize=7, xytext=(4, -9), textcoords="offset points",
                    color="tab:orange")
    best = result.get("best")
    if best:
        ax.scatter([best["tflite_bytes"] / 1024], [best["ndcg10"]], marker="o", s=160, facecolors="none",
                   edgecolors="tab:green", linewidths=2, zorder=5, label=f"best: {best['name']}")
    ax.axvline(ref["tflite_bytes"] / 1024 / 16, color="tab:green", ls="-.", lw=1, label="16x smaller")
    ax.set_xscale("log")
    ax.set_xlabel(".tflite size / baseline device bytes (KiB, log scale); squares: baselines at device size")
    ax.set_ylabel("NDCG@10 (full ranking, test)")
    ax.set_title(f"Compression variants: size vs quality ({result.get('run', '')})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    _LOGGER.info("wrote Pareto plot %s", path)
    return path
