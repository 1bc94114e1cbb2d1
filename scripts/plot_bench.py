"""Plot benchmark JSON files into one PNG: cycle and pass latency against the floor.

    python scripts/plot_bench.py benchmarks/h100-graphs-eager.json [more.json ...] --out benchmarks/h100.png
    orthrus-export bench --engine E --json > bench.json && python scripts/plot_bench.py bench.json --out bench.png

Takes ``scripts/bench_gpu.py`` results (several shapes) and ``orthrus-export bench --json`` results (one engine);
``scripts/bench_batch.py`` results give the batched plot (cycle latency and aggregate tokens/s by batch size):

    python scripts/plot_bench.py benchmarks/h200-batch-8b-inductor.json benchmarks/h200-batch-1.7b-4b-none.json \
        --out benchmarks/h200-batch.png
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


def plot_batches(runs: list, out: str) -> None:
    """``scripts/bench_batch.py`` results: the greedy cycle by batch size (left) and the aggregate tokens/s at
    acceptance 11.7 (right), one line per shape and file (its ``compile`` mode in the label)."""
    fig, (lat, tps) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, run in runs:
        for shape, res in run["shapes"].items():
            rows = res["batches"]
            b = [r["batch"] for r in rows]
            name = f"Qwen3-{shape.upper()} ({run.get('compile', label)})"
            lat.plot(b, [r["ms"]["cycle"] for r in rows], "o-", label=name)
            tps.plot(b, [r["aggregate_tokens_per_s"]["11.7"] for r in rows], "o-", label=name)
    for ax, title, unit in ((lat, "cycle latency (greedy, 4k context per sequence)", "ms"),
                            (tps, "aggregate tokens/s at acceptance 11.7", "tokens/s")):
        ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("batch (sequences sharing each pass)")
        ax.set_ylabel(unit)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(f"{runs[0][1]['device']}: batched Orthrus cycles (random weights, bf16)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    raw = [(Path(f).stem, json.loads(Path(f).read_text())) for f in a.files]
    if all("batches" in next(iter(r.get("shapes", {}).values()), {}) for _, r in raw):
        return plot_batches(raw, a.out)
    runs = [(name, normalise(r, name)) for name, r in raw]
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
