"""An engine's programs as the runtime runs them: deserialised graphs, their weights input, their kernel options.

Every program is ``(weights, tokens, start, k_cache, v_cache) -> logits`` (see the builder's exporter). The runtime
runs the engine's *own* graphs (``ExportedProgram.module()``), never the installed model code: an engine built by one
version runs the graphs it holds. Kernel settings are not process state: ``KernelOptions`` is resolved once per
engine (manifest) and written into the programs' custom-op nodes as attributes (``specialize``), so two engines with
different settings run side by side in one process.
"""

from dataclasses import asdict, dataclass

import torch
from torch._export.serde import serialize as serde

import orthrus_plugins
from orthrus_plugins import fp8_linear
from orthrus_plugins.attention_common import DEFAULT_BLOCK_N, Launch
from orthrus_runtime.config import ModelConfig
from orthrus_runtime.errors import OrthrusError


@dataclass(frozen=True)
class KernelOptions:
    """The kernel settings of one engine: resolved once (profile, precision, build-time tuning), recorded in the
    manifest (``build.options``), passed to the ops as attributes."""
    backend: str = "none"                  # "none": the traced graphs as they are; "inductor": torch.compile of them
    attention_splits: int = orthrus_plugins.DEFAULT_ATTENTION_SPLITS
    attention_query_block: int = 0         # query rows per attention program (0: all of a row's; the kernel's doc)
    attention_block_n: int = DEFAULT_BLOCK_N  # keys per loop iteration of the attention kernel (64 or 32)
    attention_launch: str = ""             # the attention kernels' other launch fields (Launch.from_spec; "": defaults)
    fp8_kernel: str = "auto"               # orthrus::fp8_linear's (and fp8_matmul's) CUDA kernel (FP8 engines)
    fp8_quant: str = "fused"               # compiled FP8 programs: "fused" (split_fp8_linear) or "kernel" (the op's)
    compute_dtype: str = "float32"
    # compiled programs: Inductor may split a reduction over few long rows into partial reductions and a final one
    # (its default, True); False: one launch a row. The FP8 SiLU·up rows' amax took three launches a layer (5.9 us
    # at batch 1 on the H100, benchmarks/h100-2026-12-08-tenth-profile-8b-fp8-picked-b1-*): an option to time
    # (scripts/profile_gpu.py --no-split-reductions), not yet timed
    split_reductions: bool = True

    def __post_init__(self):
        """``attention_launch`` is checked here, on any machine, so that no engine holds options its attention
        kernels would refuse: an unknown field, a value they cannot take, or ``block_n`` (its own option,
        ``attention_block_n``) is one OrthrusError line."""
        try:
            Launch.from_spec(self.attention_launch)
        except ValueError as e:
            raise OrthrusError(f"engine option attention_launch: {e}: rebuild the engine") from None
        if "block_n" in self.attention_launch:  # only a spec naming it can set it
            raise OrthrusError(f"engine option attention_launch {self.attention_launch!r} sets block_n, which is "
                               "its own option (attention_block_n): rebuild the engine")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "KernelOptions":
        # a manifest written before an option existed gets its default, except fp8_quant: such an engine was built
        # and self-checked with the op's own quantization launch, and runs as built
        d = {"fp8_quant": "kernel", **d}
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def replace(self, **changes) -> "KernelOptions":
        return KernelOptions(**{**asdict(self), **changes})

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.compute_dtype)


