"""Inside the model: where a prediction forms, layer by layer, and what attention and MLP each contribute.

Once every nonlinearity is frozen, each layer is an exact linear map too, and the residual stream decomposes exactly:

    h_L = x_last + sum_l (attn_l + mlp_l)          y = g * h_L,   g = the final norm's frozen scale (1/rms * weight)

so each block's term, pushed through g and the LM-head row w of the explained token, is an exact share of the logit,
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
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.autograd.forward_ad as forward_ad

from linlens.engine import jacobian as jac
from linlens.engine.capture import capturing
from linlens.engine.linearize import LinearizedRMSNorm
from linlens.engine.results import (
    ComponentContribution,
    ExplainOptions,
    LayerAttributions,
    LayerOptions,
    LayerResult,
    LinearMapSpectrum,
    SingularComponent,
)
from linlens.engine.spectra import decompose

if TYPE_CHECKING:
    from linlens.engine.explainer import Explainer

LayerEvent = LayerAttributions | LayerResult


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy().copy()


def _relative(error: torch.Tensor, reference: torch.Tensor) -> float:
    return float(error.double().norm() / reference.double().norm().clamp_min(1e-300))


def validate_layer_options(options: LayerOptions, num_layers: int, hidden: int) -> tuple[int, ...]:
    """The layers to analyse, or ValueError naming what is wrong."""
    layers = tuple(range(num_layers)) if options.layers is None else tuple(options.layers)
    bad = [layer for layer in layers if not 0 <= layer < num_layers]
    if bad:
        raise ValueError(f"layers {bad[:5]} do not exist; this model has layers 0..{num_layers - 1}")
    if len(set(layers)) != len(layers):
        raise ValueError("each layer may be named once")
    if not 0 <= options.top_k <= hidden:
        raise ValueError(f"layer top_k must be between 0 and {hidden}")
    if options.tokens_per_vector < 1:
        raise ValueError("layer tokens_per_vector must be >= 1")
    return layers


def analyze_layers(
    explainer: Explainer,
    input_ids: list[int],
    options: ExplainOptions,
    layer_options: LayerOptions,
    *,
    should_stop: jac.ShouldStop | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> Iterator[LayerEvent]:
    """Yield the LayerAttributions summary first, then one LayerResult per selected layer as soon as it is ready."""
    layers = validate_layer_options(layer_options, explainer.num_layers, explainer.hidden_size)
    prediction = explainer.predict(input_ids, options)
    twin, base, dtype = explainer.twin_for(options)
    head = base.get_output_embeddings().weight.detach()
    ids = torch.tensor(input_ids, dtype=torch.long, device=head.device)
    n = len(input_ids)
    x = base.get_input_embeddings()(ids).detach().requires_grad_(True)

    with capturing() as capture, torch.enable_grad():
        y = twin.base_model(inputs_embeds=x[None], use_cache=False).last_hidden_state[0, -1]
    count = explainer.num_layers
    offsets = _layer_constants(twin, x) if explainer.has_bias else {}
    final_norm = twin.base_model.norm
    if not isinstance(final_norm, LinearizedRMSNorm):
        raise ValueError(f"{type(final_norm).__name__}: the final norm was not linearised")
    h_final = capture.layer_outputs[count - 1][0, -1].detach()
    scale = torch.rsqrt(h_final.pow(2).mean() + final_norm.eps) * (final_norm.offset + final_norm.weight.to(dtype))
    w = head[prediction.explained.token_id]
    seed = scale * w  # cotangent that turns a residual-stream term into its logit contribution

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
    direct = torch.zeros(n, dtype=dtype, device=x.device)
    direct[-1] = x.detach()[-1] @ seed
    y_detached = y.detach()
    rebuilt = scale * (x.detach()[-1] + stacked.detach().sum(dim=0))
    logit = prediction.explained.logit
    detached_logit = float(y_detached @ w)
    total = float(direct.sum() + block_logits.sum())
    y_energy = float(y_detached.double() @ y_detached.double())

    def contribution(
        index: int, layer: int, component: str, spectrum: LinearMapSpectrum | None
    ) -> ComponentContribution:
        written = scale * stacked[index].detach()
        return ComponentContribution(
            layer=layer,
            component=component,
            logit=float(block_logits[index]),
            per_token=_numpy(per_token[index]),
            constant=float(block_logits[index] - per_token[index].sum()),
            y_norm=float(written.norm()),
            y_share=float(written.double() @ y_detached.double()) / y_energy,
            spectrum=spectrum,
        )

    yield LayerAttributions(
        explained=prediction.explained,
        input_tokens=explainer.decoder.texts(input_ids),
        attention=_numpy(per_token[:count]),
        mlp=_numpy(per_token[count:]),
        per_layer=_numpy(per_token[:count] + per_token[count:]),
        direct=_numpy(direct),
        attention_logits=_numpy(block_logits[:count]),
        mlp_logits=_numpy(block_logits[count:]),
        logit=logit,
        completeness_error=abs(total - detached_logit) / max(abs(detached_logit), 1e-30),
        decomposition_error=_relative(rebuilt - y_detached, y_detached),
    )

    d = explainer.hidden_size
    chunk = options.vjp_chunk_size or explainer._chunk(n, dtype)
    needs_jacobian = layer_options.up_to_layer or layer_options.layer_alone
    per_layer_vjps = (d if needs_jacobian else 0) + (2 * d if layer_options.component_spectra else 0)
    total_vjps = per_layer_vjps * len(layers)
    done = 0

    def progress(offset: int) -> Callable[[int, int], None]:
        def report(finished: int, _: int) -> None:
            if on_progress is not None:
                on_progress(offset + finished, total_vjps)

        return report

    for layer in layers:
        started = time.perf_counter()
        up_to: LinearMapSpectrum | None = None
        alone: LinearMapSpectrum | None = None
        out = capture.layer_outputs[layer][0, -1]
        layer_input = capture.layer_inputs[layer]
        if needs_jacobian:
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
            target = out.detach()
            if layer_options.up_to_layer:
                shifted = target - offsets[("layer", layer)] if offsets else target
                up_to = _spectrum(explainer, to_inputs, x.detach(), shifted, scale, layer_options, "embeddings")
            if layer_options.layer_alone:
                z = layer_input.detach()[0]
                alone = _spectrum(explainer, to_layer_input[:, 0], z, target, scale, layer_options, "logit-lens")
                if explainer.has_bias:  # the layer's own affine constant is not computed: no reconstruction claim
                    alone = dataclasses.replace(alone, reconstruction_error=float("nan"))
            del to_inputs, to_layer_input
        spectra: list[LinearMapSpectrum | None] = [None, None]
        if layer_options.component_spectra:
            for slot, (kind, term) in enumerate((("attention", terms[layer]), ("mlp", terms[count + layer]))):
                with torch.enable_grad():
                    full = jac.full_jacobian(
                        term, x, chunk=chunk, should_stop=should_stop, on_progress=progress(done), retain_graph=True
                    )
                done += d
                linear_part = term.detach() - offsets[(kind, layer)] if offsets else term.detach()
                spectra[slot] = _spectrum(explainer, full, x.detach(), linear_part, scale, layer_options, "embeddings")
                del full
        yield LayerResult(
            layer=layer,
            up_to_layer=up_to,
            layer_alone=alone,
            attention=contribution(layer, layer, "attention", spectra[0]),
            mlp=contribution(count + layer, layer, "mlp", spectra[1]),
            seconds=time.perf_counter() - started,
            vjp_count=per_layer_vjps,
        )


def _layer_constants(twin: Any, x: torch.Tensor) -> dict[tuple[str, int], torch.Tensor]:
    """For affine models: c = h - J x for every layer output and block term at once (last position), from one
    forward-mode JVP through the twin. Keys: ("layer" | "attention" | "mlp", layer index)."""
    constants = {}
    with forward_ad.dual_level(), capturing() as capture, torch.no_grad():
        twin.base_model(inputs_embeds=forward_ad.make_dual(x.detach(), x.detach())[None], use_cache=False)
        for kind, tensors in (("layer", capture.layer_outputs), ("attention", capture.attention), ("mlp", capture.mlp)):
            for layer, output in tensors.items():
                primal, tangent = forward_ad.unpack_dual(output)
                constants[(kind, layer)] = (primal - tangent)[0, -1].detach()
    return constants


def _spectrum(
    explainer: Explainer,
    jacobian: torch.Tensor,
    inputs: torch.Tensor,
    out: torch.Tensor,
    scale: torch.Tensor,
    options: LayerOptions,
    right_reading: str,
) -> LinearMapSpectrum:
    """SVD of the last input position's block of ``jacobian`` (d_out, n, d_in), decoded logit-lens style.

    ``right_reading`` says how right vectors are read: "embeddings" (nearest input embeddings by cosine, for maps of
    the input embeddings) or "logit-lens" (W (g * v), for maps of a residual-stream input).
    """
    rebuilt = torch.einsum("ond,nd->o", jacobian, inputs)
    error = _relative(rebuilt - out, out)
    block = jacobian[:, -1, :]
    (spectrum,) = decompose(block[None], inputs[-1:], out, max(options.top_k, 1))
    k = options.top_k
    components: tuple[SingularComponent, ...] = ()
    if k > 0:
        left = scale[:, None] * spectrum.left[:, :k]
        left_tokens = explainer.decoder.output_tokens(left, options.tokens_per_vector)
        right = spectrum.right[:, :k]
        if right_reading == "embeddings":
            right_tokens = explainer.decoder.input_tokens(right, options.tokens_per_vector)
        else:
            right_tokens = explainer.decoder.output_tokens(scale[:, None] * right, options.tokens_per_vector)
        components = tuple(
            SingularComponent(
                rank=i + 1,
                value=float(spectrum.values[i]),
                left=_numpy(spectrum.left[:, i]),
                right=_numpy(spectrum.right[:, i]),
                left_tokens=left_tokens[i],
                right_tokens=right_tokens[i],
            )
            for i in range(k)
        )
    return LinearMapSpectrum(
        components=components,
        singular_values=_numpy(spectrum.values),
        captured_share=tuple(float(v) for v in spectrum.captured_share[: max(k, 1)]),
        stable_rank=spectrum.stable_rank,
        term_norm=spectrum.term_norm,
        reconstruction_error=error,
    )
