"""Greedy parity: the reference loop and the engine equal transformers' generate token for token (fp32), over
shapes (GQA 1/2/4, tied/untied heads, a vocabulary that is not a multiple of 64), prompts of 1 to 200 tokens,
max_new_tokens ending mid-block and EOS inside an accepted block; per-pass logits within the dtype tolerance."""

import random

import pytest

from conftest import SHAPES
from orthrus_export.parity import pass_parity


def prompts_for(vocab, seed, lengths=(1, 2, 31, 33, 77, 200)):
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


@pytest.mark.parametrize("shape", list(SHAPES))
def test_reference_loop_equals_transformers_generate(models, shape):
    ref = models.reference(shape)
    for prompt in prompts_for(ref.cfg.vocab_size, 1, lengths=(1, 40)):
        expected = ref.generate_ar(prompt, 45)
        got, lengths = ref.generate_orthrus(prompt, 45)
        assert got == expected


@pytest.mark.parametrize("shape", list(SHAPES))
def test_engine_fp32_token_exact_with_transformers(models, shape):
    ref, engine = models.reference(shape), models.engine(shape)
    for prompt in prompts_for(ref.cfg.vocab_size, 2):
        for max_new in (1, 45):  # 45 = one token from prefill + a block + a partial block
            expected = ref.generate_ar(prompt, max_new)
            orthrus = engine.generate(prompt, max_new_tokens=max_new)
            ar = engine.generate(prompt, max_new_tokens=max_new, use_drafts=False)
            assert orthrus.output_ids == expected, f"prompt of {len(prompt)} tokens, max_new {max_new}"
            assert ar.output_ids == expected
            assert orthrus.stats.new_tokens == len(expected)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", ["gqa2_untied", "gqa4_untied"])
def test_per_pass_logits_within_dtype_tolerance(models, shape, precision):
    engine, ref = models.engine(shape, precision), models.reference(shape)
    for seed, plen in ((0, 1), (1, 17), (2, 32)):
        results = pass_parity(engine, ref, seed=seed, prompt_len=plen)
        for name, r in results.items():
            assert r["ok"], f"{name} pass: max |Δ| {r['max_abs_diff']:.3g} is {r['budget_used']:.2f}x the tolerance"


def test_bf16_engine_orthrus_equals_its_own_ar(models):
    engine = models.engine("gqa2_untied", "bf16")
    for prompt in prompts_for(engine.config.vocab_size, 3, lengths=(5, 60)):
        a = engine.generate(prompt, max_new_tokens=40)
        b = engine.generate(prompt, max_new_tokens=40, use_drafts=False)
        assert a.output_ids == b.output_ids


def oracle(expected_stream, right, vocab):
    """A draft source right for exactly ``right`` tokens of every block (then wrong)."""
    def drafter(s, x, history):
        truth = expected_stream[len(history):len(history) + 31]
        truth += [0] * (31 - len(truth))
        return truth[:right] + [(t + 1) % vocab for t in truth[right:]]
    return drafter


@pytest.mark.parametrize("right", [0, 1, 5, 17, 30, 31])
def test_multi_token_acceptance_and_kv_rollback(models, right):
    shape = "gqa4_untied"
    ref, engine = models.reference(shape), models.engine(shape)
    vocab = ref.cfg.vocab_size
    prompt = prompts_for(vocab, 4, lengths=(23,))[0]
    n = 150
    expected = ref.generate_ar(prompt, n + 40, eos_ids=[])
    stream = prompt + expected
    result = engine.generate(prompt, max_new_tokens=n, drafter=oracle(stream, right, vocab), end_id=None)
    eos = set(ref.cfg.eos_token_ids)
    cut = next((i + 1 for i, t in enumerate(expected) if t in eos), None)
    assert result.output_ids == expected[:min(n, cut or n)]
    hist = result.stats.acceptance_hist
    full_cycles = sum(hist)
    # every cycle but the last emits exactly right+1 tokens (the last may stop at max_new_tokens or EOS)
    assert hist[right + 1] >= full_cycles - 1 and full_cycles >= 2


def test_eos_inside_an_accepted_block(models):
    shape = "gqa1_tied"
    ref, engine = models.reference(shape), models.engine(shape)
    vocab = ref.cfg.vocab_size
    prompt = prompts_for(vocab, 5, lengths=(9,))[0]
    free = ref.generate_ar(prompt, 80, eos_ids=[])
    # as EOS, a token whose first occurrence lies strictly inside a cycle's block (cycle 1 emits positions 1-32,
    # cycle 2 positions 33-64 when every draft is accepted)
    pos = next(i for i in [*range(40, 60), *range(3, 30)] if free[i] not in free[:i])
    eos = free[pos]
    expected = ref.generate_ar(prompt, 80, eos_ids=[eos])
    assert expected == free[:pos + 1] and expected[-1] == eos
    result = engine.generate(prompt, max_new_tokens=80, drafter=oracle(prompt + free, 31, vocab), end_id=eos)
    assert result.output_ids == expected
    # cycles accept whole blocks (32 tokens) until the one holding EOS, which is cut right after it
    full, last = divmod(pos - 1, 32)
    expected_hist = [0] * 33
    expected_hist[32] += full
    expected_hist[last + 1] += 1
    assert result.stats.acceptance_hist == expected_hist and last + 1 not in (1, 32)
    # the same stop without the oracle (cycles of one token)
    assert engine.generate(prompt, max_new_tokens=80, end_id=eos).output_ids == expected


def test_max_new_tokens_mid_block_with_full_acceptance(models):
    shape = "gqa2_untied"
    ref, engine = models.reference(shape), models.engine(shape)
    prompt = prompts_for(ref.cfg.vocab_size, 6, lengths=(12,))[0]
    free = ref.generate_ar(prompt, 120, eos_ids=[])
    unused = next(t for t in range(ref.cfg.vocab_size) if t not in free)  # a stop token that never comes
    for n in (2, 32, 33, 50, 97):
        r = engine.generate(prompt, max_new_tokens=n, drafter=oracle(prompt + free, 31, ref.cfg.vocab_size),
                            end_id=unused)
        assert r.output_ids == free[:n]
        assert r.stats.new_tokens == n and sum(r.stats.acceptance_hist) == r.stats.cycles


def test_tiny_engine_matches_transformers(models):
    from orthrus_export.checkpoint import open_checkpoint
    from orthrus_export.reference import Reference
    engine = models.engine("tiny")
    ref = Reference(open_checkpoint("tiny"))
    for text in ("def main():\n", "x", "The quick brown fox jumps over the lazy dog. " * 3):
        ids = engine.encode(text)
        r = engine.generate(text, max_new_tokens=40)
        assert r.prompt_ids == ids
        assert r.output_ids == ref.generate_ar(ids, 40)
