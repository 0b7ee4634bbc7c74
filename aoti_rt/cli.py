"""``python -m aoti_rt``: inspect bundles, run the demo, run the benchmarks."""

from __future__ import annotations

import argparse
import sys

from .errors import AotiRtError

DESCRIPTION = """\
aoti_rt runs multi-method AOTInductor models (an LLM's prefill and decode, an encoder and a
decoder) keeping one copy of each weight in device memory, however many methods use it.

commands:
  demo      compile (once) and run a tiny LM with prefill/decode, check it against eager
            PyTorch and print the memory report
  inspect   show a bundle's methods, constants, shared vs private bytes and dedup ratio
  verify    re-hash every weight of a bundle's store against its manifest
  load      load a bundle on a device and print its cache stats and memory report
  serve-weights
            hold a bundle's weights on a device for other processes of this user: each
            process that loads the bundle with aoti_rt.load(BUNDLE, device=D, share=NAME)
            maps them read-only instead of reading its own copy, and allocates only its
            own state (a KV cache); NAME defaults to the bundle directory's name. Prints one
            line when it serves; serves until SIGINT or SIGTERM (clients keep what they
            mapped after it stops)
  cache     show what the .pt2 package cache holds (extracted .so files and kernels, probe
            records); --prune removes what belongs to packages that are gone or changed
  bench     run the benchmark suite (bench/ in a source checkout) and write tables + JSON
  llm       export a transformers causal LM to a prefill/decode bundle, generate from one
            (python -m aoti_rt llm --help; needs pip install 'aoti_rt[llm]')
"""

SERVE_HELP = """\
Hold a bundle's weights on a device for other processes of this user.

A process that loads the bundle with aoti_rt.load(BUNDLE, device=D, share=NAME) on the same
device maps these weights read-only (one copy in memory, nothing read from disk) and allocates
only its own mutable state (a KV cache). Only processes of this user may attach. The weights are
hashed while loading (verify="load"), so copies of the bundle elsewhere may attach too.
Prints one line when it serves, then serves until SIGINT or SIGTERM. Processes attached when it
stops keep running on what they mapped (the memory goes with the last of them); a later load
with the same NAME then serves the weights itself.
"""


