"""orthrus::accept with rigged logits: exact accepted lengths, bonus tokens and EOS cuts."""

import pytest
import torch

import orthrus_plugins  # noqa: F401
from orthrus_plugins.sampling import filter_logits, sample_token

B, V = 8, 12


def rigged(targets, vocab=V):
    """Logits whose argmax in row i is targets[i] (margin 5)."""
    logits = torch.zeros(len(targets), vocab)
    logits[torch.arange(len(targets)), torch.tensor(targets)] = 5.0
    return logits


def accept1(block, draft_logits, verify_logits, u, eos, temperature, top_k, top_p):
    """One slot through the batched op: ``(tokens [B], n)``."""
    tokens, n = torch.ops.orthrus.accept(
        block[None], draft_logits[None], verify_logits[None], u[None], eos.reshape(1, -1),
        torch.tensor([temperature]), torch.tensor([top_k]), torch.tensor([top_p]), temperature > 0)
    return tokens[0], n[0]


def accept(block, verify_targets, eos=(), temperature=0.0, draft_logits=None, u=None, top_k=0, top_p=1.0):
    block = torch.tensor(block)
    vl = rigged(verify_targets)
    dl = draft_logits if draft_logits is not None else torch.zeros(B, V)
    u = u if u is not None else torch.zeros(B)
    tokens, n = accept1(block, dl, vl, u, torch.tensor(list(eos), dtype=torch.int64), temperature, top_k, top_p)
    return tokens[:int(n)].tolist()


# base model's predictions a_0..a_7 after each block position
A = [3, 4, 5, 6, 7, 8, 9, 10]


def test_greedy_full_acceptance_emits_block_and_bonus():
    assert accept([1] + A[:7], A) == A  # d_1..d_7 all match, bonus a_7


def test_greedy_no_acceptance_emits_the_correction():
    assert accept([1, 0, 4, 5, 6, 7, 8, 9], A) == [3]


@pytest.mark.parametrize("n", range(0, B - 1))
def test_greedy_partial_acceptance(n):
    drafts = A[:n] + [11] * (B - 1 - n)  # right for exactly n tokens
    assert accept([1] + drafts, A) == A[:n] + [A[n]]


def test_greedy_stops_at_first_mismatch_even_if_later_drafts_match():
    assert accept([1, 3, 0, 5, 6, 7, 8, 9], A) == [3, 4]


@pytest.mark.parametrize("pos", range(B))
def test_eos_at_every_block_position_cuts_after_it(pos):
    eos = A[pos]
    assert accept([1] + A[:7], A, eos=[eos]) == A[:pos + 1]


def test_eos_after_the_rejection_point_is_ignored():
    assert accept([1, 3, 4, 0, 6, 7, 8, 9], A, eos=[A[5]]) == [3, 4, 5]


def test_multiple_eos_ids_first_one_wins():
    assert accept([1] + A[:7], A, eos=[A[6], A[2]]) == A[:3]


def test_sampled_with_deterministic_drafts_and_certain_model():
    """p one-hot at the draft: every draft is accepted whatever u is; the bonus comes from p_{B-1}."""
    block = [1] + A[:7]
    vl = torch.full((B, V), -1e9)
    vl[torch.arange(B), torch.tensor(A)] = 0.0
    dl = torch.full((B, V), -1e9)
    dl[torch.arange(B - 1), torch.tensor(A[:7])] = 0.0
    u = torch.full((B,), 0.999)
    tokens, n = accept1(torch.tensor(block), dl, vl, u, torch.empty(0, dtype=torch.int64), 1.0, 0, 1.0)
    assert int(n) == B and tokens.tolist() == A


