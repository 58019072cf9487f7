"""The prepared default model samples as its authors recommend when a request sets nothing."""

from __future__ import annotations

import pytest
from transformers import GenerationConfig

from service.engines.default_model import TEMPERATURE, TOP_P, prepared_path
from service.engines.hf_model import sampling_defaults

MODEL = prepared_path()


@pytest.mark.skipif(not (MODEL / "config.json").is_file(), reason="the default model is not prepared (make model)")
def test_unset_sampling_takes_the_authors_recommendation_not_openais_1_0():
    defaults = sampling_defaults(GenerationConfig.from_pretrained(MODEL))
    assert (defaults.temperature, defaults.top_p) == (TEMPERATURE, TOP_P) == (0.2, 0.9)
