"""One explanation plan: which graph and which method serve each part, decided once from the options and the model.

Admission (the memory estimate), the whole-output explanation and the layer analysis all read the same
:class:`ExplanationPlan`, so the method that is estimated is the method that runs. The choices:

- the spectra: on the last position's own graph (:mod:`linlens.engine.last_position`) when only the last position
  is asked for, else on the whole prompt's graph; FULL or MATRIX_FREE as asked, or under AUTO the cheaper by a cost
  model (on the position graph: passes and rows, :func:`~linlens.engine.last_position.chain_costs`; on the whole
  graph: product counts);
- the layer maps: FULL or MATRIX_FREE, as asked or the cheaper by product counts.
"""

from __future__ import annotations

from dataclasses import dataclass

from linlens.contract import ExplainMethod, ExplainOptions, LayerAnalysisOptions, OptionError
from linlens.engine.last_position import chain_block, chain_costs, on_position_graph
from linlens.engine.layer_chain import materialises

#: Krylov iterations assumed when the cost of the matrix-free method on the whole graph is estimated ahead of it.
ASSUMED_ITERATIONS = 6
#: How much more a double-backward JVP costs than a VJP on the whole graph, for the same estimate.
JVP_WEIGHT = 2.0
#: An SVD of a d x d matrix costs about this many times d^3 / (multiply-adds of one token through the decoder) VJP
#: rows on the position graph: 20 d^3 flops at about 70% of the rate a backward row reaches (SmolLM2, one thread:
#: a 576 x 576 SVD 44-56 ms, a row 3.5 ms).
SVD_ROW_FACTOR = 7.0
#: What one batch of rows on the last position's own graph may take for its value gradients over the prefix: a row's
#: backward through attention computes the gradient of every position's values (the prefix's are then dropped), one
#: layer at a time. Measured on SmolLM2 at 1,024 tokens: 576 rows in one batch raised the peak from 1,685 MiB (the
#: default request) to 3,511 MiB, 2.3x the plain forward + backward; this budget allows 85 rows per pass there (all
#: 576 up to 151 tokens), a few more passes of a cost that is mostly rows.
POSITION_ROWS_BUDGET = 256 << 20


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs to know of a model."""

    hidden: int
    #: Multiply-adds of one token through the decoder layers (their weight count).
    layer_weights: int
    #: VJPs per batched backward on the position graph (its memory budget at one position).
    chain_chunk: int
    #: Bytes one row on the position graph takes per prefix token while one layer's backward runs (the values'
    #: gradient before and after grouped-query expansion); 0: not counted.
    prefix_row_bytes: int = 0
    #: Decoder layers (0: unknown, and the layer chain is never chosen).
    layers: int = 0

    def chain_rows(self, n_tokens: int) -> int:
        """VJPs per batched backward on the position graph of an ``n_tokens`` prompt: ``chain_chunk``, fewer where
        the rows' value gradients over the prefix would pass :data:`POSITION_ROWS_BUDGET`."""
        if self.prefix_row_bytes <= 0:
            return self.chain_chunk
        fits = POSITION_ROWS_BUDGET // (max(n_tokens, 1) * self.prefix_row_bytes)
        return max(1, min(self.chain_chunk, fits))


@dataclass(frozen=True)
class ExplanationPlan:
    """What runs for one request (see the module docstring)."""

    #: The spectra's method (None: no spectrum asked for).
    method: ExplainMethod | None
    #: Whether the spectra run on the last position's own graph.
    on_position_graph: bool
    #: The layer maps' method (None: no layer analysis, or no layer maps).
    layer_method: ExplainMethod | None
    #: Krylov block width of the widest matrix-free solve (for the memory estimate).
    krylov_block: int
    #: VJPs per batched backward on the position graph (the options' choice, else its memory budget's).
    chain_chunk: int
    #: Whether the layer maps come from the materialised chain of the last position's layer maps
    #: (:mod:`linlens.engine.layer_chain`); its last map, through the final norm, is J_n, so under AUTO the
    #: last-position spectrum is then FULL on that J_n (an SVD instead of a solve).
    layer_chain: bool = False


def block_size(k: int) -> int:
    """Krylov block width for the top ``k`` on the whole graph: k plus oversampling."""
    return k + max(5, k)


def matrix_free_products(k: int, maps: int = 1) -> float:
    """The estimated cost of the matrix-free top-k of ``maps`` maps on the whole graph, in VJP-equivalents."""
    b = block_size(k)
    jvps = maps * (b * (1 + ASSUMED_ITERATIONS) + k)
    vjps = maps * (b * (1 + ASSUMED_ITERATIONS) + k)
    return vjps + JVP_WEIGHT * jvps


