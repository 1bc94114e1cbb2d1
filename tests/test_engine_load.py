"""Issue 11: the runtime owns the engine and runs what it holds; compiled artifacts stored at build and reused at
load; kernel options per engine; concurrent callers each get their own result."""

import json
import os
import shutil
import subprocess
import sys
import threading

import pytest
import torch

from orthrus_export import builder


@pytest.fixture(scope="module")
def compiled_engine(tmp_path_factory):
    """A small random checkpoint (2 layers, GQA 2, byte tokenizer) with --compile inductor (CPU): compiled at build
    (two batch buckets), artifacts stored. Not tiny: what is tested here (artifacts stored, reused, refused) does not
    depend on the model, and Inductor's time grows with the layers (tiny's 12 took this suite's longest setup)."""
    from orthrus_export.synthetic import write_checkpoint
    root = tmp_path_factory.mktemp("ind")
    write_checkpoint(root / "ckpt", vocab_size=301, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=16, seed=21)
    return builder.build(str(root / "ckpt"), out=root / "c", max_seq_len=256, progress=False, compile="inductor",
                         max_batch_size=2)


@pytest.fixture(scope="module")
def compiled_loaded(compiled_engine):
    """The compiled engine loaded in the build's process (once: each load compiles every bucket)."""
    from orthrus_runtime import Engine
    return Engine.load(compiled_engine)


def _python(code: str, *args, env=None):
    p = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                       env={**os.environ, **(env or {})}, timeout=600)
    return p.returncode, p.stdout, p.stderr


@pytest.mark.usefixtures("fresh_loads")  # they start now; their tests are this module's last
def test_inductor_engine_stores_artifacts_and_runs_its_compiled_programs(compiled_engine, compiled_loaded):
    """The build compiled the engine's own programs, self-checked the compiled passes and stored the artifacts;
    greedy Orthrus output equals the engine's AR output, and generating does not recompile anything."""
    from torch._dynamo.utils import counters

    m = json.loads((compiled_engine / "manifest.json").read_text())
    assert m["build"]["options"]["backend"] == "inductor" and all(r["ok"] for r in m["self_check"]["passes"].values())
    comp = m["build"]["compiled"]
    assert comp["file"] in m["files"] and comp["bytes"] == (compiled_engine / comp["file"]).stat().st_size > 0
    assert comp["stack"]["torch"] == torch.__version__
    engine = compiled_loaded
    graphs = counters["stats"]["unique_graphs"]
    r = engine.generate("def main():\n", max_new_tokens=24)
    assert r.output_ids == engine.generate("def main():\n", max_new_tokens=24, use_drafts=False).output_ids
    engine.generate("def main():\n", max_new_tokens=8, temperature=0.7, seed=3)
    assert counters["stats"]["unique_graphs"] == graphs  # compiled at load, under the mode generation runs in


LOAD = ("import json, sys; from orthrus_runtime import Engine; "
        "e = Engine.load(sys.argv[1], strict=sys.argv[2] == 'strict', log=lambda m: print('LOG', m)); "
        "from torch._dynamo.utils import counters; "
        "print(json.dumps({'stats': e.load_stats, 'hits': counters['inductor']['fxgraph_cache_hit'], "
        "'ids': e.generate('def main(', max_new_tokens=16).output_ids}))")


