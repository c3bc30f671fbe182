"""Shared fixtures: offline environment, tiny models saved as local folders."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
from tiny_models import save_tiny_bert  # noqa: E402


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """A 2-layer, hidden-32 BERT classifier saved with the MiniLM tokenizer (fast, exact)."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), layers=2)


@pytest.fixture(scope="session")
def tiny_bert4_dir(tmp_path_factory):
    """A 4-layer, hidden-32 BERT classifier with the MiniLM tokenizer (a U-shaped split
    needs >= 3 blocks)."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert4"), layers=4)
