"""Property test of the exporter -> client wire protocol: a fake exporter on a real socket answers
with malformed messages (every field: sizes, offsets, counts, types; descriptor kinds; truncated
or non-JSON bodies; a slow drip). Whatever it sends, only an AotiRtError leaves the client, no
exchange outlives its deadline, and no descriptor, arena, cache entry or byte is left behind.

``AOTI_RT_SHARE_FUZZ_EXAMPLES`` sets the number of examples (default 30: a few seconds).
"""

from __future__ import annotations

import gc
import itertools
import json
import os
import threading
import time

from hypothesis import HealthCheck, given, settings, strategies as st

import aoti_rt
from aoti_rt import share
from aoti_rt.bundle import read_bundle
from aoti_rt.device import get as runtime
from test_share import _name
from test_share_boundary import _attach_client, _base, _descriptors, _held, _open_fds, _raw_exporter, cpu_lm  # noqa: F401

EXAMPLES = int(os.environ.get("AOTI_RT_SHARE_FUZZ_EXAMPLES", "30"))
DEADLINE = 0.25
_names = itertools.count()

_ints = st.one_of(st.integers(-(1 << 70), 1 << 70), st.sampled_from([0, 1, 255, 256, 4096, 8192, 1 << 16, -1]))
_junk = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=False), st.text(max_size=8), _ints,
                  st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
_arena = st.one_of(st.fixed_dictionaries({"size": _ints, "kind": st.sampled_from(["memfd", "cuda-vmm", 3])}), _junk)
_row = st.one_of(st.tuples(st.text(max_size=4), _ints, st.integers(-2, 3), _ints).map(list),
                 st.lists(_junk, max_size=5), _junk)
_fields = st.fixed_dictionaries({}, optional={
    "arenas": st.one_of(st.lists(_arena, max_size=3), _junk),
    "weights": st.one_of(st.lists(_row, max_size=4), _junk),
    "ok": st.one_of(st.just(True), _junk),
    "protocol": st.one_of(st.just(share.PROTOCOL), _junk),
    "identity": _junk,
    "device": _junk,
    "name": _junk,
})
_wire = st.sampled_from(["json", "truncated", "not-json", "not-object", "huge-length", "empty"])
_fd_kinds = st.sampled_from(["none", "pipe", "file", "small", "good", "two", "many"])


def _encode(form: str, message: dict) -> bytes:
    body = json.dumps(message).encode()
    if form == "truncated":
        return len(body).to_bytes(4, "big") + body[: len(body) // 2]
    if form == "not-json":
        body = b"{not json" + body
    elif form == "not-object":
        body = json.dumps([message]).encode()
    elif form == "huge-length":
        return (share.MAX_MESSAGE + 1).to_bytes(4, "big") + body
    elif form == "empty":
        return b""
    return len(body).to_bytes(4, "big") + body


def test_only_aoti_rt_errors_leave_a_client_and_nothing_leaks(cpu_lm, tmp_path):
    rt = runtime("cpu")
    bundle = read_bundle(cpu_lm)
    base = _base(cpu_lm, rt, "x")

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(fields=_fields, form=_wire, kind=_fd_kinds, drip=st.sampled_from([0.0, 0.0, 0.0, 0.05]))
    def run(fields, form, kind, drip):
        name = _name(f"fuzz{next(_names)}", "cpu")
        message = {"ok": True, "protocol": share.PROTOCOL, **base, "name": name,
                   "arenas": [{"size": 1 << 16, "kind": "memfd"}], **fields}
        fds = _descriptors(kind, 1 << 16, tmp_path / "f")
        fds0, held0 = _open_fds(), _held(rt)
        stop = threading.Event()
        t = _raw_exporter(name, _encode(form, message), fds, drip, stop)
        t0 = time.monotonic()
        try:
            _attach_client(name, bundle, rt, DEADLINE)
        except aoti_rt.AotiRtError:
            pass
        finally:
            elapsed = time.monotonic() - t0
            stop.set()
            t.join(10)
            for fd in fds:
                os.close(fd)
        assert elapsed < DEADLINE + 1.0, (form, kind, drip, elapsed)
        gc.collect()
        assert _open_fds() == fds0 - len(fds), (form, kind)
        assert _held(rt) == held0, (form, kind)

    gc.collect()
    run()