def rope_tables(cfg: ModelConfig, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [capacity, head_dim] in float32, computed as transformers' Qwen3RotaryEmbedding does."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    freqs = torch.arange(capacity, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def program_weights(cfg: ModelConfig, weights: dict, capacity: int) -> dict:
    """The programs' ``weights`` input: the packed tensors plus the RoPE tables for ``capacity`` positions, in name
    order (the order the programs were traced with)."""
    device = weights["embed"].device
    cos, sin = rope_tables(cfg, capacity)
    return dict(sorted({**weights, "rope.cos": cos.to(device), "rope.sin": sin.to(device)}.items()))


def serialize_program(ep: torch.export.ExportedProgram) -> bytes:
    art = serde.serialize(ep)
    if ep.state_dict or ep.constants:
        raise AssertionError("traced programs must take weights as inputs, not hold them")
    return art.exported_program


class _CachedTypeHints:
    """torch's graph deserializer calls ``typing.get_type_hints`` on its schema dataclasses once per JSON object (80%
    of the time to load a program). The hints of a class never change: this stands in for the ``typing`` module
    inside the deserializer only, with the hints cached per class."""

    def __init__(self, typing_module):
        self._typing, self._hints = typing_module, {}

    def get_type_hints(self, obj, globalns=None, **kwargs):
        if kwargs or not isinstance(obj, type):
            return self._typing.get_type_hints(obj, globalns, **kwargs)
        key = (obj, id(globalns))
        if key not in self._hints:
            self._hints[key] = self._typing.get_type_hints(obj, globalns)
        return self._hints[key]

    def __getattr__(self, name):
        return getattr(self._typing, name)


if getattr(serde, "typing", None) is not None and not isinstance(serde.typing, _CachedTypeHints):
    serde.typing = _CachedTypeHints(serde.typing)


def deserialize_program(data: bytes, what: str) -> torch.export.ExportedProgram:
    try:
        return serde.deserialize(serde.SerializedArtifact(data, b"", b"", b""))
    except Exception as e:  # a damaged graph file or an incompatible serializer
        raise OrthrusError(f"{what} cannot be deserialized ({type(e).__name__}: {str(e)[:120]}): rebuild the "
                           "engine with this version of torch") from None


_ATTENTION = ("cached_attention", "diffusion_attention")


def specialize(module: torch.fx.GraphModule, options: KernelOptions) -> torch.fx.GraphModule:
    """Write the engine's kernel options into the program's custom-op nodes (attention ``splits`` and
    ``query_block``, ``block_n``, ``launch``, the FP8 ``kernel``), in place; returns the module."""
    for node in module.graph.nodes:
        if node.op != "call_function" or not str(node.target).startswith("orthrus."):
            continue
        op = str(node.target).split(".")[1]
        if op in _ATTENTION:
            _set_argument(node, "splits", options.attention_splits)
            if options.attention_query_block:  # left out at its default: the graphs (and their compile-cache keys)
                _set_argument(node, "query_block", options.attention_query_block)  # stay those of older builds
            if options.attention_block_n != DEFAULT_BLOCK_N:  # likewise
                _set_argument(node, "block_n", options.attention_block_n)
            if options.attention_launch:  # likewise
                _set_argument(node, "launch", options.attention_launch)
        elif op == "fp8_linear":
            if options.fp8_kernel == "auto" and options.backend == "inductor" and options.fp8_quant == "kernel":
                # Inductor's custom-op fallback takes the op as its own `kernel` argument and fails on this one at
                # its default (fp8_quant "fused" calls fp8_matmul, whose argument is named impl, and is unaffected)
                raise OrthrusError("a compiled FP8 engine with fp8_quant 'kernel' needs a named fp8_kernel, not "
                                   "'auto': rebuild the engine")
            if options.fp8_kernel != "auto":  # left out at its default
                _set_argument(node, "kernel", options.fp8_kernel)
    module.recompile()
    return module


def split_fp8_linear(module: torch.fx.GraphModule) -> int:
    """For Inductor: each ``orthrus::fp8_linear`` node becomes a call of ``fp8_linear.split_linear`` (the same
    function: the per-row quantization in torch ops, then ``orthrus::fp8_matmul`` with the node's kernel), which
    Inductor traces into its graph, fusing each quantization into the kernel producing its input (the RMSNorms,
    SiLU·up) instead of launching one more kernel per projection. In place; returns the number of nodes
    rewritten."""
    found = 0
    for node in module.graph.nodes:
        if node.op == "call_function" and str(node.target) == "orthrus.fp8_linear.default":
            node.target, found = fp8_linear.split_linear, found + 1
    if found:
        module.recompile()
    return found


def _set_argument(node: torch.fx.Node, name: str, value) -> None:
    """Set the op argument ``name`` of ``node`` whether the graph passes it by position or by keyword."""
    names = [a.name for a in node.target._schema.arguments]
    i = names.index(name)
    if i < len(node.args):
        node.args = (*node.args[:i], value, *node.args[i + 1:])
    else:
        node.kwargs = {**node.kwargs, name: value}


def kernel_attributes(module: torch.fx.GraphModule) -> dict[str, set]:
    """The kernel attributes the program's nodes carry (for tests and ``info``): op -> set of (name, value)."""
    out: dict[str, set] = {}
    for node in module.graph.nodes:
        if node.op == "call_function" and str(node.target).startswith("orthrus."):
            op = str(node.target).split(".")[1]
            names = [a.name for a in node.target._schema.arguments]
            given = {**dict(zip(names, node.args)), **node.kwargs}
            out.setdefault(op, set()).update((k, v) for k, v in given.items()
                                             if k in ("splits", "query_block", "block_n", "launch", "kernel"))
    return out


def inductor_options(options: KernelOptions, fused_fp8: bool) -> dict:
    """Inductor's options for a program compiled with ``options`` (``fused_fp8``: its FP8 projections split for
    Inductor to fuse their quantization, :func:`split_fp8_linear`); {} for Inductor's defaults."""
    inductor = {}
    if fused_fp8:
        # eager's bf16 roundings kept inside fused kernels: without them the quantized rows depend on what
        # Inductor fuses, which differs between a program's shapes (a compiled CPU FP8 tiny: verify vs decode
        # logits 0.45 apart, Orthrus != own AR on 1 of 6 prompts; with them: 0.0 and 6/6)
        inductor["emulate_precision_casts"] = True
    if not options.split_reductions:
        inductor["split_reductions"] = False
    return inductor


def runnable(ep: torch.export.ExportedProgram, options: KernelOptions):
    """The callable the runtime runs for one program: the graph module with the options written in, compiled by
    Inductor (``torch.compile(fullgraph=True)`` of *this* graph, compiled on the first call) when the options say so.

    Meant to compile a program twice, whatever the number of batch buckets (not instrumented): called first with
    one row (the runtime warms the buckets up in ascending order), it specialises that graph to one row; the second
    row count makes torch's automatic dynamic shapes recompile it once with a symbolic row count, which every larger
    bucket reuses. Batch 1 keeps its static graph; a build with 7 buckets costs two compiles per program, not
    seven."""
    module = specialize(ep.module(), options)
    if options.fp8_quant not in ("fused", "kernel"):
        raise OrthrusError(f"unknown fp8_quant {options.fp8_quant!r} in the engine's options: rebuild the engine")
    if options.backend == "inductor":
        inductor = inductor_options(options, options.fp8_quant == "fused" and split_fp8_linear(module) > 0)
        return torch.compile(module, fullgraph=True, dynamic=None, **({"options": inductor} if inductor else {}))
    if options.backend != "none":
        raise OrthrusError(f"unknown pass backend {options.backend!r} in the engine's options: rebuild the engine")
    return module
