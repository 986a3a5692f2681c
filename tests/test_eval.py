"""portllm eval: the command contract, in-memory patching against a merged copy on disk, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from portllm_cli.cli.app import app
from tests import real, tiny

N_ROWS = 12
WORDS = ["wonderful", "terrible", "great", "dull", "delightful", "boring"]


def _invoke(*args: str):
    return CliRunner().invoke(app, ["eval", *args])


def _loglikelihoods(samples: list[dict]) -> list[list[float]]:
    return [[float(r[0]) for r in s["filtered_resps"]] for s in sorted(samples, key=lambda s: s["doc_id"])]


@pytest.fixture(scope="module")
def sst2_file(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("sst2-data")
    rows = [{"sentence": f"the movie number {i} was {WORDS[i % len(WORDS)]}", "label": int(i % 4 != 0)}
            for i in range(N_ROWS)]
    f = d / "sst2.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


@pytest.fixture(scope="module")
def strong_patch(tmp_path_factory, llama_dir) -> Path:
    """A LoRA patch with large B on v_proj and lm_head: it flips some of the tiny model's answers."""
    import torch
    from safetensors.torch import load_file, save_file

    d = tmp_path_factory.mktemp("strong-patch")
    tiny.make_lora(llama_dir, d, targets=("v_proj", "lm_head"), rank=4, alpha=8.0, seed=8)
    weights = d / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    tensors = {k: (v * 40.0 if "lora_B" in k else v).contiguous() for k, v in tensors.items()}
    save_file(tensors, str(weights))
    assert any(torch.count_nonzero(v) for v in tensors.values())
    return d


@pytest.fixture(scope="module")
def misfit_patch(tmp_path_factory) -> Path:
    """A patch for a layer the tiny models do not have."""
    import torch
    from safetensors.torch import save_file

    from portllm_cli.patch.format import adapter_config, peft_key

    d = tmp_path_factory.mktemp("misfit-patch")
    module = "model.layers.9.self_attn.q_proj"
    save_file({peft_key(module, "A"): torch.ones(2, 32), peft_key(module, "B"): torch.ones(32, 2)},
              str(d / "adapter_model.safetensors"))
    cfg = adapter_config(base_model="elsewhere", rank=2, alpha=4, target_modules=["q_proj"])
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    return d


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, llama_dir, llama_evolved_dir, strong_patch, sst2_file):
    """One CLI run over 2 models x (alone, + patch), with --output and --log-samples."""
    out = tmp_path_factory.mktemp("cli-run")
    res = _invoke(
        "--model", str(llama_dir), "--model", str(llama_evolved_dir), "--patch", str(strong_patch),
        "--tasks", "sst2", "--data", f"sst2={sst2_file}", "--limit", "10", "--batch-size", "4",
        "--output", str(out / "results.json"), "--log-samples", str(out / "samples"), "--json",
    )
    return res, out


def test_cli_json_has_every_configuration(cli_run, llama_dir, llama_evolved_dir, strong_patch):
    res, out = cli_run
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    names = [c["name"] for c in doc["configurations"]]
    m1, m2, p = str(llama_dir), str(llama_evolved_dir), str(strong_patch)
    assert names == [m1, f"{m1}+{p}", m2, f"{m2}+{p}"]
    for c in doc["configurations"]:
        score = c["scores"]["sst2"]
        assert score["metric"] == "acc" and score["n"] == 10
        assert 0.0 <= score["value"] <= 1.0 and score["stderr"] > 0
        # lm-eval's own structure is carried along, and agrees with the summary
        assert c["lm_eval"]["sst2"]["results"]["acc,none"] == score["value"]
        assert c["lm_eval"]["sst2"]["config"]["dataset_path"] == "json"
    gains = {(g["model"], g["patch"]): g for g in doc["gains"]}
    assert set(gains) == {(m1, p), (m2, p)}
    by_name = {c["name"]: c["scores"]["sst2"]["value"] for c in doc["configurations"]}
    assert gains[(m1, p)]["gain"] == pytest.approx(by_name[f"{m1}+{p}"] - by_name[m1])
    top = max(by_name.values())
    assert doc["best"]["sst2"] == [n for n in names if by_name[n] == top]
    # --output holds the same document
    assert json.loads((out / "results.json").read_text()) == doc


