"""Where does the prediction form? The paper's layer figure for one model and prompt, as a markdown table.

For every layer l: the top tokens of the first left singular vector of the up-to-layer-l detached Jacobian (last
position, decoded logit-lens style through the final norm's frozen scale and the LM head), its stable rank and
rank-1 captured share, and the exact logit contributions of layer l's attention and MLP blocks.

    python scripts/layer_emergence.py --model smollm2-135m [--markdown docs/layers.md]
"""

from __future__ import annotations

import argparse
import time

from linlens.engine import ExplainOptions, LayerAnalysisOptions, LayerAttributions, LayerResult
from linlens.models import load_model

PROMPT = "The bridge out of Marin is the"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--markdown", help="append the table to this file")
    args = parser.parse_args()

    loaded = load_model(args.model)
    ids = [int(t) for t in loaded.tokenizer(args.prompt)["input_ids"]]
    started = time.perf_counter()
    layers = LayerAnalysisOptions(top_k=1, tokens_per_vector=args.tokens)
    explanation = loaded.explainer.explain(ids, ExplainOptions(top_k=0, layers=layers))
    seconds = time.perf_counter() - started
    summary = explanation.layer_attributions
    assert isinstance(summary, LayerAttributions)
    target = summary.explained.text
    rows = [
        f"Model `{args.model}`, prompt {args.prompt!r}, explained token {target!r} (logit {summary.logit:.3f}); "
        f"direct path (last token's embedding) {summary.direct.sum():+.3f}; completeness error "
        f"{summary.completeness_error:.1e}; decomposition error of y {summary.decomposition_error:.1e}; "
        f"{seconds:.0f} s on this machine.",
        "",
        "| layer | top tokens of the 1st singular vector (up to this layer) | stable rank | rank-1 share "
        "| attention → logit | MLP → logit |",
        "|---|---|---|---|---|---|",
    ]
    first = None
    present: list[int] = []
    for event in explanation.layers:
        assert isinstance(event, LayerResult) and event.up_to_layer is not None
        tokens = [t.text for t in event.up_to_layer.components[0].left_tokens]
        if target in tokens:
            present.append(event.layer)
            first = event.layer if first is None else first
        shown = ", ".join(f"**{t!r}**" if t == target else repr(t) for t in tokens)
        rows.append(
            f"| {event.layer} | {shown} | {event.up_to_layer.stable_rank:.2f} "
            f"| {event.up_to_layer.captured_share[0]:.3f} | {event.attention.logit:+.3f} | {event.mlp.logit:+.3f} |"
        )
    rows.append("")
    stable = next((layer for layer in present if all(k in present for k in range(layer, present[-1] + 1))), None)
    rows.append(
        f"{target!r} first appears among the top {args.tokens} tokens at layer {first} (counting from 0) and stays "
        f"there from layer {stable} to the last; the per-layer logit contributions sum, with the direct path, to the "
        "logit."
    )
    table = "\n".join(rows)
    print(table)
    if args.markdown:
        with open(args.markdown, "a", encoding="utf-8") as handle:
            handle.write("\n" + table + "\n")


if __name__ == "__main__":
    main()
