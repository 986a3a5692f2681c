"""Score base, evolved and patched models on the same tasks with lm-evaluation-harness, in one process.

Each model is loaded once. A patch is merged into the loaded weights in memory
(W' = (W.float() + scale * B @ A).to(W.dtype), exactly what ``portllm port`` writes), the model is
scored through lm-eval's Python API (``simple_evaluate`` with an ``HFLM`` wrapping the live
model), and the original tensors are copied back: only the targeted weights are kept aside, and
the restored weights are checked bitwise against those copies before the next configuration.

Local data (``--data sst2=reviews.jsonl``) goes through the same recipes as ``portllm finetune``
(portllm_cli.core.tasks): the rows become a normalized JSONL file and an lm-eval task YAML with
absolute paths in a temporary directory, loaded by a TaskManager that does not index lm-eval's
14,000 built-in tasks unless a built-in task was asked for. Local tasks are scored offline
(HF_HUB_OFFLINE, HF_DATASETS_OFFLINE); a built-in task loads its data with ``datasets`` from the
Hub (or HF_ENDPOINT) or its cache, as the environment allows, even in a run that mixes the two.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from portllm_cli.core.progress import ProgressFn, no_progress
from portllm_cli.errors import (
    IncompatibleError,
    InvalidInputError,
    NotFoundError,
    PortllmError,
    UsageError,
)

if TYPE_CHECKING:
    import torch

LOCAL_PREFIX = "portllm_"  # lm-eval name of a local task: portllm_<task>
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
# The metric a task's column shows, in order of preference (lm-eval "metric,filter" keys).
PRIMARY_METRICS = ("acc,none", "exact_match,strict-match", "exact_match,none", "exact_match,flexible-extract",
                   "acc_norm,none", "f1,none", "mcc,none")
GSM8K_STRICT = r"#### (\-?[0-9\.\,]+)"
GSM8K_FLEXIBLE = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"


# -- results ----------------------------------------------------------------------------------
@dataclass
class ConfigResult:
    model: str  # the --model spec as typed
    patch: str | None  # the --patch spec as typed, None for the model alone
    scores: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> {metric, value, stderr, n}
    lm_eval_results: dict[str, Any] = field(default_factory=dict)  # task -> lm-eval's own structure
    # task -> lm-eval's per-example records (only with log samples; not part of the JSON document)
    samples: dict[str, list[Any]] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return config_name(self.model, self.patch)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.model,
            "patch": self.patch,
            "scores": self.scores,
            "lm_eval": self.lm_eval_results,
        }


@dataclass
class Gain:
    model: str
    patch: str
    task: str
    metric: str
    base: float | None
    patched: float | None

    @property
    def gain(self) -> float | None:
        if self.base is None or self.patched is None:
            return None
        return self.patched - self.base

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "patch": self.patch, "task": self.task, "metric": self.metric,
                "base": self.base, "patched": self.patched, "gain": self.gain}


@dataclass
class EvalReport:
    rows: list[ConfigResult]
    gains: list[Gain]
    tasks: list[str]
    skipped: list[dict[str, str]] = field(default_factory=list)  # {model, patch, reason}
    settings: dict[str, Any] = field(default_factory=dict)
    log_samples_dir: Path | None = None
    elapsed_s: float = 0.0

    def best(self, task: str) -> list[str]:
        """Names of the best configurations on a task (the highest value; several on a tie)."""
        vals = {r.name: r.scores.get(task, {}).get("value") for r in self.rows}
        top = max((v for v in vals.values() if v is not None), default=None)
        return [] if top is None else [n for n, v in vals.items() if v == top]

    def as_dict(self) -> dict[str, Any]:
        return {
            "tasks": self.tasks,
            "configurations": [r.as_dict() for r in self.rows],
            "gains": [g.as_dict() for g in self.gains],
            "best": {t: self.best(t) for t in self.tasks},
            "skipped": self.skipped,
            "settings": self.settings,
            "log_samples": str(self.log_samples_dir) if self.log_samples_dir else None,
            "elapsed_s": round(self.elapsed_s, 3),
        }


def config_name(model: str, patch: str | None) -> str:
    return model if patch is None else f"{model}+{patch}"


# -- argument checks --------------------------------------------------------------------------
def parse_batch_size(value: str | int) -> int | str:
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif str(value).strip().lower() == "auto":
        return "auto"
    else:
        try:
            n = int(str(value))
        except ValueError:
            raise UsageError(f"--batch-size must be a positive integer or 'auto', got {value!r}") from None
    if n < 1:
        raise UsageError(f"--batch-size must be at least 1, got {n}")
    return n


def parse_data_specs(specs: list[str]) -> tuple[dict[str, Path], Path | None]:
    """``TASK=PATH`` pairs, plus at most one bare directory holding files named by task."""
    data: dict[str, Path] = {}
    directory: Path | None = None
    for spec in specs:
        if "=" in spec:
            task, _, path = spec.partition("=")
            task = task.strip()
            if not task or not path:
                raise UsageError(f"--data {spec!r}: expected TASK=PATH")
            if task in data:
                raise UsageError(f"--data names task {task!r} twice")
            data[task] = Path(os.path.expanduser(path))
        else:
            if directory is not None:
                raise UsageError("--data: give at most one directory without TASK= (files inside are named by task)")
            directory = Path(os.path.expanduser(spec))
            if not directory.is_dir():
                raise NotFoundError(f"--data {spec}: no such directory (use TASK=PATH for a single file)")
    return data, directory


def _check_args(tasks: list[str], limit: Any, num_fewshot: Any, batch_size: Any) -> tuple[list[str], int | str]:
    clean = []
    for t in tasks:
        t = t.strip()
        if t and t not in clean:
            clean.append(t)
    if not clean:
        raise UsageError("--tasks is empty", hint="name at least one task, e.g. --tasks sst2")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UsageError(f"--limit must be a positive number of examples, got {limit!r}")
    if num_fewshot is not None and (isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int)
                                    or num_fewshot < 0):
        raise UsageError(f"--num-fewshot must be 0 or more, got {num_fewshot!r}")
    return clean, parse_batch_size(batch_size)


# -- configurations ---------------------------------------------------------------------------
@dataclass
class _Model:
    spec: str
    path: Path
    ckpt: Any


@dataclass
class _Patch:
    spec: str
    patch: Any  # portllm_cli.patch.format.Patch, converted (core.plan.prepare_patch)
    old: Any = None  # the old base, when the patch needs it (core.plan.OldBase)


@dataclass
class _Config:
    model: _Model
    patch: _Patch | None
    key_map: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return config_name(self.model.spec, self.patch.spec if self.patch else None)


def plan_configurations(
    models: list[_Model], patches: list[_Patch], only: list[str] | None
) -> tuple[list[_Config], list[dict[str, str]]]:
    """Each model alone, then each model with each patch that fits it; --only keeps exact names."""
    from portllm_cli.core.compat import check_compatibility

    configs: list[_Config] = []
    skipped: list[dict[str, str]] = []
    fits_any: dict[str, list[str]] = {p.spec: [] for p in patches}
    for m in models:
        configs.append(_Config(m, None))
        for p in patches:
            rep = check_compatibility(p.patch, m.ckpt)
            if rep.compatible:
                configs.append(_Config(m, p, dict(rep.key_map)))
            else:
                reason = rep.errors[0] + (f" (and {len(rep.errors) - 1} more)" if len(rep.errors) > 1 else "")
                skipped.append({"model": m.spec, "patch": p.spec, "reason": reason})
                fits_any[p.spec].append(reason)
    for p in patches:
        if not any(c.patch is p for c in configs):
            raise IncompatibleError(
                f"patch {p.spec} fits none of the models: {fits_any[p.spec][0]}",
                hint="run 'portllm diff PATCH MODEL' for the full report",
            )
    if only:
        names = {c.name: c for c in configs}
        skipped_names = {config_name(s["model"], s["patch"]): s for s in skipped}
        kept = []
        for spec in only:
            if spec in names:
                if names[spec] not in kept:
                    kept.append(names[spec])
            elif spec in skipped_names:
                s = skipped_names[spec]
                raise IncompatibleError(f"--only {spec}: the patch does not fit the model: {s['reason']}")
            else:
                close = difflib.get_close_matches(spec, list(names), n=3, cutoff=0.4)
                raise UsageError(
                    f"--only {spec!r} names no configuration"
                    + (f"; did you mean {', '.join(close)}?" if close else ""),
                    hint="configurations are MODEL or MODEL+PATCH, spelled as given to --model and --patch: "
                    + ", ".join(names),
                )
        order = {id(c): i for i, c in enumerate(configs)}
        configs = sorted(kept, key=lambda c: order[id(c)])
    return configs, skipped


# -- tasks ------------------------------------------------------------------------------------
@dataclass
class LocalTask:
    """A task read from a local file through a recipe, as lm-eval will see it."""

    name: str  # as the user typed it
    kind: str  # "choice", "multi" (several contexts, one continuation) or "generate"
    docs: list[dict[str, Any]]
    source: Path
    answer_regex: bool = False  # gsm8k-style "#### N" answers

    @property
    def lm_name(self) -> str:
        return LOCAL_PREFIX + re.sub(r"[^A-Za-z0-9_]", "_", self.name)

    @property
    def metric_key(self) -> str:
        if self.kind == "generate":
            return "exact_match,strict-match" if self.answer_regex else "exact_match,none"
        return "acc,none"


def docs_from_examples(examples: list[Any], *, where: str) -> tuple[str, list[dict[str, Any]], bool]:
    """Normalize recipe Examples (prompt, choices, label, target, prompts) to lm-eval docs."""
    if not examples:
        raise InvalidInputError(f"{where}: no examples to evaluate")
    docs: list[dict[str, Any]] = []
    kinds = set()
    answer_regex = False
    for i, ex in enumerate(examples):
        prompts = getattr(ex, "prompts", None)
        if prompts:
            kinds.add("multi")
            if ex.label is None or not 0 <= int(ex.label) < len(prompts):
                raise InvalidInputError(
                    f"{where}: example {i}: label {ex.label!r} does not index its {len(prompts)} contexts")
            docs.append({"contexts": list(prompts), "gold": int(ex.label), "continuation": ex.target})
        elif ex.choices:
            kinds.add("choice")
            if ex.label is None or not 0 <= int(ex.label) < len(ex.choices):
                raise InvalidInputError(
                    f"{where}: example {i}: label {ex.label!r} does not index its {len(ex.choices)} choices")
            docs.append({"query": ex.prompt, "choices": list(ex.choices), "gold": int(ex.label)})
        else:
            kinds.add("generate")
            target = str(ex.target)
            if "####" in target:
                answer_regex = True
            docs.append({"query": ex.prompt, "answer": target})
    if len(kinds) != 1:
        raise InvalidInputError(f"{where}: examples mix task kinds {sorted(kinds)}")
    return kinds.pop(), docs, answer_regex


def task_yaml(task: LocalTask, data_file: Path) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "task": task.lm_name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file.resolve())}},
        "test_split": "test",
    }
    if task.kind in ("choice", "multi"):
        cfg["output_type"] = "multiple_choice"
        if task.kind == "choice":
            cfg.update(doc_to_text="query", doc_to_choice="choices", doc_to_target="gold")
        else:
            # lm-eval's "multiple input" form (as winogrande): doc_to_text gives the gold index,
            # doc_to_choice the contexts, doc_to_target the shared continuation.
            cfg.update(doc_to_text="gold", doc_to_choice="contexts", doc_to_target="continuation")
        # the recipe's continuations already carry their leading space
        cfg["target_delimiter"] = ""
        cfg["metric_list"] = [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ]
    else:
        # the target keeps the recipe's leading delimiter, so few-shot examples read as lm-eval's do
        cfg.update(output_type="generate_until", doc_to_text="query", doc_to_target="answer", target_delimiter="")
        em = {"metric": "exact_match", "aggregation": "mean", "higher_is_better": True, "ignore_case": True,
              "ignore_punctuation": False}
        if task.answer_regex:
            # lm_eval/tasks/gsm8k/gsm8k.yaml: the reference is reduced to the number after '#### '
            em["regexes_to_ignore"] = [",", "\\$", "(?s).*#### ", "\\.$", "^\\s+", "\\s+$"]
            cfg["generation_kwargs"] = {"until": ["Question:", "</s>", "<|im_end|>"], "do_sample": False,
                                        "temperature": 0.0}
            cfg["filter_list"] = [
                {"name": "strict-match", "filter": [{"function": "regex", "regex_pattern": GSM8K_STRICT},
                                                    {"function": "take_first"}]},
                {"name": "flexible-extract", "filter": [{"function": "regex", "group_select": -1,
                                                         "regex_pattern": GSM8K_FLEXIBLE},
                                                        {"function": "take_first"}]},
            ]
        else:
            em["regexes_to_ignore"] = ["^\\s+", "\\s+$"]
            cfg["generation_kwargs"] = {"until": ["\n"], "do_sample": False, "temperature": 0.0, "max_gen_toks": 128}
        cfg["metric_list"] = [em]
    cfg["metadata"] = {"version": 1.0, "source": str(task.source.resolve())}
    return cfg


def write_local_tasks(tasks: list[LocalTask], directory: Path) -> dict[str, Path]:
    """Write each task's docs as JSONL and its lm-eval YAML into ``directory``; returns YAML paths."""
    import yaml

    out = {}
    for t in tasks:
        data_file = directory / f"{t.lm_name}.jsonl"
        with open(data_file, "w", encoding="utf-8") as fh:
            for d in t.docs:
                fh.write(json.dumps(d, ensure_ascii=False) + "\n")
        yml = directory / f"{t.lm_name}.yaml"
        yml.write_text(yaml.safe_dump(task_yaml(t, data_file), sort_keys=False, allow_unicode=True))
        out[t.name] = yml
    return out


