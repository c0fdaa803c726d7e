"""Fixtures shared by the data tests: the byte-level BPE tokenizers with and without a chat template."""

from __future__ import annotations

import pytest
from helpers.llm import byte_bpe_tokenizer


@pytest.fixture(scope="module")
def chat_tok():
    return byte_bpe_tokenizer(chat=True)


@pytest.fixture(scope="module")
def bos_tok():
    return byte_bpe_tokenizer(chat=False)
