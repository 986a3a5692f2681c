"""Patches on the Hub: the real huggingface_hub client against the local fake Hub (tests/hubserver.py)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from portllm_cli import hub as hub_api
from portllm_cli.cli.app import app
from portllm_cli.errors import IntegrityError, NotFoundError
from portllm_cli.patch import format as fmt
from portllm_cli.resolve import Resolved, model_record, resolve
from tests.hub_fixtures import BAD_TOKEN, BOB_TOKEN, READ_TOKEN, WRITE_TOKEN, go_offline

BASE_ID = "meta-test/tiny-llama"
SCORES = {"sst2": {"base": 0.51, "patched": 0.87}}


# -- helpers ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def patch_dir(tmp_path_factory, llama_dir, llama_lora_dir) -> Path:
    """A portllm patch (PEFT files + manifest) built from the tiny LoRA, recording a Hub base id."""
    from portllm_cli.io.checkpoint import Checkpoint

    src = fmt.read_patch(llama_lora_dir, verify=False)
    out = tmp_path_factory.mktemp("patches") / "sst2.patch"
    ckpt = Checkpoint.open(llama_dir)
    shapes = {m.weight_key: list(m.weight_shape) for m in src.modules.values()}
    base = model_record(Resolved(BASE_ID, llama_dir, BASE_ID, "0" * 40), ckpt, shapes, hash_weights=False)
    cfg = fmt.adapter_config(base_model=BASE_ID, rank=src.rank, alpha=src.alpha,
                             target_modules=sorted({fmt.short_module_kind(m) for m in src.modules}))
    manifest = fmt.build_manifest(
        base=base, lora={"r": src.rank, "alpha": src.alpha}, source={"kind": "peft-adapter"},
        extra={"task": "sst2", "scores": SCORES},
    )
    fmt.write_patch_files(out, fmt.patch_tensors(src.modules), cfg, manifest)
    return out


def run(*args: str):
    return CliRunner().invoke(app, list(args))


def error_line(result) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def no_token_in(result) -> None:
    for tok in (WRITE_TOKEN, READ_TOKEN, BOB_TOKEN, BAD_TOKEN):
        assert tok not in result.stdout and tok not in result.stderr


def tree_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(d).iterdir()) if p.is_file()}


def push(patch_dir: Path, repo: str, *extra: str) -> dict:
    r = run("hub", "push", str(patch_dir), repo, "--json", *extra)
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card[4:card.index("\n---", 4)])


# -- push and pull ---------------------------------------------------------------------------
def test_push_then_pull_is_byte_identical(hub, patch_dir, tmp_path):
    doc = push(patch_dir, "alice/sst2-patch")
    assert doc["repo_id"] == "alice/sst2-patch"
    assert doc["commit_id"] == hub.head("alice/sst2-patch")
    assert doc["url"] == f"{hub.url}/alice/sst2-patch"
    stored = hub.files("alice/sst2-patch")
    for name in ("adapter_config.json", "adapter_model.safetensors", "portllm.json"):
        assert stored[name] == (patch_dir / name).read_bytes()

    out = tmp_path / "pulled"
    r = run("hub", "pull", "alice/sst2-patch", "--out", str(out), "--json")
    assert r.exit_code == 0, r.stderr
    pulled = json.loads(r.stdout)
    # (the key was "path" before one scheme for every command)
    assert pulled["out"] == str(out) and pulled["revision"] == doc["commit_id"] and pulled["verified"] is True
    got = tree_bytes(out)
    assert set(got) == {"adapter_config.json", "adapter_model.safetensors", "portllm.json", "README.md"}
    for name, data in tree_bytes(patch_dir).items():
        assert got[name] == data, name
    assert hashlib.sha256(got["adapter_model.safetensors"]).hexdigest() == json.loads(got["portllm.json"])["tensors"]["sha256"]
    # .gitattributes (in the repo since its creation) is not a patch file and was not fetched
    assert ".gitattributes" in stored and ".gitattributes" not in got
    # regular uploads only: neither LFS nor Xet was ever asked for
    assert not [p for _, p in hub.requests() if "xet" in p.lower() or "lfs" in p.lower()]
    # the weights came the way the Hub serves LFS files: resolve redirects to a CDN origin
    assert [p for m, p in hub.requests() if m == "GET" and p.startswith("/cdn/alice/sst2-patch/")]


def test_pushing_the_same_patch_again_makes_no_new_commit(hub, patch_dir):
    first = push(patch_dir, "alice/again")
    second = push(patch_dir, "alice/again")
    assert second["commit_id"] == first["commit_id"] == hub.head("alice/again")
    assert len(hub.state.repos["alice/again"].commits) == 2  # the repo's initial commit + one upload


def test_download_reports_byte_progress(hub, patch_dir):
    push(patch_dir, "alice/progress")
    calls = []
    res = hub_api.download("alice/progress", kind="patch", progress=lambda *a: calls.append(a))
    total = sum(len(b) for name, b in hub.files("alice/progress").items() if name in hub_api.PATCH_FILES)
    assert calls and calls[-1] == ("download alice/progress", total, total)
    assert {p.name for p in res.path.iterdir()} == set(hub_api.PATCH_FILES)


def test_human_output_prints_url_and_commit(hub, patch_dir):
    r = run("hub", "push", str(patch_dir), "alice/human")
    assert r.exit_code == 0, r.stderr
    assert r.stdout.splitlines() == [f"{hub.url}/alice/human", f"commit {hub.head('alice/human')}"]
    no_token_in(r)
    r = run("hub", "pull", "alice/human")
    assert r.exit_code == 0, r.stderr
    where = Path(r.stdout.strip())
    assert where.name == hub.head("alice/human") and where.parent.parent.name == "models--alice--human"
    assert (where / "adapter_model.safetensors").read_bytes() == (patch_dir / "adapter_model.safetensors").read_bytes()


def test_model_card_front_matter_and_body(hub, patch_dir):
    push(patch_dir, "alice/card")
    card = hub.files("alice/card")["README.md"].decode()
    meta = front_matter(card)
    assert meta == {"library_name": "peft", "base_model": BASE_ID, "tags": ["portllm", "lora", "peft"]}
    manifest = json.loads((patch_dir / "portllm.json").read_text())
    cfg = json.loads((patch_dir / "adapter_config.json").read_text())
    assert "| Task | sst2 |" in card
    assert f"| Rank (r) | {cfg['r']} |" in card
    assert f"| Target modules | {', '.join(sorted(cfg['target_modules']))} |" in card
    assert "| sst2 / patched | 0.87 |" in card and "| sst2 / base | 0.51 |" in card
    assert manifest["tensors"]["sha256"] in card
    assert f"portllm port --patch alice/card --to {BASE_ID} --out ./card-merged" in card


def test_model_card_without_hub_base_has_no_base_model(patch_dir, tmp_path):
    local = tmp_path / "local.patch"
    shutil.copytree(patch_dir, local)
    manifest = json.loads((local / "portllm.json").read_text())
    manifest["base"]["model"] = str(tmp_path / "some-local-model")
    del manifest["scores"]
    (local / "portllm.json").write_text(json.dumps(manifest))
    card = hub_api.model_card(fmt.read_patch(local), "alice/x")
    assert front_matter(card) == {"library_name": "peft", "tags": ["portllm", "lora", "peft"]}
    assert "## Scores" not in card and "--to BASE_MODEL" in card


def test_model_card_renders_eval_records(patch_dir, tmp_path):
    local = tmp_path / "eval.patch"
    shutil.copytree(patch_dir, local)
    manifest = json.loads((local / "portllm.json").read_text())
    manifest["scores"] = {"sst2": {"metric": "acc", "value": 0.8712, "stderr": 0.0113, "n": 872},
                          "boolq": {"metric": "acc", "value": 0.7}}
    (local / "portllm.json").write_text(json.dumps(manifest))
    card = hub_api.model_card(fmt.read_patch(local), "alice/x")
    assert "| sst2 (acc) | 0.8712 ± 0.0113 |" in card and "| boolq (acc) | 0.7 |" in card


def test_push_to_new_branch_and_pull_revision(hub, patch_dir, tmp_path):
    first = push(patch_dir, "alice/branchy")
    doc = push(patch_dir, "alice/branchy", "--revision", "exp/v2", "-m", "second home")
    assert doc["revision"] == "exp/v2" and doc["url"].endswith("/alice/branchy/tree/exp/v2")
    assert hub.head("alice/branchy", "exp/v2") == doc["commit_id"]
    assert hub.state.repos["alice/branchy"].commits[doc["commit_id"]].message == "second home"
    assert hub.head("alice/branchy") == first["commit_id"]  # main untouched
    card = hub.files("alice/branchy", "exp/v2")["README.md"].decode()
    assert "--patch alice/branchy@exp/v2 " in card
    for spec, extra in (("alice/branchy@exp/v2", ()), ("alice/branchy", ("--revision", "exp/v2"))):
        r = run("hub", "pull", spec, *extra, "--json")
        assert r.exit_code == 0, r.stderr
        assert json.loads(r.stdout)["revision"] == doc["commit_id"]
    r = run("hub", "pull", "alice/branchy", "--json")  # main still serves the first upload
    assert json.loads(r.stdout)["revision"] == first["commit_id"]


def test_push_creates_private_repo_hidden_from_others(hub, patch_dir, monkeypatch):
    push(patch_dir, "alice/secret", "--private")
    assert hub.state.repos["alice/secret"].private
    monkeypatch.setenv("HF_TOKEN", BOB_TOKEN)
    r = run("hub", "pull", "alice/secret")
    assert r.exit_code == 1
    assert "repo not found or private" in error_line(r)
    assert "hf auth login" in r.stderr
    no_token_in(r)


def test_second_pull_offline_is_served_from_cache(hub, patch_dir, monkeypatch):
    push(patch_dir, "alice/cached")
    r = run("hub", "pull", "alice/cached", "--json")
    assert r.exit_code == 0, r.stderr
    online = json.loads(r.stdout)
    go_offline(monkeypatch)
    before = len(hub.requests())
    r = run("hub", "pull", "alice/cached", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout) == online
    assert len(hub.requests()) == before  # not one request reached the server
    # offline and never downloaded: a clear error, not a traceback
    r = run("hub", "pull", "alice/never-pulled")
    assert r.exit_code == 1
    assert "HF_HUB_OFFLINE" in error_line(r) and "not in the local cache" in error_line(r)


def test_push_offline_is_refused(hub, patch_dir, monkeypatch):
    go_offline(monkeypatch)
    r = run("hub", "push", str(patch_dir), "alice/offline")
    assert r.exit_code == 1 and "HF_HUB_OFFLINE" in error_line(r)
    assert hub.requests() == []


# -- hub ids everywhere ----------------------------------------------------------------------
def test_resolve_patch_spec_with_revision_fits_local_model(hub, patch_dir, llama_dir, llama_evolved_dir):
    from portllm_cli.core.compat import check_compatibility
    from portllm_cli.io.checkpoint import Checkpoint

    push(patch_dir, "alice/portable")
    doc = push(patch_dir, "alice/portable", "--revision", "rc1")
    res = resolve("alice/portable@rc1", kind="patch")
    assert res.repo_id == "alice/portable" and res.revision == doc["commit_id"]
    assert res.display == f"alice/portable@{doc['commit_id']}"
    patch = fmt.read_patch(res.path, verify=True)
    original = fmt.read_patch(patch_dir)
    assert set(patch.modules) == set(original.modules)
    for name, m in patch.modules.items():
        assert (m.A == original.modules[name].A).all() and (m.B == original.modules[name].B).all()
    for target in (llama_dir, llama_evolved_dir):
        report = check_compatibility(patch, Checkpoint.open(target))
        assert report.compatible, report.errors


def test_model_spec_downloads_tiny_model(hub, llama_dir, tmp_path):
    from huggingface_hub import HfApi

    from portllm_cli.io.checkpoint import Checkpoint

    model = tmp_path / "model"
    shutil.copytree(llama_dir, model)
    (model / "pytorch_model.bin").write_bytes(b"not wanted: pickle weights are never fetched by default")
    api = HfApi()
    api.create_repo("team/tiny-llama", private=True)
    api.upload_folder(repo_id="team/tiny-llama", folder_path=model)
    res = resolve("team/tiny-llama", kind="model")
    assert res.revision == hub.head("team/tiny-llama")
    got = {p.name for p in res.path.iterdir()}
    assert "pytorch_model.bin" not in got and ".gitattributes" not in got
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (llama_dir / name).exists():
            assert (res.path / name).read_bytes() == (llama_dir / name).read_bytes(), name
    ckpt = Checkpoint.open(res.path)
    assert sorted(ckpt.names()) == sorted(Checkpoint.open(llama_dir).names())
    with_pickle = hub_api.download("team/tiny-llama", kind="model", allow_pickle=True).path
    assert (with_pickle / "pytorch_model.bin").exists()


def test_model_repo_without_config_is_not_a_model(hub, patch_dir):
    push(patch_dir, "alice/only-patch")
    with pytest.raises(NotFoundError, match="no config.json"):
        resolve("alice/only-patch", kind="model")


# -- auth ------------------------------------------------------------------------------------
def test_push_without_token_is_401_with_login_hint(hub, patch_dir, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    r = run("hub", "push", str(patch_dir), "alice/nope")
    assert r.exit_code == 1
    assert "not logged in" in error_line(r)
    assert "Hint: log in with 'hf auth login' or set HF_TOKEN" in r.stderr
    assert "alice/nope" not in hub.state.repos


def test_bad_token_is_401_and_never_printed(hub, patch_dir, monkeypatch):
    push(patch_dir, "alice/public")
    monkeypatch.setenv("HF_TOKEN", BAD_TOKEN)
    for args in (("hub", "push", str(patch_dir), "alice/public"), ("hub", "pull", "alice/public")):
        r = run(*args, "--json")
        assert r.exit_code == 1, args
        assert "rejected your token (401" in error_line(r)
        assert "hf auth login" in r.stderr
        assert r.stdout == ""
        no_token_in(r)


def test_read_only_token_is_403(hub, patch_dir, monkeypatch):
    push(patch_dir, "alice/ro")
    head = hub.head("alice/ro")
    monkeypatch.setenv("HF_TOKEN", READ_TOKEN)
    for repo in ("alice/ro", "alice/ro-new"):
        r = run("hub", "push", str(patch_dir), repo)
        assert r.exit_code == 1
        assert f"your token lacks write access to {repo}" in error_line(r)
        no_token_in(r)
    assert hub.head("alice/ro") == head and "alice/ro-new" not in hub.state.repos
    # reading with it is fine
    assert run("hub", "pull", "alice/ro").exit_code == 0


def test_pushing_to_someone_elses_namespace_is_403(hub, patch_dir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", BOB_TOKEN)
    r = run("hub", "push", str(patch_dir), "alice/not-bobs")
    assert r.exit_code == 1 and "lacks write access" in error_line(r)


def test_scrub_removes_tokens(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    other = "hf_" + "Zq9" * 12
    text = hub_api.scrub(f"failed with Authorization: Bearer {WRITE_TOKEN} and {other} in hf_hub_download")
    assert WRITE_TOKEN not in text and other not in text and "hf_hub_download" in text


# -- not found -------------------------------------------------------------------------------
def test_missing_repo_and_revision_are_404(hub, patch_dir):
    r = run("hub", "pull", "alice/does-not-exist")
    assert r.exit_code == 1
    assert error_line(r) == "Error: alice/does-not-exist: repo not found or private"
    assert "Hint: check the id or log in: hf auth login" in r.stderr
    push(patch_dir, "alice/exists")
    r = run("hub", "pull", "alice/exists@no-such-branch")
    assert r.exit_code == 1
    assert "revision 'no-such-branch' not found" in error_line(r)
    with pytest.raises(NotFoundError, match="not found"):
        resolve("alice/exists@no-such-branch", kind="patch")


def test_repo_without_patch(hub, tmp_path):
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo("alice/empty")
    api.upload_file(path_or_fileobj=b"# just a readme\n", path_in_repo="README.md", repo_id="alice/empty")
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    r = run("hub", "pull", "alice/empty", "--out", str(out))
    assert r.exit_code == 1
    assert "holds no patch (no adapter_config.json)" in error_line(r)
    assert "portllm hub push PATCH alice/empty" in r.stderr
    assert not out.exists() and list(work.iterdir()) == []


def test_bad_repo_spec_and_conflicting_revisions_are_usage_errors(hub):
    r = run("hub", "pull", "./not/a/repo/id")
    assert r.exit_code == 2 and "not a Hub repo id" in error_line(r)
    r = run("hub", "pull", "alice/x@a", "--revision", "b")
    assert r.exit_code == 2 and "two revisions" in error_line(r)


def test_push_refuses_an_invalid_patch(hub, patch_dir, tmp_path):
    bad = tmp_path / "bad.patch"
    shutil.copytree(patch_dir, bad)
    data = bytearray((bad / "adapter_model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (bad / "adapter_model.safetensors").write_bytes(bytes(data))
    r = run("hub", "push", str(bad), "alice/tampered")
    assert r.exit_code == 4
    assert hub.requests() == [] and "alice/tampered" not in hub.state.repos


# -- faults ----------------------------------------------------------------------------------
def test_corrupted_download_exit_4_and_nothing_in_out(hub, patch_dir, tmp_path):
    push(patch_dir, "alice/flaky")
    hub.corrupt("alice/flaky", "adapter_model.safetensors", times=1)
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    r = run("hub", "pull", "alice/flaky", "--out", str(out), "--json")
    assert r.exit_code == 4, r.stderr
    assert "does not match" in error_line(r) and "rerun" in r.stderr
    assert r.stdout == ""
    assert not out.exists() and list(work.iterdir()) == []
    # the corrupted copy left the cache: a rerun downloads a good one
    r = run("hub", "pull", "alice/flaky", "--out", str(out))
    assert r.exit_code == 0, r.stderr
    assert tree_bytes(out)["adapter_model.safetensors"] == (patch_dir / "adapter_model.safetensors").read_bytes()


def test_corrupted_download_through_resolve(hub, patch_dir):
    push(patch_dir, "alice/flaky2")
    hub.corrupt("alice/flaky2", "adapter_model.safetensors")
    with pytest.raises(IntegrityError):
        resolve("alice/flaky2", kind="patch")


@pytest.fixture
def no_retry_sleep(monkeypatch):
    """huggingface_hub sleeps 1 s between resume attempts; the fault tests need no real waiting."""
    import huggingface_hub.file_download as fd

    monkeypatch.setattr(fd.time, "sleep", lambda s: None)


def test_connection_dropped_mid_transfer(hub, patch_dir, tmp_path, no_retry_sleep):
    push(patch_dir, "alice/drop")
    size = (patch_dir / "adapter_model.safetensors").stat().st_size
    hub.drop("alice/drop", "adapter_model.safetensors", at=size // 2)  # every attempt dies at the same byte
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    r = run("hub", "pull", "alice/drop", "--out", str(out))
    assert r.exit_code == 1
    assert "interrupted" in error_line(r) and "rerun to resume" in r.stderr
    assert not out.exists() and list(work.iterdir()) == []
    cache = hub_api.cache_dir() / "models--alice--drop"
    assert not list(cache.rglob("*.incomplete"))
    hub.clear_faults()
    r = run("hub", "pull", "alice/drop", "--out", str(out))
    assert r.exit_code == 0, r.stderr
    assert tree_bytes(out)["adapter_model.safetensors"] == (patch_dir / "adapter_model.safetensors").read_bytes()


def test_single_drop_is_resumed_by_the_client(hub, patch_dir, tmp_path, no_retry_sleep):
    push(patch_dir, "alice/blip")
    size = (patch_dir / "adapter_model.safetensors").stat().st_size
    hub.drop("alice/blip", "adapter_model.safetensors", at=size // 3, times=1)
    out = tmp_path / "out"
    r = run("hub", "pull", "alice/blip", "--out", str(out))
    assert r.exit_code == 0, r.stderr
    assert tree_bytes(out)["adapter_model.safetensors"] == (patch_dir / "adapter_model.safetensors").read_bytes()
    gets = [p for m, p in hub.requests() if m == "GET" and p.startswith("/cdn/") and p.endswith("/adapter_model.safetensors")]
    assert len(gets) == 2  # the first GET died, the second resumed with a Range request


def test_hub_unreachable_is_a_clear_error(hub, patch_dir, monkeypatch):
    hub.stop()
    from huggingface_hub import constants

    dead = "http://127.0.0.1:9"
    monkeypatch.setenv("HF_ENDPOINT", dead)
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    r = run("hub", "pull", "alice/anything")
    assert r.exit_code == 1
    assert "cannot reach the Hub" in error_line(r)


# -- --push-to-hub helper (wired into finetune / extract / port by the integrator) -------------
def test_push_result_if_requested_patch_and_model(hub, patch_dir, llama_dir, tmp_path):
    from portllm_cli.cli._output import Output
    from portllm_cli.cli.hub import push_result_if_requested
    from portllm_cli.io.checkpoint import Checkpoint

    output = Output(json_mode=True)
    assert push_result_if_requested(patch_dir, None, output) is None
    assert hub.requests() == []

    rec = push_result_if_requested(patch_dir, "alice/from-extract", output)
    assert rec["commit_id"] == hub.head("alice/from-extract")
    assert "README.md" in rec["files"] and "adapter_model.safetensors" in rec["files"]
    assert front_matter(hub.files("alice/from-extract")["README.md"].decode())["library_name"] == "peft"

    model = tmp_path / "merged"
    shutil.copytree(llama_dir, model)
    (model / "notes.pkl").write_bytes(b"stray file, never uploaded")
    rec = push_result_if_requested(model, "team/merged", output)
    stored = hub.files("team/merged")
    assert "notes.pkl" not in stored
    assert stored["model.safetensors"] == (llama_dir / "model.safetensors").read_bytes()
    assert front_matter(stored["README.md"].decode()) == {"library_name": "transformers", "tags": ["portllm"]}
    res = resolve("team/merged", kind="model")
    assert res.revision == rec["commit_id"]
    assert sorted(Checkpoint.open(res.path).names()) == sorted(Checkpoint.open(llama_dir).names())


def test_plain_peft_adapter_pulls_unverified_with_warning(hub, llama_lora_dir, tmp_path):
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo("alice/peft-only")
    api.upload_folder(repo_id="alice/peft-only", folder_path=llama_lora_dir)
    r = run("hub", "pull", "alice/peft-only", "--out", str(tmp_path / "p"), "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["verified"] is False and any("no portllm.json" in w for w in doc["warnings"])
    assert tree_bytes(tmp_path / "p")["adapter_model.safetensors"] == (llama_lora_dir / "adapter_model.safetensors").read_bytes()


def test_existing_out_is_refused_before_downloading(hub, patch_dir, tmp_path):
    push(patch_dir, "alice/exists-out")
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = len(hub.requests())
    r = run("hub", "pull", "alice/exists-out", "--out", str(out))
    assert r.exit_code == 1 and "already exists" in error_line(r) and "--overwrite" in r.stderr
    assert len(hub.requests()) == before
    r = run("hub", "pull", "alice/exists-out", "--out", str(out), "--overwrite")
    assert r.exit_code == 0, r.stderr
    assert not (out / "keep.txt").exists() and (out / "portllm.json").exists()


# -- one resolution, by what the repo is -----------------------------------------------------
def test_resolve_tells_patch_from_model_by_the_file_list(hub, patch_dir, llama_dir, tmp_path):
    from huggingface_hub import HfApi

    push(patch_dir, "alice/what-patch")
    model = tmp_path / "model"
    shutil.copytree(llama_dir, model)
    (model / "adapter_notes.txt").write_text("a stray file a model download never fetches")
    HfApi().create_repo("team/what-model")
    HfApi().upload_folder(repo_id="team/what-model", folder_path=model)
    before = len(hub.requests())
    res = resolve("alice/what-patch")  # no kind: whatever it is
    assert res.kind == "patch" and {p.name for p in res.path.iterdir()} <= set(hub_api.PATCH_FILES)
    infos = [p for m, p in hub.requests()[before:] if m == "GET" and p.startswith("/api/models/alice/what-patch")
             and "/tree/" not in p]
    assert len(infos) >= 1  # the repo's file list was asked for before anything was downloaded
    res = resolve("team/what-model")
    assert res.kind == "model" and "adapter_notes.txt" not in {p.name for p in res.path.iterdir()}
    assert (res.path / "config.json").read_bytes() == (llama_dir / "config.json").read_bytes()


def test_a_model_repo_where_a_patch_goes_is_refused_before_downloading(hub, llama_dir):
    from huggingface_hub import HfApi

    HfApi().create_repo("team/not-a-patch")
    HfApi().upload_folder(repo_id="team/not-a-patch", folder_path=llama_dir)
    before = len(hub.requests())
    with pytest.raises(NotFoundError, match="holds no patch .*it is a model repo"):
        resolve("team/not-a-patch", kind="patch")
    assert not [p for m, p in hub.requests()[before:] if "/resolve/" in p or p.startswith("/cdn/")]
    r = run("port", "--patch", "team/not-a-patch", "--to", str(llama_dir), "--out", "unused")
    assert r.exit_code == 1 and "it is a model repo" in error_line(r) and "--model, --to" in r.stderr


def test_resolution_reports_download_progress(hub, patch_dir):
    push(patch_dir, "alice/progress2")
    calls = []
    res = resolve("alice/progress2", kind="patch", progress=lambda *a: calls.append(a))
    total = sum(len(b) for name, b in hub.files("alice/progress2").items() if name in hub_api.PATCH_FILES)
    assert calls and calls[-1] == ("download alice/progress2", total, total)
    assert res.kind == "patch"


def test_no_library_progress_bars_on_a_terminal(hub, patch_dir, llama_dir, monkeypatch, tmp_path):
    """`portllm port --patch HUB_ID ... --quiet` on a terminal: huggingface_hub draws nothing either."""
    import os
    import pty
    import subprocess
    import sys

    push(patch_dir, "alice/bars")
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS")  # what a user's shell has: the library's bars on
    repo = Path(__file__).resolve().parents[1]
    main, child = pty.openpty()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "portllm_cli", "port", "--patch", "alice/bars", "--to", str(llama_dir),
             "--out", str(tmp_path / "out"), "--quiet"],
            stdout=subprocess.PIPE, stderr=child, stdin=subprocess.DEVNULL, cwd=repo, timeout=300,
            env={**os.environ, "PYTHONPATH": str(repo), "COLUMNS": "100"},
        )
        os.close(child)
        child = -1
        err = b""
        while True:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not chunk:
                break
            err += chunk
    finally:
        if child >= 0:
            os.close(child)
        os.close(main)
    assert proc.returncode == 0, err.decode(errors="replace")
    assert proc.stdout.decode().strip() == str(tmp_path / "out")
    assert err == b"", err.decode(errors="replace")  # --quiet on a terminal: not one byte on stderr
