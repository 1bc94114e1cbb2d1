"""Triton Inference Server Python-backend model serving an Orthrus engine (copied as ``<repo>/orthrus/1/model.py``).

Decoupled (streaming) model with the tensor names of TensorRT-LLM's Triton models: ``text_input``, ``max_tokens``,
``stream``, ``temperature``, ``top_k``, ``top_p``, ``end_id``, ``random_seed`` -> ``text_output``, plus
``output_tokens``, ``cycles`` and ``acceptance_length``. A bad request gets an error response for that request only.
Custom metrics on Triton's /metrics: tokens generated, cycles, and cycles by acceptance length.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

OPTIONAL = {"stream": bool, "temperature": float, "top_k": int, "top_p": float, "end_id": int, "random_seed": int}


def _scalar(request, name, cast):
    t = pb_utils.get_input_tensor_by_name(request, name)
    if t is None:
        return None
    a = t.as_numpy().reshape(-1)
    if a.size != 1:
        raise ValueError(f"{name} must hold one value, got {a.size}")
    return cast(a[0])


def _outputs(text: str, tokens: int, cycles: int, acceptance: float):
    return [pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=object)),
            pb_utils.Tensor("output_tokens", np.array([tokens], dtype=np.int32)),
            pb_utils.Tensor("cycles", np.array([cycles], dtype=np.int32)),
            pb_utils.Tensor("acceptance_length", np.array([acceptance], dtype=np.float32))]


class TritonPythonModel:
    def initialize(self, args):
        from orthrus_runtime import Engine
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.engine = Engine.load(params["ENGINE_PATH"])
        self.name = args["model_name"]
        labels = {"model": self.name}
        # the families must outlive their metrics: keep them on the model
        self.families = {
            "tokens": pb_utils.MetricFamily(name="orthrus_generated_tokens_total", description="tokens generated",
                                            kind=pb_utils.MetricFamily.COUNTER),
            "cycles": pb_utils.MetricFamily(name="orthrus_cycles_total", description="draft/verify cycles run",
                                            kind=pb_utils.MetricFamily.COUNTER),
            "hist": pb_utils.MetricFamily(name="orthrus_acceptance_length_cycles_total",
                                          description="cycles by tokens emitted (acceptance-length histogram)",
                                          kind=pb_utils.MetricFamily.COUNTER)}
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
        return prompt, bool(kw["stream"]), out

    def _count(self, result) -> None:
        self.tokens.increment(float(len(result.output_ids)))
        self.cycles.increment(float(result.stats.cycles))
        for k, n in enumerate(result.stats.acceptance_hist):
            if n:
                self.hist[k].increment(float(n))

    def execute(self, requests):
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        for request in requests:
            sender = request.get_response_sender()
            try:
                prompt, stream, kw = self._params(request)
                if stream:
                    s = self.engine.generate(prompt, stream=True, **kw)
                    for delta in s:
                        sender.send(pb_utils.InferenceResponse(output_tensors=_outputs(delta, 0, 0, 0.0)))
                    r = s.result
                    text = ""
                else:
                    r = self.engine.generate(prompt, **kw)
                    text = r.text
            except Exception as e:  # this request fails; the model keeps serving
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(msg)), flags=final)
                continue
            self._count(r)
            sender.send(pb_utils.InferenceResponse(output_tensors=_outputs(
                text, len(r.output_ids), r.stats.cycles, r.stats.acceptance_length)), flags=final)
        return None
