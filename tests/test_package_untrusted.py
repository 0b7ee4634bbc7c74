"""A ``.pt2`` package, aoti_rt's extraction cache and the spec naming packages are untrusted
input: each attack here is performed for real against ``aoti_rt.load``.

* code planted in the extraction cache (a .so whose constructor writes a marker file):
  in a cache others can write, in the user's own cache with a file swapped after the check
  or under the load, and through a probe record others can write;
* archive bombs (a deflated entry with a huge ratio, central-directory entries sharing one
  entry's bytes) and extractions left behind by a refused package;
* a FIFO given as the model path (a plain open blocks forever);
* malformed package specs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import struct
import subprocess
import threading
import zipfile
import zlib
from pathlib import Path

import pytest
import torch

import aoti_rt
from aoti_rt import package

from models import Subset, make_stack

MARKER_ENV = "AOTI_RT_TEST_MARKER"
PLANTED_C = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    const char *path = getenv("AOTI_RT_TEST_MARKER");
    if (path) { FILE *f = fopen(path, "w"); if (f) { fputs("planted code ran\n", f); fclose(f); } }
}
"""


@pytest.fixture(scope="module")
def planted_so(tmp_path_factory) -> bytes:
    """A shared object whose constructor writes the file $AOTI_RT_TEST_MARKER names."""
    d = tmp_path_factory.mktemp("planted")
    (d / "planted.c").write_text(PLANTED_C)
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the planted .so")
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(d / "planted.so"), str(d / "planted.c")], check=True)
    return (d / "planted.so").read_bytes()


