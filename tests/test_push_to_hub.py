"""--push-to-hub on the commands that write something: the result lands on the (fake) Hub intact."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from portllm_cli.cli.app import app


def test_extract_push_to_hub(hub, llama_lora_dir, llama_dir, tmp_path):
    out = tmp_path / "patch"
    r = CliRunner().invoke(
        app,
        ["extract", str(llama_lora_dir), "--base", str(llama_dir), "--out", str(out),
         "--push-to-hub", "alice/pushed-patch", "--json"],
    )
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["hub"]["repo_id"] == "alice/pushed-patch"
    assert doc["hub"]["commit_id"] == hub.head("alice/pushed-patch")
    stored = hub.files("alice/pushed-patch")
    for name in ("adapter_config.json", "adapter_model.safetensors", "portllm.json"):
        assert stored[name] == (out / name).read_bytes()
    assert stored["README.md"].startswith(b"---\n")


def test_extract_push_to_hub_failure_keeps_local_patch(hub, llama_lora_dir, llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_valid_token")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_TOKEN_PATH", str(tmp_path / "no-token"), raising=False)
    out = tmp_path / "patch"
    r = CliRunner().invoke(
        app, ["extract", str(llama_lora_dir), "--base", str(llama_dir), "--out", str(out), "--push-to-hub", "alice/x"]
    )
    assert r.exit_code == 1
    assert len([line for line in r.stderr.splitlines() if line.startswith("Error:")]) == 1
    assert "hf_not_a_valid_token" not in r.stderr + r.stdout
    assert (out / "portllm.json").exists()  # the local result is complete and kept
