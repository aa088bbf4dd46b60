"""Shared test fixtures: real text (the tinyshakespeare excerpt shipped in tests/data, at character and word level)."""

import os

import pytest
import torch

# The suite runs on 2 cores in two pytest-xdist workers: one intra-op thread per process (and per subprocess it
# starts) avoids oversubscribed, spinning OpenMP threads, which made small-model steps 5-40x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

import dslm_hf  # noqa: F401  registers the Auto classes
from shakespeare_data import excerpt_text


# Variables that make the code under test behave as something other than a plain command a user typed: a rank of a
# launcher (which reports its errors to that launcher and asks the kernel to stop it when its parent dies), accelerate
# settings (device, precision, distributed mode), the traceback-instead-of-one-line switch. A test that needs one sets
# it itself (e.g. pretrain_helpers.cpu_environment for the subprocesses it starts).
CONTROLLED_ENVIRONMENT = ("DSLM_DEBUG", "DSLM_PRETRAIN_WORKER", "DSLM_PRETRAIN_REPORTS", "WORLD_SIZE", "RANK", "LOCAL_RANK",
                          "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


@pytest.fixture(scope="session", autouse=True)
def environment_without_the_users_launcher_settings():
    """The suite passes whatever the environment it is started from: launcher and accelerate settings are removed
    for every test and for the processes tests start (they inherit os.environ)."""
    with pytest.MonkeyPatch.context() as patch:
        for name in CONTROLLED_ENVIRONMENT + tuple(k for k in os.environ if k.startswith("ACCELERATE_")):
            patch.delenv(name, raising=False)
        yield


@pytest.fixture(scope="session")
def shakespeare_text() -> str:
    """The shipped excerpt: 299,867 characters, 62 distinct, ~70k words."""
    return excerpt_text()


@pytest.fixture(scope="session")
def char_vocab(shakespeare_text) -> dict[str, int]:
    return {c: i for i, c in enumerate(sorted(set(shakespeare_text)))}


@pytest.fixture(scope="session")
def text_batch(shakespeare_text, char_vocab):
    """make(batch, length, offset) -> LongTensor (batch, length) of real character ids, rows 1000 chars apart."""

    def make(batch: int, length: int, offset: int = 0) -> torch.Tensor:
        rows = [shakespeare_text[offset + i * 1000 : offset + i * 1000 + length] for i in range(batch)]
        return torch.tensor([[char_vocab[c] for c in row] for row in rows])

    return make


@pytest.fixture(scope="session")
def word_batch(shakespeare_text):
    """make(batch, length, offset, vocab_size) -> LongTensor of real word ids (rank by frequency; rare words -> last id).

    Words give a realistic Zipf-distributed token stream with a vocabulary large enough that the initial logit
    variance is measured over thousands of output rows, not 62.
    """
    import re
    from collections import Counter

    words = re.findall(r"\w+|[^\w\s]", shakespeare_text)
    ranked = [w for w, _ in Counter(words).most_common()]

    def make(batch: int, length: int, offset: int = 0, vocab_size: int = 4096) -> torch.Tensor:
        rank = {w: i for i, w in enumerate(ranked[: vocab_size - 1])}
        rows = [words[offset + i * 997 : offset + i * 997 + length] for i in range(batch)]
        return torch.tensor([[rank.get(w, vocab_size - 1) for w in row] for row in rows])

    return make


@pytest.fixture
def tiny_config():
    """The tiny_models.tiny_config factory: tiny_config(**overrides) -> DeepScaleLMConfig of the canonical tiny shape
    (tests/tiny_models.py) with `overrides` replacing fields."""
    from tiny_models import tiny_config as make

    return make
