"""
Training curves from metrics.jsonl as a dependency-free SVG (the house style of eval.py's accuracy_vs_length_svg):
one panel per metric over training steps.

    python plot.py out/grpo_demo/metrics.jsonl                            # -> out/grpo_demo/metrics.svg
    python plot.py out/grpo_demo/metrics.jsonl --keys=heldout_accuracy,kl,entropy --out=grpo.svg
    python plot.py out/sft_a/metrics.jsonl out/sft_b/metrics.jsonl        # several runs, one line each

From code, plot_runs draws several settings x seeds: a thin line per run and a thick mean line per setting
(experiments/ uses it for every question).
"""

import json
import math
import os
import sys

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f",
          "#bcbd22"]
DEFAULT_KEYS = ["heldout_accuracy", "loss", "reward", "kl", "entropy", "length"]
WIDTH, PANEL_HEIGHT, MARGIN = 560, 240, 52


def read_metrics(path) -> list[dict]:
    """The JSON lines of a metrics.jsonl (a line torn by a kill is skipped)."""
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def series(records, key) -> list[tuple[float, float]]:
    """(step, value) of every line holding a finite `key`, by step (a step logged twice keeps its last value)."""
    points = {}
    for record in records:
        value, step = record.get(key), record.get("step")
        if isinstance(value, (int, float)) and isinstance(step, (int, float)) and math.isfinite(value):
            points[step] = float(value)
    return sorted(points.items())


def mean_series(runs) -> list[tuple[float, float]]:
    """The mean over runs at the steps every run logged (runs: lists of (step, value))."""
    runs = [dict(run) for run in runs if run]
    if not runs:
        return []
    steps = sorted(set.intersection(*(set(run) for run in runs)))
    return [(step, sum(run[step] for run in runs) / len(runs)) for step in steps]


def _nice(low, high):
    if low == high:
        low, high = low - (abs(low) or 1) * 0.5, high + (abs(high) or 1) * 0.5
    return low, high


def _label(value):
    return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.2e}"


def panel(lines, key, top, x_range, width=WIDTH, height=PANEL_HEIGHT, margin=MARGIN, xlabel="step",
          xticks=None) -> list[str]:
    """SVG elements of one panel at vertical offset `top`. lines: [(label, color, points, stroke_width, opacity)];
    the x range is shared by all panels, the y range is this key's."""
    values = [v for _, _, points, _, _ in lines for _, v in points]
    y_low, y_high = _nice(min(values), max(values)) if values else (0.0, 1.0)
    x_low, x_high = x_range
    x = lambda step: margin + (width - 2 * margin) * (step - x_low) / (x_high - x_low)
    y = lambda value: top + height - margin + 8 - (height - margin - 16) * (value - y_low) / (y_high - y_low)
    bottom = y(y_low)
    parts = [f'<line x1="{margin}" y1="{bottom:.1f}" x2="{width - margin}" y2="{bottom:.1f}" stroke="black"/>',
             f'<line x1="{margin}" y1="{bottom:.1f}" x2="{margin}" y2="{y(y_high):.1f}" stroke="black"/>',
             f'<text x="{margin}" y="{top + 14}" font-weight="bold">{key}</text>',
             f'<text x="{width / 2}" y="{bottom + 28:.1f}" text-anchor="middle">{_escape(xlabel)}</text>']
    for value in (y_low, (y_low + y_high) / 2, y_high):
        parts.append(f'<text x="{margin - 6}" y="{y(value) + 4:.1f}" text-anchor="end">{_label(value)}</text>')
    for step, text in (xticks or {x_low: _label(x_low), x_high: _label(x_high)}).items():
        parts.append(f'<text x="{x(step):.1f}" y="{bottom + 14:.1f}" text-anchor="middle">{_escape(text)}</text>')
    for _, color, points, stroke, opacity in lines:
        if len(points) == 1:  # one point (an eval at the end only): a dot
            (step, value), = points
            parts.append(f'<circle cx="{x(step):.1f}" cy="{y(value):.1f}" r="{stroke + 1}" fill="{color}" '
                         f'fill-opacity="{opacity}"/>')
        elif points:
            coordinates = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in points)
            parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="{stroke}" stroke-opacity="{opacity}" '
                         f'points="{coordinates}"/>')
    return parts


