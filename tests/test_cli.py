"""The command line end to end on the tiny model, and every kind of bad input: one line, exit code 2, no
traceback, nothing half-written."""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys

import pytest

from orthrus_export import builder
from orthrus_export.cli import main
from orthrus_runtime.errors import OrthrusError


def cli(*args, cwd=None):
    """Run the CLI in this process (a fresh interpreter costs seconds): exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    try:
        if cwd:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main([str(a) for a in args])
    finally:
        os.chdir(old)
    return rc, out.getvalue(), err.getvalue()


def cli_process(*args, cwd=None):
    """The real console entry point in a subprocess."""
    p = subprocess.run([sys.executable, "-m", "orthrus_export", *map(str, args)], capture_output=True, text=True,
                       cwd=cwd, timeout=300)
    return p.returncode, p.stdout, p.stderr


def tiny_tokenizer():
    from tokenizers import Tokenizer

    from orthrus_export.checkpoint import TINY_DIR
    return Tokenizer.from_file(str(TINY_DIR / "tokenizer.json"))


def assert_user_error(rc, err, pattern):
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("orthrus-export: error: "), err
    assert pattern in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    rc, out, err = cli("build", "--model", "tiny", "--no-progress", "--max-seq-len", "256", cwd=root)
    assert rc == 0, err
    engine = root / "engines" / "orthrus-qwen3-tiny.cpu.fp32"
    assert f"engine written to engines/{engine.name}" in out
    return engine


def test_build_writes_a_complete_engine(tiny_engine):
    m = json.loads((tiny_engine / "manifest.json").read_text())
    assert m["schema"] == "orthrus-engine" and m["precision"] == "fp32" and m["gpu"]["profile"] == "cpu"
    assert all(set(r) >= {"bytes", "sha256"} for r in m["files"].values())
    assert "header_sha256" in m["files"]["weights.safetensors"]
    assert set(m["files"]) == {"weights.safetensors", "programs/draft.json", "programs/verify.json",
                               "programs/decode.json", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"}
    layers = m["model"]["config"]["num_layers"]
    assert m["programs"]["draft"]["custom_op_nodes"] == {"diffusion_attention": layers, "qk_norm_rope": layers}
    assert m["programs"]["verify"]["custom_op_nodes"] == {"cached_attention": layers, "qk_norm_rope": layers}
    assert all(r["ok"] for r in m["self_check"]["passes"].values())
    assert not list(tiny_engine.parent.glob(".*tmp*"))
    # the programs are plain JSON graphs: no pickles, no tensors
    graph = json.loads((tiny_engine / "programs" / "verify.json").read_text())
    assert "graph_module" in graph


def test_build_refuses_to_overwrite_without_force(tiny_engine):
    rc, _, err = cli("build", "--model", "tiny", "--no-progress", "--out", tiny_engine)
    assert_user_error(rc, err, "already exists: pass --force")


def test_run_json_and_stream(tiny_engine):
    rc, out, err = cli("run", "--engine", tiny_engine, "--prompt", "def f(x):", "--max-new-tokens", "20", "--json")
    assert rc == 0, err
    r = json.loads(out)
    assert len(r["output_ids"]) == 20 and r["prompt_ids"] == tiny_tokenizer().encode("def f(x):").ids
    assert r["stats"]["cycles"] >= 1 and len(r["stats"]["acceptance_hist"]) == 33
    rc, out2, err2 = cli("run", "--engine", tiny_engine, "--prompt", "def f(x):", "--max-new-tokens", "20", "--stream")
    assert rc == 0 and "acceptance length" in err2
    assert out2.rstrip("\n") == r["text"]
    rc, out3, _ = cli("run", "--engine", tiny_engine, "--prompt", "def f(x):", "--max-new-tokens", "20",
                      "--no-drafts", "--json")
    assert json.loads(out3)["output_ids"] == r["output_ids"]


def test_run_chat_template(tiny_engine):
    rc, out, err = cli("run", "--engine", tiny_engine, "--prompt", "hi", "--chat", "--max-new-tokens", "3", "--json")
    assert rc == 0, err
    ids = json.loads(out)["prompt_ids"]
    tok = tiny_tokenizer()
    assert ids == tok.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n").ids
    assert ids[0] == tok.token_to_id("<|im_start|>")


def test_check_and_info(tiny_engine):
    rc, out, err = cli("check", "--engine", tiny_engine, "--prompts", "2", "--max-new-tokens", "20", "--json")
    assert rc == 0, err
    report = json.loads(out)
    assert report["ok"] and report["identical_to_transformers"] == "2/2"
    rc, out, _ = cli("info", "--engine", tiny_engine)
    assert rc == 0 and "fp32 for cpu" in out


@pytest.mark.parametrize("args,pattern", [
    (["--max-new-tokens", "300"], "exceeds the engine's max_seq_len 256"),
    (["--temperature", "-1"], "temperature must be a finite number >= 0"),
    (["--top-p", "0"], "top_p must be in (0, 1]"),
    (["--top-k", "-3"], "top_k must be an integer >= 0"),
    (["--max-new-tokens", "0"], "max_new_tokens must be an integer >= 1"),
])
def test_run_bad_parameters(tiny_engine, args, pattern):
    rc, _, err = cli("run", "--engine", tiny_engine, "--prompt", "x", *args)
    assert_user_error(rc, err, pattern)


def test_prompt_longer_than_cache(tiny_engine):
    rc, _, err = cli("run", "--engine", tiny_engine, "--prompt", "y" * 300)
    assert_user_error(rc, err, "prompt of 300 tokens + max_new_tokens 64 exceeds")


def test_errors_from_a_real_process_are_one_line_exit_2(tmp_path, tiny_engine):
    assert_user_error(*cli_process("run", "--engine", tmp_path / "none", "--prompt", "x")[::2], "does not exist")
    assert_user_error(*cli_process("run", "--engine", tiny_engine, "--prompt", "x", "--top-p", "2")[::2],
                      "top_p must be in (0, 1]")


def test_missing_engine_and_model(tmp_path):
    assert_user_error(*cli("run", "--engine", tmp_path / "none", "--prompt", "x")[::2], "does not exist")
    assert_user_error(*cli("build", "--model", tmp_path / "none", "--out", tmp_path / "e")[::2],
                      "no such directory")
    assert not (tmp_path / "e").exists()


def test_bad_gpu_and_precision(tmp_path):
    assert_user_error(*cli("build", "--model", "tiny", "--gpu", "tpu9")[::2], "unknown --gpu 'tpu9'")
    assert_user_error(*cli("build", "--model", "tiny", "--precision", "fp16")[::2],
                      "profile cpu does not support --precision fp16")
    assert_user_error(*cli("build", "--model", "tiny", "--gpu", "a100", "--precision", "fp8")[::2],
                      "profile a100 has no FP8 support")
    assert_user_error(*cli("build", "--model", "tiny", "--gpu", "h100", "--out", tmp_path / "e")[::2],
                      "this machine has no CUDA GPU")


def copy_engine(src, dst):
    shutil.copytree(src, dst)
    return dst


def edit_manifest(engine, fn):
    m = json.loads((engine / "manifest.json").read_text())
    fn(m)
    (engine / "manifest.json").write_text(json.dumps(m))


def test_corrupted_engine_file(tiny_engine, tmp_path):
    """A flipped byte in the weights' tensor data is found by `verify` and by `run --verify-weights` (a plain load
    checks the weights' size and header only); a changed program file, header or size is found at every load."""
    e = copy_engine(tiny_engine, tmp_path / "e")
    w = e / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-5] ^= 0xFF
    w.write_bytes(bytes(data))
    assert_user_error(*cli("verify", "--engine", e)[::2], "weights.safetensors does not match its sha256")
    assert_user_error(*cli("run", "--engine", e, "--prompt", "x", "--verify-weights")[::2],
                      "weights.safetensors does not match its sha256")
    data[-5] ^= 0xFF
    data[20] ^= 0x01  # inside the safetensors header
    w.write_bytes(bytes(data))
    assert_user_error(*cli("run", "--engine", e, "--prompt", "x")[::2], "weights.safetensors does not match its sha256")
    w.write_bytes(bytes(data[:-1]))
    assert_user_error(*cli("run", "--engine", e, "--prompt", "x")[::2], "weights.safetensors has")
    p = e / "programs" / "verify.json"
    p.write_bytes(p.read_bytes().replace(b"cached_attention", b"cached_attentiom", 1))
    assert_user_error(*cli("run", "--engine", e, "--prompt", "x")[::2],
                      "programs/verify.json does not match its sha256")


