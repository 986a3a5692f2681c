"""portllm finetune on tiny random models: learning, the patch, resume, --full, and bad input."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from portllm_cli.cli.app import app
from portllm_cli.core import tasks, train
from portllm_cli.errors import Interrupted, UsageError
from tests import real, tiny

SENTENCES = tiny.SENTENCES
runner = CliRunner()
FAST = dict(max_length=32, device="cpu", batch_size=4)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models train ~50x faster on one thread than on two contended ones (OpenMP spin-waits)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("PORTLLM_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(before)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def sst2_file(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    return _jsonl(d / "sst2.jsonl", [{"sentence": s, "label": y} for s, y in SENTENCES * 2])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, llama_dir, sst2_file):
    out = tmp_path_factory.mktemp("ft") / "sst2.patch"
    result = train.finetune(str(llama_dir), "sst2", out, data=sst2_file, lr=1e-2, dropout=0.0, max_steps=24,
                            seed=7, **FAST)
    return result


def _answer_nll(model, tok, rows) -> float:
    """Mean negative log-likelihood of the gold answer tokens, computed here from the logits."""
    import torch

    recipe = tasks.get_recipe("sst2")
    total, count = 0.0, 0
    with torch.no_grad():
        for r in rows:
            ex = recipe.example(r)
            ctx = tok.encode(ex.prompt)
            whole = tok.encode(ex.prompt + ex.target)
            logits = model(torch.tensor([whole])).logits[0].float()
            logp = torch.log_softmax(logits, -1)
            for pos in range(len(ctx), len(whole)):
                total -= float(logp[pos - 1, whole[pos]])
                count += 1
    return total / count


def test_loss_goes_down_and_patch_loads_in_peft(trained, llama_dir, sst2_file):
    import torch
    import transformers
    from peft import PeftModel
    from safetensors.torch import load_file

    assert trained.steps == 24 and len(trained.losses) == 24
    assert sum(trained.losses[-4:]) / 4 < sum(trained.losses[:4]) / 4
    rows = tasks.load_rows(tasks.get_recipe("sst2"), sst2_file)
    tok = transformers.AutoTokenizer.from_pretrained(llama_dir)
    base = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    before = _answer_nll(base, tok, rows)
    patched = PeftModel.from_pretrained(base, trained.out).eval()
    after = _answer_nll(patched, tok, rows)
    assert after < before - 0.1, (before, after)
    # PEFT holds exactly the factors in the file
    saved = load_file(str(trained.out / "adapter_model.safetensors"))
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    loaded = dict(patched.named_parameters())["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"]
    assert torch.equal(saved[name], loaded.detach())
    assert set(k.rsplit(".", 3)[1] for k in saved) == {"q_proj", "v_proj"}


def test_manifest_records_base_data_and_hyperparameters(trained, llama_dir, sst2_file):
    from portllm_cli.io.checkpoint import Checkpoint
    from portllm_cli.patch.format import read_patch
    from portllm_cli.io.hashing import content_hash

    patch = read_patch(trained.out)  # sha256 of the weights verified against the manifest
    m = patch.manifest
    assert patch.rank == 8 and patch.alpha == 16 and patch.config["lora_dropout"] == 0.0
    assert m["base"]["model"] == str(Path(llama_dir).resolve())
    assert m["base"]["content_hash"] == content_hash(Checkpoint.open(llama_dir).files)
    assert m["base"]["fingerprint"]["modules"]["model.layers.0.self_attn.v_proj"] == [16, 32]
    assert set(m["base"]["fingerprint"]["modules"]) == set(patch.modules)
    src = m["source"]
    assert src["task"] == "sst2" and src["lm_eval_task"] == "sst2"
    assert src["data"]["sha256"] == hashlib.sha256(sst2_file.read_bytes()).hexdigest()
    assert src["data"]["rows"] == 16
    hp = src["hyperparameters"]
    assert (hp["rank"], hp["alpha"], hp["lr"], hp["batch_size"], hp["max_length"], hp["seed"]) == (8, 16, 1e-2, 4, 32, 7)
    assert hp["target_modules"] == ["q_proj", "v_proj"] and hp["max_steps"] == 24
    assert src["training"]["final_loss"] == trained.final_loss == trained.losses[-1]
    assert src["training"]["steps"] == 24 and src["training"]["wall_s"] > 0
    assert not train.checkpoint_dir_for(trained.out).exists()


def test_use_dora_trains_dora_and_records_the_base_norms(tmp_path, llama_dir, llama_evolved_dir, sst2_file):
    """--use-dora: PEFT loads the patch as DoRA with the trained magnitudes; the manifest holds
    ||W_base|| per output feature (checked against the base's weights read here), so that
    `port --dora relative` needs no base; and port's default (absolute) is PEFT's own merge."""
    import torch
    import transformers
    from peft import PeftModel
    from safetensors.torch import load_file

    from portllm_cli.core.plan import decode_norms

    out = tmp_path / "dora.patch"
    res = runner.invoke(app, ["finetune", "-m", str(llama_dir), "-t", "sst2", "-d", str(sst2_file), "-o", str(out),
                              "--use-dora", "--lr", "1e-2", "--max-steps", "4", "--max-length", "32", "--device", "cpu",
                              "--json"])
    assert res.exit_code == 0, res.stderr
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True
    saved = load_file(str(out / "adapter_model.safetensors"))
    mags = {k: v for k, v in saved.items() if k.endswith(".lora_magnitude_vector")}
    assert len(mags) == 2 * 2  # q_proj and v_proj of both layers
    manifest = json.loads((out / "portllm.json").read_text())
    assert manifest["lora"]["use_dora"] is True and manifest["source"]["hyperparameters"]["use_dora"] is True
    base = load_file(str(llama_dir / "model.safetensors"))
    norms = manifest["dora"]["base_norms"]
    assert set(norms) == {k.removeprefix("base_model.model.").removesuffix(".lora_magnitude_vector") for k in mags}
    for name, text in norms.items():
        W = base[f"{name}.weight"].float()
        want = torch.linalg.vector_norm(W, dim=1)
        torch.testing.assert_close(decode_norms(text, W.shape[0], name), want, rtol=1e-6, atol=0)
    # trained magnitudes moved away from the initial ||W|| (lr 1e-2, 4 steps)
    some = next(iter(mags))
    assert not torch.allclose(mags[some].float(), decode_norms(norms[some.removeprefix("base_model.model.").removesuffix(
        ".lora_magnitude_vector")], mags[some].shape[0], "m"))
    # port (default --dora absolute) onto the evolved model equals PEFT's merge there
    ported = tmp_path / "ported"
    res = runner.invoke(app, ["port", "-p", str(out), "--to", str(llama_evolved_dir), "-o", str(ported), "--json"])
    assert res.exit_code == 0, res.stderr
    evolved = transformers.AutoModelForCausalLM.from_pretrained(llama_evolved_dir, dtype=torch.float32)
    want = PeftModel.from_pretrained(evolved, out).merge_and_unload().state_dict()
    got = load_file(str(ported / "model.safetensors"))
    for k in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"):
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)
    # relative needs no --base: the recorded norms are used; m' = m * ||W_new|| / ||W_old||, computed here
    rel = tmp_path / "relative"
    res = runner.invoke(app, ["port", "-p", str(out), "--to", str(llama_evolved_dir), "-o", str(rel), "--dora",
                              "relative", "--json"])
    assert res.exit_code == 0, res.stderr
    got_rel, new = load_file(str(rel / "model.safetensors")), load_file(str(llama_evolved_dir / "model.safetensors"))
    s = cfg["lora_alpha"] / cfg["r"]
    for name in norms:
        pre = f"base_model.model.{name}"
        A, B, m = (saved[f"{pre}.lora_A.weight"].double(), saved[f"{pre}.lora_B.weight"].double(),
                   saved[f"{pre}.lora_magnitude_vector"].double())
        Wn, Wo = new[f"{name}.weight"].double(), base[f"{name}.weight"].double()
        V = Wn + s * B @ A
        want_rel = (m * Wn.norm(dim=1) / Wo.norm(dim=1) / V.norm(dim=1))[:, None] * V
        torch.testing.assert_close(got_rel[f"{name}.weight"].double(), want_rel, rtol=0, atol=1e-6)
    assert not torch.equal(got_rel["model.layers.0.self_attn.q_proj.weight"], got["model.layers.0.self_attn.q_proj.weight"])
    # on the base it was trained on, relative is absolute, bit for bit (the recorded norms are ||W_base||)
    for policy in ("absolute", "relative"):
        res = runner.invoke(app, ["port", "-p", str(out), "--to", str(llama_dir), "-o", str(tmp_path / f"b-{policy}"),
                                  "--dora", policy, "--json"])
        assert res.exit_code == 0, res.stderr
    b_abs, b_rel = (load_file(str(tmp_path / f"b-{p}" / "model.safetensors")) for p in ("absolute", "relative"))
    assert all(torch.equal(b_abs[k], b_rel[k]) for k in b_abs)
    # in memory (eval's path, core.evaluate.score_loaded with a policy) each policy scores exactly as the
    # model `port` wrote with it: the same log-likelihood for every example
    import contextlib
    import tempfile

    from portllm_cli.core import harness
    from portllm_cli.core.config import EvalConfig
    from portllm_cli.core.evaluate import evaluate, score_loaded
    from portllm_cli.core.plan import Policy
    from portllm_cli.patch.format import read_patch

    def lls(samples):
        return [[float(r[0]) for r in x["filtered_resps"]] for x in sorted(samples, key=lambda x: x["doc_id"])]

    model = transformers.AutoModelForCausalLM.from_pretrained(llama_evolved_dir, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(llama_evolved_dir)
    data = {"sst2": sst2_file}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        plan = harness.plan_offline(stack, ["sst2"], data, None, Path(tmp))
        stack.enter_context(harness.quiet_lm_eval())
        live = {p: score_loaded(model, tok, "evolved", [(p, read_patch(out), None)], plan, EvalConfig(),
                                log_samples=True, policy=Policy(dora=p))[0] for p in ("absolute", "relative")}
    for policy, merged in (("absolute", ported), ("relative", rel)):
        (disk,) = evaluate([str(merged)], [], ["sst2"], data=data, device="cpu", log_samples_dir=tmp_path / f"s-{policy}").rows
        assert lls(disk.samples["sst2"]) == lls(live[policy].samples["sst2"]), policy
    assert lls(live["absolute"].samples["sst2"]) != lls(live["relative"].samples["sst2"])


def _factors(out: Path):
    from safetensors.torch import load_file

    return load_file(str(out / "adapter_model.safetensors"))


def test_resume_equals_uninterrupted(tmp_path, llama_dir, sst2_file):
    import torch

    kw = dict(data=sst2_file, lr=5e-3, max_steps=7, seed=3, save_every=2, **FAST)
    ref = train.finetune(str(llama_dir), "sst2", tmp_path / "ref", **kw)

    # Ctrl-C after step 3: a checkpoint of step 3 is saved, no patch directory is left
    def ctrl_c(label, done, total):
        if label.startswith("train") and done == 3:
            raise KeyboardInterrupt

    out = tmp_path / "cut"
    with pytest.raises(Interrupted, match="step 3/7"):
        train.finetune(str(llama_dir), "sst2", out, progress=ctrl_c, **kw)
    assert not out.exists() and (train.checkpoint_dir_for(out) / "step-00000003").is_dir()
    resumed = train.finetune(str(llama_dir), "sst2", out, resume=True, **kw)
    assert resumed.resumed_from == 3 and resumed.steps == ref.steps == 7

    # a crash after step 5: --save-every's step-4 checkpoint is where --resume picks up
    def crash(label, done, total):
        if label.startswith("train") and done == 5:
            raise RuntimeError("power cut")

    out2 = tmp_path / "crash"
    with pytest.raises(RuntimeError):
        train.finetune(str(llama_dir), "sst2", out2, progress=crash, **kw)
    resumed2 = train.finetune(str(llama_dir), "sst2", out2, resume=True, **kw)
    assert resumed2.resumed_from == 4

    a = _factors(ref.out)
    for other, res in ((_factors(resumed.out), resumed), (_factors(resumed2.out), resumed2)):
        assert set(other) == set(a)
        for k in a:
            torch.testing.assert_close(other[k], a[k], rtol=0, atol=1e-6)
        assert res.losses == pytest.approx(ref.losses, abs=1e-6)
    assert not train.checkpoint_dir_for(out).exists()


def test_resume_refuses_other_settings(tmp_path, llama_dir, sst2_file):
    out = tmp_path / "p"

    def stop(label, done, total):
        if label.startswith("train") and done == 1:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted):
        train.finetune(str(llama_dir), "sst2", out, data=sst2_file, max_steps=3, progress=stop, **FAST)
    r = CliRunner().invoke(app, ["finetune", "-m", str(llama_dir), "-t", "sst2", "--data", str(sst2_file),
                                 "--out", str(out), "--max-steps", "3", "--max-length", "32", "--rank", "4",
                                 "--resume", "--device", "cpu"])
    assert r.exit_code == 2 and "other settings" in r.stderr
    r = CliRunner().invoke(app, ["finetune", "-m", str(llama_dir), "-t", "sst2", "--data", str(sst2_file),
                                 "--out", str(out), "--max-steps", "3", "--device", "cpu"])
    assert r.exit_code == 1 and "--resume" in r.stderr


def test_cli_json_summary(tmp_path, llama_dir, sst2_file):
    out = tmp_path / "p"
    r = CliRunner().invoke(app, ["finetune", "--model", str(llama_dir), "--task", "sst2", "--data", str(sst2_file),
                                 "--out", str(out), "--max-steps", "2", "--max-length", "32", "--rank", "2",
                                 "--target-modules", "q_proj,k_proj,o_proj", "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    # (the keys were "patch" / "model" and "wall_s" before one scheme for every command)
    assert doc["out"] == str(out) and doc["full"] is False and doc["steps"] == 2 and doc["tokens_per_s"] > 0
    assert doc["peak_memory_bytes"] > 0 and doc["seconds"] > 0 and doc["final_loss"] > 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["target_modules"] == ["k_proj", "o_proj", "q_proj"]


def test_csv_with_positional_fields_and_label_map(tmp_path, llama_dir):
    csv = tmp_path / "polarity.csv"
    csv.write_text("".join(f'"{1 if y else -1}","{s} "\n' for s, y in SENTENCES))
    out = tmp_path / "p"
    r = CliRunner().invoke(app, ["finetune", "-m", str(llama_dir), "-t", "sst2", "--data", str(csv), "--out", str(out),
                                 "--text-field", "1", "--label-field", "0", "--label-map=-1=negative,1=positive",
                                 "--max-steps", "1", "--max-length", "32", "--device", "cpu", "--quiet"])
    assert r.exit_code == 0, r.stderr
    assert json.loads((out / "portllm.json").read_text())["source"]["data"]["rows"] == 8


def test_parquet_completion_and_winogrande_encode(tmp_path, llama_dir, tokenizer_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import transformers

    pq.write_table(pa.table({"prompt": ["Q: is fire cold?", "Q: is the sky blue?"], "completion": [" no", " yes"]}),
                   tmp_path / "c.parquet")
    res = train.finetune(str(llama_dir), "completion", tmp_path / "p", data=tmp_path / "c.parquet", max_steps=1, **FAST)
    assert res.examples == 2
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    ex = tasks.get_recipe("winogrande").example(
        {"sentence": "Sarah beat Maria so _ won.", "option1": "Sarah", "option2": "Maria", "answer": "2"})
    ids, labels = train.encode_example(tok, ex, 64)
    n_ctx = labels.count(-100)
    assert ids[:n_ctx] == tok.encode("Sarah beat Maria so Maria")  # context = prefix filled with the answer
    assert tok.decode(ids[n_ctx:]) == " won." and labels[n_ctx:] == ids[n_ctx:]
    # prompt cut from the left, answer kept whole
    ids, labels = train.encode_example(tok, ex, 4)
    assert len(ids) == 4 and tok.decode([i for i, l in zip(ids, labels) if l != -100]) == " won."


def test_gradient_checkpointing_changes_memory_not_results(tmp_path, llama_dir, sst2_file):
    kw = dict(data=sst2_file, lr=5e-3, max_steps=3, seed=5, **FAST)
    plain = train.finetune(str(llama_dir), "sst2", tmp_path / "a", **kw)
    ckpt = train.finetune(str(llama_dir), "sst2", tmp_path / "b", gradient_checkpointing=True, **kw)
    assert ckpt.losses == pytest.approx(plain.losses, abs=1e-5)
    assert json.loads((tmp_path / "b" / "portllm.json").read_text())["source"]["hyperparameters"]["gradient_checkpointing"]


def test_sparse_answer_loss_equals_transformers_loss(llama_dir):
    """Only answer positions go through the LM head; the loss and gradients are those of model(labels=...)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    assert train._supports_sparse_logits(model)
    feats = [([5, 6, 7, 8, 9], [-100, -100, -100, 8, 9]), ([5, 6, 7], [-100, -100, 7]),
             ([1, 2, 3, 4, 5, 6, 7], [-100] * 5 + [6, 7])]
    batch = train.collate(feats, pad_id=1)
    sparse = train._answer_loss(model, batch, True)
    sparse.backward()
    g_sparse = model.lm_head.weight.grad.clone()
    model.zero_grad()
    dense = model(**batch).loss
    dense.backward()
    torch.testing.assert_close(sparse, dense)
    torch.testing.assert_close(g_sparse, model.lm_head.weight.grad)


def test_full_continued_pretraining_writes_loadable_model(tmp_path, llama_dir):
    import torch
    import transformers

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def f(x): return x + 1\nthe movie was wonderful\n" * 40)
    out = tmp_path / "evolved"
    res = train.continued_pretraining(str(llama_dir), corpus, out, lr=1e-3, max_steps=3, batch_size=2,
                                      max_length=16, device="cpu")
    assert res.full and res.steps == 3 and res.examples > 6
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    record = json.loads((out / train.TRAIN_RECORD).read_text())
    assert record["hyperparameters"]["full"] and record["data"]["sha256"] == hashlib.sha256(corpus.read_bytes()).hexdigest()
    new = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    old = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    old_sd = old.state_dict()
    moved = [k for k, v in new.state_dict().items() if not torch.equal(v, old_sd[k])]
    assert "model.layers.0.mlp.down_proj.weight" in moved and "lm_head.weight" in moved
    transformers.AutoTokenizer.from_pretrained(out)


@pytest.mark.slow
def test_data_parallel_two_processes(tmp_path, llama_dir, sst2_file):
    """torchrun (what accelerate launch starts) with 2 CPU processes: one JSON document, one patch."""
    out = tmp_path / "ddp.patch"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "portllm_cli", "finetune",
           "-m", str(llama_dir), "-t", "sst2", "--data", str(sst2_file), "--out", str(out), "--max-steps", "3",
           "--max-length", "32", "--device", "cpu", "--save-every", "2", "--keep-checkpoints", "--json"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)  # exactly one document: only the main process reports
    assert doc["num_processes"] == 2 and doc["steps"] == 3 and doc["epochs"] == 1.5  # 16 rows = 2 steps of 2 x 4
    from portllm_cli.patch.format import read_patch

    assert len(read_patch(out).modules) == 4
    ckpt = train.checkpoint_dir_for(out) / "step-00000002"
    assert (ckpt / "rng-0.safetensors").exists() and (ckpt / "rng-1.safetensors").exists()


