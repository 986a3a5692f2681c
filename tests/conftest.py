from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests import tiny
from tests.hub_fixtures import hub, hub_datasets  # noqa: F401  (the fake Hub fixtures, see tests/hub_fixtures.py)


@pytest.fixture(autouse=True)
def _isolate_home(tmp_path_factory, monkeypatch):
    """Keep user state (hash cache, HF cache) out of the real home directory."""
    home = tmp_path_factory.getbasetemp() / "home"
    home.mkdir(exist_ok=True)
    monkeypatch.setenv("PORTLLM_HOME", str(home / "portllm"))
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "1"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv("PORTLLM_DEBUG", raising=False)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tokenizer")
    tiny.make_tokenizer(d)
    return d


def _model(tmp_path_factory, tokenizer_dir, name, **kw) -> Path:
    d = tmp_path_factory.mktemp(name)
    tiny.make_model(d, tokenizer_from=tokenizer_dir, **kw)
    return d


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return _model(tmp_path_factory, tokenizer_dir, "llama", arch="llama", seed=0)


@pytest.fixture(scope="session")
def llama_evolved_dir(tmp_path_factory, llama_dir) -> Path:
    d = tmp_path_factory.mktemp("llama-evolved")
    tiny.perturb_model(llama_dir, d, scale=0.05, seed=1)
    return d


@pytest.fixture(scope="session")
def llama_lora_dir(tmp_path_factory, llama_dir) -> Path:
    d = tmp_path_factory.mktemp("llama-lora")
    tiny.make_lora(llama_dir, d, seed=3)
    return d


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need CUDA: where torch sees none (CI), they are skipped with the reason printed (-ra)."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False on this machine")
    for item in gpu_items:
        item.add_marker(skip)
