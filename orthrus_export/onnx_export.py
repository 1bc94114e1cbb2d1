"""ONNX export of an engine's passes: the engine's forward traced for one sequence (``exporter.export_single``: the
same model code and weights as the engine's batched programs, at batch 1 with a one-sequence cache).

Each program (``draft``, ``verify``, ``decode``) becomes one ONNX graph:

- inputs ``tokens`` int64 ``[T]`` (T = block size, 1 for decode), ``cache_len`` int64 scalar, and per layer
  ``k_cache.{i}`` / ``v_cache.{i}`` ``[Hkv, C, D]`` (static capacity C);
- outputs ``logits`` float32 ``[T, V]`` and, for programs that write the cache (verify, decode), the updated
  ``k_cache_out.{i}`` / ``v_cache_out.{i}`` (the cache positions outside ``[cache_len, cache_len+T)`` pass through);
- weights as initializers; all static shapes, no data-dependent shapes; opset 18.

The attention plugins become ``orthrus``-domain nodes ``CachedAttention`` (outputs ``out``, ``k_cache_out``,
``v_cache_out``) and ``DiffusionAttention`` (output ``out``), attributes ``layer`` and ``scale``; with
``decompose=True`` they are spelled in standard ONNX ops instead (ScatterND for the cache write; masked softmax
attention over the whole static capacity, in float32). Their translations live beside the ops
(``orthrus_plugins.<op>.onnx``). Graphs whose weights exceed 2 GB (or with ``external_data=True``) keep their
weights in one ``weights.bin`` shared by every graph (ONNX external data).

The converter walks the FX graph node by node and dispatches on ``CONVERTERS`` (fx target -> converter); an
operator without an entry is an error naming the operator.
"""

import time
from pathlib import Path

import numpy as np
import torch

from orthrus_runtime.errors import OrthrusError

try:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
except ImportError:  # pragma: no cover - the optional dependency
    raise OrthrusError("ONNX export needs the onnx package: pip install 'orthrus-export[onnx]'") from None

from orthrus_plugins.cached_attention import onnx as cached_attention_onnx  # noqa: E402  (needs onnx)
from orthrus_plugins.diffusion_attention import onnx as diffusion_attention_onnx  # noqa: E402
from orthrus_plugins.qk_norm_rope import onnx as qk_norm_rope_onnx  # noqa: E402

OPSET = 18
DOMAIN = "orthrus"
TWO_GB = 2 * 1024 ** 3
WEIGHTS_FILE = "weights.bin"

_DTYPES = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16,
           torch.bfloat16: TensorProto.BFLOAT16, torch.int64: TensorProto.INT64, torch.int32: TensorProto.INT32,
           torch.bool: TensorProto.BOOL}
_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32,
       torch.bool: np.bool_}


def _const_array(value, dtype: torch.dtype) -> np.ndarray | torch.Tensor:
    if dtype == torch.bfloat16:
        return torch.tensor(value, dtype=torch.bfloat16)
    return np.asarray(value, dtype=_NP[dtype])


def _tensor_proto(t: torch.Tensor, name: str) -> TensorProto:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: the raw little-endian bytes
        p = TensorProto()
        p.name, p.data_type = name, TensorProto.BFLOAT16
        p.dims.extend(t.shape)
        p.raw_data = t.view(torch.int16).numpy().tobytes()
        return p
    return numpy_helper.from_array(t.numpy(), name)


class _Graph:
    """Builds one ONNX graph: nodes, constants and value names."""

    def __init__(self):
        self.nodes, self.inits, self.n = [], [], 0

    def name(self, hint: str) -> str:
        self.n += 1
        return f"{hint}_{self.n}"

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", hint: str | None = None,
           **attrs) -> list[str] | str:
        outs = [self.name(hint or op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name("n_" + op_type), domain=domain,
                                           **attrs))
        return outs if n_out > 1 else outs[0]

    def const(self, value, dtype: torch.dtype, hint: str = "c") -> str:
        name = self.name(hint)
        arr = _const_array(value, dtype)
        if isinstance(arr, torch.Tensor):
            self.inits.append(_tensor_proto(arr, name))
        else:
            self.inits.append(numpy_helper.from_array(arr, name))
        return name


