"""The exactness of every supported family, measured: the numbers behind docs/engine.md's "Measured exactness".

For each tiny model of tests/tiny_models.py (built from its transformers config class, saved and loaded through the
normal path), both precisions and both gate modes, runs the independent checks of tests/checks.py with no limit and
prints what they return: sum_i J_i x_i + c against the model's own y ("model") and against the frozen system
("exact"), c against the frozen system at zero ("const"), the attributions against central differences ("attr") and,
in float64, the layers x tokens matrix ("rows"); then the worst of each. About ten minutes on 2 cores.

    python scripts/family_exactness.py [FAMILY ...]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import checks
from tiny_models import FAMILIES, sample_ids, save_tiny_model

from linlens.engine import AttributionTarget, ExplainOptions, GateMode, LayerAnalysisOptions, Precision
from linlens.models import load_model


def main(families: list[str]) -> None:
    root = Path(tempfile.mkdtemp())
    worst: dict[tuple[str, str], tuple[float, str]] = {}
    for family in families:
        model = load_model(str(save_tiny_model(family, root / family)))
        for precision in (Precision.FLOAT64, Precision.FLOAT32):
            for mode in GateMode:
                options = ExplainOptions(
                    top_k=2,
                    precision=precision,
                    gate_mode=mode,
                    include_jacobians=True,
                    targets=(AttributionTarget(10), AttributionTarget(10, contrast_token_id=20)),
                    layers=LayerAnalysisOptions(up_to_layer=False) if precision is Precision.FLOAT64 else None,
                )
                explanation = model.explainer.explain(sample_ids(), options)
                reference = checks.Reference.of(model, explanation)
                values = {
                    "model": checks.check_reconstruction(model, explanation, 1.0),
                    "exact": checks.check_exactness(reference, explanation, 1.0),
                    "const": checks.check_constant(reference, explanation, 1.0),
                    "attr": checks.check_attributions(reference, explanation, 1.0),
                }
                if precision is Precision.FLOAT64:
                    values["rows"] = checks.check_layer_matrix(reference, explanation, 1.0)
                shown = " ".join(f"{name} {value:.1e}" for name, value in values.items())
                print(f"{family:<11} {precision.name:<8} {mode.name:<12} {shown}", flush=True)
                for name, value in values.items():
                    key = (precision.name, name)
                    if value >= worst.get(key, (0.0, ""))[0]:
                        worst[key] = (value, family)
    for (precision_name, name), (value, family) in sorted(worst.items()):
        print(f"worst {precision_name:<8} {name:<6} {value:.2e} ({family})")


if __name__ == "__main__":
    main(sys.argv[1:] or list(FAMILIES))
