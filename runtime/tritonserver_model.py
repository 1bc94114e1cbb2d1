"""Triton Inference Server Python-backend model serving an Orthrus engine (copied as ``<repo>/orthrus/1/model.py``).

Decoupled (streaming) model with the tensor names of TensorRT-LLM's Triton models: ``text_input``, ``max_tokens``,
``stream``, ``temperature``, ``top_k``, ``top_p``, ``end_id``, ``random_seed``, ``stop`` (strings) -> ``text_output``,
plus ``output_tokens``, ``cycles``, ``acceptance_length`` and ``finish_reason`` (eos, length, stop; final response). A bad request gets an error response for that request
only. A ``KIND_GPU`` instance loads its engine on its own GPU (``model_instance_device_id``).

Metrics on Triton's /metrics, named in the manner of vLLM's: requests running / waiting (gauges), finished by
reason, prompt and generated tokens, cycles, cycles by acceptance length, accepted drafts by draft position, the
scheduler's steps and rows (rows / steps = requests sharing a pass), and histograms of queue time, time to first
token, inter-token latency and end-to-end latency (seconds).

In-flight batching: ``execute`` hands each request to the engine's scheduler (``Engine.submit``) and returns at once;
a responder thread per request streams its tokens back, so concurrent requests share every pass. Between the
scheduler's steps the responder polls ``response_sender.is_cancelled()`` (a client that cancelled or disconnected):
the request is cancelled and its cache slot freed within one cycle.
"""

import json
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils

OPTIONAL = {"stream": bool, "temperature": float, "top_k": int, "top_p": float, "end_id": int, "random_seed": int}
LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   30.0, 60.0]


def _scalar(request, name, cast):
    t = pb_utils.get_input_tensor_by_name(request, name)
    if t is None:
        return None
    a = t.as_numpy().reshape(-1)
    if a.size != 1:
        raise ValueError(f"{name} must hold one value, got {a.size}")
    return cast(a[0])


def _outputs(text: str, tokens: int, cycles: int, acceptance: float, finish_reason: str = ""):
    return [pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=object)),
            pb_utils.Tensor("output_tokens", np.array([tokens], dtype=np.int32)),
            pb_utils.Tensor("cycles", np.array([cycles], dtype=np.int32)),
            pb_utils.Tensor("acceptance_length", np.array([acceptance], dtype=np.float32)),
            pb_utils.Tensor("finish_reason", np.array([finish_reason.encode()], dtype=object))]


