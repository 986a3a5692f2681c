"""Task recipes: how a data row becomes a prompt and an answer, exactly as lm-evaluation-harness does.

Training (``portllm finetune``) and evaluation (``portllm eval``) share these recipes so that the
patch is trained on the very strings the evaluation scores. Each recipe reproduces the
``doc_to_text`` / ``doc_to_choice`` / ``doc_to_target`` of the lm-eval task of the same name
(lm_eval 0.4.x, ``lm_eval/tasks/...``); lm-eval joins context and continuation with its
``target_delimiter`` (a single space by default), which is part of every continuation here.

Scoring rule for choice tasks (what lm-eval does, and what an evaluator must do)::

    for i, continuation in enumerate(example.choices):
        context = example.prompts[i] if example.prompts is not None else example.prompt
        score[i] = log P(continuation | context)
    correct = argmax(score) == example.label

``prompts`` is set only for multiple-input tasks (WinoGrande: lm-eval's ``doc_to_text`` returns
the answer index, ``doc_to_choice`` the sentence prefix filled with each option, and
``doc_to_target`` the shared suffix; every choice is the same suffix under a different context).
Training uses ``prompt`` + ``target`` with the loss on ``target`` only; for WinoGrande ``prompt``
is the prefix filled with the correct option.

Local data (``--data FILE``): JSONL (one object a line), CSV (a header row, or no header with
columns named by position ``0``, ``1`` ...), Parquet, or for ``--task text`` a plain ``.txt``
file. Labels may be the choice index (``0``/``1``), the choice word (``positive``), or any value
mapped by ``label_map`` (``--label-map -1=negative,1=positive``).
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from portllm_cli.errors import (
    HubError,
    InvalidInputError,
    NotFoundError,
    PortllmError,
    UsageError,
)

TARGET_DELIMITER = " "  # lm-eval's default target_delimiter, used by all seven tasks
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")


@dataclass(frozen=True)
class Example:
    """One row rendered as lm-eval renders it (see the module docstring for the scoring rule)."""

    prompt: str  # the context exactly as lm-eval's doc_to_text renders it ("" for --task text)
    choices: list[str] | None  # continuations as lm-eval scores them (delimiter included); None: no choices
    label: int | None  # index into choices (None for generation / completion / text)
    target: str  # the gold continuation: choices[label] for choice tasks, " " + answer for gsm8k
    prompts: list[str] | None = None  # one context per choice, for multiple-input tasks (winogrande)

    @property
    def contexts(self) -> list[str]:
        """The context each choice is scored under."""
        if self.choices is None:
            return [self.prompt]
        return list(self.prompts) if self.prompts is not None else [self.prompt] * len(self.choices)


@dataclass(frozen=True)
class Recipe:
    name: str
    kind: str  # "choice" | "generate" | "completion" | "text"
    hub_dataset: str | None
    hub_config: str | None
    train_split: str
    eval_split: str
    fields: tuple[str, ...]  # text fields a row must have
    label_field: str | None
    choices: tuple[str, ...] | None  # the answer words, without the delimiter
    lm_eval_task: str | None  # the lm-eval task this recipe mirrors
    description: str = ""
    # label values accepted besides the index and the choice words (winogrande: "1"/"2")
    label_names: tuple[str, ...] | None = None
    label_base: int = 0  # integer labels in the source data are index + label_base
    render: Callable[["Recipe", dict[str, Any], int | None], Example] | None = field(
        default=None, repr=False, compare=False
    )

    def label_index(self, value: Any, where: str = "row") -> int:
        """Normalise a label value (int, digit string, choice word, label name) to a choice index."""
        assert self.choices is not None
        n = len(self.choices)
        allowed = self._allowed_labels()
        if isinstance(value, bool) or value is None:
            raise InvalidInputError(f"{where}: label {value!r} is not one of {allowed}")
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        if isinstance(value, int):
            idx = value - self.label_base
            if 0 <= idx < n:
                return idx
            raise InvalidInputError(f"{where}: label {value!r} is outside the task's choices {allowed}")
        if isinstance(value, str):
            s = value.strip()
            names = self.label_names or self.choices
            for i, name in enumerate(names):
                if s == name or s.lower() == name.lower():
                    return i
            for i, name in enumerate(self.choices):
                if s.lower() == name.lower():
                    return i
            try:
                as_int = int(s)
            except ValueError:
                pass
            else:
                idx = as_int - self.label_base
                if 0 <= idx < n:
                    return idx
        raise InvalidInputError(f"{where}: label {value!r} is outside the task's choices {allowed}")

    def _allowed_labels(self) -> str:
        assert self.choices is not None
        ints = [str(i + self.label_base) for i in range(len(self.choices))]
        words = list(self.label_names or ()) + list(self.choices)
        uniq = list(dict.fromkeys(ints + words))
        return "/".join(uniq)

    def example(self, row: dict[str, Any]) -> Example:
        """Render one row (a Hub row or a row from load_rows) as lm-eval would."""
        missing = [f for f in self.fields if f not in row]
        if self.label_field and self.label_field not in row:
            missing.append(self.label_field)
        if missing:
            raise InvalidInputError(f"{self.name}: row lacks field(s) {', '.join(missing)}")
        label = None
        if self.kind == "choice":
            label = self.label_index(row[self.label_field], f"{self.name} row")
        assert self.render is not None
        return self.render(self, row, label)


# -- renderers, one per lm-eval prompt -------------------------------------------------------
def _choice_renderer(template: Callable[[dict[str, Any]], str]):
    def render(recipe: Recipe, row: dict[str, Any], label: int | None) -> Example:
        assert recipe.choices is not None and label is not None
        choices = [TARGET_DELIMITER + c for c in recipe.choices]
        return Example(prompt=template(row), choices=choices, label=label, target=choices[label])

    return render


def _winogrande(recipe: Recipe, row: dict[str, Any], label: int | None) -> Example:
    # lm_eval/tasks/winogrande/preprocess_winogrande.py
    sentence = row["sentence"]
    if "_" not in sentence:
        raise InvalidInputError(f"winogrande: sentence has no '_' blank: {sentence[:60]!r}")
    idx = sentence.index("_")
    prompts = [sentence[:idx] + row["option1"], sentence[:idx] + row["option2"]]
    suffix = TARGET_DELIMITER + sentence[idx + 1:].strip()
    assert label is not None
    return Example(prompt=prompts[label], choices=[suffix, suffix], label=label, target=suffix, prompts=prompts)


def _gsm8k(recipe: Recipe, row: dict[str, Any], label: int | None) -> Example:
    # lm_eval/tasks/gsm8k/gsm8k.yaml: doc_to_text "Question: {{question}}\nAnswer:", target "{{answer}}"
    return Example(prompt=f"Question: {row['question']}\nAnswer:", choices=None, label=None,
                   target=TARGET_DELIMITER + row["answer"])


def _completion(recipe: Recipe, row: dict[str, Any], label: int | None) -> Example:
    return Example(prompt=row["prompt"], choices=None, label=None, target=row["completion"])


def _text(recipe: Recipe, row: dict[str, Any], label: int | None) -> Example:
    return Example(prompt="", choices=None, label=None, target=row["text"])


_RECIPES: dict[str, Recipe] = {}


def _add(recipe: Recipe) -> None:
    _RECIPES[recipe.name] = recipe


_add(Recipe(
    name="boolq", kind="choice", hub_dataset="aps/super_glue", hub_config="boolq",
    train_split="train", eval_split="validation", fields=("passage", "question"), label_field="label",
    choices=("no", "yes"), lm_eval_task="boolq",
    description="yes/no questions about a passage (SuperGLUE BoolQ)",
    render=_choice_renderer(lambda r: f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:"),
))
_add(Recipe(
    name="sst2", kind="choice", hub_dataset="nyu-mll/glue", hub_config="sst2",
    train_split="train", eval_split="validation", fields=("sentence",), label_field="label",
    choices=("negative", "positive"), lm_eval_task="sst2",
    description="sentence sentiment (GLUE SST-2)",
    render=_choice_renderer(lambda r: f"{r['sentence']}\nQuestion: Is this sentence positive or negative?\nAnswer:"),
))
_add(Recipe(
    name="mrpc", kind="choice", hub_dataset="nyu-mll/glue", hub_config="mrpc",
    train_split="train", eval_split="validation", fields=("sentence1", "sentence2"), label_field="label",
    choices=("no", "yes"), lm_eval_task="mrpc",
    description="paraphrase detection (GLUE MRPC)",
    render=_choice_renderer(
        lambda r: f"Sentence 1: {r['sentence1']}\nSentence 2: {r['sentence2']}\n"
        "Question: Do both sentences mean the same thing?\nAnswer:"
    ),
))
_add(Recipe(
    name="rte", kind="choice", hub_dataset="nyu-mll/glue", hub_config="rte",
    train_split="train", eval_split="validation", fields=("sentence1", "sentence2"), label_field="label",
    choices=("True", "False"), lm_eval_task="rte",  # GLUE RTE: 0 = entailment
    description="textual entailment (GLUE RTE; label 0 = entailment = True)",
    render=_choice_renderer(lambda r: f"{r['sentence1']}\nQuestion: {r['sentence2']} True or False?\nAnswer:"),
))
_add(Recipe(
    name="wnli", kind="choice", hub_dataset="nyu-mll/glue", hub_config="wnli",
    train_split="train", eval_split="validation", fields=("sentence1", "sentence2"), label_field="label",
    choices=("False", "True"), lm_eval_task="wnli",  # GLUE WNLI: 1 = entailment
    description="Winograd entailment (GLUE WNLI; label 1 = entailment = True)",
    render=_choice_renderer(lambda r: f"{r['sentence1']}\nQuestion: {r['sentence2']} True or False?\nAnswer:"),
))
_add(Recipe(
    name="winogrande", kind="choice", hub_dataset="allenai/winogrande", hub_config="winogrande_xl",
    train_split="train", eval_split="validation", fields=("sentence", "option1", "option2"),
    label_field="answer", choices=("option1", "option2"), lm_eval_task="winogrande",
    description="pronoun resolution by filling a blank (WinoGrande XL; answer '1' or '2')",
    label_names=("1", "2"), label_base=1, render=_winogrande,
))
_add(Recipe(
    name="gsm8k", kind="generate", hub_dataset="openai/gsm8k", hub_config="main",
    train_split="train", eval_split="test", fields=("question", "answer"), label_field=None,
    choices=None, lm_eval_task="gsm8k",
    description="grade-school math with worked answers ending '#### N' (GSM8K)", render=_gsm8k,
))
_add(Recipe(
    name="completion", kind="completion", hub_dataset=None, hub_config=None,
    train_split="train", eval_split="validation", fields=("prompt", "completion"), label_field=None,
    choices=None, lm_eval_task=None,
    description="generic prompt/completion pairs; loss on the completion (no delimiter added)",
    render=_completion,
))
_add(Recipe(
    name="text", kind="text", hub_dataset=None, hub_config=None,
    train_split="train", eval_split="validation", fields=("text",), label_field=None,
    choices=None, lm_eval_task=None,
    description="plain text corpus cut into --max-length chunks (continued pretraining; with --full)",
    render=_text,
))


def recipe_names() -> list[str]:
    return list(_RECIPES)


def get_recipe(name: str) -> Recipe:
    key = name.strip().lower()
    if key in _RECIPES:
        return _RECIPES[key]
    close = difflib.get_close_matches(key, list(_RECIPES), n=3, cutoff=0.5)
    msg = f"unknown task {name!r}"
    if close:
        msg += f"; did you mean {', '.join(close)}?"
    raise UsageError(msg, hint=f"tasks: {', '.join(_RECIPES)}")


# -- loading rows ------------------------------------------------------------------------------
def parse_field_map(recipe: Recipe, text_field: str | None) -> dict[str, str]:
    """--text-field: a column name (recipes with one text field) or recipe_field=column pairs."""
    if not text_field:
        return {}
    mapping: dict[str, str] = {}
    parts = [p.strip() for p in text_field.split(",") if p.strip()]
    if len(parts) == 1 and "=" not in parts[0]:
        if len(recipe.fields) != 1:
            raise UsageError(
                f"--text-field {text_field!r}: task {recipe.name} has several text fields "
                f"({', '.join(recipe.fields)})",
                hint=f"name each: --text-field {recipe.fields[0]}=COLUMN,{recipe.fields[1]}=COLUMN",
            )
        return {recipe.fields[0]: parts[0]}
    for p in parts:
        if "=" not in p:
            raise UsageError(f"--text-field: {p!r} is not FIELD=COLUMN")
        k, v = (s.strip() for s in p.split("=", 1))
        if k not in recipe.fields:
            raise UsageError(f"--text-field: task {recipe.name} has no field {k!r} (fields: {', '.join(recipe.fields)})")
        mapping[k] = v
    return mapping


def parse_label_map(spec: str | None) -> dict[str, str]:
    """--label-map "-1=negative,1=positive" -> {"-1": "negative", "1": "positive"}."""
    if not spec:
        return {}
    out: dict[str, str] = {}
    for p in spec.split(","):
        p = p.strip()
        if not p:
            continue
        if "=" not in p:
            raise UsageError(f"--label-map: {p!r} is not VALUE=CHOICE")
        k, v = p.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8-sig") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidInputError(f"{path}: line {n} is not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise InvalidInputError(f"{path}: line {n} is not a JSON object")
            rows.append(obj)
    return rows


def _read_json(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8-sig")
    stripped = text.lstrip()
    if not stripped.startswith("["):
        return _read_jsonl(path)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"{path}: not valid JSON ({exc.msg})") from None
    if not all(isinstance(r, dict) for r in doc):
        raise InvalidInputError(f"{path}: expected a JSON array of objects")
    return doc


def _read_csv(path: Path, needed: list[str]) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8-sig", newline="") as fh:
        records = list(csv.reader(fh))
    if not records:
        return []
    header = records[0]
    if needed and all(n.isdigit() for n in needed):
        body = records  # fields named by position: the file has no header row
        names = [str(i) for i in range(max(len(r) for r in records))]
    else:
        body = records[1:]
        names = header
    rows = []
    for n, rec in enumerate(body, 2 if names is header else 1):
        if not any(c.strip() for c in rec):
            continue
        if len(rec) != len(names):
            raise InvalidInputError(f"{path}: line {n} has {len(rec)} columns, expected {len(names)}")
        rows.append(dict(zip(names, rec)))
    return rows


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PortllmError("reading Parquet needs pyarrow", hint="pip install 'portllm-cli[data]'") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises its own ArrowInvalid hierarchy
        raise InvalidInputError(f"{path}: not a readable Parquet file ({exc})") from None


def _read_text(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InvalidInputError(f"{path}: not UTF-8 text") from None
    return [{"text": text}] if text.strip() else []


def read_records(path: Path, needed: list[str] | None = None) -> list[dict[str, Any]]:
    """Raw records of a local data file (no recipe applied)."""
    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"{path}: no such data file")
    if path.is_dir():
        raise InvalidInputError(f"{path}: is a directory, expected a data file (JSONL, CSV, Parquet or .txt)")
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            return _read_jsonl(path)
        if suffix == ".json":
            return _read_json(path)
        if suffix in (".csv", ".tsv"):
            return _read_csv(path, needed or [])
        if suffix in (".parquet", ".pq"):
            return _read_parquet(path)
        if suffix in (".txt", ".text", ".md", ".rst"):
            return _read_text(path)
    except PermissionError:
        raise InvalidInputError(f"{path}: cannot be read (permission denied)") from None
    except UnicodeDecodeError:
        raise InvalidInputError(f"{path}: not UTF-8 text") from None
    except IsADirectoryError:
        raise InvalidInputError(f"{path}: is a directory") from None
    raise InvalidInputError(
        f"{path}: unknown data format {suffix or '(no suffix)'!r}",
        hint="use .jsonl, .json, .csv, .parquet, or .txt for --task text",
    )


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def normalise_rows(
    recipe: Recipe,
    records: list[dict[str, Any]],
    where: str,
    *,
    text_field: str | None = None,
    label_field: str | None = None,
    label_map: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Apply field renames and label mapping; validate every row; return rows in recipe names."""
    fmap = parse_field_map(recipe, text_field)
    src_fields = {f: fmap.get(f, f) for f in recipe.fields}
    src_label = (label_field or recipe.label_field) if recipe.label_field else None
    if label_field and not recipe.label_field:
        raise UsageError(f"--label-field: task {recipe.name} has no labels")
    label_map = label_map or {}
    rows = []
    for i, rec in enumerate(records):
        row_no = i + 1
        row: dict[str, Any] = {}
        for f, src in src_fields.items():
            if src not in rec:
                have = ", ".join(map(str, list(rec)[:8]))
                raise InvalidInputError(
                    f"{where}: row {row_no} has no field {src!r} (it has: {have})",
                    hint="map your column with --text-field" if recipe.kind != "text" else None,
                )
            v = rec[src]
            if _is_missing(v):
                raise InvalidInputError(f"{where}: row {row_no}: field {src!r} is empty")
            if not isinstance(v, str):
                raise InvalidInputError(f"{where}: row {row_no}: field {src!r} is {type(v).__name__}, expected text")
            row[f] = v
        if src_label is not None:
            if src_label not in rec:
                have = ", ".join(map(str, list(rec)[:8]))
                raise InvalidInputError(
                    f"{where}: row {row_no} has no label field {src_label!r} (it has: {have})",
                    hint="name it with --label-field",
                )
            v = rec[src_label]
            if label_map:
                key = str(int(v)) if isinstance(v, float) and v.is_integer() else str(v).strip()
                if key in label_map:
                    v = label_map[key]
            idx = recipe.label_index(v, f"{where}: row {row_no}")
            row[recipe.label_field] = idx + recipe.label_base  # type: ignore[index]
        rows.append(row)
    return rows


