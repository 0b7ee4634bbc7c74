"""``aoti_rt.load``: the API's edge, where a path, a device and options become a loaded model.

Above :mod:`aoti_rt.runtime` (bundles) and :mod:`aoti_rt.package` (``.pt2`` packages), so that
neither imports the other's loader: the options are checked and converted here once
(``verify`` to a :class:`~aoti_rt.acquire.Verify`).
"""

from __future__ import annotations

import os
import stat
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, overload

from . import device as _device
from .acquire import Verify
from .bundle import read_bundle
from .device import Device
from .errors import BundleError, OptionError, ShareError, ShareUnavailableError
from .package import load_package
from .runtime import Model, device_for
from .share import check_name

__all__ = ["load"]


@overload
def load(path: "str | Path | Mapping[str, Any]", *, device: "str | Device | None" = None,
         methods: Sequence[str] | None = None, progress: bool | None = None, verify: "Verify | bool | str" = True,
         max_load_gbps: float | None = None, share: str | None = None, share_required: bool = False) -> Model: ...


@overload
def load(path: "str | Path | Mapping[str, Any]", *, device: "list[str | Device] | tuple[str | Device, ...]",
         methods: Sequence[str] | None = None, progress: bool | None = None, verify: "Verify | bool | str" = True,
         max_load_gbps: float | None = None, share: None = None, share_required: bool = False) -> list[Model]: ...


