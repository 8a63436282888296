"""Inside the model: where a prediction forms, layer by layer, and what attention and MLP each contribute.

Once every nonlinearity is frozen, each layer is an exact linear map too, and the residual stream decomposes exactly:

    h_L = h_0 + sum_l (attn_l + mlp_l)          y = g * (C h_L) + b

(h_0 what enters the first layer at the last position: x_last, plus GPT-2's position embedding, times Granite's
embedding multiplier; g the final norm's frozen scale, C its mean subtraction for LayerNorm, b its bias:
:mod:`linlens.engine.final_norm`), for sequential and parallel blocks alike, so each block's term, pushed through the
final norm's linear part and the LM-head row w of the explained token, is an exact share of the logit,
and since each term is itself a linear function of the input embeddings, one more VJP splits it over input tokens.
That is direct-logit attribution made exact and token-resolved: the whole layers x tokens matrix costs one batched
VJP with one seed per block (2L seeds), never a Jacobian per layer.

Per selected layer, the full Jacobians are computed only when asked (up to layer l / layer l alone: d VJPs, shared;
component spectra: 2d VJPs). Their singular vectors are decoded logit-lens style: a direction u of the residual
stream is read as the logits W (g * u) it would produce at the output, g frozen at this input's final norm.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from linlens.contract import (
    ComponentContribution,
    ExplainMethod,
    LayerAnalysisOptions,
    LayerAttributions,
    LayerResult,
    LinearMapSpectrum,
    SingularComponent,
)
from linlens.engine import block_shares, layer_chain
from linlens.engine import jacobian as jac
from linlens.engine.capture import Capture
from linlens.engine.final_norm import FrozenFinalNorm
from linlens.engine.forward import ExplanationPass
from linlens.engine.matrix_free import BlockMaps, Cancelled, Triplets, top_singular_triplets
from linlens.engine.output_spectra import numpy, relative, singular_components
from linlens.engine.plan import matrix_free_products
from linlens.engine.products import GraphProducts
from linlens.engine.spectra import Spectrum, decompose, exact_residuals, from_triplets

LayerEvent = LayerAttributions | LayerResult


def analyze_layers(
    p: ExplanationPass,
    options: LayerAnalysisOptions,
    *,
    should_stop: jac.ShouldStop | None = None,
    on_progress: jac.OnPhaseProgress | None = None,
    chain: layer_chain.Chain[_Kept] | None = None,
) -> Iterator[LayerEvent]:
    """Yield the LayerAttributions matrix first, then one LayerResult per selected layer as soon as it is ready.

    ``p`` must have been built with a layer analysis in its options, so that its forward pass recorded the residual
    stream. ``chain``: the layer maps already materialised (:func:`last_position_chain`, when the plan takes the
    chain), else they are materialised here.
    Raises ExplanationCancelled when ``should_stop`` turns true (also checked between layers, since a layer
    without Jacobians polls nothing).
    """
    context = p.context
    count = context.num_layers
    layers = options.selected(count)
    capture, x = p.capture, p.x
    if not capture.layer_outputs:
        raise ValueError("the explanation pass recorded no residual stream; build it with ExplainOptions.layers")
    norm = FrozenFinalNorm.of(p, capture.layer_outputs[count - 1][0, -1])
    w = p.head[p.prediction.explained.token_id]
    seed = norm.seed(w)  # cotangent that turns a residual-stream term into its logit contribution

    d = context.hidden_size
    k = max(options.top_k, 1)  # top_k 0 still reports the summaries (stable rank, rank-1 share), which need s_1
    method = p.plan.layer_method
    maps_per_layer = (1 if options.up_to_layer else 0) + (1 if options.layer_alone else 0)
    maps_per_layer += 2 if options.component_spectra else 0
    wants_maps = options.up_to_layer or options.component_spectra
    # The matrix-free maps check their reconstructions against M x over every position (the images).
    needs_images = method is ExplainMethod.MATRIX_FREE and wants_maps
    materialised = needs_images and p.plan.layer_chain

    # The layers x tokens matrix (:mod:`linlens.engine.block_shares`): by tangents, the same batched JVP also gives
    # the images of every block term and of the selected layers' outputs.
    terms = [capture.attention[layer][0, -1] for layer in range(count)] + [
        capture.mlp[layer][0, -1] for layer in range(count)
    ]
    stacked = torch.stack(terms)  # (2L, d)
    tangents = block_shares.by_tangents(p.n, 2 * count)
    imaged = list(layers) if tangents and needs_images and options.up_to_layer else []
    outputs = torch.stack(terms + [capture.layer_outputs[layer][0, -1] for layer in imaged]) if imaged else stacked
    per_token, image_rows = block_shares.token_shares(
        outputs, x, seed, 2 * count, tangents=tangents, chunk=p.vjp_chunk()
    )  # (2L, n)
    block_logits = stacked.detach() @ seed  # exact shares of the logit, bias constants included
    # The direct path: what enters the first layer at the last position (x_last; GPT-2 adds its position
    # embedding, a constant; Granite multiplies by its embedding multiplier), then the final norm's bias.
    entering = capture.layer_inputs[0][0, -1].detach()
    entering_constant = p.block_constants.get(("input", 0), torch.zeros_like(entering))
    direct = torch.zeros(p.n, dtype=p.dtype, device=x.device)
    direct[-1] = (entering - entering_constant) @ seed
    outside_constant = float(entering_constant @ seed + norm.bias @ w)
    y_detached = p.y.detach()
    rebuilt = norm.apply(entering + stacked.detach().sum(dim=0))
    detached_logit = float(y_detached @ w)
    total = float(direct.sum() + block_logits.sum()) + outside_constant
    y_energy = float(y_detached.double() @ y_detached.double())

    def contribution(
        index: int, layer: int, component: Literal["attention", "mlp"], spectrum: LinearMapSpectrum | None
    ) -> ComponentContribution:
        written = norm.linear(stacked[index].detach())
        return ComponentContribution(
            layer=layer,
            component=component,
            logit=float(block_logits[index]),
            per_token=numpy(per_token[index]),
            constant=float(block_logits[index] - per_token[index].sum()),
            y_norm=float(written.norm()),
            y_share=float(written.double() @ y_detached.double()) / y_energy,
            spectrum=spectrum,
        )

    yield LayerAttributions(
        explained=p.prediction.explained,
        input_tokens=context.decoder.texts(list(p.input_ids)),
        attention=numpy(per_token[:count]),
        mlp=numpy(per_token[count:]),
        per_layer=numpy(per_token[:count] + per_token[count:]),
        direct=numpy(direct),
        attention_logits=numpy(block_logits[:count]),
        mlp_logits=numpy(block_logits[count:]),
        logit=p.prediction.explained.logit,
        completeness_error=abs(total - detached_logit) / max(abs(detached_logit), 1e-30),
        decomposition_error=relative(rebuilt - y_detached, y_detached),
        constant=outside_constant,
    )

    chunk = p.vjp_chunk()
    if method is ExplainMethod.FULL:
        per_layer_vjps = options.vjps_per_layer(d)
    else:
        per_layer_vjps = int(matrix_free_products(k, maps_per_layer))
    total_products = per_layer_vjps * len(layers)
    done = 0

    def progress(offset: int) -> jac.OnProgress:
        def report(finished: int, _: int) -> None:
            if on_progress is not None:
                on_progress("layers", min(offset + finished, total_products), total_products)

        return report

    offsets = p.block_constants
    images: Capture | None = None
    chained: dict[int, _Chained] = {}
    pending: Iterator[_Chained] | None = None
    if image_rows is not None and needs_images:
        images = Capture()
        for layer in range(count):
            images.attention[layer] = image_rows[layer][None, None]
            images.mlp[layer] = image_rows[count + layer][None, None]
        for slot, layer in enumerate(imaged):
            images.layer_outputs[layer] = image_rows[2 * count + slot][None, None]
    if materialised:
        # Every layer's maps of x_n, materialised one layer at a time on the cut position graph, and every map's
        # reconstruction image from one multi-output JVP on the whole graph (unless the tangents gave them).
        images = images if images is not None else _whole_images(p, layers, options)
        chain = chain if chain is not None else last_position_chain(p, options, should_stop)
        assert chain is not None
        pending = _chained(p, chain, layers, options, norm, images, offsets)
    elif needs_images and images is None:
        # M x for every layer output and block term at once: one forward-mode JVP through the frozen system.
        images = Capture()
        p.frozen_jvp(x.detach(), images)
    # The last position's own graph (it recorded its residual stream) serves the maps of x_n: up-to-layer and blocks.
    position = p.position_graph() if images is not None and pending is None else None
    for layer in layers:
        if should_stop is not None and should_stop():
            raise jac.ExplanationCancelled("the layer analysis was stopped")
        started = time.perf_counter()
        up_to: LinearMapSpectrum | None = None
        alone: LinearMapSpectrum | None = None
        out = capture.layer_outputs[layer][0, -1]
        layer_input = capture.layer_inputs[layer]
        spectra: list[LinearMapSpectrum | None] = [None, None]
        blocks: tuple[tuple[str, torch.Tensor], ...] = (("attention", terms[layer]), ("mlp", terms[count + layer]))
        if pending is not None:
            while layer not in chained:
                ready = next(pending)
                chained[ready.layer] = ready
            got = chained.pop(layer)
            up_to, spectra = got.up_to, [got.blocks.get("attention"), got.blocks.get("mlp")]
            products = got.rows
            if options.layer_alone:
                counter = _Counter(progress(done))
                alone = _free_spectrum(p, out, layer_input, None, out.detach(), norm, options, k, "logit-lens", counter)
                if context.has_bias:
                    alone = dataclasses.replace(alone, reconstruction_error=float("nan"))
                products += counter.count
            done += products
            if on_progress is not None:
                on_progress("layers", min(done, total_products), total_products)
        elif method is ExplainMethod.MATRIX_FREE:
            counter = _Counter(progress(done))
            if options.up_to_layer:
                shifted = out.detach() - offsets[("layer", layer)] if offsets else out.detach()
                assert images is not None
                # Products on the last position's own graph (its map of x_n); the reconstruction over every
                # position comes from the whole graph's forward-mode image.
                assert position is not None
                up_to = _free_spectrum(
                    p,
                    position.capture.layer_outputs[layer][0, -1],
                    position.x,
                    images.layer_outputs[layer][0, -1],
                    shifted,
                    norm,
                    options,
                    k,
                    "embeddings",
                    counter,
                )
            if options.layer_alone:
                target = out.detach()
                alone = _free_spectrum(p, out, layer_input, None, target, norm, options, k, "logit-lens", counter)
                if context.has_bias:  # the layer's own affine constant is not computed: no reconstruction claim
                    alone = dataclasses.replace(alone, reconstruction_error=float("nan"))
            if options.component_spectra:
                assert images is not None
                assert position is not None
                for slot, (kind, term) in enumerate(blocks):
                    image = getattr(images, kind)[layer][0, -1]
                    linear_part = term.detach() - offsets[(kind, layer)] if offsets else term.detach()
                    chain_term = getattr(position.capture, kind)[layer][0, -1]
                    spectra[slot] = _free_spectrum(
                        p, chain_term, position.x, image, linear_part, norm, options, k, "embeddings", counter
                    )
            done += counter.count
            products = counter.count
        else:
            products = 0
            if options.up_to_layer or options.layer_alone:
                with torch.enable_grad():
                    to_inputs, to_layer_input = jac.full_jacobians(
                        out,
                        [x, layer_input],
                        chunk=chunk,
                        should_stop=should_stop,
                        on_progress=progress(done),
                        retain_graph=True,
                    )
                done += d
                products += d
                target = out.detach()
                if options.up_to_layer:
                    shifted = target - offsets[("layer", layer)] if offsets else target
                    up_to = _full_spectrum(p, to_inputs, x.detach(), shifted, norm, options, "embeddings")
                if options.layer_alone:
                    z = layer_input.detach()[0]
                    alone = _full_spectrum(p, to_layer_input[:, 0], z, target, norm, options, "logit-lens")
                    if context.has_bias:  # the layer's own affine constant is not computed: no reconstruction claim
                        alone = dataclasses.replace(alone, reconstruction_error=float("nan"))
                del to_inputs, to_layer_input
            if options.component_spectra:
                for slot, (kind, term) in enumerate(blocks):
                    with torch.enable_grad():
                        full = jac.full_jacobian(
                            term, x, chunk=chunk, should_stop=should_stop, on_progress=progress(done), retain_graph=True
                        )
                    done += d
                    products += d
                    linear_part = term.detach() - offsets[(kind, layer)] if offsets else term.detach()
                    spectra[slot] = _full_spectrum(p, full, x.detach(), linear_part, norm, options, "embeddings")
                    del full
        seconds = time.perf_counter() - started
        yield LayerResult(
            layer=layer,
            up_to_layer=up_to,
            layer_alone=alone,
            attention=contribution(layer, layer, "attention", spectra[0]),
            mlp=contribution(count + layer, layer, "mlp", spectra[1]),
            duration_ms=seconds * 1000.0,
            vjp_count=products,
        )
    if on_progress is not None and done and done != total_products:  # an estimate (matrix-free): say it is over
        on_progress("layers", done, done)


class _Counter:
    """Products done for one layer, forwarded to the progress callback."""

    def __init__(self, report: jac.OnProgress) -> None:
        self.report = report
        self.count = 0

    def __call__(self, products: int) -> None:
        self.count += products
        self.report(self.count, 0)


def _decode(
    p: ExplanationPass,
    spectrum: Spectrum,
    norm: FrozenFinalNorm,
    options: LayerAnalysisOptions,
    right_reading: str,
    residuals: tuple[torch.Tensor, torch.Tensor],
) -> tuple[SingularComponent, ...]:
    """The top components decoded logit-lens style: left (and "logit-lens" right) vectors through the final norm's
    frozen linear part and the LM head; "embeddings" right vectors to the nearest input embeddings."""
    decoder = p.decoder
    k = options.top_k
    if k == 0:
        return ()
    left_tokens = decoder.output_tokens(norm.columns(spectrum.left[:, :k]), options.tokens_per_vector)
    right = spectrum.right[:, :k]
    if right_reading == "embeddings":
        right_tokens = decoder.input_tokens(right, options.tokens_per_vector)
    else:
        right_tokens = decoder.output_tokens(norm.columns(right), options.tokens_per_vector)
    return singular_components(spectrum, k, left_tokens, right_tokens, residuals)


def _free_spectrum(
    p: ExplanationPass,
    out: torch.Tensor,
    inp: torch.Tensor,
    image: torch.Tensor | None,
    linear_part: torch.Tensor,
    norm: FrozenFinalNorm,
    options: LayerAnalysisOptions,
    k: int,
    right_reading: str,
    counter: _Counter,
) -> LinearMapSpectrum:
    """The top-k of the last input position's block of d out / d inp, matrix-free, decoded like the full one.

    ``image`` is M z over every input position (from the forward-mode JVP), or None to take it with one more JVP.
    """
    graph = GraphProducts(out, inp, chunk=p.vjp_chunk())
    # (n, d): the embeddings, or a layer's input (1, n, d); x_n alone (d,) on the last position's own graph
    shape = (1, *inp.shape) if inp.dim() == 1 else inp.shape if inp.dim() == 2 else inp.shape[1:]
    n, d_in = int(shape[0]), int(shape[1])

    def at_last(vectors: torch.Tensor) -> torch.Tensor:  # (b, d_in) -> (b, *inp.shape) with the rows at position n-1
        tangents = vectors.new_zeros((vectors.shape[0], n, d_in))
        tangents[:, -1] = vectors
        return tangents.reshape(vectors.shape[0], *inp.shape)

    def apply(vectors: torch.Tensor) -> torch.Tensor:
        return graph.jvp(at_last(vectors[0]))[None]

    def apply_transposed(vectors: torch.Tensor) -> torch.Tensor:
        rows = graph.vjp(vectors[0]).reshape(vectors.shape[1], n, d_in)
        return rows[:, -1][None]

    maps = BlockMaps(1, d_in, graph.out_dim, apply, apply_transposed, out.dtype, out.device)
    try:
        (found,), _ = top_singular_triplets(maps, k, on_products=counter)
    except Cancelled:
        raise jac.ExplanationCancelled("the layer analysis was stopped") from None
    z = inp.detach().reshape(n, d_in)
    (term,) = graph.jvp(at_last(z[-1][None]))  # the last position's own term M_last z_last
    if image is None:
        (image,) = graph.jvp(z.reshape(1, *inp.shape))
    counter(2)
    graph.release()
    spectrum = from_triplets(found, term[None], linear_part, k)
    error = found.frobenius_sq_error / max(float(found.values[0]) ** 2, 1e-300)
    components = _decode(p, spectrum, norm, options, right_reading, (found.residual_left, found.residual_right))
    return _matrix_free_result(spectrum, options, relative(image - linear_part, linear_part), error, components)


def _full_spectrum(
    p: ExplanationPass,
    jacobian: torch.Tensor,
    inputs: torch.Tensor,
    out: torch.Tensor,
    norm: FrozenFinalNorm,
    options: LayerAnalysisOptions,
    right_reading: str,
) -> LinearMapSpectrum:
    """SVD of the last input position's block of a materialised ``jacobian`` (d_out, n, d_in), decoded logit-lens
    style (see :func:`_decode`); its reconstruction covers every input position."""
    rebuilt = torch.einsum("ond,nd->o", jacobian, inputs)
    block = jacobian[:, -1, :]
    (spectrum,) = decompose(block[None], inputs[-1:], out, max(options.top_k, 1))
    k = spectrum.left.shape[-1]
    return LinearMapSpectrum(
        components=_decode(p, spectrum, norm, options, right_reading, exact_residuals(block, spectrum, k)),
        singular_values=numpy(spectrum.values),
        captured_share=tuple(float(v) for v in spectrum.captured_share[: max(options.top_k, 1)]),
        stable_rank=spectrum.stable_rank,
        term_norm=spectrum.term_norm,
        reconstruction_error=relative(rebuilt - out, out),
    )


@dataclass(frozen=True)
class _Chained:
    """One layer's spectra from the materialised chain."""

    layer: int
    up_to: LinearMapSpectrum | None
    blocks: dict[str, LinearMapSpectrum]
    rows: int