def _meta(node) -> torch.Tensor:
    return node.meta["val"]


class _Converter:
    """The state of one graph's conversion, and what converters use: ``g`` (the graph being built), ``env`` (fx
    node -> ONNX value), ``val``, ``ints``, ``scalar_like``, ``as_dtype``, ``onnx_dtype``, ``declare``, ``fail``,
    ``decompose``, ``domain``, and the layer caches' current values ``k_layer``/``v_layer`` (a converter that writes
    a layer replaces them and sets ``writes_cache``)."""

    domain = DOMAIN

    def __init__(self, ep, cfg, decompose: bool):
        self.ep, self.cfg, self.decompose = ep, cfg, decompose
        self.g = _Graph()
        self.env: dict = {}  # fx node -> onnx value name (or list of names for multi-output nodes)
        self.k_layer: dict[int, str] = {}  # layer -> current value of that layer's cache (after writes)
        self.v_layer: dict[int, str] = {}
        self.writes_cache = False
        self.used_weights: set[str] = set()
        self.value_info: list = []

    # ---- helpers ------------------------------------------------------------------------------------------
    def val(self, a):
        return self.env[a] if isinstance(a, torch.fx.Node) else a

    def scalar_like(self, value, node_or_dtype) -> str:
        dtype = node_or_dtype if isinstance(node_or_dtype, torch.dtype) else _meta(node_or_dtype).dtype
        return self.g.const(value, dtype)

    def ints(self, values, hint="shape") -> str:
        return self.g.const(list(values), torch.int64, hint)

    def as_dtype(self, x, dtype) -> str:
        """A node's value cast to ``dtype`` where it differs, or a Python scalar as a ``dtype`` constant."""
        if isinstance(x, torch.fx.Node):
            name = self.env[x]
            return name if _meta(x).dtype == dtype else self.g.op("Cast", [name], to=_DTYPES[dtype])
        return self.g.const(x, dtype)

    @staticmethod
    def onnx_dtype(dtype: torch.dtype) -> int:
        return _DTYPES[dtype]

    def declare(self, name: str, dtype: torch.dtype, shape) -> None:
        """Declare a value's type: custom nodes' outputs (shape inference cannot know them)."""
        self.value_info.append(helper.make_tensor_value_info(name, _DTYPES[dtype], list(shape)))

    @staticmethod
    def fail(message: str):
        raise OrthrusError(f"ONNX export: {message}")

    # ---- the walk -----------------------------------------------------------------------------------------
    def run(self):
        sig = self.ep.graph_signature
        names = [s.arg.name for s in sig.input_specs]
        weight_keys = list(self.ep.call_spec.in_spec.child(0).child(0).context)
        n_w = len(weight_keys)
        placeholders = [n for n in self.ep.graph.nodes if n.op == "placeholder"]
        assert [p.name for p in placeholders] == names and len(names) == n_w + 4
        inputs = []
        for p, key in zip(placeholders[:n_w], weight_keys):
            self.env[p] = key
        tok, start, kc, vc = placeholders[n_w:]
        self.env[tok] = "tokens"
        self.env[start] = "cache_len"
        self.env[kc], self.env[vc] = "k_cache", "v_cache"  # only the attention ops may read these
        inputs.append(helper.make_tensor_value_info("tokens", TensorProto.INT64, list(_meta(tok).shape)))
        inputs.append(helper.make_tensor_value_info("cache_len", TensorProto.INT64, []))
        cache = _meta(kc)
        layer_shape = list(cache.shape[1:])
        for i in range(cache.shape[0]):
            for kind, table in (("k", self.k_layer), ("v", self.v_layer)):
                table[i] = f"{kind}_cache.{i}"
                inputs.append(helper.make_tensor_value_info(table[i], _DTYPES[cache.dtype], layer_shape))
        out_node = None
        for node in self.ep.graph.nodes:
            if node.op == "call_function":
                self.call(node)
            elif node.op == "output":
                out_node = node.args[0][0]
        logits = _meta(out_node)
        self.g.nodes.append(helper.make_node("Identity", [self.env[out_node]], ["logits"], name="n_logits"))
        outputs = [helper.make_tensor_value_info("logits", _DTYPES[logits.dtype], list(logits.shape))]
        if self.writes_cache:
            for i in range(cache.shape[0]):
                for kind, table in (("k", self.k_layer), ("v", self.v_layer)):
                    self.g.nodes.append(helper.make_node("Identity", [table[i]], [f"{kind}_cache_out.{i}"],
                                                         name=f"n_{kind}_cache_out_{i}"))
                    outputs.append(helper.make_tensor_value_info(f"{kind}_cache_out.{i}", _DTYPES[cache.dtype],
                                                                 layer_shape))
        return inputs, outputs

    def call(self, node):
        target = str(node.target)
        if target in IGNORED:
            return
        convert = CONVERTERS.get(target)
        if convert is None:
            self.fail(f"no conversion for operator {target}: add one to orthrus_export.onnx_export.CONVERTERS")
        for x in node.all_input_nodes:
            if x.op == "placeholder" and self.env[x] not in ("tokens", "cache_len", "k_cache", "v_cache"):
                self.used_weights.add(self.env[x])
        self.env[node] = convert(self, node)


