"""ExplainOptions.skip_special_tokens end to end: the CLI flag, the wire, a real server, the engine's decoder.

The option was added as the issue-18 check that a new Explain option costs the proto, ``contract/options.py`` and
the engine code that computes it (``engine/decode.py``), and nothing else: the flag comes from the field's metadata
and the wire mapping from the field's name.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from linlens.cli.flags import explain_options
from linlens.cli.main import build_parser
from linlens.client import NO_RETRY, Client, ExplainOptions, LayerAnalysisOptions, PositionSelection
from linlens.contract.results import Explanation, SingularComponent, TokenScore

#: A chat-formatted prompt: its special tokens' own J_i decode to special tokens unless they are skipped.
CHAT = "<|im_start|>user\nThe bridge out of Marin is the<|im_end|>\n<|im_start|>assistant\n"


def test_the_cli_flag_comes_from_the_option() -> None:
    parser = build_parser()
    assert explain_options(parser.parse_args(["explain", "x", "--skip-special-tokens"])).skip_special_tokens
    assert not explain_options(parser.parse_args(["explain", "x"])).skip_special_tokens


@pytest.fixture(scope="module")
def client(target: str) -> Iterator[Client]:
    with Client(target, timeout=240, retry=NO_RETRY) as c:
        yield c


def _components(e: Explanation) -> list[SingularComponent]:
    out = [c for s in e.spectra for c in s.components]
    assert e.prompt_spectrum is not None
    out += list(e.prompt_spectrum.components)
    for layer in e.layers:
        assert layer.up_to_layer is not None
        out += list(layer.up_to_layer.components)
    return out


def _lists(e: Explanation) -> list[tuple[TokenScore, ...]]:
    return [tokens for c in _components(e) for tokens in (c.left_tokens, c.right_tokens)]


def test_special_tokens_are_skipped_and_nothing_else_changes(client: Client, smollm2: Any) -> None:
    special = set(smollm2.tokenizer.all_special_ids)
    options = dict(
        positions=PositionSelection.ALL,
        top_k=2,
        tokens_per_vector=8,
        prompt_spectrum=True,
        layers=LayerAnalysisOptions(layers=(29,), top_k=1),
    )
    plain = client.explain(CHAT, options=ExplainOptions(**options)).explanation  # type: ignore[arg-type]
    skipped = client.explain(CHAT, options=ExplainOptions(**options, skip_special_tokens=True)).explanation  # type: ignore[arg-type]
    named = {t.token_id for tokens in _lists(plain) for t in tokens}
    assert named & special, "the prompt must decode to special tokens by default, else this test checks nothing"
    for before, after in zip(_lists(plain), _lists(skipped), strict=True):
        assert len(after) == 8 and not {t.token_id for t in after} & special
        # the same ranking with the special tokens taken out: the kept ones first, in order, with their scores
        kept = [t for t in before if t.token_id not in special]
        assert list(after[: len(kept)]) == kept
    # only the token lists change: the numbers are the same computation
    for a, b in zip(_components(plain), _components(skipped), strict=True):
        assert a.value == b.value
        np.testing.assert_array_equal(a.left, b.left)
    np.testing.assert_array_equal(plain.attributions[0].per_token, skipped.attributions[0].per_token)
