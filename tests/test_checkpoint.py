"""Checkpoint resolution and validation: each defect is one clear error naming the file or tensor."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from orthrus_export.checkpoint import open_checkpoint
from orthrus_runtime.errors import OrthrusError
from orthrus_export.synthetic import write_checkpoint
from orthrus_export.weights import checkpoint_shapes, engine_shapes

SMALL = dict(vocab_size=270, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
             head_dim=16)


@pytest.fixture
def ckpt(tmp_path):
    d = tmp_path / "ckpt"
    write_checkpoint(d, tokenizer=True, **SMALL)
    return d


def mutate_tensors(d, fn):
    tensors = load_file(str(d / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(d / "model.safetensors"))


def test_valid_checkpoint_reads_config_and_ignores_stray_keys(ckpt):
    c = open_checkpoint(str(ckpt))
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["r"] == 64 and "auto_map" in cfg  # leftovers of the published layout are present and ignored
    assert c.config.block_size == 32 and c.config.mask_token_id == 259
    assert c.config.eos_token_ids == (258, 256)  # from generation_config.json (whose use_cache=false is ignored)
    assert [p.name for p in c.tokenizer_files()] == ["tokenizer.json", "tokenizer_config.json"]


def test_packing_consumes_every_tensor_with_the_declared_shapes(ckpt):
    c = open_checkpoint(str(ckpt))
    packed = c.packed_weights(torch.float32)
    assert {k: tuple(v.shape) for k, v in packed.items()} == engine_shapes(c.config)
    qkv = packed["layers.1.diff.qkv"]
    assert torch.equal(qkv[:32], c.tensor("model.layers.1.self_attn.q_proj_diff.weight").float())
    assert torch.equal(qkv[32:48], c.tensor("model.layers.1.self_attn.k_proj_diff.weight").float())


def test_sharded_checkpoint_loads_the_same_tensors(tmp_path):
    write_checkpoint(tmp_path / "one", tokenizer=False, seed=4, **SMALL)
    write_checkpoint(tmp_path / "many", tokenizer=False, seed=4, shards=4, **SMALL)
    a = open_checkpoint(str(tmp_path / "one")).packed_weights(torch.float32)
    b = open_checkpoint(str(tmp_path / "many")).packed_weights(torch.float32)
    assert len(list((tmp_path / "many").glob("*.safetensors"))) == 4
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_untied_checkpoint_needs_lm_head(tmp_path):
    d = tmp_path / "u"
    write_checkpoint(d, tokenizer=False, tie_word_embeddings=False, **SMALL)
    assert "lm_head.weight" in checkpoint_shapes(open_checkpoint(str(d)).config)
    mutate_tensors(d, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(OrthrusError, match="lacks tensor lm_head.weight"):
        open_checkpoint(str(d))


def test_tied_checkpoint_tolerates_a_saved_lm_head_copy(ckpt):
    mutate_tensors(ckpt, lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"].clone()))
    open_checkpoint(str(ckpt))


def test_missing_directory():
    with pytest.raises(OrthrusError, match="no such directory"):
        open_checkpoint("/nonexistent/orthrus")


def test_zoo_name_not_in_cache_says_how_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OrthrusError, match=r"hf download chiennv/Orthrus-Qwen3-8B"):
        open_checkpoint("8b")


def test_zoo_name_found_in_offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snap = cache / "models--chiennv--Orthrus-Qwen3-1.7B" / "snapshots" / ("a" * 40)
    write_checkpoint(snap, tokenizer=False, **SMALL)
    (cache / "models--chiennv--Orthrus-Qwen3-1.7B" / "refs").mkdir()
    (cache / "models--chiennv--Orthrus-Qwen3-1.7B" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert open_checkpoint("1.7b").path == snap


def test_truncated_safetensors(ckpt):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(OrthrusError, match="model.safetensors is truncated"):
        open_checkpoint(str(ckpt))


def test_garbage_safetensors(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(OrthrusError, match="not a readable safetensors file"):
        open_checkpoint(str(ckpt))


def test_missing_diff_tensor(ckpt):
    mutate_tensors(ckpt, lambda t: t.pop("model.layers.1.self_attn.k_proj_diff.weight"))
    with pytest.raises(OrthrusError, match=r"lacks tensor model\.layers\.1\.self_attn\.k_proj_diff\.weight"):
        open_checkpoint(str(ckpt))


def test_plain_qwen3_is_recognised(ckpt):
    mutate_tensors(ckpt, lambda t: [t.pop(k) for k in list(t) if "_diff" in k])
    with pytest.raises(OrthrusError, match="plain Qwen3 checkpoint"):
        open_checkpoint(str(ckpt))


def test_config_without_orthrus_keys(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["block_size"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(OrthrusError, match="lacks block_size"):
        open_checkpoint(str(ckpt))


def test_shape_mismatch(ckpt):
    mutate_tensors(ckpt, lambda t: t.__setitem__("model.layers.0.self_attn.q_proj_diff.weight",
                                                 torch.zeros(16, 32, dtype=torch.bfloat16)))
    with pytest.raises(OrthrusError, match=r"q_proj_diff\.weight in model\.safetensors has shape \(16, 32\) but "
                                           r"config\.json implies \(32, 32\)"):
        open_checkpoint(str(ckpt))


def test_unexpected_tensor(ckpt):
    mutate_tensors(ckpt, lambda t: t.__setitem__("model.layers.0.extra.weight", torch.zeros(2)))
    with pytest.raises(OrthrusError, match="unexpected tensor model.layers.0.extra.weight"):
        open_checkpoint(str(ckpt))


def test_missing_shard(tmp_path):
    d = tmp_path / "s"
    write_checkpoint(d, tokenizer=False, shards=2, **SMALL)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(OrthrusError, match="shard model-00002-of-00002.safetensors .* is missing"):
        open_checkpoint(str(d))


def test_pickle_weights_are_refused(ckpt):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(OrthrusError, match="pickles are never loaded"):
        open_checkpoint(str(ckpt))


def test_bad_json_config(ckpt):
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(OrthrusError, match="config.json is not valid JSON"):
        open_checkpoint(str(ckpt))


def test_mask_token_outside_vocab(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["mask_token_id"] = 100000
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(OrthrusError, match="mask_token_id 100000 is outside the vocabulary"):
        open_checkpoint(str(ckpt))


def test_remote_code_is_never_imported(ckpt):
    (ckpt / "modeling_orthrus.py").write_text("raise SystemExit('remote code was executed')\n")
    open_checkpoint(str(ckpt))  # reading and validating must not touch it
    shutil.rmtree(ckpt)
