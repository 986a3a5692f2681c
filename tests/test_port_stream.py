"""How `port` executes: row-block merges straight from and to the shard files, factors read lazily,
bounded buffers, clones where the filesystem has them.

The reference for the bits is written apart from the code under test: plain safetensors and torch,
``(W.float() + s * (B.float() @ A.float())[.T]).to(W.dtype)`` on the whole tensor, one rounding;
and, as the issue asks, core.merge's own whole-tensor merge (one block).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from portllm_cli.core import port as core  # noqa: E402
from portllm_cli.core.merge import LoraEdit, Workspace, merge_tensor  # noqa: E402
from portllm_cli.errors import IntegrityError  # noqa: E402
from portllm_cli.io import shards  # noqa: E402
from portllm_cli.io.safetensors import ScannedFile, read_header  # noqa: E402
from portllm_cli.patch import format as fmt  # noqa: E402
from portllm_cli.patch.format import LoraModule, materialize, read_patch  # noqa: E402
from portllm_cli.resolve import resolve  # noqa: E402
from tests import tiny  # noqa: E402

DTYPES = ["float32", "bfloat16", "float16"]
RANK, ALPHA, SCALE = 4, 6.0, 0.75


def _load(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _tensors(model_dir: Path) -> dict:
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(_load(f))
    return out


def _bits(t):
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_dir):
    """The tiny llama (hidden 32, k/v 16 rows, vocabulary 320) in each dtype, in several shards."""
    out = {}
    for dtype in DTYPES:
        d = tmp_path_factory.mktemp(f"stream-{dtype}")
        tiny.make_model(d, "llama", dtype=dtype, seed=11, max_shard_size="20KB", tokenizer_from=tokenizer_dir)
        out[dtype] = d
    return out


# layout -> {module: (stored weight shape, kind)}; fifo weights are stored (in, out)
LAYOUTS = {
    "linear": {
        "model.layers.0.self_attn.q_proj": ((32, 32), "linear"),
        "model.layers.1.self_attn.k_proj": ((16, 32), "linear"),
        "model.layers.1.mlp.down_proj": ((32, 64), "linear"),
        "lm_head": ((320, 32), "linear"),
    },
    "fan_in_fan_out": {
        "model.layers.0.self_attn.q_proj": ((32, 32), "linear"),
        "model.layers.1.self_attn.k_proj": ((16, 32), "linear"),
        "model.layers.0.mlp.up_proj": ((64, 32), "linear"),
    },
    "embedding": {"model.embed_tokens": ((320, 32), "embedding")},
}


def make_patch(out: Path, model_dir: Path, layout: str, factor_dtype: str = "float32", seed: int = 0) -> Path:
    """A LoRA patch written by hand: random A and B for each module of the layout."""
    from portllm_cli.io.checkpoint import Checkpoint, architecture_fingerprint

    g = torch.Generator().manual_seed(seed)
    fifo = layout == "fan_in_fan_out"
    tensors, shapes = {}, {}
    for module, ((rows, cols), kind) in LAYOUTS[layout].items():
        if kind == "embedding" or fifo:
            in_dim, out_dim = rows, cols
        else:
            out_dim, in_dim = rows, cols
        dt = getattr(torch, factor_dtype)
        tensors[fmt.peft_key(module, "A", kind)] = torch.randn(RANK, in_dim, generator=g).to(dt)
        tensors[fmt.peft_key(module, "B", kind)] = torch.randn(out_dim, RANK, generator=g).to(dt)
        shapes[module] = [rows, cols]
    cfg = fmt.adapter_config(base_model=str(model_dir), rank=RANK, alpha=ALPHA,
                             target_modules=sorted({m.rsplit(".", 1)[-1] for m in LAYOUTS[layout]}),
                             fan_in_fan_out=fifo)
    manifest = fmt.build_manifest(
        base={"model": str(model_dir), "revision": None, "content_hash": None,
              "fingerprint": architecture_fingerprint(Checkpoint.open(model_dir).config, shapes)},
        lora={"r": RANK, "lora_alpha": ALPHA}, source={"kind": "test"},
    )
    fmt.write_patch_files(out, tensors, cfg, manifest)
    return out


def reference(model_dir: Path, patch_dir: Path, layout: str) -> dict:
    """{weight key: merged tensor}: the whole tensor, one float32 sum, one rounding."""
    factors = _load(patch_dir / "adapter_model.safetensors")
    weights = _tensors(model_dir)
    out = {}
    for module, (_, kind) in LAYOUTS[layout].items():
        A = factors[fmt.peft_key(module, "A", kind)].float()
        B = factors[fmt.peft_key(module, "B", kind)].float()
        d = B @ A
        if kind == "embedding" or layout == "fan_in_fan_out":
            d = d.T
        W = weights[f"{module}.weight"]
        out[f"{module}.weight"] = (W.float() + d * (ALPHA / RANK * SCALE)).to(W.dtype)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_blockwise_port_is_bit_identical_to_the_whole_tensor_merge(models, tmp_path, dtype, layout):
    """Through the real port path (shards, lazy factors, pread/pwrite of row blocks, --verify),
    with blocks of 9 and 13 rows: neither divides 16, 32, 64 or 320 rows."""
    model = models[dtype]
    patch = make_patch(tmp_path / "p", model, layout)
    want = reference(model, patch, layout)
    whole = read_patch(patch)
    src = _tensors(model)
    for rows in (9, 13):
        out = tmp_path / f"out-{rows}"
        res = core.port_merged(patch, resolve(str(model), kind="model"), out, scale=SCALE,
                               block_bytes=rows * 32 * 4, verify=True)
        assert res.verified and res.modules_merged == len(LAYOUTS[layout])
        got = _tensors(out)
        assert set(got) == set(src)
        for key, t in got.items():
            if key in want:
                assert not torch.equal(_bits(t), _bits(src[key])), key
                assert torch.equal(_bits(t), _bits(want[key])), f"{key}: {rows} rows per block"
                m = whole.modules[key.removesuffix(".weight")]
                one_block = merge_tensor(src[key], [LoraEdit(m, SCALE)], block_bytes=1 << 30)
                assert torch.equal(_bits(t), _bits(one_block)), key
            else:
                assert torch.equal(_bits(t), _bits(src[key])), key
        for f in model.glob("*.safetensors"):  # same layout: the headers are byte for byte the target's
            n = read_header(f).data_start
            assert (out / f.name).read_bytes()[:n] == f.read_bytes()[:n]


def test_bf16_merges_read_the_source_in_place(models, tmp_path, monkeypatch):
    """A bf16 model's merges go through the fused kernel reading the source shard through its
    mapping (where the kernel is built and agrees with torch here), and write exactly what the port
    through torch's operations writes."""
    from portllm_cli.core import merge

    if not getattr(merge.kernels(), "lora_fused", lambda: False)():
        pytest.skip("no fused kernel here")
    model = models["bfloat16"]
    patch = make_patch(tmp_path / "p", model, "linear")
    took = []
    real = core.merge_buffer_stream

    def spy(*a, **kw):
        took.append(real(*a, **kw))
        return took[-1]

    monkeypatch.setattr(core, "merge_buffer_stream", spy)
    fast = tmp_path / "fast"
    core.port_merged(patch, resolve(str(model), kind="model"), fast, scale=SCALE, block_bytes=9 * 32 * 4)
    assert took and all(took), took
    monkeypatch.setattr(merge, "_KERNELS", [None])  # torch's matmul and operations, pread into buffers
    took.clear()
    slow = tmp_path / "slow"
    core.port_merged(patch, resolve(str(model), kind="model"), slow, scale=SCALE, block_bytes=13 * 32 * 4)
    assert not any(took)
    for f in model.glob("*.safetensors"):
        assert (fast / f.name).read_bytes() == (slow / f.name).read_bytes(), f.name