def test_verify_reports_throughput(tiny_engine):
    rc, out, err = cli("verify", "--engine", tiny_engine, "--json")
    assert rc == 0, err
    r = json.loads(out)
    assert r["ok"] and r["bytes"] == sum(f.stat().st_size for f in tiny_engine.rglob("*")
                                         if f.is_file() and f.name != "manifest.json") and r["GBps"] > 0


def test_missing_engine_file(tiny_engine, tmp_path):
    e = copy_engine(tiny_engine, tmp_path / "e")
    (e / "programs" / "draft.json").unlink()
    assert_user_error(*cli("run", "--engine", e, "--prompt", "x")[::2], "programs/draft.json is missing")


def test_engine_for_another_device(tiny_engine, tmp_path):
    e = copy_engine(tiny_engine, tmp_path / "e")
    edit_manifest(e, lambda m: m["gpu"].update(profile="h100"))
    assert_user_error(*cli("run", "--engine", e, "--prompt", "x")[::2],
                      "cannot load this engine for GPU profile h100: this machine has no CUDA GPU")


def test_engine_for_another_torch(tiny_engine, tmp_path):
    e = copy_engine(tiny_engine, tmp_path / "e")
    edit_manifest(e, lambda m: m["versions"].update(torch="2.9.1+cu128"))
    assert_user_error(*cli("run", "--engine", e, "--prompt", "x")[::2], "was built with torch 2.9.1+cu128")


