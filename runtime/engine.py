"""``Engine``: load a built engine (verified), own its static KV cache, and generate."""

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from orthrus_export.config import ModelConfig
from orthrus_export.engine_format import verify_engine
from orthrus_export.errors import OrthrusError
from orthrus_export.exporter import deserialize_program
from orthrus_export.profiles import check_device, load_profile
from orthrus_export.model import program_weights
from orthrus_plugins.sampling import validate_sampling
from orthrus_runtime.loop import Drafter, Loop, Sampling
from orthrus_runtime.stats import GenerationStats
from orthrus_runtime.text import TextDeltas


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    output_ids: list[int]
    text: str | None
    stats: GenerationStats

    def to_dict(self) -> dict:
        return {"prompt_ids": self.prompt_ids, "output_ids": self.output_ids, "text": self.text,
                "stats": self.stats.to_dict()}


class TextStream:
    """Iterator of text deltas (or token-id lists for an engine without tokenizer); ``.result`` once exhausted."""

    def __init__(self, engine: "Engine", chunks: Iterator[list[int]], prompt_ids, stats):
        self._engine, self._chunks, self._prompt, self._stats = engine, chunks, prompt_ids, stats
        self._ids: list[int] = []
        self._deltas = TextDeltas(engine.tokenizer) if engine.tokenizer is not None else None
        self.result: GenerationResult | None = None

    def __iter__(self):
        for chunk in self._chunks:
            self._ids += chunk
            if self._deltas is None:
                yield chunk
            else:
                delta = self._deltas.push(chunk)
                if delta:
                    yield delta
        if self._deltas is not None:
            tail = self._deltas.push([], final=True)
            if tail:
                yield tail
        self.result = self._engine._result(self._prompt, self._ids, self._stats)