@pytest.fixture(scope="module")
def fresh_loads(compiled_engine, tmp_path_factory):
    """LOAD in two fresh processes, each with an empty Inductor cache: "fresh" loads the engine as built,
    "mismatch" a copy whose manifest says its artifacts were compiled with torch 2.99.0. Both start as soon as the
    engine is built and compile for a minute or more, beside each other and beside this module's other tests (the
    tests that read their results come last); ``fresh_loads(name)`` waits for one: exit code, stdout, stderr, and
    the engine it loaded."""
    root = tmp_path_factory.mktemp("fresh")
    mismatch = root / "mismatch"
    shutil.copytree(compiled_engine, mismatch)
    m = json.loads((mismatch / "manifest.json").read_text())
    m["build"]["compiled"]["stack"]["torch"] = "2.99.0"
    (mismatch / "manifest.json").write_text(json.dumps(m))
    engines = {"fresh": compiled_engine, "mismatch": mismatch}
    procs = {}
    for name, path in engines.items():
        with open(root / f"{name}.out", "w") as out, open(root / f"{name}.err", "w") as err:  # files: never full
            procs[name] = subprocess.Popen([sys.executable, "-c", LOAD, str(path), "-"], stdout=out, stderr=err,
                                           text=True, env={**os.environ,
                                                           "TORCHINDUCTOR_CACHE_DIR": str(root / f"cache-{name}")})

    def result(name):
        rc = procs[name].wait(timeout=600)
        return rc, (root / f"{name}.out").read_text(), (root / f"{name}.err").read_text(), engines[name]
    yield result
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.wait()