def test_engine_of_another_schema(tiny_engine, tmp_path):
    e = copy_engine(tiny_engine, tmp_path / "e")
    edit_manifest(e, lambda m: m.update(schema_version=99))
    assert_user_error(*cli("info", "--engine", e)[::2], "engine schema version 99")


def test_failed_build_leaves_nothing_and_keeps_the_old_engine(tiny_engine, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OrthrusError("simulated failure while tracing")

    monkeypatch.setattr(builder, "export_program", boom)
    out = tmp_path / "fresh"
    with pytest.raises(OrthrusError, match="simulated"):
        builder.build("tiny", out=out, progress=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    old = copy_engine(tiny_engine, tmp_path / "old")
    before = (old / "manifest.json").read_text()
    with pytest.raises(OrthrusError, match="simulated"):
        builder.build("tiny", out=old, force=True, progress=False)
    assert (old / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_force_replaces_an_engine(tiny_engine, tmp_path):
    out = copy_engine(tiny_engine, tmp_path / "e")  # an engine that is there (max_seq_len 256)
    first = json.loads((out / "manifest.json").read_text())["created"]
    builder.build("tiny", out=out, max_seq_len=64, force=True, progress=False, self_check=False)
    m = json.loads((out / "manifest.json").read_text())
    assert m["build"]["max_seq_len"] == 64 and first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]


def test_bad_compile_choice():
    assert_user_error(*cli("build", "--model", "tiny", "--compile", "tensorrt")[::2], "unknown --compile 'tensorrt'")


def test_check_bf16_reports_identical_rate_and_near_ties(models):
    out = models.engine_path("tiny", "bf16")
    rc, text, err = cli("check", "--engine", out, "--prompts", "4", "--max-new-tokens", "40", "--json")
    assert rc == 0, err
    report = json.loads(text)
    assert report["precision"] == "bf16" and report["ok"]
    assert all(r["orthrus_equals_engine_ar"] for r in report["prompts"])
    for r in report["prompts"]:
        if not r["orthrus_equals_transformers"]:  # a divergence must come with its fp32 re-score
            d = r["divergence"]
            assert d["near_tie"] and d["fp32_top2_margin"] <= d["near_tie_bound"]
    n = sum(r["orthrus_equals_transformers"] for r in report["prompts"])
    assert report["identical_to_transformers"] == f"{n}/4"
