"""Config validation shared by the pipeline config and the training config (``build_dataclass``)."""

from __future__ import annotations

import pytest

from osop_ros.core.config import load_config
from osop_ros.core.types import InvalidInputError


def test_numbers_accept_yaml_numeric_strings() -> None:
    # yaml.safe_load reads "3e-1" as a string (YAML 1.1); it is a number for a number field
    cfg = load_config({"pipeline": {"score_threshold": "3e-1", "max_instances": "2"}})
    assert cfg.pipeline.score_threshold == pytest.approx(0.3) and isinstance(cfg.pipeline.score_threshold, float)
    assert cfg.pipeline.max_instances == 2 and isinstance(cfg.pipeline.max_instances, int)


@pytest.mark.parametrize(
    ("section", "bad"),
    [
        ("pipeline", {"score_threshold": "high"}),
        ("pipeline", {"max_instances": 1.5}),
        ("pipeline", {"max_instances": True}),
        ("pipeline", {"icp": "yes"}),
        ("pipeline", {"modality": 3}),
        ("templates", {"crop_size": None}),
    ],
)
def test_bad_values_name_the_key(section: str, bad: dict) -> None:
    with pytest.raises(InvalidInputError, match=f"{section}.{next(iter(bad))}"):
        load_config({section: bad})