def _whole_images(p: ExplanationPass, layers: Sequence[int], options: LayerAnalysisOptions) -> Capture:
    """M x over every position for each selected layer output and block term at the last position: one JVP along x
    of all of them at once on the whole graph (the double-backward trick of GraphProducts on their concatenation),
    for the reconstruction checks."""
    kinds = (["layer_outputs"] if options.up_to_layer else []) + (
        ["attention", "mlp"] if options.component_spectra else []
    )
    outputs = [getattr(p.capture, kind)[layer][0, -1] for layer in layers for kind in kinds]
    graph = GraphProducts(torch.cat(outputs), p.x, chunk=1)
    (image,) = graph.jvp(p.x.detach()[None])
    graph.release()
    images = Capture()
    d = p.context.hidden_size
    for slot, (layer, kind) in enumerate((layer, kind) for layer in layers for kind in kinds):
        getattr(images, kind)[layer] = image[slot * d : (slot + 1) * d][None, None]
    return images


#: One layer's maps from the chain, as kept: (kind, result without its reconstruction and components, spectrum,
#: certificates) per map ("up_to", "attention", "mlp").
_Kept = list[tuple[str, LinearMapSpectrum, Spectrum, tuple[torch.Tensor, torch.Tensor]]]


def last_position_chain(
    p: ExplanationPass, options: LayerAnalysisOptions, should_stop: jac.ShouldStop | None = None
) -> layer_chain.Chain[_Kept] | None:
    """The selected layers' maps of x_n, materialised on the cut position graph and reduced to their spectra as
    the walk passes them, when the plan takes the chain (None otherwise); with J_n when the last-position spectrum
    is FULL on the position graph, so that one walk serves both."""
    if not p.plan.layer_chain:
        return None
    count, k = p.context.num_layers, max(options.top_k, 1)
    x_n, offsets = p.x.detach()[-1], p.block_constants

    def keep(maps: layer_chain.LayerMaps) -> _Kept:
        kept: _Kept = []
        matrices = [("up_to", maps.up_to)] if options.up_to_layer else []
        for kind, matrix in [*matrices, *maps.blocks.items()]:
            slot = "layer_outputs" if kind == "up_to" else kind
            output = getattr(p.capture, slot)[maps.layer][0, -1].detach()
            key = ("layer" if kind == "up_to" else kind, maps.layer)
            linear_part = output - offsets[key] if offsets else output
            kept.append((kind, *_explicit_spectrum(matrix, x_n, linear_part, options, k)))
        return kept

    return layer_chain.materialise(
        p.twin,
        x_n,
        p.prefix,
        layers=set(options.selected(count)),
        blocks=options.component_spectra,
        last_jacobian=p.plan.method is ExplainMethod.FULL and p.plan.on_position_graph,
        chunk=max(p.plan.chain_chunk, 1) * count,  # a row through one layer holds a layer's activations
        keep=keep,
        should_stop=should_stop,
    )