def _find_task_file(directory: Path, task: str) -> Path:
    hits = [directory / f"{task}{s}" for s in DATA_SUFFIXES if (directory / f"{task}{s}").is_file()]
    if (directory / task).is_dir():
        hits.append(directory / task)
    if not hits:
        raise NotFoundError(
            f"--data {directory}: no file for task {task!r} (looked for {task}.jsonl, .json, .csv, .tsv, .parquet)"
        )
    if len(hits) > 1:
        raise UsageError(f"--data {directory}: several files for task {task!r}: {', '.join(p.name for p in hits)}",
                         hint=f"name one with --data {task}=PATH")
    return hits[0]


def load_local_task(name: str, path: Path) -> LocalTask:
    """Rows of a local file -> recipe Examples -> lm-eval docs."""
    from portllm_cli.core import tasks as recipes

    if not path.exists():
        raise NotFoundError(f"--data {name}={path}: no such file or directory")
    recipe = recipes.get_recipe(name)
    if recipe.kind not in ("choice", "generate", "completion"):
        raise UsageError(f"task {name}: a {recipe.kind} recipe has no answers to score",
                         hint="evaluate a choice task (sst2, boolq, ...) or a generation task (gsm8k)")
    rows = recipes.load_rows(recipe, path, split="eval")
    examples = []
    for i, row in enumerate(rows):
        try:
            examples.append(recipe.example(row))
        except PortllmError:
            raise
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise InvalidInputError(f"{path}: row {i}: cannot be read as a {name} example ({exc})") from None
    kind, docs, answer_regex = docs_from_examples(examples, where=str(path))
    return LocalTask(name, kind, docs, path, answer_regex)


