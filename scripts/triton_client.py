"""Client example for the orthrus model on Triton Inference Server; checks its own answer.

    python scripts/triton_client.py --prompt "def main(" [--http 127.0.0.1:8000] [--grpc 127.0.0.1:8001]
                                    [--max-tokens 48] [--engine ENGINE]

Asks three ways — HTTP `generate`, HTTP `generate_stream` (SSE) and gRPC streaming (tritonclient) — and exits 1
unless all three texts agree, the streamed pieces concatenate to the whole, and (with --engine) the text equals
the local runtime's greedy output. A server that does not answer is one line on stderr and exit code 2.
"""

import argparse
import json
import queue
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np


def http_generate(http, prompt, n, stream):
    path = "generate_stream" if stream else "generate"
    body = {"text_input": prompt, "max_tokens": n, **({"stream": True} if stream else {})}
    req = urllib.request.Request(f"http://{http}/v2/models/orthrus/{path}", data=json.dumps(body).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        text = r.read().decode()
    if not stream:
        return [json.loads(text)["text_output"]]
    return [json.loads(line[6:])["text_output"] for line in text.splitlines() if line.startswith("data: ")]


def _raise(error):
    if error is None:
        return
    if "UNAVAILABLE" in str(error.status()):  # nothing listens at the address
        raise ConnectionError(error.message())
    raise RuntimeError(str(error))


def grpc_stream(url, prompt, n, fields=None):
    """The text pieces of one streamed request; ``fields`` (``(name, array, datatype)`` inputs) replaces the
    default ``text_input``/``max_tokens``/``stream`` ones. A refused request raises with the server's message."""
    import tritonclient.grpc as grpcclient
    q = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    inputs = []
    if fields is None:
        fields = (("text_input", np.array([prompt.encode()], dtype=object), "BYTES"),
                  ("max_tokens", np.array([n], dtype=np.int32), "INT32"), ("stream", np.array([True]), "BOOL"))
    for name, value, dtype in fields:
        t = grpcclient.InferInput(name, list(value.shape), dtype)
        t.set_data_from_numpy(value)
        inputs.append(t)
    client.start_stream(callback=lambda result, error: q.put((result, error)))
    pieces = []
    try:
        try:
            client.async_stream_infer("orthrus", inputs, enable_empty_final_response=True)
        except Exception as failure:  # the stream failed already: the callback has (or soon has) the reason
            try:
                _raise(q.get(timeout=10)[1])
            except queue.Empty:
                pass
            raise failure
        while True:
            result, error = q.get(timeout=300)
            _raise(error)
            out = result.as_numpy("text_output")
            if out is not None:
                pieces.append(b"".join(out.reshape(-1)).decode())
            final = result.get_response().parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                break
    finally:
        client.stop_stream()
        client.close()
    return pieces


class RequestFailed(Exception):
    """A request no server answered, or one the server refused: one line, exit code 2."""


def ask(what, address, request):
    try:
        return request()
    except urllib.error.HTTPError as e:  # a server answered, with an error
        raise RequestFailed(f"{what} failed: the server at {address} answered HTTP {e.code}: "
                         f"{e.read().decode(errors='replace').strip()[:200]}") from None
    except (urllib.error.URLError, OSError) as e:  # ConnectionError, refused, unreachable, timed out
        reason = getattr(e, "reason", None) or e
        raise RequestFailed(f"{what} failed ({reason}): no server answers at {address}; start one with "
                         "`orthrus-export serve --engine E` (or pass --http/--grpc)") from None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt", default="def main(")
    ap.add_argument("--http", default="127.0.0.1:8000")
    ap.add_argument("--grpc", default="127.0.0.1:8001")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--engine", help="also compare with this engine run locally")
    a = ap.parse_args()
    try:
        whole = ask("HTTP generate", f"http://{a.http}",
                    lambda: http_generate(a.http, a.prompt, a.max_tokens, stream=False)[0])
        sse = "".join(ask("HTTP generate_stream", f"http://{a.http}",
                          lambda: http_generate(a.http, a.prompt, a.max_tokens, stream=True)))
        grpc = "".join(ask("gRPC streaming", a.grpc, lambda: grpc_stream(a.grpc, a.prompt, a.max_tokens)))
    except RequestFailed as e:
        print(f"triton_client: error: {e}", file=sys.stderr)
        return 2
    print(whole)
    ok = whole == sse == grpc
    if a.engine:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from orthrus_runtime import Engine
        ok = ok and whole == Engine.load(a.engine).generate(a.prompt, max_new_tokens=a.max_tokens).text
    print("OK: generate, generate_stream and gRPC streaming agree" + (" with the local engine" if a.engine else "")
          if ok else "MISMATCH between the answers", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
