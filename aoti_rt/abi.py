"""ctypes binding of one AOTInductor shared object's C entry points.

A model ``.so`` exports ``extern "C"`` functions whose set depends on the torch release that
compiled it (see the table in the README). :class:`SharedObject` opens the file with
``RTLD_LOCAL``, binds every entry point it knows once, records which optional ones exist,
and wraps the metadata queries. The hot calls (Run, the Pairs update) are made from Cython
through the addresses kept in :attr:`SharedObject.addresses`.
"""

from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from .bundle import is_regular_file
from .errors import AOTIError, BundleError

_P = "AOTInductorModelContainer"

# Generated AOTI code checks each input's dtype, sizes (dynamic ranges too), strides and device
# against what it was compiled for when this is set, before any kernel runs; without it, an
# input that disagrees with the .so is read out of bounds. Each .so reads it once, at its first
# call, so it is set before any is loaded. An explicit "0" from the user is respected.
os.environ.setdefault("AOTI_RUNTIME_CHECK_INPUTS", "1")
_c_size_p = ctypes.POINTER(ctypes.c_size_t)
_c_char_pp = ctypes.POINTER(ctypes.c_char_p)

#: entry point -> (argtypes, required). Every one returns AOTIRuntimeError (int32, 0 = ok).
ENTRY_POINTS: dict[str, tuple[list, bool]] = {
    _P + "CreateWithDevice": ([ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_char_p, ctypes.c_char_p], True),
    _P + "Delete": ([ctypes.c_void_p], True),
    _P + "Run": ([ctypes.c_void_p] * 7, True),
    _P + "GetNumInputs": ([ctypes.c_void_p, _c_size_p], True),
    _P + "GetNumOutputs": ([ctypes.c_void_p, _c_size_p], True),
    _P + "GetNumConstants": ([ctypes.c_void_p, _c_size_p], True),
    _P + "GetConstantName": ([ctypes.c_void_p, ctypes.c_size_t, _c_char_pp], True),
    _P + "GetConstantOriginalFQN": ([ctypes.c_void_p, ctypes.c_size_t, _c_char_pp], True),
    _P + "GetConstantDtype": ([ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_int32)], True),
    _P + "GetConstantType": ([ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_int32)], False),
    _P + "GetConstantDataSize": ([ctypes.c_void_p, ctypes.c_size_t, _c_size_p], False),
    _P + "GetConstantFromFolded": ([ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_bool)], False),
    _P + "GetCallSpec": ([ctypes.c_void_p, _c_char_pp, _c_char_pp], False),
    _P + "GetInputName": ([ctypes.c_void_p, ctypes.c_size_t, _c_char_pp], False),
    _P + "GetOutputName": ([ctypes.c_void_p, ctypes.c_size_t, _c_char_pp], False),
    _P + "UpdateUserManagedConstantBufferPairs": ([ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_bool, ctypes.c_bool], False),
    _P + "GetConstantsBlobSize": ([ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint64)], False),
    "AOTInductorModelUpdateConstantsFromBlob": ([ctypes.c_void_p, ctypes.c_void_p], False),
    "AOTInductorGetLastError": ([_c_char_pp], False),
}

#: AOTI constant type codes (model_base.h ConstantType)
CONSTANT_KINDS = {0: "unknown", 1: "parameter", 2: "buffer", 3: "tensor_constant", 4: "folded"}


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


_open_lock = threading.Lock()
#: (resolved path, file identity) -> the SharedObject methods hold, with its user count
_open: dict[tuple, "SharedObject"] = {}


