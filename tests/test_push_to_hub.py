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


def test_port_hub_patch_onto_local_model_and_push_adapter(hub, llama_lora_dir, llama_dir, llama_evolved_dir, tmp_path):
    """`port --patch user/repo@rev` pulls through the Hub cache; --push-to-hub publishes the result."""
    patch = tmp_path / "patch"
    r = CliRunner().invoke(app, ["extract", str(llama_lora_dir), "--base", str(llama_dir), "--out", str(patch),
                                 "--push-to-hub", "alice/src", "--json"])
    assert r.exit_code == 0, r.stderr
    rev = json.loads(r.stdout)["hub"]["commit_id"]
    out = tmp_path / "adapter"
    r = CliRunner().invoke(app, ["port", "--patch", f"alice/src@{rev}", "--to", str(llama_evolved_dir), "--as-adapter",
                                 "--out", str(out), "--push-to-hub", "alice/ported", "--json"])
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["hub"]["commit_id"] == hub.head("alice/ported")
    stored = hub.files("alice/ported")
    assert stored["adapter_model.safetensors"] == (out / "adapter_model.safetensors").read_bytes()
    cfg = json.loads(stored["adapter_config.json"])
    assert cfg["base_model_name_or_path"] == str(llama_evolved_dir.resolve())


def test_finetune_push_to_hub(hub, llama_dir, tmp_path):
    data = tmp_path / "sst2.jsonl"
    rows = [{"sentence": "a wonderful film", "label": 1}, {"sentence": "a dull boring film", "label": 0}] * 4
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "patch"
    r = CliRunner().invoke(app, ["finetune", "--model", str(llama_dir), "--task", "sst2", "--data", str(data),
                                 "--out", str(out), "--max-steps", "1", "--max-length", "32", "--rank", "2",
                                 "--device", "cpu", "--push-to-hub", "alice/ft", "--json"])
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["hub"]["commit_id"] == hub.head("alice/ft")
    assert hub.files("alice/ft")["portllm.json"] == (out / "portllm.json").read_bytes()
