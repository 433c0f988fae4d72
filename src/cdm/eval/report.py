"""Self-contained reports: one HTML file (images and plots embedded) plus a Markdown twin.

Both are readable without Python: the HTML opens in any browser; the Markdown renders on a code
host with the PNG/SVG files written beside it.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..files import atomic_write

_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"]


def line_plot_svg(series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str, title: str = "",
                  width: int = 560, height: int = 340, hlines: dict[str, float] | None = None) -> str:
    """A minimal SVG line plot of named ``(x, y)`` series, with axes, ticks and a legend.
    ``hlines`` adds named horizontal reference lines (dashed, in the legend) at those y values."""
    pts = [p for s in series.values() for p in s if math.isfinite(p[1])]
    refs = {k: v for k, v in (hlines or {}).items() if math.isfinite(v)}
    if not pts:
        return f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="40"><text x="10" y="25">no data</text></svg>'
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    ys = [p[1] for p in pts] + list(refs.values())
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    pad_y = (y1 - y0) * 0.08 or abs(y0) * 0.1 or 1.0
    y0, y1 = y0 - pad_y, y1 + pad_y
    L, R, T, B = 64, 16, 30, 46
    pw, ph = width - L - R, height - T - B

    def sx(x): return L + (x - x0) / (x1 - x0) * pw
    def sy(y): return T + (1 - (y - y0) / (y1 - y0)) * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect x="0" y="0" width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2}" y="18" text-anchor="middle" font-size="14">{html.escape(title)}</text>',
           f'<line x1="{L}" y1="{T + ph}" x2="{L + pw}" y2="{T + ph}" stroke="black"/>',
           f'<line x1="{L}" y1="{T}" x2="{L}" y2="{T + ph}" stroke="black"/>']
    for k in range(6):
        xv, yv = x0 + (x1 - x0) * k / 5, y0 + (y1 - y0) * k / 5
        out.append(f'<line x1="{sx(xv):.1f}" y1="{T + ph}" x2="{sx(xv):.1f}" y2="{T + ph + 4}" stroke="black"/>'
                   f'<text x="{sx(xv):.1f}" y="{T + ph + 16}" text-anchor="middle">{xv:.4g}</text>')
        out.append(f'<line x1="{L - 4}" y1="{sy(yv):.1f}" x2="{L}" y2="{sy(yv):.1f}" stroke="black"/>'
                   f'<line x1="{L}" y1="{sy(yv):.1f}" x2="{L + pw}" y2="{sy(yv):.1f}" stroke="#eee"/>'
                   f'<text x="{L - 6}" y="{sy(yv) + 4:.1f}" text-anchor="end">{yv:.4g}</text>')
    out.append(f'<text x="{L + pw / 2}" y="{height - 8}" text-anchor="middle">{html.escape(xlabel)}</text>')
    out.append(f'<text x="14" y="{T + ph / 2}" text-anchor="middle" transform="rotate(-90 14 {T + ph / 2})">'
               f'{html.escape(ylabel)}</text>')
    for j, (name, s) in enumerate(series.items()):
        col = _PALETTE[j % len(_PALETTE)]
        s = sorted(p for p in s if math.isfinite(p[1]))
        if s:
            path = " ".join(f"{'M' if i == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for i, (x, y) in enumerate(s))
            out.append(f'<path d="{path}" fill="none" stroke="{col}" stroke-width="2"/>')
            out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{col}"/>' for x, y in s]
        out.append(f'<rect x="{L + pw - 150}" y="{T + 6 + 16 * j}" width="10" height="10" fill="{col}"/>'
                   f'<text x="{L + pw - 135}" y="{T + 15 + 16 * j}">{html.escape(name)}</text>')
    for j, (name, y) in enumerate(refs.items(), start=len(series)):
        col = _PALETTE[j % len(_PALETTE)]
        out.append(f'<line x1="{L}" y1="{sy(y):.1f}" x2="{L + pw}" y2="{sy(y):.1f}" stroke="{col}" '
                   f'stroke-width="1.5" stroke-dasharray="6 4"/>'
                   f'<line x1="{L + pw - 152}" y1="{T + 11 + 16 * j}" x2="{L + pw - 140}" y2="{T + 11 + 16 * j}" '
                   f'stroke="{col}" stroke-width="2" stroke-dasharray="4 2"/>'
                   f'<text x="{L + pw - 135}" y="{T + 15 + 16 * j}">{html.escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def heatmap_svg(values: dict[tuple[float, float], float], xlabel: str, ylabel: str, title: str = "",
                cell: int = 56) -> str:
    """A minimal SVG heat map of ``{(x, y): value}`` (lower is darker), each cell labelled with its value."""
    xs, ys = sorted({x for x, _ in values}), sorted({y for _, y in values})
    finite = [v for v in values.values() if math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    L, T = 70, 40
    w, h = L + cell * len(xs) + 20, T + cell * len(ys) + 50
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
           f'<text x="{w / 2}" y="20" text-anchor="middle" font-size="13">{html.escape(title)}</text>']
    for j, y in enumerate(reversed(ys)):
        out.append(f'<text x="{L - 6}" y="{T + j * cell + cell / 2 + 4}" text-anchor="end">{_fmt(y)}</text>')
        for i, x in enumerate(xs):
            v = values.get((x, y), float("nan"))
            g = 255 if not math.isfinite(v) else int(60 + 195 * ((v - lo) / (hi - lo) if hi > lo else 0.5))
            out.append(f'<rect x="{L + i * cell}" y="{T + j * cell}" width="{cell}" height="{cell}" '
                       f'fill="rgb({g},{g},255)" stroke="white"/>')
            out.append(f'<text x="{L + i * cell + cell / 2}" y="{T + j * cell + cell / 2 + 4}" '
                       f'text-anchor="middle">{"" if not math.isfinite(v) else _fmt(v)}</text>')
    for i, x in enumerate(xs):
        out.append(f'<text x="{L + i * cell + cell / 2}" y="{T + len(ys) * cell + 16}" text-anchor="middle">{_fmt(x)}</text>')
    out.append(f'<text x="{L + cell * len(xs) / 2}" y="{h - 8}" text-anchor="middle">{html.escape(xlabel)}</text>')
    out.append(f'<text x="14" y="{T + cell * len(ys) / 2}" transform="rotate(-90 14 {T + cell * len(ys) / 2})" '
               f'text-anchor="middle">{html.escape(ylabel)}</text></svg>')
    return "\n".join(out)


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


@dataclass
class Report:
    """Collects headings, text, tables, images and plots; writes ``report.html`` and ``report.md``."""

    title: str
    _html: list[str] = field(default_factory=list)
    _md: list[str] = field(default_factory=list)
    _files: dict[str, bytes] = field(default_factory=dict)

    def heading(self, text: str, level: int = 2) -> None:
        self._html.append(f"<h{level}>{html.escape(text)}</h{level}>")
        self._md.append("#" * level + " " + text + "\n")

    def text(self, text: str) -> None:
        self._html.append(f"<p>{html.escape(text)}</p>")
        self._md.append(text + "\n")

    def table(self, rows: list[dict], columns: list[str] | None = None) -> None:
        if not rows:
            return self.text("(no rows)")
        columns = columns or list(rows[0])
        self._html.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr>"
                          + "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c, '')))}</td>" for c in columns)
                                    + "</tr>" for r in rows) + "</table>")
        self._md.append("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
                        + "".join("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |\n" for r in rows))

    def image(self, png: str | Path | bytes, name: str, caption: str = "") -> None:
        data = Path(png).read_bytes() if not isinstance(png, bytes) else png
        self._files[name] = data
        b64 = base64.b64encode(data).decode()
        self._html.append(f'<figure><img src="data:image/png;base64,{b64}" style="image-rendering:pixelated;'
                          f'max-width:100%"/><figcaption>{html.escape(caption)}</figcaption></figure>')
        self._md.append(f"![{caption}]({name})\n")

    def svg(self, svg: str, name: str, caption: str = "") -> None:
        self._files[name] = svg.encode()
        self._html.append(f"<figure>{svg}<figcaption>{html.escape(caption)}</figcaption></figure>")
        self._md.append(f"![{caption}]({name})\n")

    def write(self, out_dir: str | Path) -> Path:
        """Write ``report.html``, ``report.md`` and the files the Markdown refers to; returns the HTML path."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name, data in self._files.items():
            atomic_write(out / name, lambda tmp, d=data: Path(tmp).write_bytes(d))
        page = ("<!doctype html><html><head><meta charset='utf-8'><title>" + html.escape(self.title) + "</title>"
                "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
                "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
                "text-align:right}th{background:#f4f4f4}"
                "</style></head><body><h1>" + html.escape(self.title) + "</h1>" + "\n".join(self._html)
                + "</body></html>")
        md = f"# {self.title}\n\n" + "\n".join(self._md)
        atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(md))
        atomic_write(out / "report.html", lambda tmp: Path(tmp).write_text(page))
        return out / "report.html"