@pytest.fixture
def marker(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "planted-code-ran"
    monkeypatch.setenv(MARKER_ENV, str(path))
    return path


def eager(device):
    return Subset(make_stack(device), [0, 1, 2]).eval()


def use_cache(monkeypatch, where: Path) -> Path:
    monkeypatch.setenv("AOTI_RT_CACHE", str(where))
    return where / "pt2"


def plant(folder: Path, so: str, code: bytes, size: int) -> None:
    """Replace ``folder/so`` (with a new file: a new inode, as an attacker writes it) by ``code``
    padded to ``size`` bytes (the loader ignores bytes past what the ELF headers name)."""
    assert len(code) <= size, "the planted .so must fit the model .so's size"
    tmp = folder / ".planting"
    tmp.write_bytes(code + b"\0" * (size - len(code)))
    os.chmod(tmp, 0o600)
    os.replace(tmp, folder / so)


def learn(path: Path, device, monkeypatch, tmp_path) -> package.ModelRecord:
    """Probe the package once in a scratch cache: the folder name and files an attacker aims at
    are content-addressed, the same in every cache."""
    use_cache(monkeypatch, tmp_path / "scratch")
    return package.inspect_package(path, device)[0][0]


def copy_pt2(stack_pt2, tmp_path, fmt="embedded") -> Path:
    path = tmp_path / "model.pt2"
    shutil.copy(stack_pt2[fmt], path)
    return path


def so_bytes(path: Path) -> bytes:
    """The model .so as the package holds it."""
    with zipfile.ZipFile(path) as z:
        return z.read(next(n for n in z.namelist() if n.endswith(".so")))


def error_of(fn) -> BaseException | None:
    try:
        fn().close()
    except Exception as e:  # noqa: BLE001 - the test checks which
        return e
    return None


def loads_like_eager(path: Path, device, marker: Path) -> None:
    """The package loads and computes what eager does, and no planted constructor ran."""
    x = torch.randn(3, 64, device=device)
    try:
        with aoti_rt.load(path, device=device) as model:
            torch.testing.assert_close(model.model(x), eager(device)(x))
    finally:
        assert not marker.exists(), "the planted .so's constructor ran"


# -- code planted in the extraction cache ------------------------------------------------------

INSECURE = {
    "root-group-writable": lambda base, root, folder: os.chmod(root, 0o770),
    "root-others-writable": lambda base, root, folder: os.chmod(root, 0o777),
    "folder-group-writable": lambda base, root, folder: os.chmod(folder, 0o770),
    "parent-others-writable": lambda base, root, folder: os.chmod(base, 0o777),   # not sticky: root swappable
    "folder-other-owner": lambda base, root, folder: os.chown(folder, 65534, 65534),
}


@pytest.mark.parametrize("how", list(INSECURE))
def test_a_cache_others_can_write_is_refused_and_planted_code_never_runs(stack_pt2, device, tmp_path, monkeypatch,
                                                                          planted_so, marker, how):
    """Another user plants a .so of the right size in the package's content-addressed folder of
    a cache root they can write (AOTI_RT_CACHE=/tmp/..., sudo keeping HOME); the owner's load
    must refuse the cache, naming it and the fix, and never run the planted constructor."""
    if how == "folder-other-owner" and os.geteuid() != 0:
        pytest.skip("giving a folder to another user needs root")
    path = copy_pt2(stack_pt2, tmp_path)
    rec = learn(path, device, monkeypatch, tmp_path)
    learned = rec.folder()
    base = tmp_path / "shared"
    root = use_cache(monkeypatch, base)
    folder = root / rec.dir
    shutil.copytree(learned, folder)                           # the other files, right sizes
    plant(folder, rec.so, planted_so, len(so_bytes(path)))
    INSECURE[how](base, root, folder)
    err = error_of(lambda: aoti_rt.load(path, device=device))
    assert not marker.exists(), "the planted .so's constructor ran"
    assert isinstance(err, aoti_rt.BundleError), repr(err)
    assert re.search(r"package cache folder .* (owned by uid|writable by|which others can write).*AOTI_RT_CACHE",
                     str(err))


def test_a_swapped_file_in_the_users_own_cache_is_extracted_again_never_run(stack_pt2, device, tmp_path,
                                                                            monkeypatch, planted_so, marker):
    """Sizes match, owner and modes are right: only the bytes differ from the package's."""
    path = copy_pt2(stack_pt2, tmp_path)
    rec = learn(path, device, monkeypatch, tmp_path)
    root = use_cache(monkeypatch, tmp_path / "own")
    shutil.copytree(tmp_path / "scratch", tmp_path / "own")     # its record and folder (never dlopen-ed here)
    plant(root / rec.dir, rec.so, planted_so, len(so_bytes(path)))
    loads_like_eager(path, device, marker)
    assert (root / rec.dir / rec.so).read_bytes() == so_bytes(path)          # extracted anew


def test_a_file_swapped_under_the_load_is_a_bundle_error_never_run(stack_pt2, device, tmp_path, monkeypatch,
                                                                  planted_so, marker):
    """The swap lands after the record's check, just before the method locks its folder: the
    check that counts is the one right before the .so is opened."""
    path = copy_pt2(stack_pt2, tmp_path)
    rec = learn(path, device, monkeypatch, tmp_path)
    root = use_cache(monkeypatch, tmp_path / "own")
    shutil.copytree(tmp_path / "scratch", tmp_path / "own")     # its record and folder (never dlopen-ed here)
    real = package._hold

    def swapped(folder, files):
        plant(folder, rec.so, planted_so, len(so_bytes(path)))
        return real(folder, files)

    monkeypatch.setattr(package, "_hold", swapped)
    err = error_of(lambda: aoti_rt.load(path, device=device))
    assert not marker.exists(), "the planted .so's constructor ran"
    assert isinstance(err, aoti_rt.BundleError) and re.search("CRC-32.*load again", str(err)), repr(err)
    monkeypatch.setattr(package, "_hold", real)
    loads_like_eager(path, device, marker)                    # the next load extracts it anew
    assert (root / rec.dir / rec.so).read_bytes() == so_bytes(path)


def test_a_probe_record_others_can_write_is_never_trusted(stack_pt2, device, tmp_path, monkeypatch, planted_so,
                                                         marker):
    """A record names the folder and the checksums its files are checked against: one that is
    not the user's own and private is ignored (probed and written again), not followed to a
    planted folder."""
    path = copy_pt2(stack_pt2, tmp_path)
    root = use_cache(monkeypatch, tmp_path / "own")
    rec = package.inspect_package(path, device)[0][0]
    evil = root / ("f" * 64)
    shutil.copytree(rec.folder(), evil)
    plant(evil, rec.so, planted_so, len(planted_so))
    rp = package._record_path(path)
    raw = json.loads(rp.read_text())
    m = raw["models"][0]
    m["dir"] = evil.name
    old = m["files"][rec.so]
    m["files"][rec.so] = [len(planted_so), zlib.crc32(planted_so)] if isinstance(old, list) else len(planted_so)
    rp.write_text(json.dumps(raw))
    os.chmod(rp, 0o666)
    loads_like_eager(path, device, marker)
    assert json.loads(rp.read_text())["models"][0]["dir"] == rec.dir      # rewritten by the new probe
    assert stat.S_IMODE(rp.stat().st_mode) & 0o022 == 0


def test_the_cache_is_created_private(stack_pt2, device, tmp_path, monkeypatch):
    root = use_cache(monkeypatch, tmp_path / "new" / "cache")
    rec = package.inspect_package(copy_pt2(stack_pt2, tmp_path), device)[0][0]
    for p in (root, root / "records", rec.folder()):
        assert stat.S_IMODE(p.stat().st_mode) == 0o700, p
    assert all(stat.S_IMODE((rec.folder() / f).stat().st_mode) == 0o600 for f in rec.files)


# -- archive bombs and leftovers ---------------------------------------------------------------

def rewrite(src: Path, dst: Path, add: dict[str, tuple[bytes, int]]) -> Path:
    """Copy a package entry by entry (stored, as torch writes them) and add entries
    ``name -> (bytes, compression)`` to its model's folder."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(zipfile.ZipInfo(info.filename), zin.read(info.filename), compress_type=zipfile.ZIP_STORED)
        model = next(n for n in zin.namelist() if n.endswith(".so")).rpartition("/")[0]
        for name, (data, method) in add.items():
            zout.writestr(zipfile.ZipInfo(f"{model}/{name}"), data, compress_type=method)
    return dst


def point_at(path: Path, names: list[str], target: str) -> None:
    """Make the central-directory records of ``names`` describe ``target``'s bytes: its local
    header offset, CRC-32 and sizes (the names stay: each would be extracted on its own)."""
    data = bytearray(path.read_bytes())
    records = {}
    i = data.find(b"PK\x01\x02")
    while i >= 0:
        nlen, xlen, clen = struct.unpack_from("<HHH", data, i + 28)
        records[bytes(data[i + 46:i + 46 + nlen]).decode().rpartition("/")[2]] = i
        i = data.find(b"PK\x01\x02", i + 46 + nlen + xlen + clen)
    t = records[target]
    for n in names:
        data[records[n] + 16:records[n] + 28] = data[t + 16:t + 28]       # CRC-32, both sizes
        data[records[n] + 42:records[n] + 46] = data[t + 42:t + 46]       # local header offset
    path.write_bytes(bytes(data))


def cache_contents(root: Path) -> list[str]:
    """Everything under the cache root but probe records."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.relative_to(root).parts[0] != "records") if root.exists() else []


def test_a_deflated_entry_with_a_bomb_ratio_is_refused_before_anything_is_extracted(stack_pt2, device, tmp_path,
                                                                                     monkeypatch):
    root = use_cache(monkeypatch, tmp_path / "cache")
    # past the per-entry ratio, yet within what the whole archive may extract (the check under
    # test, not the archive-wide cap), whatever the package's size on this device
    size = max(2 << 20, min(64 << 20, 30 * Path(stack_pt2["embedded"]).stat().st_size))
    path = rewrite(stack_pt2["embedded"], tmp_path / "bomb.pt2",
                   {"kernels.cubin": (b"\0" * size, zipfile.ZIP_DEFLATED)})
    with zipfile.ZipFile(path) as z:
        bomb = next(i for i in z.infolist() if i.filename.endswith("kernels.cubin"))
    assert bomb.compress_size * 100 < bomb.file_size < 40 * path.stat().st_size
    with pytest.raises(aoti_rt.BundleError, match=r"kernels.cubin' inflates from .* more than 16 times.*zip -0"):
        aoti_rt.load(path, device=device)
    assert cache_contents(root) == []


def test_entries_sharing_one_entrys_bytes_are_refused(stack_pt2, device, tmp_path, monkeypatch):
    """Eight central-directory entries naming one stream would extract it eight times."""
    root = use_cache(monkeypatch, tmp_path / "cache")
    names = [f"kernel{i}.cubin" for i in range(8)]
    path = rewrite(stack_pt2["embedded"], tmp_path / "overlap.pt2",
                   {n: (os.urandom(1 << 20) if n == names[0] else b"x", zipfile.ZIP_STORED) for n in names})
    point_at(path, names[1:], names[0])
    with pytest.raises(aoti_rt.BundleError, match=r"overlap"):
        aoti_rt.load(path, device=device)
    assert cache_contents(root) == []


def _unfindable_weights(stack_pt2, tmp_path) -> Path:
    """A package refused after its files are extracted: its .so's section headers point far
    past the file (dlopen needs none, finding the embedded weights does)."""
    with zipfile.ZipFile(stack_pt2["embedded"]) as z:
        so = next(i.filename for i in z.infolist() if i.filename.endswith(".so"))
        data = {i.filename: z.read(i.filename) for i in z.infolist()}
    data[so] = data[so][:0x28] + struct.pack("<Q", 1 << 40) + data[so][0x30:]
    path = tmp_path / "refused.pt2"
    with zipfile.ZipFile(path, "w") as z:
        for name, b in data.items():
            z.writestr(zipfile.ZipInfo(name), b)
    return path


def test_a_package_refused_after_extraction_leaves_nothing_in_the_cache(stack_pt2, device, tmp_path, monkeypatch):
    root = use_cache(monkeypatch, tmp_path / "cache")
    with pytest.raises(aoti_rt.BundleError, match="section header"):
        aoti_rt.load(_unfindable_weights(stack_pt2, tmp_path), device=device)
    assert cache_contents(root) == []


def test_an_interrupted_probe_leaves_nothing_in_the_cache(stack_pt2, device, tmp_path, monkeypatch):
    root = use_cache(monkeypatch, tmp_path / "cache")

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(package, "_probe", interrupted)
    with pytest.raises(KeyboardInterrupt):
        aoti_rt.load(copy_pt2(stack_pt2, tmp_path), device=device)
    assert cache_contents(root) == []


# -- non-blocking opens ------------------------------------------------------------------------

def _load_guarded(spec) -> BaseException | None:
    """aoti_rt.load(spec) in a thread: a load that blocks on a FIFO is released (a writer opens
    and closes it) and reported as a failure, so a regression cannot hang the test run."""
    out: dict[str, BaseException] = {}

    def run():
        try:
            aoti_rt.load(spec).close()
        except BaseException as e:  # noqa: BLE001 - reported to the test
            out["e"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(60)
    if t.is_alive():
        for fifo in [spec] if not isinstance(spec, dict) else list(spec.values()):
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        t.join(60)
        pytest.fail(f"aoti_rt.load({spec!r}) blocked on a FIFO")
    return out.get("e")


@pytest.mark.parametrize("name", ["model", "model.pt2", "mapping"])
def test_a_fifo_is_a_bundle_error_not_a_hang(tmp_path, name):
    fifo = tmp_path / ("model.pt2" if name == "mapping" else name)
    os.mkfifo(fifo)
    err = _load_guarded({"m": fifo} if name == "mapping" else fifo)
    assert isinstance(err, aoti_rt.BundleError), repr(err)
    assert "not a regular file" in str(err)


# -- package specs -----------------------------------------------------------------------------

@pytest.mark.parametrize("spec, names", [
    ({"m": 5}, r"packages\['m'\]: 5 is not a \.pt2 path"),
    ({"m": None}, r"packages\['m'\]: None"),
    ({"m": ("a.pt2", "model", "extra")}, r"packages\['m'\]: .* is not \(path, model name\)"),
    ({"m": ("a.pt2", 5)}, r"packages\['m'\]: .* is not \(path, model name\)"),
    ({"m": (5, "model")}, r"packages\['m'\]: 5 is not a \.pt2 path"),
    ({"m": b"a.pt2"}, r"packages\['m'\]: b'a.pt2' is not a \.pt2 path"),
    ({5: "a.pt2"}, r"method names must be non-empty strings, not 5"),
    ({}, r"no packages given"),
], ids=["int", "none", "3-tuple", "model-int", "path-int", "bytes", "method-int", "empty"])
def test_a_malformed_package_spec_is_a_bundle_error_naming_the_entry(spec, names):
    with pytest.raises(aoti_rt.BundleError, match=names):
        aoti_rt.load(spec)


def test_the_probe_reopening_a_weights_file_refuses_a_fifo_put_in_its_place(tmp_path):
    """The probe reopens the file it hashes weights from by path: a FIFO swapped in meanwhile is
    a BundleError at once, never an open that waits for a writer."""
    from aoti_rt.probe import OpenFile

    fifo = tmp_path / "model.pt2"
    os.mkfifo(fifo)
    got: list[BaseException | None] = []

    def reopen() -> None:
        try:
            OpenFile(fifo)
            got.append(None)
        except BaseException as e:  # noqa: BLE001 - handed to the test's thread
            got.append(e)

    t = threading.Thread(target=reopen, daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():                   # unblock the open, so the thread ends with the test
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("the probe's reopen blocked on a FIFO")
    assert isinstance(got[0], aoti_rt.BundleError) and "not a regular file" in str(got[0])