# ---- converters: fx target -> function(converter, node) returning the node's ONNX value name(s) ----------------
IGNORED = {"aten._assert_tensor_metadata.default"}


def _getitem(cx, node):
    return cx.env[node.args[0]][node.args[1]]


def _arange(cx, node):
    a = node.args
    if len(a) != 1 or node.kwargs.get("dtype") not in (None, torch.int64):
        cx.fail(f"unsupported arange {a} {node.kwargs}")
    return cx.g.const(list(range(int(a[0]))), torch.int64, "arange")


def _add_mul(cx, node):
    if node.kwargs.get("alpha", 1) != 1:
        cx.fail("add with alpha is not supported")
    x, y = node.args
    dtype = _meta(node).dtype
    op = "Add" if "add" in str(node.target) else "Mul"
    return cx.g.op(op, [cx.as_dtype(x, dtype), cx.as_dtype(y, dtype)])


def _mean(cx, node):
    a = node.args
    keep = int(a[2]) if len(a) > 2 else int(node.kwargs.get("keepdim", False))
    return cx.g.op("ReduceMean", [cx.val(a[0]), cx.ints(a[1], "axes")], keepdims=keep)


def _linear(cx, node):
    a = node.args
    if len(a) > 2 and a[2] is not None:
        cx.fail("linear with bias is not supported")
    if _meta(a[0]).dim() != 2:
        cx.fail("linear expects a 2-D input")
    return cx.g.op("Gemm", [cx.val(a[0]), cx.val(a[1])], transB=1)


def _split(cx, node):
    a = node.args
    dim = int(a[2]) if len(a) > 2 else 0
    if str(node.target) == "aten.chunk.default":
        sizes = [t.shape[dim] for t in _meta(node)]
    else:
        sizes = list(a[1])
    r = cx.g.op("Split", [cx.val(a[0]), cx.ints(sizes, "split")], n_out=len(sizes), axis=dim)
    return r if isinstance(r, list) else [r]


def _slice(cx, node):
    a = node.args
    dim = int(a[1]) if len(a) > 1 else 0
    start = a[2] if len(a) > 2 and a[2] is not None else 0
    end = a[3] if len(a) > 3 and a[3] is not None else 2 ** 63 - 1
    step = a[4] if len(a) > 4 else 1
    return cx.g.op("Slice", [cx.val(a[0]), cx.ints([start], "starts"), cx.ints([min(end, 2 ** 63 - 1)], "ends"),
                             cx.ints([dim], "axes"), cx.ints([step], "steps")])


