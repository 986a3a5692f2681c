"""Recipes render rows exactly as lm-eval's shipped task YAMLs do (checked against lm-eval itself)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from portllm_cli.core import tasks
from portllm_cli.errors import HubError, InvalidInputError, NotFoundError, UsageError

ROWS = {
    "boolq": {"passage": "Cats are mammals.", "question": "is a cat a mammal", "label": 1, "idx": 0},
    "sst2": {"sentence": "a gorgeous , witty film ", "label": 1, "idx": 0},
    "mrpc": {"sentence1": "He left.", "sentence2": "He went away.", "label": 1, "idx": 0},
    "rte": {"sentence1": "A man sleeps.", "sentence2": "A person rests.", "label": 0, "idx": 0},
    "wnli": {"sentence1": "The cup fell because it slipped.", "sentence2": "The cup slipped.", "label": 1, "idx": 0},
    "winogrande": {"sentence": "Sarah was a much better surgeon than Maria so _ always got the harder cases.",
                   "option1": "Sarah", "option2": "Maria", "answer": "1"},
    "gsm8k": {"question": "Natalia sold 48 clips. How many?", "answer": "She sold 48.\n#### 48"},
}


def _lm_eval_tasks_dir() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks"


YAMLS = {
    "boolq": "super_glue/boolq/default.yaml",
    "sst2": "glue/sst2/default.yaml",
    "mrpc": "glue/mrpc/default.yaml",
    "rte": "glue/rte/default.yaml",
    "wnli": "glue/wnli/default.yaml",
    "gsm8k": "gsm8k/gsm8k.yaml",
}


def _yaml(rel: str) -> dict:
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    return yaml.load((_lm_eval_tasks_dir() / rel).read_text(), Loader=Loader)


@pytest.mark.parametrize("name", list(YAMLS))
def test_template_tasks_match_lm_eval_yaml(name):
    from lm_eval.utils import apply_template

    cfg = _yaml(YAMLS[name])
    recipe = tasks.get_recipe(name)
    row = ROWS[name]
    ex = recipe.example(row)
    assert cfg["task"] == recipe.lm_eval_task
    assert cfg["dataset_path"] == recipe.hub_dataset and cfg["dataset_name"] == recipe.hub_config
    assert ex.prompt == apply_template(cfg["doc_to_text"], row)
    delim = cfg.get("target_delimiter", " ")
    if recipe.kind == "choice":
        assert ex.choices == [delim + c for c in cfg["doc_to_choice"]]
        assert ex.label == row[cfg["doc_to_target"]]
        assert ex.target == ex.choices[ex.label]
        assert ex.contexts == [ex.prompt] * len(ex.choices)
    else:
        assert ex.choices is None and ex.label is None
        assert ex.target == delim + apply_template(cfg["doc_to_target"], row)


def test_winogrande_matches_lm_eval_functions():
    path = _lm_eval_tasks_dir() / "winogrande" / "preprocess_winogrande.py"
    spec = importlib.util.spec_from_file_location("wg", path)
    wg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wg)
    for answer in ("1", "2"):
        row = dict(ROWS["winogrande"], answer=answer)
        ex = tasks.get_recipe("winogrande").example(row)
        assert ex.label == wg.doc_to_text(row)  # lm-eval: doc_to_text returns the gold index
        assert ex.prompts == wg.doc_to_choice(row)  # one context per option
        assert ex.choices == [" " + wg.doc_to_target(row)] * 2
        assert ex.prompt == ex.prompts[ex.label] and ex.target == ex.choices[ex.label]
        assert ex.contexts == ex.prompts


def test_unknown_task_suggests_close_match():
    with pytest.raises(UsageError, match="did you mean sst2"):
        tasks.get_recipe("sst-2")
    assert set(tasks.recipe_names()) >= {"boolq", "sst2", "mrpc", "rte", "wnli", "winogrande", "gsm8k", "completion", "text"}


def test_labels_accept_index_word_and_map(tmp_path):
    recipe = tasks.get_recipe("sst2")
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [
        {"text": "good", "y": "positive"}, {"text": "bad", "y": 0}, {"text": "fine", "y": "1"},
    ]) + "\n")
    rows = tasks.load_rows(recipe, f, text_field="text", label_field="y")
    assert [r["label"] for r in rows] == [1, 0, 1]
    assert [recipe.example(r).target for r in rows] == [" positive", " negative", " positive"]
    # headerless CSV with -1/1 labels (the layout of the Pang & Lee polarity file)
    c = tmp_path / "p.csv"
    c.write_text('\ufeff"1","a fine film \n"\n"-1","dull"\n')
    rows = tasks.load_rows(recipe, c, text_field="1", label_field="0", label_map={"-1": "negative", "1": "positive"})
    assert rows == [{"sentence": "a fine film \n", "label": 1}, {"sentence": "dull", "label": 0}]
    with pytest.raises(InvalidInputError, match="row 2.*label '-1' is outside"):
        tasks.load_rows(recipe, c, text_field="1", label_field="0")


def test_winogrande_labels_are_one_based(tmp_path):
    recipe = tasks.get_recipe("winogrande")
    assert recipe.label_index("2") == 1 and recipe.label_index(1) == 0
    with pytest.raises(InvalidInputError, match="outside"):
        recipe.label_index(0)


def test_parquet_and_csv_header(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    recipe = tasks.get_recipe("rte")
    pq.write_table(pa.table({"sentence1": ["a"], "sentence2": ["b"], "label": [1]}), tmp_path / "r.parquet")
    assert tasks.load_rows(recipe, tmp_path / "r.parquet") == [{"sentence1": "a", "sentence2": "b", "label": 1}]
    (tmp_path / "r.csv").write_text("premise,hyp,label\nx,y,False\n")
    rows = tasks.load_rows(recipe, tmp_path / "r.csv", text_field="sentence1=premise,sentence2=hyp")
    assert rows == [{"sentence1": "x", "sentence2": "y", "label": 1}]
    fp = tasks.data_fingerprint(tmp_path / "r.parquet")
    assert fp["rows"] == 1 and len(fp["sha256"]) == 64


@pytest.mark.parametrize("content,suffix,err,match", [
    (None, ".jsonl", NotFoundError, "no such data file"),
    ("", ".jsonl", InvalidInputError, "empty"),
    ('{"sentence": "x"}\n', ".jsonl", InvalidInputError, "row 1 has no label field 'label'"),
    ('{"text": "x", "label": 1}\n', ".jsonl", InvalidInputError, "row 1 has no field 'sentence'"),
    ('{"sentence": "x", "label": 7}\n', ".jsonl", InvalidInputError, "row 1: label 7 is outside"),
    ('{"sentence": "x", "label": 1}\nnot json\n', ".jsonl", InvalidInputError, "line 2 is not valid JSON"),
    ("x", ".xlsx", InvalidInputError, "unknown data format"),
])
def test_bad_local_data(tmp_path, content, suffix, err, match):
    f = tmp_path / f"d{suffix}"
    if content is not None:
        f.write_text(content)
    with pytest.raises(err, match=match):
        tasks.load_rows(tasks.get_recipe("sst2"), f)


def test_hub_offline_says_pass_data():
    with pytest.raises(HubError) as ei:
        tasks.load_rows(tasks.get_recipe("boolq"), None)
    assert "--data FILE" in ei.value.hint and "passage" in ei.value.hint


def test_text_and_completion(tmp_path):
    (tmp_path / "c.txt").write_text("hello world\n")
    rows = tasks.load_rows(tasks.get_recipe("text"), tmp_path / "c.txt")
    assert tasks.get_recipe("text").example(rows[0]).target == "hello world\n"
    (tmp_path / "p.jsonl").write_text('{"prompt": "Q: 1+1?", "completion": " 2"}\n')
    ex = tasks.get_recipe("completion").example(tasks.load_rows(tasks.get_recipe("completion"), tmp_path / "p.jsonl")[0])
    assert (ex.prompt, ex.target) == ("Q: 1+1?", " 2")