class TritonPythonModel:
    def initialize(self, args):
        from orthrus_runtime import Engine
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        if args.get("model_instance_kind") == "GPU":  # this instance's GPU (instance_group gpus: [...])
            import torch
            torch.cuda.set_device(int(args["model_instance_device_id"]))
        t0 = time.perf_counter()
        max_active = params.get("MAX_ACTIVE") or None
        self.engine = Engine.load(params["ENGINE_PATH"], max_active=int(max_active) if max_active else None)
        self.name = args["model_name"]
        # one line per instance in the server log (``Server.model_load_seconds`` reads it)
        pb_utils.Logger.log_info(f"orthrus: engine {self.engine.path.name} loaded in {time.perf_counter() - t0:.2f} s"
                                 f" (instance {args.get('model_instance_name', '?')}, {self.engine.max_active} "
                                 f"active requests at most; stages {json.dumps(self.engine.load_stats)})")
        labels = {"model": self.name}
        self.families = {}
        self._define_metrics(labels)

    def _define_metrics(self, labels: dict) -> None:
        fam = pb_utils.MetricFamily

        def family(key, name, description, kind):
            self.families[key] = fam(name=name, description=description, kind=kind)
            return self.families[key]
        # the families must outlive their metrics: keep them on the model
        self.families.update({
            "tokens": pb_utils.MetricFamily(name="orthrus_generated_tokens_total", description="tokens generated",
                                            kind=pb_utils.MetricFamily.COUNTER),
            "cycles": pb_utils.MetricFamily(name="orthrus_cycles_total", description="draft/verify cycles run",
                                            kind=pb_utils.MetricFamily.COUNTER),
            "hist": pb_utils.MetricFamily(name="orthrus_acceptance_length_cycles_total",
                                          description="cycles by tokens emitted (acceptance-length histogram)",
                                          kind=pb_utils.MetricFamily.COUNTER),
            "steps": pb_utils.MetricFamily(name="orthrus_scheduler_steps_total",
                                           description="scheduler steps run (each one batched pass or cycle)",
                                           kind=pb_utils.MetricFamily.COUNTER),
            "rows": pb_utils.MetricFamily(name="orthrus_scheduler_rows_total",
                                          description="sequence rows those steps ran (rows / steps = batch size)",
                                          kind=pb_utils.MetricFamily.COUNTER),
            "cancelled": pb_utils.MetricFamily(name="orthrus_requests_cancelled_total",
                                               description="requests cancelled by their client",
                                               kind=pb_utils.MetricFamily.COUNTER)})
        self.steps = self.families["steps"].Metric(labels=labels)
        self.rows = self.families["rows"].Metric(labels=labels)
        self.cancelled = self.families["cancelled"].Metric(labels=labels)
        self._seen = {"steps": 0, "rows": 0}
        self._metrics_lock = threading.Lock()
        self.running = family("running", "orthrus_requests_running", "requests holding a cache slot",
                              fam.GAUGE).Metric(labels=labels)
        self.waiting = family("waiting", "orthrus_requests_waiting", "requests queued for a slot",
                              fam.GAUGE).Metric(labels=labels)
        finished = family("finished", "orthrus_requests_finished_total", "requests finished, by reason", fam.COUNTER)
        self.finished = {r: finished.Metric(labels={**labels, "reason": r})
                         for r in ("eos", "length", "stop", "cancelled", "error")}
        self.prompt_tokens = family("prompt", "orthrus_prompt_tokens_total", "prompt tokens prefilled",
                                    fam.COUNTER).Metric(labels=labels)
        per_pos = family("per_pos", "orthrus_accepted_tokens_per_position_total",
                         "cycles whose draft at this position was accepted", fam.COUNTER)
        self.per_pos = [per_pos.Metric(labels={**labels, "position": str(i + 1)})
                        for i in range(self.engine.block_size - 1)]
        self.latency = {}
        for key, name, what in (("queue", "orthrus_request_queue_time_seconds", "submission to a cache slot"),
                                ("ttft", "orthrus_time_to_first_token_seconds", "submission to the first token"),
                                ("itl", "orthrus_inter_token_latency_seconds", "mean gap between tokens, per request"),
                                ("e2e", "orthrus_e2e_request_latency_seconds", "submission to the last token")):
            self.latency[key] = family(key, name, what, fam.HISTOGRAM).Metric(labels=labels,
                                                                           buckets=LATENCY_BUCKETS)
        self.tokens = self.families["tokens"].Metric(labels=labels)
        self.cycles = self.families["cycles"].Metric(labels=labels)
        self.hist = {k: self.families["hist"].Metric(labels={**labels, "accepted": str(k)})
                     for k in range(1, self.engine.block_size + 1)}

    def _params(self, request):
        unknown = sorted(k for k in json.loads(request.parameters() or "{}") if not k.startswith("triton_"))
        if unknown:
            raise ValueError(f"unknown parameter {unknown[0]!r}: this model takes text_input, max_tokens, "
                             f"{', '.join(OPTIONAL)}")
        text = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)
        if text.size != 1:
            raise ValueError("text_input must hold one string")
        prompt = text[0].decode("utf-8") if isinstance(text[0], bytes) else str(text[0])
        max_tokens = _scalar(request, "max_tokens", int)
        kw = {k: _scalar(request, k, cast) for k, cast in OPTIONAL.items()}
        # unset sampling parameters take the checkpoint's generation_config.json defaults (Engine.sampling_defaults)
        out = dict(max_new_tokens=max_tokens, temperature=kw["temperature"], top_k=kw["top_k"], top_p=kw["top_p"],
                   seed=kw["random_seed"] or 0, end_id=kw["end_id"])
        stop = pb_utils.get_input_tensor_by_name(request, "stop")
        if stop is not None:
            out["stop"] = [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in stop.as_numpy().reshape(-1)]
        return prompt, bool(kw["stream"]), out

    def _gauges(self) -> dict:
        now = self.engine.scheduler_stats()
        self.running.set(float(now["slots_in_use"]))
        self.waiting.set(float(now["waiting"]))
        return now

    def _count(self, ids, stats, e2e_s: float) -> None:
        with self._metrics_lock:
            self.tokens.increment(float(len(ids)))
            self.prompt_tokens.increment(float(stats.prompt_tokens))
            self.cycles.increment(float(stats.cycles))
            for k, n in enumerate(stats.acceptance_hist):
                if n:
                    self.hist[k].increment(float(n))
            for metric, n in zip(self.per_pos, stats.accepted_per_pos):
                if n:
                    metric.increment(float(n))
            self.finished.get(stats.finish_reason or "error", self.finished["error"]).increment(1.0)
            for key, value in (("queue", stats.queue_s), ("ttft", stats.ttft_s), ("e2e", e2e_s)):
                self.latency[key].observe(float(value))
            if len(ids) > 1:
                self.latency["itl"].observe(float(stats.itl_s))
            now = self._gauges()
            for key, metric in (("steps", self.steps), ("rows", self.rows)):
                metric.increment(float(now[key] - self._seen[key]))
                self._seen[key] = now[key]

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                prompt, stream, kw = self._params(request)
                handle = self.engine.submit(prompt, **kw)
            except Exception as e:  # this request fails; the model keeps serving
                self._error(sender, e)
                continue
            threading.Thread(target=self._respond, args=(sender, handle, stream, time.perf_counter()),
                             daemon=True).start()
        self._gauges()
        return None

    @staticmethod
    def _error(sender, e) -> None:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(msg)),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _respond(self, sender, handle, stream: bool, t0: float) -> None:
        """Stream one request's tokens back (text deltas when ``stream``), then its final response."""
        from orthrus_runtime.engine import TextStream
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        text = TextStream(self.engine, handle, handle.stops)
        try:
            for delta in text:
                if sender.is_cancelled():  # the client is gone: free the slot now
                    return self._cancelled(sender, handle)
                if stream:
                    sender.send(pb_utils.InferenceResponse(output_tensors=_outputs(delta, 0, 0, 0.0)))
            r = text.result
            self._count(r.output_ids, r.stats, time.perf_counter() - t0)
            sender.send(pb_utils.InferenceResponse(output_tensors=_outputs(
                "" if stream else r.text, len(r.output_ids), r.stats.cycles, r.stats.acceptance_length,
                r.stats.finish_reason or "")), flags=final)
        except Exception as e:
            if sender.is_cancelled():  # a send to a client that cancelled meanwhile failed
                return self._cancelled(sender, handle)
            with self._metrics_lock:  # the request failed in the scheduler: an error response for it alone
                self.finished["error"].increment(1.0)
            handle.cancel()
            self._error(sender, e)

    def _cancelled(self, sender, handle) -> None:
        handle.cancel()
        with self._metrics_lock:
            self.cancelled.increment(1.0)
            self.finished["cancelled"].increment(1.0)
            self._gauges()
        try:
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception:  # the request is gone already
            pass

    def finalize(self):
        self.engine.close()
