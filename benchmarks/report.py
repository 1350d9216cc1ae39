"""Turn the samples of a run into ``results.json``, ``results.md`` and ``results.png``.

Every figure is the median of its samples with [min–max]; GB/s are weight bytes
(1 GB = 10^9 bytes) over the median time; a speedup is nvidia-modelopt's median
time over the other's median time (above 1: faster than nvidia-modelopt).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import libraries

GB = 1e9
HEADLINE_OP = "is_converted + modelopt_state"
HEADLINE_MODULES = 20000
HEADLINE_TARGET = 5.0
LIMIT_NAMES = {"memcpy": "memcpy (torch copy_)", "write": "sequential write + fsync", "read": "sequential read"}

Series = dict[str, Any]


def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarize(series: Series) -> dict[str, Any]:
    """The figures of one series, from its samples."""
    samples = series["samples"]
    summary: dict[str, Any] = {"seconds": _stats([s["seconds"] for s in samples])}
    if samples and "fsync_seconds" in samples[0] and series["group"] in ("save", "count save"):
        summary["durable_seconds"] = _stats([s["seconds"] + s["fsync_seconds"] for s in samples])
        summary["file_bytes"] = samples[-1]["file_bytes"]
    if samples and "rss_anon" in samples[0]:
        summary["extra_rss_anon_bytes"] = _stats([s["rss_anon"]["extra_peak"] for s in samples])
    weight_bytes = series["params"].get("weight_bytes")
    if weight_bytes and summary["seconds"]:
        summary["gb_per_s"] = weight_bytes / GB / summary["seconds"]["median"]
    return summary


def _find(all_series: list[Series], group: str, params: dict[str, Any], name: str) -> Series | None:
    return next((s for s in all_series if s["group"] == group and s["params"] == params and s["name"] == name), None)


def _speedup(all_series: list[Series], series: Series, reference: str, key: str = "seconds") -> float | None:
    ref = _find(all_series, series["group"], series["params"], reference)
    ours, theirs = series["summary"].get(key), ref and ref["summary"].get(key)
    if not ours or not theirs or ref is series:
        return None
    return theirs["median"] / ours["median"]


# -- formatting ------------------------------------------------------------------------


def _unit(seconds: float) -> tuple[float, str]:
    if seconds < 1e-3:
        return 1e6, "µs"
    if seconds < 1:
        return 1e3, "ms"
    return 1, "s"


def fmt_time(stats: dict[str, float] | None, spread: bool = True) -> str:
    """``12.3 ms [11.9–13.0]``: the median with its range, in one unit."""
    if not stats:
        return "–"
    scale, unit = _unit(stats["median"])
    text = f"{_num(stats['median'] * scale)} {unit}"
    if spread and stats["n"] > 1:
        text += f" [{_num(stats['min'] * scale)}–{_num(stats['max'] * scale)}]"
    return text


def _num(x: float) -> str:
    """Three significant digits, never in exponent form."""
    return f"{x:.3g}" if x < 1000 else f"{x:.0f}"


def _fmt_ratio(ratio: float | None) -> str:
    return f"{ratio:.2f}×" if ratio else "–"


class Skips:
    """Why series were skipped: each distinct reason once, cited by number in the tables."""

    def __init__(self) -> None:
        self.reasons: list[str] = []

    def cite(self, series: Series | None) -> str:
        """``skipped [n]`` for a series with no samples (or missing altogether)."""
        errors = series["errors"] if series else []
        reason = errors[0].strip().splitlines()[0] if errors else "not measured"
        if reason not in self.reasons:
            self.reasons.append(reason)
        return f"skipped [{self.reasons.index(reason) + 1}]"

    def markdown(self) -> str:
        return "\n".join(f"{i}. {reason}" for i, reason in enumerate(self.reasons, 1))


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _by(all_series: list[Series], group: str) -> list[Series]:
    """The series of one group in run order of their parameters, then in ``libraries.METHODS`` order."""
    chosen = [s for s in all_series if s["group"] == group]
    first = {}
    for i, s in enumerate(chosen):
        first.setdefault(json.dumps(s["params"], sort_keys=True), i)
    order = {m.name: i for i, m in enumerate(libraries.METHODS)}
    return sorted(chosen, key=lambda s: (first[json.dumps(s["params"], sort_keys=True)], order.get(s["name"], len(order))))


def _rate(series: Series, seconds: float) -> str:
    """GB/s of weights for the size axis, µs per tensor for the count axis."""
    tensors = series["params"].get("tensors")
    if tensors:
        return f"{seconds / tensors * 1e6:.1f}"
    return f"{series['params']['weight_bytes'] / GB / seconds:.2f}"


def _rate_header(group: str) -> str:
    return "µs per tensor" if group.startswith("count") else "GB/s"


def save_table(all_series: list[Series], skips: Skips, group: str = "save") -> str:
    """The saves of one axis: ``save`` (by size) or ``count save`` (by tensor count)."""
    rows = []
    for s in _by(all_series, group):
        size = s["params"]["size"]
        if not s["samples"]:
            rows.append([size, s["name"], skips.cite(s), "–", "–", "–"])
            continue
        summary = s["summary"]
        call = _speedup(all_series, s, libraries.REFERENCE_METHOD)
        durable = _speedup(all_series, s, libraries.REFERENCE_METHOD, "durable_seconds")
        rows.append([
            size,
            s["name"],
            fmt_time(summary["seconds"]),
            fmt_time(summary["durable_seconds"], spread=False),
            _rate(s, summary["durable_seconds"]["median"]),
            f"{_fmt_ratio(call)} / {_fmt_ratio(durable)}" if call or durable else "–",
        ])
    first = "tensors" if group.startswith("count") else "model"
    header = [first, "method", "save call", "call + fsync", f"{_rate_header(group)} (with fsync)",
              "speedup vs nvidia (call / with fsync)"]
    return _table(header, rows)


def restore_table(all_series: list[Series], skips: Skips, group: str = "restore") -> str:
    """The restores of one axis: ``restore`` (by size) or ``count restore`` (by tensor count)."""
    rows = []
    for s in _by(all_series, group):
        p = s["params"]
        if not s["samples"]:
            rows.append([p["size"], p["cache"], s["name"], skips.cite(s), "–", "–", "–"])
            continue
        summary = s["summary"]
        extra = summary["extra_rss_anon_bytes"]["max"]
        weights = p.get("weight_bytes")
        rows.append([
            p["size"],
            p["cache"],
            s["name"],
            fmt_time(summary["seconds"]),
            _rate(s, summary["seconds"]["median"]),
            f"{extra / 1e6:,.0f} MB ({extra / weights:.2f}×)" if weights else f"{extra / 1e6:,.1f} MB",
            _fmt_ratio(_speedup(all_series, s, libraries.REFERENCE_METHOD)),
        ])
    first, memory = ("tensors", "peak extra RssAnon") if group.startswith("count") else (
        "model", "peak extra RssAnon (× weights)")
    header = [first, "cache", "method", "restore", _rate_header(group), memory, "speedup vs nvidia"]
    return _table(header, rows)


def limits_table(all_series: list[Series], skips: Skips) -> str:
    rows = []
    for s in _by(all_series, "limit"):
        p = s["params"]
        name = LIMIT_NAMES[s["name"]] + (f" ({p['cache']} cache)" if p.get("cache") else "")
        if not s["samples"]:
            rows.append([p["size"], name, skips.cite(s), "–"])
            continue
        rows.append([p["size"], name, fmt_time(s["summary"]["seconds"]), f"{s['summary']['gb_per_s']:.2f}"])
    return _table(["bytes of", "operation", "time", "GB/s"], rows)


def bookkeeping_table(all_series: list[Series], skips: Skips) -> tuple[str, str]:
    """The bookkeeping table and the headline sentence."""
    rows = []
    headline = f"{HEADLINE_OP} at {HEADLINE_MODULES:,} modules: not measured"
    ours_name, ref_name = "modelopt_c", libraries.REFERENCE
    for s in _by(all_series, "bookkeeping"):
        if s["name"] != ref_name:
            continue
        p = s["params"]
        ours = _find(all_series, "bookkeeping", p, ours_name)
        if p["op"] == "all":  # the reference failed on this model altogether
            rows.append([f"{p['modules']:,}", "all", "–", skips.cite(s), "–"])
            continue
        if ours is None:
            ours = _find(all_series, "bookkeeping", {"modules": p["modules"], "op": "all"}, ours_name)
        ours_cell = fmt_time(ours["summary"]["seconds"]) if ours and ours["samples"] else skips.cite(ours)
        ratio = _speedup(all_series, ours, ref_name) if ours and ours["samples"] else None
        rows.append([f"{p['modules']:,}", p["op"], ours_cell, fmt_time(s["summary"]["seconds"]), _fmt_ratio(ratio)])
        if p["op"] == HEADLINE_OP and p["modules"] == HEADLINE_MODULES:
            verdict = "target met" if ratio and ratio >= HEADLINE_TARGET else "target NOT met"
            headline = (
                f"**Headline (bookkeeping@20k): {HEADLINE_OP} at {HEADLINE_MODULES:,} modules: modelopt_c "
                f"{fmt_time(ours['summary']['seconds'], False) if ratio else '–'} vs nvidia-modelopt "
                f"{fmt_time(s['summary']['seconds'], False)}: {_fmt_ratio(ratio)} "
                f"(target ≥ {HEADLINE_TARGET:g}×: {verdict if ratio else 'not measured'}).**"
            )
    table = _table(["modules", "call", "modelopt_c", "nvidia-modelopt", "speedup"], rows)
    return table, headline


def import_table(all_series: list[Series], skips: Skips) -> str:
    rows = []
    for variant, label in (("after torch", "import, torch already imported"), ("with torch", "import, torch included")):
        cells = []
        for name in ("modelopt_c", libraries.REFERENCE):
            s = _find(all_series, "import", {"variant": variant}, name)
            cells.append(fmt_time(s["summary"]["seconds"]) if s and s["samples"] else skips.cite(s))
        ours = _find(all_series, "import", {"variant": variant}, "modelopt_c")
        ratio = _speedup(all_series, ours, libraries.REFERENCE) if ours and ours["samples"] else None
        rows.append([label, *cells, _fmt_ratio(ratio)])
    torch_alone = _find(all_series, "import", {"variant": "torch alone"}, "torch")
    if torch_alone:
        rows.append(["import torch alone", fmt_time(torch_alone["summary"]["seconds"]), "", ""])
    return _table(["what", "modelopt_c", "nvidia-modelopt (modelopt.torch.opt)", "speedup"], rows)


def markdown(run: dict[str, Any], all_series: list[Series]) -> str:
    m = run["machine"]
    skips = Skips()
    saves, restores, limits = (f(all_series, skips) for f in (save_table, restore_table, limits_table))
    count_saves, count_restores = save_table(all_series, skips, "count save"), restore_table(
        all_series, skips, "count restore")
    axes = run.get("axes", ["sizes", "counts", "bookkeeping", "imports"])
    bookkeeping, headline = bookkeeping_table(all_series, skips) if "bookkeeping" in axes else ("", "")
    imports = import_table(all_series, skips) if "imports" in axes else ""
    cap = run.get("nvidia_max_tensors")
    count_note = (
        "N tensors: N/2 `nn.Linear(4, 4)` layers in nested `nn.Sequential`s of at most 32 children; restores "
        "with a warm page cache; µs per tensor = median time / N"
        + (f"; nvidia-modelopt restores up to {cap:,} tensors" if cap else "") + ".\n\n"
    )
    versions = ", ".join(
        f"{family} {hello.get('version') or '(unavailable)'}" for family, hello in run["libraries"].items()
    )
    sections = [
        ("## Checkpoints: save", saves),
        ("## Checkpoints: restore", restores),
        ("## Machine limits (same bytes, same folder)", limits),
        ("## Tensor count: save", count_saves),
        ("## Tensor count: restore", count_restores),
        ("## Bookkeeping", bookkeeping),
        ("## Import time (fresh interpreter)", imports),
    ]
    parts = [
        f"# modelopt_c benchmarks ({run['settings']['mode']} run, {m['date_utc']})",
        f"{m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM, Linux {m['kernel']}, Python {m['python']}, "
        f"torch {m['torch']}; {versions}; commit {m['git_commit']}; files on {m['scratch_filesystem']}. "
        f"Page cache for restores: {' and '.join(run['page_cache'])}. "
        f"Median [min–max] of {run['settings']['reps']} runs per checkpoint figure, each in a fresh process; "
        f"run took {run['wall_seconds']:.0f} s.",
        *([headline] if headline else []),
        *(f"{title}\n\n{count_note if 'count' in title else ''}{table}"
          for title, table in sections if table.count("\n|") > 1),  # a table with at least one row
    ]
    if skips.reasons:
        parts.append("## Skipped\n\n" + skips.markdown())
    if run["notes"]:
        parts.append("## Notes\n\n" + "\n".join(f"* {note}" for note in run["notes"]))
    return "\n\n".join(parts) + "\n"


def _points(all_series: list[Series], group: str, name: str, key: str, stat: str) -> list[tuple[float, float]]:
    """(x, figure) of one method, warm cache: x is GB of fp32 weights (size axis) or tensors (count axis)."""
    return sorted(
        (s["params"]["tensors"] if "tensors" in s["params"] else s["params"]["weight_bytes"] / GB,
         s["summary"][key][stat])
        for s in all_series
        if s["group"] == group and s["name"] == name and s["samples"]
        and s["params"].get("dtype", "float32") == "float32" and s["params"].get("cache") in (None, "warm")
    )


def plot(path: Path, all_series: list[Series]) -> str | None:
    """Save time, restore time and restore memory against model size, and against tensor count
    when the run measured it (a second row, log-log); why not, if not written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: results.png not written (pip install matplotlib)"

    panels = (  # group, summary key, statistic, scale, title, machine limit drawn dashed
        ("save", "durable_seconds", "median", 1, "save + fsync (s, median)", "write"),
        ("restore", "seconds", "median", 1, "restore, warm page cache (s, median)", "read"),
        ("restore", "extra_rss_anon_bytes", "max", 1 / GB, "restore: peak extra RssAnon (GB)", None),
    )
    # (group prefix, x label, log axes) per row: the rows the run has samples for
    rows = [row for row in (("", "fp32 weights (GB)", False), ("count ", "tensors", True))
            if any(s["group"] == row[0] + "save" and s["samples"] for s in all_series)]
    if not rows:
        return "no checkpoint figures: results.png not written"
    fig, grid = plt.subplots(len(rows), 3, figsize=(18, 5.5 * len(rows)), squeeze=False)
    for (prefix, xlabel, log), axes in zip(rows, grid):
        for ax, (group, key, stat, scale, title, limit) in zip(axes, panels):
            if prefix and scale != 1:  # a few MB of tensors: memory in MB
                scale, title = scale * GB / 1e6, title.replace("(GB)", "(MB)")
            for i, method in enumerate(libraries.METHODS):
                points = _points(all_series, prefix + group, method.name, key, stat)
                if points:
                    xs, ys = zip(*points)
                    ax.plot(xs, [y * scale for y in ys], marker="osD^vPX"[i % 7], color=f"C{i}", alpha=0.85,
                            label=method.name)
            points = _points(all_series, "limit", limit, "seconds", "median") if limit and not prefix else []
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, linestyle="--", color="black", label="machine: " + LIMIT_NAMES[limit])
            ax.set_title(("by tensor count: " if prefix else "") + title)
            ax.set_xlabel(xlabel)
            if log:
                ax.set_xscale("log")
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_all(out: Path, run: dict[str, Any], all_series: list[Series]) -> str:
    """Write the three result files into ``out``; return the Markdown."""
    for series in all_series:
        series["summary"] = summarize(series)
    text = markdown(run, all_series)
    problem = plot(out / "results.png", all_series)
    if problem:
        run["notes"].append(problem)
        text = markdown(run, all_series)
    (out / "results.json").write_text(json.dumps({"run": run, "series": all_series}, indent=1) + "\n")
    (out / "results.md").write_text(text)
    return text