def _hub_offline() -> bool:
    flags = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(f, "").strip().lower() in ("1", "true", "yes", "on") for f in flags)


def _hub_split(recipe: Recipe, split: str) -> str:
    """"train" and "eval" name the recipe's own splits; anything else is a Hub split name."""
    return {"train": recipe.train_split, "eval": recipe.eval_split}.get(split, split)


def read_examples(recipe: "Recipe", rows: list[Any], where: Any) -> list["Example"]:
    """Every row through the recipe; a row that does not fit is one InvalidInputError naming it
    (rows counted from 1, as in the file)."""
    examples = []
    for i, row in enumerate(rows, start=1):
        try:
            examples.append(recipe.example(row))
        except PortllmError:
            raise
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise InvalidInputError(f"{where}: row {i}: cannot be read as a {recipe.name} example ({exc})") from None
    return examples


def load_rows(
    recipe: Recipe,
    data: Path | None,
    *,
    split: str = "train",
    text_field: str | None = None,
    label_field: str | None = None,
    label_map: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Rows for a recipe, keyed by the recipe's field names, labels validated.

    Labels come back as ints in the dataset's own convention (choice index + ``label_base``:
    0/1 for the GLUE tasks, 1/2 for WinoGrande), so ``recipe.example(row)`` reads Hub rows and
    local rows alike.

    ``data`` is a local file (JSONL, JSON, CSV, Parquet; ``.txt`` for ``text``). With ``data=None``
    the recipe's Hub dataset is loaded through ``datasets`` (``split`` "train", "eval" or a split
    name); offline, a PortllmError says to pass ``--data FILE``.
    """
    if data is not None:
        data = Path(data)
        needed = [parse_field_map(recipe, text_field).get(f, f) for f in recipe.fields]
        if recipe.label_field:
            needed.append(label_field or recipe.label_field)
        records = read_records(data, needed)
        if data.suffix.lower() in (".txt", ".text", ".md", ".rst") and recipe.kind != "text":
            raise InvalidInputError(f"{data}: plain text is data for --task text only; task {recipe.name} needs JSONL, CSV or Parquet")
        if not records:
            raise InvalidInputError(f"{data}: the dataset is empty")
        return normalise_rows(recipe, records, str(data), text_field=text_field, label_field=label_field,
                              label_map=label_map)
    fields_hint = ", ".join(recipe.fields + ((recipe.label_field,) if recipe.label_field else ()))
    if recipe.hub_dataset is None:
        raise UsageError(
            f"task {recipe.name} has no Hub dataset; pass --data FILE",
            hint=f"a JSONL, CSV or Parquet file with fields {fields_hint}" if recipe.kind != "text"
            else "a plain-text .txt file, or JSONL with a 'text' field",
        )
    hint = f"pass --data FILE: a JSONL, CSV or Parquet file with fields {fields_hint}"
    if _hub_offline():
        raise HubError(f"the Hub is offline (HF_HUB_OFFLINE is set); cannot load dataset {recipe.hub_dataset}", hint=hint)
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise HubError(f"loading {recipe.hub_dataset} from the Hub needs the 'datasets' package", hint=hint) from None
    hub_split = _hub_split(recipe, split)
    try:
        ds = datasets.load_dataset(recipe.hub_dataset, recipe.hub_config, split=hub_split)
    except Exception as exc:  # datasets raises many types for network trouble
        raise HubError(
            f"cannot load dataset {recipe.hub_dataset} ({recipe.hub_config}, split {hub_split}) from the Hub: "
            f"{exc.__class__.__name__}",
            hint=hint,
        ) from None
    records = [dict(r) for r in ds]
    if not records:
        raise InvalidInputError(f"{recipe.hub_dataset}: split {hub_split} is empty")
    return normalise_rows(recipe, records, f"{recipe.hub_dataset}:{hub_split}", label_field=label_field,
                          text_field=text_field, label_map=label_map)


def data_fingerprint(path: Path, rows: int | None = None) -> dict[str, Any]:
    """{"path", "sha256", "rows"} of a local data file (rows counted as records when not given)."""
    path = Path(path)
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while block := fh.read(8 << 20):
                h.update(block)
    except FileNotFoundError:
        raise NotFoundError(f"{path}: no such data file") from None
    if rows is None:
        rows = len(read_records(path))
    return {"path": str(path.resolve()), "sha256": h.hexdigest(), "rows": rows}
