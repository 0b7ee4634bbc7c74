"""Run every benchmark, then chart load throughput and memory into ``<out>/bench_summary.png``.

Each benchmark runs in its own Python process (a clean device and weight cache for each, and
one failing does not stop the others) with the same ``--device``, ``--size``, ``--out``,
``--cache`` and ``--repeats``; their tables go to stdout and their JSON to ``--out``.
Options of a single benchmark (``--bind-n``, ``--calls``) are reached by running it directly.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common

BENCHES = ("bench_load", "bench_start", "bench_memory", "bench_lookup", "bench_call", "bench_pt2", "bench_share",
           "bench_multigpu", "bench_compile")
CHART = "bench_summary.png"


def _extra(p: argparse.ArgumentParser) -> None:
    p.add_argument("--only", nargs="+", choices=BENCHES, default=None, help="run only these benchmarks")
    p.add_argument("--chart-only", action="store_true", help="only redraw the chart from the JSON in --out")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks and draw the chart; 0 if everything ran, 1 otherwise."""
    args = common.parse_args(__doc__, argv, _extra)
    forward = ["--device", args.device, "--size", args.size, "--out", str(args.out),
               "--cache", str(args.cache), "--repeats", str(args.repeats)]
    status: dict[str, Any] = {}
    if not args.chart_only:
        here = Path(__file__).resolve().parent
        for name in args.only or BENCHES:
            common.log(f"=== {name} {' '.join(forward)}")
            t0 = time.perf_counter()
            rc = subprocess.call([sys.executable, str(here / f"{name}.py"), *forward])
            status[name] = {"rc": rc, "seconds": round(time.perf_counter() - t0, 1)}
            if rc != 0:
                common.log(f"!!! {name} failed with exit code {rc}")
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "run_all.json").write_text(json.dumps(
            {"env": common.environment(args.device), "args": forward[:4] + forward[8:], "benches": status},
            indent=1))
    ok = all(s["rc"] == 0 for s in status.values())
    want_chart = args.chart_only or bool({"bench_load", "bench_memory"} & set(args.only or BENCHES))
    path = None
    chart_skipped = False
    if want_chart:
        try:
            path = draw_chart(args.out)
        except ImportError as e:
            chart_skipped = True
            common.log(f"no chart: {e}; the benchmarks ran and their JSON is in {args.out} "
                       f"(pip install -e '.[bench]' for the chart)")
        else:
            common.log(f"chart: {path}" if path else "!!! no chart: no bench_load.json or bench_memory.json in --out")
    for name, s in status.items():
        common.log(f"{name}: {'ok' if s['rc'] == 0 else 'FAILED (' + str(s['rc']) + ')'} in {s['seconds']} s")
    # a missing optional plotting library is not a failed benchmark
    return 0 if ok and (path is not None or (chart_skipped and not args.chart_only) or not want_chart) else 1


def _load(out: Path, bench: str) -> dict[str, Any] | None:
    path = out / f"{bench}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def draw_chart(out: Path) -> Path | None:
    """Bar charts of the load throughput and memory tables found in ``out``; the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    load, start, memory = _load(out, "bench_load"), _load(out, "bench_start"), _load(out, "bench_memory")
    if start is not None and not (start["tables"] and start["tables"][0]["rows"]):
        start = None          # run on a CPU: no start-up rows
    panels = [p for p in (load, start, memory) if p is not None]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(9 * len(panels), 6.5), squeeze=False)
    draw = {id(load): _load_panel, id(start): _start_panel, id(memory): _memory_panel}
    for ax, data in zip(axes[0], panels):
        draw[id(data)](ax, data)
    env = panels[0]["env"]
    fig.suptitle(f"aoti_rt {env['aoti_rt']} on {env['card']} ({env['device']}), torch {env['torch']}, "
                 f"{env['date']}, size {panels[0]['params'].get('size')}")
    fig.tight_layout()
    path = out / CHART
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _load_panel(ax: Any, data: dict[str, Any]) -> None:
    rows = data["tables"][0]["rows"]
    names = [r["variant"] for r in rows]
    ys = range(len(rows))
    colors = ["tab:blue" if n.startswith("aoti_rt") else "tab:gray" if "ceiling" in n or "copy" in n
              else "tab:orange" for n in names]
    ax.barh(ys, [r["gbps_median"] for r in rows], color=colors)
    ax.scatter([r["gbps_best"] for r in rows], ys, marker="|", color="black", s=120, label="best", zorder=3)
    for y, r in zip(ys, rows):
        ax.text(r["gbps_median"], y, f" {r['gbps_median']:.2f}", va="center", fontsize=8)
    ax.set_yticks(list(ys), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("GB/s (median bar, best tick; 1 GB = 1e9 B)")
    ax.set_title(data["tables"][0]["title"], fontsize=9)
    ax.legend(loc="lower right", fontsize=8)


def _start_panel(ax: Any, data: dict[str, Any]) -> None:
    """First load in a fresh process next to the repeat load, GB/s."""
    rows = [r for r in data["tables"][0]["rows"] if r.get("gbps_first")]
    names = [r["row"] + ("" if r.get("config") in (None, "-", "default") else f" [{r['config']}]") for r in rows]
    ys = list(range(len(rows)))
    first = [r["gbps_first"] for r in rows]
    repeat = [r.get("gbps_median") or 0 for r in rows]
    ax.barh([y - 0.2 for y in ys], first, height=0.4, color="tab:blue", label="first load in the process")
    ax.barh([y + 0.2 for y in ys], repeat, height=0.4, color="tab:cyan", label="repeat load (median)")
    for y, f, r in zip(ys, first, repeat):
        ax.text(f, y - 0.2, f" {f:.1f}", va="center", fontsize=7)
        if r:
            ax.text(r, y + 0.2, f" {r:.1f}", va="center", fontsize=7)
    ax.set_yticks(ys, names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("GB/s (1 GB = 1e9 B)")
    ax.set_title("\n".join(textwrap.wrap(data["tables"][0]["title"], 70)), fontsize=9)
    ax.legend(loc="lower right", fontsize=8)


MEMORY_VARIANTS = (("aoti_rt", "measured: peak_bytes_allocated", "tab:blue", ""),
                   ("stock per-method", "measured:", "tab:orange", ""),
                   ("whole-blob-on-miss (#18901)", "computed", "tab:green", "//"))


def _memory_panel(ax: Any, data: dict[str, Any]) -> None:
    rows = data["tables"][0]["rows"]
    scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
    width = 0.8 / len(MEMORY_VARIANTS)
    for i, (variant, how, color, hatch) in enumerate(MEMORY_VARIANTS):
        vals = []
        for s in scenarios:
            match = [r for r in rows if r["scenario"] == s and r["variant"] == variant and r["how"].startswith(how)]
            vals.append(match[0]["ratio"] if match else 0.0)
        xs = [k + (i - (len(MEMORY_VARIANTS) - 1) / 2) * width for k in range(len(scenarios))]
        label = variant + (" (computed)" if how == "computed" else " (measured)")
        bars = ax.bar(xs, vals, width, color=color, hatch=hatch, label=label, edgecolor="white")
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle=":")
    ax.set_xticks(range(len(scenarios)), [s.replace(", ", "\n") for s in scenarios], fontsize=9)
    ax.set_ylabel("memory held / unique weight bytes")
    ax.set_title(data["tables"][0]["title"], fontsize=9)
    ax.legend(fontsize=8)


if __name__ == "__main__":
    sys.exit(main())
