"""Regenerate the embedded default model ``tiny`` (orthrus_export/assets/tiny): deterministic random weights.

    python scripts/make_tiny.py
"""

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from orthrus_export.checkpoint import TINY_DIR  # noqa: E402
from orthrus_export.synthetic import write_checkpoint  # noqa: E402

if __name__ == "__main__":
    if TINY_DIR.exists():
        shutil.rmtree(TINY_DIR)
    cfg = write_checkpoint(TINY_DIR, seed=1234)
    (TINY_DIR / "README.md").write_text(
        "# tiny — placeholder Orthrus-Qwen3 (random weights)\n\n"
        "Written by `scripts/make_tiny.py` in the published Orthrus-Qwen3 layout: "
        f"{cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_heads} query / {cfg.num_kv_heads} KV heads, "
        f"vocabulary {cfg.vocab_size} (byte-level tokenizer), block size {cfg.block_size}, tied lm_head.\n"
        "Its weights are random, so its text is noise and its drafts are almost never accepted; "
        "it exists so the toolchain runs end to end on a fresh machine.\n")
    print(f"wrote {TINY_DIR}")
