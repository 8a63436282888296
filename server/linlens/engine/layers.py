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
from collections.abc import Iterator
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
from linlens.engine import jacobian as jac
from linlens.engine.capture import Capture
from linlens.engine.explanation import numpy, relative, singular_components
from linlens.engine.final_norm import FrozenFinalNorm
from linlens.engine.forward import ExplanationPass
from linlens.engine.matrix_free import BlockMaps, Cancelled, top_singular_triplets
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
) -> Iterator[LayerEvent]:
    """Yield the LayerAttributions matrix first, then one LayerResult per selected layer as soon as it is ready.

    ``p`` must have been built with a layer analysis in its options, so that its forward pass recorded the residual
    stream. Raises ExplanationCancelled when ``should_stop`` turns true (also checked between layers, since a layer
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

    # The layers x tokens matrix: one batched VJP, one seed per attention / MLP block.
    terms = [capture.attention[layer][0, -1] for layer in range(count)] + [
        capture.mlp[layer][0, -1] for layer in range(count)
    ]
    stacked = torch.stack(terms)  # (2L, d)
    cotangents = torch.zeros((2 * count, *stacked.shape), dtype=stacked.dtype, device=stacked.device)
    cotangents[torch.arange(2 * count), torch.arange(2 * count)] = seed
    with torch.enable_grad():
        (grads,) = torch.autograd.grad(stacked, x, grad_outputs=cotangents, is_grads_batched=True, retain_graph=True)
    per_token = (grads * x.detach()[None]).sum(dim=-1)  # (2L, n)
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

    d = context.hidden_size
    chunk = p.vjp_chunk()
    k = max(options.top_k, 1)  # top_k 0 still reports the summaries (stable rank, rank-1 share), which need s_1
    method = p.plan.layer_method
    maps_per_layer = (1 if options.up_to_layer else 0) + (1 if options.layer_alone else 0)
    maps_per_layer += 2 if options.component_spectra else 0
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
    if method is ExplainMethod.MATRIX_FREE and (options.up_to_layer or options.component_spectra):
        # M x for every layer output and block term at once: one forward-mode JVP through the frozen system.
        images = Capture()
        p.frozen_jvp(x.detach(), images)
    # The last position's own graph (it recorded its residual stream) serves the maps of x_n: up-to-layer and blocks.
    chain = p.position_graph() if images is not None else None
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
        if method is ExplainMethod.MATRIX_FREE:
            counter = _Counter(progress(done))
            if options.up_to_layer:
                shifted = out.detach() - offsets[("layer", layer)] if offsets else out.detach()
                assert images is not None
                # Products on the last position's own graph (its map of x_n); the reconstruction over every
                # position comes from the whole graph's forward-mode image.
                assert chain is not None
                up_to = _free_spectrum(
                    p,
                    chain.capture.layer_outputs[layer][0, -1],
                    chain.x,
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
                assert chain is not None
                for slot, (kind, term) in enumerate(blocks):
                    image = getattr(images, kind)[layer][0, -1]
                    linear_part = term.detach() - offsets[(kind, layer)] if offsets else term.detach()
                    chain_term = getattr(chain.capture, kind)[layer][0, -1]
                    spectra[slot] = _free_spectrum(
                        p, chain_term, chain.x, image, linear_part, norm, options, k, "embeddings", counter
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
    return LinearMapSpectrum(
        components=_decode(p, spectrum, norm, options, right_reading, (found.residual_left, found.residual_right)),
        singular_values=numpy(spectrum.values),
        captured_share=tuple(float(v) for v in spectrum.captured_share[: max(options.top_k, 1)]),
        stable_rank=spectrum.stable_rank,
        term_norm=spectrum.term_norm,
        reconstruction_error=relative(image - linear_part, linear_part),
        singular_values_complete=False,
        stable_rank_error=error,
    )


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