def test_factors_in_the_models_dtype(models, tmp_path):
    """bf16 factors on a bf16 model: still one float32 sum (the factors are widened, not the sum narrowed)."""
    model = models["bfloat16"]
    patch = make_patch(tmp_path / "p", model, "linear", factor_dtype="bfloat16")
    want = reference(model, patch, "linear")
    core.port_merged(patch, resolve(str(model), kind="model"), tmp_path / "o", scale=SCALE, block_bytes=9 * 32 * 4)
    got = _tensors(tmp_path / "o")
    for key in want:
        assert torch.equal(_bits(got[key]), _bits(want[key])), key


# -- lazy factors and the patch's integrity -----------------------------------------------------
def test_lazy_patch_reads_the_same_factors(models, tmp_path):
    patch = make_patch(tmp_path / "p", models["float32"], "linear")
    eager, lazy = read_patch(patch), read_patch(patch, lazy=True)
    try:
        assert set(eager.modules) == set(lazy.modules)
        for name, m in eager.modules.items():
            lm = lazy.modules[name]
            assert isinstance(lm.A, fmt.FactorRef) and tuple(lm.A.shape) == tuple(m.A.shape)
            full = materialize(lm)
            assert torch.equal(full.A, m.A) and torch.equal(full.B, m.B)
            assert full.weight_shape == m.weight_shape and full.scale == m.scale
        assert lazy.source.sha256 == eager.manifest["tensors"]["sha256"]
    finally:
        lazy.close()


def _flip_factor_in_place(weights: Path) -> None:
    """Rewrite one byte of the first factor inside the same file (same inode, same size)."""
    info = min(read_header(weights).tensors.values(), key=lambda i: i.begin)
    with open(weights, "r+b") as fh:
        fh.seek(info.begin + 1)
        b = fh.read(1)
        fh.seek(info.begin + 1)
        fh.write(bytes([b[0] ^ 0x40]))


def test_patch_rewritten_after_its_check_is_refused(models, tmp_path, monkeypatch):
    """The factors used are the bytes whose sha256 was checked: a patch rewritten in place after the
    scan (a race by someone who can write to it) is refused when a factor is read, exit 4, no output."""
    from typer.testing import CliRunner

    from portllm_cli.cli.app import app

    model = models["bfloat16"]
    patch = make_patch(tmp_path / "p", model, "linear")
    real_scan = ScannedFile.scan

    def scan_then_rewrite(path, *a, **kw):
        scanned = real_scan(path, *a, **kw)
        _flip_factor_in_place(Path(path))  # the race, won by the attacker
        return scanned

    monkeypatch.setattr(ScannedFile, "scan", staticmethod(scan_then_rewrite))
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["port", "-p", str(patch), "--to", str(model), "-o", str(out)])
    assert res.exit_code == 4, res.output
    assert res.stderr.startswith("Error: ") and "changed after its sha256 was checked" in res.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".portllm-tmp-" in p.name]


def test_patch_replaced_after_its_check_is_not_used(models, tmp_path, monkeypatch):
    """A patch file replaced under its name after the scan changes nothing: the open file, whose
    bytes were hashed, is the one read."""
    model = models["float32"]
    patch = make_patch(tmp_path / "p", model, "linear", seed=1)
    evil = make_patch(tmp_path / "evil", model, "linear", seed=2)
    want = reference(model, patch, "linear")
    real_scan = ScannedFile.scan

    def scan_then_replace(path, *a, **kw):
        scanned = real_scan(path, *a, **kw)
        tmp = Path(path).with_name("swap.tmp")
        shutil.copy(evil / "adapter_model.safetensors", tmp)
        os.replace(tmp, path)
        return scanned

    monkeypatch.setattr(ScannedFile, "scan", staticmethod(scan_then_replace))
    core.port_merged(patch, resolve(str(model), kind="model"), tmp_path / "o", scale=SCALE)
    assert (patch / "adapter_model.safetensors").read_bytes() == (evil / "adapter_model.safetensors").read_bytes()
    got = _tensors(tmp_path / "o")
    for key in want:
        assert torch.equal(_bits(got[key]), _bits(want[key])), key


def test_scanned_file_refuses_a_tensor_changed_in_place(tmp_path):
    from portllm_cli.io.safetensors import save_tensors

    f = tmp_path / "t.safetensors"
    save_tensors(f, {"a": torch.arange(64, dtype=torch.float32).reshape(8, 8), "b": torch.ones(3)})
    scanned = ScannedFile.scan(f, chunk=16)  # chunks smaller than a tensor
    try:
        import hashlib

        assert scanned.sha256 == hashlib.sha256(f.read_bytes()).hexdigest()
        assert torch.equal(scanned.read(scanned.header.tensors["a"]), torch.arange(64.0).reshape(8, 8))
        _flip_factor_in_place(f)
        with pytest.raises(IntegrityError, match="changed after its sha256 was checked"):
            scanned.read(scanned.header.tensors["a"])
        assert torch.equal(scanned.read(scanned.header.tensors["b"]), torch.ones(3))  # untouched: still fine
    finally:
        scanned.close()


# -- bounded memory -----------------------------------------------------------------------------
def test_merge_buffers_stay_one_block(tmp_path):
    """Merging a 16 MiB tensor in 256 KiB blocks allocates a few blocks' worth, not the tensor."""
    from portllm_cli.io.safetensors import save_tensors

    W = torch.randn(1024, 4096).to(torch.bfloat16)
    m = LoraModule("m", torch.randn(8, 4096), torch.randn(1024, 8), alpha=8.0)
    src = tmp_path / "w.safetensors"
    save_tensors(src, {"w": W})
    info = read_header(src).tensors["w"]
    dst = tmp_path / "o.safetensors"
    shutil.copy(src, dst)
    ws, bufs = Workspace(), shards.Buffers()
    block = 256 << 10
    with open(src, "rb") as s, open(dst, "r+b") as d:
        core.merge_shard_tensor(s.fileno(), d.fileno(), info, [LoraEdit(m)], block_bytes=block, ws=ws, bufs=bufs)
    held = sum(t.numel() * t.element_size() for t in ws._flat.values())
    held += sum(len(b) for b in bufs._bufs.values())
    assert held <= 4 * block, held  # float32 block + delta, stored rows in and out
    got = _load(dst)["w"]
    assert torch.equal(_bits(got), _bits(merge_tensor(W, [LoraEdit(m)], block_bytes=1 << 30)))


def test_workspace_converts_factors_once_and_notices_changes():
    """bf16 factors become float32 once per module, not once per block; a factor changed in place
    is converted again; only the last few modules are kept."""
    from portllm_cli.core.merge import FACTOR_CACHE

    ws = Workspace()
    mods = [LoraModule(name=f"m{i}", A=torch.randn(2, 5).bfloat16(), B=torch.randn(3, 2).bfloat16(), alpha=2.0)
            for i in range(FACTOR_CACHE + 2)]
    A, B = ws.factors(mods[0], torch.device("cpu"))
    assert A.dtype == B.dtype == torch.float32 and torch.equal(A, mods[0].A.float())
    assert ws.factors(mods[0], torch.device("cpu"))[0] is A  # the same conversion, reused
    mods[0].A.mul_(2)  # changed in place: its version counter moves
    A2, _ = ws.factors(mods[0], torch.device("cpu"))
    assert A2 is not A and torch.equal(A2, mods[0].A.float())
    for m in mods:
        ws.factors(m, torch.device("cpu"))
    assert len(ws._factors) == FACTOR_CACHE
    f32 = LoraModule(name="f", A=torch.randn(2, 5), B=torch.randn(3, 2), alpha=2.0)
    assert ws.factors(f32, torch.device("cpu"))[0] is f32.A  # float32 already: nothing copied


# -- clones (reflinks) --------------------------------------------------------------------------
def test_cloned_shards_get_only_the_merges_written(models, tmp_path, monkeypatch):
    """Where the filesystem clones a file, nothing else is copied: only merged rows are written."""
    model = models["bfloat16"]
    patch = make_patch(tmp_path / "p", model, "linear")
    plain = tmp_path / "plain"
    core.port_merged(patch, resolve(str(model), kind="model"), plain, scale=SCALE)
    cloned = []

    def fake_clone(src_fd, dst_fd):  # what FICLONE leaves: dst holds src's bytes
        os.ftruncate(dst_fd, 0)
        size = os.fstat(src_fd).st_size
        os.pwrite(dst_fd, os.pread(src_fd, size, 0), 0)
        cloned.append(size)
        return True

    def no_copy(*a, **kw):
        raise AssertionError("a cloned shard must not be copied")

    monkeypatch.setattr(core, "clone_file", fake_clone)
    monkeypatch.setattr(shards, "copy_range", no_copy)
    out = tmp_path / "cloned"
    core.port_merged(patch, resolve(str(model), kind="model"), out, scale=SCALE, verify=True)
    assert len(cloned) == len(list(model.glob("*.safetensors"))) > 1
    for f in model.glob("*.safetensors"):
        assert (out / f.name).read_bytes() == (plain / f.name).read_bytes(), f.name


