"""The colour scales of the reports, one home for the HTML (CSS colours) and the PNG figures (RGB tuples).

Attributions are signed, so they get a diverging scale centred on 0: white at 0, red for what raises the explained
logit, blue for what lowers it (the stops of ColorBrewer's RdBu, colour-blind safe). A value's colour depends only
on ``value / scale`` with ``scale`` the largest magnitude shown beside it, so the strongest token of a row is the
strongest colour and a value and its negation get mirror colours.
"""

from __future__ import annotations

import math

RGB = tuple[int, int, int]

#: From -1 (strong blue) through 0 (white) to +1 (strong red), evenly spaced.
DIVERGING_STOPS: tuple[RGB, ...] = (
    (5, 113, 176),
    (146, 197, 222),
    (247, 247, 247),
    (244, 165, 130),
    (202, 0, 32),
)
#: The two series of the per-layer charts.
ATTENTION_RGB: RGB = (69, 117, 180)
MLP_RGB: RGB = (230, 145, 56)
#: Lines and markers that are neither attention nor MLP (spectra, emergence).
LINE_RGB: RGB = (55, 55, 55)
ACCENT_RGB: RGB = (202, 0, 32)


def signed_ratio(value: float, scale: float, *, gamma: float = 1.0) -> float:
    """``value / scale`` clipped to [-1, 1], then compressed by ``|r| ** gamma`` with its sign kept.

    gamma 1 is the plain linear scale (token attributions); gamma 0.5 (a signed square root) keeps the many small
    cells of a heat map visible next to a few large ones. A non-positive or non-finite scale maps everything to 0.
    """
    if not (scale > 0 and math.isfinite(scale)) or not math.isfinite(value):
        return 0.0
    ratio = max(-1.0, min(1.0, value / scale))
    return math.copysign(abs(ratio) ** gamma, ratio)


def diverging_rgb(value: float, scale: float, *, gamma: float = 1.0) -> RGB:
    """The colour of ``value`` on the diverging scale whose ends are -scale and +scale."""
    position = (signed_ratio(value, scale, gamma=gamma) + 1.0) / 2.0 * (len(DIVERGING_STOPS) - 1)
    low = min(int(position), len(DIVERGING_STOPS) - 2)
    frac = position - low
    a, b = DIVERGING_STOPS[low], DIVERGING_STOPS[low + 1]
    return (
        round(a[0] + (b[0] - a[0]) * frac),
        round(a[1] + (b[1] - a[1]) * frac),
        round(a[2] + (b[2] - a[2]) * frac),
    )


def ink_for(background: RGB) -> RGB:
    """Black or white text, whichever reads better on ``background`` (WCAG relative luminance)."""

    def channel(c: int) -> float:
        s = c / 255.0
        return s / 12.92 if s <= 0.03928 else ((s + 0.055) / 1.055) ** 2.4

    r, g, b = (channel(c) for c in background)
    luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b
    return (0, 0, 0) if luminance > 0.23 else (255, 255, 255)


def css(rgb: RGB) -> str:
    """``#rrggbb`` for CSS and SVG."""
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def unit(rgb: RGB) -> tuple[float, float, float]:
    """The colour as matplotlib wants it (floats in [0, 1])."""
    return (rgb[0] / 255.0, rgb[1] / 255.0, rgb[2] / 255.0)
