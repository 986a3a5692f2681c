"""Pytest fixtures that point the real huggingface_hub client at the local fake Hub (tests/hubserver.py).

``huggingface_hub`` reads ENDPOINT, HF_HUB_OFFLINE, the cache and token paths into
``huggingface_hub.constants`` when it is first imported, which in a test session may have happened
long before this fixture runs (conftest's autouse fixture sets HF_HUB_OFFLINE=1, and transformers
imports the library). So besides the environment variables (what a fresh ``portllm`` process would
read), the fixture patches those constants with monkeypatch; both are restored after each test.
portllm_cli.hub itself reads HF_ENDPOINT, HF_HUB_OFFLINE and HF_HOME at call time.

HF_HUB_DISABLE_XET is not needed: the fake Hub never advertises Xet (no xetHash in tree listings,
no X-Xet-* headers, preupload always answers "regular"), so the installed hf_xet is never used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from tests.hubserver import HubServer, User

WRITE_TOKEN = "hf_testWriteTokenAliceAAAAAAAAAAAAAAAA"
READ_TOKEN = "hf_testReadTokenAliceBBBBBBBBBBBBBBBBBB"
BOB_TOKEN = "hf_testWriteTokenBobCCCCCCCCCCCCCCCCCCC"
BAD_TOKEN = "hf_testUnknownTokenDDDDDDDDDDDDDDDDDDDD"

TOKENS = {
    WRITE_TOKEN: User("alice", "write", orgs=("team",)),
    READ_TOKEN: User("alice", "read"),
    BOB_TOKEN: User("bob", "write"),
}


def set_hub_env(monkeypatch: pytest.MonkeyPatch, *, endpoint: str, hf_home: Path, token: str | None,
                offline: bool = False) -> None:
    """Environment and huggingface_hub.constants for a client talking to ``endpoint``."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    else:
        monkeypatch.setenv("HF_TOKEN", token)

    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(hf_home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(hf_home / "stored_tokens"))


def go_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """What HF_HUB_OFFLINE=1 does in a fresh process."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """A fresh fake Hub on 127.0.0.1:<free port>, HF_TOKEN = alice's write token, a fresh HF_HOME."""
    server = HubServer(tmp_path / "hub-storage", TOKENS).start()
    set_hub_env(monkeypatch, endpoint=server.url, hf_home=tmp_path / "hf-home", token=WRITE_TOKEN)
    try:
        yield server
    finally:
        server.stop()
