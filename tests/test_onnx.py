"""ONNX export: graph structure (checker, shape inference, static shapes, orthrus-domain nodes or standard ops only,
external data), Polygraphy per-pass parity with the engine (and the printed Polygraphy command), and greedy tokens of
the onnxruntime backend against the torch engine and transformers, with tiny and random shapes."""

import json
import shlex
import shutil
import subprocess
import sys

import onnx
import pytest

from orthrus_export.checkpoint import TINY_DIR
from orthrus_runtime.engine_format import verify_engine
from orthrus_export.onnx_export import export_engine
from orthrus_export.onnx_parity import compare_engine
from orthrus_export.parity import random_prompts, token_parity
from orthrus_runtime import Engine


@pytest.fixture(scope="module")
def exported(models, tmp_path_factory):
    """Copies of fp32 engines (tiny, a random GQA-4 shape) with both ONNX variants; the GQA-4 one external-data."""
    root = tmp_path_factory.mktemp("onnx")
    out = {}
    for shape, external in (("tiny", False), ("gqa4_untied", True)):
        path = root / shape
        shutil.copytree(models.engine_path(shape, "fp32", 256 if shape == "tiny" else 512), path)
        for decompose in (False, True):
            export_engine(path, decompose=decompose, external_data=external, progress=lambda m: None)
        out[shape] = path
    return out


def _dims_static(vi) -> bool:
    return all(d.HasField("dim_value") for d in vi.type.tensor_type.shape.dim)


@pytest.mark.parametrize("variant", ["orthrus", "decomposed"])
def test_graphs_are_checked_static_and_listed(exported, variant):
    for shape, path in exported.items():
        manifest = verify_engine(path)  # every ONNX file is listed with its sha256 and matches it
        rec = manifest["onnx"][variant]
        assert set(rec["graphs"]) == {"draft", "verify", "decode"} and rec["opset"] >= 17
        assert all(f in manifest["files"] for f in rec["files"])
        assert rec["external_data"] == (shape == "gqa4_untied")
        for name, rel in rec["graphs"].items():
            model = onnx.load(str(path / rel))
            onnx.checker.check_model(model, full_check=True)
            inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
            g = inferred.graph
            assert all(_dims_static(v) for v in [*g.input, *g.output, *g.value_info])
            names = [i.name for i in g.input]
            assert names[:2] == ["tokens", "cache_len"]
            layers = manifest["model"]["config"]["num_layers"]
            assert names[2:] == [f"{kv}_cache.{i}" for i in range(layers) for kv in "kv"]
            outs = [o.name for o in g.output]
            assert outs[0] == "logits"
            assert outs[1:] == ([] if name == "draft" else [f"{kv}_cache_out.{i}" for i in range(layers) for kv in "kv"])
            ops = {(n.domain, n.op_type) for n in g.node}
            assert not {"NonZero", "Loop", "If", "Unique"} & {op for _, op in ops}  # no data-dependent shapes
            custom = [n for n in g.node if n.domain == "orthrus"]
            if variant == "decomposed":
                assert not custom and {d for d, _ in ops} == {""}
            else:
                kind = "DiffusionAttention" if name == "draft" else "CachedAttention"
                assert [n.op_type for n in custom] == [kind] * layers
                attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in custom]
                assert [a["layer"] for a in attrs] == list(range(layers))
                assert all(a["scale"] == pytest.approx(manifest["model"]["config"]["head_dim"] ** -0.5)
                           for a in attrs)
            if rec["external_data"]:
                assert (path / rec["directory"] / "weights.bin").exists()
                assert (path / rel).stat().st_size < 1_000_000  # the weights live outside the graph


@pytest.mark.parametrize("variant", ["orthrus", "decomposed"])
def test_polygraphy_per_pass_parity(exported, variant, tmp_path):
    for shape, path in exported.items():
        report = compare_engine(path, variant, save_dir=tmp_path / shape, log=lambda m: None)
        assert set(report) == {"draft", "verify", "decode"}
        assert all(r["ok"] for r in report.values()), report


def test_printed_polygraphy_command_reruns_and_can_fail(exported, tmp_path):
    path = exported["tiny"]
    report = compare_engine(path, "decomposed", save_dir=tmp_path, log=lambda m: None)
    cmd = report["verify"]["command"]
    assert cmd.startswith("polygraphy run ")
    poly = shutil.which("polygraphy") or f"{sys.executable} -m polygraphy"
    argv = shlex.split(cmd.replace("polygraphy", poly, 1))
    ok = subprocess.run(argv, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]
    assert "PASSED" in ok.stdout + ok.stderr
    # the same command against engine outputs nudged by 20x the tolerance in one logit must fail
    from polygraphy.comparator import RunResults
    saved = RunResults.load(report["verify"]["files"][1])
    logits = saved[0][1][0]["logits"]
    logits[3, 7] += 20 * (1e-4 + abs(logits[3, 7]) * 1e-5)
    saved[0][1][0]["logits"] = logits
    nudged = tmp_path / "nudged.json"
    saved.save(str(nudged))
    i = argv.index("--load-outputs")
    bad = subprocess.run(argv[:i + 1] + [str(nudged)] + argv[i + 2:], capture_output=True, text=True)
    assert bad.returncode != 0 and "FAILED" in bad.stdout + bad.stderr


