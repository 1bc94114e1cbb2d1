"""``Engine``: load a built engine (verified), own its static KV cache (one slot per concurrent sequence), its step
buffers and its scheduler, and generate.

Requests go through one path: ``submit`` queues a request with the scheduler (in-flight batching: every running
request shares each pass) and returns a ``Handle``; ``generate`` submits and waits (or streams). Any number of
threads may submit or generate at once; each result equals the same request run alone.

Public surface for tools (parity, quality, autotune, bench, profile, tests): ``run_pass(name, tokens, start)`` runs
one program eagerly, ``time_step(kind, context, iters, batch=…)`` times a step as decoding runs it, ``profile_step``
says where that step's time goes, ``with_options`` re-specialises the programs with other kernel options,
``load_stats`` says where loading spent its time, ``scheduler_stats()`` what the scheduler has run.
"""

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from orthrus_plugins.sampling import validate_sampling
from orthrus_runtime import compiled
from orthrus_runtime.config import ModelConfig
from orthrus_runtime.cycle import Steps
from orthrus_runtime.engine_format import check_length, check_versions, read_manifest, verify_files
from orthrus_runtime.errors import OrthrusError
from orthrus_runtime.profiles import check_device, load_profile
from orthrus_runtime.program import KernelOptions, deserialize_program, program_weights, runnable
from orthrus_runtime.scheduler import Drafter, Handle, QueueFull, Request, Sampling, Scheduler  # noqa: F401
from orthrus_runtime.stats import GenerationStats
from orthrus_runtime.text import StopStrings, TextDeltas


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
    """Iterator of text deltas (or token-id lists for an engine without tokenizer); ``.result`` once exhausted.
    ``close()`` a stream you stop reading early: it cancels the request and frees its slot."""

    def __init__(self, engine: "Engine", handle: Handle, stops: StopStrings | None = None):
        self._engine, self.handle, self._stops = engine, handle, stops
        self._deltas = TextDeltas(engine.tokenizer, stops) if engine.tokenizer is not None else None
        self.result: GenerationResult | None = None

    def __iter__(self):
        ids = []
        for chunk in self.handle:
            ids += chunk
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
        self.result = self._engine._result(self.handle.prompt_ids, ids, self.handle.stats, self._stops)

    def close(self) -> None:
        """Cancel the generation now (its slot is freed for other requests)."""
        self.handle.cancel()


def _quiet(_msg: str) -> None:
    pass


