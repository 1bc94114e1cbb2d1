"""Per-pass parity of the exported ONNX graphs (ONNX Runtime) with the engine's traced programs, via Polygraphy.

For each program the same inputs (random tokens, a cache length, random cache contents) go to the PyTorch engine
and, through Polygraphy's ``OnnxrtRunner``, to ONNX Runtime; ``Comparator.compare_accuracy`` checks every output
(logits and the updated cache layers) with a dtype-derived tolerance: ``rtol = K·eps(dtype)`` and, per output,
``atol = K·eps(dtype)·rms(torch output)`` (K as in :mod:`orthrus_export.parity`). Inputs and the engine's outputs
are saved as Polygraphy JSON, and the Polygraphy command that repeats the comparison is returned: for the
decomposed graphs a ``polygraphy run`` line; for ``orthrus``-domain graphs (custom ops that the Polygraphy CLI
cannot register) the ``orthrus-export onnx-check`` line that reruns this function.
"""

import random
import shlex
from pathlib import Path

import numpy as np
import torch

from orthrus_export.parity import EPS_MULTIPLIER


def _inputs(engine, name: str, seed: int):
    cfg, b = engine.config, engine.block_size
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    t = 1 if name == "decode" else b
    tokens = torch.tensor([rng.randrange(cfg.vocab_size) for _ in range(t)], dtype=torch.int64)
    start = torch.tensor(rng.randrange(1, engine.capacity - b - t), dtype=torch.int64)
    kc = torch.randn(engine.cache_shape(0), generator=g, dtype=torch.float32).to(engine.dtype)  # one sequence
    vc = torch.randn(engine.cache_shape(0), generator=g, dtype=torch.float32).to(engine.dtype)
    return tokens, start, kc, vc


def _feed(tokens, start, kc, vc) -> dict:
    feed = {"tokens": tokens.numpy(), "cache_len": np.asarray(int(start), dtype=np.int64)}
    for i in range(kc.shape[0]):
        feed[f"k_cache.{i}"] = kc[i].numpy().copy()
        feed[f"v_cache.{i}"] = vc[i].numpy().copy()
    return feed


def _simple(rtol, atol):
    try:
        from polygraphy.comparator import SimpleCompareFunc  # Polygraphy >= 0.50
        return SimpleCompareFunc(rtol=rtol, atol=atol)
    except ImportError:
        from polygraphy.comparator import CompareFunc
        return CompareFunc.simple(rtol=rtol, atol=atol)


def compare_engine(engine_dir, variant: str = "orthrus", save_dir=None, seed: int = 0, log=print) -> dict:
    """Compare every exported graph with the torch engine; returns ``{program: {"ok", "max_abs_diff",
    "command", "files"}}``."""
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.comparator import Comparator, IterationResult, RunResults
    from polygraphy.json import save_json
    from polygraphy.logger import G_LOGGER
    G_LOGGER.module_severity = G_LOGGER.WARNING  # per-output statistics of every cache layer drown the verdicts

    from orthrus_runtime import Engine
    from orthrus_runtime.onnx_backend import load_programs
    engine_dir = Path(engine_dir)
    engine = Engine.load(engine_dir)
    ort_programs = load_programs(engine_dir, engine.manifest, variant)
    save_dir = Path(save_dir) if save_dir else engine_dir / f"onnx-parity-{variant}"
    save_dir.mkdir(parents=True, exist_ok=True)
    k = EPS_MULTIPLIER[engine.dtype] * torch.finfo(engine.dtype).eps
    report = {}
    graphs = engine.manifest["onnx"][variant]["graphs"]
    for i, (name, rel) in enumerate(graphs.items()):
        tokens, start, kc, vc = _inputs(engine, name, seed + i)
        feed = _feed(tokens, start, kc, vc)
        kc_t, vc_t = kc.clone(), vc.clone()
        with torch.no_grad():
            logits = engine.run_pass(name, tokens, int(start), kc_t, vc_t)
        expected = {"logits": logits.float().numpy()}
        if ort_programs[name].writes_cache:
            for layer in range(kc.shape[0]):
                expected[f"k_cache_out.{layer}"] = kc_t[layer].numpy()
                expected[f"v_cache_out.{layer}"] = vc_t[layer].numpy()
        atol = {o: float(k * np.sqrt(np.mean(np.square(v.astype(np.float64))))) for o, v in expected.items()}
        reference = RunResults()
        reference.append(("torch-engine", [IterationResult(expected, runner_name="torch-engine")]))
        inputs_path, outputs_path = save_dir / f"{name}.inputs.json", save_dir / f"{name}.torch-engine.json"
        save_json([feed], str(inputs_path))
        reference.save(str(outputs_path))
        runner = OnnxrtRunner(ort_programs[name].session, name=f"onnxruntime-{variant}")
        results = Comparator.run([runner], data_loader=[feed])
        combined = RunResults()
        for entry in list(reference.items()) + list(results.items()):
            combined.append(entry)
        accuracy = Comparator.compare_accuracy(combined, compare_func=_simple(rtol=k, atol=atol))
        ok = bool(accuracy)
        got = results[0][1][0]
        max_diff = max(float(np.max(np.abs(got[o].astype(np.float64) - v))) for o, v in expected.items())
        graph = engine_dir / rel
        if variant == "decomposed":
            default_atol = max(v for o, v in atol.items() if o != "logits") if len(atol) > 1 else atol["logits"]
            command = (f"polygraphy run {shlex.quote(str(graph))} --onnxrt --load-inputs "
                       f"{shlex.quote(str(inputs_path))} --load-outputs {shlex.quote(str(outputs_path))} "
                       f"--rtol {k:.3g} --atol {default_atol:.3g} logits:{atol['logits']:.3g}")
        else:
            command = (f"orthrus-export onnx-check --engine {shlex.quote(str(engine_dir))} --variant {variant} "
                       f"--save {shlex.quote(str(save_dir))}")
        report[name] = {"ok": ok, "max_abs_diff": max_diff, "command": command,
                        "files": [str(inputs_path), str(outputs_path)], "cache_len": int(start)}
        log(f"{variant} {name}: {'PASSED' if ok else 'FAILED'} (max |diff| {max_diff:.3g} over logits and caches, "
            f"rtol {k:.3g}); rerun: {command}")
    return report