def plan(options: ExplainOptions, n_tokens: int, shape: ModelShape) -> ExplanationPlan:
    """The plan for explaining ``n_tokens`` tokens with ``options`` on a model of ``shape``."""
    chain = on_position_graph(options, n_tokens)
    method = _spectra_method(options, n_tokens, shape, chain)
    layers = options.layers
    layer = layer_method(options.method, layers, shape.hidden) if layers is not None else None
    chained = layer is ExplainMethod.MATRIX_FREE and layers is not None and _chains(layers, shape)
    if chained and chain and method is not None and options.method is ExplainMethod.AUTO:
        assert layers is not None
        if _from_chain(options, layers, n_tokens, shape):
            method = ExplainMethod.FULL  # J_n comes with the chain: an SVD instead of a solve
    k = max(options.top_k, layers.top_k if layers is not None else 1, 1)
    maps = max(len(options.selected_positions(n_tokens)) + int(options.prompt_spectrum), 1)
    krylov = chain_block(k) if chain else block_size(k) * maps
    return ExplanationPlan(
        method=method,
        on_position_graph=chain,
        layer_method=layer,
        krylov_block=krylov,
        chain_chunk=options.vjp_chunk_size or shape.chain_rows(n_tokens),
        layer_chain=chained,
    )


def _chains(options: LayerAnalysisOptions, shape: ModelShape) -> bool:
    """Whether matrix-free layer maps come from the materialised chain rather than one solve per map
    (:func:`~linlens.engine.layer_chain.materialises`); layer-alone maps alone are always solved."""
    if shape.layers <= 0 or not (options.up_to_layer or options.component_spectra):
        return False
    maps = (1 if options.up_to_layer else 0) + (1 if options.layer_alone else 0)
    maps += 2 if options.component_spectra else 0
    k = max(options.top_k, 1)
    return materialises(shape.hidden, shape.layers, shape.layer_weights, matrix_free_products(k), maps)


def _from_chain(options: ExplainOptions, layers: LayerAnalysisOptions, n_tokens: int, shape: ModelShape) -> bool:
    """Whether J_n from the chain costs less than the matrix-free solve on the position graph: the walk goes on
    from the last selected layer to the last layer (its share of d rows), then J_n's SVD. With every layer selected
    that is the SVD alone (SmolLM2: about 13 rows against about 370); with layer 0 alone it is not."""
    try:
        selected = layers.selected(shape.layers)
    except OptionError:  # refused later by validation
        return False
    if not selected:
        return False
    svd_rows = SVD_ROW_FACTOR * shape.hidden**3 / max(shape.layer_weights, 1)
    onward = shape.hidden * (shape.layers - 1 - max(selected)) / shape.layers
    chunk = options.vjp_chunk_size or shape.chain_rows(n_tokens)
    return onward + svd_rows < chain_costs(options.top_k, shape.hidden, chunk, svd_rows).matrix_free


def _spectra_method(options: ExplainOptions, n_tokens: int, shape: ModelShape, chain: bool) -> ExplainMethod | None:
    """FULL or MATRIX_FREE for the spectra (None: nothing spectral to compute); the raw Jacobians need FULL."""
    maps = len(options.selected_positions(n_tokens)) + (1 if options.prompt_spectrum else 0)
    if options.include_jacobians:
        return ExplainMethod.FULL
    if maps == 0:
        return None
    if options.method is not ExplainMethod.AUTO:
        return options.method
    if options.top_k == 0:  # the prompt spectrum alone, with its top_k of 0: nothing to decompose
        return None
    if chain:
        svd_rows = SVD_ROW_FACTOR * shape.hidden**3 / max(shape.layer_weights, 1)
        chunk = options.vjp_chunk_size or shape.chain_rows(n_tokens)
        costs = chain_costs(options.top_k, shape.hidden, chunk, svd_rows)
        return ExplainMethod.MATRIX_FREE if costs.matrix_free < costs.full else ExplainMethod.FULL
    # On the whole graph: FULL costs ``hidden`` VJPs for all maps at once, MATRIX_FREE a few dozen per map.
    free = matrix_free_products(options.top_k, maps) + JVP_WEIGHT * n_tokens
    return ExplainMethod.MATRIX_FREE if free < shape.hidden else ExplainMethod.FULL


def layer_method(method: ExplainMethod, options: LayerAnalysisOptions | None, hidden: int) -> ExplainMethod | None:
    """FULL or MATRIX_FREE for the layer maps (None: none asked for): as asked, or under AUTO the cheaper by product
    counts (per layer, FULL costs hidden_size VJPs shared by up-to-layer and layer-alone, plus 2 hidden_size for the
    block spectra)."""
    if options is None:
        return None
    maps = (1 if options.up_to_layer else 0) + (1 if options.layer_alone else 0)
    maps += 2 if options.component_spectra else 0
    if method is not ExplainMethod.AUTO:
        return method
    if maps == 0:
        return ExplainMethod.FULL  # nothing to decompose: the name does not matter
    free = matrix_free_products(max(options.top_k, 1), maps)
    return ExplainMethod.MATRIX_FREE if free < options.vjps_per_layer(hidden) else ExplainMethod.FULL


__all__ = [
    "ExplanationPlan",
    "ModelShape",
    "block_size",
    "layer_method",
    "matrix_free_products",
    "plan",
]