def test_cli_strict_refusal_message(compiled_engine, tmp_path, capsys):
    e = tmp_path / "e"
    subprocess.run(["cp", "-r", str(compiled_engine), str(e)], check=True)
    m = json.loads((e / "manifest.json").read_text())
    m["build"]["compiled"]["stack"]["python"] = "2.7.18"
    (e / "manifest.json").write_text(json.dumps(m))
    from orthrus_export.cli import main
    assert main(["run", "--engine", str(e), "--prompt", "x", "--strict"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "compiled artifacts were made for another stack (python 2.7.18 (engine)" in err


RUNTIME_ONLY = r"""
import importlib.abc, json, sys
BLOCKED = ("orthrus_export", "transformers", "huggingface_hub")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not part of a deployment")
sys.meta_path.insert(0, Block())
from orthrus_runtime import Engine
e = Engine.load(sys.argv[1])
greedy = e.generate("def main(", max_new_tokens=40)
sampled = e.generate("import os", max_new_tokens=20, temperature=0.8, top_k=20, seed=5)
stream = e.generate("class A:", max_new_tokens=20, stream=True)
text = "".join(stream)
print(json.dumps({"greedy": greedy.output_ids, "sampled": sampled.output_ids, "stream": text,
                  "modules": sorted({m.split(".")[0] for m in sys.modules} & set(BLOCKED))}))
"""


def test_runtime_generates_with_the_builder_unimportable(models):
    """A deployment needs orthrus_runtime + orthrus_plugins + torch + safetensors + tokenizers only."""
    path = models.engine_path("tiny", max_seq_len=256)
    rc, out, err = _python(RUNTIME_ONLY, path)
    assert rc == 0, err
    r = json.loads(out.strip().splitlines()[-1])
    e = models.engine("tiny", max_seq_len=256)
    assert r["modules"] == []
    assert r["greedy"] == e.generate("def main(", max_new_tokens=40).output_ids
    assert r["sampled"] == e.generate("import os", max_new_tokens=20, temperature=0.8, top_k=20, seed=5).output_ids
    assert r["stream"] == e.generate("class A:", max_new_tokens=20).text


def test_runtime_never_imports_the_builder():
    """Static check of every runtime and plugin module: no import of orthrus_export, anywhere in the module."""
    import ast
    import pathlib
    root = pathlib.Path(__file__).resolve().parents[1]
    offenders = []
    for p in [p for d in ("runtime", "plugins") for p in (root / d).rglob("*.py")]:
        for node in ast.walk(ast.parse(p.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{p.relative_to(root)}: {n}" for n in names if n.split(".")[0] == "orthrus_export"]
    assert offenders == []


def test_concurrent_callers_each_get_their_own_result(models):
    """Six threads call generate (greedy, sampled, streamed) on one engine at once: each result equals the same
    request run alone."""
    engine = models.engine("tiny", max_seq_len=256)
    requests = [dict(prompt="def main(", max_new_tokens=40), dict(prompt="import sys\n", max_new_tokens=30),
                dict(prompt="class Foo:", max_new_tokens=35, temperature=0.9, top_k=30, seed=1),
                dict(prompt="for i in", max_new_tokens=25, temperature=0.6, top_p=0.9, seed=2),
                dict(prompt="x = [", max_new_tokens=20, stream=True), dict(prompt="if __name__", max_new_tokens=33)]

    def run(req):
        req = dict(req)
        if req.pop("stream", False):
            s = engine.generate(req.pop("prompt"), stream=True, **req)
            "".join(s)
            return s.result.output_ids
        return engine.generate(req.pop("prompt"), **req).output_ids
    alone = [run(r) for r in requests]
    results = [None] * len(requests)

    def worker(i):
        results[i] = run(requests[i])
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert results == alone


def test_two_engines_with_different_kernel_options_run_their_own(models):
    """Kernel options are per engine (written into each engine's program nodes), not process state."""
    from orthrus_runtime import Engine
    from orthrus_runtime.program import kernel_attributes
    a = Engine.load(models.engine_path("tiny", max_seq_len=256))
    b = Engine.load(models.engine_path("tiny", max_seq_len=256))
    b.with_options(b.options.replace(attention_splits=8, attention_query_block=32, attention_block_n=32,
                                     attention_launch="num_stages=2,max_registers=128"))
    assert kernel_attributes(a.programs["verify"])["cached_attention"] == {("splits", a.options.attention_splits)}
    assert kernel_attributes(b.programs["draft"])["diffusion_attention"] == {
        ("splits", 8), ("query_block", 32), ("block_n", 32), ("launch", "num_stages=2,max_registers=128")}
    assert a.options.attention_splits == 16
    assert a.generate("def f(", max_new_tokens=20).output_ids == b.generate("def f(", max_new_tokens=20).output_ids


@pytest.mark.parametrize("spec, problem", [("stages=2", "not field=value"), ("partials=int8", "not field=value"),
                                           ("merge_rows=3", "merge_rows must be a power of two"),
                                           ("block_n=32", "its own option")])
def test_a_bad_attention_launch_option_is_one_clear_error(models, spec, problem):
    """An engine's ``attention_launch`` option is checked where kernel options are made, on any machine (a launch
    the GPU kernels would refuse, or ``block_n``, which has its own option): one line naming the option; the engine
    keeps its options and still runs."""
    from orthrus_runtime import Engine
    from orthrus_runtime.errors import OrthrusError
    e = Engine.load(models.engine_path("tiny", max_seq_len=256))
    try:
        before = e.options
        with pytest.raises(OrthrusError, match=f"attention_launch.*{problem}") as info:
            e.with_options(e.options.replace(attention_launch=spec))
        assert "\n" not in str(info.value)
        assert e.options == before and e.generate("def f(", max_new_tokens=4).output_ids
    finally:
        e.close()


def test_attention_launch_specs_round_trip():
    """``Launch.spec()`` writes what ``Launch.from_spec`` reads: the fields that differ from the defaults; the
    autotuner's candidates are valid specs, the default first."""
    from orthrus_plugins.attention_common import DEFAULT_LAUNCH, LAUNCH_CANDIDATES, Launch
    assert LAUNCH_CANDIDATES[0] == "" and Launch.from_spec("") == Launch.from_spec("default") == DEFAULT_LAUNCH
    for spec in LAUNCH_CANDIDATES[1:] + ("merge_rows=8,partials=bfloat16,num_warps=4",):
        launch = Launch.from_spec(spec)
        assert launch != DEFAULT_LAUNCH and Launch.from_spec(launch.spec()) == launch
        assert sorted(launch.spec().split(",")) == sorted(spec.split(","))
    assert Launch.from_spec("partials=float32").partials is torch.float32 and DEFAULT_LAUNCH.spec() == ""


def test_attention_launch_fold_keeps_programs_per_sm():
    """``Launch.fold``: the largest power of two dividing the splits that keeps ``programs_per_sm`` programs an SM;
    none without the field. 8B heads at 16 splits on 132 SMs: batch 8 (1,024 programs) folds 4 at one program an SM,
    2 at two; batch 1 (128) never."""
    from orthrus_plugins.attention_common import DEFAULT_LAUNCH, Launch
    one, two = Launch.from_spec("programs_per_sm=1"), Launch.from_spec("programs_per_sm=2")
    assert DEFAULT_LAUNCH.fold(16, 1024, 132) == 1 and one.spec() == "programs_per_sm=1"
    assert (one.fold(16, 1024, 132), two.fold(16, 1024, 132), one.fold(16, 128, 132)) == (4, 2, 1)
    assert one.fold(16, 8 * 16 * 64, 132) == 16 and one.fold(5, 10 ** 6, 1) == 1  # whole splits only
    with pytest.raises(ValueError, match="programs_per_sm"):
        Launch.from_spec("programs_per_sm=0")


@pytest.mark.parametrize("field, value", [("block_n", 48), ("merge_rows", 3), ("num_warps", 6)])
def test_every_attention_launch_has_power_of_two_tiles(field, value):
    """A launch however made (a spec, ``Launch(...)``, ``replace``) is refused with a tile or warp count that is not
    a power of two: checked once, where launches are made."""
    from dataclasses import replace

    from orthrus_plugins.attention_common import DEFAULT_LAUNCH, Launch
    for make in (lambda: Launch(**{field: value}), lambda: replace(DEFAULT_LAUNCH, **{field: value}),
                 lambda: Launch.from_spec(f"{field}={value}")):
        with pytest.raises(ValueError, match=f"{field} must be a power of two, got {value}"):
            make()


def test_info_reads_only_the_manifest(models):
    """`info` imports no torch (it reads one JSON file)."""
    path = models.engine_path("tiny", max_seq_len=256)
    code = ("import sys; from orthrus_export.cli import main; rc = main(['info', '--engine', sys.argv[1]]); "
            "print('TORCH', 'torch' in sys.modules); sys.exit(rc)")
    rc, out, err = _python(code, path)
    assert rc == 0, err
    assert "TORCH False" in out and "max_seq_len 256" in out


def test_sampling_defaults_come_from_generation_config(tmp_path, models):
    """A request that sets no sampling parameters samples as the checkpoint's generation_config.json says (as
    transformers and vLLM do); temperature=0 is greedy; a checkpoint that does not sample stays greedy."""
    from orthrus_export.synthetic import write_checkpoint
    from orthrus_runtime import Engine
    ckpt = tmp_path / "ckpt"
    write_checkpoint(ckpt, vocab_size=301, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=16, tokenizer=False, seed=21)
    gen = json.loads((ckpt / "generation_config.json").read_text())
    (ckpt / "generation_config.json").write_text(json.dumps({**gen, "do_sample": True, "temperature": 0.7,
                                                             "top_k": 20, "top_p": 0.8}))
    engine = Engine.load(builder.build(str(ckpt), out=tmp_path / "e", max_seq_len=128, progress=False,
                                       self_check=False))
    assert engine.sampling_defaults() == (0.7, 20, 0.8)
    prompt = [5, 6, 7]
    default = engine.generate(prompt, max_new_tokens=30, seed=4).output_ids
    assert default == engine.generate(prompt, max_new_tokens=30, seed=4, temperature=0.7, top_k=20,
                                      top_p=0.8).output_ids
    greedy = engine.generate(prompt, max_new_tokens=30, temperature=0.0).output_ids
    assert greedy == engine.generate(prompt, max_new_tokens=30, temperature=0.0, seed=9).output_ids
    assert default != greedy  # it sampled (30 tokens at T 0.7 equal to greedy would be a 1-in-many-millions event)
    tiny = models.engine("tiny", max_seq_len=256)
    assert tiny.sampling_defaults() == (0.0, 0, 1.0)


def test_stop_strings_cut_text_tokens_and_stream(models):
    """A stop string ends the generation at the token that completes it; the text ends before it; a stream's deltas
    concatenate to that text and never show any of the stop string; a stop that never occurs changes nothing."""
    engine = models.engine("tiny", max_seq_len=256)
    full = engine.generate("def main(", max_new_tokens=60)
    stop = full.text[len(full.text) // 2:len(full.text) // 2 + 3]
    assert len(stop) == 3
    cut = engine.generate("def main(", max_new_tokens=60, stop=[stop, "never-there"])
    assert cut.text == full.text[:full.text.index(stop)]
    n = len(cut.output_ids)
    assert cut.output_ids == full.output_ids[:n]
    assert stop in engine.tokenizer.decode(cut.output_ids) and stop not in engine.tokenizer.decode(cut.output_ids[:-1])
    s = engine.generate("def main(", max_new_tokens=60, stop=[stop], stream=True)
    pieces = list(s)
    assert "".join(pieces) == cut.text == s.result.text and s.result.output_ids == cut.output_ids
    assert engine.generate("def main(", max_new_tokens=60, stop=["never-there"]).output_ids == full.output_ids
    from orthrus_export.cli import main
    assert main(["run", "--engine", str(engine.path), "--prompt", "x", "--stop", ""]) == 2


def test_a_closed_stream_frees_the_engine(models):
    """An open stream does not hold the engine: another thread's request runs beside it (in-flight batching) and
    equals its result alone; closing the stream part-way cancels its generation and frees its slot."""
    engine = models.engine("tiny", max_seq_len=256)
    alone = engine.generate("import os", max_new_tokens=20).output_ids
    s = engine.generate("def main(", max_new_tokens=200, stream=True)
    it = iter(s)
    next(it)
    out = {}
    t = threading.Thread(target=lambda: out.update(ids=engine.generate("import os", max_new_tokens=20).output_ids))
    t.start()
    t.join(timeout=120)
    assert not t.is_alive() and out["ids"] == alone
    assert not s.handle.finished  # still streaming while the other request ran
    s.close()
    assert list(it) == [] or s.handle.finish_reason == "cancelled"
    assert s.handle.finish_reason == "cancelled" and len(s.handle.output_ids) < 200
    assert engine.scheduler_stats()["slots_in_use"] == 0


# ---- the fresh processes (started with the first test: see fresh_loads) ---------------------------------------------
def test_fresh_process_reuses_the_stored_artifacts(fresh_loads, compiled_loaded):
    """A fresh process with an empty Inductor cache gets its compiled programs from the engine (cache hits, no
    compile), and generates what the build's process generates."""
    rc, out, err, _ = fresh_loads("fresh")
    assert rc == 0, err
    r = json.loads(out.strip().splitlines()[-1])
    assert r["stats"]["compiled"]["artifacts"] == "loaded" and r["hits"] >= 3, r
    assert r["ids"] == compiled_loaded.generate("def main(", max_new_tokens=16).output_ids


def test_stack_mismatch_recompiles_saying_so_or_refuses_with_strict(fresh_loads):
    rc, out, err, e = fresh_loads("mismatch")
    assert rc == 0, err
    assert "LOG compiled artifacts do not match this stack (torch 2.99.0 (engine) vs" in out
    assert "recompiling" in out and "LOG compiled and captured in" in out
    r = json.loads(out.strip().splitlines()[-1])
    # no cache hit: nothing came from the engine's artifacts, every program was compiled again
    assert r["stats"]["compiled"]["artifacts"] == "mismatch" and r["hits"] == 0, r
    from orthrus_export.cli import main
    assert main(["run", "--engine", str(e), "--prompt", "x", "--strict"]) == 2
