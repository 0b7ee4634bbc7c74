"""Open one AOTInductor shared object and bind its C entry points once.

A model ``.so`` exports ``extern "C"`` functions whose set depends on the torch release that
compiled it (see the table in the README). :class:`SharedObject` opens the file with
``RTLD_LOCAL`` (ctypes does the ``dlopen``/``dlsym``/``dlclose``), and hands the addresses of
the entry points it knows to a :class:`aoti_rt._bind.ModelABI`: the C ABI declared once, as a
typed struct of function pointers that every call into the .so (metadata, binding, Run) goes
through without Python in between. The ``binary_blob`` layout AOTI reads its weights in is
written here too (:func:`blob_layout`), once for the runtime, the stock loader and the benches.
"""

from __future__ import annotations

import ctypes
import functools
import os
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from . import _bind, elf
from .bundle import is_regular_file, open_regular, pread_all
from .errors import AOTIError, BundleError

#: Generated AOTI code checks each input's dtype, sizes (dynamic ranges too), strides and
#: device against what it was compiled for when this variable is set (not "0"), before any
#: kernel runs. Each loaded .so reads it once, at its first Run: :func:`first_run` sets it
#: for that call only, so that aoti_rt chooses each of its .so's checks and the rest of the
#: process (torch's own loader included) sees the variable as the user left it.
CHECK_INPUTS = "AOTI_RUNTIME_CHECK_INPUTS"
_env_lock = threading.RLock()
_libc = ctypes.CDLL(None)
_libc.getenv.restype = ctypes.c_char_p
_libc.getenv.argtypes = [ctypes.c_char_p]
_libc.setenv.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int]
_libc.unsetenv.argtypes = [ctypes.c_char_p]

T = TypeVar("T")


def first_run(so: "SharedObject", run: Callable[[], T]) -> T:
    """``run()`` (a call into ``so``), made ``so``'s first Run if none was: with
    :data:`CHECK_INPUTS` set to ``so.checks_wanted`` (on unless set False; an explicit "0" in
    the environment keeps them off) for that call, under a process-wide lock, and restored
    after. The C library's ``setenv`` is used, never ``os.environ``, whose update frees the
    string a concurrent ``getenv`` of another thread may be reading; glibc keeps it."""
    with _env_lock:
        if so.input_checks is not None:
            return run()
        key = CHECK_INPUTS.encode()
        old = _libc.getenv(key)
        checks = so.checks_wanted and not (old is not None and old[:1] == b"0")
        _libc.setenv(key, b"1" if checks else b"0", 1)
        try:
            out = run()
            so.input_checks = checks     # the .so has read the variable: its checks are fixed
            return out
        finally:
            if old is None:
                _libc.unsetenv(key)
            else:
                _libc.setenv(key, old, 1)

#: AOTI constant type codes (model_base.h ConstantType)
CONSTANT_KINDS = _bind.CONSTANT_KINDS


@dataclass(frozen=True)
class ConstantInfo:
    """What the C ABI tells about constant ``index`` (no shape, stride or offset)."""

    index: int
    name: str
    fqn: str
    dtype_code: int
    kind: str
    data_size: int
    from_folded: bool

    @property
    def folded(self) -> bool:
        """Computed by the .so itself (run-time constant folding) from the other constants, at
        its first run and again after a re-binding: not in the blob layout, never bound."""
        return self.from_folded or self.kind == "folded"


@dataclass(frozen=True)
class Description:
    """What a .so's C ABI tells about it, read from a container made for the purpose."""

    constants: list[ConstantInfo]
    call_spec: tuple[str, str] | None
    num_inputs: int


def describe(path: str | os.PathLike[str], device: object) -> Description:
    """Open the .so at ``path``, create a container on ``device`` (a .so whose weights are not
    inside it allocates none for them), read its constant table, call spec and input count,
    then delete the container and unload the .so."""
    from .device import device_guard

    so = SharedObject(path)
    try:
        with device_guard(str(device)):     # CreateWithDevice makes its device current
            handle = so.abi.create(str(device))
            try:
                return Description(so.constants(handle), so.abi.call_spec(handle), so.abi.num_inputs(handle))
            finally:
                so.abi.delete(handle)
    finally:
        so.close()


def blob_layout(data_sizes: Sequence[int]) -> tuple[list[int], int]:
    """AOTI's ``binary_blob`` format: ``(offset of each constant, total bytes)``.

    The blob has no header: the non-folded constants' storage bytes in index order, each in
    a slot of its ``GetConstantDataSize`` bytes (``data_sizes[i]``), so the offsets are prefix
    sums. What AOTI reads from a slot is the slot's size; a weight shorter than its slot is
    padded with zeros.
    """
    offsets, at = [], 0
    for n in data_sizes:
        offsets.append(at)
        at += int(n)
    return offsets, at


#: what generated code calls for an operator it has no C shim for (a ``torch.library``
#: custom op, a fallback kernel): only a .so that calls it imports it
PROXY_EXECUTOR_CALL = "aoti_torch_proxy_executor_call_function"


_open_lock = threading.Lock()
#: (resolved path, file identity) -> the SharedObject methods hold, with its user count
_open: dict[tuple, "SharedObject"] = {}