@dataclass
class TaskPlan:
    names: list[str]  # as typed
    lm_names: dict[str, str]  # typed -> lm-eval task name
    local: dict[str, LocalTask]
    task_manager: Any
    include_dir: Path

    @property
    def all_local(self) -> bool:
        """Every task reads local data: nothing in the run needs the Hub."""
        return all(t in self.local for t in self.names)


def _builtin_name(task: str) -> str:
    """A recipe name maps to the lm-eval task it mirrors (sst2 -> sst2, ...); others pass through."""
    from portllm_cli.core import tasks as recipes

    if task in recipes.recipe_names():
        return recipes.get_recipe(task).lm_eval_task or task
    return task


def plan_tasks(tasks: list[str], data: dict[str, Path], data_dir: Path | None, include_dir: Path) -> TaskPlan:
    for t in data:
        if t not in tasks:
            raise UsageError(f"--data names task {t!r}, which is not in --tasks ({', '.join(tasks)})")
    local: dict[str, LocalTask] = {}
    for t in tasks:
        path = data.get(t)
        if path is None and data_dir is not None:
            path = _find_task_file(data_dir, t)
        if path is not None:
            local[t] = load_local_task(t, path)
    write_local_tasks(list(local.values()), include_dir)
    builtin = [t for t in tasks if t not in local]

    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(include_dir), include_defaults=bool(builtin))
    lm_names: dict[str, str] = {}
    for t in tasks:
        if t in local:
            lm_names[t] = local[t].lm_name
            continue
        name = _builtin_name(t)
        if name not in tm.all_tasks:
            from portllm_cli.core import tasks as recipes

            pool = sorted(set(tm.all_tasks) | set(recipes.recipe_names()))
            close = difflib.get_close_matches(t, pool, n=5, cutoff=0.6)
            raise UsageError(
                f"unknown task {t!r}" + (f"; close matches: {', '.join(close)}" if close else ""),
                hint="use an lm-eval task name, or a recipe name with local data: --data TASK=PATH",
            )
        lm_names[t] = name
    return TaskPlan(tasks, lm_names, local, tm, include_dir)


