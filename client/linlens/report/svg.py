"""The charts of the HTML report as inline SVG, written here (no plotting library, nothing fetched).

Each chart is a string ``<svg ...>...</svg>`` with a viewBox, so it scales with the page. Every drawn value carries
its number in a ``<title>`` child (the browser shows it on hover) and in a ``data-value`` attribute (full
precision, for tests and scripts), so a reader can check a point against the result it came from.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

import numpy as np

from linlens.report.colors import ACCENT_RGB, ATTENTION_RGB, LINE_RGB, MLP_RGB, css
from linlens.report.content import Emergence

WIDTH = 640
HEIGHT = 240
#: Plot area margins: left, right, top, bottom.
MARGIN = (56, 48, 22, 36)


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _f(value: float) -> str:
    """A coordinate, short."""
    return f"{value:.2f}".rstrip("0").rstrip(".")


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high] (steps of 1, 2 or 5 times a power of ten)."""
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        return [low] if math.isfinite(low) else []
    raw = (high - low) / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(low / step - 1e-9) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(0.0 if abs(value) < step * 1e-9 else value)
        value += step
    return ticks


def _tick_text(value: float) -> str:
    return f"{value:g}"


class _Frame:
    """A plot area with linear x and a linear or log10 y, mapping data to SVG coordinates."""

    def __init__(self, x: tuple[float, float], y: tuple[float, float], *, log_y: bool = False) -> None:
        self.x0, self.x1 = x
        self.y0, self.y1 = y
        self.log_y = log_y
        left, right, top, bottom = MARGIN
        self.left, self.right = left, WIDTH - right
        self.top, self.bottom = top, HEIGHT - bottom

    def px(self, x: float) -> float:
        span = self.x1 - self.x0 or 1.0
        return self.left + (x - self.x0) / span * (self.right - self.left)

    def py(self, y: float) -> float:
        lo, hi, value = self.y0, self.y1, y
        if self.log_y:
            lo, hi, value = math.log10(lo), math.log10(hi), math.log10(max(y, self.y0))
        span = hi - lo or 1.0
        return self.bottom - (value - lo) / span * (self.bottom - self.top)

    def box(self) -> str:
        return (
            f'<rect x="{self.left}" y="{self.top}" width="{self.right - self.left}" '
            f'height="{self.bottom - self.top}" fill="none" stroke="#bbb"/>'
        )

    def y_axis(self, ticks: Sequence[float], *, right: bool = False, label: str = "") -> str:
        parts = []
        x = self.right if right else self.left
        anchor, dx = ("start", 4) if right else ("end", -4)
        for tick in ticks:
            y = self.py(tick)
            parts.append(f'<line x1="{x}" x2="{x - dx / 2}" y1="{_f(y)}" y2="{_f(y)}" stroke="#888"/>')
            text = f"1e{round(math.log10(tick))}" if self.log_y else _tick_text(tick)
            parts.append(f'<text x="{x + dx}" y="{_f(y + 3.5)}" text-anchor="{anchor}" class="tick">{_e(text)}</text>')
        if label:
            lx = WIDTH - 8 if right else 12
            cy = (self.top + self.bottom) / 2
            parts.append(
                f'<text x="{lx}" y="{_f(cy)}" text-anchor="middle" class="axis" '
                f'transform="rotate({90 if right else -90} {lx} {_f(cy)})">{_e(label)}</text>'
            )
        return "".join(parts)

    def x_axis(self, ticks: Sequence[float], label: str = "", names: Sequence[str] | None = None) -> str:
        parts = []
        for index, tick in enumerate(ticks):
            x = self.px(tick)
            text = names[index] if names is not None else _tick_text(tick)
            parts.append(f'<line x1="{_f(x)}" x2="{_f(x)}" y1="{self.bottom}" y2="{self.bottom + 3}" stroke="#888"/>')
            parts.append(
                f'<text x="{_f(x)}" y="{self.bottom + 14}" text-anchor="middle" class="tick">{_e(text)}</text>'
            )
        if label:
            parts.append(
                f'<text x="{_f((self.left + self.right) / 2)}" y="{HEIGHT - 4}" text-anchor="middle" class="axis">'
                f"{_e(label)}</text>"
            )
        return "".join(parts)