def _no_outputs(out: Path) -> bool:
    return not out.exists() and not any(p.name.startswith(f".{out.name}") for p in out.parent.iterdir())


@pytest.fixture(scope="module")
def not_causal_dir(tmp_path_factory) -> Path:
    import transformers

    d = tmp_path_factory.mktemp("vit")
    cfg = transformers.ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                                 image_size=8, patch_size=4)
    transformers.ViTModel(cfg).save_pretrained(d)
    return d


BAD = {
    "missing data file": ([], "nope.jsonl", None, 1, "no such data file"),
    "missing field": ([], [{"text": "x", "label": 1}], None, 1, "row 1 has no field 'sentence'"),
    "empty dataset": ([], [], None, 1, "the dataset is empty"),
    "label outside choices": ([], [{"sentence": "x", "label": 0}, {"sentence": "y", "label": "neutral"}], None, 1,
                              "row 2: label 'neutral' is outside the task's choices"),
    "target module not in model": (["--target-modules", "q_proj,c_attn"], None, None, 2,
                                   "no linear module named c_attn"),
    "not a causal LM": ([], None, "vit", 1, "not a causal language model"),
    "hub offline": (["--task", "boolq"], "none", None, 1, "--data FILE"),
    "unknown task": (["--task", "boolk"], None, None, 2, "did you mean boolq"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_error_line_and_no_output(case, tmp_path, llama_dir, sst2_file, not_causal_dir):
    extra, data, model, code, message = BAD[case]
    if data is None:
        data_path = sst2_file
    elif data == "none":
        data_path = None
    elif isinstance(data, str):
        data_path = tmp_path / data
    else:
        data_path = _jsonl(tmp_path / "d.jsonl", data)
    out = tmp_path / "out.patch"
    args = ["finetune", "-m", str(not_causal_dir if model else llama_dir), "--task", "sst2", "--out", str(out),
            "--max-steps", "1", "--max-length", "32", "--device", "cpu", *extra]
    if data_path is not None:
        args += ["--data", str(data_path)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == code, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert _no_outputs(out) and not train.checkpoint_dir_for(out).exists()


# -- the real model on real data (deselected by default: pytest -m integration) ------------------
def _choice_accuracy(model, tok, recipe, rows, batch: int = 32) -> float:
    """lm-eval's acc: argmax over choices of the summed log-probability of each continuation."""
    import torch

    pairs, golds = [], []
    for r in rows:
        ex = recipe.example(r)
        pairs.extend(zip(ex.contexts, ex.choices))
        golds.append(ex.label)
    scores = []
    with torch.no_grad():
        for i in range(0, len(pairs), batch):
            encoded = []
            for ctx, cont in pairs[i:i + batch]:
                whole, n_ctx = tok.encode(ctx + cont), len(tok.encode(ctx))
                encoded.append((whole, n_ctx))
            width = max(len(w) for w, _ in encoded)
            ids = torch.full((len(encoded), width), tok.pad_token_id)
            mask = torch.zeros_like(ids)
            for j, (w, _) in enumerate(encoded):
                ids[j, : len(w)] = torch.tensor(w)
                mask[j, : len(w)] = 1
            logp = torch.log_softmax(model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits.float(), -1)
            for j, (w, n_ctx) in enumerate(encoded):
                scores.append(sum(float(logp[j, p - 1, w[p]]) for p in range(n_ctx, len(w))))
    n_choices = len(pairs) // len(rows)
    correct = 0
    for k, gold in enumerate(golds):
        s = scores[k * n_choices:(k + 1) * n_choices]
        correct += int(max(range(n_choices), key=s.__getitem__) == gold)
    return correct / len(golds)


def _print_every(n: int):
    def progress(label, done, total):
        if label.startswith("train") and (done % n == 0 or done == total):
            print(f"  step {int(done)}/{int(total)}: {label}", file=sys.stderr, flush=True)

    return progress


@pytest.mark.integration
def test_smollm2_polarity_patch_beats_zero_shot(tmp_path):
    """A few hundred steps on 3,000 real sentences; held-out accuracy must beat the zero-shot model's.

    PORTLLM_IT_STEPS (default 300) and PORTLLM_IT_TEST (default 400 held-out sentences) shorten it.
    """
    import csv as _csv
    import torch
    import transformers
    from peft import PeftModel

    torch.set_num_threads(os.cpu_count() or 1)  # a real model: every core (the module's fixture set one)
    model_dir = real.smollm2()
    pol = real.polarity(n_test=1000)
    n_test = int(os.environ.get("PORTLLM_IT_TEST", "400"))
    steps = int(os.environ.get("PORTLLM_IT_STEPS", "300"))
    train_rows = [json.loads(ln) for ln in pol.train.read_text(encoding="utf-8").splitlines()][:3000]
    test_rows = [json.loads(ln) for ln in pol.test.read_text(encoding="utf-8").splitlines()][:n_test]
    # the corpus's own layout: a headerless CSV of "label,sentence" with labels -1/1
    train_csv = tmp_path / "train.csv"
    with open(train_csv, "w", newline="", encoding="utf-8") as fh:
        _csv.writer(fh).writerows([("1" if r["label"] else "-1", r["sentence"]) for r in train_rows])
    label_map = {"-1": "negative", "1": "positive"}
    out = tmp_path / "polarity.patch"
    result = train.finetune(str(model_dir), "sst2", out, data=train_csv, text_field="1", label_field="0",
                            label_map=label_map, lr=3e-4, max_steps=steps, batch_size=16, max_length=128, seed=0,
                            progress=_print_every(25))
    recipe = tasks.get_recipe("sst2")
    test = tasks.normalise_rows(recipe, test_rows, "test")
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    zero_shot = _choice_accuracy(base, tok, recipe, test)
    patched = PeftModel.from_pretrained(base, out).eval()
    tuned = _choice_accuracy(patched, tok, recipe, test)
    print(f"\nSmolLM2-135M-Instruct, polarity, {steps} steps (final loss {result.final_loss:.3f}, "
          f"{result.tokens_per_s:.0f} tok/s on {result.device}): zero-shot {zero_shot:.3f} -> patched {tuned:.3f} "
          f"on {len(test)} held-out sentences", file=sys.stderr)
    assert tuned > zero_shot


def test_real_sigint_stops_at_a_step_boundary(tmp_path, llama_dir, sst2_file):
    """SIGINT mid-run: the step in flight finishes, a checkpoint of it is saved, exit is Interrupted."""
    import signal

    def send_sigint(label, done, total):
        if label.startswith("train") and done == 2:
            os.kill(os.getpid(), signal.SIGINT)

    out = tmp_path / "p"
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job
    with pytest.raises(Interrupted, match="step 2/5"):
        train.finetune(str(llama_dir), "sst2", out, data=sst2_file, max_steps=5, progress=send_sigint, **FAST)
    assert (train.checkpoint_dir_for(out) / "step-00000002" / "weights.safetensors").exists()
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back
    assert not out.exists()


def test_gsm8k_answers_end_with_eos(tokenizer_dir):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = [{"question": "Natalia sold 48 clips. How many?", "answer": "She sold 48.\n#### 48"}]
    feats = train.build_features(tasks.get_recipe("gsm8k"), rows, tok, 128)
    ids, labels = feats[0]
    answer = [i for i, l in zip(ids, labels) if l != -100]
    assert answer[-1] == tok.eos_token_id
    assert tok.decode(answer[:-1]) == " She sold 48.\n#### 48"


def test_hub_rows_go_through_the_same_validation(monkeypatch):
    """With the Hub reachable, load_rows asks datasets for the recipe's dataset and split."""
    import datasets

    calls = []

    def fake_load_dataset(path, name, split):
        calls.append((path, name, split))
        return [{"sentence": "Good.", "option1": "a", "option2": "b", "answer": "2"}] if path == "allenai/winogrande" \
            else [{"passage": "p", "question": "q", "label": 1, "idx": 0}]

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows = tasks.load_rows(tasks.get_recipe("boolq"), None, split="eval")
    assert calls[-1] == ("aps/super_glue", "boolq", "validation") and rows == [{"passage": "p", "question": "q", "label": 1}]
    with pytest.raises(Exception, match="no '_' blank"):
        tasks.get_recipe("winogrande").example(tasks.load_rows(tasks.get_recipe("winogrande"), None)[0])
    assert calls[-1] == ("allenai/winogrande", "winogrande_xl", "train")


def test_config_is_built_once_from_the_command_options():
    from portllm_cli.cli._options import Dtype
    from portllm_cli.core.config import FinetuneConfig

    cfg = FinetuneConfig.from_options({"target_modules": "q_proj, v_proj,,o_proj", "label_map": "-1=negative,1=positive",
                                       "dtype": Dtype.float32, "rank": 4, "json_out": True, "model": "./m"})
    assert cfg.target_modules == ("q_proj", "v_proj", "o_proj") and cfg.rank == 4 and cfg.dtype == "float32"
    assert dict(cfg.label_map) == {"-1": "negative", "1": "positive"} and cfg.lr == FinetuneConfig().lr
    with pytest.raises(UsageError, match="--rank must be at least 1"):
        FinetuneConfig.build(cfg, {"rank": 0})
    with pytest.raises(TypeError, match="unknown FinetuneConfig settings: rnak"):
        FinetuneConfig.build(None, {"rnak": 4})