def load(path: "str | Path | Mapping[str, Any]", *,
         device: "str | Device | list[str | Device] | tuple[str | Device, ...] | None" = None,
         methods: Sequence[str] | None = None, progress: bool | None = None, verify: "Verify | bool | str" = True,
         max_load_gbps: float | None = None, share: str | None = None,
         share_required: bool = False) -> "Model | list[Model]":
    """Load a bundle written by :func:`aoti_rt.compile`, or ``.pt2`` packages.

    Args:
        path: the bundle directory; or a ``.pt2`` file (``aoti_compile_and_package``,
            ``package_aoti``: one method per AOTI model in it), or a mapping of method name to
            ``.pt2`` file (or ``(file, model name)``), loaded as one model
            (:func:`aoti_rt.package.load_package`).
        device: "cpu", "cuda" (torch's current CUDA device, as for torch) or "cuda:N";
            default: "cpu" for a CPU bundle, the current CUDA device for a CUDA one. A list
            (or tuple) of devices loads one model per device and returns them in that order:
            each device's cache holds its own copy, each model its own state, and a bundle's
            store is read once for all of them (the weights a device lacks are copied to it
            from the same staging buffer as the others'; ``.pt2`` packages are loaded once per
            device). List each device once, all CUDA (or just ``["cpu"]``).
        methods: load only these methods (default: all).
        progress: show a progress bar while loading (default: for loads of 2 GiB or more,
            when stderr is a terminal).
        verify: how far to trust the store's digests. ``True`` (default): weights are
            shared with other loaded bundles only once verified, on demand, by hashing the
            store a cached copy was read from (BLAKE3), so a lying or corrupt bundle can never
            change what another computes, and a load that shares nothing hashes nothing.
            ``"load"``: also check every weight read while loading (a corrupt store is a
            :class:`BundleError` at once; the loader's threads hash as they read, slower).
            ``False``: never hash; this bundle's weights are shared among its own methods
            and instances only. An :class:`aoti_rt.Verify` says the same (``ON_DEMAND``,
            ``LOAD``, ``NEVER``); any other value is an :class:`~aoti_rt.errors.OptionError`
            (a ``ValueError``).
        max_load_gbps: cap the loader's host->device rate (GB/s, 1e9 bytes/s), so a model
            loading next to one that is serving leaves it copy bandwidth (default: no cap;
            with a list of devices, each device's rate).
        share: a name (1-64 of ``A-Z a-z 0-9 . _ -``) under which processes of this user on
            this device hold one copy of the bundle's weights. If a process serves ``name``,
            this one maps its weights read-only and reads none of them (only its own mutable
            state, a KV cache, is allocated and read); otherwise it loads them into memory it
            can share and serves ``name`` until the model is closed. A bundle directory on one
            device only (not ``.pt2`` packages, not a list of devices). See
            :mod:`aoti_rt.serving` and ``model.share``.
        share_required: what to do when sharing is impossible now
            (:class:`~aoti_rt.errors.ShareUnavailableError`: the name is held by another user's
            process, the exporter did not answer within ``$AOTI_RT_SHARE_TIMEOUT`` seconds, the
            device or kernel cannot share memory). ``False`` (default): warn and load the
            weights privately (``model.share`` is None); ``True``: raise.

    Returns:
        The :class:`Model` (a list of them, one per device, for a list of devices); close
        it (or use ``with``) to release its memory.

    Raises:
        OptionError: ``verify`` or ``max_load_gbps`` has a value it does not take.
        BundleError: the bundle (or package) is missing, corrupt or inconsistent, or was
            compiled for another device type. DeviceError: a device is unknown or absent, or a
            list names one twice or mixes the CPU with GPUs. ShareError: ``share=`` is served
            for another bundle or device, or its exporter answered what aoti_rt does not say;
            ShareNameError (a ValueError too): ``share`` cannot name a share;
            ShareUnavailableError: sharing is impossible now and ``share_required=True``.
            AOTIError, AllocationError, CudaError: see their docs. A failed load leaves nothing
            allocated on any device.

    Example:
        >>> with aoti_rt.load("lm.aoti", device="cuda") as model:
        ...     logits = model.prefill(tokens)
        >>> lm = aoti_rt.load({"prefill": "prefill.pt2", "decode": "decode.pt2"}, device="cuda")
        >>> m0, m1 = aoti_rt.load("lm.aoti", device=["cuda:0", "cuda:1"])   # the store read once
    """
    if max_load_gbps is not None and not max_load_gbps > 0:
        raise OptionError(f"max_load_gbps must be a positive number of GB/s, not {max_load_gbps!r}")
    verify = Verify.of(verify)
    many = isinstance(device, (list, tuple))
    if isinstance(path, Mapping) or (isinstance(path, (str, os.PathLike)) and _is_package(path)):
        if share is not None:
            raise ShareError("share= takes a bundle directory (what aoti_rt.compile writes); .pt2 packages "
                             "are not shared across processes: compile the model with aoti_rt.compile, or "
                             "load the package without share=")
        if not many:
            return load_package(path, device=device, methods=methods, progress=progress, verify=verify,
                                max_load_gbps=max_load_gbps)
        out: list[Model] = []
        try:
            for d in _device.parse_devices(device):
                out.append(load_package(path, device=d, methods=methods, progress=progress, verify=verify,
                                        max_load_gbps=max_load_gbps))
        except BaseException:
            for m in out:
                m.close()
            raise
        return out
    bundle = read_bundle(path)
    compiled = "cpu" if bundle.manifest.device == "cpu" else "cuda"
    devs = _device.parse_devices(device, default=compiled) if many else [device_for(device, compiled)]
    if devs[0].kind != compiled:
        raise BundleError(f"{path} was compiled for {bundle.manifest.device}; an AOTI .so runs only "
                          f"on the device type it was compiled for, so load it on {compiled}")
    if share is not None:
        check_name(share)
    if many:
        if share is not None:
            raise ShareError("share= takes one device: load once per device, each with its own name")
        return Model.replicated(bundle, devs, methods=methods, progress=progress, verify=verify,
                                max_load_gbps=max_load_gbps)
    try:
        return Model(bundle, devs[0], methods=methods, progress=progress, verify=verify,
                     max_load_gbps=max_load_gbps, share=share)
    except ShareUnavailableError as e:
        if share is None or share_required:
            raise
        warnings.warn(f"share {share!r}: {e}. Loading the weights privately in this process (pass "
                      f"share_required=True to raise instead)", RuntimeWarning, stacklevel=2)
    return Model(bundle, devs[0], methods=methods, progress=progress, verify=verify, max_load_gbps=max_load_gbps)


def _is_package(path: "str | os.PathLike[str]") -> bool:
    """A ``.pt2`` name, or a file that starts like a zip archive (a bundle is a directory).
    Opened without blocking (a FIFO would block a plain open forever); a path that is neither
    a folder nor a regular file (a FIFO, a device) is a BundleError."""
    if os.fspath(path).endswith(".pt2"):
        return True
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    try:
        fd = os.open(path, flags)
    except (OSError, ValueError):
        return False                  # missing or unreadable: read_bundle says what is wrong
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            return False
        if not stat.S_ISREG(st.st_mode):
            raise BundleError(f"{path} is not an aoti_rt bundle or a .pt2 file (it is not a regular file: a FIFO, "
                              f"socket or device); pass the path of an aoti_rt bundle or a .pt2 package")
        return os.pread(fd, 4, 0) == b"PK\x03\x04"
    except OSError:
        return False
    finally:
        os.close(fd)