def test_sampled_rejection_draws_from_the_residual():
    """q puts all mass on token 0, p gives token 0 mass 0.25 and token 1 mass 0.75: with u above 0.25 the draft is
    rejected and the residual max(p - q, 0) has all its mass on token 1."""
    p = torch.full((B, V), float("-inf"))
    p[:, 0], p[:, 1] = torch.log(torch.tensor(0.25)), torch.log(torch.tensor(0.75))
    q = torch.full((B, V), float("-inf"))
    q[:, 0] = 0.0
    block = torch.tensor([1] + [0] * (B - 1))
    for u0, expected in ((0.2, None), (0.3, [1])):
        u = torch.tensor([u0] + [0.99] * (B - 1))
        tokens, n = accept1(block, q, p, u, torch.empty(0, dtype=torch.int64), 1.0, 0, 1.0)
        out = tokens[:int(n)].tolist()
        if expected is None:  # accepted d_1 = 0 (u < 0.25), then rejected at u = 0.99 -> residual token 1
            assert out == [0, 1]
        else:
            assert out == expected


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    assert torch.allclose(filter_logits(logits, 1.0, 0, 1.0), torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    k2 = filter_logits(logits, 1.0, 2, 1.0)
    assert torch.allclose(k2, torch.tensor([[0.5 / 0.7, 0.2 / 0.7, 0, 0, 0]]))
    p = filter_logits(logits, 1.0, 0, 0.7)  # 0.5 + 0.2 reaches 0.7: keep two
    assert torch.allclose(p, torch.tensor([[0.5 / 0.7, 0.2 / 0.7, 0, 0, 0]]))
    p = filter_logits(logits, 1.0, 0, 0.71)
    assert (p > 0).sum() == 3
    assert (filter_logits(logits, 1.0, 0, 0.01) > 0).sum() == 1  # the top token always survives


def test_sample_token_never_draws_zero_mass():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]])
    draws = {int(sample_token(probs, torch.tensor([u]))[0]) for u in torch.linspace(0, 0.9999, 101).tolist()}
    assert draws == {1, 3}


def test_slots_are_independent_and_mix_greedy_with_sampled():
    """Four slots in one call (greedy, sampled, greedy with EOS, sampled with top-k): each row equals that slot run
    alone, and a greedy slot in a sampled call equals the greedy call."""
    g = torch.Generator().manual_seed(3)
    s = 4
    block = torch.randint(0, V, (s, B), generator=g)
    dl, vl = torch.randn(s, B, V, generator=g), torch.randn(s, B, V, generator=g)
    block[0, 1:4] = vl[0, :3].argmax(-1)  # slot 0 accepts three drafts greedily
    u = torch.rand(s, B, generator=g)
    eos = torch.full((s, 2), -1, dtype=torch.int64)
    eos[2, 0] = int(vl[2, 0].argmax())
    temp, top_k, top_p = torch.tensor([0.0, 1.0, 0.0, 0.7]), torch.tensor([0, 0, 0, 3]), torch.tensor([1.0, 0.9, 1, 1])
    tokens, n = torch.ops.orthrus.accept(block, dl, vl, u, eos, temp, top_k, top_p, True)
    for i in range(s):
        t1, n1 = torch.ops.orthrus.accept(block[i:i + 1], dl[i:i + 1], vl[i:i + 1], u[i:i + 1], eos[i:i + 1],
                                          temp[i:i + 1], top_k[i:i + 1], top_p[i:i + 1], True)
        assert int(n1[0]) == int(n[i]) and tokens[i, :int(n[i])].tolist() == t1[0, :int(n1[0])].tolist()
    assert int(n[0]) == 4 and int(n[2]) == 1  # three accepted + bonus; EOS at the first token
    greedy_tokens, greedy_n = torch.ops.orthrus.accept(block, dl, vl, u, eos, temp, top_k, top_p, False)
    for i in (0, 2):
        assert int(greedy_n[i]) == int(n[i]) and torch.equal(greedy_tokens[i, :int(n[i])], tokens[i, :int(n[i])])


def test_filter_logits_per_row_parameters_match_scalar_calls():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 50, generator=g)
    temp, top_k, top_p = torch.tensor([0.5, 1.0, 2.0]), torch.tensor([0, 5, 20]), torch.tensor([0.9, 1.0, 0.5])
    rows = filter_logits(logits, temp, top_k, top_p)
    for i in range(3):
        one = filter_logits(logits[i:i + 1], float(temp[i]), int(top_k[i]), float(top_p[i]))
        assert torch.allclose(rows[i], one[0], atol=1e-7)
    assert int((rows[1] > 0).sum()) == 5