@pytest.mark.parametrize("variant", ["orthrus", "decomposed"])
def test_onnxruntime_backend_tokens_equal_torch_engine_and_transformers(exported, models, variant):
    for shape, path in exported.items():
        torch_engine = Engine.load(path)
        ort_engine = Engine.load(path, backend="onnxruntime", onnx_variant=variant)
        if shape == "tiny":
            from orthrus_export.checkpoint import open_checkpoint
            from orthrus_export.reference import Reference
            ref = Reference(open_checkpoint("tiny"))
            prompts = [ort_engine.encode(p["text"]) for p in
                       json.loads((TINY_DIR / "heldout_prompts.json").read_text())[:1 if variant == "orthrus" else 2]]
        else:
            ref = models.reference(shape)
            prompts = random_prompts(ort_engine.config.vocab_size, 2, seed=3, lengths=(5, 40))
        rows = token_parity(ort_engine, ref, prompts, max_new_tokens=32)
        for prompt, row in zip(prompts, rows):
            assert row["orthrus_equals_transformers"] and row["ar_equals_transformers"], row
            assert ort_engine.generate(prompt, max_new_tokens=32).output_ids == \
                torch_engine.generate(prompt, max_new_tokens=32).output_ids
        if shape == "tiny":
            assert max(r["acceptance_length"] for r in rows) > 1.5  # drafts are accepted through ONNX too


def test_cli_onnx_run_and_errors(models, tmp_path):
    from orthrus_export.cli import main
    path = tmp_path / "e"
    shutil.copytree(models.engine_path("gqa1_tied"), path)
    assert main(["run", "--engine", str(path), "--prompt-ids", "1,2,3", "--backend", "onnxruntime"]) == 2
    assert main(["onnx", "--engine", str(path), "--decompose", "--check"]) == 0
    assert main(["run", "--engine", str(path), "--prompt-ids", "1,2,3", "--max-new-tokens", "8", "--backend",
                 "onnxruntime", "--onnx-variant", "decomposed"]) == 0
    assert main(["check", "--engine", str(path), "--backend", "onnxruntime", "--onnx-variant", "decomposed",
                 "--prompts", "2", "--max-new-tokens", "12"]) == 0
    bf16 = models.engine_path("gqa1_tied", "bf16")
    assert main(["run", "--engine", str(bf16), "--prompt-ids", "1", "--backend", "onnxruntime"]) == 2


def test_build_with_onnx_writes_both_variants_inside_the_engine(models, tmp_path):
    from orthrus_export.builder import build
    # a small random checkpoint: the export itself is checked on tiny above (the `exported` fixture)
    out = build(str(models.checkpoint("gqa1_tied")), out=tmp_path / "t", max_seq_len=128, progress=False,
                onnx="both")
    m = verify_engine(out)
    assert set(m["onnx"]) == {"orthrus", "decomposed"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left behind
    assert (out / "onnx" / "verify.onnx").exists() and (out / "onnx-decomposed" / "draft.onnx").exists()


def test_bf16_engine_exports_and_fp8_is_refused(models, tmp_path):
    import torch
    from safetensors.torch import load_file

    from orthrus_runtime.errors import OrthrusError
    path = tmp_path / "bf16"
    shutil.copytree(models.engine_path("gqa1_tied", "bf16"), path)
    for decompose in (False, True):
        export_engine(path, decompose=decompose, progress=lambda m: None)
    model = onnx.load(str(path / "onnx" / "verify.onnx"))
    onnx.checker.check_model(model, full_check=True)
    init = {i.name: i for i in model.graph.initializer}
    stored = load_file(str(path / "weights.safetensors"))
    assert init["embed"].data_type == onnx.TensorProto.BFLOAT16
    assert torch.equal(torch.frombuffer(bytearray(init["embed"].raw_data), dtype=torch.bfloat16).reshape(
        stored["embed"].shape), stored["embed"])
    fp8 = tmp_path / "fp8"
    from orthrus_export.builder import build
    build(str(models.checkpoint("gqa1_tied")), precision="fp8", out=fp8, max_seq_len=128, progress=False)
    with pytest.raises(OrthrusError, match="no conversion for operator orthrus.fp8_linear"):
        export_engine(fp8, progress=lambda m: None)
    assert not (fp8 / "onnx").exists() and not [p for p in fp8.iterdir() if p.name.startswith(".")]
