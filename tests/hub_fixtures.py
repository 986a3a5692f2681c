"""Pytest fixtures that point the real huggingface_hub client at the local fake Hub (tests/hubserver.py).

``huggingface_hub`` reads ENDPOINT, HF_HUB_OFFLINE, the cache and token paths into
``huggingface_hub.constants`` when it is first imported, which in a test session may have happened
long before this fixture runs (conftest's autouse fixture sets HF_HUB_OFFLINE=1, and transformers
imports the library). So besides the environment variables (what a fresh ``portllm`` process would
read), the fixture patches those constants with monkeypatch; both are restored after each test.
portllm_cli.hub itself reads HF_ENDPOINT, HF_HUB_OFFLINE and HF_HOME at call time.

HF_HUB_DISABLE_XET is not needed: the fake Hub never advertises Xet (no xetHash in tree listings,
no X-Xet-* headers, preupload always answers "regular"), so the installed hf_xet is never used.

``hub_datasets`` adds what ``datasets`` needs: it reads HF_ENDPOINT, the offline switches and its
cache paths into ``datasets.config`` at import time (conftest's HF_DATASETS_OFFLINE=1 among them),
so those are patched too. ``publish_dataset`` puts rows on the fake Hub the way real dataset repos
hold them (one Parquet file per config and split, a README whose YAML maps configs to files),
uploaded through the real client with a token of the ``mirror`` user, who owns the namespaces of
the datasets lm-eval's tasks name (nyu-mll, aps, allenai, openai).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.hubserver import HubServer, User

WRITE_TOKEN = "hf_testWriteTokenAliceAAAAAAAAAAAAAAAA"
READ_TOKEN = "hf_testReadTokenAliceBBBBBBBBBBBBBBBBBB"
BOB_TOKEN = "hf_testWriteTokenBobCCCCCCCCCCCCCCCCCCC"
BAD_TOKEN = "hf_testUnknownTokenDDDDDDDDDDDDDDDDDDDD"
MIRROR_TOKEN = "hf_testWriteTokenMirrorEEEEEEEEEEEEEEEE"

TOKENS = {
    WRITE_TOKEN: User("alice", "write", orgs=("team",)),
    READ_TOKEN: User("alice", "read"),
    BOB_TOKEN: User("bob", "write"),
    MIRROR_TOKEN: User("mirror", "write", orgs=("nyu-mll", "aps", "allenai", "openai")),
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


def set_datasets_env(monkeypatch: pytest.MonkeyPatch, *, endpoint: str, cache: Path) -> None:
    """Environment and datasets.config for ``datasets.load_dataset`` against ``endpoint``, online."""
    import datasets.config as dc

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(dc, "HF_ENDPOINT", endpoint)
    monkeypatch.setattr(dc, "HUB_DATASETS_URL", endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}")
    monkeypatch.setattr(dc, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(dc, "HF_DATASETS_OFFLINE", False)
    monkeypatch.setattr(dc, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(dc, "DOWNLOADED_DATASETS_PATH", cache / "downloads")
    monkeypatch.setattr(dc, "EXTRACTED_DATASETS_PATH", cache / "downloads" / "extracted")
    # Two requests that would leave 127.0.0.1: a download-count HEAD to s3.amazonaws.com, and the
    # dataset viewer's Parquet export on another host (datasets-server.<endpoint host>). Both are
    # optional for datasets (it ignores their failure); the data itself comes from the repo.
    monkeypatch.setattr(dc, "HF_UPDATE_DOWNLOAD_COUNTS", False)
    monkeypatch.setattr(dc, "USE_PARQUET_EXPORT", False)


@pytest.fixture
def hub_datasets(hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> HubServer:
    """The ``hub`` fixture, with ``datasets`` (and so lm-eval's tasks) loading from it."""
    set_datasets_env(monkeypatch, endpoint=hub.url, cache=tmp_path / "datasets-cache")
    return hub


def publish_dataset(
    endpoint: str,
    repo_id: str,
    configs: dict[str, dict[str, list[dict[str, Any]]]],
    *,
    features: dict[str, dict[str, Any]] | None = None,
    token: str = MIRROR_TOKEN,
    private: bool = False,
    workdir: Path,
) -> str:
    """Upload ``{config: {split: rows}}`` as a dataset repo laid out like the Hub's own; returns the commit.

    Each config/split becomes ``<config>/<split>-00000-of-00001.parquet``; README.md carries the
    ``configs:`` block that maps config names to those files and, for configs named in
    ``features``, a ``dataset_info`` block with the column types (``{"label": {"class_label":
    {"names": {"0": "negative", ...}}}, "idx": "int32", ...}``; other columns are strings or
    int64, the types Arrow infers), as the real repos do.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml
    from huggingface_hub import HfApi

    features = features or {}
    folder = workdir / repo_id.replace("/", "--")
    card: dict[str, Any] = {"configs": []}
    infos = []
    for config, splits in configs.items():
        (folder / config).mkdir(parents=True, exist_ok=True)
        types = features.get(config, {})
        data_files = []
        for split, rows in splits.items():
            columns = list(rows[0])
            arrays = {}
            for col in columns:
                values = [r[col] for r in rows]
                dtype = types.get(col)
                # a class_label column is stored as int64, as the Hub's Parquet conversion stores it
                arrow_type = (None if dtype is None else pa.int32() if dtype == "int32"
                              else pa.string() if dtype == "string" else pa.int64())
                arrays[col] = pa.array(values, arrow_type)
            pq.write_table(pa.table(arrays), folder / config / f"{split}-00000-of-00001.parquet")
            data_files.append({"split": split, "path": f"{config}/{split}-*"})
        card["configs"].append({"config_name": config, "data_files": data_files})
        if types:
            columns = list(next(iter(splits.values()))[0])
            infos.append({"config_name": config,
                          "features": [{"name": c, "dtype": types.get(c, str(arrays[c].type))} for c in columns],
                          "splits": [{"name": s, "num_examples": len(r)} for s, r in splits.items()]})
    if infos:
        card["dataset_info"] = infos
    front = yaml.safe_dump(card, sort_keys=False)
    (folder / "README.md").write_text(f"---\n{front}---\n\n# {repo_id}\n\nA few rows for the test suite.\n")
    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=folder,
                             commit_message=f"{len(configs)} config(s)")
    return info.oid