def test_log_samples_one_file_per_configuration(cli_run):
    res, out = cli_run
    assert res.exit_code == 0, res.stderr
    dirs = sorted(p for p in (out / "samples").iterdir())
    assert len(dirs) == 4
    for d in dirs:
        lines = (d / "sst2.jsonl").read_text().splitlines()
        assert len(lines) == 10
        rec = json.loads(lines[0])
        assert {"doc", "target", "filtered_resps", "acc"} <= set(rec)
    doc = json.loads(res.stdout)
    acc = [sum(json.loads(x)["acc"] for x in (d / "sst2.jsonl").read_text().splitlines()) / 10 for d in dirs]
    assert acc == [c["scores"]["sst2"]["value"] for c in doc["configurations"]]


def test_patch_changes_scores_and_in_memory_equals_merged_on_disk(tmp_path, llama_dir, strong_patch, sst2_file):
    """The patched row equals lm-eval on a model merged by PEFT and saved: same numbers, exactly."""
    import torch
    import transformers
    from peft import PeftModel

    from portllm_cli.core.evaluate import evaluate

    data = {"sst2": sst2_file}
    live = evaluate([str(llama_dir)], [str(strong_patch)], ["sst2"], data=data, log_samples_dir=tmp_path / "s1",
                    device="cpu")
    base, patched = live.rows
    assert patched.patch == str(strong_patch)
    ll_base, ll_patched = _loglikelihoods(base.samples["sst2"]), _loglikelihoods(patched.samples["sst2"])
    assert ll_base != ll_patched
    assert base.scores["sst2"]["value"] != patched.scores["sst2"]["value"]

    # an independent merge: PEFT's merge_and_unload, saved to disk, evaluated as a plain model
    merged_dir = tmp_path / "merged"
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(strong_patch)).merge_and_unload()
    merged.save_pretrained(merged_dir)
    for f in Path(llama_dir).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, merged_dir / f.name)
    disk = evaluate([str(merged_dir)], [], ["sst2"], data=data, log_samples_dir=tmp_path / "s2", device="cpu")
    (on_disk,) = disk.rows
    assert on_disk.scores["sst2"]["value"] == patched.scores["sst2"]["value"]
    assert on_disk.scores["sst2"]["stderr"] == patched.scores["sst2"]["stderr"]
    # same fp32 arithmetic on the same weights: the per-example log-likelihoods agree bit for bit
    assert _loglikelihoods(on_disk.samples["sst2"]) == ll_patched


