import pytest
from helpers import write_markov_corpus


@pytest.fixture(scope="session")
def markov(tmp_path_factory):
    """(data prefix, cache dir) of a learnable corpus: a random Markov chain and its RS cache."""
    return write_markov_corpus(tmp_path_factory.mktemp("markov"))
