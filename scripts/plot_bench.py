"""Plot benchmark JSON files into one PNG: cycle and pass latency against the floor.

    python scripts/plot_bench.py benchmarks/h100-graphs-eager.json [more.json ...] --out benchmarks/h100.png
    orthrus-export bench --engine E --json > bench.json && python scripts/plot_bench.py bench.json --out bench.png

Takes ``scripts/bench_gpu.py`` results (several shapes) and ``orthrus-export bench --json`` results (one engine).
Needs matplotlib (``pip install -e ".[plot]"``).
"""

import argparse
import json
import sys
from pathlib import Path

try:
    import matplotlib
except ImportError:
    sys.exit("plot_bench: matplotlib is not installed: pip install -e \".[plot]\" (or pip install matplotlib)")

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def normalise(run: dict, name: str) -> dict:
    """`orthrus-export bench --json` holds one engine's rows at the top level: present it as one shape."""
    if "shapes" in run:
        return run
    if "contexts" not in run:
        sys.exit(f"plot_bench: {name} is neither scripts/bench_gpu.py nor `orthrus-export bench --json` output")
    engine = Path(run.get("engine", name)).name
    return {"device": run.get("device", engine), "shapes": {engine: {"contexts": run["contexts"]}}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    runs = [(Path(f).stem, normalise(json.loads(Path(f).read_text()), Path(f).stem)) for f in a.files]
    shapes = list(runs[0][1]["shapes"])
    fig, axes = plt.subplots(1, len(shapes), figsize=(max(9, 5 * len(shapes)), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for label, run in runs:
            if shape not in run["shapes"]:
                continue
            rows = run["shapes"][shape]["contexts"]
            ctx = [r["context"] for r in rows]
            ax.plot(ctx, [r["ms"]["cycle"] for r in rows], "o-", label=f"cycle ({label})")
            ax.plot(ctx, [r["ms"]["verify"] for r in rows], "s--", label=f"verify pass ({label})")
        rows = runs[0][1]["shapes"][shape]["contexts"]
        ctx = [r["context"] for r in rows]
        ax.plot(ctx, [r["floor_ms"]["cycle"] for r in rows], "k-", label="cycle floor (2 passes)")
        ax.plot(ctx, [r["floor_ms"]["verify"] for r in rows], "k:", label="single-pass floor")
        ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)
        ax.set_title(f"Qwen3-{shape.upper()} shape, bf16, batch 1" if shape in ("1.7b", "4b", "8b") else shape)
        ax.set_xlabel("context (tokens in the KV cache)")
        ax.set_ylabel("ms")
    fig.suptitle(f"{runs[0][1]['device']}: Orthrus cycle (draft + verify of 32 tokens) vs the bandwidth floor")
    legend = {}
    for ax in axes[0]:
        for h, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, h)
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(a.out, dpi=110)


if __name__ == "__main__":
    main()
