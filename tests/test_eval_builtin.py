"""portllm's task recipes against lm-eval's own tasks, on the same rows.

``portllm eval --tasks sst2`` without ``--data`` runs lm-eval's built-in task: its YAML, its data
loaded by ``datasets.load_dataset(dataset_path, dataset_name)`` from the Hub. Here that Hub is the
test server (tests/hubserver.py), holding a few rows in the layout of each real dataset repo
(nyu-mll/glue, aps/super_glue, allenai/winogrande, openai/gsm8k: Parquet per config and split, a
README that maps configs to files), published with the real client. The same rows, written to a
local file, go through ``--data TASK=FILE`` (portllm's recipe and generated task YAML). Both runs
log their samples; every request lm-eval makes of the model (context and continuation, or context
and generation arguments), every response and every score must be identical.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from portllm_cli.cli.app import app
from portllm_cli.core import tasks as recipes
from portllm_cli.demo.run import head_jsonl
from tests import real
from tests.hub_fixtures import publish_dataset

TASKS = ["sst2", "boolq", "mrpc", "rte", "wnli", "winogrande", "gsm8k"]

GLUE_LABELS = {
    "sst2": {"0": "negative", "1": "positive"},
    "mrpc": {"0": "not_equivalent", "1": "equivalent"},
    "rte": {"0": "entailment", "1": "not_entailment"},
    "wnli": {"0": "not_entailment", "1": "entailment"},
}


def _sst2(i: int, split: str) -> dict[str, Any]:
    words = ["a gripping , funny story", "dull and lifeless", "one of the year 's best", "a waste of talent",
             "warm and wise", "it never takes off"]
    return {"sentence": f"{words[i % 6]} ( {split} {i} )", "label": -1 if split == "test" else (i + 1) % 2, "idx": i}


def _pair(i: int, split: str, first: str, second: str) -> dict[str, Any]:
    return {"sentence1": f"{first} {i} in {split}.", "sentence2": f"{second} {i}.",
            "label": -1 if split == "test" else i % 2, "idx": i}


def _boolq(i: int, split: str) -> dict[str, Any]:
    return {"question": f"is the river number {i} longer than the {split} canal",
            "passage": f"River {i} runs {10 * i + 7} km; the canal beside it runs {5 * i + 3} km.",
            "idx": i, "label": i % 2}


def _winogrande(i: int, split: str) -> dict[str, Any]:
    return {"sentence": f"The trophy {i} would not fit in the suitcase because _ was too big ({split}).",
            "option1": "the trophy", "option2": "the suitcase", "answer": "" if split == "test" else str(1 + i % 2)}


def _gsm8k(i: int, split: str) -> dict[str, Any]:
    return {"question": f"Tom has {i + 2} apples and buys {3 * i + 1} more in the {split} shop. How many now?",
            "answer": f"He has {i + 2} + {3 * i + 1} = <<{i + 2}+{3 * i + 1}={4 * i + 3}>>{4 * i + 3} apples.\n"
                      f"#### {4 * i + 3}"}


def _rows(make, splits: dict[str, int], *extra: str) -> dict[str, list[dict[str, Any]]]:
    return {split: [make(i, split, *extra) for i in range(n)] for split, n in splits.items()}


GLUE_SPLITS = {"train": 3, "validation": 6, "test": 2}

# repo -> config -> split -> rows, as the real repos lay them out (the evaluated split holds 6 rows,
# the others a few different rows, so a task reading the wrong split cannot pass)
REPOS: dict[str, dict[str, dict[str, list[dict[str, Any]]]]] = {
    "nyu-mll/glue": {
        "sst2": _rows(_sst2, GLUE_SPLITS),
        "mrpc": _rows(_pair, GLUE_SPLITS, "The company said profits rose", "Profits went up, the company said"),
        "rte": _rows(_pair, GLUE_SPLITS, "A man is playing a guitar on stage", "A man plays an instrument"),
        "wnli": _rows(_pair, GLUE_SPLITS, "The dog chased the cat because it was hungry", "The dog was hungry"),
    },
    "aps/super_glue": {"boolq": _rows(_boolq, {"train": 3, "validation": 6, "test": 2})},
    "allenai/winogrande": {"winogrande_xl": _rows(_winogrande, {"train": 3, "test": 2, "validation": 6})},
    "openai/gsm8k": {"main": _rows(_gsm8k, {"train": 3, "test": 6})},
}
FEATURES = {
    **{c: {"label": {"class_label": {"names": names}}, "idx": "int32"} for c, names in GLUE_LABELS.items()},
    "boolq": {"idx": "int32", "label": {"class_label": {"names": {"0": "False", "1": "True"}}}},
}


def eval_rows(task: str) -> list[dict[str, Any]]:
    """The rows lm-eval's task evaluates, found through portllm's recipe (dataset, config, split)."""
    r = recipes.get_recipe(task)
    assert r.hub_dataset is not None and r.hub_config is not None
    return REPOS[r.hub_dataset][r.hub_config][r.eval_split]


def _invoke(*args: str):
    return CliRunner().invoke(app, ["eval", *args])


def _samples(directory: Path, task: str) -> dict[str, list[dict[str, Any]]]:
    """lm-eval's sample records of a task, by filter (gsm8k logs each doc once per filter), in doc order."""
    (config_dir,) = [d for d in directory.iterdir() if d.is_dir()]
    out: dict[str, list[dict[str, Any]]] = {}
    for line in (config_dir / f"{task}.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out.setdefault(rec["filter"], []).append(rec)
    return {f: sorted(recs, key=lambda r: r["doc_id"]) for f, recs in out.items()}


def _publish(hub, tmp_path: Path) -> None:
    for repo_id, configs in REPOS.items():
        publish_dataset(hub.url, repo_id, configs, features=FEATURES, workdir=tmp_path / "published")


def test_published_dataset_loads_with_datasets(hub_datasets, tmp_path):
    """The test Hub serves a dataset repo to datasets.load_dataset, anonymously, as the real Hub does."""
    import datasets

    _publish(hub_datasets, tmp_path)
    ds = datasets.load_dataset("nyu-mll/glue", "sst2", token=False)  # a public dataset needs no token
    assert {s: ds[s].num_rows for s in ds} == {"train": 3, "validation": 6, "test": 2}
    assert [dict(r) for r in ds["validation"]] == REPOS["nyu-mll/glue"]["sst2"]["validation"]
    assert ds["validation"].features["label"].names == ["negative", "positive"]
    wino = datasets.load_dataset("allenai/winogrande", "winogrande_xl", split="validation")
    assert [dict(r) for r in wino] == eval_rows("winogrande")
    # every request went to the test server: README, repo info, tree listings, the Parquet files
    # (resolved with a 302 to the "CDN", as the Hub serves LFS files)
    paths = [p for _, p in hub_datasets.requests()]
    assert "/datasets/nyu-mll/glue/resolve/main/README.md" in paths
    assert any(p.startswith("/api/datasets/nyu-mll/glue/tree/") for p in paths)
    assert any(p.startswith("/cdn/datasets/nyu-mll/glue/") and p.endswith("/sst2/validation-00000-of-00001.parquet")
               for p in paths)


def test_dataset_repo_permissions_and_paths_info(hub_datasets, tmp_path, monkeypatch):
    import datasets
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from tests.hub_fixtures import BOB_TOKEN, MIRROR_TOKEN, WRITE_TOKEN

    rows = {"sst2": {"validation": [{"sentence": "fine", "label": 1}]}}
    # alice may not write to nyu-mll; the mirror user may, and may keep a repo private
    with pytest.raises(HfHubHTTPError) as err:
        publish_dataset(hub_datasets.url, "nyu-mll/glue", rows, token=WRITE_TOKEN, workdir=tmp_path / "a")
    assert err.value.response.status_code == 403
    commit = publish_dataset(hub_datasets.url, "nyu-mll/hidden", rows, private=True, workdir=tmp_path / "b")
    assert hub_datasets.head("nyu-mll/hidden", repo_type="dataset") == commit
    assert set(hub_datasets.files("nyu-mll/hidden", repo_type="dataset")) == {
        ".gitattributes", "README.md", "sst2/validation-00000-of-00001.parquet"}
    # a model repo of the same name is another repo
    with pytest.raises(KeyError):
        hub_datasets.files("nyu-mll/hidden")
    api = HfApi(endpoint=hub_datasets.url, token=MIRROR_TOKEN)
    info = api.get_paths_info("nyu-mll/hidden", ["README.md", "sst2", "nothing"], repo_type="dataset")
    assert [(type(i).__name__, i.path) for i in info] == [("RepoFile", "README.md"), ("RepoFolder", "sst2")]
    parquet = api.get_paths_info("nyu-mll/hidden", "sst2/validation-00000-of-00001.parquet", repo_type="dataset")
    assert parquet[0].lfs is not None and parquet[0].lfs.size == parquet[0].size
    # others cannot see a private dataset; its owner can load it
    for token in (None, BOB_TOKEN):
        with pytest.raises(datasets.exceptions.DatasetNotFoundError):
            datasets.load_dataset("nyu-mll/hidden", "sst2", token=token if token else False)
    ds = datasets.load_dataset("nyu-mll/hidden", "sst2", split="validation", token=MIRROR_TOKEN)
    assert ds[0] == {"sentence": "fine", "label": 1}


@pytest.fixture
def one_thread():
    """Two OpenMP threads on a CPU shared with other work wait for each other at every matmul (15 ms
    for the tiny model's 32x32 linear, a minute for gsm8k's generations); one keeps the time steady."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def both_runs(hub_datasets, tmp_path, llama_dir, monkeypatch, one_thread):
    """All seven tasks twice on the tiny model: lm-eval's built-in tasks, and --data with the same rows."""
    import lm_eval

    # lm-eval bootstraps the stderr of mrpc's f1 100,000 times (minutes on a shared CPU); nothing
    # here reads that stderr, so both runs draw 100 resamples instead
    monkeypatch.setattr(lm_eval, "simple_evaluate", functools.partial(lm_eval.simple_evaluate, bootstrap_iters=100))
    _publish(hub_datasets, tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    for t in TASKS:
        (data / f"{t}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in eval_rows(t)))
    common = ["-m", str(llama_dir), "-t", ",".join(TASKS), "--num-fewshot", "0", "--batch-size", "4", "--json",
              "--device", "cpu"]
    builtin = _invoke(*common, "--log-samples", str(tmp_path / "builtin"))
    assert builtin.exit_code == 0, builtin.stderr
    local = _invoke(*common, "--data", str(data), "--log-samples", str(tmp_path / "local"))
    assert local.exit_code == 0, local.stderr
    return json.loads(builtin.stdout), json.loads(local.stdout), tmp_path


def test_recipes_equal_lm_eval_builtin_tasks(both_runs):
    builtin, local, tmp_path = both_runs
    assert builtin["settings"]["data"] == {} and builtin["settings"]["lm_eval_tasks"] == {t: t for t in TASKS}
    assert set(local["settings"]["data"]) == set(TASKS)
    (b_row,), (l_row,) = builtin["configurations"], local["configurations"]
    for t in TASKS:
        recipe = recipes.get_recipe(t)
        cfg = b_row["lm_eval"][t]["config"]
        # lm-eval's YAML names the dataset, config and split that portllm's recipe names
        assert (cfg["dataset_path"], cfg["dataset_name"]) == (recipe.hub_dataset, recipe.hub_config), t
        assert (cfg.get("test_split") or cfg.get("validation_split")) == recipe.eval_split, t
        rows = eval_rows(t)
        b, l_ = _samples(tmp_path / "builtin", t), _samples(tmp_path / "local", t)
        assert set(b) == set(l_) == ({"strict-match", "flexible-extract"} if t == "gsm8k" else {"none"}), t
        for filt in b:
            assert len(b[filt]) == len(l_[filt]) == len(rows), (t, filt)
            for sb, sl, row in zip(b[filt], l_[filt], rows):
                where = (t, filt, sb["doc_id"])
                # lm-eval read the published rows, in order, from the test Hub
                assert sb["doc"] == row, where
                # the same requests: (context, continuation) per choice, or (context, generation arguments)
                assert sb["arguments"] == sl["arguments"], where
                # the same answers from the model: log-likelihoods bit for bit, or the same generated text
                assert sb["resps"] == sl["resps"], where
                assert sb["filtered_resps"] == sl["filtered_resps"], where
                metric = "exact_match" if recipe.kind == "generate" else "acc"
                assert sb[metric] == sl[metric], where
        # the same scores, with the same metric names
        assert b_row["scores"][t] == l_row["scores"][t], t
        assert b_row["scores"][t]["n"] == len(rows)
    # a random tiny model must still produce something to compare: generations are non-empty text
    gens = [s["resps"][0][0] for s in _samples(tmp_path / "builtin", "gsm8k")["strict-match"]]
    assert all(isinstance(g, str) for g in gens) and any(g.strip() for g in gens)
    # and the choice tasks are not all decided the same way (the comparison covers both answers)
    accs = [s["acc"] for t in TASKS if t != "gsm8k" for s in _samples(tmp_path / "builtin", t)["none"]]
    assert 0 < sum(accs) < len(accs)


def test_local_and_builtin_tasks_in_one_run(hub_datasets, tmp_path, llama_dir, one_thread):
    """--data for one task leaves the others online: the local task is scored offline, the built-in
    task loads its rows from the Hub in the same run."""
    import os

    publish_dataset(hub_datasets.url, "aps/super_glue", REPOS["aps/super_glue"], features=FEATURES,
                    workdir=tmp_path / "published")
    sst2 = tmp_path / "sst2.jsonl"
    sst2.write_text("".join(json.dumps(r) + "\n" for r in eval_rows("sst2")))
    before = len(hub_datasets.requests())
    res = _invoke("-m", str(llama_dir), "-t", "sst2,boolq", "--data", f"sst2={sst2}", "--limit", "3", "--json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["settings"]["lm_eval_tasks"] == {"sst2": "portllm_sst2", "boolq": "boolq"}
    assert list(doc["settings"]["data"]) == ["sst2"]
    scores = doc["configurations"][0]["scores"]
    assert scores["sst2"]["n"] == scores["boolq"]["n"] == 3
    assert doc["configurations"][0]["lm_eval"]["boolq"]["config"]["dataset_path"] == "aps/super_glue"
    # boolq's rows came from the test Hub; nothing asked it for sst2's
    paths = [p for _, p in hub_datasets.requests()[before:]]
    assert any(p.startswith("/cdn/datasets/aps/super_glue/") for p in paths)
    assert not [p for p in paths if "glue/" in p and "super_glue" not in p]
    # and the offline switches are back as they were
    assert os.environ["HF_HUB_OFFLINE"] == "0" and os.environ["HF_DATASETS_OFFLINE"] == "0"


# -- the real thing ---------------------------------------------------------------------------
@pytest.mark.integration
def test_smollm2_builtin_sst2_equals_local_on_polarity(hub_datasets, tmp_path):
    """SmolLM2-135M-Instruct on 200 real sentences: lm-eval's sst2 (rows from the test Hub, in the
    layout of nyu-mll/glue) and portllm's sst2 recipe (--data) give the same answers."""
    model = real.smollm2()
    polarity = real.polarity()

    def rows(path: Path, n: int) -> list[dict[str, Any]]:
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()][:n]
        return [{"sentence": r["sentence"], "label": r["label"], "idx": i}
                for i, r in enumerate(json.loads(ln) for ln in lines)]

    validation = rows(polarity.test, 200)
    publish_dataset(hub_datasets.url, "nyu-mll/glue",
                    {"sst2": {"train": rows(polarity.train, 8), "validation": validation}},
                    features={"sst2": FEATURES["sst2"]}, workdir=tmp_path / "published")
    local = tmp_path / "sst2.jsonl"
    head_jsonl(polarity.test, 200, local)
    common = ["-m", str(model), "-t", "sst2", "--json", "--batch-size", "16"]
    b = _invoke(*common, "--log-samples", str(tmp_path / "builtin"))
    assert b.exit_code == 0, b.stderr
    l_ = _invoke(*common, "--data", f"sst2={local}", "--log-samples", str(tmp_path / "local"))
    assert l_.exit_code == 0, l_.stderr
    sb, sl = json.loads(b.stdout)["configurations"][0], json.loads(l_.stdout)["configurations"][0]
    assert sb["lm_eval"]["sst2"]["config"]["dataset_path"] == "nyu-mll/glue"
    assert sb["scores"]["sst2"]["n"] == 200
    assert sb["scores"]["sst2"] == sl["scores"]["sst2"]
    b_samples, l_samples = _samples(tmp_path / "builtin", "sst2")["none"], _samples(tmp_path / "local", "sst2")["none"]
    assert [s["doc"] for s in b_samples] == validation
    assert [s["arguments"] for s in b_samples] == [s["arguments"] for s in l_samples]
    assert [s["resps"] for s in b_samples] == [s["resps"] for s in l_samples]
    s = sb["scores"]["sst2"]
    print(f"SmolLM2-135M-Instruct, 200 polarity sentences: built-in sst2 acc {s['value']:.3f} ± {s['stderr']:.3f}; "
          f"--data sst2 acc {sl['scores']['sst2']['value']:.3f} ± {sl['scores']['sst2']['stderr']:.3f}")
