"""What a newcomer hits (issue 16), through the real command line: --version, names in any case and Hugging Face
repo ids, a closed pipe, a client without a server, SIGTERM and concurrent builds, early length checks, --chat
without a template, FP8 with ONNX Runtime, --threads."""

import argparse
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from orthrus_export import builder
from orthrus_export.checkpoint import TINY_DIR, resolve
from orthrus_export.synthetic import write_checkpoint
from orthrus_runtime import __version__
from orthrus_runtime.engine_format import read_manifest
from orthrus_runtime.profiles import load_profile
from test_cli import assert_user_error, cli  # noqa: I001  (tests/ is on the path, as for stats_util)

ROOT = Path(__file__).resolve().parents[1]
# a small Orthrus-Qwen3 layout (the vocabulary leaves room for the byte tokenizer's 260 ids)
SMALL = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
             head_dim=16, seed=5)


def command(*args):
    return [sys.executable, "-m", "orthrus_export", *map(str, args)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout=180.0, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended (exit {proc.returncode}) first: {proc.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError("timed out")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """The tiny engine, built through the CLI with names in other cases than the documented ones."""
    out = tmp_path_factory.mktemp("newcomer") / "tiny"
    rc, _, err = cli("build", "--model", "Tiny", "--gpu", "CPU", "--precision", "FP32", "--out", out,
                     "--max-seq-len", "128", "--no-progress")
    assert rc == 0, err
    return out


# ---- 1. --version ---------------------------------------------------------------------------------------------------
def test_version():
    p = subprocess.run(command("--version"), capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout == f"orthrus-export {__version__}\n"


# ---- 2. names in any case; Hugging Face repo ids -------------------------------------------------------------------
def test_names_are_case_insensitive(engine):
    m = read_manifest(engine)
    assert m["model"]["source"] == "Tiny" and m["gpu"]["profile"] == "cpu" and m["precision"] == "fp32"
    assert resolve("TINY") == TINY_DIR
    assert load_profile("CPU").name == "cpu" and load_profile("H200").name == "h200"
    if not torch.cuda.is_available():
        assert load_profile("AUTO").name == "cpu"
        assert_user_error(*cli("build", "--model", "tiny", "--gpu", "H100", "--precision", "BF16")[::2],
                          "cannot build for GPU profile h100: this machine has no CUDA GPU")


def fake_hf_cache(cache: Path, repo: str, **shape) -> Path:
    """The Hugging Face cache layout (models--owner--name/snapshots/<hash>, refs/main) holding a small checkpoint."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / ("c0ffee" * 6 + "abcd")
    write_checkpoint(snapshot, tokenizer=False, **shape)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(snapshot.name)
    return snapshot


def test_hf_repo_id_builds_from_the_offline_cache(tmp_path, monkeypatch):
    snapshot = fake_hf_cache(tmp_path / "hub", "chiennv/Orthrus-Qwen3-8B", **SMALL)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for spec in ("chiennv/Orthrus-Qwen3-8B", "CHIENNV/orthrus-qwen3-8b", "8B"):
        assert resolve(spec).resolve() == snapshot.resolve()
    assert builder.engine_name("chiennv/Orthrus-Qwen3-8B", "cpu", "fp32") == "orthrus-qwen3-8b.cpu.fp32"
    out = tmp_path / "e"
    rc, text, err = cli("build", "--model", "chiennv/Orthrus-Qwen3-8B", "--out", out, "--max-seq-len", "64",
                        "--no-progress")
    assert rc == 0, err
    assert "engine written to" in text
    m = read_manifest(out)
    assert Path(m["model"]["checkpoint_path"]).resolve() == snapshot.resolve()
    assert m["model"]["config"]["vocab_size"] == SMALL["vocab_size"]
    # a repo id that is not in the cache: the zoo names' error, saying how to download it
    assert_user_error(*cli("build", "--model", "Chiennv/Orthrus-Qwen3-4B", "--out", tmp_path / "x")[::2],
                      "model Chiennv/Orthrus-Qwen3-4B (chiennv/Orthrus-Qwen3-4B) is not in the local Hugging Face "
                      "cache: download it with `hf download chiennv/Orthrus-Qwen3-4B`")
    assert not (tmp_path / "x").exists()


# ---- 3. a reader that leaves early ----------------------------------------------------------------------------------
def test_closed_pipe_is_quiet(engine):
    # the read end closed before the CLI writes: every write fails with EPIPE
    p = subprocess.Popen(command("info", "--engine", engine, "--json"), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    p.stdout.close()
    err = p.stderr.read()
    assert p.wait(timeout=60) == 141, err
    assert "Traceback" not in err and "Exception ignored" not in err and err == "", err
    # as a user types it
    shell = subprocess.run(["bash", "-c", " ".join(map(str, command("info", "--engine", engine, "--json")))
                            + " | head -1"], capture_output=True, text=True, timeout=60)
    assert shell.returncode == 0 and shell.stdout == "{\n"
    assert "Traceback" not in shell.stderr and "Error" not in shell.stderr, shell.stderr


# ---- 4. the Triton client without a server --------------------------------------------------------------------------
def test_triton_client_without_a_server():
    port = free_port()
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "triton_client.py"), "--http", f"127.0.0.1:{port}",
                        "--grpc", f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert lines[0].startswith("triton_client: error: HTTP generate failed")
    assert f"no server answers at http://127.0.0.1:{port}" in lines[0]
    assert "start one with `orthrus-export serve --engine E`" in lines[0]
    assert p.stdout == ""


def test_triton_client_grpc_without_a_server():
    pytest.importorskip("tritonclient.grpc")
    spec = importlib.util.spec_from_file_location("triton_client", ROOT / "scripts" / "triton_client.py")
    client = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(client)
    port = free_port()
    with pytest.raises(client.RequestFailed, match=f"gRPC streaming failed .*no server answers at 127.0.0.1:{port}"):
        client.ask("gRPC streaming", f"127.0.0.1:{port}", lambda: client.grpc_stream(f"127.0.0.1:{port}", "x", 4))


# ---- 5. SIGTERM and concurrent builds -------------------------------------------------------------------------------
def temporaries(out: Path) -> list[Path]:
    return list(out.parent.glob(f".{out.name}.tmp-*"))


def test_sigterm_turned_into_another_error_by_native_code_still_exits_143(monkeypatch, capsys):
    """CI saw a SIGTERM land inside safetensors' get_tensor, which reported the handler's exception as a ValueError:
    the build cleaned up but exited 1 with a traceback. A SIGTERM that arrived is the exit reason, whatever the
    interrupted code turned its exception into; an error without one still propagates."""
    from orthrus_export import cli

    def interrupted_native_call(a):
        try:
            cli._raise_terminated(signal.SIGTERM, None)
        except cli.Terminated:
            raise ValueError("could not determine the shape of object type 'torch.storage.UntypedStorage'")
    monkeypatch.setattr(cli, "cmd_info", interrupted_native_call)
    assert cli.main(["info", "--engine", "E"]) == 143
    monkeypatch.setattr(cli, "cmd_info", lambda a: int("x"))
    with pytest.raises(ValueError):
        cli.main(["info", "--engine", "E"])


def test_sigterm_during_build_removes_the_temporary_directory(tmp_path):
    out = tmp_path / "X"
    p = subprocess.Popen(command("build", "--model", "tiny", "--out", out, "--no-progress"), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: temporaries(out), proc=p)
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=120) == 143, p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert "Traceback" not in p.stderr.read()
    assert not temporaries(out) and not out.exists()
    assert list(tmp_path.iterdir()) == []  # the lock file is gone too


def test_concurrent_builds_into_one_directory(tmp_path):
    out = tmp_path / "X"
    stale = tmp_path / ".X.tmp-999999999"  # left by a process that no longer runs
    stale.mkdir()
    first = subprocess.Popen(command("build", "--model", "tiny", "--out", out, "--max-seq-len", "128",
                                     "--no-progress"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: [t for t in temporaries(out) if t != stale], proc=first)
        rc, _, err = cli("build", "--model", "tiny", "--out", out, "--max-seq-len", "128", "--no-progress")
        assert first.poll() is None, "the first build ended before the second started"
        assert_user_error(rc, err, f"another process is writing {out} right now")
        assert first.wait(timeout=600) == 0, first.stderr.read()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert "engine written to" in first.stdout.read()
    assert read_manifest(out)["build"]["max_seq_len"] == 128
    assert sorted(p.name for p in tmp_path.iterdir()) == ["X"]  # no temporaries (the stale one too), no lock


# ---- 6. lengths are checked before the engine loads -----------------------------------------------------------------
def test_run_checks_max_new_tokens_before_loading(engine, monkeypatch):
    from orthrus_runtime.engine import Engine

    def no_load(*a, **k):
        raise AssertionError("the engine was loaded before the length check")

    monkeypatch.setattr(Engine, "load", no_load)
    assert_user_error(*cli("run", "--engine", engine, "--prompt", "x", "--max-new-tokens", "99999")[::2],
                      "max_new_tokens 99999 + a prompt of at least 1 token exceeds the engine's max_seq_len 128")
    assert_user_error(*cli("run", "--engine", engine, "--prompt-ids", "1,2,3", "--max-new-tokens", "126")[::2],
                      "prompt of 3 tokens + max_new_tokens 126 exceeds the engine's max_seq_len 128")


def test_run_length_error_from_a_real_process(engine):
    p = subprocess.run(command("run", "--engine", engine, "--prompt", "x", "--max-new-tokens", "99999"),
                       capture_output=True, text=True, timeout=60)
    assert_user_error(p.returncode, p.stderr, "exceeds the engine's max_seq_len 128")


# ---- 7. --chat without a chat template ------------------------------------------------------------------------------
def test_chat_without_a_template(tmp_path):
    from orthrus_runtime.tokenizer import EngineTokenizer
    assert EngineTokenizer(TINY_DIR).chat_template  # tiny has one (tests/test_cli.py uses it), as has the byte
    ckpt = tmp_path / "ckpt"                         # tokenizer of synthetic checkpoints: remove it from a copy
    write_checkpoint(ckpt, tokenizer=True, **SMALL)
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config))
    out = builder.build(str(ckpt), out=tmp_path / "e", max_seq_len=64, progress=False, self_check=False)
    assert_user_error(*cli("run", "--engine", out, "--prompt", "hi", "--chat", "--max-new-tokens", "2")[::2],
                      "tokenizer has no chat template: drop --chat")
    rc, text, err = cli("run", "--engine", out, "--prompt", "hi", "--max-new-tokens", "2", "--json")
    assert rc == 0, err
    assert len(json.loads(text)["output_ids"]) == 2


# ---- 8. FP8 engines and ONNX Runtime --------------------------------------------------------------------------------
def test_fp8_engine_with_onnxruntime(models):
    out = models.engine_path("tiny", "fp8")  # the session's FP8 tiny (tests/test_fp8.py checks it)
    for variant in ("orthrus", "decomposed"):
        rc, _, err = cli("run", "--engine", out, "--prompt", "x", "--backend", "onnxruntime", "--onnx-variant",
                         variant)
        assert_user_error(rc, err, "FP8 engines have no ONNX export yet")
        assert "orthrus-export onnx" not in err


# ---- 9. --threads ---------------------------------------------------------------------------------------------------
def test_run_with_threads(engine):
    rc, text, err = cli("run", "--engine", engine, "--prompt", "def f(", "--max-new-tokens", "8", "--threads", "1",
                        "--json")
    assert rc == 0, err
    assert len(json.loads(text)["output_ids"]) == 8


@pytest.mark.parametrize("cmd", [["run", "--prompt", "x"], ["check"], ["bench", "--contexts", "64"]])
@pytest.mark.parametrize("bad", ["0", "-1"])
def test_bad_thread_counts(engine, cmd, bad):
    assert_user_error(*cli(cmd[0], "--engine", engine, *cmd[1:], "--threads", bad)[::2],
                      f"--threads must be an integer >= 1, got {bad}")


def test_default_thread_count_follows_the_engine_size(engine):
    from orthrus_export.cli import _set_threads
    m = read_manifest(engine)
    assert _set_threads(argparse.Namespace(threads=None), m) == 1 and torch.get_num_threads() == 1  # 13.4 M params
    big = {**m, "precision": "bf16", "files": {**m["files"], m["weights"]: {"bytes": 16 * 10**9}}}  # 8 B params
    assert _set_threads(argparse.Namespace(threads=None), big) == min(os.cpu_count(), 8)
    assert _set_threads(argparse.Namespace(threads=3), m) == 3 and torch.get_num_threads() == 3
