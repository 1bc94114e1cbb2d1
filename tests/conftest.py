import os

import pytest
import torch

from orthrus_export.builder import build
from orthrus_export.checkpoint import open_checkpoint
from orthrus_export.reference import Reference
from orthrus_export.synthetic import write_checkpoint

# one CPU thread, in this process and in every process the tests start (CLI runs, tritonserver's model processes,
# fresh-process loads: torch reads OMP_NUM_THREADS): every model here is small, and small engines gain nothing from
# more threads and lose much to contention (orthrus_export.cli._set_threads, the CLI's default for them, says why)
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

# small shapes that still cover the layouts: GQA ratios 1/2/4, tied and untied heads, a vocabulary that is not a
# multiple of 64; the real block size of 32
SHAPES = {
    "gqa1_tied": dict(vocab_size=301, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=4, head_dim=16, tie_word_embeddings=True, seed=11),
    "gqa2_untied": dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4,
                        num_kv_heads=2, head_dim=16, tie_word_embeddings=False, seed=12, shards=3),
    "gqa4_untied": dict(vocab_size=301, hidden_size=96, intermediate_size=128, num_layers=2, num_heads=8,
                        num_kv_heads=2, head_dim=16, tie_word_embeddings=False, seed=13),
}


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _keep_thread_count():
    """The CLI sets torch's thread count for its process (``--threads``); a test that calls it in this process must
    not change the thread count of the tests after it."""
    n = torch.get_num_threads()
    yield
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


class Models:
    """Session-wide cache of synthetic checkpoints, references and engines (each built once, and loaded once: tests
    that take a loaded engine from here only generate with it; a test that changes an engine loads its own)."""

    def __init__(self, root):
        self.root = root
        self._ckpt, self._ref, self._engine, self._loaded = {}, {}, {}, {}

    def checkpoint(self, shape: str):
        if shape not in self._ckpt:
            path = self.root / f"ckpt-{shape}"
            write_checkpoint(path, tokenizer=False, **SHAPES[shape])
            self._ckpt[shape] = path
        return self._ckpt[shape]

    def reference(self, shape: str) -> Reference:
        if shape not in self._ref:
            self._ref[shape] = Reference(open_checkpoint(str(self.checkpoint(shape))))
        return self._ref[shape]

    def engine_path(self, shape: str, precision: str = "fp32", max_seq_len: int = 512):
        key = (shape, precision, max_seq_len)
        if key not in self._engine:
            src = "tiny" if shape == "tiny" else str(self.checkpoint(shape))
            out = self.root / f"engine-{shape}-{precision}-{max_seq_len}"
            self._engine[key] = build(src, precision=precision, out=out, max_seq_len=max_seq_len, progress=False)
        return self._engine[key]

    def engine(self, shape: str, precision: str = "fp32", max_seq_len: int = 512):
        key = (shape, precision, max_seq_len)
        if key not in self._loaded:
            from orthrus_runtime import Engine
            self._loaded[key] = Engine.load(self.engine_path(*key))
        return self._loaded[key]


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    return Models(tmp_path_factory.mktemp("models"))
