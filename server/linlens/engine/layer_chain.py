"""Every layer's maps of x_n at the last position, materialised one layer at a time on the cut position graph.

At the last position, with the prefix's keys and values frozen, the residual stream after layer l is a chain of
per-layer d x d maps of x_n (:mod:`linlens.engine.position_graph`): h_l = M_l h_(l-1), so the up-to-layer map is
J_l = M_l J_(l-1), with J_(-1) = E, the map from x_n to what enters the first layer (the identity, Granite's
embedding multiplier). Cutting the position graph at every layer's input (:attr:`Capture.cut`) makes each M_l a
graph of one layer, so d VJP rows through ONE layer give M_l; all L layers cost d rows of the whole depth together,
plus L products of d x d matrices, instead of a Krylov solve of a few hundred rows of up to the whole depth for
each layer. A block's term (attention, MLP) is a map of the same leaf: its d rows ride in the same backward.

Nothing here models a family: the maps are the twin's own graph, one layer at a time, and their product is checked
against the whole prompt's graph on every family (tests/test_layer_chain.py). That the next layer reads exactly
what the previous one wrote is checked at every layer, at run time.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch
from transformers import PreTrainedModel

from linlens.engine import jacobian as jac
from linlens.engine.position_graph import KeyValues, PositionGraph, build_position_graph

#: The block terms whose maps ride in each layer's backward.
BLOCKS = ("attention", "mlp")

Kept = TypeVar("Kept")


@dataclass(frozen=True)
class LayerMaps:
    """The last position's maps at one layer, each (d, d)."""

    layer: int
    #: d h_l / d x_n: the up-to-layer map.
    up_to: torch.Tensor
    #: d h_l / d h_(l-1) at the last position: the layer alone.
    alone: torch.Tensor
    #: "attention" / "mlp": the block's term as a map of x_n (only when asked for).
    blocks: dict[str, torch.Tensor]
    #: VJP rows this layer took (each through one layer).
    rows: int


def materialises(hidden: int, layers: int, layer_weights: int, krylov_rows_per_map: float, maps: int) -> bool:
    """Whether materialising the chain is cheaper than one Krylov solve per layer map on the position graph.

    Materialising costs ``hidden`` rows of the whole depth (d per layer, one layer each) and L products of d x d
    matrices (d^3 multiply-adds each, a row costing about ``layer_weights``); the solves cost
    ``krylov_rows_per_map`` rows per map, of half the depth on average. Small d (SmolLM2: 630 against 1,900
    row-equivalents) materialises; a wide model (d = 4096) solves."""
    chain = hidden * maps + layers * maps * hidden**3 / max(layer_weights, 1)
    krylov = 0.5 * layers * maps * krylov_rows_per_map
    return chain < krylov


def walk(
    graph: PositionGraph,
    *,
    last: int,
    blocks: bool,
    chunk: int,
    should_stop: jac.ShouldStop | None = None,
) -> Iterator[LayerMaps]:
    """Yield the maps of layers 0..``last`` in order from ``graph``, built with ``cut_layers``.

    Raises ValueError if a layer does not read exactly what the one before wrote (the chain would not be the
    model's), which the twin's families never do."""
    capture = graph.capture
    if not capture.cut or 0 not in capture.entered:
        raise ValueError("the layer chain needs a position graph built with cut_layers=True")
    d = int(graph.x.shape[0])
    with torch.enable_grad():
        (running,) = jac.full_jacobians(capture.entered[0][0, -1], [graph.x], chunk=chunk, should_stop=should_stop)
    for layer in range(last + 1):
        leaf = capture.layer_inputs[layer]
        outputs = [capture.layer_outputs[layer][0, -1]]
        if blocks:
            outputs += [getattr(capture, kind)[layer][0, -1] for kind in BLOCKS]
        with torch.enable_grad():
            (own,) = jac.full_jacobians(torch.cat(outputs), [leaf], chunk=chunk, should_stop=should_stop)
        own = own.reshape(len(outputs), d, d)  # d (output) / d (this layer's input), at the last position
        maps = own @ running  # each of x_n
        nxt = capture.entered.get(layer + 1)
        if nxt is not None and not torch.equal(nxt.detach(), capture.layer_outputs[layer].detach()):
            raise ValueError(f"layer {layer + 1} does not read what layer {layer} wrote: no chain of layer maps")
        yield LayerMaps(
            layer=layer,
            up_to=maps[0],
            alone=own[0],
            blocks={kind: maps[1 + i] for i, kind in enumerate(BLOCKS)} if blocks else {},
            rows=len(outputs) * d,
        )
        running = maps[0]


@dataclass(frozen=True)
class Chain(Generic[Kept]):
    """What was kept of the selected layers' maps of x_n at the last position, and (when asked) J_n itself."""

    #: What ``keep`` made of each selected layer's maps, by layer (the maps themselves are not held: L d x d
    #: matrices would be, for a wide model, more than the rest of the explanation).
    maps: dict[int, Kept]
    #: J_n = d y_n / d x_n (d, d): the final norm's map times the last up-to-layer map; None unless asked.
    last_jacobian: torch.Tensor | None


def materialise(
    twin: PreTrainedModel,
    x_last: torch.Tensor,
    prefix: list[KeyValues],
    *,
    layers: Collection[int],
    blocks: bool,
    last_jacobian: bool,
    chunk: int,
    keep: Callable[[LayerMaps], Kept],
    should_stop: jac.ShouldStop | None = None,
) -> Chain[Kept]:
    """Walk the cut position graph of ``x_last`` on the frozen ``prefix`` up to the last of ``layers`` (to the last
    layer with ``last_jacobian``), keeping ``keep(maps)`` of each of ``layers`` as it passes: one walk serves the
    layer analysis and, through the final norm, the last position's spectrum."""
    graph = build_position_graph(twin, x_last, prefix, record_layers=True, cut_layers=True)
    count = len(graph.capture.layer_inputs)
    final = final_map(graph, chunk=chunk) if last_jacobian else None
    last = count - 1 if last_jacobian else max(layers)
    kept: dict[int, Kept] = {}
    jn = None
    for maps in walk(graph, last=last, blocks=blocks, chunk=chunk, should_stop=should_stop):
        if maps.layer in layers:
            kept[maps.layer] = keep(maps)
        if final is not None and maps.layer == count - 1:
            jn = final @ maps.up_to
    return Chain(maps=kept, last_jacobian=jn)


def final_map(graph: PositionGraph, *, chunk: int) -> torch.Tensor:
    """d y_n / d h_(L-1) at the last position (d, d): the final norm with its coefficient frozen, from ``graph``'s
    own backward (its output still reaches the last layer's output when the layers are cut). J_n is this map times
    the last up-to-layer map."""
    capture = graph.capture
    if not capture.layer_outputs:
        raise ValueError("the position graph recorded no residual stream; build it with record_layers=True")
    last = capture.layer_outputs[max(capture.layer_outputs)]
    d = int(graph.y.shape[0])
    with torch.enable_grad():
        (rows,) = jac.full_jacobians(graph.y, [last], chunk=chunk, should_stop=None, retain_graph=True)
    return rows.reshape(d, d)


__all__ = ["BLOCKS", "Chain", "LayerMaps", "final_map", "materialise", "materialises", "walk"]