def _chained(
    p: ExplanationPass,
    chain: layer_chain.Chain[_Kept],
    layers: Sequence[int],
    options: LayerAnalysisOptions,
    norm: FrozenFinalNorm,
    images: Capture,
    offsets: dict[tuple[str, int], torch.Tensor],
) -> Iterator[_Chained]:
    """The selected layers' spectra from the materialised chain (:mod:`linlens.engine.layer_chain`), in layer
    order, with their reconstructions over every position (``images``). Their singular vectors are decoded together:
    decoding reads the whole LM head and embedding matrix per call (tens of ms for SmolLM2), so one call for every
    layer costs what one layer's did."""
    found: list[tuple[int, str, LinearMapSpectrum, Spectrum, tuple[torch.Tensor, torch.Tensor]]] = []
    d = p.context.hidden_size
    for layer in sorted(set(layers)):
        for kind, partial, spectrum, residuals in chain.maps[layer]:
            slot = "layer_outputs" if kind == "up_to" else kind
            output = getattr(p.capture, slot)[layer][0, -1].detach()
            key = ("layer" if kind == "up_to" else kind, layer)
            linear_part = output - offsets[key] if offsets else output
            image = getattr(images, slot)[layer][0, -1]
            error = relative(image - linear_part, linear_part)
            found.append((layer, kind, dataclasses.replace(partial, reconstruction_error=error), spectrum, residuals))
    components = _decode_all(p, [(spectrum, residuals) for *_, spectrum, residuals in found], norm, options)
    results: dict[int, dict[str, LinearMapSpectrum]] = {layer: {} for layer in chain.maps}
    for (layer, kind, partial, _, _), decoded in zip(found, components, strict=True):
        results[layer][kind] = dataclasses.replace(partial, components=decoded)
    blocks = 1 + (2 if options.component_spectra else 0)  # the rows of each layer's backward, d each
    for layer in sorted(chain.maps):
        spectra = results[layer]
        up_to = spectra.pop("up_to", None)
        yield _Chained(layer, up_to, spectra, blocks * d)


