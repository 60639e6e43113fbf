"""Fixtures shared by the test modules; helpers live in tests/helpers/."""

import pytest
from helpers import e2e_support as es


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    """A tiny random DeepSeek-V4 checkpoint in the official format, built once."""
    return es.tiny_checkpoint(tmp_path_factory)
