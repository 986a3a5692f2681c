"""Everything that touches lm-evaluation-harness, in one module.

portllm's tasks become lm-eval tasks here (a recipe's rows -> normalized docs -> a JSONL file and a
task YAML with absolute paths, loaded by a TaskManager that indexes lm-eval's 14,000 built-in tasks
only when a built-in task was asked for); a live model is wrapped in ``HFLM`` and scored with
``simple_evaluate``; lm-eval's result structure is read back into portllm's scores; and lm-eval's
side effects (INFO logs, tqdm bars, ``git describe`` and ``pip`` probes, prints to stdout, the
Hub's offline switches read at import time) are kept off the user's terminal and out of the run.
``core.evaluate`` composes these into `portllm eval`; nothing else imports lm-eval.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from portllm_cli.errors import InvalidInputError, NotFoundError, PortllmError, UsageError


LOCAL_PREFIX = "portllm_"  # lm-eval name of a local task: portllm_<task>


DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


PRIMARY_METRICS = ("acc,none", "exact_match,strict-match", "exact_match,none", "exact_match,flexible-extract",
                   "acc_norm,none", "f1,none", "mcc,none")


GSM8K_STRICT = r"#### (\-?[0-9\.\,]+)"


GSM8K_FLEXIBLE = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"


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
    examples = recipes.read_examples(recipe, rows, path)
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
    with _env(offline_vars(enabled)), _offline_modules(enabled):
        yield


def plan_offline(stack: contextlib.ExitStack, tasks: list[str], data: dict[str, Path],
                  data_dir: Path | None, tmp: Path) -> TaskPlan:
    """plan_tasks, then offline for the rest of ``stack`` when no task needs the Hub (otherwise per
    task, in run_tasks). Not before plan_tasks: datasets (imported there, through lm-eval) reads the
    switches at import, and must see the user's own settings for a built-in task later on."""
    plan = plan_tasks(tasks, data, data_dir, tmp)
    stack.enter_context(_offline(plan.all_local))
    return plan


@contextlib.contextmanager
def quiet_lm_eval() -> Iterator[None]:
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

    from portllm_cli.core.progress import silence_library_bars, silenced_tqdm

    silent_tqdm = silenced_tqdm(_tqdm)
    swapped = []
    for name, mod in list(sys.modules.items()):
        cls = getattr(mod, "tqdm", None) if name.startswith("lm_eval") or name == "tqdm" else None
        if isinstance(cls, type) and issubclass(cls, _tqdm):
            swapped.append((mod, cls))
            mod.tqdm = silent_tqdm
    silence_library_bars()
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


def plain_json(obj: Any) -> Any:
    """lm-eval's structures hold tuples, numpy scalars and callables: make them plain JSON."""
    return json.loads(json.dumps(obj, default=json_default))


def json_default(o: Any) -> Any:
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
        sections[t] = plain_json(section)
        if log_samples:
            samples[t] = (res.get("samples") or {}).get(lm_name, [])
        if on_task is not None:
            on_task(t)
    return scores, sections, samples


def offline_vars(local_data: bool) -> dict[str, str]:
    return {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"} if local_data else {}


def make_lm(model: Any, tokenizer: Any, batch_size: int | str) -> Any:
    """lm-eval's HFLM around a model already in memory (scored as loaded, patches merged in place)."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
