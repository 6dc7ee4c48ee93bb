"""Shared fixtures: tiny random backbones built in code, GLUE data, offline settings.

``glue_dir`` is the committed ``tests/fixtures/glue_tiny`` (a small SST-2 made from templates), so the
default suite needs nothing beside the checkout; ``shared_glue_dir`` is the real data in ``../shared/data``
(or ``GLUE_DIR``), and tests that need it are skipped, with the reason, where it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import lightning  # noqa: F401 - imported before any capsys test: its log handler must bind the real stderr
import pytest
import torch
import transformers  # noqa: F401 - same reason

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

REPO = Path(__file__).resolve().parents[1]
if "COALORA_CACHE" not in os.environ:  # one cache per test session: error tables and allocations are reused
    import tempfile

    os.environ["COALORA_CACHE"] = tempfile.mkdtemp(prefix="coalora-test-cache-")
SHARED_DATA = Path(os.environ.get("GLUE_DIR", REPO.parent / "shared" / "data"))
TINY_GLUE = REPO / "tests" / "fixtures" / "glue_tiny"


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    """A GLUE folder with SST-2 (train, dev, and the ``sst2/sentence/stsa.binary.train`` the configs use)."""
    return TINY_GLUE


@pytest.fixture(scope="session")
def shared_glue_dir() -> Path:
    """The real GLUE data; tests that need its sizes or sentences are skipped without it."""
    if not (SHARED_DATA / "sst2" / "dev.tsv").is_file():
        pytest.skip(f"shared GLUE data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory) -> Path:
    """Tiny random BERT, RoBERTa and LLaMA checkpoints (2 layers, hidden 64) saved as local HF folders."""
    from tests.tiny_models import save_tiny_models

    root = tmp_path_factory.mktemp("tiny_models")
    save_tiny_models(root)
    return root


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory):
    """One empty COALORA_CACHE for a whole test module (use with ``pytest.mark.usefixtures``): its
    allocations and error tables are its own, shared by its tests."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COALORA_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield
