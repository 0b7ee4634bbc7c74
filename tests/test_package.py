"""PyTorch .pt2 packages (aoti_compile_and_package, package_aoti) through aoti_rt.load.

Every package here is built in the test session with torch's own packaging (CPU always; CUDA
where present), in each way torch stores weights: inside the .so (the default), as a
binary_blob entry, as pickle_weights entries, appended to the .so (force_mmap_weights).
Crafted archives are rewritten copies of those.
"""

from __future__ import annotations

import ctypes
import io
import json
import os
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
import torch

import aoti_rt
from aoti_rt import demo, package
from aoti_rt.method_compiler import quiet_torch_deprecations

from conftest import FORMATS, _once, _package, _stack_program
from models import Subset, make_stack

PROMPT = list(range(1, 9))

pytestmark = pytest.mark.usefixtures("pt2_cache_here")


@pytest.fixture(scope="session")
def multi_pt2(workdir, device) -> Path:
    """One package with two models (package_aoti): "a" runs layers 0, 1 and "b" layers 1, 2."""
    from torch._inductor.package import package_aoti

    path = workdir / f"multi-{device.replace(':', '')}.pt2"

    def build():
        files = {}
        for name, layers in (("a", [0, 1]), ("b", [1, 2])):
            ep = _stack_program(device, layers)
            with quiet_torch_deprecations():
                files[name] = torch._inductor.aot_compile(ep.module(), ep.example_inputs[0],
                                                          options={"aot_inductor.package": True})
        tmp = path.with_name(path.stem + ".partial.pt2")
        package_aoti(str(tmp), files)
        os.replace(tmp, path)
    _once(path, path, build)
    return path


@pytest.fixture(scope="session")
def lm_pt2(workdir, device) -> dict[str, Path]:
    """The demo LM's prefill and decode, each compiled into its own stock package (defaults)."""
    progs: dict = {}
    def program(name):
        progs.update(progs or demo.export_methods(demo.make_model(device)))
        return progs[name]
    tag = device.replace(":", "")
    return {name: _package(workdir / f"lm-{name}-{tag}.pt2", lambda: program(name), {})
            for name in ("prefill", "decode")}


def stats(device):
    return aoti_rt.cache_stats(device)


def unique_storage_bytes(module) -> int:
    """What one copy of each weight costs: parameters' storages by content (tied weights and
    equal LayerNorm weights once), each buffer (state, never shared by content) on its own."""
    def raw(t) -> bytes:
        return bytes(torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage().cpu()).numpy())

    params = {raw(p) for p in module.parameters()}
    buffers = {b.untyped_storage().data_ptr(): b.untyped_storage().nbytes() for b in module.buffers()}
    return sum(map(len, params)) + sum(buffers.values())


def eager_stack(device, layers=(0, 1, 2)):
    return Subset(make_stack(device), list(layers)).eval()


def stack_bytes(device, layers=(0, 1, 2)) -> int:
    """The distinct weight bytes a Subset of these layers uses (inp and its tied out once)."""
    s = make_stack(device)
    return unique_storage_bytes(torch.nn.ModuleList([s.inp, s.out, *(s.layers[i] for i in layers)]))


# -- loading what torch packages ---------------------------------------------------------------

@pytest.mark.parametrize("fmt", list(FORMATS))
def test_single_model_package_matches_eager_and_holds_each_weight_once(stack_pt2, device, fmt):
    ref = eager_stack(device)
    x = torch.randn(3, 64, device=device)
    before = stats(device)
    with aoti_rt.load(stack_pt2[fmt], device=device) as model:
        assert model.methods == ["model"]                  # named after the package's model
        assert isinstance(model, aoti_rt.Model)
        torch.testing.assert_close(model.model(x), ref(x))
        s = stats(device)
        # the tied inp/out weight is one storage: exactly the eager module's distinct bytes
        assert model.manifest.unique_weight_bytes() == stack_bytes(device)
        assert s["bytes_allocated"] - before["bytes_allocated"] == stack_bytes(device)
        assert model.model.bytes_read == stack_bytes(device)
        assert s["legacy_bytes"] == before["legacy_bytes"]  # nothing left private to AOTI
    assert stats(device)["bytes_allocated"] == before["bytes_allocated"]


@pytest.mark.parametrize("fmt", ["embedded", "blob", "pickle", "mmap"])
def test_weights_are_read_in_place_from_the_archive(stack_pt2, device, fmt):
    """Only what the .so needs is extracted; each weight is read at its offset in the .pt2."""
    path = stack_pt2[fmt]
    records, dev = package.inspect_package(path, device)
    assert dev == aoti_rt.device.Device.parse(device) and [r.name for r in records] == ["model"]
    rec = records[0]
    assert rec.store is None and rec.embedded == (fmt in ("embedded", "mmap"))
    folder = rec.folder()
    assert folder.parent == package.cache_root() and folder.name == rec.dir
    extracted = sorted(p.name for p in folder.iterdir())
    assert rec.so in extracted
    assert not any(n.endswith(("_weights.blob", ".cpp", "weights_config.json")) for n in extracted)
    # the bytes at each recorded offset of the .pt2 are the eager weight's
    state = {k: v for k, v in eager_stack(device).state_dict(keep_vars=True).items()}
    data = path.read_bytes()
    for c in rec.method.constants:
        w = rec.weights[c.weight]
        want = state[c.fqn].detach().cpu().contiguous().view(torch.uint8).flatten().numpy().tobytes()
        assert data[w.offset:w.offset + len(want)] == want, c.fqn


def test_multi_model_package_gives_one_method_per_model(multi_pt2, device):
    x = torch.randn(3, 64, device=device)
    before = stats(device)["bytes_allocated"]
    with aoti_rt.load(multi_pt2, device=device) as model:
        assert model.methods == ["a", "b"]
        torch.testing.assert_close(model.a(x), eager_stack(device, [0, 1])(x))
        torch.testing.assert_close(model.b(x), eager_stack(device, [1, 2])(x))
        assert stats(device)["bytes_allocated"] - before == stack_bytes(device, [0, 1, 2])
        # b found inp/out and layer 1 cached: it read layer 2 only
        layer2 = make_stack(device).layers[2]
        assert model.b.bytes_read == unique_storage_bytes(layer2)
    with aoti_rt.load(multi_pt2, device=device, methods=["b"]) as model:
        assert model.methods == ["b"]


def test_one_model_from_three_formats_holds_one_copy(stack_pt2, device):
    """Packages whose models have the same weights, stored three different ways, share them."""
    ref = eager_stack(device)
    x = torch.randn(3, 64, device=device)
    before = stats(device)["bytes_allocated"]
    paths = {"emb": stack_pt2["embedded"], "blob": stack_pt2["blob"], "pick": (stack_pt2["pickle"], "model")}
    with aoti_rt.load(paths, device=device) as model:
        assert model.methods == ["emb", "blob", "pick"]
        for name in model.methods:
            torch.testing.assert_close(model[name](x), ref(x))
        assert stats(device)["bytes_allocated"] - before == stack_bytes(device)
        assert model.blob.bytes_read == model.pick.bytes_read == 0
    # never shared across packages without verification
    with aoti_rt.load(paths, device=device, verify=False) as model:
        assert stats(device)["bytes_allocated"] - before == 3 * stack_bytes(device)


def _generate(prefill, decode, device):
    with torch.no_grad():
        return demo.generate(prefill, decode, torch.tensor(PROMPT, device=device), 12)


def test_prefill_and_decode_packages_generate_like_eager_with_one_copy(lm_pt2, device):
    """aoti_rt's load of the pair generates eager's tokens; torch's own loader, which gives each
    package a private KV cache (decode never sees what prefill wrote), does not."""
    lm = demo.make_model(device)
    want, want_logits = _generate(demo.Prefill(lm), demo.Decode(lm), device)
    index = torch.device(device).index
    stock = [torch._inductor.aoti_load_package(str(lm_pt2[m]), device_index=-1 if index is None else index)
             for m in ("prefill", "decode")]
    assert _generate(*stock, device)[0] != want
    del stock
    before = stats(device)["bytes_allocated"]
    with aoti_rt.load(lm_pt2, device=device) as model:
        assert model.methods == ["prefill", "decode"]
        man = model.manifest
        assert stats(device)["bytes_allocated"] - before == man.unique_weight_bytes()
        assert man.unique_weight_bytes() == unique_storage_bytes(lm)   # KV caches, tied head: once
        assert model.decode.bytes_read == 0                             # everything was cached
        got, got_logits = _generate(model.prefill, model.decode, device)
        assert got == want
        for a, b in zip(got_logits, want_logits):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        # the KV cache is this instance's: a second load starts from zeros and leaves ours alone
        mine = model.weight("lm.k_cache").clone()
        assert mine.abs().sum() > 0
        with aoti_rt.load(lm_pt2, device=device) as other:
            assert other.weight("lm.k_cache").abs().sum() == 0
            assert _generate(other.prefill, other.decode, device)[0] == want
        torch.testing.assert_close(model.weight("lm.k_cache"), mine)
    assert stats(device)["bytes_allocated"] == before


def _malloc_in_use() -> int:
    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
    libc = ctypes.CDLL(None)
    fn = getattr(libc, "mallinfo2", None)
    if fn is None:
        pytest.skip("needs glibc's mallinfo2")
    fn.restype = Info
    info = fn()
    return info.uordblks + info.hblkhd


def test_embedded_weights_private_copy_is_freed(lm_pt2, device):
    """CreateWithDevice copies a .so's embedded weights into AOTI's own buffer; aoti_rt binds
    the shared ones instead and frees that copy: what the load holds is what the cache holds."""
    if device != "cpu":
        pytest.skip("measured through malloc on the CPU; device-wide CUDA figures round to pages "
                    "coarser than this model's weights (the swap-and-free path is the same)")
    aoti_rt.load(lm_pt2["prefill"], device=device).close()      # probed, extracted: a plain load now
    import gc

    gc.collect()
    before, s0 = _malloc_in_use(), stats(device)
    with aoti_rt.load(lm_pt2["prefill"], device=device) as model:
        held = _malloc_in_use() - before
        s = stats(device)
        reserved = s["bytes_reserved"] - s0["bytes_reserved"]
        weights = model.manifest.unique_weight_bytes()
        assert s["legacy_bytes"] == s0["legacy_bytes"]
        # without the swap AOTI's copy (one more `weights`) would still be held
        assert held - reserved < weights // 2, (held, reserved, weights)


def test_verify_load_checks_the_package_bytes(stack_pt2, device, tmp_path):
    """A package changed behind its record (same size, inode and mtime) is caught by
    verify="load", as a corrupt bundle store is."""
    path = tmp_path / "copy.pt2"
    shutil.copy(stack_pt2["blob"], path)
    x = torch.randn(3, 64, device=device)
    with aoti_rt.load(path, device=device, verify="load") as model:
        torch.testing.assert_close(model.model(x), eager_stack(device)(x))
    rec = package.inspect_package(path, device)[0][0]
    w = next(iter(rec.weights.values()))
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(w.offset)
        f.write(bytes(b ^ 0xFF for b in f.read(8)))
        f.seek(w.offset)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(aoti_rt.BundleError, match="do not match its digest"):
        aoti_rt.load(path, device=device, verify="load")


# -- the probe record ------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["embedded", "blob", "mmap"])
def test_probe_hashes_weights_from_the_files_not_the_device(stack_pt2, device, fmt, tmp_path, monkeypatch):
    """A package's first probe hashes each weight once, where the loader will read it (the
    archive, or the .so or blob extracted from it; spot-checked against what torch's runner
    loaded), never a copy of the whole weight back from the device; the model still computes
    like eager."""
    from aoti_rt import probe

    path = tmp_path / f"{fmt}.pt2"
    shutil.copy(stack_pt2[fmt], path)                          # a package never probed
    def no_copy(t):
        raise AssertionError("a weight was copied back from the device")
    monkeypatch.setattr(probe, "storage_bytes", no_copy)
    def no_second_hash(*a):
        raise AssertionError("a weight was hashed twice: the probe hashes the bytes the loader reads")
    monkeypatch.setattr(package, "_check_bytes", no_second_hash)
    x = torch.randn(3, 64, device=device)
    with aoti_rt.load(path, device=device) as model:
        torch.testing.assert_close(model.model(x), eager_stack(device)(x))


def test_later_loads_read_the_record_not_the_package(stack_pt2, device, tmp_path, monkeypatch):
    path = tmp_path / "copy.pt2"
    shutil.copy(stack_pt2["blob"], path)
    x = torch.randn(3, 64, device=device)
    aoti_rt.load(path, device=device).close()                  # probes and records
    probes = []
    real = package._probe_model
    monkeypatch.setattr(package, "_probe_model", lambda *a, **k: probes.append(a) or real(*a, **k))
    with aoti_rt.load(path, device=device) as model:
        torch.testing.assert_close(model.model(x), eager_stack(device)(x))
    assert probes == []
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a changed package is probed again
    aoti_rt.load(path, device=device).close()
    assert len(probes) == 1


def _edit_record(path: Path, fn) -> None:
    rp = package._record_path(path)
    raw = json.loads(rp.read_text())
    fn(raw)
    rp.write_text(json.dumps(raw))


def _first_weight(raw):
    return next(iter(raw["models"][0]["weights"].values()))


@pytest.mark.parametrize("edit", [
    lambda raw: _first_weight(raw).update(offset=1 << 40),                         # past the end
    lambda raw: raw["models"][0]["method"]["constants"][0].update(shape=[4096, 4096]),  # a lying view
    lambda raw: raw["models"][0]["method"]["constants"][0].update(dtype="float64"),
    lambda raw: raw["models"][0].update(dir="0" * 64),                               # no such folder
    lambda raw: raw["models"][0].update(so="../evil.so"),
    lambda raw: raw.update(models="nonsense"),
], ids=["offset", "shape", "dtype", "dir", "so", "models"])
def test_an_edited_record_is_probed_again_never_bound(stack_pt2, device, tmp_path, edit):
    path = tmp_path / "copy.pt2"
    shutil.copy(stack_pt2["embedded"], path)
    aoti_rt.load(path, device=device).close()
    _edit_record(path, edit)
    x = torch.randn(3, 64, device=device)
    with aoti_rt.load(path, device=device) as model:
        torch.testing.assert_close(model.model(x), eager_stack(device)(x))
    good = json.loads(package._record_path(path).read_text())     # rewritten by the new probe
    assert package._parse_record(good["models"][0], "record").weights


def test_a_deleted_cache_folder_is_extracted_again(stack_pt2, device, tmp_path):
    path = tmp_path / "copy.pt2"
    shutil.copy(stack_pt2["embedded"], path)
    records, _ = package.inspect_package(path, device)
    shutil.rmtree(records[0].folder())
    x = torch.randn(3, 64, device=device)
    with aoti_rt.load(path, device=device) as model:
        torch.testing.assert_close(model.model(x), eager_stack(device)(x))


def test_prune_cache_removes_what_gone_packages_left_and_never_a_held_folder(stack_pt2, device, tmp_path,
                                                                             monkeypatch):
    monkeypatch.setenv("AOTI_RT_CACHE", str(tmp_path / "cache"))
    paths = {fmt: tmp_path / f"{fmt}.pt2" for fmt in ("embedded", "blob", "mmap")}
    for fmt, path in paths.items():
        shutil.copy(stack_pt2[fmt], path)
        aoti_rt.load(path, device=device).close()              # extracted, probed, recorded
    folders = {fmt: package.inspect_package(path, device)[0][0].folder() for fmt, path in paths.items()}
    assert len(set(folders.values())) == 3
    keep, gone, held = paths["embedded"], paths["blob"], paths["mmap"]
    x = torch.randn(3, 64, device=device)
    want = eager_stack(device)(x)
    with aoti_rt.load(held, device=device) as model:
        _prune_around(model, gone, held, folders, x, want)
    r = package.prune_cache(min_age_s=0)
    assert r.unused_folders == [folders["mmap"]] and not folders["mmap"].exists()
    # the package still in place kept its record and folder: its load reads them
    records = tmp_path / "cache" / "pt2" / "records"
    before = {f: f.stat().st_mtime_ns for f in records.iterdir()}
    with aoti_rt.load(keep, device=device) as m:
        torch.testing.assert_close(m.model(x), want)
    assert {f: f.stat().st_mtime_ns for f in records.iterdir()} == before
    assert package.prune_cache(min_age_s=0).unused_folders == []


def _prune_around(model, gone: Path, held: Path, folders: dict[str, Path], x, want) -> None:
    """Prune while ``model`` (loaded from ``held``) is open and both packages are deleted."""
    gone.unlink()
    held.unlink()                        # its model stays loaded
    young = package.prune_cache(dry_run=True)                  # all younger than an hour
    assert young.unused_folders == [] and sorted(young.kept) == sorted([folders["blob"], folders["mmap"]])
    dry = package.prune_cache(min_age_s=0, dry_run=True)
    assert dry.records == 3 and len(dry.stale_records) == 2 and dry.unused_folders == [folders["blob"]]
    assert all(f.is_dir() for f in folders.values()) and all(f.is_file() for f in dry.stale_records)
    r = package.prune_cache(min_age_s=0)
    assert sorted(p.name for p in r.stale_records) == sorted(p.name for p in dry.stale_records)
    assert r.unused_folders == [folders["blob"]] and r.kept == [folders["mmap"]] and r.freed_bytes > 0
    assert not folders["blob"].exists() and folders["mmap"].is_dir() and folders["embedded"].is_dir()
    torch.testing.assert_close(model.model(x), want)           # the held folder was not touched


def test_cache_command_prunes_stale_records_and_old_unused_folders(tmp_path):
    import subprocess
    import sys
    import time

    root = tmp_path / "cache" / "pt2"
    (root / "records").mkdir(parents=True)
    pkg = tmp_path / "here.pt2"
    pkg.write_bytes(b"PK")
    st = pkg.stat()
    live = {"fingerprint": {"pt2": [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]}, "package": str(pkg),
            "models": [{"dir": "a" * 64}]}
    (root / "records" / "live.json").write_text(json.dumps(live))
    (root / "records" / "stale.json").write_text(json.dumps({**live, "package": str(tmp_path / "gone.pt2")}))
    (root / "records" / "junk.json").write_text("{not json")
    old = time.time() - 7200
    for name in ("a" * 64, "b" * 64, ".tmp-crashed"):
        (root / name).mkdir()
        (root / name / "model.so").write_bytes(b"x" * 1000)
        os.utime(root / name, (old, old))
    (root / ("c" * 64)).mkdir()                                  # young: kept
    env = {**os.environ, "AOTI_RT_CACHE": str(tmp_path / "cache")}
    run = [sys.executable, "-m", "aoti_rt", "cache"]
    out = subprocess.run(run, env=env, capture_output=True, text=True, check=True).stdout
    assert "4 extracted folders" in out and "3 probe records" in out and "would remove" in out
    assert len(list(root.iterdir())) == 5                          # a dry run: nothing went
    out = subprocess.run(run + ["--prune"], env=env, capture_output=True, text=True, check=True).stdout
    assert "removed: 2 records" in out and "2 unused folders" in out, out
    assert sorted(p.name for p in root.iterdir()) == sorted(["records", "a" * 64, "c" * 64])
    assert [p.name for p in (root / "records").iterdir()] == ["live.json"]


def test_a_folder_pruned_under_a_load_is_a_bundle_error(stack_pt2, device, tmp_path, monkeypatch):
    """Removing an extraction folder between the record check and the method's lock (a race
    with prune_cache) fails the load with what to do, not a crash in dlopen."""
    monkeypatch.setenv("AOTI_RT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "p.pt2"
    shutil.copy(stack_pt2["embedded"], path)
    folder = package.inspect_package(path, device)[0][0].folder()
    real = package._hold

    def pruned(f, files):
        shutil.rmtree(folder)
        return real(f, files)

    monkeypatch.setattr(package, "_hold", pruned)
    before = stats(device)["bytes_allocated"]
    with pytest.raises(aoti_rt.BundleError, match="load again"):
        aoti_rt.load(path, device=device)
    assert stats(device)["bytes_allocated"] == before
    monkeypatch.undo()
    monkeypatch.setenv("AOTI_RT_CACHE", str(tmp_path / "cache"))
    with aoti_rt.load(path, device=device) as m:              # extracted anew
        x = torch.randn(3, 64, device=device)
        torch.testing.assert_close(m.model(x), eager_stack(device)(x))


# -- crafted archives --------------------------------------------------------------------------

def rezip(src: Path, dst: Path, *, edit=None, drop=(), add=None, deflate=()) -> Path:
    """Rewrite a package: ``edit`` maps a name suffix to a function of the entry's bytes, ``drop``
    and ``deflate`` are name suffixes, ``add`` maps names to bytes."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            name = info.filename
            if name.endswith(tuple(drop)):
                continue
            data = zin.read(name)
            for suffix, fn in (edit or {}).items():
                if name.endswith(suffix):
                    data = fn(data)
            method = zipfile.ZIP_DEFLATED if name.endswith(tuple(deflate)) else zipfile.ZIP_STORED
            zout.writestr(zipfile.ZipInfo(name), data, compress_type=method)
        for name, data in (add or {}).items():
            zout.writestr(zipfile.ZipInfo(name), data)
    return dst


def root_of(path: Path) -> str:
    with zipfile.ZipFile(path) as z:
        return z.namelist()[0].split("/")[0]


def patch_central(path: Path, suffix: str, offset: int, value: int) -> None:
    """Overwrite a 32-bit field of the central directory record of the entry ending in ``suffix``."""
    data = bytearray(path.read_bytes())
    i = data.find(b"PK\x01\x02")
    while i >= 0:
        nlen, xlen, clen = struct.unpack_from("<HHH", data, i + 28)
        if bytes(data[i + 46:i + 46 + nlen]).endswith(suffix.encode()):
            struct.pack_into("<I", data, i + offset, value)
            path.write_bytes(bytes(data))
            return
        i = data.find(b"PK\x01\x02", i + 46 + nlen + xlen + clen)
    raise AssertionError(f"no entry ending in {suffix}")


def _data_start(data: bytes | bytearray, header: int) -> int:
    """Where the bytes of the zip entry whose local header is at ``header`` start (the local
    header's own name and extra lengths: torch pads the extra field to align the data)."""
    nlen, xlen = struct.unpack_from("<HH", data, header + 26)
    return header + 30 + nlen + xlen


def _crafted(kind: str, src: dict[str, Path], tmp: Path) -> Path:
    dst = tmp / f"{kind}.pt2"
    emb, blob, pick = src["embedded"], src["blob"], src["pickle"]
    if kind == "truncated":
        data = emb.read_bytes()
        dst.write_bytes(data[:len(data) // 2])
    elif kind == "not-a-zip":
        dst.write_bytes(b"definitely not a zip archive\n" * 100)
    elif kind == "not-pt2":
        rezip(emb, dst, drop=["archive_format"])
    elif kind == "no-so":
        rezip(emb, dst, drop=[".so"])
    elif kind == "so-outside":
        shutil.copy(emb, dst)
        patch_central(dst, ".so", 42, dst.stat().st_size + 4096)     # local header past the end
    elif kind == "so-longer":
        shutil.copy(emb, dst)
        patch_central(dst, ".so", 20, 1 << 31)                       # compressed size
        patch_central(dst, ".so", 24, 1 << 31)
    elif kind == "blob-longer":
        shutil.copy(blob, dst)
        patch_central(dst, "_weights.blob", 20, 1 << 30)
        patch_central(dst, "_weights.blob", 24, 1 << 30)
    elif kind == "so-crc":
        data = bytearray(emb.read_bytes())
        with zipfile.ZipFile(emb) as z:
            info = next(i for i in z.infolist() if i.filename.endswith(".so"))
        at = info.header_offset + 30 + len(info.filename.encode()) + 4096
        data[at:at + 8] = b"\xff" * 8
        dst.write_bytes(bytes(data))
    elif kind in ("blob-crc", "pickle-crc"):
        # one weight byte flipped where aoti_rt reads it in place: only the entry's CRC-32 knows
        src_path, suffix = (blob, "_weights.blob") if kind == "blob-crc" else (pick, "data/weights/weight_0")
        data = bytearray(src_path.read_bytes())
        with zipfile.ZipFile(src_path) as z:
            info = next(i for i in z.infolist() if i.filename.endswith(suffix))
        at = _data_start(data, info.header_offset)
        if kind == "pickle-crc":     # the entry is a torch.save zip: into its storage record
            with zipfile.ZipFile(io.BytesIO(bytes(data[at:at + info.file_size]))) as inner:
                rec = next(i for i in inner.infolist() if i.filename.endswith("/data/0"))
            at = _data_start(data, at + rec.header_offset)
            info = rec
        data[at + info.file_size // 2] ^= 0x40
        dst.write_bytes(bytes(data))
    elif kind == "zip-slip":
        rezip(emb, dst, add={f"{root_of(emb)}/data/aotinductor/model/../../../../evil.so": b"x"})
    elif kind == "bad-model-name":
        rezip(emb, dst, add={f"{root_of(emb)}/data/aotinductor/.hidden/x.so": b"x"})
    elif kind == "duplicate":
        with pytest.warns(UserWarning, match="Duplicate name"):
            rezip(emb, dst, add={f"{root_of(emb)}/archive_format": b"pt2"})
    elif kind == "short-blob":
        rezip(blob, dst, edit={"_weights.blob": lambda b: b[:len(b) // 2]})
    elif kind == "elf-sections":
        # dlopen needs no section headers; finding the embedded weights does
        rezip(emb, dst, edit={".wrapper.so": lambda b: b[:0x28] + struct.pack("<Q", 1 << 40) + b[0x30:]})
    elif kind == "missing-weight-file":
        rezip(pick, dst, drop=["data/weights/weight_1"])
    elif kind == "compressed-pickle":
        rezip(pick, dst, deflate=["data/weights/weight_0"])
    elif kind == "config-lies":
        def lie(b):
            cfg = json.loads(b)
            row = cfg[next(iter(cfg))]
            row[1] = [n * 64 for n in row[1]]               # a view far past its storage
            return json.dumps(cfg).encode()
        rezip(pick, dst, edit={"weights_config.json": lie})
    else:
        raise AssertionError(kind)
    return dst


CRAFTED = {
    "truncated": "truncated|not a zip|not a readable zip",
    "not-a-zip": "not a zip archive",
    "not-pt2": "not a .pt2 package",
    "no-so": "has no compiled .so",
    "so-outside": "past the end|no local header",
    "so-longer": "truncated|past the end",
    "blob-longer": "truncated|past the end",
    "so-crc": "CRC-32",
    "blob-crc": "weights blob .* does not match its CRC-32",
    "pickle-crc": "weights file .* does not match its CRC-32",
    "zip-slip": "points outside",
    "bad-model-name": "not a plain file name",
    "duplicate": "appears twice",
    "short-blob": "truncated or corrupt",
    "elf-sections": "section header",
    "missing-weight-file": "lacks",
    "compressed-pickle": "compressed",
    "config-lies": "does not fit its pickled storage",
}


@pytest.mark.parametrize("kind", list(CRAFTED))
def test_a_crafted_archive_is_a_bundle_error_with_nothing_allocated(stack_pt2, device, tmp_path, kind):
    path = _crafted(kind, stack_pt2, tmp_path)
    before = stats(device)
    with pytest.raises(aoti_rt.BundleError, match=CRAFTED[kind]):
        aoti_rt.load(path, device=device)
    s = stats(device)
    assert s["bytes_allocated"] == before["bytes_allocated"] and s["entries"] == before["entries"]
    # nothing was written outside the cache folder
    assert not (tmp_path / "evil.so").exists() and not (tmp_path.parent / "evil.so").exists()
    assert not any(p.name == "evil.so" for p in package.cache_root().parent.rglob("evil.so"))


def test_compressed_blob_and_so_are_read_from_their_inflated_copies(stack_pt2, device, tmp_path):
    x = torch.randn(3, 64, device=device)
    for src, suffix in ((stack_pt2["blob"], "_weights.blob"), (stack_pt2["embedded"], ".so")):
        path = rezip(src, tmp_path / f"deflated{suffix}.pt2", deflate=[suffix])
        with aoti_rt.load(path, device=device) as model:
            torch.testing.assert_close(model.model(x), eager_stack(device)(x))
        rec = package.inspect_package(path, device)[0][0]
        assert rec.store is not None and (rec.folder() / rec.store).is_file()


def test_naming_models_in_a_mapping(multi_pt2, stack_pt2, device):
    with pytest.raises(aoti_rt.BundleError, match=r"holds models \['a', 'b'\]; name one"):
        aoti_rt.load({"x": multi_pt2}, device=device)
    with pytest.raises(aoti_rt.BundleError, match="has no model 'c'"):
        aoti_rt.load({"x": (multi_pt2, "c")}, device=device)
    with pytest.raises(aoti_rt.BundleError, match="no method 'nope'"):
        aoti_rt.load(multi_pt2, device=device, methods=["nope"])
    with pytest.raises(aoti_rt.BundleError, match="does not exist"):
        aoti_rt.load({"x": stack_pt2["embedded"].with_name("missing.pt2")}, device=device)
    x = torch.randn(3, 64, device=device)
    with aoti_rt.load({"second": (multi_pt2, "b"), "whole": stack_pt2["embedded"]}, device=device) as model:
        assert model.methods == ["second", "whole"]
        torch.testing.assert_close(model.second(x), eager_stack(device, [1, 2])(x))
        assert "multi" in repr(model) and "stack-embedded" in repr(model)
