"""Speculative rejection sampling is distribution-exact: Orthrus sampling matches AR sampling.

1. The acceptance op on a Markov-chain "model" (exact conditionals known): the joint law of the first two emitted
   tokens equals the base model's, with enough samples to detect a 2% error (the test proves its own power by
   rejecting a target shifted by 2%).
2. The whole engine on a 16-token vocabulary: the law of generated tokens 2 and 3 under Orthrus sampling (and under
   plain AR sampling) matches the exact law computed from the transformers reference.
"""

from collections import Counter

import pytest
import torch

import orthrus_plugins  # noqa: F401
from orthrus_export.checkpoint import open_checkpoint
from orthrus_export.reference import Reference
from orthrus_export.synthetic import write_checkpoint
from orthrus_plugins.sampling import filter_logits, sample_token
from stats_util import chi_square_pvalue

V, B = 6, 4
ALPHA = 1e-3


def markov_sample_pairs(n, temperature, top_k, top_p, seed):
    """``n`` independent chains, each one slot of the same ``orthrus::accept`` calls (slots are independent): a
    block drafted from the anchor, accepted against the base model; chains that emitted one token draft a second
    block from it. The joint counts of each chain's first two emitted tokens, and their exact law."""
    g = torch.Generator().manual_seed(seed)
    w_true = 1.5 * torch.randn(V, V, generator=g)  # base model: logits of the next token given the previous
    w_draft = 1.5 * torch.randn(B, V, V, generator=g)  # drafter: position-dependent, conditioned on the anchor

    def cycle(x):  # one draft/verify cycle of every chain, from its anchor token x [m]
        m = len(x)
        q_logits = w_draft[:, x].transpose(0, 1)  # [m, B, V]
        u = torch.rand(m, B - 1, generator=g)
        drafts = sample_token(filter_logits(q_logits[:, :-1], temperature, top_k, top_p), u)
        block = torch.cat([x[:, None], drafts], dim=1)
        p_logits = w_true[block]
        return torch.ops.orthrus.accept(
            block, q_logits, p_logits, torch.rand(m, B, generator=g), torch.empty(m, 0, dtype=torch.int64),
            torch.full((m,), temperature), torch.full((m,), top_k), torch.full((m,), float(top_p)), True)

    tokens, k = cycle(torch.zeros(n, dtype=torch.int64))
    first, second = tokens[:, 0], tokens[:, 1].clone()
    short = k < 2  # one token emitted: the chain's second token comes from its next cycle
    second[short] = cycle(first[short])[0][:, 0]
    pairs = Counter(zip(first.tolist(), second.tolist()))
    p = filter_logits(w_true, temperature, top_k, top_p)
    exact = {(a, b): float(p[0, a] * p[a, b]) for a in range(V) for b in range(V)}
    return pairs, exact


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 4, 0.9)])
def test_acceptance_op_is_distribution_exact(temperature, top_k, top_p):
    n = 20000
    pairs, exact = markov_sample_pairs(n, temperature, top_k, top_p, seed=5)
    stat, p, dof = chi_square_pvalue(pairs, exact)
    assert p > ALPHA, f"Orthrus sampling deviates from the base law: chi2={stat:.1f}, dof={dof}, p={p:.2g}"
    # power: the same samples must reject a law that is wrong by 2% (mass moved between two likely cells)
    ranked = sorted(exact, key=exact.get, reverse=True)
    shifted = dict(exact)
    shifted[ranked[0]] -= 0.02
    shifted[ranked[1]] += 0.02
    stat2, p2, _ = chi_square_pvalue(pairs, shifted)
    assert p2 < ALPHA, f"the test cannot detect a 2% error with {n} samples (p={p2:.2g})"


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    from orthrus_export.builder import build
    root = tmp_path_factory.mktemp("v16")
    write_checkpoint(root / "ckpt", vocab_size=16, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                     num_kv_heads=1, head_dim=16, tie_word_embeddings=False, block_size=8, seed=3, tokenizer=False)
    ckpt = open_checkpoint(str(root / "ckpt"))
    engine = build(str(root / "ckpt"), out=root / "engine", max_seq_len=64, progress=False)
    return ckpt, engine


END = 15  # stop token for these runs (the checkpoint's own EOS is 14)


def exact_law_of_tokens_2_3(ref: Reference, prompt, temperature):
    """Exact law of generated tokens 2 and 3, with ("short",) for generations that stopped at END first."""
    def next_law(seq):
        return filter_logits(ref.ar_pass(seq, ref.new_cache())[-1:], temperature, 0, 1.0)[0]

    p1 = next_law(prompt)
    law = {("short",): float(p1[END])}
    for t1 in range(ref.cfg.vocab_size):
        if t1 == END:
            continue
        p2 = next_law(prompt + [t1])
        law[("short",)] += float(p1[t1] * p2[END])
        for t2 in range(ref.cfg.vocab_size):
            if t2 == END:
                continue
            p3 = next_law(prompt + [t1, t2])
            for t3 in range(ref.cfg.vocab_size):
                law[(t2, t3)] = law.get((t2, t3), 0.0) + float(p1[t1] * p2[t2] * p3[t3])
    return law


@pytest.mark.parametrize("use_drafts,draft_sampling", [(True, "sample"), (True, "argmax"), (False, "sample")])
def test_engine_sampling_matches_exact_ar_law(small_vocab, use_drafts, draft_sampling):
    """2000 seeds submitted at once: every request runs in a batch with others (8 slots), and the law of its
    tokens is the exact AR law, with drafts sampled from the diffusion distribution or taken as its argmax."""
    from orthrus_runtime import Engine
    ckpt, path = small_vocab
    engine = Engine.load(path, max_queue=4096, draft_sampling=draft_sampling)
    prompt = [3, 1, 4]
    temperature = 0.8
    law = exact_law_of_tokens_2_3(Reference(ckpt), prompt, temperature)
    counts, accepted = Counter(), []
    handles = [engine.submit(prompt, max_new_tokens=3, temperature=temperature, seed=seed, use_drafts=use_drafts,
                             end_id=END) for seed in range(2000)]
    for h in handles:
        ids = h.wait()
        counts[(ids[1], ids[2]) if len(ids) == 3 else ("short",)] += 1
        accepted += [k for k, c in enumerate(h.stats.acceptance_hist) for _ in range(c)]
    assert engine.scheduler_stats()["mean_batch"] > 4, "the requests did not share batches"
    stat, p, dof = chi_square_pvalue(counts, law)
    assert p > ALPHA, f"engine sampling law differs from the exact AR law: chi2={stat:.1f} dof={dof} p={p:.2g}"
    if use_drafts:
        assert max(accepted) >= 2, "drafts were never accepted: the rejection-sampling path was not exercised"
