"""The paper's figure types (arXiv 2505.24293) for the models that ship on PyPI, written as PNGs into docs/img/.

For each model, one explanation of the prompt (every position's Jacobian, its top singular components, and the
layer analysis of the chosen layers) gives three figures, drawn by ``linlens.report.png`` (the viz extra):

- ``<model>-spectra.png``: the singular values of every input position's detached Jacobian J_i, log scale: each
  falls off steeply after the first few (the paper's "extremely low-dimensional" claim);
- ``<model>-singular-vectors.png``: the last position's top singular vectors decoded: left through the LM head (the
  predicted concept), right to the nearest input embeddings;
- ``<model>-layers.png``: the layers x tokens heat map of the explained logit with each layer's attention and MLP
  contribution, the emergence chart (the share of the logit after each layer and the explained token's rank in each
  layer's up-to-layer map), and the stable rank of the up-to-layer maps falling layer by layer.

    python scripts/paper_figures.py                      # smollm2-135m and gemma-3-270m, all layers
    python scripts/paper_figures.py --models smollm2-135m --layers every:5

The README's report image is the CLI's own report of the default explanation:

    linlens explain "The bridge out of Marin is the" --layers every:10 --png docs/img/smollm2-135m-report.png
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from linlens.engine import ExplainOptions, LayerAnalysisOptions, PositionSelection
from linlens.models import load_model
from linlens.report.paper import layers_figure, singular_vectors_figure, spectra_figure
from linlens.report.png import save_figure

PROMPT = "The bridge out of Marin is the"
ROOT = Path(__file__).resolve().parents[1]
#: The PNGs are committed: keep each well under this.
MAX_BYTES = 300_000


def figures(model: str, prompt: str, layers: str, out: Path) -> list[Path]:
    started = time.perf_counter()
    loaded = load_model(model)
    ids = [int(t) for t in loaded.tokenizer(prompt)["input_ids"]]
    print(f"{model}: loaded in {time.perf_counter() - started:.0f} s; {len(ids)} tokens")
    started = time.perf_counter()
    options = ExplainOptions(
        top_k=3,
        tokens_per_vector=8,
        positions=PositionSelection.ALL,
        layers=LayerAnalysisOptions.parse(layers, top_k=1, tokens_per_vector=8),
    )
    exp = loaded.explainer.explain(ids, options)
    print(f"{model}: explained ({layers}) in {time.perf_counter() - started:.0f} s, {exp.vjp_count} VJPs")
    explained = repr(exp.explained.text)
    written = [
        save_figure(
            spectra_figure(exp, f"{model}: singular values of each J_i = ∂y/∂x_i for {prompt!r} → {explained}"),
            out / f"{model}-spectra.png",
        ),
        save_figure(
            singular_vectors_figure(exp, f"{model}: top singular vectors of J at the last position, decoded"),
            out / f"{model}-singular-vectors.png",
        ),
        save_figure(
            layers_figure(exp, f"{model}: where {explained} forms, layer by layer ({prompt!r})"),
            out / f"{model}-layers.png",
        ),
    ]
    for path in written:
        size = path.stat().st_size
        print(f"  {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: {size / 1000:.0f} kB")
        if size > MAX_BYTES:
            raise SystemExit(f"{path} is {size} bytes, over {MAX_BYTES}: make the figure smaller")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma-3-270m"])
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--layers", default="all", help="layers with up-to-layer maps: all, every:K or 0,5,10")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for model in args.models:
        figures(model, args.prompt, args.layers, args.out)


if __name__ == "__main__":
    main()
