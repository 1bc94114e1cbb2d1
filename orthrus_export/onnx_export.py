"""ONNX export of an engine's traced programs (the same ``torch.export`` graphs the engine runs).

Each program (``draft``, ``verify``, ``decode``) becomes one ONNX graph:

- inputs ``tokens`` int64 ``[T]`` (T = block size, 1 for decode), ``cache_len`` int64 scalar, and per layer
  ``k_cache.{i}`` / ``v_cache.{i}`` ``[Hkv, C, D]`` (static capacity C);
- outputs ``logits`` float32 ``[T, V]`` and, for programs that write the cache (verify, decode), the updated
  ``k_cache_out.{i}`` / ``v_cache_out.{i}`` (the cache positions outside ``[cache_len, cache_len+T)`` pass through);
- weights as initializers; all static shapes, no data-dependent shapes; opset 18.

The attention plugins become ``orthrus``-domain nodes ``CachedAttention`` (outputs ``out``, ``k_cache_out``,
``v_cache_out``) and ``DiffusionAttention`` (output ``out``), attributes ``layer`` and ``scale``; with
``decompose=True`` they are spelled in standard ONNX ops instead (ScatterND for the cache write; masked softmax
attention over the whole static capacity, in float32). Graphs whose weights exceed 2 GB (or with
``external_data=True``) keep their weights in one ``weights.bin`` shared by every graph (ONNX external data).

The converter walks the FX graph node by node; an operator it does not know is an error naming the operator.
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

    def operand(self, a, other) -> str:
        if isinstance(a, torch.fx.Node):
            return self.env[a]
        return self.scalar_like(a, other)

    def ints(self, values, hint="shape") -> str:
        return self.g.const(list(values), torch.int64, hint)

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
        a = node.args
        g = self.g
        if target == "aten._assert_tensor_metadata.default":
            return
        if target == "<built-in function getitem>":
            self.env[node] = self.env[a[0]][a[1]]
            return
        for x in node.all_input_nodes:
            if x.op == "placeholder" and self.env[x] not in ("tokens", "cache_len", "k_cache", "v_cache"):
                self.used_weights.add(self.env[x])
        out_meta = node.meta.get("val")
        if target == "aten.arange.default":
            if len(a) != 1 or node.kwargs.get("dtype") not in (None, torch.int64):
                raise OrthrusError(f"ONNX export: unsupported arange {a} {node.kwargs}")
            r = g.const(list(range(int(a[0]))), torch.int64, "arange")
        elif target in ("aten.add.Tensor", "aten.mul.Tensor"):
            if node.kwargs.get("alpha", 1) != 1:
                raise OrthrusError("ONNX export: add with alpha is not supported")
            x, y = a
            dtype = out_meta.dtype
            r = g.op("Add" if "add" in target else "Mul", [self._as(x, dtype), self._as(y, dtype)])
        elif target == "aten.index_select.default":
            r = g.op("Gather", [self.val(a[0]), self.val(a[2])], axis=int(a[1]))
        elif target == "aten.embedding.default":
            r = g.op("Gather", [self.val(a[0]), self.val(a[1])], axis=0)
        elif target == "aten.to.dtype":
            r = g.op("Cast", [self.val(a[0])], to=_DTYPES[a[1]])
        elif target == "aten.unsqueeze.default":
            r = g.op("Unsqueeze", [self.val(a[0]), self.ints([a[1]], "axes")])
        elif target == "aten.pow.Tensor_Scalar":
            r = g.op("Pow", [self.val(a[0]), self.scalar_like(a[1], a[0])])
        elif target == "aten.mean.dim":
            keep = int(a[2]) if len(a) > 2 else int(node.kwargs.get("keepdim", False))
            r = g.op("ReduceMean", [self.val(a[0]), self.ints(a[1], "axes")], keepdims=keep)
        elif target == "aten.rsqrt.default":
            r = g.op("Reciprocal", [g.op("Sqrt", [self.val(a[0])])])
        elif target == "aten.linear.default":
            if len(a) > 2 and a[2] is not None:
                raise OrthrusError("ONNX export: linear with bias is not supported")
            if _meta(a[0]).dim() != 2:
                raise OrthrusError("ONNX export: linear expects a 2-D input")
            r = g.op("Gemm", [self.val(a[0]), self.val(a[1])], transB=1)
        elif target in ("aten.split_with_sizes.default", "aten.chunk.default"):
            dim = int(a[2]) if len(a) > 2 else 0
            if target == "aten.chunk.default":
                sizes = [t.shape[dim] for t in out_meta]
            else:
                sizes = list(a[1])
            r = g.op("Split", [self.val(a[0]), self.ints(sizes, "split")], n_out=len(sizes), axis=dim)
            r = r if isinstance(r, list) else [r]
        elif target == "aten.reshape.default":
            r = g.op("Reshape", [self.val(a[0]), self.ints(a[1])])
        elif target == "aten.slice.Tensor":
            dim = int(a[1]) if len(a) > 1 else 0
            start = a[2] if len(a) > 2 and a[2] is not None else 0
            end = a[3] if len(a) > 3 and a[3] is not None else 2 ** 63 - 1
            step = a[4] if len(a) > 4 else 1
            r = g.op("Slice", [self.val(a[0]), self.ints([start], "starts"), self.ints([min(end, 2 ** 63 - 1)], "ends"),
                               self.ints([dim], "axes"), self.ints([step], "steps")])
        elif target == "aten.neg.default":
            r = g.op("Neg", [self.val(a[0])])
        elif target == "aten.cat.default":
            dim = int(a[1]) if len(a) > 1 else 0
            r = g.op("Concat", [self.val(x) for x in a[0]], axis=dim)
        elif target == "aten.silu.default":
            x = self.val(a[0])
            r = g.op("Mul", [x, g.op("Sigmoid", [x])])
        elif target in ("orthrus.cached_attention.default", "orthrus.diffusion_attention.default"):
            r = self.attention(node, causal=target.startswith("orthrus.cached"))
        else:
            raise OrthrusError(f"ONNX export: no conversion for operator {target}: extend orthrus_export.onnx_export")
        self.env[node] = r

    def _as(self, x, dtype) -> str:
        if isinstance(x, torch.fx.Node):
            name = self.env[x]
            return name if _meta(x).dtype == dtype else self.g.op("Cast", [name], to=_DTYPES[dtype])
        return self.g.const(x, dtype)

    # ---- attention ----------------------------------------------------------------------------------------
    def attention(self, node, causal: bool) -> str:
        q, k, v, kc, vc, cache_len, layer, scale = node.args
        if self.env[kc] != "k_cache" or self.env[vc] != "v_cache" or self.env[cache_len] != "cache_len":
            raise OrthrusError("ONNX export: attention ops must read the program's cache and length inputs")
        layer, scale = int(layer), float(scale)
        qn, kn, vn = self.val(q), self.val(k), self.val(v)
        k_in, v_in = self.k_layer[layer], self.v_layer[layer]
        g = self.g
        if not self.decompose:  # custom nodes: their output types are declared (shape inference cannot know them)
            out_t = helper.make_tensor_value_info
            q_meta, c_meta = _meta(q), _meta(kc)
            if causal:
                out, k_new, v_new = g.op("CachedAttention", [qn, kn, vn, k_in, v_in, "cache_len"], n_out=3,
                                         domain=DOMAIN, layer=layer, scale=scale)
                self.k_layer[layer], self.v_layer[layer] = k_new, v_new
                self.writes_cache = True
                for name in (k_new, v_new):
                    self.value_info.append(out_t(name, _DTYPES[c_meta.dtype], list(c_meta.shape[1:])))
            else:
                out = g.op("DiffusionAttention", [qn, kn, vn, k_in, v_in, "cache_len"], domain=DOMAIN, layer=layer,
                           scale=scale)
            self.value_info.append(out_t(out, _DTYPES[q_meta.dtype], list(q_meta.shape)))
            return out
        b, hq, d = _meta(q).shape
        hkv, cap = _meta(kc).shape[1], _meta(kc).shape[2]
        pos = g.op("Add", ["cache_len", g.const(list(range(b)), torch.int64, "block")])  # [B]
        keys_pos = g.const(list(range(cap)), torch.int64, "cache_pos")  # [C]
        if causal:
            # write the block's K/V at rows pos of every head: indices [Hkv, B, 2] = (head, position)
            heads = g.op("Expand", [g.const(np.arange(hkv).reshape(hkv, 1, 1).tolist(), torch.int64, "heads"),
                                    self.ints([hkv, b, 1])])
            rows = g.op("Expand", [g.op("Reshape", [pos, self.ints([1, b, 1])]), self.ints([hkv, b, 1])])
            idx = g.op("Concat", [heads, rows], axis=2)
            k_new = g.op("ScatterND", [k_in, idx, g.op("Transpose", [kn], perm=[1, 0, 2])])
            v_new = g.op("ScatterND", [v_in, idx, g.op("Transpose", [vn], perm=[1, 0, 2])])
            self.k_layer[layer], self.v_layer[layer] = k_new, v_new
            self.writes_cache = True
            keys, values = k_new, v_new
            mask = g.op("LessOrEqual", [g.op("Reshape", [keys_pos, self.ints([1, cap])]),
                                        g.op("Reshape", [pos, self.ints([b, 1])])])  # [B, C]
        else:
            keys = g.op("Concat", [k_in, g.op("Transpose", [kn], perm=[1, 0, 2])], axis=1)  # [Hkv, C+B, D]
            values = g.op("Concat", [v_in, g.op("Transpose", [vn], perm=[1, 0, 2])], axis=1)
            valid = g.op("Less", [keys_pos, "cache_len"])
            mask = g.op("Concat", [valid, g.const([True] * b, torch.bool, "block_keys")], axis=0)
            mask = g.op("Reshape", [mask, self.ints([1, cap + b])])
        grp = hq // hkv
        f32 = TensorProto.FLOAT
        qf = g.op("Transpose", [g.op("Reshape", [g.op("Cast", [qn], to=f32), self.ints([b, hkv, grp, d])])],
                  perm=[1, 2, 0, 3])  # [Hkv, G, B, D]
        kt = g.op("Unsqueeze", [g.op("Transpose", [g.op("Cast", [keys], to=f32)], perm=[0, 2, 1]),
                                self.ints([1], "axes")])  # [Hkv, 1, D, S]
        scores = g.op("Mul", [g.op("MatMul", [qf, kt]), g.const(scale, torch.float32, "scale")])
        scores = g.op("Where", [mask, scores, g.const(float("-inf"), torch.float32, "neg_inf")])
        probs = g.op("Softmax", [scores], axis=-1)
        vf = g.op("Unsqueeze", [g.op("Cast", [values], to=f32), self.ints([1], "axes")])  # [Hkv, 1, S, D]
        out = g.op("Transpose", [g.op("MatMul", [probs, vf])], perm=[2, 0, 1, 3])  # [B, Hkv, G, D]
        out = g.op("Reshape", [out, self.ints([b, hq, d])])
        return g.op("Cast", [out], to=_DTYPES[_meta(q).dtype])


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
    from orthrus_runtime.program import deserialize_program, program_weights
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
        programs = {name: (lambda info=info: deserialize_program((engine_dir / info["file"]).read_bytes(),
                                                                 f"program {info['file']}"))
                    for name, info in manifest["programs"].items()}
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