def _silu(cx, node):
    x = cx.val(node.args[0])
    return cx.g.op("Mul", [x, cx.g.op("Sigmoid", [x])])


CONVERTERS = {
    "<built-in function getitem>": _getitem,
    "aten.arange.default": _arange,
    "aten.add.Tensor": _add_mul,
    "aten.mul.Tensor": _add_mul,
    "aten.index_select.default":
        lambda cx, n: cx.g.op("Gather", [cx.val(n.args[0]), cx.val(n.args[2])], axis=int(n.args[1])),
    "aten.embedding.default": lambda cx, n: cx.g.op("Gather", [cx.val(n.args[0]), cx.val(n.args[1])], axis=0),
    "aten.to.dtype": lambda cx, n: cx.g.op("Cast", [cx.val(n.args[0])], to=_DTYPES[n.args[1]]),
    "aten.unsqueeze.default": lambda cx, n: cx.g.op("Unsqueeze", [cx.val(n.args[0]), cx.ints([n.args[1]], "axes")]),
    "aten.pow.Tensor_Scalar": lambda cx, n: cx.g.op("Pow", [cx.val(n.args[0]), cx.scalar_like(n.args[1], n.args[0])]),
    "aten.mean.dim": _mean,
    "aten.rsqrt.default": lambda cx, n: cx.g.op("Reciprocal", [cx.g.op("Sqrt", [cx.val(n.args[0])])]),
    "aten.linear.default": _linear,
    "aten.split_with_sizes.default": _split,
    "aten.chunk.default": _split,
    "aten.reshape.default": lambda cx, n: cx.g.op("Reshape", [cx.val(n.args[0]), cx.ints(n.args[1])]),
    "aten.slice.Tensor": _slice,
    "aten.neg.default": lambda cx, n: cx.g.op("Neg", [cx.val(n.args[0])]),
    "aten.cat.default":
        lambda cx, n: cx.g.op("Concat", [cx.val(x) for x in n.args[0]], axis=int(n.args[1]) if len(n.args) > 1 else 0),
    "aten.silu.default": _silu,
    # the orthrus ops: each plugin folder's onnx.py
    cached_attention_onnx.TARGET: cached_attention_onnx.convert,
    diffusion_attention_onnx.TARGET: diffusion_attention_onnx.convert,
    qk_norm_rope_onnx.TARGET: qk_norm_rope_onnx.convert,
}


def _external(t: torch.Tensor, name: str, offset: int, length: int) -> TensorProto:
    p = TensorProto()
    p.name, p.data_type = name, _DTYPES[t.dtype]
    p.dims.extend(t.shape)
    p.data_location = TensorProto.EXTERNAL
    for key, value in (("location", WEIGHTS_FILE), ("offset", str(offset)), ("length", str(length))):
        e = p.external_data.add()
        e.key, e.value = key, value
    return p


def convert(ep, cfg, weights: dict, name: str, decompose: bool,
            offsets: dict[str, tuple[int, int]] | None = None) -> onnx.ModelProto:
    """The ONNX model of one traced program. Weights become initializers: in the model, or with ``offsets``
    references into the shared external ``weights.bin``."""
    c = _Converter(ep, cfg, decompose)
    inputs, outputs = c.run()
    used = sorted(c.used_weights)
    inits = [_external(weights[k], k, *offsets[k]) if offsets else _tensor_proto(weights[k], k) for k in used]
    graph = helper.make_graph(c.g.nodes, f"orthrus_{name}", inputs, outputs, initializer=inits + c.g.inits,
                              value_info=c.value_info)
    opsets = [helper.make_opsetid("", OPSET)]
    if not decompose:
        opsets.append(helper.make_opsetid(DOMAIN, 1))
    return helper.make_model(graph, opset_imports=opsets, producer_name="orthrus-export",
                             doc_string=f"Orthrus {name} pass ({'standard ops' if decompose else 'orthrus ops'})")


