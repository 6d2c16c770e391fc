"""Shared fixtures: fresh tiny models (see tests/models.py for the builders, importable from any test file)."""

import pytest

from tests.models import MODEL_BUILDERS, tiny_bert, tiny_gpt2, tiny_llama, tiny_t5


@pytest.fixture
def bert_model():
    return tiny_bert(num_labels=3)


@pytest.fixture
def gpt2_model():
    return tiny_gpt2()


@pytest.fixture
def llama_model():
    return tiny_llama()


@pytest.fixture
def t5_model():
    return tiny_t5()


@pytest.fixture(params=sorted(MODEL_BUILDERS))
def model_family(request):
    """Each family name in turn ("bert", "gpt2", "llama", "t5"); build with MODEL_BUILDERS[name]()."""
    return request.param
