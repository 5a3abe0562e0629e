"""`bench serve --plot`: TTFT and TPOT (p50, p99) against request rate, as one HTML file with inline SVG.

Drawn here rather than with a plotting library, so the benchmark needs nothing beyond the package's own
dependencies. Finite rates share a linear x axis from 0; `inf` gets the last tick, one tick step further on.
"""

from __future__ import annotations

import html
import math
from typing import Any

_W, _H = 460, 300  # one panel
_LEFT, _RIGHT, _TOP, _BOTTOM = 60, 20, 30, 45
_SERIES = (("median", "p50", "#1f77b4", ""), ("p99", "p99", "#d62728", "6,4"))


def nice_ticks(top: float) -> list[float]:
    """0 up to the first tick at or above `top`, in about five steps of 1, 2 or 5 times a power of ten."""
    if not top > 0 or math.isinf(top):
        return [0.0, 1.0]
    raw = top / 5
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    return [i * step for i in range(math.ceil(top / step - 1e-9) + 1)]


def rate_label(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def _x_axis(rates: list[float]) -> tuple[list[tuple[float, str]], dict[float, float]]:
    """The x ticks (value, label) and each rate's position on that scale."""
    finite = [r for r in rates if not math.isinf(r)]
    ticks = [(t, f"{t:g}") for t in nice_ticks(max(finite))] if finite else []
    positions = {r: r for r in finite}
    if len(finite) < len(rates):  # inf: one step past the last finite tick (alone: in the middle)
        end = ticks[-1][0] + (ticks[1][0] - ticks[0][0]) if ticks else 1.0
        ticks.append((end, "inf"))
        positions[math.inf] = end
    if not finite:
        ticks = [(0.0, ""), *ticks, (2.0, "")]
    return ticks, positions


def _panel(title: str, metric: str, runs: list[dict[str, Any]]) -> str:
    rates = [run["request_rate"] for run in runs]
    x_ticks, x_pos = _x_axis(rates)
    y_ticks = nice_ticks(max(run[f"{stat}_{metric}_ms"] for run in runs for stat, *_ in _SERIES))
    x_lo, x_hi, y_hi = x_ticks[0][0], x_ticks[-1][0], y_ticks[-1]
    plot_w, plot_h = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM

    def sx(x: float) -> float:
        return _LEFT + (x - x_lo) / (x_hi - x_lo) * plot_w

    def sy(y: float) -> float:
        return _TOP + plot_h - y / y_hi * plot_h

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" font-family="sans-serif" '
             'font-size="11">',
             f'<text x="{_W / 2}" y="18" text-anchor="middle" font-size="13">{html.escape(title)}</text>']
    for y in y_ticks:
        parts.append(f'<line x1="{_LEFT}" x2="{_W - _RIGHT}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#ddd"/>'
                     f'<text x="{_LEFT - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:g}</text>')
    for x, label in x_ticks:
        parts.append(f'<line x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{_TOP + plot_h}" y2="{_TOP + plot_h + 5}" '
                     'stroke="#333"/>'
                     f'<text x="{sx(x):.1f}" y="{_TOP + plot_h + 18}" text-anchor="middle">{label}</text>')
    parts.append(f'<path d="M{_LEFT},{_TOP} V{_TOP + plot_h} H{_W - _RIGHT}" fill="none" stroke="#333"/>')
    parts.append(f'<text x="{_LEFT + plot_w / 2}" y="{_H - 8}" text-anchor="middle">request rate (req/s)</text>')
    parts.append(f'<text transform="translate(14,{_TOP + plot_h / 2}) rotate(-90)" text-anchor="middle">'
                 f'{metric.upper()} (ms)</text>')
    ordered = sorted(runs, key=lambda run: run["request_rate"])
    parts.append(f'<rect x="{_LEFT + 6}" y="{_TOP + 2}" width="100" height="36" fill="white" fill-opacity="0.8"/>')
    for i, (stat, name, color, dash) in enumerate(_SERIES):
        points = [(sx(x_pos[run["request_rate"]]), sy(run[f"{stat}_{metric}_ms"]), run) for run in ordered]
        line = " ".join(f"{x:.1f},{y:.1f}" for x, y, _ in points)
        parts.append(f'<polyline points="{line}" fill="none" stroke="{color}" stroke-width="2" '
                     f'stroke-dasharray="{dash}"/>')
        for x, y, run in points:
            tip = f"{name} at {rate_label(run['request_rate'])} req/s: {run[f'{stat}_{metric}_ms']:.2f} ms"
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"><title>{tip}</title></circle>')
        lx, ly = _LEFT + 12, _TOP + 10 + 16 * i  # legend, top left of the plot area
        parts.append(f'<line x1="{lx}" x2="{lx + 24}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="2" '
                     f'stroke-dasharray="{dash}"/><text x="{lx + 30}" y="{ly + 4}">{metric.upper()} {name}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def render_html(runs: list[dict[str, Any]], title: str = "pagedllm bench serve") -> str:
    """`runs`: summaries from serve.summarize, each with its `request_rate`."""
    rates = ", ".join(rate_label(run["request_rate"]) for run in runs)
    panels = [_panel("Time to first token", "ttft", runs), _panel("Time per output token", "tpot", runs)]
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title></head>\n"
            f"<body style=\"font-family: sans-serif\">\n<h3>{html.escape(title)}</h3>\n"
            f"<p>request rates (req/s): {rates}</p>\n" + "\n".join(panels) + "\n</body></html>\n")


def write_plot(path: str, runs: list[dict[str, Any]], title: str = "pagedllm bench serve") -> None:
    with open(path, "w") as f:
        f.write(render_html(runs, title))