def _svg(kind: str, body: str, caption: str) -> str:
    return (
        f'<svg class="chart" data-chart="{_e(kind)}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'xmlns="http://www.w3.org/2000/svg"><title>{_e(caption)}</title>{body}</svg>'
    )


def _point(x: float, y: float, value: float, title: str, *, fill: str, kind: str, radius: float = 3.0) -> str:
    return (
        f'<circle cx="{_f(x)}" cy="{_f(y)}" r="{radius}" fill="{fill}" data-kind="{_e(kind)}" '
        f'data-value="{value!r}"><title>{_e(title)}</title></circle>'
    )


def spectrum_chart(singular_values: Sequence[float] | np.ndarray, top_k: int, caption: str) -> str:
    """All singular values of one Jacobian, descending, on a log scale; the top_k explained ones marked."""
    values = np.asarray(singular_values, dtype=np.float64)
    positive = values[np.isfinite(values) & (values > 0)]
    if positive.size == 0:
        return _svg("spectrum", '<text x="20" y="40">no positive singular values</text>', caption)
    high = 10 ** math.ceil(math.log10(float(positive.max())))
    low = max(10 ** math.floor(math.log10(float(positive.min()))), high * 1e-12)
    frame = _Frame((1, max(len(values), 2)), (low, high), log_y=True)
    decades = [10.0**p for p in range(round(math.log10(low)), round(math.log10(high)) + 1)]
    if len(decades) > 7:
        stride = math.ceil(len(decades) / 7)
        decades = decades[::-stride][::-1]
    points = " ".join(
        f"{_f(frame.px(i + 1))},{_f(frame.py(float(v)))}" for i, v in enumerate(values) if math.isfinite(v) and v > 0
    )
    body = [frame.box(), frame.y_axis(decades, label="singular value"), frame.x_axis(nice_ticks(1, len(values)))]
    body.append(f'<polyline points="{points}" fill="none" stroke="{css(LINE_RGB)}" stroke-width="1.5"/>')
    for i, v in enumerate(values[:top_k]):
        if math.isfinite(v) and v > 0:
            body.append(
                _point(
                    frame.px(i + 1),
                    frame.py(float(v)),
                    float(v),
                    f"σ{i + 1} = {v:.4g}",
                    fill=css(ACCENT_RGB),
                    kind="singular-value",
                )
            )
    body.append(frame.x_axis([], label="index (1 = largest)"))
    return _svg("spectrum", "".join(body), caption)


def layer_shares_chart(
    attention: Sequence[float] | np.ndarray, mlp: Sequence[float] | np.ndarray, logit: float, caption: str
) -> str:
    """Each layer's attention and MLP contribution to the explained logit, as bars either side of zero."""
    att = [float(v) for v in attention]
    mlp_values = [float(v) for v in mlp]
    count = len(att)
    extent = max([abs(v) for v in att + mlp_values if math.isfinite(v)] + [1e-12])
    ticks = nice_ticks(-extent, extent, 4)
    frame = _Frame((-0.5, count - 0.5), (min(ticks[0], -extent), max(ticks[-1], extent)))
    slot = (frame.right - frame.left) / max(count, 1)
    bar = max(slot * 0.4, 0.5)
    zero = frame.py(0.0)
    body = [frame.box(), frame.y_axis(ticks, label="logit contribution")]
    body.append(f'<line x1="{frame.left}" x2="{frame.right}" y1="{_f(zero)}" y2="{_f(zero)}" stroke="#666"/>')
    for layer in range(count):
        for offset, value, name, rgb in (
            (-bar, att[layer], "attention", ATTENTION_RGB),
            (0.0, mlp_values[layer], "mlp", MLP_RGB),
        ):
            if not math.isfinite(value):
                continue
            x = frame.px(layer) + offset
            y = frame.py(value)
            share = f" ({value / logit:+.1%} of the logit)" if logit else ""
            label = "attention" if name == "attention" else "MLP"
            body.append(
                f'<rect x="{_f(x)}" y="{_f(min(y, zero))}" width="{_f(bar)}" height="{_f(abs(zero - y))}" '
                f'fill="{css(rgb)}" data-kind="{name}" data-layer="{layer}" data-value="{value!r}">'
                f"<title>{_e(f'layer {layer} {label}: {value:+.4f}{share}')}</title></rect>"
            )
    ticks_x = nice_ticks(0, count - 1, min(count, 10)) if count > 1 else [0.0]
    body.append(frame.x_axis([t for t in ticks_x if float(t).is_integer()], label="layer"))
    body.append(
        f'<rect x="{frame.left + 8}" y="{frame.top + 6}" width="10" height="10" fill="{css(ATTENTION_RGB)}"/>'
        f'<text x="{frame.left + 22}" y="{frame.top + 15}" class="tick">attention</text>'
        f'<rect x="{frame.left + 84}" y="{frame.top + 6}" width="10" height="10" fill="{css(MLP_RGB)}"/>'
        f'<text x="{frame.left + 98}" y="{frame.top + 15}" class="tick">MLP</text>'
    )
    return _svg("layer-shares", "".join(body), caption)