def test_every_written_byte_has_its_writeback_started(models, tmp_path, monkeypatch):
    """The disk writes start as each range is written (copied spans and merged tensors alike), so
    the final fsync finds little left: every byte of every output shard is asked for, once."""
    monkeypatch.setenv("PORTLLM_NO_REFLINK", "1")  # the copy path, whatever the filesystem
    asked: dict[int, list[tuple[int, int]]] = {}
    real = shards.Writeback.__call__

    def record(self, fd, offset, length):  # what is asked of the background writeback, as asked
        asked.setdefault(os.fstat(fd).st_ino, []).append((offset, offset + length))
        real(self, fd, offset, length)

    monkeypatch.setattr(shards.Writeback, "__call__", record)
    model = models["bfloat16"]
    out = tmp_path / "o"
    core.port_merged(make_patch(tmp_path / "p", model, "linear"), resolve(str(model), kind="model"), out, scale=SCALE)
    shard_files = sorted(out.glob("*.safetensors"))
    assert len(shard_files) > 1
    for f in shard_files:
        spans = sorted(asked[f.stat().st_ino])
        assert spans[0][0] == 0 and spans[-1][1] == f.stat().st_size, f.name
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), f.name  # no gap, no overlap


def test_start_writeback_is_advisory(tmp_path):
    """Where the kernel refuses (a pipe, a read-only descriptor), nothing is raised."""
    r, w = os.pipe()
    try:
        shards.start_writeback(w, 0, 10)
    finally:
        os.close(r)
        os.close(w)
    f = tmp_path / "f"
    f.write_bytes(b"x" * 100)
    fd = os.open(f, os.O_RDONLY)
    try:
        shards.start_writeback(fd, 0, 100)
    finally:
        os.close(fd)


def test_writeback_runs_in_the_background_and_stops_at_close(tmp_path, monkeypatch):
    """Requests return at once and run, in order, on one other thread; after close nothing runs
    (the caller may close its descriptors), and later requests are ignored."""
    import threading

    ran: list[tuple[int, int, int, str]] = []
    gate = threading.Event()

    def slow(fd, offset, length):  # sync_file_range waiting on a full disk queue
        gate.wait(5)
        ran.append((fd, offset, length, threading.current_thread().name))

    monkeypatch.setattr(shards, "start_writeback", slow)
    wb = shards.Writeback()
    if wb._fn is None:
        pytest.skip("no sync_file_range here: Writeback does nothing")
    for i in range(3):
        wb(7, i * 10, 10)  # returns although the first request waits
    assert ran == []
    gate.set()
    for _ in range(500):
        if len(ran) == 3:
            break
        threading.Event().wait(0.01)
    assert [r[:3] for r in ran] == [(7, 0, 10), (7, 10, 10), (7, 20, 10)]
    assert {r[3] for r in ran} == {"portllm-writeback"}
    gate.clear()
    wb(7, 30, 10)  # running (or about to) while the gate is shut
    wb(7, 31, 10)  # queued behind it: dropped at close
    wb(7, 32, 10)
    closer = threading.Thread(target=wb.close)
    closer.start()
    assert wb._closed.wait(5)
    gate.set()
    closer.join(5)
    assert not closer.is_alive() and wb._thread is None
    wb(7, 40, 10)  # after close: ignored
    threading.Event().wait(0.05)
    assert {r[1] for r in ran} <= {0, 10, 20, 30}


def _rss_file_reader():
    """A function giving this process's RssFile (KiB: file pages mapped), or a skip off Linux."""
    import mmap

    if not os.path.exists("/proc/self/status") or not hasattr(mmap.mmap, "madvise"):
        pytest.skip("Linux only")

    def rss_file_kb() -> int:
        for line in open("/proc/self/status"):
            if line.startswith("RssFile:"):
                return int(line.split()[1])
        pytest.skip("no RssFile in /proc/self/status")

    return rss_file_kb