def write_svg(panels_lines, keys, legend, path, title="", xlabel="step", xticks=None):
    """panels_lines: one list of lines per key (see panel); legend: [(label, color)]. Writes one SVG, panels
    stacked, the legend at the top."""
    steps = [s for lines in panels_lines for _, _, points, _, _ in lines for s, _ in points]
    x_range = _nice(min(steps), max(steps)) if steps else (0.0, 1.0)
    legend_height = 18 + 14 * len(legend) + (16 if title else 0)
    height = legend_height + PANEL_HEIGHT * len(keys)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-size="11" '
             f'font-family="sans-serif">', f'<rect width="{WIDTH}" height="{height}" fill="white"/>']
    if title:
        parts.append(f'<text x="{WIDTH / 2}" y="16" text-anchor="middle" font-size="13">{_escape(title)}</text>')
    for k, (label, color) in enumerate(legend):
        parts.append(f'<text x="{WIDTH - MARGIN}" y="{(16 if title else 0) + 16 + 14 * k}" fill="{color}" '
                     f'text-anchor="end">{_escape(label)}</text>')
    for k, (key, lines) in enumerate(zip(keys, panels_lines)):
        parts += panel(lines, key, legend_height + PANEL_HEIGHT * k, x_range, xlabel=xlabel, xticks=xticks)
    parts.append("</svg>")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(parts) + "\n")
    return path


def _escape(text):
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def present_keys(record_lists, keys=None) -> list[str]:
    """The keys to draw: those asked for, or the default ones some run logged."""
    if keys:
        return list(keys)
    logged = {k for records in record_lists for r in records for k in r}
    return [k for k in DEFAULT_KEYS if k in logged] or ["loss"]


def plot_run(paths, keys=None, out=None, title="") -> str:
    """One line per metrics.jsonl, one panel per key; returns the SVG's path."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    record_lists = [read_metrics(p) for p in paths]
    keys = present_keys(record_lists, keys)
    out = out or os.path.join(os.path.dirname(paths[0]) or ".", "metrics.svg")
    labels = [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in paths]
    colors = [COLORS[i % len(COLORS)] for i in range(len(paths))]
    panels_lines = [[(label, color, series(records, key), 2, 1.0)
                     for label, color, records in zip(labels, colors, record_lists)] for key in keys]
    return write_svg(panels_lines, keys, list(zip(labels, colors)) if len(paths) > 1 else [], out,
                     title or (paths[0] if len(paths) == 1 else ""))


def plot_runs(runs: dict, keys, out, title="", xlabel="step", xticks=None) -> str:
    """Settings x seeds: runs maps a setting's label to its runs (metrics.jsonl paths or lists of records). Each
    run is a thin line in its setting's colour, the setting's mean over its runs a thick one. The x axis is the
    records' "step" (xlabel and xticks {x: text} relabel it, e.g. for difficulty levels)."""
    loaded = {label: [read_metrics(r) if isinstance(r, str) else r for r in setting_runs]
              for label, setting_runs in runs.items()}
    keys = present_keys([r for rs in loaded.values() for r in rs], keys)
    colors = {label: COLORS[i % len(COLORS)] for i, label in enumerate(loaded)}
    panels_lines = []
    for key in keys:
        lines = []
        for label, record_lists in loaded.items():
            per_run = [series(records, key) for records in record_lists]
            lines += [(label, colors[label], points, 1, 0.35) for points in per_run]
            lines.append((label, colors[label], mean_series(per_run), 2.5, 1.0))
        panels_lines.append(lines)
    legend = [(f"{label} (mean of {len(record_lists)})", colors[label]) for label, record_lists in loaded.items()]
    return write_svg(panels_lines, keys, legend, out, title, xlabel, xticks)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    paths = [a for a in argv if not a.startswith("--")]
    options = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    unknown = [a for a in argv if a.startswith("--") and ("=" not in a or a[2:].split("=", 1)[0] not in
                                                          ("keys", "out", "title"))]
    if not paths or unknown:
        raise SystemExit("usage: python plot.py path/to/metrics.jsonl [more.jsonl ...] [--keys=a,b] [--out=x.svg] "
                         "[--title=...]" + (f" (unknown: {' '.join(unknown)})" if unknown else ""))
    for path in paths:
        if not os.path.isfile(path):
            raise SystemExit(f"{path}: no such file")
    keys = [k for k in options.get("keys", "").split(",") if k] or None
    out = plot_run(paths, keys, options.get("out"), options.get("title", ""))
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
