"""The PNG figures of a report, drawn with matplotlib (the ``viz`` extra).

A figure is a column of blocks, each a fixed height in inches drawn at a known place, so the image's size follows
from its content: ``WIDTH_IN`` x ``DPI`` pixels wide, and as tall as its blocks. The report figure shows what the HTML
shows (header, shaded tokens per attribution, spectra with decoded singular vectors, and with a layer analysis the
heat map, the attention / MLP contribution per layer and the emergence chart), from the same numbers
(``linlens.report.content``) and the same colour scale (``linlens.report.colors``). The paper figures
(``linlens.report.paper``) are compositions of the same blocks.

matplotlib is used without pyplot (``matplotlib.figure.Figure``, Agg), so nothing here touches a global backend or
opens a window, and every figure is drawn under matplotlib's default style (``style.context("default")``), so a
caller's rcParams do not change the picture. Token texts are drawn with ``parse_math=False`` ($ stays a dollar).
"""

from __future__ import annotations

import contextlib
import math
import textwrap
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from linlens.contract.results import LayerAttributions, LayerResult, PositionSpectrum, TokenScore
from linlens.report import content
from linlens.report.colors import (
    ACCENT_RGB,
    ATTENTION_RGB,
    DIVERGING_STOPS,
    LINE_RGB,
    MLP_RGB,
    diverging_rgb,
    ink_for,
    signed_ratio,
    unit,
)
from linlens.report.content import Emergence, Report, Reportable, token_label
from linlens.report.extra import require_viz

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: Pixels per inch of the saved PNGs, and the figures' width in inches (1200 px).
DPI = 100
WIDTH_IN = 12.0
#: Left and right margins of the plot areas, inches.
LEFT_IN = 0.75
RIGHT_IN = 0.35
#: The heat map's colour compression (the HTML's too: a signed square root).
HEATMAP_GAMMA = 0.5
MONO = "DejaVu Sans Mono"
#: Width of one character of MONO per point of font size, in inches: DejaVu Sans Mono's advance is 0.602 em, but
#: at DPI the glyphs are hinted to whole pixels (measured: 7 px per character at 8 pt, i.e. 0.63 em), so a margin.
_CHAR_IN_PER_PT = 0.64 / 72


@dataclass(frozen=True)
class Block:
    """A horizontal band of a figure: its height in inches and how to draw it, given the figure and its top."""

    height: float
    draw: Callable[[Page, float], None]


class Page:
    """Places axes by inches from the figure's top-left corner."""

    def __init__(self, fig: Figure, height: float) -> None:
        self.fig = fig
        self.height = height

    def axes(self, top: float, height: float, left: float = LEFT_IN, width: float | None = None) -> Axes:
        width = WIDTH_IN - left - RIGHT_IN if width is None else width
        return self.fig.add_axes(
            (left / WIDTH_IN, 1 - (top + height) / self.height, width / WIDTH_IN, height / self.height)
        )

    def canvas(self, top: float, height: float, left: float = 0.0, width: float | None = None) -> Axes:
        """An invisible axes whose data coordinates are inches, y growing downwards (for text and chips)."""
        width = WIDTH_IN - left if width is None else width
        ax = self.axes(top, height, left, width)
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
        ax.set_axis_off()
        return ax


def compose(blocks: Sequence[Block]) -> Figure:
    """A figure WIDTH_IN wide holding ``blocks`` one under the other."""
    require_viz()
    from matplotlib.figure import Figure

    height = sum(block.height for block in blocks)
    fig = Figure(figsize=(WIDTH_IN, height), dpi=DPI, facecolor="white")
    page = Page(fig, height)
    top = 0.0
    for block in blocks:
        block.draw(page, top)
        top += block.height
    return fig