class SharedObject:
    """One opened AOTI ``.so`` with its entry points bound.

    ``has(name)`` tells whether an optional entry point exists; ``addresses`` maps entry
    point names to C function addresses for the Cython hot paths.

    Methods share one opened library per file through :meth:`open` / :meth:`release`: the
    last release unloads it (``dlclose``), so a process that loads and closes many bundles
    does not keep every .so it ever ran mapped. A SharedObject made directly (the compiler's
    probe) is unloaded by :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._users = 0
        self._key: tuple | None = None
        if not is_regular_file(self.path):
            raise BundleError(f"shared object {self.path} does not exist")
        try:
            self._lib = ctypes.CDLL(str(self.path), mode=os.RTLD_LOCAL | os.RTLD_NOW)
        except OSError as e:
            raise AOTIError(f"cannot open {self.path}: {e}") from e
        self._fns: dict[str, ctypes._CFuncPtr] = {}
        self.addresses: dict[str, int] = {}
        missing = []
        for name, (argtypes, required) in ENTRY_POINTS.items():
            try:
                fn = getattr(self._lib, name)
            except AttributeError:
                if required:
                    missing.append(name)
                continue
            fn.argtypes = argtypes
            fn.restype = ctypes.c_int32
            self._fns[name] = fn
            self.addresses[name] = ctypes.cast(fn, ctypes.c_void_p).value
        if missing:
            self.close()
            raise AOTIError(
                f"{self.path} is not a usable AOTInductor model: it lacks {', '.join(missing)}. "
                "Compile it with torch._inductor.aot_compile / aoti_rt.compile.")

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
        lib, self._lib = getattr(self, "_lib", None), None
        self._fns = {}
        self.addresses = {}
        if lib is not None:
            import _ctypes

            _ctypes.dlclose(lib._handle)

    def has(self, name: str) -> bool:
        return name in self._fns or (_P + name) in self._fns

    def call(self, name: str, *args) -> None:
        """Call an entry point; raise :class:`AOTIError` with AOTI's message on failure."""
        fn = self._fns.get(name) or self._fns.get(_P + name)
        if fn is None:
            why = "it was unloaded" if self._lib is None else "it has none"
            raise AOTIError(f"{self.path.name} has no entry point {name} ({why})")
        rc = fn(*args)
        if rc != 0:
            raise AOTIError(f"{name} failed in {self.path.name}: {self.last_error() or 'see stderr'}")

    def last_error(self) -> str:
        """AOTI's message for the last failed call on this thread (torch >= 2.13 .so files)."""
        fn = self._fns.get("AOTInductorGetLastError")
        if fn is None:
            return ""
        msg = ctypes.c_char_p()
        if fn(ctypes.byref(msg)) != 0 or not msg.value:
            return ""
        return msg.value.decode(errors="replace")

    # -- container lifecycle --------------------------------------------------------------

    def create(self, device: str) -> int:
        """Create a container for ``device`` ("cpu", "cuda:N"); returns its handle."""
        handle = ctypes.c_void_p()
        self.call(_P + "CreateWithDevice", ctypes.byref(handle), 1, device.encode(), None)
        if not handle.value:
            raise AOTIError(f"CreateWithDevice returned no container for {self.path.name}")
        return handle.value

    def delete(self, handle: int) -> None:
        self.call(_P + "Delete", ctypes.c_void_p(handle))

    # -- metadata -------------------------------------------------------------------------

    def _size(self, name: str, handle: int) -> int:
        out = ctypes.c_size_t()
        self.call(name, ctypes.c_void_p(handle), ctypes.byref(out))
        return out.value

    def num_inputs(self, handle: int) -> int:
        return self._size(_P + "GetNumInputs", handle)

    def num_outputs(self, handle: int) -> int:
        return self._size(_P + "GetNumOutputs", handle)

    def num_constants(self, handle: int) -> int:
        return self._size(_P + "GetNumConstants", handle)

    def call_spec(self, handle: int) -> tuple[str, str] | None:
        if not self.has("GetCallSpec"):
            return None
        a, b = ctypes.c_char_p(), ctypes.c_char_p()
        self.call(_P + "GetCallSpec", ctypes.c_void_p(handle), ctypes.byref(a), ctypes.byref(b))
        return (a.value or b"").decode(), (b.value or b"").decode()

    def constants(self, handle: int) -> list[ConstantInfo]:
        """The constant table, in codegen (index) order."""
        h = ctypes.c_void_p(handle)
        out = []
        for i in range(self.num_constants(handle)):
            idx = ctypes.c_size_t(i)
            name, fqn = ctypes.c_char_p(), ctypes.c_char_p()
            dtype, ctype = ctypes.c_int32(), ctypes.c_int32(0)
            size, folded = ctypes.c_size_t(0), ctypes.c_bool(False)
            self.call(_P + "GetConstantName", h, idx, ctypes.byref(name))
            self.call(_P + "GetConstantOriginalFQN", h, idx, ctypes.byref(fqn))
            self.call(_P + "GetConstantDtype", h, idx, ctypes.byref(dtype))
            if self.has("GetConstantType"):
                self.call(_P + "GetConstantType", h, idx, ctypes.byref(ctype))
            if self.has("GetConstantDataSize"):
                self.call(_P + "GetConstantDataSize", h, idx, ctypes.byref(size))
            if self.has("GetConstantFromFolded"):
                self.call(_P + "GetConstantFromFolded", h, idx, ctypes.byref(folded))
            out.append(ConstantInfo(i, name.value.decode(), fqn.value.decode(), dtype.value,
                                    CONSTANT_KINDS.get(ctype.value, "unknown"), size.value,
                                    bool(folded.value)))
        return out

    def update_constants_from_blob(self, handle: int, blob_address: int) -> None:
        """The stock (unshared) way: AOTI copies a whole ``binary_blob`` into its own buffer."""
        self.call("AOTInductorModelUpdateConstantsFromBlob", ctypes.c_void_p(handle),
                  ctypes.c_void_p(blob_address))


_shim_lock = threading.Lock()
_shim: dict[str, int] = {}


def torch_shim() -> dict[str, int]:
    """Addresses of the libtorch shim functions the binder calls (resolved once)."""
    with _shim_lock:
        if not _shim:
            import torch

            lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"),
                              mode=os.RTLD_NOLOAD | os.RTLD_GLOBAL)
            for name in ("aoti_torch_create_tensor_from_blob_v2", "aoti_torch_delete_tensor_object"):
                _shim[name] = ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
        return dict(_shim)
