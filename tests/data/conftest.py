"""What the data tests share: a byte tokenizer and the real tiny-llava processor (built once per module)."""

from __future__ import annotations

import pytest

from pipelines.models.loading import load_processor
from pipelines.models.tokenizer import build_byte_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


@pytest.fixture(scope="module")
def llava_proc(model_dirs):
    return load_processor(model_dirs["tiny-llava"])