# -- models -----------------------------------------------------------------------------------
def load_model(path: Path, *, dtype: str, device: str, trust_remote_code: bool, allow_pickle: bool) -> tuple[Any, Any]:
    """The model (eval mode, on ``device``) and its tokenizer, loaded as finetune and demo load them."""
    from portllm_cli.core.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(path, trust_remote_code=trust_remote_code)
    model = load_causal_lm(path, dtype, device, trust_remote_code, allow_pickle=allow_pickle)
    return model, tok


@contextlib.contextmanager
def patched(model: Any, patch: Any, key_map: dict[str, str] | None = None, *, old: Any = None,
            policy: Any = None) -> Iterator[dict[str, "torch.Tensor"]]:
    """Merge a patch into the live weights; on exit copy the originals back and check them bitwise.

    What changes is planned on the loaded model itself (``core.plan`` over ``Layout.live``), so
    this is the same merge as ``portllm port`` for every part of the patch (DoRA, biases, whole
    tensors, experts). Weights that share memory (tied) are changed and restored once.
    ``key_map`` is accepted for callers of the old signature and not needed.
    """
    import torch

    from portllm_cli.core.layout import Layout
    from portllm_cli.core.merge import Workspace, merge_in_place
    from portllm_cli.core.plan import build_plan

    plan = build_plan(patch, Layout.live(model), policy=policy, old=old)
    params = dict(model.state_dict(keep_vars=True))
    saved: dict[int, tuple[str, Any, torch.Tensor]] = {}  # storage address -> (name, param, original)
    ws = Workspace()
    try:
        with torch.no_grad():
            for key, edits in plan.edits.items():
                name, _, expert = key.partition("[")
                p = params[name]
                saved.setdefault(p.data_ptr(), (name, p, p.detach().clone()))
                target = p.data[int(expert[:-1])] if expert else p.data
                merge_in_place(target, edits, ws)  # the same merge as `portllm port`
        yield {name: orig for name, _, orig in saved.values()}
    finally:
        with torch.no_grad():
            for _, p, orig in saved.values():
                p.copy_(orig)
        bad = [name for name, p, orig in saved.values() if not torch.equal(p, orig)]
        if bad:  # later rows would be scored on the wrong weights
            raise PortllmError(f"internal error: {len(bad)} weights were not restored bitwise after a patch ({bad[0]})")


