"""The user's path at real Qwen3 shapes, through the CLI: build, info, verify, cold load, first token, cycle time.

    python scripts/bench_load.py --shapes 1.7b,8b --work /tmp/orthrus-load --out benchmarks/h200-load.json

Per shape: writes a checkpoint in the published layout with random bf16 weights (generated on the GPU), then times
``orthrus-export build --gpu auto --precision bf16`` (autotune share from the manifest), ``info``, ``verify`` (GB/s),
a cold ``Engine.load`` in a fresh process with empty Inductor/Triton caches (each stage: verify, weights, programs,
compiled artifacts, compile + graph capture), the first token (prefill of a 128-token prompt + one token),
``run`` of 256 tokens as a user would type it, and ``bench`` at 4k (greedy and sampled cycle). Results as JSON.
"""

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COLD = """
import json, sys, time
t0 = time.perf_counter()
from orthrus_runtime import Engine
t_import = time.perf_counter() - t0
e = Engine.load(sys.argv[1], log=lambda m: print(m, file=sys.stderr))
t_load = time.perf_counter() - t0
ids = list(range(1000, 1128))
t1 = time.perf_counter()
r = e.generate(ids, max_new_tokens=1)
first = time.perf_counter() - t1
print(json.dumps({"import_s": t_import, "load_total_s": t_load, "stages": e.load_stats, "first_token_s": first,
                  "process_to_first_token_s": time.perf_counter() - t0}))
"""


def sh(args, env=None, what=""):
    t0 = time.perf_counter()
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{what or args[0]} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p.stdout, p.stderr, dt


def write_checkpoint(name: str, out: Path) -> float:
    from orthrus_export.bench import QWEN3
    from orthrus_export.synthetic import write_checkpoint as write
    from orthrus_export.weights import checkpoint_shapes
    from orthrus_runtime.config import ModelConfig
    t0 = time.perf_counter()
    shape = dict(QWEN3[name])
    cfg = ModelConfig(vocab_size=151936, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6,
                      max_position_embeddings=40960, block_size=32, mask_token_id=151935, eos_token_ids=(151934,),
                      **shape)
    g = torch.Generator(device="cuda").manual_seed(0)
    tensors = {}
    for n, s in checkpoint_shapes(cfg).items():
        t = (1.0 + 0.1 * torch.randn(s, device="cuda", generator=g)) if len(s) == 1 else \
            torch.randn(s, device="cuda", generator=g) / s[1] ** 0.5
        tensors[n] = t.to(torch.bfloat16).cpu()
    write(out, vocab_size=151936, hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
          num_layers=shape["num_layers"], num_heads=shape["num_heads"], num_kv_heads=8, head_dim=128,
          tie_word_embeddings=shape["tie_word_embeddings"], tokenizer=False, max_position_embeddings=40960,
          shards=4, tensors=tensors)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="1.7b,8b")
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-seq-len", type=int, default=8192)
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "orthrus_export"]
    result = {"device": torch.cuda.get_device_name(0), "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "torch": torch.__version__, "shapes": {}}
    for name in a.shapes.split(","):
        r = result["shapes"][name] = {}
        ckpt, engine = work / f"ckpt-{name}", work / f"engine-{name}"
        r["checkpoint_write_s"] = write_checkpoint(name, ckpt)
        print(f"{name}: checkpoint written in {r['checkpoint_write_s']:.1f} s", flush=True)
        _, err, r["build_s"] = sh(cli + ["build", "--model", ckpt, "--gpu", "auto", "--precision", "bf16", "--out",
                                         engine, "--max-seq-len", a.max_seq_len, "--force", "--no-progress"],
                                  what="build")
        m = json.loads((engine / "manifest.json").read_text())
        r["build_timings_s"] = m["build"]["timings_s"]
        r["tuning"] = m["build"]["tuning"]
        r["options"] = m["build"]["options"]
        r["compiled"] = m["build"]["compiled"]
        print(f"{name}: build {r['build_s']:.1f} s (autotune {r['build_timings_s'].get('autotune')} s); "
              f"options {r['options']}", flush=True)
        shutil.rmtree(ckpt)  # disk: only the engine from here on
        _, _, r["info_s"] = sh(cli + ["info", "--engine", engine], what="info")
        out, _, _ = sh(cli + ["verify", "--engine", engine, "--json"], what="verify")
        r["verify"] = json.loads(out)
        print(f"{name}: info {r['info_s']:.2f} s; verify {r['verify']['GBps']} GB/s", flush=True)
        for trial in ("cold", "warm-disk-cache"):
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(work / f"inductor-{name}-{trial}"),
                   "TRITON_CACHE_DIR": str(work / f"triton-{name}-{trial}")}
            out, err, dt = sh([sys.executable, "-c", COLD, engine], env=env, what="cold load")
            r[f"load_{trial}"] = {**json.loads(out.strip().splitlines()[-1]), "process_s": dt, "log": err[-500:]}
            print(f"{name}: {trial} load {r[f'load_{trial}']['load_total_s']:.1f} s, stages "
                  f"{r[f'load_{trial}']['stages']}", flush=True)
        _, err, r["run_256_s"] = sh(cli + ["run", "--engine", engine, "--prompt-ids", ",".join(map(str, range(1000,
                                    1128))), "--max-new-tokens", "256"], what="run")
        r["run_256_stats"] = err.strip().splitlines()[-1]
        print(f"{name}: run of 256 tokens {r['run_256_s']:.1f} s: {r['run_256_stats']}", flush=True)
        out, _, _ = sh(cli + ["bench", "--engine", engine, "--contexts", "512,4096", "--iters", "30", "--json"],
                       what="bench")
        r["bench"] = json.loads(out)
        for row in r["bench"]["contexts"]:
            print(f"{name}: ctx {row['context']}: greedy cycle {row['ms']['cycle']:.3f} ms, sampled cycle "
                  f"{row['ms']['sampled_cycle']:.3f} ms, verify {row['ms']['verify']:.3f} ms "
                  f"({row['ratio_to_floor']['verify']:.2f}x floor)", flush=True)
        shutil.rmtree(engine)
        Path(a.out).write_text(json.dumps(result, indent=1))
    Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