def _inspect(args: argparse.Namespace) -> int:
    from .bundle import human_bytes, read_bundle

    b = read_bundle(args.bundle)
    man = b.manifest
    users: dict[str, set[str]] = {}
    for name, m in man.methods.items():
        for c in m.constants:
            users.setdefault(c.weight, set()).add(name)
    unique = man.unique_weight_bytes()
    shared = sum(man.weights[w].nbytes for w, u in users.items() if len(u) > 1)
    per_method = sum(man.per_method_bytes(n) for n in man.methods)
    store_bytes = b.store_path.stat().st_size
    print(f"bundle   {b.root}")
    print(f"device   {man.device}   torch {man.torch_version}   format v{man.version}")
    print(f"store    {b.store_path.name}: {human_bytes(store_bytes)} on disk, {len(man.weights)} weights")
    print()
    print(f"{'method':<16}{'constants':>10}{'weights':>10}{'bytes':>14}{'shared':>14}{'private':>14}{'mutable':>9}")
    for name, m in man.methods.items():
        ws = {c.weight for c in m.constants}
        sh = sum(man.weights[w].nbytes for w in ws if len(users[w]) > 1)
        tot = sum(man.weights[w].nbytes for w in ws)
        mut = sum(1 for w in ws if man.weights[w].mutable)
        print(f"{name:<16}{len(m.constants):>10}{len(ws):>10}{human_bytes(tot):>14}{human_bytes(sh):>14}"
              f"{human_bytes(tot - sh):>14}{mut:>9}")
    print()
    print(f"unique weight bytes      {human_bytes(unique)} ({unique} B)")
    print(f"shared by >1 method      {human_bytes(shared)}")
    print(f"per-method loading       {human_bytes(per_method)}")
    print(f"dedup ratio              {per_method / max(unique, 1):.2f}x  (per-method bytes / unique bytes)")
    if args.constants:
        for name, m in man.methods.items():
            print(f"\n[{name}]")
            for c in m.constants:
                flag = "mutable" if c.mutable else ""
                print(f"  {c.name:<32} {c.fqn:<32} {c.dtype:<9} {str(c.shape):<18} {c.kind:<10} {flag}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .bundle import read_bundle
    from .digest import file_digests

    b = read_bundle(args.bundle)     # the store is checked to hold every weight's bytes
    weights = list(b.manifest.weights.items())
    got = file_digests(b.store_path, [(w.offset, w.nbytes) for _, w in weights])
    bad = 0
    for (wid, w), digest in zip(weights, got):
        if digest != w.digest:
            bad += 1
            print(f"CORRUPT  {w.tensor} ({wid})")
    print(f"{len(weights) - bad} of {len(weights)} weights match their digests")
    return 1 if bad else 0


def _load(args: argparse.Namespace) -> int:
    import time

    import aoti_rt

    t0 = time.perf_counter()
    with aoti_rt.load(args.bundle, device=args.device) as model:
        seconds = time.perf_counter() - t0
        stats = aoti_rt.cache_stats(model.device)
        print(f"loaded {model.methods} on {model.device} in {seconds * 1e3:.1f} ms")
        print("  ".join(f"{k}={stats[k]}" for k in ("entries", "bytes_allocated", "bytes_read", "hits", "misses")))
        print(aoti_rt.memory_report(model.device).line())
    return 0


def default_share_name(bundle: str) -> str:
    """A share name from a bundle path: its directory's name, in the characters a name allows."""
    import os
    import re

    base = os.path.basename(os.path.normpath(bundle)) or "bundle"
    name = re.sub(r"[^A-Za-z0-9._-]", "-", base).lstrip("._-")[:64]
    return name or "bundle"


def _serve_weights(args: argparse.Namespace) -> int:
    import os
    import signal
    import threading

    import aoti_rt
    from .bundle import human_bytes

    from .share import check_name

    name = check_name(args.name or default_share_name(args.bundle))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    # every weight hashed while loading (once, for a long-lived server): then copies of the
    # bundle elsewhere may attach too, not only loads of this very store file
    model = aoti_rt.load(args.bundle, device=args.device, share=name, progress=False,
                         verify="load" if args.verify else True, share_required=True)
    try:
        info = model.share
        if info.role != "exporter":
            print(f"aoti_rt serve-weights: {name!r} is served already (pid {info.exporter_pid}); stop that "
                  f"process or choose another --name", file=sys.stderr)
            return 2
        print(f"aoti_rt serve-weights: serving {name!r} on {info.device}: {info.weights} weights, "
              f"{human_bytes(info.weight_bytes)} in {info.arenas} shared arena(s) "
              f"({'read-only' if info.read_only else 'writable'}), pid {os.getpid()}; "
              f"stop with SIGINT or SIGTERM", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        model.close()
    return 0


def _bench(argv: list[str]) -> int:
    import os

    sys.path.insert(0, os.getcwd())
    try:
        from bench.run_all import main as bench_main
    except ImportError:
        print("the benchmarks live in bench/ of the aoti_rt source tree: run this from its root",
              file=sys.stderr)
        return 2
    return bench_main(argv)


def _cache(args: argparse.Namespace) -> int:
    from .package import prune_cache

    prune = args.prune and not args.dry_run
    r = prune_cache(min_age_s=args.min_age_hours * 3600, dry_run=not prune)
    mib = 1 << 20
    print(f"{r.root}: {r.folders} extracted folders ({r.folder_bytes / mib:.1f} MiB), {r.records} probe records")
    verb = "removed" if prune else "would remove (--prune)"
    print(f"{verb}: {len(r.stale_records)} records of packages gone or changed, "
          f"{len(r.unused_folders)} unused folders ({r.freed_bytes / mib:.1f} MiB)")
    for f in r.unused_folders:
        print(f"  {f}")
    if r.kept:
        print(f"kept {len(r.kept)} unused folders: held by a loaded model or younger than "
              f"{args.min_age_hours:g} h")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m aoti_rt", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", metavar="{demo,inspect,verify,load,serve-weights,cache,bench}")
    sub.add_parser("demo", help="run the prefill/decode demo", add_help=False)
    pi = sub.add_parser("inspect", help="describe a bundle")
    pi.add_argument("bundle", help="bundle directory")
    pi.add_argument("--constants", action="store_true", help="also list every constant")
    pv = sub.add_parser("verify", help="check a bundle's weights against their digests")
    pv.add_argument("bundle", help="bundle directory")
    pl = sub.add_parser("load", help="load a bundle and print the memory report")
    pl.add_argument("bundle", help="bundle directory")
    pl.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the bundle's)")
    ps = sub.add_parser("serve-weights", help="hold a bundle's weights for other processes (load(share=NAME))",
                        description=SERVE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    ps.add_argument("bundle", help="bundle directory")
    ps.add_argument("--name", default=None,
                    help="the share name clients pass as share= (default: the bundle directory's name)")
    ps.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the bundle's)")
    ps.add_argument("--no-verify", dest="verify", action="store_false",
                    help="do not hash the weights while loading (then only loads of this very bundle "
                         "directory may attach, not copies of it)")
    pc = sub.add_parser("cache", help="show (and --prune) the .pt2 package cache")
    pc.add_argument("--prune", action="store_true",
                    help="remove the records and extracted folders of packages that are gone or changed "
                         "(never a folder a loaded model holds)")
    pc.add_argument("--dry-run", action="store_true", help="with --prune: only say what would go")
    pc.add_argument("--min-age-hours", type=float, default=1.0,
                    help="with --prune: keep unused folders younger than this (default: 1)")
    sub.add_parser("bench", help="run the benchmark suite", add_help=False)
    sub.add_parser("llm", help="export a transformers LM / generate (aoti_rt[llm])", add_help=False)
    cmd = argv[0] if argv else None
    try:
        if cmd == "demo":
            from .demo import main as demo_main
            return demo_main(argv[1:])
        if cmd == "bench":
            return _bench(argv[1:])
        if cmd == "llm":
            from .llm.cli import main as llm_main
            return llm_main(argv[1:])
        args = p.parse_args(argv)
        cmd = args.cmd
        return _command(p, args)
    except AotiRtError as e:              # a bad bundle, device or share name: one line, no traceback
        print(f"aoti_rt {cmd}: {type(e).__name__}: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


def _command(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.cmd == "inspect":
        return _inspect(args)
    if args.cmd == "verify":
        return _verify(args)
    if args.cmd == "load":
        return _load(args)
    if args.cmd == "serve-weights":
        return _serve_weights(args)
    if args.cmd == "cache":
        return _cache(args)
    p.print_help()
    return 0