def test_patch_removal_is_clean(llama_dir, strong_patch, sst2_file):
    """Base scores before and after a patch are identical, and so are the weights, bit for bit."""
    import torch
    import transformers

    import contextlib
    import tempfile

    from portllm_cli.core import harness
    from portllm_cli.core.compat import check_compatibility
    from portllm_cli.core.config import EvalConfig
    from portllm_cli.core.evaluate import score_loaded
    from portllm_cli.io.checkpoint import Checkpoint
    from portllm_cli.patch.format import read_patch

    model = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(llama_dir)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    patch = read_patch(strong_patch)
    rep = check_compatibility(patch, Checkpoint.open(llama_dir))
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        plan = harness.plan_offline(stack, ["sst2"], {"sst2": sst2_file}, None, Path(tmp))
        stack.enter_context(harness.quiet_lm_eval())
        rows = score_loaded(model, tok, "model", [(None, None, {}), ("strong", patch, rep.key_map)], plan,
                            EvalConfig(), log_samples=True)
        assert [r.patch for r in rows] == [None, "strong"]
        after = score_loaded(model, tok, "model", [(None, None, {})], plan, EvalConfig(), log_samples=True)
    assert after[0].scores == rows[0].scores
    assert _loglikelihoods(after[0].samples["sst2"]) == _loglikelihoods(rows[0].samples["sst2"])
    assert _loglikelihoods(rows[1].samples["sst2"]) != _loglikelihoods(rows[0].samples["sst2"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_only_and_skipped_patch(llama_dir, llama_evolved_dir, strong_patch, misfit_patch, sst2_file):
    m1, m2, p = str(llama_dir), str(llama_evolved_dir), str(strong_patch)
    from portllm_cli.core.evaluate import _Model, _Patch, plan_configurations
    from portllm_cli.io.checkpoint import Checkpoint
    from portllm_cli.patch.format import read_patch

    models = [_Model(m, Path(m), Checkpoint.open(m)) for m in (m1, m2)]
    patches = [_Patch(p, read_patch(p))]
    configs, skipped = plan_configurations(models, patches, [f"{m2}+{p}", m1])
    assert [c.name for c in configs] == [m1, f"{m2}+{p}"] and skipped == []

    res = _invoke("-m", m1, "-p", p, "-t", "sst2", "--data", f"sst2={sst2_file}", "--limit", "2",
                  "--only", f"{m1}+{p}", "--json")
    assert res.exit_code == 0, res.stderr
    assert [c["name"] for c in json.loads(res.stdout)["configurations"]] == [f"{m1}+{p}"]
    assert json.loads(res.stdout)["gains"] == []  # no base row to compare with


def test_patch_that_fits_no_model_exits_3(llama_dir, misfit_patch, sst2_file):
    res = _invoke("-m", str(llama_dir), "-p", str(misfit_patch), "-t", "sst2", "--data", f"sst2={sst2_file}")
    assert res.exit_code == 3
    assert res.stderr.startswith("Error: patch") and "fits none of the models" in res.stderr
    assert "model.layers.9" in res.stderr


def test_patch_that_fits_one_model_is_skipped_for_the_other(tmp_path, llama_dir, strong_patch, sst2_file):
    # a model with more key/value heads: the v_proj factors of the patch do not fit it
    import transformers

    cfg = tiny.tiny_config("llama")
    cfg.num_key_value_heads = 4
    other = tmp_path / "other"
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(other)
    for f in Path(llama_dir).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, other / f.name)
    res = _invoke("-m", str(llama_dir), "-m", str(other), "-p", str(strong_patch), "-t", "sst2",
                  "--data", f"sst2={sst2_file}", "--limit", "2", "--json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert [c["name"] for c in doc["configurations"]] == [str(llama_dir), f"{llama_dir}+{strong_patch}", str(other)]
    assert doc["skipped"][0]["model"] == str(other) and "v_proj" in doc["skipped"][0]["reason"]


@pytest.mark.parametrize("limit", ["0", "-3"])
def test_bad_limit_exits_2(llama_dir, sst2_file, limit):
    res = _invoke("-m", str(llama_dir), "-t", "sst2", "--data", f"sst2={sst2_file}", "--limit", limit)
    assert res.exit_code == 2
    assert res.stderr.startswith("Error: --limit must be a positive number")


def test_missing_and_malformed_data(tmp_path, llama_dir):
    res = _invoke("-m", str(llama_dir), "-t", "sst2", "--data", f"sst2={tmp_path / 'nope.jsonl'}")
    assert res.exit_code == 1 and res.stderr.startswith("Error: ") and "nope.jsonl" in res.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"sentence": "fine", "label": 1}\n{"sentence": "broken", \n')
    res = _invoke("-m", str(llama_dir), "-t", "sst2", "--data", f"sst2={bad}")
    assert res.exit_code == 1 and res.stderr.startswith("Error: ") and "bad.jsonl" in res.stderr
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"text": "no sentence field", "label": 1}\n')
    res = _invoke("-m", str(llama_dir), "-t", "sst2", "--data", f"sst2={wrong}")
    assert res.exit_code == 1 and "sentence" in res.stderr
    assert len(res.stderr.strip().splitlines()) <= 2  # Error: + optional Hint:


def test_unknown_local_task_lists_close_matches(llama_dir, sst2_file):
    res = _invoke("-m", str(llama_dir), "-t", "sst3", "--data", f"sst3={sst2_file}")
    assert res.exit_code == 2
    assert res.stderr.startswith("Error: ") and "sst2" in res.stderr


def test_data_for_a_task_not_asked_for(llama_dir, sst2_file):
    res = _invoke("-m", str(llama_dir), "-t", "sst2", "--data", f"boolq={sst2_file}")
    assert res.exit_code == 2 and "boolq" in res.stderr


def test_unknown_only_and_missing_model(tmp_path, llama_dir, sst2_file):
    res = _invoke("-m", str(llama_dir), "-t", "sst2", "--data", f"sst2={sst2_file}", "--only", "nothing")
    assert res.exit_code == 2 and "--only" in res.stderr
    res = _invoke("-m", str(tmp_path / "absent"), "-t", "sst2", "--data", f"sst2={sst2_file}")
    assert res.exit_code == 1 and "absent" in res.stderr


def test_model_that_cannot_be_loaded(tmp_path, llama_dir, sst2_file):
    broken = tmp_path / "broken"
    shutil.copytree(llama_dir, broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["model_type"] = "no-such-architecture"
    (broken / "config.json").write_text(json.dumps(cfg))
    res = _invoke("-m", str(broken), "-t", "sst2", "--data", f"sst2={sst2_file}")
    assert res.exit_code == 1
    assert res.stderr.startswith(f"Error: {broken}: ") and "causal language model" in res.stderr


def test_data_directory_named_by_task(tmp_path, llama_dir, sst2_file):
    d = tmp_path / "data"
    d.mkdir()
    shutil.copy(sst2_file, d / "sst2.jsonl")
    res = _invoke("-m", str(llama_dir), "-t", "sst2", "--data", str(d), "--limit", "3", "--num-fewshot", "2",
                  "--json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["configurations"][0]["scores"]["sst2"]["n"] == 3
    assert doc["configurations"][0]["lm_eval"]["sst2"]["n-shot"] == 2
    assert doc["settings"]["data"]["sst2"] == str((d / "sst2.jsonl").resolve())


def test_builtin_task_with_unreachable_data_says_pass_data(tmp_path, llama_dir, monkeypatch):
    """A task whose dataset is on the Hub fails offline with one clear line naming --data."""
    import datasets.config
    import lm_eval.tasks
    from huggingface_hub import constants

    from portllm_cli.core import evaluate as core
    from portllm_cli.core import harness
    from portllm_cli.errors import NotFoundError

    # Offline as HF_HUB_OFFLINE=1 makes a fresh process: datasets and huggingface_hub read it when
    # first imported, which in this session may have been under another test's settings.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    (tmp_path / "hubtask.yaml").write_text(
        "task: hubtask\ndataset_path: nyu-mll/glue\ndataset_name: sst2\noutput_type: multiple_choice\n"
        "validation_split: validation\ndoc_to_text: '{{sentence}}'\ndoc_to_target: label\n"
        "doc_to_choice: ['negative', 'positive']\nmetric_list:\n  - metric: acc\n"
    )
    tm = lm_eval.tasks.TaskManager(include_path=str(tmp_path), include_defaults=False)
    plan = harness.TaskPlan(["hubtask"], {"hubtask": "hubtask"}, {}, tm, tmp_path)
    model, tok = core.load_model(llama_dir, dtype="float32", device="cpu", trust_remote_code=False, allow_pickle=False)
    from lm_eval.models.huggingface import HFLM

    with pytest.raises(NotFoundError) as err, harness.quiet_lm_eval():
        harness.run_tasks(HFLM(pretrained=model, tokenizer=tok, batch_size=2), plan, limit=2, num_fewshot=None,
                       log_samples=False)
    assert "hubtask" in err.value.message and "--data hubtask=PATH" in (err.value.hint or "")


def test_lm_eval_prints_and_bars_stay_off_stdout(capsys, monkeypatch):
    """lm-eval prints while it scores (its bootstrap of f1's stderr, for mrpc) and draws a tqdm bar:
    stdout carries portllm's result alone (one JSON document under --json)."""
    from lm_eval.api.metrics import bootstrap_stderr, mean

    from portllm_cli.core import harness

    monkeypatch.setenv("DISABLE_MULTIPROC", "1")  # lm-eval's in-process bootstrap: no worker pool
    with harness.quiet_lm_eval():
        se = bootstrap_stderr(mean, [0, 1, 1, 0, 1], iters=20)
    out, err = capsys.readouterr()
    assert se > 0
    assert out == ""
    assert "bootstrapping for stddev: mean" in err and "it/s" not in err


def test_local_task_yaml_for_multi_context_and_generation(tmp_path):
    """winogrande rows become lm-eval's multiple-input form; gsm8k rows keep only the final answer."""
    import yaml

    from portllm_cli.core import harness as core

    wino = tmp_path / "w.jsonl"
    wino.write_text(json.dumps({"sentence": "The cup fell off the table because _ was wobbly.",
                                "option1": "the cup", "option2": "the table", "answer": "2"}) + "\n")
    t = core.load_local_task("winogrande", wino)
    assert t.kind == "multi"
    assert t.docs == [{"contexts": ["The cup fell off the table because the cup",
                                    "The cup fell off the table because the table"],
                       "gold": 1, "continuation": " was wobbly."}]
    gsm = tmp_path / "g.jsonl"
    gsm.write_text(json.dumps({"question": "2+3?", "answer": "2 plus 3 is 5\n#### 5"}) + "\n")
    g = core.load_local_task("gsm8k", gsm)
    assert g.kind == "generate" and g.metric_key == "exact_match,strict-match"
    assert g.docs == [{"query": "Question: 2+3?\nAnswer:", "answer": " 2 plus 3 is 5\n#### 5"}]
    paths = core.write_local_tasks([t, g], tmp_path)
    cfg = yaml.safe_load(paths["winogrande"].read_text())
    assert cfg["doc_to_text"] == "gold" and cfg["target_delimiter"] == ""
    assert Path(cfg["dataset_kwargs"]["data_files"]["test"]).is_absolute()


@pytest.mark.slow
def test_unknown_builtin_task_lists_close_matches(llama_dir):
    """Without --data a name must be an lm-eval task (this builds lm-eval's full task index)."""
    res = _invoke("-m", str(llama_dir), "-t", "winogrand")
    assert res.exit_code == 2
    assert res.stderr.startswith("Error: unknown task 'winogrand'") and "winogrande" in res.stderr


def test_help_does_not_import_heavy_libraries():
    import subprocess
    import sys

    code = ("import sys; from portllm_cli.cli.app import app; "
            "print(sorted(m for m in ('torch', 'transformers', 'lm_eval', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"


# -- the real thing ---------------------------------------------------------------------------
@pytest.mark.integration
def test_smollm2_zero_shot_polarity_well_above_chance(tmp_path):
    """The real model on the 1,000 held-out polarity sentences: zero-shot accuracy clearly above chance."""
    model = real.smollm2()
    data = real.polarity().test
    res = _invoke("-m", str(model), "-t", "sst2", "--data", f"sst2={data}", "--json", "--batch-size", "16")
    assert res.exit_code == 0, res.stderr
    score = json.loads(res.stdout)["configurations"][0]["scores"]["sst2"]
    assert score["n"] == 1000
    print(f"SmolLM2-135M-Instruct zero-shot polarity accuracy: {score['value']:.3f} ± {score['stderr']:.3f}")
    # chance is 0.5 on the balanced split: the accuracy must stand three standard errors above it
    assert score["value"] - 3 * score["stderr"] > 0.5, score


def test_multi_context_and_generation_tasks_run_end_to_end(tmp_path, llama_dir):
    from portllm_cli.core.evaluate import evaluate

    wino = tmp_path / "winogrande.jsonl"
    wino.write_text("".join(json.dumps({"sentence": f"The cup {i} fell off the table because _ was wobbly.",
                                        "option1": "the cup", "option2": "the table", "answer": "2"}) + "\n"
                            for i in range(3)))
    gsm = tmp_path / "gsm8k.jsonl"
    gsm.write_text("".join(json.dumps({"question": f"What is {i} plus 3?",
                                       "answer": f"{i} plus 3 is {i + 3}\n#### {i + 3}"}) + "\n" for i in range(2)))
    rep = evaluate([str(llama_dir)], [], ["winogrande", "gsm8k"], data_dir=tmp_path, device="cpu")
    (row,) = rep.rows
    assert row.scores["winogrande"]["metric"] == "acc" and row.scores["winogrande"]["n"] == 3
    assert row.scores["winogrande"]["value"] in (0.0, 1 / 3, 2 / 3, 1.0)
    gs = row.scores["gsm8k"]
    assert gs["metric"] == "exact_match (strict-match)" and gs["n"] == 2
    # a random tiny model never writes '#### N'
    assert gs["value"] == 0.0
    assert "exact_match,flexible-extract" in row.lm_eval_results["gsm8k"]["results"]


def test_two_patches_on_one_model(llama_dir, llama_lora_dir, strong_patch, sst2_file):
    """Each patch is scored on the pristine model: the second row does not carry the first patch."""
    from portllm_cli.core.evaluate import evaluate

    kw = dict(data={"sst2": sst2_file}, limit=6, device="cpu")
    both = evaluate([str(llama_dir)], [str(llama_lora_dir), str(strong_patch)], ["sst2"], log_samples_dir=None, **kw)
    alone = evaluate([str(llama_dir)], [str(strong_patch)], ["sst2"], only=[f"{llama_dir}+{strong_patch}"], **kw)
    assert [r.patch for r in both.rows] == [None, str(llama_lora_dir), str(strong_patch)]
    assert both.rows[2].lm_eval_results["sst2"]["results"] == alone.rows[0].lm_eval_results["sst2"]["results"]
    assert [(g.patch, g.task) for g in both.gains] == [(str(llama_lora_dir), "sst2"), (str(strong_patch), "sst2")]