def test_drop_mapped_returns_the_pages_read(tmp_path):
    """Pages read through a mapping count in the resident set until dropped; drop_mapped gives them
    back (the port reads merged tensors this way, so its memory must not grow with the model)."""
    import mmap

    rss_file_kb = _rss_file_reader()
    f = tmp_path / "big"
    size = 64 << 20
    with open(f, "wb") as fh:
        fh.write(os.urandom(1 << 20) * 64)
    fd = os.open(f, os.O_RDONLY)
    try:
        mm = shards.map_readonly(fd)
        assert mm is not None and len(mm) == size
        before = rss_file_kb()
        view = memoryview(mm)
        total = sum(view[i] for i in range(0, size, mmap.PAGESIZE))  # touch every page
        view.release()
        grown = rss_file_kb() - before
        assert grown > 48 << 10, grown  # KiB
        shards.drop_mapped(mm, 0, size // 2 + 1)
        half = rss_file_kb() - before
        shards.drop_mapped(mm, size // 2 + 1, size)
        assert rss_file_kb() - before < 4 << 10 < half < grown
        assert sum(memoryview(mm)[i] for i in range(0, size, mmap.PAGESIZE)) == total  # still readable
        mm.close()
        empty = tmp_path / "empty"
        empty.write_bytes(b"")
        efd = os.open(empty, os.O_RDONLY)
        try:
            assert shards.map_readonly(efd) is None
        finally:
            os.close(efd)
    finally:
        os.close(fd)


def test_reading_and_dropping_block_after_block_keeps_nothing_mapped(tmp_path):
    """The port's pattern: blocks at unaligned offsets read through the mapping, each dropped once
    written. Where the page cache maps a huge folio around a read, the part before the block must
    go too: nothing may accumulate (it did, ~40 KiB a block, before drop_mapped widened its range)."""
    rss_file_kb = _rss_file_reader()
    f = tmp_path / "big"
    with open(f, "wb") as fh:
        fh.write(os.urandom(1 << 20) * 96)
        fh.flush()
        os.fsync(fh.fileno())
        # out of the page cache, so that reading it back through the mapping brings it in as a
        # model file is read: in the large folios readahead makes, where the kernel has them
        os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    fd = os.open(f, os.O_RDONLY)
    try:
        mm = shards.map_readonly(fd)
        before = rss_file_kb()
        block, at = 2 << 20, 12_345
        for _ in range(45):
            assert len(mm[at : at + block]) == block
            shards.drop_mapped(mm, at, at + block)
            at += block
        assert rss_file_kb() - before < 64, rss_file_kb() - before  # KiB
        mm.close()
    finally:
        os.close(fd)


def test_a_source_truncated_under_its_mapping_is_refused(tmp_path):
    """Merges read bf16 rows through a mapping of the source; a source that shrank since it was
    mapped is refused with an IntegrityError before the mapping is touched (not a SIGBUS)."""
    from portllm_cli.io.safetensors import save_tensors

    W = torch.randn(64, 32).to(torch.bfloat16)
    m = LoraModule("m", torch.randn(4, 32), torch.randn(64, 4), alpha=8.0)
    src = tmp_path / "w.safetensors"
    save_tensors(src, {"w": W})
    info = read_header(src).tensors["w"]
    dst = tmp_path / "o.safetensors"
    shutil.copy(src, dst)
    with open(src, "r+b") as s, open(dst, "r+b") as d:
        mm = shards.map_readonly(s.fileno())
        try:
            os.ftruncate(s.fileno(), info.end - 1)
            with pytest.raises(IntegrityError, match="ended before byte"):
                core.merge_shard_tensor(s.fileno(), d.fileno(), info, [LoraEdit(m)], source=mm)
        finally:
            mm.close()


def test_clone_falls_back_where_unsupported(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"x" * 10000)
    b.write_bytes(b"")
    with open(a, "rb") as fa, open(b, "r+b") as fb:
        if shards.clone_file(fa.fileno(), fb.fileno()):  # a reflink filesystem: the clone is whole
            assert b.read_bytes() == a.read_bytes()
        else:  # ext4, tmpfs: nothing was changed
            assert b.read_bytes() == b""
    with open(a, "rb") as fa, open(b, "r+b") as fb:
        os.environ["PORTLLM_NO_REFLINK"] = "1"
        try:
            assert shards.clone_file(fa.fileno(), fb.fileno()) is False
        finally:
            del os.environ["PORTLLM_NO_REFLINK"]


@pytest.mark.skipif(not os.environ.get("PORTLLM_TEST_REFLINK_DIR"),
                    reason="set PORTLLM_TEST_REFLINK_DIR to a directory on btrfs or XFS (reflink=1) to run")
def test_real_reflink_port(models, tmp_path):
    """On a filesystem with reflinks: the clone happens and the output is the plain port's, bit for bit."""
    root = Path(os.environ["PORTLLM_TEST_REFLINK_DIR"]) / f"portllm-test-{os.getpid()}"
    root.mkdir()
    try:
        model = root / "model"
        shutil.copytree(models["bfloat16"], model)
        patch = make_patch(root / "p", model, "linear")
        plain = tmp_path / "plain"  # elsewhere: no clone possible
        core.port_merged(patch, resolve(str(model), kind="model"), plain, scale=SCALE)
        f = next(model.glob("*.safetensors"))
        with open(f, "rb") as fa, open(root / "probe", "wb") as fb:
            assert shards.clone_file(fa.fileno(), fb.fileno()), "this filesystem does not clone"
        out = root / "out"
        core.port_merged(patch, resolve(str(model), kind="model"), out, scale=SCALE, verify=True)
        for f in model.glob("*.safetensors"):
            assert (out / f.name).read_bytes() == (plain / f.name).read_bytes()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_verify_streams_and_still_catches_a_bad_row(models, tmp_path, monkeypatch):
    """--verify recomputes each merged block and compares it with what was written: one flipped
    bit in the last block of a tensor (past the first block) is caught, exit 4, nothing left."""
    model = models["float16"]
    patch = make_patch(tmp_path / "p", model, "embedding")
    real = core.pwrite_all
    state = {"n": 0}

    def flip_later_block(fd, data, offset):
        state["n"] += 1
        b = bytearray(memoryview(data).cast("B"))
        if state["n"] == 3:
            b[-1] ^= 1
        real(fd, memoryview(b), offset)

    monkeypatch.setattr(core, "pwrite_all", flip_later_block)
    out = tmp_path / "o"
    with pytest.raises(IntegrityError, match="does not equal base"):
        core.port_merged(patch, resolve(str(model), kind="model"), out, block_bytes=9 * 32 * 4, verify=True)
    assert state["n"] >= 3 and not out.exists()


def _corrupt(kind: str, patch: Path) -> None:
    w = patch / "adapter_model.safetensors"
    raw = bytearray(w.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    if kind == "tampered byte":
        raw[-1] ^= 0x01
    elif kind == "truncated":
        raw = raw[: len(raw) - 7]
    elif kind == "bad header":
        raw[8 + n // 2] = ord("}")
    elif kind == "header lies (manifest updated)":
        raw = raw[: len(raw) - 8]
    elif kind == "nan factor (manifest updated)":
        info = min(read_header(w).tensors.values(), key=lambda i: i.begin)
        raw[info.begin:info.begin + 4] = bytes.fromhex("0000c07f")  # a float32 NaN
    w.write_bytes(bytes(raw))
    if "manifest updated" in kind:  # the attacker also rewrote the manifest: the other checks must hold
        import hashlib
        import json

        man = json.loads((patch / "portllm.json").read_text())
        man["tensors"]["sha256"] = hashlib.sha256(bytes(raw)).hexdigest()
        (patch / "portllm.json").write_text(json.dumps(man))


@pytest.mark.parametrize("kind", ["tampered byte", "truncated", "bad header", "header lies (manifest updated)",
                                  "nan factor (manifest updated)"])
def test_lazy_and_whole_reads_refuse_alike(models, tmp_path, kind):
    """read_patch(lazy=True) gives the same error, class and message, as reading the patch whole."""
    patch = make_patch(tmp_path / "p", models["float32"], "linear")
    _corrupt(kind, patch)
    with pytest.raises(Exception) as whole:
        read_patch(patch)
    with pytest.raises(Exception) as lazy:
        read_patch(patch, lazy=True)
    assert type(lazy.value) is type(whole.value) and str(lazy.value) == str(whole.value), kind
    assert getattr(lazy.value, "exit_code", None) in (1, 4)
