"""`portllm hub push` and `portllm hub pull`: patches on the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from portllm_cli.cli._options import JsonOpt, OverwriteOpt, QuietOpt, RevisionOpt
from portllm_cli.cli._output import Output

EPILOG = """\
Examples:

  portllm hub push ./sst2.patch alice/llama-sst2      # prints the URL and commit id
  portllm hub push ./sst2.patch alice/llama-sst2 --private --revision v2
  portllm hub pull alice/llama-sst2                   # into the HF cache, verified
  portllm hub pull alice/llama-sst2@v2 --out ./sst2.patch
  portllm port --patch alice/llama-sst2 --to ./model-v2 --out ./model-v2-sst2

Auth: HF_TOKEN, or the token stored by 'hf auth login' (push needs write access).
HF_ENDPOINT and HF_HUB_OFFLINE=1 are honoured; a pulled patch is served offline from the cache.
Exit codes: 0 ok, 1 failure (auth, not found, network), 2 usage, 4 download does not match its manifest.
"""

PUSH_EPILOG = """\
Examples:

  portllm hub push ./sst2.patch alice/llama-sst2
  portllm hub push ./sst2.patch alice/llama-sst2 --private --revision v2 --commit-message "rank 16"
  portllm hub push ./sst2.patch team/llama-sst2 --json
"""

PULL_EPILOG = """\
Examples:

  portllm hub pull alice/llama-sst2
  portllm hub pull alice/llama-sst2@v2 --out ./sst2.patch
  HF_HUB_OFFLINE=1 portllm hub pull alice/llama-sst2        # served from the cache
"""

hub_app = typer.Typer(
    name="hub",
    help="Push patches to the Hugging Face Hub and pull them back (verified against their manifest).",
    epilog=EPILOG,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode="rich",
)


@hub_app.command("push", epilog=PUSH_EPILOG)
def push(
    patch: Annotated[Path, typer.Argument(help="Patch directory to upload (checked against its manifest first).")],
    repo_id: Annotated[str, typer.Argument(help="Hub repo id, user/repo or org/repo; created if it does not exist.")],
    private: Annotated[bool, typer.Option("--private", help="Create the repo as private (an existing repo keeps its visibility).")] = False,
    revision: Annotated[Optional[str], typer.Option("--revision", help="Branch to commit to; created from main if new.")] = None,
    commit_message: Annotated[Optional[str], typer.Option("--commit-message", "-m", help="Commit message.")] = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Upload a patch and a generated model card to a Hub repo; print its URL and commit id."""
    from portllm_cli import hub

    out = Output(json_mode=json_, quiet=quiet)
    out.info(f"Pushing {patch} to {repo_id}{f' (branch {revision})' if revision else ''} on {hub.endpoint()}")
    res = hub.push_patch(patch, repo_id, private=private, revision=revision, commit_message=commit_message)
    for w in res.warnings:
        out.warn(w)
    out.result(res.as_dict(), f"{res.url}\ncommit {res.commit_id}")


@hub_app.command("pull", epilog=PULL_EPILOG)
def pull(
    spec: Annotated[str, typer.Argument(metavar="REPO_ID[@REVISION]", help="Hub repo id of a patch, optionally @branch, tag or commit.")],
    out_dir: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="Copy the verified patch here (written under a temporary name, renamed when complete).")
    ] = None,
    revision: RevisionOpt = None,
    overwrite: OverwriteOpt = False,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Download a patch (only its files) into the Hugging Face cache, verify it, and print where it is."""
    from portllm_cli import hub

    out = Output(json_mode=json_, quiet=quiet)
    with out.progress() as progress:
        res = hub.pull_patch(spec, out=out_dir, revision=revision, overwrite=overwrite, progress=progress)
    for w in res.warnings:
        out.warn(w)
    note = "verified against its manifest" if res.verified else "no manifest: not integrity-checked"
    out.info(f"{res.repo_id} at commit {res.revision[:12]} ({note})")
    out.result(res.as_dict(), str(res.path))


def push_result_if_requested(path: Path, repo_id: Optional[str], output: Output) -> Optional[dict[str, Any]]:
    """For ``--push-to-hub REPO_ID`` on finetune / extract / port: push the finished output.

    Call it after the output directory is complete (renamed into place). A patch directory goes up
    with its model card (``hub.push_patch``), a model directory as a model (``hub.push_model``).
    Returns the push record to merge into the command's JSON result under "hub", or None when no
    repo id was given. Errors are PortllmErrors (the output on disk stays).
    """
    if not repo_id:
        return None
    from portllm_cli import hub

    output.info(f"Pushing {path} to {repo_id} on {hub.endpoint()}")
    res = hub.push_result(Path(path), repo_id)
    output.info(f"Pushed: {res.url} (commit {res.commit_id[:12]})")
    return res.as_dict()
