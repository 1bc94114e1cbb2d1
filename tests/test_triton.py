"""The tiny engine behind a real Triton Inference Server (CPU): streaming and not, HTTP and gRPC, concurrency,
bad requests, metrics. The server runs on free 127.0.0.1 ports and is stopped by its PID whatever happens."""

import importlib.util
import json
import socket
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from orthrus_export.tritonserver import Server, install, write_repository

# the client example's gRPC streaming function, so that the tests exercise the code users copy
_spec = importlib.util.spec_from_file_location(
    "triton_client", Path(__file__).resolve().parents[1] / "scripts" / "triton_client.py")
triton_client = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(triton_client)
grpc_stream = triton_client.grpc_stream

PROMPTS = ["def main(", "class Foo:\n    def __init__(self", "import os\nimport sys\n", "    return ",
           "for i in range(", "if __name__ == ", "x = [", "    def __repr__(self):\n"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory, models):
    from orthrus_runtime import Engine
    root = tmp_path_factory.mktemp("triton")
    install()
    engine_dir = models.engine_path("tiny")  # the session's tiny engine (fp32, max_seq_len 512, 8 slots)
    repo = write_repository(engine_dir, root / "repo")
    server = Server(repo, free_port(), free_port(), free_port(), log=root / "server.log")
    try:
        server.wait_ready(timeout=120)
        yield server, Engine.load(engine_dir)
    finally:
        server.stop()
    assert server.proc.returncode is not None


def post(server, path, body):
    req = urllib.request.Request(f"http://127.0.0.1:{server.http}{path}", data=json.dumps(body).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return r.read().decode()


def generate(server, prompt, n, **kw):
    return json.loads(post(server, "/v2/models/orthrus/generate", {"text_input": prompt, "max_tokens": n, **kw}))


def test_non_streaming_equals_the_runtime(served):
    server, engine = served
    for prompt in PROMPTS[:3]:
        r = generate(server, prompt, 40)
        local = engine.generate(prompt, max_new_tokens=40)
        assert r["text_output"] == local.text
        assert r["output_tokens"] == len(local.output_ids) and r["cycles"] == local.stats.cycles


def test_grpc_and_http_streams_concatenate_to_the_text(served):
    server, engine = served
    prompt = PROMPTS[3]
    expected = engine.generate(prompt, max_new_tokens=48).text
    pieces = grpc_stream(f"127.0.0.1:{server.grpc}", prompt, 48)
    assert len([p for p in pieces if p]) > 1 and "".join(pieces) == expected
    sse = post(server, "/v2/models/orthrus/generate_stream", {"text_input": prompt, "max_tokens": 48, "stream": True})
    events = [json.loads(line[len("data: "):]) for line in sse.splitlines() if line.startswith("data: ")]
    assert len(events) > 2 and "".join(e["text_output"] for e in events) == expected


def metrics(server) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics}/metrics", timeout=30).read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith("orthrus_")}


