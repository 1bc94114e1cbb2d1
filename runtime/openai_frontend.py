"""An OpenAI-compatible HTTP endpoint in front of the Triton server that serves an engine
(``orthrus-export serve --openai-port P``).

``/v1/completions`` and ``/v1/chat/completions`` (the engine's chat template applied), ``/v1/models``, ``/health``.
Each request becomes one gRPC stream to the Triton model (so it joins the engine's in-flight batching); responses
are returned whole or as server-sent events (``stream: true``, ending with ``data: [DONE]``; ``stream_options:
{"include_usage": true}`` adds a usage chunk). ``usage`` counts prompt tokens (the engine's tokenizer) and
completion tokens (the model's ``output_tokens``). Parameters: ``max_tokens`` (``max_completion_tokens``),
``temperature``, ``top_p``, ``top_k`` (an extension, as in vLLM), ``seed``, ``stop`` (a string or a list); ``n > 1``,
``best_of``, ``logprobs`` and ``echo`` are refused with a 400 naming the parameter. A client that disconnects from a
stream cancels its gRPC stream, and the model frees the request's slot. Built on FastAPI and uvicorn.
"""

import json
import queue
import time
import uuid
from pathlib import Path

import numpy as np

MODEL = "orthrus"
REFUSED = {"best_of": "best_of", "logprobs": "logprobs", "top_logprobs": "top_logprobs", "echo": "echo",
           "suffix": "suffix", "tools": "tools", "response_format": "response_format"}


class BadRequest(Exception):
    """A request this endpoint refuses: 400 with an OpenAI-style error body."""


def _error(status: int, message: str, param: str | None = None):
    from fastapi.responses import JSONResponse
    kind = "invalid_request_error" if status == 400 else "server_error"
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param,
                                                               "code": None}})


def _number(body: dict, name: str, cast, default=None):
    value = body.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"{name} must be a number, got {json.dumps(value)}")
    return cast(value)


class TritonStream:
    """One request to the Triton model over a gRPC stream: iterate for ``(text_delta, final_outputs or None)``."""

    def __init__(self, url: str, prompt: str, params: dict):
        import tritonclient.grpc as grpcclient
        self._q: queue.Queue = queue.Queue()
        self._client = grpcclient.InferenceServerClient(url)
        fields = [("text_input", np.array([prompt.encode("utf-8")], dtype=object), "BYTES"),
                  ("max_tokens", np.array([params["max_tokens"]], dtype=np.int32), "INT32"),
                  ("stream", np.array([True]), "BOOL")]
        for name, dtype, np_type in (("temperature", "FP32", np.float32), ("top_p", "FP32", np.float32),
                                     ("top_k", "INT32", np.int32), ("random_seed", "UINT64", np.uint64)):
            if params.get(name) is not None:
                fields.append((name, np.array([params[name]], dtype=np_type), dtype))
        if params.get("stop"):
            fields.append(("stop", np.array([s.encode("utf-8") for s in params["stop"]], dtype=object), "BYTES"))
        inputs = []
        for name, value, dtype in fields:
            t = grpcclient.InferInput(name, list(value.shape), dtype)
            t.set_data_from_numpy(value)
            inputs.append(t)
        self._client.start_stream(callback=lambda result, error: self._q.put((result, error)))
        self._client.async_stream_infer(MODEL, inputs, enable_empty_final_response=True)
        self.done = False

    def __iter__(self):
        while True:
            result, error = self._q.get(timeout=600)
            if error is not None:
                raise BadRequest(str(error).splitlines()[0])
            text = b"".join(result.as_numpy("text_output").reshape(-1)).decode("utf-8") \
                if result.as_numpy("text_output") is not None else ""
            final = result.get_response().parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                self.done = True
                tokens = result.as_numpy("output_tokens")
                reason = result.as_numpy("finish_reason")
                yield text, {"output_tokens": int(tokens.reshape(-1)[0]) if tokens is not None else 0,
                             "finish_reason": reason.reshape(-1)[0].decode() if reason is not None else ""}
                return
            yield text, None

    def close(self) -> None:
        """End the stream; if the request has not finished, cancel it in the server (its slot is freed)."""
        self._client.stop_stream(cancel_requests=not self.done)
        self._client.close()


