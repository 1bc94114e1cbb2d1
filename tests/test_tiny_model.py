"""The embedded trained model ``tiny``: exact on held-out code, and its drafts are good (regression floor on the
acceptance length, measured by scripts/eval_tiny.py with the same prompts and settings)."""

import json

from orthrus_export.checkpoint import TINY_DIR, open_checkpoint
from orthrus_export.reference import Reference

HELDOUT = json.loads((TINY_DIR / "heldout_prompts.json").read_text())
EVAL = json.loads((TINY_DIR / "eval.json").read_text())


def test_tiny_is_in_the_published_layout_and_small():
    cfg = json.loads((TINY_DIR / "config.json").read_text())
    assert cfg["architectures"] == ["OrthrusLM"] and cfg["model_type"] == "qwen3"
    assert cfg["block_size"] == 32 and "mask_token_id" in cfg
    total = sum(f.stat().st_size for f in TINY_DIR.iterdir())
    assert total <= 40 * 1024 * 1024  # the issue's ~40 MB ceiling (CI and every CPU test run it)
    ckpt = open_checkpoint("tiny")
    assert ckpt.config.vocab_size >= 4096 and ckpt.config.num_kv_heads < ckpt.config.num_heads


def test_greedy_orthrus_equals_ar_on_heldout_code_with_real_acceptance(models):
    engine = models.engine("tiny")
    ref = Reference(open_checkpoint("tiny"))
    n_prompts, new = EVAL["test"]["prompts"], EVAL["test"]["max_new_tokens"]
    assert n_prompts >= 20 and len(HELDOUT) >= n_prompts
    prompts = [(p["file"], engine.encode(p["text"])) for p in HELDOUT[:n_prompts]]
    # the engine's own AR decoding and its Orthrus decoding of every prompt, each submitted at once (in-flight
    # batching: a row's tokens and cycles equal its run alone, tests/test_batching.py checks that)
    ar = [h.wait() for h in [engine.submit(ids, max_new_tokens=new, use_drafts=False) for _, ids in prompts]]
    orthrus = [engine.submit(ids, max_new_tokens=new) for _, ids in prompts]
    cycles = tokens = 0
    for (file, ids), ar_ids, handle in zip(prompts, ar, orthrus):
        out = handle.wait()
        assert out == ar_ids, file
        assert out == ref.generate_ar(ids, new), file
        cycles += handle.stats.cycles
        tokens += handle.stats.cycle_tokens
    measured = EVAL["test"]["acceptance_length_token_weighted"]
    floor = measured - 0.25
    assert tokens / cycles >= floor, f"acceptance length {tokens / cycles:.2f} fell below {floor:.2f}"
    assert tokens / cycles > 2.0  # real drafts: far above the ~1.0 of random weights


def _train_tiny():
    import importlib.util
    spec = importlib.util.spec_from_file_location("train_tiny", TINY_DIR.parents[2] / "scripts" / "train_tiny.py")
    train_tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_tiny)
    return train_tiny


def test_training_scripts_chain_targets_are_the_greedy_chains_logits(models):
    """``--chain-passes N`` distils towards ``Tiny.chain_targets``: after N Jacobi passes, rows 0..N of every block
    must be the base model's logits after the greedy chain from the block's anchor (computed here the slow way, one
    greedy decode per anchor), and 0 passes the text-conditioned (teacher-forced) logits."""
    import torch
    train_tiny = _train_tiny()
    model = train_tiny.Tiny.from_checkpoint(TINY_DIR).eval()
    engine = models.engine("tiny")
    x = torch.tensor([engine.encode(p["text"])[:96] for p in HELDOUT[:2]])
    passes, block = 2, train_tiny.BLOCK
    with torch.no_grad():
        teacher, kvs = model.forward_ar(x, keep_kv=True)
        assert torch.equal(model.chain_targets(x, teacher, kvs, 0), teacher)
        chain = model.chain_targets(x, teacher, kvs, passes)
        changed = 0
        for anchor in range(0, x.shape[1], block):
            g = model.greedy(x[:, :anchor + 1], anchor + 1 + passes)  # the text to the anchor, then greedy
            slow, _ = model.forward_ar(g)
            for r in range(passes + 1):
                torch.testing.assert_close(chain[:, anchor + r], slow[:, anchor + r], atol=2e-4, rtol=1e-4)
            changed += int((g[:, anchor + 1:anchor + 1 + passes] != x[:, anchor + 1:anchor + 1 + passes]).sum())
    assert changed > 0  # the greedy chain left the text somewhere: the targets differ from the teacher-forced ones


def test_training_scripts_simulated_acceptance_counts_the_runtimes_cycles(models):
    """scripts/train_tiny.py picks recipes and shapes by ``simulated_acceptance`` (every anchor's draft from one
    batched pass, the cycles walked on the host) instead of running the runtime: on the shipped weights it must
    count the runtime's cycles, prompt by prompt, and its training-side forward must load the checkpoint exactly."""
    import torch
    train_tiny = _train_tiny()
    model = train_tiny.Tiny.from_checkpoint(TINY_DIR).eval()
    mask_id = json.loads((TINY_DIR / "config.json").read_text())["mask_token_id"]
    engine = models.engine("tiny")
    total = 0
    for p in HELDOUT[:3]:
        ids = engine.encode(p["text"])
        r = engine.generate(ids, max_new_tokens=48)
        sim = train_tiny.simulated_acceptance(model, torch.tensor([ids + r.output_ids]), len(ids), mask_id)
        assert sim["cycles"] == r.stats.cycles, (p["file"], sim, r.stats.cycles)
        total += r.stats.cycles
    assert total < 3 * 47  # real drafts were accepted: the count is not the trivial one-token-per-cycle one


def test_training_resumes_only_on_the_corpus_it_was_trained_on(tmp_path):
    """``train_tiny.py --init-from`` (training in parts) refuses a checkpoint whose data manifest names another
    corpus (its held-out and validation files could be trained on), and a folder it did not write; it says so in one
    line before any training."""
    import shutil
    import subprocess
    import sys
    script = TINY_DIR.parents[2] / "scripts" / "train_tiny.py"
    other = tmp_path / "other"
    shutil.copytree(TINY_DIR, other)
    manifest = json.loads((other / "data_manifest.json").read_text())
    manifest["corpus_sha256"] = "0" * 64
    (other / "data_manifest.json").write_text(json.dumps(manifest))
    # networkx: a held-out package every environment of this project has (torch needs it)
    cmd = [sys.executable, str(script), "--out", str(tmp_path / "out"), "--heldout", "networkx", "--files-every", "50"]
    p = subprocess.run(cmd + ["--init-from", str(other)], capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "is not the one" in p.stderr and "000000000000" in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "out" / "tokenizer.json").exists()  # refused before anything was trained or copied
    (other / "train_log.json").unlink()
    p = subprocess.run(cmd + ["--init-from", str(other)], capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "is not a folder this script wrote (no train_log.json)" in p.stderr, p.stderr
    p = subprocess.run(cmd + ["--diff-init", "checkpoint"], capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "--diff-init checkpoint needs --init-from" in p.stderr, p.stderr
