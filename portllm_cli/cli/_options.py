"""Annotated option aliases shared by commands: declared once, spelled the same everywhere."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print one JSON document on stdout and nothing else there; no progress bars.")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or messages on stderr.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace --out if it already exists.")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output directory (written under a temporary name, renamed when complete).")]
PatchOpt = Annotated[
    str, typer.Option("--patch", "-p", help="Patch: a local directory, user/repo or user/repo@revision.")
]
RevisionOpt = Annotated[Optional[str], typer.Option("--revision", help="Hub revision (branch, tag or commit) for a repo id.")]
AllowPickleOpt = Annotated[
    bool,
    typer.Option(
        "--allow-pickle",
        help="Allow pickle weights (.bin/.pt); loaded with torch.load(weights_only=True). Only for sources you trust.",
    ),
]
NoVerifyOpt = Annotated[
    bool, typer.Option("--no-verify", help="Skip the sha256 check of a patch against its manifest (not recommended).")
]
TrustRemoteCodeOpt = Annotated[
    bool, typer.Option("--trust-remote-code", help="Allow model repositories to run their own Python code. Off by default.")
]
PushToHubOpt = Annotated[
    Optional[str], typer.Option("--push-to-hub", help="Push the result to this Hub repo id when done.", metavar="REPO_ID")
]


class Dtype(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


DtypeOpt = Annotated[Dtype, typer.Option("--dtype", help="Weights dtype for loading the model.")]
DeviceOpt = Annotated[Device, typer.Option("--device", help="Where to run: auto picks cuda when available.")]
