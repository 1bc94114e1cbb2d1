"""Plot GPU benchmark JSON files (scripts/bench_gpu.py) into one PNG: cycle and pass latency against the floor.

    python scripts/plot_bench.py benchmarks/h100-graphs-eager.json [more.json ...] --out benchmarks/h100.png
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    runs = [(Path(f).stem, json.loads(Path(f).read_text())) for f in a.files]
    shapes = list(runs[0][1]["shapes"])
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
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
        ax.set_title(f"Qwen3-{shape.upper()} shape, bf16, batch 1")
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