class Engine:
    def __init__(self, path: Path, manifest: dict, device: torch.device, weights: dict, programs: dict,
                 tokenizer, options: KernelOptions, backend: str = "torch", log=_quiet, max_queue: int = 256,
                 prefill_chunks: int | None = None, draft_sampling: str | None = None, max_active: int | None = None):
        """``programs``: name -> ExportedProgram (torch backend) or a ready callable (onnxruntime). ``max_queue``:
        requests that may wait for a slot (more are refused with ``QueueFull``); ``prefill_chunks``: prompt chunks
        (of one block each) a step may add (default: the largest bucket); ``draft_sampling``: how sampled requests
        draft (``argmax`` with a one-hot draft distribution, or ``sample``; default the engine's); ``max_active``:
        requests that may hold a cache slot at once (default and at most the engine's max batch size; 1 turns
        in-flight batching off: requests then run one after another, as a batch-1 engine would)."""
        self.path, self.manifest, self.device = Path(path), manifest, device
        self.config = ModelConfig.from_dict(manifest["model"]["config"])
        self.block_size = self.config.block_size
        self.max_seq_len = manifest["build"]["max_seq_len"]
        self.capacity = manifest["build"]["cache_capacity"]
        self.tokenizer = tokenizer
        self.weights = weights
        self.options = options
        self.dtype = options.dtype
        self.backend = backend
        self.log = log
        self.load_stats: dict = {}
        self._exported = programs if backend == "torch" else None
        self._lock = threading.RLock()  # one step (or tool pass) at a time owns the cache and the step buffers
        self.max_batch_size = manifest["build"]["max_batch_size"]
        if max_active is not None and not 1 <= int(max_active) <= self.max_batch_size:
            raise OrthrusError(f"max_active must be between 1 and the engine's max batch size "
                               f"{self.max_batch_size}, got {max_active}")
        self.max_active = int(max_active or self.max_batch_size)
        self.buckets = tuple(manifest["build"]["batch_buckets"])
        self.draft_sampling = draft_sampling or manifest["build"].get("draft_sampling", "sample")
        self._queue_args = dict(max_queue=max_queue, prefill_chunks=prefill_chunks)
        # one slot per concurrent sequence, and a scratch slot (padding rows, tool passes)
        self.k_cache = torch.zeros(self.cache_shape(), dtype=self.dtype, device=device)
        self.v_cache = torch.zeros(self.cache_shape(), dtype=self.dtype, device=device)
        self.scratch_slot = self.max_batch_size
        if device.type == "cuda":
            import orthrus_plugins
            if orthrus_plugins.GPU_KERNELS is None:
                raise OrthrusError("this GPU engine needs Triton for its kernels: install triton")
        self._prepare(programs)

    def _prepare(self, programs: dict) -> None:
        t0 = time.perf_counter()
        if self.backend == "torch":
            self.programs = {name: runnable(ep, self.options) for name, ep in programs.items()}
        else:
            self.programs = programs
        cfg = self.config
        self.steps = Steps(self.programs, self.weights, self.k_cache, self.v_cache, cfg.block_size,
                           cfg.mask_token_id, cfg.vocab_size, self.device, self.buckets, self.draft_sampling)
        if self.device.type == "cuda":  # compiles (Inductor, first call) and captures every step at every bucket
            self.load_stats["capture_s"] = round(self.steps.capture(), 3)
        elif self.options.backend == "inductor":  # compile every bucket now, not in the first requests
            t1 = time.perf_counter()
            with torch.no_grad():
                self.steps.warm_up()
            self.load_stats["compile_s"] = round(time.perf_counter() - t1, 3)
        self.scheduler = Scheduler(self.steps, self.max_active, self._lock, **self._queue_args)
        self.load_stats["prepare_s"] = round(time.perf_counter() - t0, 3)

    def cache_shape(self, slots: int | None = None) -> tuple[int, ...]:
        """``[L, S, Hkv, C, D]`` of the engine's cache (S = ``slots``, by default the max batch size + the scratch
        slot), or with ``slots=0`` the ``[L, Hkv, C, D]`` of one sequence (what ``run_pass`` takes)."""
        cfg = self.config
        per_slot = (cfg.num_kv_heads, self.capacity, cfg.head_dim)
        if slots == 0:
            return (cfg.num_layers, *per_slot)
        return (cfg.num_layers, self.max_batch_size + 1 if slots is None else slots, *per_slot)

    def with_options(self, options: KernelOptions) -> "Engine":
        """Re-specialise the programs with other kernel options (and recapture the graphs), in place: the autotuner
        tries candidates this way. Not while a generation runs."""
        if self.backend != "torch":
            raise OrthrusError("kernel options apply to the torch backend only")
        with self._lock:
            if self.scheduler.busy:
                raise OrthrusError("with_options while requests run: wait for them to finish")
            self.scheduler.close()
            self.options = options
            self.manifest = {**self.manifest, "build": {**self.manifest["build"], "options": options.to_dict()}}
            self._prepare(self._exported)
        return self

    def close(self) -> None:
        """Stop the scheduler thread (requests still queued or running fail with an error)."""
        self.scheduler.close()

    def scheduler_stats(self) -> dict:
        """The scheduler's counters since load (``EngineStats``): requests, steps, rows, tokens per pass, slots in
        use and waiting now."""
        return self.scheduler.stats.to_dict()

    @property
    def cuda_graphs(self) -> bool:
        """Whether steps replay their captured CUDA graphs (GPU engines); set False to run the same step bodies
        eagerly (tests compare the two)."""
        return bool(self.steps.graphs) and self.steps.use_graphs

    @cuda_graphs.setter
    def cuda_graphs(self, on: bool) -> None:
        with self._lock:
            self.steps.use_graphs = bool(on)

    @classmethod
    def load(cls, path, backend: str = "torch", onnx_variant: str = "orthrus", strict: bool = False,
             verify_weights: bool = False, log=_quiet, **serving) -> "Engine":
        """Load a built engine: the manifest, small files' sha256 and the weights' size and header are verified
        (every byte with ``verify_weights``). ``backend="onnxruntime"`` runs the exported ONNX graphs (``onnx_variant``
        "orthrus" or "decomposed") on the CPU. Compiled engines reuse the compiled artifacts they hold when this
        device and software stack match the build's; otherwise they recompile (``log`` says so) or, with
        ``strict``, refuse. ``engine.load_stats`` has the seconds of each stage. ``serving``: the scheduler's
        ``max_queue``, ``prefill_chunks``, ``draft_sampling`` and ``max_active`` (see ``Engine``)."""
        t0 = time.perf_counter()
        path = Path(path)
        stats = {}
        manifest = read_manifest(path)
        check = verify_files(path, manifest, full=verify_weights)
        check_versions(path, manifest)
        stats["verify_s"] = round(time.perf_counter() - t0, 3)
        stats["verified_bytes"] = check["bytes"]
        if backend not in ("torch", "onnxruntime"):
            raise OrthrusError(f"unknown backend {backend!r}: choose torch or onnxruntime")
        options = KernelOptions.from_dict(manifest["build"]["options"])
        tokenizer = cls.load_tokenizer(path, manifest)
        if backend == "onnxruntime":
            from orthrus_runtime.onnx_backend import load_programs
            programs = load_programs(path, manifest, onnx_variant)
            engine = cls(path, manifest, torch.device("cpu"), {}, programs, tokenizer, options.replace(
                backend="none"), backend="onnxruntime", log=log, **serving)
            engine.load_stats = {**stats, **engine.load_stats}
            return engine
        profile = load_profile(manifest["gpu"]["profile"])
        device = check_device(profile, "load this engine")
        t1 = time.perf_counter()
        cfg = ModelConfig.from_dict(manifest["model"]["config"])
        weights = load_file(str(path / manifest["weights"]), device=str(device))
        weights = program_weights(cfg, weights, manifest["build"]["cache_capacity"])
        if device.type == "cuda":
            torch.cuda.synchronize()
        stats["weights_s"] = round(time.perf_counter() - t1, 3)
        t1 = time.perf_counter()
        programs = {name: deserialize_program((path / info["file"]).read_bytes(), f"program {info['file']}")
                    for name, info in manifest["programs"].items()}
        stats["programs_s"] = round(time.perf_counter() - t1, 3)
        if options.backend == "inductor":
            stats["compiled"] = compiled.prepare(path, manifest["build"].get("compiled"), device, strict, log)
        engine = cls(path, manifest, device, weights, programs, tokenizer, options, log=log, **serving)
        engine.load_stats = {**stats, **engine.load_stats, "total_s": round(time.perf_counter() - t0, 3)}
        if stats.get("compiled", {}).get("artifacts") in ("mismatch", "none"):
            log(f"compiled and captured in {engine.load_stats['prepare_s']:.1f} s")
        return engine

    @staticmethod
    def load_tokenizer(path: Path, manifest: dict):
        """The engine's tokenizer (None for a token-id-only engine)."""
        if not manifest.get("tokenizer"):
            return None
        from orthrus_runtime.tokenizer import EngineTokenizer
        return EngineTokenizer(path / manifest["tokenizer"])

    # ---- tools ----------------------------------------------------------------------------------------------------
    def run_pass(self, name: str, tokens, start: int, k_cache: torch.Tensor | None = None,
                 v_cache: torch.Tensor | None = None) -> torch.Tensor:
        """One program run eagerly on one sequence's ``tokens`` (ids, ``[T]``) at cache position ``start``: logits
        ``[T, V]``. Verify and decode write the cache at ``start …``: the engine's scratch slot (never a request's)
        unless ``k_cache``/``v_cache`` are given (``[L, Hkv, C, D]`` in the engine's dtype, ``cache_shape(0)``)."""
        tokens = torch.as_tensor(tokens, dtype=torch.int64).to(self.device)
        i64 = dict(dtype=torch.int64, device=self.device)
        if k_cache is None:
            kc, vc, slot = self.k_cache, self.v_cache, self.scratch_slot
        else:
            kc, vc, slot = k_cache.unsqueeze(1), v_cache.unsqueeze(1), 0
        with self._lock, torch.no_grad():
            return self.programs[name](self.weights, tokens[None], torch.tensor([int(start)], **i64),
                                       torch.tensor([slot], **i64), kc, vc)[0]

    def time_step(self, kind: str, context: int, iters: int = 20, sampled: bool = False, batch: int = 1) -> float:
        """Median milliseconds of one decoding step (``cycle``, ``decode``) or lone pass (``draft``, ``verify``) over
        ``batch`` sequences, each at cache length ``context``: the CUDA-graph replay that decoding runs (CUDA
        events), or the eager call on the CPU (host clock). Sampled steps run at the published sampling defaults
        (T 0.6, top-k 20, top-p 0.95). Overwrites the cache: only while no request runs."""
        self._check_bench(context, batch)
        with self._lock:
            if self.scheduler.busy:
                raise OrthrusError("time_step while requests run: it overwrites their cache; wait for them")
            return self.steps.time(kind, context, iters, sampled, rows=batch)

    def _check_bench(self, context: int, batch: int) -> None:
        if not 0 <= context <= self.max_seq_len:
            raise OrthrusError(f"context {context} is outside 0..{self.max_seq_len} (the engine's max_seq_len)")
        if not 1 <= batch <= self.max_batch_size:
            raise OrthrusError(f"batch {batch} is outside 1..{self.max_batch_size} (the engine's max batch size): "
                               "rebuild with a larger --max-batch-size")

    def profile_step(self, kind: str, context: int, iters: int = 5, sampled: bool = False,
                     batch: int = 1) -> list[dict]:
        """Where one step (as ``time_step`` sets it up) spends its time: CUDA kernels by name on a GPU, operators'
        self time on the CPU (``Steps.profile`` says what each entry holds). Eager calls of the step body, not the
        graph replay: a replay's time less these kernels' sum is the time between kernels. Overwrites the cache:
        only while no request runs."""
        self._check_bench(context, batch)
        with self._lock:
            if self.scheduler.busy:
                raise OrthrusError("profile_step while requests run: it overwrites their cache; wait for them")
            return self.steps.profile(kind, context, iters, sampled, rows=batch)

    # ---- inputs ---------------------------------------------------------------------------------------------------
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

    def _result(self, prompt_ids, ids, stats, stops: StopStrings | None = None) -> GenerationResult:
        text = self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else None
        if stops is not None:
            text = stops.text(text)
        return GenerationResult(prompt_ids, ids, text, stats)

    # ---- generation -----------------------------------------------------------------------------------------------
    def sampling_defaults(self) -> tuple[float, int, float]:
        """(temperature, top_k, top_p) for a request that sets none of them: the checkpoint's
        ``generation_config.json`` (its temperature, or 1.0, when it sets ``do_sample``; else greedy), as
        ``transformers`` and vLLM apply it; top-k and top-p from the file, else off."""
        g = self.manifest.get("generation") or {}
        temperature = (g.get("temperature") if g.get("temperature") is not None else 1.0) if g.get("do_sample") else 0.0
        return float(temperature), int(g.get("top_k") or 0), float(g.get("top_p") or 1.0)

    def submit(self, prompt, max_new_tokens: int = 64, temperature: float | None = None, top_k: int | None = None,
               top_p: float | None = None, seed: int = 0, use_drafts: bool = True, end_id: int | None = None,
               chat: bool = False, drafter: Drafter | None = None, stop: list[str] | None = None) -> Handle:
        """Queue a request (parameters as ``generate``) and return its ``Handle`` at once: iterate it for the new
        token ids as they come, ``cancel()`` it, ``wait()`` for all. Raises ``OrthrusError`` for a bad request and
        ``QueueFull`` when ``max_queue`` requests already wait."""
        d_temperature, d_top_k, d_top_p = self.sampling_defaults()
        temperature = d_temperature if temperature is None else temperature
        top_k = d_top_k if top_k is None else top_k
        top_p = d_top_p if top_p is None else top_p
        try:
            validate_sampling(float(temperature), top_k, float(top_p))
        except (TypeError, ValueError) as e:
            raise OrthrusError(f"invalid sampling parameters: {e}") from None
        if isinstance(max_new_tokens, bool) or int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
            raise OrthrusError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens}")
        if end_id is not None and not 0 <= end_id < self.config.vocab_size:
            raise OrthrusError(f"end_id {end_id} is outside the vocabulary of {self.config.vocab_size}")
        ids = self.encode(prompt, chat)
        check_length(len(ids), max_new_tokens, self.max_seq_len)
        stops = None
        if stop:
            if isinstance(stop, str) or not all(isinstance(x, str) and x for x in stop):
                raise OrthrusError("stop must be a list of non-empty strings")
            if self.tokenizer is None:
                raise OrthrusError(f"engine {self.path.name} has no tokenizer: stop strings need one (use end_id)")
            stops = StopStrings(self.tokenizer, list(stop))
        eos = [end_id] if end_id is not None else list(self.config.eos_token_ids)
        stats = GenerationStats(block_size=self.block_size, prompt_tokens=len(ids))
        req = Request(prompt=ids, max_new_tokens=int(max_new_tokens),
                      sampling=Sampling(float(temperature), int(top_k), float(top_p)), seed=int(seed), eos_ids=eos,
                      stats=stats, use_drafts=use_drafts, drafter=drafter, stops=stops)
        return self.scheduler.submit(req)

    def generate(self, prompt, max_new_tokens: int = 64, temperature: float | None = None, top_k: int | None = None,
                 top_p: float | None = None, seed: int = 0, stream: bool = False, use_drafts: bool = True,
                 end_id: int | None = None, chat: bool = False, drafter: Drafter | None = None,
                 stop: list[str] | None = None):
        """Generate from ``prompt`` (text or token ids). Returns a GenerationResult, or with ``stream=True`` a
        TextStream of text deltas whose ``.result`` is set once it is exhausted. ``temperature``, ``top_k`` and
        ``top_p`` left as None take the checkpoint's defaults (``sampling_defaults``); ``temperature=0`` is greedy.

        ``use_drafts=False`` decodes one token per pass (the AR baseline). ``end_id`` replaces the model's EOS
        tokens. ``stop``: strings that end the generation; the text ends before the first one, the tokens include
        the one that completed it. ``seed`` seeds the request's own random stream: a sampled result depends on the
        seed only, not on what else runs. ``drafter`` replaces the diffusion drafter (experiments and tests).
        Goes through the scheduler (``submit``): safe to call from many threads at once, which share passes."""
        handle = self.submit(prompt, max_new_tokens, temperature, top_k, top_p, seed, use_drafts, end_id, chat,
                             drafter, stop)
        if stream:
            return TextStream(self, handle, handle.stops)
        try:
            out = handle.wait()
        except BaseException:
            handle.cancel()
            raise
        return self._result(handle.prompt_ids, out, handle.stats, handle.stops)
