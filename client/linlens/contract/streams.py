"""A generation stream's events put back together into the Generation a unary call would have returned."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from linlens.contract.results import (
    Explanation,
    GeneratedToken,
    Generation,
    GenerationDone,
    LayerAttributions,
    LayerResult,
    StreamEvent,
)


class StreamAssembler:
    """Collects the events of a generation stream into the Generation a unary call would have returned.

    The one place where a stream's layer events are put back into the explanation of their step: a stream sends
    each explanation as soon as it is computed and its layer analysis afterwards, event by event.
    """

    def __init__(self) -> None:
        self.tokens: list[GeneratedToken] = []
        self._explanations: dict[int, Explanation] = {}
        self._matrices: dict[int, LayerAttributions] = {}
        self._layers: dict[int, list[LayerResult]] = {}
        self.done: GenerationDone | None = None

    def add(self, event: StreamEvent) -> None:
        if isinstance(event, GeneratedToken):
            self.tokens.append(event)
        elif isinstance(event, Explanation):
            self._explanations[event.step] = event
        elif isinstance(event, LayerAttributions):
            self._matrices[event.step] = event
        elif isinstance(event, LayerResult):
            self._layers.setdefault(event.step, []).append(event)
        elif isinstance(event, GenerationDone):
            self.done = event

    @property
    def explanations(self) -> tuple[Explanation, ...]:
        """The explanations received so far, each with the layer analysis of its step, in step order."""
        return tuple(
            dataclasses.replace(
                explanation,
                layer_attributions=self._matrices.get(step, explanation.layer_attributions),
                layers=tuple(self._layers.get(step, explanation.layers)),
            )
            for step, explanation in sorted(self._explanations.items())
        )

    def generation(self) -> Generation:
        """The assembled Generation; ValueError when the stream ended without its GenerationDone event."""
        if self.done is None:
            raise ValueError("the stream ended without a GenerationDone event")
        summary = {f.name: getattr(self.done, f.name) for f in dataclasses.fields(self.done)}
        return Generation(tokens=tuple(self.tokens), explanations=self.explanations, **summary)


def collect_stream(events: Iterable[StreamEvent]) -> Generation:
    """Assemble the events of ``generate_stream`` into the Generation that ``generate`` would have returned."""
    assembler = StreamAssembler()
    for event in events:
        assembler.add(event)
    return assembler.generation()


__all__ = ["StreamAssembler", "collect_stream"]
