"""The concept flags (--map, --side and generate's --steer-map, --steer-side) parse as enum values with defaults."""

from __future__ import annotations

import pytest

from linlens.cli.main import build_parser
from linlens.contract import ConceptMap, ConceptSpec, SingularSide


def test_concept_flags_default_to_the_concept_spec_defaults() -> None:
    args = build_parser().parse_args(["concept", "love"])
    assert (args.map, args.side, args.rank) == (ConceptSpec.map.value, ConceptSpec.side.value, ConceptSpec.rank)


def test_concept_flags_take_every_enum_value_and_the_steer_prefix() -> None:
    parser = build_parser()
    for concept_map in ConceptMap:
        for side in SingularSide:
            args = parser.parse_args(["concept", "love", "--map", concept_map.value, "--side", side.value])
            assert (ConceptMap(args.map), SingularSide(args.side)) == (concept_map, side)
    steer = parser.parse_args(["generate", "hi", "--steer-map", "layer", "--steer-side", "right"])
    assert (steer.map, steer.side) == ("layer", "right")


def test_a_value_outside_the_enum_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["concept", "love", "--side", "middle"])
    assert "invalid choice" in capsys.readouterr().err
