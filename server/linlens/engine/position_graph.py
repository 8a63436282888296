"""The explained (last) position's own linear graph, built on the prefix's frozen keys and values.

Once every coefficient is frozen, the last position's output y_n depends on its own input embedding x_n only through
position n's residual stream: attention is causal, the other positions' keys and values do not depend on x_n, and the
softmax weights are frozen, so x_n enters attention only through its own value, weighted by the frozen a_nn of each
head. J_n = d y_n / d x_n, and every layer's map at the last position, is therefore a chain of per-layer d x d maps at
one position, and products with it cost the same whatever the prompt's length.

It is not a second model of each family: it is the same linear twin run on one token, with transformers' own cache
(:class:`~transformers.DynamicCache`) holding the prefix's keys and values, taken *detached* from the explanation's
own full pass (:class:`~linlens.engine.forward.ExplanationPass` runs with a cache for that reason). Position n's own
coefficients (its norm scales, activated gates, router weights and softmax row) are computed again by the twin from
the same values and frozen as in the full pass; what the prefix contributes arrives only through its frozen keys and
values. Everything the family does (sliding windows shorter than the prompt, NoPE layers, parallel blocks, sandwich
norms, learned positions, soft-capping, mixtures of experts) is the family's own code, so J_n equals the full graph's
last block to rounding (tests/test_position_graph.py checks 1e-12 in float64 on every family).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from linlens.engine.capture import Capture, capturing

#: One layer's cached (keys, values), each (batch, kv_heads, positions, head_dim).
KeyValues = tuple[torch.Tensor, torch.Tensor]


def detached_prefix(cache: DynamicCache, prefix_length: int) -> list[KeyValues]:
    """The first ``prefix_length`` positions of every layer's keys and values in ``cache``, detached from the graph
    that computed them (a product on the position graph must never reach the full pass)."""
    prefix = []
    for layer in cache.layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor):
            raise ValueError(f"{type(layer).__name__} holds no keys and values: the position graph needs attention")
        prefix.append((keys[..., :prefix_length, :].detach(), values[..., :prefix_length, :].detach()))
    return prefix


@dataclass
class PositionGraph:
    """The last position's linear graph: ``y`` computed from the leaf ``x`` (both (d,)) on the frozen prefix."""

    #: x_n, a fresh leaf: the only input of this graph.
    x: torch.Tensor
    #: y_n from the twin on this graph: numerically the full pass's y.
    y: torch.Tensor
    #: The last position's layer inputs, outputs and block terms, each (1, 1, d), recorded when asked.
    capture: Capture
    #: Seconds it took to build.
    seconds: float


def build_position_graph(
    twin: PreTrainedModel,
    x_last: torch.Tensor,
    prefix: list[KeyValues],
    *,
    record_layers: bool,
    cut_layers: bool = False,
) -> PositionGraph:
    """Run the last position (input embedding ``x_last``, (d,)) alone through ``twin`` on the frozen ``prefix``.

    ``record_layers`` records its residual stream (for the layer analysis at the last position); ``cut_layers``
    also cuts the graph at every layer's input (:attr:`Capture.cut`), so that ``y`` no longer reaches ``x`` and
    each layer's own map is a graph of its own.
    """
    started = time.perf_counter()
    position = prefix[0][0].shape[-2] if prefix else 0
    cache = DynamicCache(ddp_cache_data=[(k, v) for k, v in prefix]) if prefix else DynamicCache()
    x = x_last.detach().clone().requires_grad_(True)
    capture = Capture(cut=cut_layers)
    layers = capturing(capture) if record_layers or cut_layers else contextlib.nullcontext()
    positions = torch.tensor([[position]], device=x.device)
    with layers, torch.enable_grad():
        out = twin.base_model(
            inputs_embeds=x[None, None],
            cache=cache,
            use_cache=True,
            position_ids=positions,
            cache_position=positions[0],
        )
    y = out.last_hidden_state[0, -1]
    return PositionGraph(x=x, y=y, capture=capture, seconds=time.perf_counter() - started)


__all__ = ["KeyValues", "PositionGraph", "build_position_graph", "detached_prefix"]