def test_eight_concurrent_streaming_clients(served):
    """Eight gRPC streams at once: each gets the text it gets alone, and they shared the scheduler's passes."""
    server, engine = served
    expected = {p: engine.generate(p, max_new_tokens=32).text for p in PROMPTS}
    got, errors = {}, []
    before = metrics(server)

    def client(p):
        try:
            got[p] = "".join(grpc_stream(f"127.0.0.1:{server.grpc}", p, 32))
        except Exception as e:  # surfaced below
            errors.append(e)
    threads = [threading.Thread(target=client, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and got == expected
    after = metrics(server)
    key = '{model="orthrus"}'
    steps = after["orthrus_scheduler_steps_total" + key] - before.get("orthrus_scheduler_steps_total" + key, 0)
    rows = after["orthrus_scheduler_rows_total" + key] - before.get("orthrus_scheduler_rows_total" + key, 0)
    assert steps > 0 and rows / steps > 1.5, f"{rows} rows in {steps} steps: the streams did not share passes"


def test_a_cancelled_grpc_stream_frees_its_slot(served):
    """A client cancels its stream after the first piece: the model cancels the request (counted on /metrics) long
    before its 400 tokens, and the server goes on serving."""
    import queue as queue_module
    import time

    import numpy as np
    import tritonclient.grpc as grpcclient
    server, engine = served
    key = 'orthrus_requests_cancelled_total{model="orthrus"}'
    before = metrics(server).get(key, 0)
    q = queue_module.Queue()
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc}")
    inputs = []
    for name, value, dtype in (("text_input", np.array([b"def main("], dtype=object), "BYTES"),
                               ("max_tokens", np.array([400], dtype=np.int32), "INT32"),
                               ("stream", np.array([True]), "BOOL")):
        t = grpcclient.InferInput(name, [1], dtype)
        t.set_data_from_numpy(value)
        inputs.append(t)
    client.start_stream(callback=lambda result, error: q.put((result, error)))
    client.async_stream_infer("orthrus", inputs, enable_empty_final_response=True)
    result, error = q.get(timeout=120)
    assert error is None
    client.stop_stream(cancel_requests=True)
    client.close()
    deadline = time.time() + 60
    while metrics(server).get(key, 0) <= before and time.time() < deadline:
        time.sleep(0.2)
    assert metrics(server).get(key, 0) == before + 1
    assert generate(server, PROMPTS[0], 8)["text_output"] == engine.generate(PROMPTS[0], max_new_tokens=8).text


@pytest.mark.parametrize("body,pattern", [
    ({"text_input": "x", "max_tokens": 0}, "max_new_tokens must be an integer >= 1"),
    ({"text_input": "x", "max_tokens": 100000}, "exceeds the engine's max_seq_len"),
    ({"text_input": "x", "max_tokens": 4, "temperature": -1.0}, "temperature must be"),
    ({"text_input": "x", "max_tokens": "many"}, ""),
    ({"text_input": "x", "max_tokens": 4, "beam_width": 2}, "unknown parameter 'beam_width'"),
    ({"text_input": "x", "max_tokens": 4, "top_k": -3}, "top_k must be an integer >= 0"),
    ({"max_tokens": 4}, "text_input"),
    ({"text_input": "x" * 1_000_000, "max_tokens": 4}, "exceeds the engine's max_seq_len"),
])
def test_bad_request_gets_an_error_and_the_model_keeps_serving(served, body, pattern):
    server, engine = served
    with pytest.raises(urllib.error.HTTPError) as e:
        post(server, "/v2/models/orthrus/generate", body)
    assert e.value.code in (400, 500) and pattern in e.value.read().decode()  # 500: the endpoint's own type check
    assert generate(server, "x", 4)["output_tokens"] == 4


def test_metrics_counters_move(served):
    server, _ = served
    before = metrics(server)
    r = generate(server, PROMPTS[4], 24)
    after = metrics(server)
    key = 'orthrus_generated_tokens_total{model="orthrus"}'
    assert after[key] - before.get(key, 0) == r["output_tokens"]
    cycles = 'orthrus_cycles_total{model="orthrus"}'
    assert after[cycles] - before.get(cycles, 0) == r["cycles"]
    hist = sum(v for k, v in after.items() if k.startswith("orthrus_acceptance_length_cycles_total"))
    hist_before = sum(v for k, v in before.items() if k.startswith("orthrus_acceptance_length_cycles_total"))
    assert hist - hist_before == r["cycles"]

    def moved(prefix, *labels):
        def total(m):
            return sum(v for k, v in m.items() if k.startswith(prefix) and all(x in k for x in labels))
        return total(after) - total(before)
    prompt_tokens = len(served[1].encode(PROMPTS[4]))
    assert moved("orthrus_prompt_tokens_total") == prompt_tokens
    assert moved("orthrus_requests_finished_total", 'reason="length"') == 1
    local = served[1].generate(PROMPTS[4], max_new_tokens=24).stats  # the same greedy request in this process
    assert moved("orthrus_accepted_tokens_per_position_total") == sum(local.accepted_per_pos)
    assert moved("orthrus_accepted_tokens_per_position_total", 'position="1"') == local.accepted_per_pos[0]
    for name in ("orthrus_time_to_first_token_seconds", "orthrus_request_queue_time_seconds",
                 "orthrus_inter_token_latency_seconds", "orthrus_e2e_request_latency_seconds"):
        assert moved(name + "_count") == 1, name  # native histograms: one observation for this request
        assert moved(name + "_bucket", 'le="+Inf"') == 1
    assert 'orthrus_requests_running{model="orthrus"}' in after and 'orthrus_requests_waiting{model="orthrus"}' in after


def stop_from_own_text(engine, prompt, n):
    """Three characters from the middle of the model's own greedy text: a stop string that occurs (whatever the
    embedded model writes), so a request with it stops before ``n`` tokens."""
    text = engine.generate(prompt, max_new_tokens=n).text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert len(stop) == 3, text
    return stop


def test_stop_strings_end_the_text(served):
    server, engine = served
    stop = stop_from_own_text(engine, PROMPTS[1], 60)
    local = engine.generate(PROMPTS[1], max_new_tokens=60, stop=[stop])
    r = generate(server, PROMPTS[1], 60, stop=[stop])
    assert r["text_output"] == local.text and stop not in r["text_output"]
    assert r["output_tokens"] == len(local.output_ids) < 60 and local.stats.finish_reason == "stop"


def test_gpu_engines_get_gpu_instances_one_per_listed_gpu(served, tmp_path):
    """The repository of a GPU engine asks for KIND_GPU instances on the listed GPUs; a CPU engine refuses --gpus."""
    from orthrus_export.tritonserver import instance_group
    server, engine = served
    manifest = dict(engine.manifest, gpu={**engine.manifest["gpu"], "profile": "h200"})
    assert instance_group(manifest, 1, None) == "{ count: 1 kind: KIND_GPU gpus: [ 0 ] }"
    assert instance_group(manifest, 2, [0, 1]) == "{ count: 2 kind: KIND_GPU gpus: [ 0, 1 ] }"
    assert instance_group(engine.manifest, 1, None) == "{ count: 1 kind: KIND_CPU }"
    with pytest.raises(Exception, match="CPU engine: it runs on KIND_CPU instances; drop --gpus"):
        instance_group(engine.manifest, 1, [0])
    with pytest.raises(Exception, match="distinct GPU indices"):
        instance_group(manifest, 1, [0, 0])


def test_client_example_checks_its_own_answer(served):
    import subprocess
    import sys
    server, engine = served
    script = Path(__file__).resolve().parents[1] / "scripts" / "triton_client.py"
    p = subprocess.run([sys.executable, str(script), "--http", f"127.0.0.1:{server.http}", "--grpc",
                        f"127.0.0.1:{server.grpc}", "--max-tokens", "24", "--engine", str(engine.path)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout == engine.generate("def main(", max_new_tokens=24).text + "\n"


def test_repository_launch_script(served, tmp_path):
    """The repository's own launch.sh starts a server that answers like the first one."""
    import os
    import subprocess
    import time
    server, engine = served
    repo = write_repository(engine.path, tmp_path / "repo2")
    ports = {"HTTP_PORT": free_port(), "GRPC_PORT": free_port(), "METRICS_PORT": free_port()}
    proc = subprocess.Popen([str(repo / "launch.sh")], env={**os.environ, **{k: str(v) for k, v in ports.items()}},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "launch.sh did not bring a server up"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{ports['HTTP_PORT']}/v2/health/ready", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        other = type("S", (), {"http": ports["HTTP_PORT"]})
        assert generate(other, "x = [", 16)["text_output"] == generate(server, "x = [", 16)["text_output"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_numpy2_environment_is_refused(tmp_path):
    """The test's own environment as the model environment: refused in one line when it has numpy 2 (which breaks
    the Python backend's string tensors), accepted otherwise."""
    import sys

    import numpy

    from orthrus_export.tritonserver import check_environment
    from orthrus_runtime.errors import OrthrusError
    if int(numpy.__version__.split(".")[0]) < 2:
        check_environment(Path(sys.prefix))
        return
    with pytest.raises(OrthrusError, match=f"has numpy {numpy.__version__}; Triton's Python backend needs numpy<2"):
        check_environment(Path(sys.prefix))


def test_serve_says_why_the_server_did_not_start(served, tmp_path):
    """`serve` fails in one line with the cause: a port already in use is named before starting; a model that
    cannot load (weights truncated after the repository was written) is reported with the server log's decisive
    line, and the log is kept."""
    import shutil
    import subprocess
    import sys
    server, engine = served

    def serve(engine_dir, http, log):
        p = subprocess.run([sys.executable, "-m", "orthrus_export", "serve", "--engine", str(engine_dir),
                            "--http-port", str(http), "--grpc-port", str(free_port()), "--metrics-port",
                            str(free_port()), "--log-file", str(log)], capture_output=True, text=True, timeout=180)
        err = [ln for ln in p.stderr.splitlines() if ln.startswith("orthrus-export: error:")]
        assert p.returncode == 2 and len(err) == 1 and "Traceback" not in p.stderr, p.stderr
        return err[0]
    line = serve(engine.path, server.http, tmp_path / "a.log")
    assert f"port {server.http} on 127.0.0.1 is already in use" in line and "--http-port" in line
    broken = tmp_path / "broken"
    shutil.copytree(engine.path, broken)
    w = broken / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:-1])
    log = tmp_path / "b.log"
    line = serve(broken, free_port(), log)
    assert "tritonserver exited with code" in line and str(log) in line
    assert "weights.safetensors has" in line, line  # the model's own one-line error, from the server log
    assert log.exists() and "weights.safetensors has" in log.read_text()


def grpc_call(server, fields) -> tuple[list[str], str | None]:
    """One streamed gRPC request with the given ``(name, array, datatype)`` inputs (the client example's
    ``grpc_stream``): its text pieces and the error message of its error response (None if it had none)."""
    try:
        return grpc_stream(f"127.0.0.1:{server.grpc}", None, None, fields=fields), None
    except RuntimeError as e:
        return [], str(e)


def _fields(prompt: bytes, n: int, **extra):
    import numpy as np
    out = [("text_input", np.array([prompt], dtype=object), "BYTES"), ("max_tokens", np.array([n], dtype=np.int32),
                                                                       "INT32"),
           ("stream", np.array([True]), "BOOL")]
    for name, (value, dtype) in extra.items():
        out.append((name, np.array([value], dtype={"FP32": np.float32, "INT32": np.int32, "UINT64": np.uint64}[dtype]),
                    dtype))
    return out


def test_malformed_grpc_requests_are_refused_alone(served):
    """Wrong dtypes, a NaN temperature and invalid UTF-8 each get one error; the server then serves a normal
    request exactly."""
    import numpy as np
    server, engine = served
    wrong_dtype = [("text_input", np.array([b"x"], dtype=object), "BYTES"),
                   ("max_tokens", np.array([4.0], dtype=np.float32), "FP32")]
    cases = [(wrong_dtype, "max_tokens"),
             (_fields(b"x", 4, temperature=(float("nan"), "FP32")), "temperature must be a finite number"),
             (_fields(b"\xff\xfe def", 4), "utf-8")]
    for fields, pattern in cases:
        pieces, error = grpc_call(server, fields)
        assert error is not None and pattern in error, (pattern, error)
    pieces, error = grpc_call(server, _fields(PROMPTS[2].encode(), 16))
    assert error is None and "".join(pieces) == engine.generate(PROMPTS[2], max_new_tokens=16).text


def test_32_concurrent_sampled_streams_each_equal_their_run_alone(served):
    """32 gRPC streams at once (four times the engine's slots), each with its own prompt and seed, sampled: each
    gets exactly the text the same request gets alone."""
    server, engine = served
    jobs = [(PROMPTS[i % len(PROMPTS)], 100 + i) for i in range(32)]
    expected = [engine.generate(p, max_new_tokens=16, temperature=0.8, top_k=20, seed=s).text for p, s in jobs]
    got: list = [None] * len(jobs)

    def client(i):
        p, seed = jobs[i]
        got[i] = grpc_call(server, _fields(p.encode(), 16, temperature=(0.8, "FP32"), top_k=(20, "INT32"),
                                           random_seed=(seed, "UINT64")))
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert [g[1] for g in got] == [None] * len(jobs)
    assert ["".join(g[0]) for g in got] == expected


@pytest.fixture(scope="module")
def openai_url(served):
    """The OpenAI-compatible endpoint (uvicorn, a real HTTP server on a free port) in front of the Triton server."""
    import time

    from orthrus_runtime.openai_frontend import server as openai_server
    server, engine = served
    port = free_port()
    frontend = openai_server(engine.path, f"127.0.0.1:{server.grpc}", port)
    thread = threading.Thread(target=frontend.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not frontend.started and time.time() < deadline:
        time.sleep(0.05)
    assert frontend.started
    yield f"http://127.0.0.1:{port}/v1"
    frontend.should_exit = True
    thread.join(timeout=30)


def test_openai_client_completions_and_chat(served, openai_url):
    """The openai package, as a user calls it: completions (whole and streamed), chat with the engine's chat template,
    usage, stop, seed; n > 1 refused with a 400 that names it."""
    import openai
    server, engine = served
    client = openai.OpenAI(base_url=openai_url, api_key="unused")
    assert [m.id for m in client.models.list().data] == ["orthrus"]
    r = client.completions.create(model="orthrus", prompt=PROMPTS[0], max_tokens=24, temperature=0)
    local = engine.generate(PROMPTS[0], max_new_tokens=24, temperature=0)
    assert r.choices[0].text == local.text and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(local.prompt_ids) and r.usage.completion_tokens == 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + 24
    chunks = list(client.completions.create(model="orthrus", prompt=PROMPTS[0], max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1
    assert "".join(c.choices[0].text for c in chunks if c.choices) == local.text
    assert chunks[-1].usage.completion_tokens == 24
    stop = stop_from_own_text(engine, PROMPTS[1], 60)
    stopped = client.completions.create(model="orthrus", prompt=PROMPTS[1], max_tokens=60, temperature=0, stop=stop)
    assert stopped.choices[0].text == engine.generate(PROMPTS[1], max_new_tokens=60, temperature=0, stop=[stop]).text
    assert stopped.choices[0].finish_reason == "stop"
    sampled = [client.completions.create(model="orthrus", prompt=PROMPTS[2], max_tokens=16, temperature=0.8,
                                         top_p=0.95, seed=11).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1] == engine.generate(PROMPTS[2], max_new_tokens=16, temperature=0.8, top_p=0.95,
                                                       seed=11).text
    chat = client.chat.completions.create(model="orthrus", messages=[{"role": "user", "content": "def main("}],
                                          max_tokens=20, temperature=0)
    expected = engine.generate("def main(", max_new_tokens=20, temperature=0, chat=True)
    assert chat.choices[0].message.content == expected.text and chat.choices[0].message.role == "assistant"
    assert chat.usage.prompt_tokens == len(expected.prompt_ids)
    streamed = client.chat.completions.create(model="orthrus", messages=[{"role": "user", "content": "def main("}],
                                              max_tokens=20, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected.text
    with pytest.raises(openai.BadRequestError, match="n=2 is not supported"):
        client.completions.create(model="orthrus", prompt="x", max_tokens=4, n=2)
    with pytest.raises(openai.BadRequestError, match="exceeds the engine's max_seq_len"):
        client.completions.create(model="orthrus", prompt="x", max_tokens=100000)
    assert client.completions.create(model="orthrus", prompt="x", max_tokens=4).usage.completion_tokens == 4



def _stub_rss_kb(server) -> int:
    """Resident memory of the model's Python backend stub (the process that holds the engine)."""
    import subprocess
    pids = subprocess.run(["pgrep", "-f", "triton_python_backend_stub"], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                          if ":" in line)
        except OSError:
            continue
        if int(status["PPid"]) == server.proc.pid:  # this server's stub, not another test's
            return int(status["VmRSS"].split()[0])
    raise AssertionError("no Python backend stub process found")


def test_openai_stream_hang_up_cancels_the_request_in_the_model(served, openai_url):
    """A client that reads the first SSE chunk of a 400-token completion and closes its connection: the endpoint
    cancels the gRPC request and the model counts the cancellation (its slot freed) long before 400 tokens; the
    endpoint goes on serving."""
    import time

    server, engine = served
    key = 'orthrus_requests_cancelled_total{model="orthrus"}'
    before = metrics(server).get(key, 0)
    body = {"model": "orthrus", "prompt": "def main(", "max_tokens": 400, "stream": True}
    req = urllib.request.Request(f"{openai_url}/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.status == 200
        first = next(line for line in r if line.startswith(b"data: "))
        assert json.loads(first[6:])["choices"][0]["text"]
    # leaving the block closes the connection mid-stream
    deadline = time.time() + 60
    while metrics(server).get(key, 0) <= before and time.time() < deadline:
        time.sleep(0.2)
    assert metrics(server).get(key, 0) == before + 1
    finished = metrics(server).get('orthrus_requests_finished_total{model="orthrus",reason="length"}', 0)
    import openai
    client = openai.OpenAI(base_url=openai_url, api_key="unused")
    out = client.completions.create(model="orthrus", prompt=PROMPTS[0], max_tokens=8, temperature=0)
    assert out.choices[0].text == engine.generate(PROMPTS[0], max_new_tokens=8).text
    assert metrics(server).get('orthrus_requests_finished_total{model="orthrus",reason="length"}', 0) == finished + 1


def test_resident_memory_is_flat_over_300_requests(served):
    """Resident memory of the model process after 300 sequential requests stays within 5% of after the first 20."""
    server, _ = served
    for i in range(20):
        generate(server, PROMPTS[i % len(PROMPTS)], 4)
    after_20 = _stub_rss_kb(server)
    for i in range(280):
        generate(server, PROMPTS[i % len(PROMPTS)], 4)
    after_300 = _stub_rss_kb(server)
    assert after_300 <= after_20 * 1.05, f"resident memory grew from {after_20} kB to {after_300} kB"


def test_a_killed_model_process_is_reported_unready_and_reloaded(tmp_path, models):
    """SIGKILL of the model's Python-backend stub under a supervised server (what `serve` runs): requests fail at
    once (no hang), the model's readiness and the OpenAI endpoint's /health turn unready within seconds, the model is
    reloaded (a fresh stub; the server log then holds two engine load times) and answers as before. Without
    supervision Triton 2.51 keeps answering 200 on readiness while every request fails: checked first."""
    import os
    import signal
    import time

    from orthrus_runtime.openai_frontend import server as openai_server
    install()
    engine_dir = models.engine_path("tiny")  # its own servers and repository; the engine is only read
    repo = write_repository(engine_dir, tmp_path / "repo")

    def kill_stub(server):
        stubs = server.stub_processes()
        assert list(stubs.values()) == ["orthrus_0_0"]
        os.kill(next(iter(stubs)), signal.SIGKILL)
        while server.stub_processes():
            time.sleep(0.05)

    plain = Server(repo, free_port(), free_port(), free_port(), log=tmp_path / "plain.log")
    try:
        plain.wait_ready(timeout=120)
        kill_stub(plain)
        t0 = time.time()
        with pytest.raises(urllib.error.HTTPError) as e:
            generate(plain, "x", 4)
        assert "is not healthy" in e.value.read().decode() and time.time() - t0 < 30
        assert plain.model_ready()  # Triton's own view: still ready
    finally:
        plain.stop()

    server = Server(repo, free_port(), free_port(), free_port(), log=tmp_path / "server.log", supervise=True)
    port = free_port()
    frontend = openai_server(engine_dir, f"127.0.0.1:{server.grpc}", port)
    try:
        server.wait_ready(timeout=120)
        threading.Thread(target=frontend.run, daemon=True).start()
        while not frontend.started:
            time.sleep(0.05)
        health = f"http://127.0.0.1:{port}/health"
        assert urllib.request.urlopen(health, timeout=10).status == 200
        before = generate(server, PROMPTS[1], 8)["text_output"]
        seen = {"unready": False, "503": False}

        def observe():  # readiness as a load balancer sees it, from the moment the process dies
            deadline = time.time() + 120
            while time.time() < deadline and not (seen["unready"] and server.reloads == 1 and server.model_ready()):
                if not server.model_ready():
                    seen["unready"] = True
                    try:
                        urllib.request.urlopen(health, timeout=10)
                    except urllib.error.HTTPError as e:
                        seen["503"] = seen["503"] or e.code == 503
                time.sleep(0.05)
        observer = threading.Thread(target=observe)
        kill_stub(server)
        observer.start()
        t0 = time.time()
        with pytest.raises(urllib.error.HTTPError):  # unhealthy stub, or the model already unloaded
            generate(server, "x", 4)
        assert time.time() - t0 < 30
        observer.join()
        seen_unready, seen_503 = seen["unready"], seen["503"]
        assert seen_unready and seen_503, "the dead model was never reported unready"
        assert server.model_ready() and server.reloads == 1, server.events
        assert "died" in server.events[0] and "reloaded" in server.events[1]
        assert generate(server, PROMPTS[1], 8)["text_output"] == before
        assert urllib.request.urlopen(health, timeout=10).status == 200
        assert len(server.model_load_seconds()) == 2 and all(s > 0 for s in server.model_load_seconds())
    finally:
        frontend.should_exit = True
        server.stop()
