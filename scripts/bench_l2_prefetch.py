"""Does asking the L2 cache for the o projection's weight while attention runs shorten attention + o projection?

#14's batch-1 8B cycle spends ~20 µs a layer and pass in attention that moves ~17 MB (a third of the HBM bandwidth:
the split kernel is latency-bound), then ~15.4 µs in the o projection whose 33.5 MB weight floor is 11.2 µs. A Hopper
bulk L2 prefetch (``cp.async.bulk.prefetch.L2``: no data returns to the SM) issued by the split kernel's programs
before they attend (``Launch.prefetch_mb``, the ops' ``prefetch`` tensor) could fill the idle bandwidth with the next
GEMM's weight. This times, at the 8B batch-1 verify shape
(32 tokens, 4,096 cached keys, 16 splits), ``layers`` distinct layers (so every weight starts cold, as in a pass)
captured as one CUDA graph:

- attention alone, the o projection alone (cold: each layer its own weight; hot: one weight again and again),
  attention + o projection;
- attention prefetching the first P MB of the weight, alone and followed by the o projection, for each P of
  ``--sizes``.

Every variant's output is compared with the plain one (a prefetch is a hint: bitwise equal). Median of CUDA-event
timings of graph replays, per layer.

    python scripts/bench_l2_prefetch.py --out $OUT/l2-prefetch.json
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from orthrus_plugins.attention_common.kernel import Launch, attention  # noqa: E402


def timed(fn, reps=30, inner=10):
    """Median µs of one replay of ``fn`` captured as a CUDA graph."""
    fn()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(inner):
            graph.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / inner)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--keys", type=int, default=4096)
    ap.add_argument("--sizes", default="8,16,24,34", help="MB of the o weight prefetched (comma-separated)")
    ap.add_argument("--out")
    args = ap.parse_args()
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    hq, hkv, d, t, n_layers = 32, 8, 128, 32, args.layers
    caches = [tuple(torch.randn(1, 2, hkv, args.keys + 2 * t, d, generator=g, device=dev, dtype=dt) for _ in range(2))
              for _ in range(n_layers)]
    ws = [torch.randn(hq * d, hq * d, generator=g, device=dev, dtype=dt) * 0.02 for _ in range(n_layers)]
    q = torch.randn(t, hq, d, generator=g, device=dev, dtype=dt)
    k, v = (torch.randn(t, hkv, d, generator=g, device=dev, dtype=dt) for _ in range(2))
    lens = torch.full((1,), args.keys, device=dev, dtype=torch.int64)
    slots = torch.zeros(1, device=dev, dtype=torch.int64)
    outs = torch.empty(n_layers, t, hq * d, device=dev, dtype=dt)
    scale = d ** -0.5

    def layers(prefetch_mb=None, do_attn=True, do_o=True, hot=False):
        launch = Launch(prefetch_mb=prefetch_mb)

        def run():
            for i in range(n_layers):
                w = ws[0] if hot else ws[i]
                o = q
                if do_attn:
                    o = attention(q, k, v, *caches[i], lens, 0, scale, causal=True, splits=16, slots=slots,
                                  launch=launch, prefetch=w)
                if do_o:
                    torch.matmul(o.reshape(t, hq * d), w.t(), out=outs[i])
        return run

    src, dst = (torch.empty(2 ** 27, device=dev, dtype=torch.uint8) for _ in range(2))
    copy_gbps = 2 * 2 ** 27 / timed(lambda: dst.copy_(src)) / 1e3
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "layers": n_layers, "keys": args.keys,
           "copy_GBps": copy_gbps, "o_floor_us": hq * d * hq * d * 2 / copy_gbps / 1e3, "per_layer_us": {}}
    print(f"{res['device']}: copy {copy_gbps:.0f} GB/s; o weight floor {res['o_floor_us']:.1f} us; per layer:")

    def report(name, fn):
        us = timed(fn) / n_layers
        res["per_layer_us"][name] = us
        print(f"  {name:34s} {us:7.2f} us")

    report("attention", layers(do_o=False))
    report("o projection (cold)", layers(do_attn=False))
    report("o projection (hot)", layers(do_attn=False, hot=True))
    report("attention + o", layers())
    layers()()
    torch.cuda.synchronize()
    ref = outs.clone()
    for mb in (int(s) for s in args.sizes.split(",")):
        report(f"attention prefetching {mb} MB", layers(prefetch_mb=mb, do_o=False))
        report(f"attention prefetching {mb} MB + o", layers(prefetch_mb=mb))
        outs.zero_()
        layers(prefetch_mb=mb)()
        torch.cuda.synchronize()
        same = torch.equal(outs, ref)
        res.setdefault("bitwise_equal", {})[str(mb)] = same
        if not same:
            print(f"  prefetch {mb} MB: output DIFFERS from the plain run")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