# -- lm-eval ----------------------------------------------------------------------------------
@contextlib.contextmanager
def _env(updates: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _offline_modules(enabled: bool) -> Iterator[None]:
    """The offline switches are read at import time; flip the already-imported copies too."""
    import sys

    flips: list[tuple[Any, str, Any]] = []
    if enabled:
        for mod, attr in (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"),
                          ("datasets.config", "HF_DATASETS_OFFLINE")):
            m = sys.modules.get(mod)
            if m is not None and hasattr(m, attr):
                flips.append((m, attr, getattr(m, attr)))
                setattr(m, attr, True)
    try:
        yield
    finally:
        for m, attr, v in flips:
            setattr(m, attr, v)


@contextlib.contextmanager
def _offline(enabled: bool) -> Iterator[None]:
    """HF_HUB_OFFLINE and HF_DATASETS_OFFLINE, in the environment and in the imported modules."""
    with _env(_offline_vars(enabled)), _offline_modules(enabled):
        yield


def _plan_offline(stack: contextlib.ExitStack, tasks: list[str], data: dict[str, Path],
                  data_dir: Path | None, tmp: Path) -> TaskPlan:
    """plan_tasks, then offline for the rest of ``stack`` when no task needs the Hub (otherwise per
    task, in run_tasks). Not before plan_tasks: datasets (imported there, through lm-eval) reads the
    switches at import, and must see the user's own settings for a built-in task later on."""
    plan = plan_tasks(tasks, data, data_dir, tmp)
    stack.enter_context(_offline(plan.all_local))
    return plan


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval logs at INFO, draws tqdm bars and shells out to `git describe` in the cwd on every
    call: keep all of that off the user's terminal (our own progress bar and table say it).

    It also prints (``bootstrapping for stddev: f1_score`` for mrpc's f1, among others): stdout is
    for portllm's result (one JSON document under --json), so anything printed goes to stderr."""
    import lm_eval.evaluator as ev

    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval", "datasets", "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    old_hash = ev.get_git_commit_hash
    ev.get_git_commit_hash = lambda: None  # the cwd's repo is not the evaluated code
    # add_env_info shells out to pip and friends (about a second) on every call; it cannot change
    # within a run, so collect it once and copy it into each result.
    old_env_info = ev.add_env_info
    env_cache: dict[str, Any] = {}

    def cached_env_info(storage: dict[str, Any]) -> None:
        if not env_cache:
            probe: dict[str, Any] = {}
            old_env_info(probe)
            env_cache.update(probe)
        storage.update(env_cache)

    ev.add_env_info = cached_env_info
    # lm-eval passes disable=False to its tqdm bars explicitly, so TQDM_DISABLE cannot reach them.
    # Its bootstrap (stderr of f1, mcc ...) imports tqdm when it runs: swap the package's too.
    import sys

    from tqdm.std import tqdm as _tqdm

    from portllm_cli.core.progress import silenced_tqdm

    silent_tqdm = silenced_tqdm(_tqdm)
    swapped = []
    for name, mod in list(sys.modules.items()):
        cls = getattr(mod, "tqdm", None) if name.startswith("lm_eval") or name == "tqdm" else None
        if isinstance(cls, type) and issubclass(cls, _tqdm):
            swapped.append((mod, cls))
            mod.tqdm = silent_tqdm
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        ev.get_git_commit_hash = old_hash
        ev.add_env_info = old_env_info
        for mod, cls in swapped:
            mod.tqdm = cls
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def _num(v: Any) -> float | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
        return float(v)
    return None


def primary_score(task_results: dict[str, Any], preferred: str | None = None) -> dict[str, Any]:
    keys = ([preferred] if preferred else []) + list(PRIMARY_METRICS)
    for key in keys:
        if key in task_results and _num(task_results[key]) is not None:
            break
    else:
        numeric = [k for k, v in task_results.items() if "," in k and "_stderr" not in k and _num(v) is not None]
        if not numeric:
            return {"metric": None, "value": None, "stderr": None}
        key = numeric[0]
    metric, _, filt = key.partition(",")
    stderr = _num(task_results.get(f"{metric}_stderr,{filt}"))
    out = {"metric": metric if filt == "none" else f"{metric} ({filt})", "value": _num(task_results[key]),
           "stderr": stderr}
    return out


def _jsonable(obj: Any) -> Any:
    """lm-eval's structures hold tuples, numpy scalars and callables: make them plain JSON."""
    return json.loads(json.dumps(obj, default=_default))


def _default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:
        pass
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    return repr(o)


def _task_section(res: dict[str, Any], lm_name: str) -> dict[str, Any]:
    results = res.get("results", {})
    section = results.get(lm_name)
    if section is None:  # a group: report its first subtask
        subs = (res.get("group_subtasks") or {}).get(lm_name) or list(results)
        section = results.get(subs[0], {}) if subs else {}
    return {
        "results": section,
        "n-shot": (res.get("n-shot") or {}).get(lm_name),
        "n-samples": (res.get("n-samples") or {}).get(lm_name),
        "versions": (res.get("versions") or {}).get(lm_name),
        "higher_is_better": (res.get("higher_is_better") or {}).get(lm_name),
        "config": (res.get("configs") or {}).get(lm_name),
        "lm_eval_version": res.get("lm_eval_version"),
    }


def _data_error(task: str, exc: BaseException) -> PortllmError:
    first = " ".join(str(exc).split())[:240]
    return NotFoundError(
        f"task {task}: lm-eval could not load its data ({exc.__class__.__name__}: {first})",
        hint=f"the Hub is probably unreachable; pass local data with --data {task}=PATH",
    )


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")[:80] or "config"


def run_tasks(
    lm: Any,
    plan: TaskPlan,
    *,
    limit: int | None,
    num_fewshot: int | None,
    log_samples: bool,
    on_task: Any = None,
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]], dict[str, list[Any]]]:
    """Score one live model on every task of the plan; returns (scores, lm-eval sections, samples)."""
    from lm_eval import simple_evaluate

    scores: dict[str, dict[str, Any]] = {}
    sections: dict[str, dict[str, Any]] = {}
    samples: dict[str, list[Any]] = {}
    half_window = max(1, int(lm.max_length) // 2)
    for t in plan.names:
        lm_name = plan.lm_names[t]
        local = plan.local.get(t)
        gen_kwargs = None
        if local is not None and local.kind == "generate":
            # lm-eval's default of 256 new tokens does not fit small context windows
            gen_kwargs = {"max_gen_toks": min(256, half_window)}
        elif local is None and half_window < 256:
            # The same cap for a built-in task (lm-eval applies gen_kwargs to generation tasks only):
            # HFLM refuses to generate as many tokens as the model's window holds.
            gen_kwargs = {"max_gen_toks": half_window}
        try:
            # A local task reads its generated file offline; a built-in task loads its data with
            # `datasets`, from the Hub (HF_ENDPOINT) or its cache, as the environment allows.
            with _offline(local is not None):
                res = simple_evaluate(
                    model=lm,
                    tasks=[lm_name],
                    task_manager=plan.task_manager,
                    limit=limit,
                    num_fewshot=num_fewshot,
                    log_samples=log_samples,
                    gen_kwargs=gen_kwargs,
                )
        except (ConnectionError, OSError, TimeoutError) as exc:
            raise _data_error(t, exc) from None
        except Exception as exc:
            mod = type(exc).__module__ or ""
            if t not in plan.local and mod.startswith(("datasets", "huggingface_hub", "requests", "httpx", "urllib3")):
                raise _data_error(t, exc) from None
            raise
        section = _task_section(res, lm_name)
        preferred = plan.local[t].metric_key if t in plan.local else None
        score = primary_score(section["results"] or {}, preferred)
        score["n"] = section["n-samples"]["effective"] if isinstance(section.get("n-samples"), dict) else None
        scores[t] = score
        sections[t] = _jsonable(section)
        if log_samples:
            samples[t] = (res.get("samples") or {}).get(lm_name, [])
        if on_task is not None:
            on_task(t)
    return scores, sections, samples


def _write_samples(directory: Path, index: int, name: str, samples: dict[str, list[Any]]) -> None:
    d = directory / f"{index:02d}-{_slug(name)}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "configuration.txt").write_text(name + "\n", encoding="utf-8")
    for task, rows in samples.items():
        with open(d / f"{_slug(task)}.jsonl", "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, default=_default, ensure_ascii=False) + "\n")


def _gains(rows: list[ConfigResult], tasks: list[str]) -> list[Gain]:
    base = {r.model: r for r in rows if r.patch is None}
    out = []
    for r in rows:
        if r.patch is None or r.model not in base:
            continue
        for t in tasks:
            s = r.scores.get(t, {})
            b = base[r.model].scores.get(t, {})
            out.append(Gain(r.model, r.patch, t, s.get("metric") or "", b.get("value"), s.get("value")))
    return out


# -- the entry points -------------------------------------------------------------------------
def evaluate_loaded(
    model_obj: Any,
    tokenizer: Any,
    tasks: list[str],
    *,
    data: dict[str, Path] | None = None,
    patches: list[tuple[str, Any, dict[str, str] | None]] | None = None,
    model_name: str = "model",
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int | str = 8,
    log_samples: bool = False,
    progress: ProgressFn | None = None,
) -> list[ConfigResult]:
    """Score a model already in memory, alone and with each (name, Patch, key_map) merged in turn.

    ``key_map`` (patch module -> weight name, from check_compatibility) may be None: the module's
    own ``<module>.weight`` parameter is used then.

    For callers that hold the model (the demo). Local tasks only need ``data``; any other task name
    must be an lm-eval task whose data is reachable.
    """
    tasks, bs = _check_args(list(tasks), limit, num_fewshot, batch_size)
    data = dict(data or {})
    with tempfile.TemporaryDirectory(prefix="portllm-eval-") as tmp, contextlib.ExitStack() as stack:
        plan = _plan_offline(stack, tasks, data, None, Path(tmp))
        from lm_eval.models.huggingface import HFLM

        with _quiet_lm_eval():
            lm = HFLM(pretrained=model_obj, tokenizer=tokenizer, batch_size=bs)
            rows = []
            todo = [(None, None, {})] + [(n, p, km) for n, p, km in (patches or [])]
            total = len(todo) * len(tasks)
            done = 0
            report = progress or no_progress
            for pname, patch, key_map in todo:
                if patch is not None and not key_map:
                    key_map = {m: f"{m}.weight" for m in patch.modules}
                ctx = patched(model_obj, patch, key_map) if patch is not None else contextlib.nullcontext()
                with ctx:
                    scores, sections, samples = run_tasks(lm, plan, limit=limit, num_fewshot=num_fewshot,
                                                          log_samples=log_samples)
                done += len(tasks)
                report("eval", done, total)
                rows.append(ConfigResult(model_name, pname, scores, sections, samples))
    return rows


def _offline_vars(local_data: bool) -> dict[str, str]:
    return {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"} if local_data else {}


def evaluate(
    models: list[str],
    patches: list[str],
    tasks: list[str],
    *,
    data: dict[str, Path] | None = None,
    data_dir: Path | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int | str = 8,
    device: str = "auto",
    dtype: str = "auto",
    only: list[str] | None = None,
    log_samples_dir: Path | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    progress: ProgressFn | None = None,
) -> EvalReport:
    """Evaluate every model alone and with every patch that fits it, on every task."""
    from portllm_cli.core.models import check_causal_lm, resolve_device, torch_dtype
    from portllm_cli.io.atomic import atomic_output_dir, check_output
    from portllm_cli.io.checkpoint import Checkpoint
    from portllm_cli.core.plan import NO_BASE_FLAG_HINT, prepare_patch
    from portllm_cli.patch.format import read_patch
    from portllm_cli.resolve import resolve

    t0 = time.perf_counter()
    report = progress or no_progress
    if not models:
        raise UsageError("give at least one --model")
    if len(set(models)) != len(models):
        raise UsageError("the same --model is given twice")
    if len(set(patches)) != len(patches):
        raise UsageError("the same --patch is given twice")
    tasks, bs = _check_args(list(tasks), limit, num_fewshot, batch_size)
    data = dict(data or {})
    dev = resolve_device(device)
    torch_dtype(dtype, dev)  # a bad --dtype fails here, before anything loads
    if log_samples_dir is not None:
        check_output(Path(log_samples_dir), overwrite=overwrite)

    loaded_models = []
    for spec in models:
        res = resolve(spec, kind="model")
        # the checkpoint's names and shapes are what a patch is checked against; a model evaluated
        # without patches may also be a GGUF directory, which only the loader reads
        ckpt = Checkpoint.open(res.path, allow_pickle=allow_pickle) if patches else None
        check_causal_lm(res.path, trust_remote_code, allow_pickle=allow_pickle)  # fail before any scoring
        loaded_models.append(_Model(spec, res.path, ckpt))
    loaded_patches = []
    for spec in patches:
        res = resolve(spec, kind="patch")
        patch, old = prepare_patch(read_patch(res.path), allow_pickle=allow_pickle, hint=NO_BASE_FLAG_HINT)
        loaded_patches.append(_Patch(spec, patch, old))
    configs, skipped = plan_configurations(loaded_models, loaded_patches, only)

    with tempfile.TemporaryDirectory(prefix="portllm-eval-") as tmp, contextlib.ExitStack() as stack:
        total = len(configs) * len(tasks)
        done = 0
        # lm-eval's built-in task index (only built when a built-in task is named) takes a while
        report("eval · reading tasks", 0, total)
        plan = _plan_offline(stack, tasks, data, data_dir, Path(tmp))
        from lm_eval.models.huggingface import HFLM

        rows: list[ConfigResult] = []
        out_ctx = (atomic_output_dir(Path(log_samples_dir), overwrite=overwrite) if log_samples_dir is not None
                   else contextlib.nullcontext(None))
        with out_ctx as samples_tmp, _quiet_lm_eval():
            by_model: dict[str, list[_Config]] = {}
            for c in configs:
                by_model.setdefault(c.model.spec, []).append(c)
            index = 0
            for m in loaded_models:
                group = by_model.get(m.spec)
                if not group:
                    continue
                report(f"eval · loading {m.spec}", done, total)
                model_obj, tok = load_model(m.path, dtype=dtype, device=dev, trust_remote_code=trust_remote_code,
                                            allow_pickle=allow_pickle)
                lm = HFLM(pretrained=model_obj, tokenizer=tok, batch_size=bs)
                for c in group:
                    def tick(task: str, _name: str = c.name) -> None:
                        nonlocal done
                        done += 1
                        report(f"eval · {_name} · {task}", done, total)

                    ctx = (patched(model_obj, c.patch.patch, c.key_map, old=c.patch.old) if c.patch
                           else contextlib.nullcontext())
                    with ctx:
                        scores, sections, samples = run_tasks(
                            lm, plan, limit=limit, num_fewshot=num_fewshot,
                            log_samples=samples_tmp is not None, on_task=tick,
                        )
                    if samples_tmp is not None:
                        _write_samples(Path(samples_tmp), index, c.name, samples)
                    rows.append(ConfigResult(m.spec, c.patch.spec if c.patch else None, scores, sections, samples))
                    index += 1
                del lm, model_obj, tok
                if m is not loaded_models[-1]:
                    _free_memory()  # before the next model is loaded
    settings = {
        "models": models, "patches": patches, "limit": limit, "num_fewshot": num_fewshot, "batch_size": bs,
        "device": dev, "dtype": dtype, "only": only or None,
        "data": {t: str(lt.source.resolve()) for t, lt in plan.local.items()},
        "lm_eval_tasks": plan.lm_names,
    }
    return EvalReport(rows, _gains(rows, tasks), tasks, skipped, settings,
                      Path(log_samples_dir) if log_samples_dir is not None else None, time.perf_counter() - t0)


def _free_memory() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


# -- the JSON file ----------------------------------------------------------------------------
def check_report_path(path: Path, *, overwrite: bool) -> None:
    from portllm_cli.errors import OutputExistsError

    path = Path(path)
    if path.is_dir():
        raise OutputExistsError(f"--output {path}: is a directory, expected a file name")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"--output {path}: already exists", hint="pass --overwrite to replace it")
    parent = path.resolve().parent
    if not parent.is_dir():
        raise OutputExistsError(f"--output {path}: the directory {parent} does not exist")


def write_report(doc: dict[str, Any], path: Path, *, overwrite: bool = False) -> None:
    """Write the JSON document atomically: a temporary sibling, fsynced, then renamed."""
    check_report_path(path, overwrite=overwrite)
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.resolve().parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=2, default=_default)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