def write_graphs(programs: dict, cfg, weights: dict, out_dir: Path, decompose: bool, external: bool,
                 progress=print) -> None:
    """Convert ``programs`` (name -> ExportedProgram), save each as ``<name>.onnx`` in ``out_dir`` (plus
    ``weights.bin`` when ``external``), and check each file (onnx.checker full check, strict shape inference)."""
    offsets: dict[str, tuple[int, int]] = {}
    if external:
        with open(out_dir / WEIGHTS_FILE, "wb") as f:
            for k, t in weights.items():
                data = t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
                offsets[k] = (f.tell(), len(data))
                f.write(data)
                f.write(b"\0" * ((-f.tell()) % 64))
    variant = "decomposed" if decompose else "orthrus"
    for name, ep in programs.items():
        if not isinstance(ep, torch.export.ExportedProgram):
            ep = ep()  # a loader: programs are deserialized one at a time
        model = convert(ep, cfg, weights, name, decompose, offsets or None)
        path = out_dir / f"{name}.onnx"
        onnx.save_model(model, str(path))
        n_nodes = len(model.graph.node)
        del model
        onnx.checker.check_model(str(path), full_check=True)
        inferred = out_dir / f".{name}.inferred.onnx"
        onnx.shape_inference.infer_shapes_path(str(path), str(inferred), check_type=True, strict_mode=True)
        inferred.unlink()
        progress(f"onnx {variant}: {name}.onnx ({path.stat().st_size / 1e6:.1f} MB, {n_nodes} nodes) passes "
                 f"onnx.checker (full) and strict shape inference")


def export_engine(engine_dir, decompose: bool = False, external_data: bool | None = None,
                  progress=print) -> dict:
    """Write ``onnx/`` (or ``onnx-decomposed/``) inside a built engine: one graph per program, checked with
    ``onnx.checker`` (full check) and shape inference; the manifest's ``onnx`` section lists the files and their
    checksums. The directory is written aside and renamed when complete."""
    from safetensors.torch import load_file

    from orthrus_runtime.config import ModelConfig
    from orthrus_runtime.engine_format import atomic_directory, verify_engine, write_manifest
    from orthrus_export.exporter import export_single
    from orthrus_runtime.program import program_weights
    engine_dir = Path(engine_dir)
    manifest = verify_engine(engine_dir)
    cfg = ModelConfig.from_dict(manifest["model"]["config"])
    t0 = time.perf_counter()
    weights = load_file(str(engine_dir / manifest["weights"]))
    weights = program_weights(cfg, weights, manifest["build"]["cache_capacity"])
    variant = "decomposed" if decompose else "orthrus"
    sub = "onnx-decomposed" if decompose else "onnx"
    total = sum(t.numel() * t.element_size() for t in weights.values())
    external = total > TWO_GB if external_data is None else external_data
    with atomic_directory(engine_dir / sub, force=True) as tmp:
        capacity = manifest["build"]["cache_capacity"]
        programs = {name: (lambda name=name: export_single(cfg, weights, name, capacity))
                    for name in manifest["programs"]}
        write_graphs(programs, cfg, weights, tmp, decompose, external, progress)
        files = sorted(f"{sub}/{p.name}" for p in tmp.iterdir())
    record = {"opset": OPSET, "domain": None if decompose else DOMAIN, "external_data": external,
              "directory": sub, "graphs": {n: f"{sub}/{n}.onnx" for n in manifest["programs"]},
              "files": files, "seconds": round(time.perf_counter() - t0, 3),
              "torch": torch.__version__, "onnx": onnx.__version__}
    manifest.setdefault("onnx", {})[variant] = record
    # the ONNX files are part of the engine: listed, with sizes and checksums, among the engine's files too
    write_manifest(engine_dir, manifest, reuse=manifest["files"])
    return record
