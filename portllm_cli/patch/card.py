"""The model cards (README.md) that go up with what portllm pushes to the Hub.

A patch's card has the front matter the Hub indexes (``library_name: peft``, ``base_model`` when the
base is a Hub id, tags) and a body with the task, rank, alpha, targets, the weights' sha256, the
scores recorded in the manifest and the `portllm port` command that uses the patch. A model's card
(a merged output) is short.
"""

from __future__ import annotations

import json
from typing import Any

from portllm_cli.patch.format import Patch, short_module_kind


def _yaml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid YAML scalar, quoting included


def _task_name(manifest: dict[str, Any]) -> str | None:
    for holder in (manifest, manifest.get("training") or {}, manifest.get("source") or {}):
        task = holder.get("task") if isinstance(holder, dict) else None
        if isinstance(task, dict):
            task = task.get("name")
        if isinstance(task, str) and task:
            return task
    return None


def _flatten_scores(scores: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Rows (label, value) from the manifest's free-form scores.

    Understands nested dicts ({"sst2": {"base": 0.5, "patched": 0.9}}), the ``portllm eval`` record
    ({"sst2": {"metric": "acc", "value": 0.9, "stderr": 0.01}}) and lists of such records.
    """
    if isinstance(scores, dict) and isinstance(scores.get("value"), (int, float)):
        label = prefix or "score"
        if scores.get("metric"):
            label += f" ({scores['metric']})"
        value = _fmt(scores["value"])
        if isinstance(scores.get("stderr"), (int, float)):
            value += f" ± {_fmt(scores['stderr'])}"
        return [(label, value)]
    if isinstance(scores, dict):
        rows: list[tuple[str, str]] = []
        for k, v in scores.items():
            rows.extend(_flatten_scores(v, f"{prefix} / {k}" if prefix else str(k)))
        return rows
    if isinstance(scores, list):
        rows = []
        for i, v in enumerate(scores):
            label = str((v.get("name") or v.get("task") or i) if isinstance(v, dict) else i)
            rest = {kk: vv for kk, vv in v.items() if kk not in ("name", "task")} if isinstance(v, dict) else v
            rows.extend(_flatten_scores(rest, f"{prefix} / {label}" if prefix else label))
        return rows
    return [(prefix or "score", _fmt(scores))]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def patch_card(patch: Patch, repo_id: str, revision: str | None = None, *, base: str | None = None) -> str:
    """README.md for a patch pushed to ``repo_id``: YAML front matter the Hub indexes, and a body people
    read. ``base`` is the patch's base model when it is a Hub repo id (the card's ``base_model``)."""
    manifest = patch.manifest or {}
    cfg = patch.config
    lines = ["---", "library_name: peft"]
    if base:
        lines.append(f"base_model: {_yaml_str(base)}")
    lines += ["tags:", "- portllm", "- lora", "- peft", "---", ""]
    name = repo_id.split("/", 1)[1]
    task = _task_name(manifest)
    lines.append(f"# {name}")
    lines.append("")
    lines.append(
        "A LoRA patch in the portllm format (`pip install portllm-cli`): a PEFT adapter plus a manifest "
        "(`portllm.json`) that records the base model it was made on and the sha256 of its weights. "
        "`portllm port` carries it onto an updated version of the base model without retraining."
    )
    lines.append("")
    targets = cfg.get("target_modules")
    if isinstance(targets, list):
        targets_text = ", ".join(sorted(targets))
    elif isinstance(targets, str):
        targets_text = targets
    else:
        targets_text = ", ".join(sorted({short_module_kind(m) for m in patch.modules}))
    rows = [
        ("Base model", base or (patch.base_model or "unknown")),
        ("Task", task or "not recorded"),
        ("Rank (r)", str(cfg.get("r"))),
        ("Alpha", _fmt(cfg.get("lora_alpha"))),
        ("Scaling", "rsLoRA (alpha/sqrt(r))" if cfg.get("use_rslora") else "alpha/r"),
        ("Target modules", targets_text),
        ("Adapted modules", str(len(patch.modules))),
    ]
    base_rev = (manifest.get("base") or {}).get("revision")
    if base_rev:
        rows.insert(1, ("Base revision", str(base_rev)))
    sha = (manifest.get("tensors") or {}).get("sha256")
    if sha:
        rows.append(("Weights sha256", f"`{sha}`"))
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]
    scores = manifest.get("scores")
    if scores:
        lines += ["## Scores", "", "| Metric | Value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in _flatten_scores(scores)]
        lines.append("")
    patch_ref = f"{repo_id}@{revision}" if revision else repo_id
    peft_args = json.dumps(repo_id) + (f", revision={json.dumps(revision)}" if revision else "")
    out_name = f"./{name}-merged"
    lines += [
        "## Use it",
        "",
        "Merge it into its base model, or into any newer version of it (same architecture and shapes):",
        "",
        "```bash",
        f"portllm port --patch {patch_ref} --to {base or 'BASE_MODEL'} --out {out_name}",
        "```",
        "",
        f"Replace `{base or 'BASE_MODEL'}` with an evolved release of the base model (a Hub id or a local "
        "directory) to port the patch to it. The patch also loads directly with PEFT "
        f"(`PeftModel.from_pretrained(model, {peft_args})`).",
        "",
    ]
    return "\n".join(lines)


def model_dir_card(repo_id: str, architectures: list[str] | None = None) -> str:
    """README.md for a model directory portllm wrote (e.g. ``port``'s merged output)."""
    arch = ", ".join(architectures or [])
    return "\n".join([
        "---", "library_name: transformers", "tags:", "- portllm", "---", "",
        f"# {repo_id.split('/', 1)[1]}", "",
        f"A model written by portllm (`pip install portllm-cli`){f': {arch}' if arch else ''}.", "",
    ])
