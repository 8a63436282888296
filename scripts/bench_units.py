"""Explanations in units of the plain model's own forward + backward on the same prompt, measured in the same run.

The unit is ``model(inputs_embeds=x).logits[0, -1].max().backward()`` on the served model: what one prediction and
its gradient cost. Each request is timed as the engine serves it (``Explainer.explain``), the median of
``--repeats`` runs after one warm-up, and divided by the unit's median measured alongside:

- ``Explain(top_k=0)``: attributions and the reconstruction;
- the default ``Explain`` (top 3 at the last position; AUTO picks the method, reported with its product counts);
- ``--layers all`` (every layer's up-to-layer map, layer top_k 1) at the shortest length;
- a 12-token greedy generation with every step explained (default options, then top_k 0), against the same
  generation unexplained (``model.generate`` with its KV cache): the steps explained as the service runs them
  (``Explainer.explain_steps``, one pass shared by every step), and each step's prefix explained from scratch (as
  before) for comparison; ``--only-generation`` runs these rows alone.

    python scripts/bench_engine.py --part units --model smollm2-135m --tokens 7,128,1024 --threads 1
    python scripts/bench_engine.py --part units --wide --tokens 7 --threads 1
    python scripts/bench_engine.py --part units --tokens 7 --threads 1 --only-generation
    python scripts/bench_engine.py --part units --tokens 7 --threads 1 --no-generation --rows layers
    python scripts/bench_engine.py --part units --tokens 7 --threads 1 --no-generation --rows attributions --repeats 9

``--rows`` picks request rows by key (``attributions``: ``Explain(top_k=0)``, ``default``, ``layers``); the unit is
measured for each length either way.
``--attention eager`` serves the model with eager attention (the twin's own kind: the explanation then shares the
served forward pass, engine/context.py ``twin_is_served``), unit and generation included.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from linlens.engine import ExplainOptions, LayerAnalysisOptions

GENERATED = 12
#: The request rows' keys, for ``--rows``.
ROWS = ("attributions", "default", "layers")


def _median_seconds(function: Callable[[], Any], repeats: int) -> float:
    function()  # warm-up: twins, caches, allocator
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _unit(model: Any, ids: list[int]) -> Callable[[], None]:
    def run() -> None:
        x = model.get_input_embeddings()(torch.tensor([ids])).detach().requires_grad_(True)
        model(inputs_embeds=x).logits[0, -1].max().backward()

    return run


def _generation(loaded: Any, ids: list[int], explain: ExplainOptions | None, shared: bool = True) -> Callable[[], None]:
    """A greedy generation of GENERATED tokens, each step explained with ``explain`` (None: unexplained): as the
    service runs it (``Explainer.explain_steps``: one pass shared by every step), or with ``shared`` False as it ran
    before (``explain`` of each prefix from scratch), for the comparison in the same run."""
    model, explainer = loaded.model, loaded.explainer

    def run() -> None:
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]), max_new_tokens=GENERATED, min_new_tokens=GENERATED, do_sample=False
            )
        if explain is not None:
            tokens = [int(t) for t in out[0]]
            lengths = [len(ids) + step for step in range(GENERATED)]
            if shared:
                for _ in explainer.explain_steps(tokens, lengths, explain):
                    pass
            else:
                for n in lengths:
                    explainer.explain(tokens[:n], dataclasses.replace(explain, explained_token_id=tokens[n]))

    return run


def unit_costs(
    loaded: Any,
    prompts: dict[int, list[int]],
    repeats: int,
    label: str,
    generation: bool,
    only_generation: bool = False,
    rows_wanted: frozenset[str] | None = None,
) -> str:
    """The table of docs/engine.md ("In units of the plain forward + backward"); ``only_generation``: its
    generation rows alone; ``rows_wanted``: only these request rows (keys of :data:`ROWS`), None for all."""
    rows = [
        f"#### {label}: explanations in units of the plain forward + backward (threads {torch.get_num_threads()})",
        "",
        "| request | tokens | unit (ms) | request (ms) | units | method, products |",
        "|---|---|---|---|---|---|",
    ]
    explainer = loaded.explainer
    shortest = min(prompts)
    for length, ids in prompts.items() if not only_generation else ():
        unit = _median_seconds(_unit(loaded.model, ids), repeats)
        requests = [
            ("attributions", "Explain(top_k=0)", ExplainOptions(top_k=0)),
            ("default", "default Explain", ExplainOptions()),
        ]
        if length == shortest:
            layers = LayerAnalysisOptions(top_k=1)
            requests.append(("layers", "--layers all (layer top_k 1)", ExplainOptions(layers=layers)))
        for key, name, options in requests:
            if rows_wanted is not None and key not in rows_wanted:
                continue
            last: list[Any] = []

            def request(options: ExplainOptions = options, last: list[Any] = last, ids: list[int] = ids) -> None:
                last[:] = [explainer.explain(ids, options)]

            seconds = _median_seconds(request, repeats)
            exp = last[0]
            method = f"{exp.method.name.lower() if exp.method else '-'}, {exp.vjp_count} VJPs + {exp.jvp_count} JVPs"
            rows.append(
                f"| {name} | {length} | {unit * 1e3:.0f} | {seconds * 1e3:.0f} | {seconds / unit:.2f} | {method} |"
            )
            print(rows[-1], flush=True)
    if generation or only_generation:
        ids = prompts[shortest]
        plain = _median_seconds(_generation(loaded, ids, None), repeats)
        for name, options in (("default options", ExplainOptions()), ("top_k 0", ExplainOptions(top_k=0))):
            for how, shared in (("one shared pass", True), ("each step from scratch", False)):
                seconds = _median_seconds(_generation(loaded, ids, options, shared), max(1, repeats // 2))
                rows.append(
                    f"| {GENERATED}-token generation, every step explained ({name}; {how}) | {shortest} | "
                    f"unexplained {plain * 1e3:.0f} | {seconds * 1e3:.0f} | {seconds / plain:.1f}x the unexplained | |"
                )
                print(rows[-1], flush=True)
    return "\n".join(rows)


__all__ = ["unit_costs"]
