"""What the attention ops' ONNX Runtime implementations share (onnxruntime-extensions Python custom ops): the
input and attribute types of their nodes, and the float32 copy of a layer's cache they compute on."""

import numpy as np
import torch
from onnxruntime_extensions import PyCustomOpDef

FLOAT, INT64 = PyCustomOpDef.dt_float, PyCustomOpDef.dt_int64
INPUTS = [FLOAT, FLOAT, FLOAT, FLOAT, FLOAT, INT64]  # q, k, v, k_cache, v_cache ([Hkv, C, D]), cache_len
ATTRS = {"layer": INT64, "scale": FLOAT}


def layer_cache(cache: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(cache, dtype=np.float32, copy=True))[None]  # [1, Hkv, C, D], a private copy