def emergence_chart(series: Emergence, caption: str) -> str:
    """The cumulative logit share after each layer (line, left axis) and the explained token's rank among the
    decoded tokens of each analysed layer's up-to-layer map (markers, right axis, 1 at the top; hollow at the
    bottom where it is not among them)."""
    count = len(series.layers)
    shares = [v for v in (series.direct_share, *series.cumulative_share) if math.isfinite(v)]
    low = min([0.0, *shares])
    high = max([1.0, *shares])
    ticks = nice_ticks(low, high, 5)
    frame = _Frame((-1, max(count - 1, 0)), (min(ticks[0], low), max(ticks[-1], high)))
    body = [frame.box(), frame.y_axis(ticks, label="cumulative logit share")]
    xs = [-1, *series.layers]
    ys = [series.direct_share, *series.cumulative_share]
    points = " ".join(f"{_f(frame.px(x))},{_f(frame.py(y))}" for x, y in zip(xs, ys, strict=True) if math.isfinite(y))
    body.append(f'<polyline points="{points}" fill="none" stroke="{css(LINE_RGB)}" stroke-width="1.5"/>')
    for x, y in zip(xs, ys, strict=True):
        if math.isfinite(y):
            where = "direct path" if x < 0 else f"after layer {x}"
            body.append(
                _point(
                    frame.px(x),
                    frame.py(y),
                    y,
                    f"{where}: {y:.1%} of the logit",
                    fill=css(LINE_RGB),
                    kind="share",
                    radius=2.0,
                )
            )
    if series.rank_layers:
        depth = max(series.depths)
        # rank axis on the right: 1 at the top, depth at the bottom of the band, "absent" below it
        band_top, band_bottom = frame.top + 6, frame.bottom - 18

        def rank_y(rank: int) -> float:
            return band_top + (rank - 1) / max(depth - 1, 1) * (band_bottom - band_top)

        for mark in sorted({1, depth, *[r for r in series.ranks if r is not None]}):
            body.append(
                f'<text x="{frame.right + 4}" y="{_f(rank_y(mark) + 3.5)}" class="tick" fill="{css(ACCENT_RGB)}">'
                f"#{mark}</text>"
            )
        body.append(
            f'<text x="{frame.right + 4}" y="{frame.bottom - 2}" class="tick" fill="{css(ACCENT_RGB)}">absent</text>'
        )
        for layer, rank, listed in zip(series.rank_layers, series.ranks, series.depths, strict=True):
            cx = frame.px(layer)
            if rank is None:
                body.append(
                    f'<circle cx="{_f(cx)}" cy="{frame.bottom - 5}" r="4" fill="white" stroke="{css(ACCENT_RGB)}" '
                    f'stroke-width="1.5" data-kind="rank" data-layer="{layer}" data-value="">'
                    f"<title>{_e(f'layer {layer}: not among the top {listed} decoded tokens')}</title></circle>"
                )
            else:
                body.append(
                    f'<circle cx="{_f(cx)}" cy="{_f(rank_y(rank))}" r="4" fill="{css(ACCENT_RGB)}" data-kind="rank" '
                    f'data-layer="{layer}" data-value="{rank}">'
                    f"<title>{_e(f'layer {layer}: rank {rank} of {listed} decoded tokens')}</title></circle>"
                )
    ticks_x = [t for t in nice_ticks(0, max(count - 1, 1), min(max(count, 2), 10)) if float(t).is_integer()]
    body.append(frame.x_axis([-1, *ticks_x], label="layer", names=["dir", *[_tick_text(t) for t in ticks_x]]))
    return _svg("emergence", "".join(body), caption)