def _decode_all(
    p: ExplanationPass,
    spectra: list[tuple[Spectrum, tuple[torch.Tensor, torch.Tensor]]],
    norm: FrozenFinalNorm,
    options: LayerAnalysisOptions,
) -> list[tuple[SingularComponent, ...]]:
    """:func:`_decode` ("embeddings" reading) of many spectra in one pass over the LM head and the embeddings."""
    k = options.top_k
    if k == 0 or not spectra:
        return [() for _ in spectra]
    decoder, count = p.context.decoder, options.tokens_per_vector
    widths = [min(k, spectrum.left.shape[-1]) for spectrum, _ in spectra]
    left = decoder.output_tokens(
        norm.columns(torch.cat([s.left[:, :w] for (s, _), w in zip(spectra, widths, strict=True)], 1)), count
    )
    rights = torch.cat([s.right[:, :w] for (s, _), w in zip(spectra, widths, strict=True)], 1)
    right = decoder.input_tokens(rights, count)
    decoded, start = [], 0
    for (spectrum, residuals), width in zip(spectra, widths, strict=True):
        stop = start + width
        decoded.append(singular_components(spectrum, width, left[start:stop], right[start:stop], residuals))
        start = stop
    return decoded


def _explicit_spectrum(
    matrix: torch.Tensor,
    x_n: torch.Tensor,
    linear_part: torch.Tensor,
    options: LayerAnalysisOptions,
    k: int,
) -> tuple[LinearMapSpectrum, Spectrum, tuple[torch.Tensor, torch.Tensor]]:
    """The top-k of a materialised d x d map of x_n, by the same block Krylov as any map but on products with the
    matrix (microseconds each), so its certificates come from fresh products; ||M||_F is exact, so the stable
    rank's error is only that of s_1. Returns the result without its reconstruction error (NaN: its image over
    every position comes later) and decoded components, the spectrum and its certificates (for
    :func:`_decode_all`)."""
    maps = BlockMaps(
        count=1,
        in_dim=int(matrix.shape[1]),
        out_dim=int(matrix.shape[0]),
        apply=lambda v: v @ matrix.T,
        apply_transposed=lambda u: u @ matrix,
        dtype=matrix.dtype,
        device=matrix.device,
    )
    (found,), _ = top_singular_triplets(maps, k)
    found = _exact_frobenius(found, matrix)
    spectrum = from_triplets(found, (matrix @ x_n)[None], linear_part, k)
    # ||M||_F is exact; what is left is s_1's own error, at most its residual times s_1 (and rounding)
    top = max(float(found.residual_left[0]), float(found.residual_right[0]))
    error = spectrum.stable_rank * max(2.0 * top, 100 * torch.finfo(matrix.dtype).eps)
    result = _matrix_free_result(spectrum, options, float("nan"), error)
    return result, spectrum, (found.residual_left, found.residual_right)


def _matrix_free_result(
    spectrum: Spectrum,
    options: LayerAnalysisOptions,
    reconstruction_error: float,
    stable_rank_error: float,
    components: tuple[SingularComponent, ...] = (),
) -> LinearMapSpectrum:
    """A layer map's result from its top-k (a Krylov solve: the values past the top are not all known)."""
    return LinearMapSpectrum(
        components=components,
        singular_values=numpy(spectrum.values),
        captured_share=tuple(float(v) for v in spectrum.captured_share[: max(options.top_k, 1)]),
        stable_rank=spectrum.stable_rank,
        term_norm=spectrum.term_norm,
        reconstruction_error=reconstruction_error,
        singular_values_complete=False,
        stable_rank_error=stable_rank_error,
    )


def _exact_frobenius(found: Triplets, matrix: torch.Tensor) -> Triplets:
    return dataclasses.replace(found, frobenius_sq=float((matrix.double() ** 2).sum()), frobenius_sq_error=0.0)