@contextlib.contextmanager
def drawing() -> Iterator[None]:
    """matplotlib's default style and no glyph warnings (a token in a script DejaVu lacks draws as a box)."""
    require_viz()
    import matplotlib.style

    with matplotlib.style.context("default"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph .* missing from")
        warnings.filterwarnings("ignore", message=r"Matplotlib currently does not support")
        yield


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG at DPI (exactly its size in inches times DPI) and return the path."""
    target = Path(path)
    with drawing():
        fig.savefig(target, format="png", dpi=DPI, facecolor="white")
    return target


# --- blocks --------------------------------------------------------------------------------------------------------


def _mono_width(text: str, size: float) -> float:
    return len(text) * size * _CHAR_IN_PER_PT


def _shown(text: str) -> str:
    if text == "":
        return "\u2205"
    return text.replace("\r", "\u240d").replace("\n", "\u21b5").replace("\t", "\u21e5")


def text_block(lines: Sequence[tuple[str, float, str]], *, wrap: bool = True) -> Block:
    """Lines of text: (text, font size in points, weight). Long lines wrap at the figure's width."""
    usable = WIDTH_IN - 2 * RIGHT_IN
    laid: list[tuple[str, float, str]] = []
    for text, size, weight in lines:
        width = max(20, int(usable / (size * 0.55 / 72)))
        pieces = textwrap.wrap(text, width, replace_whitespace=False, drop_whitespace=False) if wrap else [text]
        laid.extend((piece, size, weight) for piece in pieces or [""])
    height = 0.15 + sum(size * 1.45 / 72 for _, size, _ in laid)

    def draw(page: Page, top: float) -> None:
        ax = page.canvas(top, height)
        y = 0.08
        for text, size, weight in laid:
            ax.text(RIGHT_IN, y, text, fontsize=size, fontweight=weight, va="top", ha="left", parse_math=False)
            y += size * 1.45 / 72

    return Block(height, draw)


def _facts_lines(facts: Sequence[tuple[str, str]], size: float = 9.5) -> list[tuple[str, float, str]]:
    return [(f"{name}: {value}", size, "normal") for name, value in facts]


_CHIP_SIZE = 9.5
_CHIP_LINE = 0.27
_CHIP_PAD = 0.06
_CHIP_GAP = 0.035


def _chip_layout(tokens: Sequence[str], width: float) -> list[list[tuple[int, float, float]]]:
    """Tokens wrapped into lines: per line, (index, x, chip width) in inches."""
    lines: list[list[tuple[int, float, float]]] = [[]]
    x = 0.0
    for index, token in enumerate(tokens):
        chip = _mono_width(_shown(token), _CHIP_SIZE) + 2 * _CHIP_PAD
        if lines[-1] and x + chip > width:
            lines.append([])
            x = 0.0
        lines[-1].append((index, x, chip))
        x += chip + _CHIP_GAP
    return lines


def tokens_block(row: content.AttributionRow) -> Block:
    """One attribution: its head line, then the input tokens as chips shaded on the diverging scale."""
    left = RIGHT_IN
    usable = WIDTH_IN - left - RIGHT_IN
    layout = _chip_layout(row.tokens, usable)
    head_h = 0.3
    height = head_h + len(layout) * _CHIP_LINE + 0.12
    values = np.asarray(row.values, dtype=np.float64)
    what = {"explained": "the explained token", "target": "the logit of", "contrast": "the logit difference"}
    attribution = row.attribution
    head = (
        f"attribution to {what[row.kind]} {token_label(attribution.label)}: Σ tokens {float(values.sum()):+.4f}"
        + (f" + constant {float(attribution.constant):+.4f}" if attribution.constant else "")
        + f" = {float(attribution.total):+.4f}   (colour scale ±{row.scale:.3g}: red raises, blue lowers)"
    )

    def draw(page: Page, top: float) -> None:
        from matplotlib.patches import Rectangle

        ax = page.canvas(top, height)
        ax.text(left, 0.06, head, fontsize=9.5, va="top", ha="left", parse_math=False)
        for line_no, line in enumerate(layout):
            y = head_h + line_no * _CHIP_LINE
            for index, x, chip in line:
                background = diverging_rgb(row.values[index], row.scale)
                ax.add_patch(
                    Rectangle(
                        (left + x, y),
                        chip,
                        _CHIP_LINE - 0.05,
                        facecolor=unit(background),
                        edgecolor=(0.85, 0.85, 0.85),
                        linewidth=0.6,
                    )
                )
                ax.text(
                    left + x + _CHIP_PAD,
                    y + (_CHIP_LINE - 0.05) / 2,
                    _shown(row.tokens[index]),
                    fontsize=_CHIP_SIZE,
                    family=MONO,
                    va="center",
                    ha="left",
                    color=unit(ink_for(background)),
                    parse_math=False,
                )

    return Block(height, draw)


def _scores(scores: Sequence[TokenScore], chars: int) -> str:
    text = ", ".join(f"{token_label(s.text)} {s.score:.2f}" for s in scores)
    return text if len(text) <= chars else text[: chars - 1] + "…"


def _spectrum_axes(ax: Axes, singular_values: np.ndarray, marked: int, title: str) -> None:
    from matplotlib.ticker import MaxNLocator

    values = np.asarray(singular_values, dtype=np.float64)
    index = np.arange(1, len(values) + 1)
    keep = np.isfinite(values) & (values > 0)
    ax.semilogy(index[keep], values[keep], color=unit(LINE_RGB), linewidth=1.2)
    top = values[:marked]
    ax.semilogy(index[:marked][top > 0], top[top > 0], "o", color=unit(ACCENT_RGB), markersize=4)
    ax.set_xlabel("index (1 = largest)", fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # a matrix-free spectrum has a few values only
    ax.set_ylabel("singular value", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_title(title, fontsize=8.5, parse_math=False)
    ax.grid(True, which="major", alpha=0.3)


def spectrum_block(spectrum: PositionSpectrum) -> Block:
    """The spectrum of one position's J_i (log scale) beside its decoded singular vectors."""
    component_lines = 3 * len(spectrum.components)
    height = max(2.5, 0.75 + component_lines * 0.175)
    chart_w = 3.9

    def draw(page: Page, top: float) -> None:
        ax = page.axes(top + 0.35, min(2.5, height) - 0.85, LEFT_IN, chart_w)
        stable_rank = content.stable_rank_text(spectrum)
        title = f"J_{spectrum.position} of {token_label(spectrum.token_text)}: stable rank {stable_rank}"
        _spectrum_axes(ax, spectrum.singular_values, len(spectrum.components), title)
        text_left = LEFT_IN + chart_w + 0.35
        text_w = WIDTH_IN - text_left - RIGHT_IN
        canvas = page.canvas(top, height, text_left, text_w)
        chars = int((text_w - 0.15) / (8 * _CHAR_IN_PER_PT))
        shares = ", ".join(f"{s:.3f}" for s in spectrum.captured_share)
        canvas.text(0, 0.3, f"share of its term kept at rank 1..k: {shares}", fontsize=8.5, va="top", parse_math=False)
        y = 0.55
        for component in spectrum.components:
            canvas.text(
                0,
                y,
                f"#{component.rank}  σ = {component.value:.4g}  ({content.certificate_text(component)})",
                fontsize=8.5,
                weight="bold",
                va="top",
            )
            sides = (("left (LM head):    ", component.left_tokens), ("right (embedding): ", component.right_tokens))
            for row, (label, tokens) in enumerate(sides, start=1):
                canvas.text(
                    0.1,
                    y + 0.175 * row,
                    label + _scores(tokens, chars - 19),
                    fontsize=8,
                    family=MONO,
                    va="top",
                    parse_math=False,
                )
            y += 3 * 0.175

    return Block(height, draw)


def _diverging_cmap() -> Any:
    from matplotlib.colors import LinearSegmentedColormap

    return LinearSegmentedColormap.from_list("linlens_diverging", [unit(rgb) for rgb in DIVERGING_STOPS])


def heatmap_block(attributions: LayerAttributions) -> Block:
    """The layers x tokens matrix (with the direct path as its last row) beside each layer's attention and MLP
    contribution to the logit (bars on the same rows)."""
    matrix = np.asarray(attributions.per_layer, dtype=np.float64)
    direct = np.asarray(attributions.direct, dtype=np.float64)
    rows = np.vstack([matrix, direct[None, :]])
    count, n = matrix.shape
    row_h = 0.16
    label_h = 0.25 + min(1.1, max(_mono_width(_shown(t), 7.5) for t in attributions.input_tokens) * 0.87 + 0.1)
    plot_h = (count + 1) * row_h
    height = 0.45 + plot_h + label_h
    heat_w = min(6.2, max(2.2, n * 0.42))
    bars_left = LEFT_IN + heat_w + 1.35
    bars_w = WIDTH_IN - bars_left - RIGHT_IN - 0.3
    finite = np.abs(rows[np.isfinite(rows)])
    scale = float(finite.max()) if finite.size else 0.0

    def draw(page: Page, top: float) -> None:
        ax = page.axes(top + 0.4, plot_h, LEFT_IN, heat_w)
        shaded = np.vectorize(lambda v: signed_ratio(float(v), scale, gamma=HEATMAP_GAMMA))(rows)
        image = ax.imshow(
            shaded,
            cmap=_diverging_cmap(),
            vmin=-1,
            vmax=1,
            aspect="auto",
            interpolation="nearest",
            extent=(-0.5, n - 0.5, count + 0.5, -0.5),
        )
        labels = [str(layer) for layer in range(count)] + ["dir"]
        step = max(1, math.ceil((count + 1) / 16))
        ticks = [i for i in range(count + 1) if i % step == 0 or i == count]
        ax.set_yticks(ticks, labels=[labels[i] for i in ticks])
        # at most ~40 token labels fit under the map: label every k-th token of a long prompt
        every = max(1, math.ceil(n / 40))
        columns = range(0, n, every)
        ax.set_xticks(
            columns,
            labels=[_shown(attributions.input_tokens[i]) for i in columns],
            rotation=60,
            ha="right",
            rotation_mode="anchor",
            family=MONO,
            fontsize=7.5,
            parse_math=False,
        )
        ax.tick_params(axis="y", labelsize=7)
        ax.set_ylabel("layer", fontsize=8)
        ax.set_title(
            f"layers × tokens: contribution to the logit of {token_label(attributions.explained.text)}",
            fontsize=8.5,
            parse_math=False,
        )
        bar = page.axes(top + 0.4, plot_h, LEFT_IN + heat_w + 0.1, 0.12)
        colorbar = page.fig.colorbar(image, cax=bar)
        marks = [-1.0, -0.5, 0.0, 0.5, 1.0]
        colorbar.set_ticks(marks, labels=[f"{math.copysign(m * m * scale, m):+.2g}" for m in marks])
        colorbar.ax.tick_params(labelsize=6.5)
        shares = page.axes(top + 0.4, plot_h, bars_left, bars_w)
        y = np.arange(count)
        attention = np.asarray(attributions.attention_logits, dtype=np.float64)
        mlp = np.asarray(attributions.mlp_logits, dtype=np.float64)
        shares.barh(y - 0.2, attention, height=0.4, color=unit(ATTENTION_RGB))
        shares.barh(y + 0.2, mlp, height=0.4, color=unit(MLP_RGB))
        shares.set_ylim(count + 0.5, -0.5)
        shares.axvline(0, color="0.4", linewidth=0.8)
        shares.set_yticks(ticks[:-1] if ticks[-1] == count else ticks)
        shares.tick_params(labelsize=7)
        shares.set_xlabel("contribution to the logit", fontsize=8)
        # the series are named in the title: a legend box would cover the bars of some layer
        shares.set_title("attention (blue) and MLP (orange) per layer", fontsize=8.5)
        shares.grid(True, axis="x", alpha=0.3)

    return Block(height, draw)


def _emergence_axes(ax: Axes, series: Emergence) -> None:
    xs = np.array([-1, *series.layers])
    ys = np.array([series.direct_share, *series.cumulative_share])
    ax.plot(xs, ys, "-o", color=unit(LINE_RGB), markersize=2.5, linewidth=1.2, label="cumulative logit share")
    ax.axhline(1.0, color="0.6", linewidth=0.7, linestyle="--")
    ax.axhline(0.0, color="0.8", linewidth=0.7)
    ax.set_xlabel("layer (dir = the direct path)", fontsize=8)
    ax.set_ylabel("cumulative logit share", fontsize=8)
    ticks = [t for t in ax.get_xticks() if float(t).is_integer() and -1 <= t <= max(series.layers, default=0)]
    ax.set_xticks([-1, *[t for t in ticks if t >= 0]], labels=["dir", *[f"{t:.0f}" for t in ticks if t >= 0]])
    ax.tick_params(labelsize=7)
    ax.set_title(
        f"emergence of {token_label(series.explained.text)}: logit share after each layer, and its rank in each "
        "analysed layer's up-to-layer map",
        fontsize=8.5,
        parse_math=False,
    )
    ax.grid(True, alpha=0.3)
    if not series.rank_layers:
        return
    depth = max(series.depths)
    ranks = ax.twinx()
    present = [(layer, rank) for layer, rank in zip(series.rank_layers, series.ranks, strict=True) if rank is not None]
    absent = [layer for layer, rank in zip(series.rank_layers, series.ranks, strict=True) if rank is None]
    if present:
        ranks.plot(*zip(*present, strict=True), "o", color=unit(ACCENT_RGB), markersize=5, label="rank")
    if absent:
        ranks.plot(
            absent, [depth + 1] * len(absent), "o", markerfacecolor="white", color=unit(ACCENT_RGB), markersize=5
        )
    ranks.set_ylim(depth + 1.5, 0.5)
    marks = sorted({1, depth, *(r for _, r in present)})
    ranks.set_yticks([*marks, depth + 1], labels=[*(f"#{m}" for m in marks), "absent"])
    ranks.tick_params(labelsize=7, colors=unit(ACCENT_RGB))
    ranks.set_ylabel("rank among decoded tokens", fontsize=8, color=unit(ACCENT_RGB))


def emergence_block(series: Emergence) -> Block:
    height = 2.7

    def draw(page: Page, top: float) -> None:
        _emergence_axes(page.axes(top + 0.35, height - 0.9, LEFT_IN, WIDTH_IN - LEFT_IN - 0.9), series)

    return Block(height, draw)


def layer_table_block(layers: Sequence[LayerResult], token_id: int) -> Block:
    """One line per analysed layer: its blocks' logit contributions and its up-to-layer map's first singular vector."""
    ordered = sorted(layers, key=lambda r: r.layer)
    line_h = 0.175
    height = 0.4 + (len(ordered) + 1) * line_h
    chars = int((WIDTH_IN - 2 * RIGHT_IN) / (7.5 * _CHAR_IN_PER_PT))

    def line(result: LayerResult) -> str:
        up = result.up_to_layer
        start = f"{result.layer:>5} {result.attention.logit:+9.3f} {result.mlp.logit:+9.3f}"
        if up is None:
            return start + "   (no up-to-layer map)"
        rank = content.explained_rank(up, token_id)
        tokens = ", ".join(token_label(s.text) for s in up.components[0].left_tokens) if up.components else "-"
        text = f"{start} {up.stable_rank:7.2f} {up.captured_share[0] if up.captured_share else float('nan'):7.3f} "
        text += f"{'-' if rank is None else '#' + str(rank):>5}  {tokens}"
        return text if len(text) <= chars else text[: chars - 1] + "…"

    header = "layer attention       MLP  s.rank  rank-1  place  1st singular vector up to this layer (logit lens)"

    def draw(page: Page, top: float) -> None:
        ax = page.canvas(top, height)
        ax.text(RIGHT_IN, 0.1, header, fontsize=7.5, family=MONO, weight="bold", va="top")
        for row, result in enumerate(ordered, start=1):
            ax.text(RIGHT_IN, 0.1 + row * line_h, line(result), fontsize=7.5, family=MONO, va="top", parse_math=False)

    return Block(height, draw)


# --- figures -------------------------------------------------------------------------------------------------------


def section_blocks(view: content.ExplanationView) -> list[Block]:
    """Everything one explanation's section of the report shows."""
    blocks = [text_block([(view.heading, 12.5, "bold"), *_facts_lines(view.facts, 9)])]
    blocks.extend(tokens_block(row) for row in view.attributions)
    blocks.extend(spectrum_block(spectrum) for spectrum in view.explanation.spectra)
    if view.layer_attributions is not None:
        blocks.append(text_block([("Layer by layer", 12, "bold")]))
        blocks.append(heatmap_block(view.layer_attributions))
        if view.emergence is not None:
            blocks.append(emergence_block(view.emergence))
        if view.layers:
            blocks.append(layer_table_block(view.layers, view.layer_attributions.explained.token_id))
    return blocks


def report_blocks(report: Report) -> list[Block]:
    lines: list[tuple[str, float, str]] = [(report.title, 15, "bold"), *_facts_lines(report.facts)]
    if report.continuation is not None:
        lines.append((f"generated: {report.continuation!r}", 9.5, "normal"))
    if not report.sections:
        lines.append(("no explained steps", 9.5, "normal"))
    blocks = [text_block(lines)]
    for view in report.sections:
        blocks.extend(section_blocks(view))
    blocks.append(text_block([("linlens report: exact linear explanations (detached Jacobian)", 7.5, "normal")]))
    return blocks


def report_figure(result: Reportable | Report, *, step: int | None = None) -> Figure:
    """The whole report as one figure (a Generation's explained steps one under the other, or only ``step``)."""
    report = result if isinstance(result, Report) else content.build(result)
    if step is not None:
        chosen = tuple(view for view in report.sections if view.explanation.step == step)
        if not chosen:
            steps = [view.explanation.step for view in report.sections]
            raise ValueError(f"no explained step {step} in this result (explained steps: {steps})")
        report = Report(report.title, report.facts, chosen, report.continuation, report.generated)
    with drawing():
        return compose(report_blocks(report))


def save_png(result: Reportable | Report, path: str | Path, *, step: int | None = None) -> Path:
    """Write the report of ``result`` as one PNG (WIDTH_IN x DPI = 1200 pixels wide) and return the path."""
    return save_figure(report_figure(result, step=step), path)