class SharedObject:
    """One opened AOTI ``.so`` with its entry points bound.

    :attr:`abi` (a :class:`aoti_rt._bind.ModelABI`) makes every call: ``abi.create(device)``,
    ``abi.num_inputs(handle)``, ``abi.run(...)``; ``has(name)`` tells whether an optional entry
    point exists.

    Methods share one opened library per file through :meth:`open` / :meth:`release`: the
    last release unloads it (``dlclose``), so a process that loads and closes many bundles
    does not keep every .so it ever ran mapped. A SharedObject made directly (the compiler's
    probe) is unloaded by :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._users = 0
        #: whether its own input checks are to run (:func:`first_run`); its loader sets it
        self.checks_wanted = True
        #: whether they run, once its first Run has read :data:`CHECK_INPUTS` (None: not yet)
        self.input_checks: bool | None = None
        self._key: tuple | None = None
        self._lib = None
        if not is_regular_file(self.path):
            raise BundleError(f"shared object {self.path} does not exist")
        try:
            self._lib = ctypes.CDLL(str(self.path), mode=os.RTLD_LOCAL | os.RTLD_NOW)
        except OSError as e:
            raise AOTIError(f"cannot open {self.path}: {e}") from e
        addresses = {}
        for name in _bind.ENTRY_POINTS:
            try:
                addresses[name] = ctypes.cast(getattr(self._lib, name), ctypes.c_void_p).value
            except AttributeError:
                continue
        try:
            #: the .so's entry points as one typed struct of C function pointers
            self.abi = _bind.ModelABI(addresses, self.path.name)
        except BaseException:
            self.close()
            raise

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> "SharedObject":
        """The shared opened library for ``path``, with one more user; pair with :meth:`release`."""
        p = Path(path)
        try:
            st = p.stat()
        except OSError:
            raise BundleError(f"shared object {p} does not exist") from None
        key = (str(p.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        with _open_lock:
            so = _open.get(key)
            if so is None:
                so = cls(p)
                so._key = key
                _open[key] = so
            so._users += 1
            return so

    def release(self) -> None:
        """One user less; the last one unloads the library."""
        with _open_lock:
            self._users -= 1
            if self._users > 0:
                return
            if _open.get(self._key) is self:
                del _open[self._key]
        self.close()

    def close(self) -> None:
        """Unload the library (every container made from it must have been deleted)."""
        lib, self._lib = self._lib, None
        abi = getattr(self, "abi", None)
        if abi is not None:
            abi.invalidate()        # a call after this raises instead of jumping into unmapped code
        if lib is not None:
            import _ctypes

            _ctypes.dlclose(lib._handle)

    @functools.cached_property
    def calls_proxy_executor(self) -> bool | None:
        """Whether the .so calls operators through AOTI's proxy executor (it imports
        :data:`PROXY_EXECUTOR_CALL`); None where its ELF tables cannot be read. Read once per
        opened file, not per method load."""
        return elf.imports_symbol(self.path, PROXY_EXECUTOR_CALL)

    def has(self, name: str) -> bool:
        """Whether the .so exports entry point ``name`` (with or without the container prefix)."""
        return self.abi.has(name)

    def constants(self, handle: int) -> list[ConstantInfo]:
        """The constant table, in codegen (index) order."""
        return [ConstantInfo(*row) for row in self.abi.constants(handle)]


_shim_lock = threading.Lock()
_shim: dict[str, int] = {}


def torch_shim() -> None:
    """Resolve libtorch's tensor shim functions once and install them where binding uses them."""
    with _shim_lock:
        if not _shim:
            import torch

            lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"),
                              mode=os.RTLD_NOLOAD | os.RTLD_GLOBAL)
            for name in ("aoti_torch_create_tensor_from_blob_v2", "aoti_torch_delete_tensor_object"):
                _shim[name] = ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
            _bind.install_torch_shim(_shim["aoti_torch_create_tensor_from_blob_v2"],
                                     _shim["aoti_torch_delete_tensor_object"])


def blob_bytes_needed(so: Path, device: object) -> int:
    """The bytes of ``binary_blob`` a .so reads: the size its ``_binary_constants_bin_start``
    symbol states (``GetConstantsBlobSize``) or the sum of its non-folded constants'
    ``GetConstantDataSize``, whichever is larger. Torch's runner maps that many bytes of a blob
    without checking the file: check a blob against it before handing it over."""
    what = f"shared object {so}"
    fd, st = open_regular(Path(so), "shared object")
    try:
        secs, syms = elf.symbols(fd, st.st_size, what, {b"_binary_constants_bin_start"})
        start, sec = syms[b"_binary_constants_bin_start"]
        if not 0 < sec < len(secs):
            raise BundleError(f"{what}: its constants symbol is in no section; the .so is corrupt")
        _, kind, _, addr, offset, length, *_ = secs[sec]
        if kind != 1 or not addr <= start <= start + 8 <= addr + length or offset + length > st.st_size:
            raise BundleError(f"{what}: its constants symbol lies outside its section's bytes; the .so is corrupt")
        stated = struct.unpack("<Q", pread_all(fd, 8, offset + start - addr, what))[0]
    finally:
        os.close(fd)
    summed = sum(c.data_size for c in describe(so, device).constants if not c.from_folded)
    return max(stated, summed)