def create_app(engine_dir: str | Path, grpc_url: str):
    """The FastAPI app serving the engine at ``engine_dir`` through the Triton server at ``grpc_url``."""
    import anyio
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

    from orthrus_runtime.engine import Engine
    from orthrus_runtime.engine_format import read_manifest
    engine_dir = Path(engine_dir)
    manifest = read_manifest(engine_dir)
    tokenizer = Engine.load_tokenizer(engine_dir, manifest)
    if tokenizer is None:
        from orthrus_runtime.errors import OrthrusError
        raise OrthrusError(f"engine {engine_dir.name} has no tokenizer: the OpenAI endpoint serves text")
    created = int(time.time())
    app = FastAPI(title="orthrus-export OpenAI-compatible endpoint")

    def params_of(body: dict, chat: bool) -> tuple[str, dict]:
        for name in REFUSED:
            if body.get(name) not in (None, False, 0):
                raise BadRequest(f"{name} is not supported by this endpoint: drop it")
        n = body.get("n", 1)
        if n != 1:
            raise BadRequest(f"n={json.dumps(n)} is not supported: this endpoint returns one choice (n=1); send n "
                             "requests with different seeds instead")
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages or not all(
                    isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
                raise BadRequest("messages must be a non-empty list of {role, content} with string content")
            if not tokenizer.chat_template:
                raise BadRequest(f"engine {engine_dir.name}'s tokenizer has no chat template: use /v1/completions")
            prompt = tokenizer.apply_chat_template([{"role": m.get("role", "user"), "content": m["content"]}
                                                    for m in messages])
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise BadRequest("prompt must be a string (one prompt per request)")
        stop = body.get("stop")
        if isinstance(stop, str):
            stop = [stop]
        if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop)):
            raise BadRequest("stop must be a non-empty string or a list of them")
        max_tokens = _number(body, "max_completion_tokens", int, body.get("max_tokens", 16))
        params = {"max_tokens": max_tokens, "temperature": _number(body, "temperature", float),
                  "top_p": _number(body, "top_p", float), "top_k": _number(body, "top_k", int),
                  "random_seed": _number(body, "seed", int), "stop": stop}
        if params["random_seed"] is not None and params["random_seed"] < 0:
            raise BadRequest("seed must be >= 0")
        return prompt, params

    def usage(prompt: str, completion: int) -> dict:
        p = len(tokenizer.encode(prompt))
        return {"prompt_tokens": p, "completion_tokens": completion, "total_tokens": p + completion}

    def finish(reason: str) -> str:
        return "length" if reason == "length" else "stop"

    async def handle(request: Request, chat: bool):
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the body is not valid JSON")
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object")
        try:
            prompt, params = params_of(body, chat)
        except BadRequest as e:
            return _error(400, str(e))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        kind = "chat.completion" if chat else "text_completion"
        model = body.get("model") or MODEL
        try:
            stream = await run_in_threadpool(TritonStream, grpc_url, prompt, params)
        except Exception as e:  # the server is not reachable
            return _error(503, f"the Triton server at {grpc_url} is not reachable: {str(e).splitlines()[0]}")

        def choice(text: str, reason: str | None, delta: bool) -> dict:
            if chat:
                key = "delta" if delta else "message"
                return {"index": 0, key: {"role": "assistant", "content": text}, "finish_reason": reason}
            return {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}

        if not body.get("stream"):
            def collect():  # blocking: in a worker thread, not on the event loop
                try:
                    pieces, last = [], None
                    for text, final in stream:
                        pieces.append(text)
                        last = final
                    return "".join(pieces), last
                finally:
                    stream.close()
            try:
                text, last = await run_in_threadpool(collect)
            except BadRequest as e:
                return _error(400, str(e))
            return JSONResponse({"id": rid, "object": kind, "created": int(time.time()), "model": model,
                                 "choices": [choice(text, finish(last["finish_reason"]), False)],
                                 "usage": usage(prompt, last["output_tokens"])})
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def events():
            chunk_kind = "chat.completion.chunk" if chat else "text_completion"
            base = {"id": rid, "object": chunk_kind, "created": int(time.time()), "model": model}
            try:
                async for text, final in iterate_in_threadpool(iter(stream)):
                    if await request.is_disconnected():  # the client hung up: cancel in the server (finally)
                        return
                    if text:
                        yield f"data: {json.dumps({**base, 'choices': [choice(text, None, True)]})}\n\n"
                    if final is not None:
                        end = choice("", finish(final["finish_reason"]), True)
                        yield f"data: {json.dumps({**base, 'choices': [end]})}\n\n"
                        if include_usage:
                            use = usage(prompt, final["output_tokens"])
                            yield f"data: {json.dumps({**base, 'choices': [], 'usage': use})}\n\n"
            except BadRequest as e:
                yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'invalid_request_error'}})}\n\n"
            finally:  # also when the client went away: Starlette then cancels this task, so the close that cancels
                # the request in the server must be shielded from that cancellation (else it never runs)
                with anyio.CancelScope(shield=True):
                    await run_in_threadpool(stream.close)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": MODEL, "object": "model", "created": created,
                                            "owned_by": "orthrus-export", "root": manifest["name"]}]}

    def model_ready() -> bool:
        import tritonclient.grpc as grpcclient
        try:
            client = grpcclient.InferenceServerClient(grpc_url)
            try:
                return client.is_model_ready(MODEL)
            finally:
                client.close()
        except Exception:  # the server does not answer
            return False

    @app.get("/health")
    async def health():
        """200 while the Triton model is ready; 503 otherwise (its process died and is being reloaded, or the
        server is down), so that a load balancer stops routing here."""
        if await run_in_threadpool(model_ready):
            return {"status": "ok"}
        return JSONResponse({"status": "unavailable", "reason": f"model '{MODEL}' is not ready on {grpc_url}"},
                            status_code=503)

    return app


def server(engine_dir, grpc_url: str, port: int, host: str = "127.0.0.1"):
    """A uvicorn server of the endpoint (``.run()`` it, in a thread if need be; ``.should_exit = True`` stops it)."""
    import uvicorn
    return uvicorn.Server(uvicorn.Config(create_app(engine_dir, grpc_url), host=host, port=port,
                                         log_level="warning"))