class Engine:
    def __init__(self, path: Path, manifest: dict, device: torch.device, weights: dict, programs: dict,
                 tokenizer, backend: str = "torch"):
        self.path, self.manifest, self.device = path, manifest, device
        self.config = ModelConfig.from_dict(manifest["model"]["config"])
        self.block_size = self.config.block_size
        self.max_seq_len = manifest["build"]["max_seq_len"]
        self.capacity = manifest["build"]["cache_capacity"]
        self.tokenizer = tokenizer
        self.weights = weights
        self.programs = programs
        from orthrus_export.profiles import COMPUTE_DTYPES
        dtype = self.dtype = COMPUTE_DTYPES[manifest["precision"]]
        self.backend = backend
        cfg = self.config
        shape = (cfg.num_layers, cfg.num_kv_heads, self.capacity, cfg.head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        kernel = ((manifest.get("fp8") or {}).get("kernel") or {}).get("name")
        if kernel and device.type == "cuda":
            from orthrus_plugins import fp8_linear
            fp8_linear.set_cuda_kernel(kernel)
        if backend == "torch" and manifest["build"].get("compile", {}).get("backend") == "inductor":
            programs = compiled_passes(cfg, programs)
        self.loop = Loop(programs, weights, self.k_cache, self.v_cache, cfg.block_size, cfg.mask_token_id, device,
                         cfg.vocab_size)
        if device.type == "cuda":
            import orthrus_plugins
            if orthrus_plugins.GPU_KERNELS is None:
                raise OrthrusError("this GPU engine needs Triton for its kernels: install triton")
            tuning = manifest["build"].get("tuning") or {}
            self.capture_graphs(tuning.get("attention_splits", orthrus_plugins.DEFAULT_ATTENTION_SPLITS))

    def capture_graphs(self, attention_splits: int) -> None:
        """(Re)capture the CUDA graphs of the greedy cycle and the AR step with the given attention-kernel setting
        (compiles the Inductor passes on the first capture)."""
        import orthrus_plugins
        from orthrus_runtime.graphs import GraphedSteps
        self.loop.graphs = None
        orthrus_plugins.set_attention_splits(attention_splits)
        self.loop.attention_splits = attention_splits
        with torch.no_grad():  # not inference_mode: the graph's buffers are updated outside it too
            self.loop.graphs = GraphedSteps(self.loop, self.config.vocab_size)

    @classmethod
    def from_parts(cls, cfg: ModelConfig, weights: dict, programs: dict, device: torch.device, max_seq_len: int,
                   precision: str, name: str = "in-memory", compile: bool = False,
                   attention_splits: int | None = None) -> "Engine":
        """An engine assembled in memory (benchmarks on random weights): same loop, programs and graphs."""
        capacity = max_seq_len + cfg.block_size
        weights = program_weights(cfg, weights, capacity)
        manifest = {"name": name, "precision": precision, "model": {"config": cfg.to_dict()},
                    "build": {"max_seq_len": max_seq_len, "cache_capacity": capacity,
                              "compile": {"backend": "inductor" if compile else "none"},
                              "tuning": {"attention_splits": attention_splits} if attention_splits else None}}
        return cls(Path(name), manifest, device, weights, programs, None)

    @classmethod
    def load(cls, path, check_hashes: bool = True, build_overrides: dict | None = None, backend: str = "torch",
             onnx_variant: str = "orthrus") -> "Engine":
        """Load a built engine. ``backend="onnxruntime"`` runs its exported ONNX graphs (``onnx_variant``
        "orthrus" or "decomposed") with ONNX Runtime on the CPU instead of the traced programs.
        ``build_overrides`` replaces entries of the manifest's ``build`` section in memory (the build's
        autotuner loads each candidate this way)."""
        path = Path(path)
        manifest = verify_engine(path, check_hashes=check_hashes)
        if build_overrides:
            manifest = {**manifest, "build": {**manifest["build"], **build_overrides}}
        if backend not in ("torch", "onnxruntime"):
            raise OrthrusError(f"unknown backend {backend!r}: choose torch or onnxruntime")
        if backend == "onnxruntime":
            from orthrus_runtime.onnx_backend import load_programs
            programs = load_programs(path, manifest, onnx_variant)
            return cls(path, manifest, torch.device("cpu"), {}, programs, cls._tokenizer(path, manifest),
                       backend="onnxruntime")
        profile = load_profile(manifest["gpu"]["profile"])
        device = check_device(profile, "load this engine")
        weights = load_file(str(path / manifest["weights"]), device=str(device))
        cfg = ModelConfig.from_dict(manifest["model"]["config"])
        weights = program_weights(cfg, weights, manifest["build"]["cache_capacity"])
        programs = {}
        for name, info in manifest["programs"].items():
            ep = deserialize_program((path / info["file"]).read_bytes(), f"program {info['file']}")
            programs[name] = ep.module()
        return cls(path, manifest, device, weights, programs, cls._tokenizer(path, manifest))

    @staticmethod
    def _tokenizer(path: Path, manifest: dict):
        if not manifest.get("tokenizer"):
            return None
        from orthrus_runtime.tokenizer import EngineTokenizer
        return EngineTokenizer(path / manifest["tokenizer"])

    # ---- inputs ---------------------------------------------------------------------------------------------
    def encode(self, prompt, chat: bool = False) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise OrthrusError(f"engine {self.path.name} has no tokenizer: pass token ids instead of text")
            if chat:
                if not self.tokenizer.chat_template:
                    raise OrthrusError(f"engine {self.path.name}'s tokenizer has no chat template: drop --chat")
                prompt = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise OrthrusError(f"token id {bad[0]} is outside the vocabulary of {self.config.vocab_size}")
        if not ids:
            raise OrthrusError("the prompt is empty: give at least one token")
        return ids

    def _result(self, prompt_ids, ids, stats) -> GenerationResult:
        stats.new_tokens = len(ids)
        text = self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else None
        return GenerationResult(prompt_ids, ids, text, stats)

    # ---- generation -----------------------------------------------------------------------------------------
    def generate(self, prompt, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, stream: bool = False, use_drafts: bool = True,
                 end_id: int | None = None, chat: bool = False, drafter: Drafter | None = None):
        """Generate from ``prompt`` (text or token ids). Returns a GenerationResult, or with ``stream=True`` a
        TextStream of text deltas whose ``.result`` is set once it is exhausted.

        ``use_drafts=False`` decodes one token per pass (the AR baseline). ``end_id`` replaces the model's EOS
        tokens. ``drafter`` replaces the diffusion drafter (experiments and tests)."""
        try:
            validate_sampling(float(temperature), top_k, float(top_p))
        except ValueError as e:
            raise OrthrusError(f"invalid sampling parameters: {e}") from None
        if int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
            raise OrthrusError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens}")
        if end_id is not None and not 0 <= end_id < self.config.vocab_size:
            raise OrthrusError(f"end_id {end_id} is outside the vocabulary of {self.config.vocab_size}")
        ids = self.encode(prompt, chat)
        if len(ids) + max_new_tokens > self.max_seq_len:
            raise OrthrusError(f"prompt of {len(ids)} tokens + max_new_tokens {max_new_tokens} exceeds the engine's "
                               f"max_seq_len {self.max_seq_len}: shorten the prompt, ask for fewer tokens, or rebuild "
                               f"with a larger --max-seq-len")
        eos = [end_id] if end_id is not None else list(self.config.eos_token_ids)
        stats = GenerationStats(block_size=self.block_size, prompt_tokens=len(ids))
        sampling = Sampling(float(temperature), int(top_k), float(top_p))
        chunks = self.loop.run(ids, int(max_new_tokens), sampling, int(seed), eos, stats, use_drafts, drafter)
        with torch.inference_mode():
            if stream:
                return TextStream(self, _inference(chunks), ids, stats)
            out = [t for chunk in chunks for t in chunk]
        return self._result(ids, out, stats)


def compiled_passes(cfg: ModelConfig, programs: dict) -> dict:
    """Inductor-compiled passes (``torch.compile(fullgraph=True)`` of the model code the programs were traced
    from; the attention plugins stay opaque custom ops). Compiled on first call, before graph capture."""
    import functools

    from orthrus_export.exporter import PROGRAMS
    from orthrus_export.model import forward
    # every pass of every engine in this process compiles the same code object (model.forward): raise Dynamo's
    # per-code-object limit above its default of 8 so that several engines (benchmarks) can coexist
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return {name: torch.compile(functools.partial(forward, cfg, PROGRAMS[name]), fullgraph=True, dynamic=False)
            for name in programs}


def _inference(chunks):
    with torch.inference_mode():
        yield from chunks
