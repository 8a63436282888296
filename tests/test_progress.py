"""Progress while an explanation runs: ExplainStream and GenerateStream events, through the SDK and a real server."""

from __future__ import annotations

import numpy as np
import pytest

from linlens.client import (
    AsyncClient,
    Client,
    ExplainMethod,
    ExplainOptions,
    ExplanationProgress,
    LayerAnalysisOptions,
    collect_stream,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PROMPT = "The bridge out of Marin is the"


def test_explain_with_progress_streams_and_returns_the_same_result(target: str) -> None:
    options = ExplainOptions(top_k=2, method=ExplainMethod.FULL, layers=LayerAnalysisOptions(layers=(29,), top_k=1))
    seen: list[ExplanationProgress] = []
    with Client(target, timeout=240) as client:
        streamed = client.explain(PROMPT, options=options, on_progress=seen.append)
        unary = client.explain(PROMPT, options=options)
    phases = {p.phase for p in seen}
    assert phases == {"jacobian", "layers"}, phases
    for phase in phases:
        mine = [p for p in seen if p.phase == phase]
        assert [p.done for p in mine] == sorted(p.done for p in mine)  # it only moves forward
        assert mine[-1].done == mine[-1].total and all(p.step == 0 for p in mine)
    jacobian = [p for p in seen if p.phase == "jacobian"]
    assert jacobian[-1].total == 576  # the full Jacobian: hidden_size VJPs
    a, b = streamed.explanation, unary.explanation
    np.testing.assert_array_equal(a.attributions[0].per_token, b.attributions[0].per_token)
    assert a.spectra[0].components[0].value == b.spectra[0].components[0].value
    assert [r.layer for r in a.layers] == [29]


def test_matrix_free_progress_in_a_generation_stream_and_the_async_sdk(target: str) -> None:
    options = ExplainOptions(steps=(1,), top_k=2, method=ExplainMethod.MATRIX_FREE)
    with Client(target, timeout=240) as client:
        events = list(client.generate_stream(PROMPT, max_new_tokens=2, explain=options))
    progress = [e for e in events if isinstance(e, ExplanationProgress)]
    assert progress and {p.phase for p in progress} == {"spectra"} and all(p.step == 1 for p in progress)
    assert progress[-1].done == progress[-1].total
    generation = collect_stream(events)  # progress events are not part of the result
    assert [e.step for e in generation.explanations] == [1]

    async def run() -> list[ExplanationProgress]:
        seen: list[ExplanationProgress] = []
        async with AsyncClient(target, timeout=240) as client:
            await client.explain(PROMPT, options=ExplainOptions(top_k=1), on_progress=seen.append)
        return seen

    assert {p.phase for p in asyncio_run(run())} == {"spectra"}


def asyncio_run(coroutine: object) -> list[ExplanationProgress]:
    import asyncio

    return asyncio.run(coroutine)  # type: ignore[arg-type]
