"""In-flight batching (issue 12): requests of different lengths, arrival times, stops and modes run concurrently
through the scheduler, each equal to ``transformers`` ``generate`` and to its own run alone; cancellation frees the
slot; a full queue is refused; prompts prefill in chunks between running streams; a failing request fails alone;
sampled requests are reproducible for their seed whatever shares the batch."""

import json
import threading
import time

import pytest
import torch

from orthrus_export.checkpoint import TINY_DIR, open_checkpoint
from orthrus_export.reference import Reference
from orthrus_runtime import Engine
from orthrus_runtime.errors import OrthrusError
from orthrus_runtime.scheduler import QueueFull

HELDOUT = json.loads((TINY_DIR / "heldout_prompts.json").read_text())


@pytest.fixture(scope="module")
def tiny(models):
    engine = models.engine("tiny")
    assert engine.max_batch_size == 8 and engine.buckets == (1, 2, 4, 8)
    ids = [t for p in HELDOUT for t in engine.encode(p["text"])]
    return engine, ids


def _concurrently(jobs: list, delays: list[float]) -> list:
    """Run each job (a callable) in its own thread after its delay; their results in order."""
    out: list = [None] * len(jobs)

    def run(i):
        time.sleep(delays[i])
        try:
            out[i] = jobs[i]()
        except Exception as e:  # surfaced by the caller's comparison
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    return out


def test_concurrent_requests_equal_transformers_and_alone(tiny):
    """Nine requests (one more than the slots: one waits) with prompts of 1–300 tokens, their own max_new_tokens,
    stop tokens and modes, arriving at different times, share passes and each equals its run alone and
    transformers' greedy generate."""
    engine, ids = tiny
    ref = Reference(open_checkpoint("tiny"))
    lengths = [1, 5, 31, 32, 33, 64, 130, 200, 300]
    new = [40, 25, 33, 12, 48, 20, 30, 17, 24]
    starts = [0, 301, 700, 900, 1100, 1300, 1600, 2000, 2400]
    cases = [dict(prompt=ids[s:s + n], max_new_tokens=m) for s, n, m in zip(starts, lengths, new)]
    cases[3]["use_drafts"] = cases[7]["use_drafts"] = False  # AR requests decode in the same scheduler
    alone_runs = [engine.generate(**c) for c in cases]
    for i in (1, 4):  # a stop token that the request emits early
        cases[i]["end_id"] = alone_runs[i].output_ids[3]
        alone_runs[i] = engine.generate(**cases[i])
        assert len(alone_runs[i].output_ids) <= 4 and alone_runs[i].output_ids[-1] == cases[i]["end_id"]
    alone = [r.output_ids for r in alone_runs]
    for c, a in zip(cases, alone):
        eos = [c["end_id"]] if "end_id" in c else None
        assert a == ref.generate_ar(c["prompt"], c["max_new_tokens"], eos_ids=eos), len(c["prompt"])
    before = engine.scheduler_stats()
    results = _concurrently([lambda c=c: engine.generate(**c) for c in cases],
                            [0.0, 0.0, 0.05, 0.1, 0.1, 0.2, 0.3, 0.3, 0.4])
    for i, (r, a) in enumerate(zip(results, alone)):
        assert not isinstance(r, Exception), r
        assert r.output_ids == a, f"request {i} ({lengths[i]} prompt tokens) differs from its run alone"
        # the same drafts too: a row's cycles (and so its acceptance) do not depend on what shares its passes
        assert (r.stats.cycles, r.stats.cycle_tokens) == (alone_runs[i].stats.cycles, alone_runs[i].stats.cycle_tokens)
        assert r.stats.finish_reason == ("eos" if "end_id" in cases[i] else "length")
        assert r.stats.ttft_s > 0 and r.stats.queue_s >= 0
    after = engine.scheduler_stats()
    shared = sum(after["active_hist"][2:]) - sum(before["active_hist"][2:])
    assert shared > 0, "no step ran two requests at once"
    assert after["slots_in_use"] == 0 and after["waiting"] == 0
    assert after["requests_finished"] - before["requests_finished"] == len(cases)


def test_cancel_frees_the_slot_and_leaves_the_others_alone(tiny):
    engine, ids = tiny
    others = [dict(prompt=ids[100 * i:100 * i + 20 + i], max_new_tokens=60) for i in range(7)]
    alone = [engine.generate(**c).output_ids for c in others]
    victim = engine.submit(ids[50:90], max_new_tokens=400)
    handles = [engine.submit(**c) for c in others]   # all eight slots busy
    waiter = engine.submit(ids[800:830], max_new_tokens=6)  # queued
    first = next(iter(victim))
    assert first and not waiter.finished
    victim.cancel()
    got = waiter.wait()
    assert not all(h.finished for h in handles), "the queued request ran only after every other request ended"
    assert [h.wait() for h in handles] == alone
    assert victim.finish_reason == "cancelled" and len(victim.output_ids) < 400
    assert got == engine.generate(ids[800:830], max_new_tokens=6).output_ids
    assert engine.scheduler_stats()["slots_in_use"] == 0


def test_full_queue_is_refused_cleanly(models, tiny):
    """With the scheduler held inside a step, the queue fills; the next request is refused at once with a clear
    error, and every queued request still completes correctly."""
    from orthrus_runtime import Engine
    engine, ids = tiny
    small = Engine.load(engine.path, max_queue=2)
    gate, inside = threading.Event(), threading.Event()

    def stalling_drafter(s, x, tokens):
        inside.set()
        assert gate.wait(60)
        return [0] * (small.block_size - 1)

    held = small.submit(ids[:10], max_new_tokens=3, drafter=stalling_drafter)
    assert inside.wait(60)
    queued = [small.submit(ids[i:i + 12], max_new_tokens=5) for i in (20, 40)]
    with pytest.raises(QueueFull, match="queue is full"):
        small.submit(ids[60:70], max_new_tokens=5)
    gate.set()
    assert held.wait() == engine.generate(ids[:10], max_new_tokens=3).output_ids
    for h, i in zip(queued, (20, 40)):
        assert h.wait() == engine.generate(ids[i:i + 12], max_new_tokens=5).output_ids
    assert small.scheduler_stats()["requests_rejected"] == 1
    small.close()


def test_long_prompt_prefills_in_chunks_between_running_cycles(tiny):
    """A 300-token prompt (10 chunks) arriving while a stream runs is prefilled one chunk a step
    (prefill_chunks=1): the running stream keeps cycling during the prefill, and both results are exact."""
    from orthrus_runtime import Engine
    engine, ids = tiny
    one = Engine.load(engine.path, prefill_chunks=1)
    seen: list[int] = []
    state = {}

    def spy(s, x, tokens):  # called in every cycle of the running request
        h = state.get("long")
        if h is not None:
            seen.append(h.stats.prefill_passes)
        return [0] * (one.block_size - 1)

    running = one.submit(ids[:8], max_new_tokens=80, drafter=spy, end_id=one.config.mask_token_id)
    next(iter(running))
    state["long"] = one.submit(ids[1000:1300], max_new_tokens=5)
    long_out = state["long"].wait()
    during = [p for p in seen if 0 < p < 10]
    assert len(during) >= 5, f"the running stream cycled only {len(during)} times during a 10-chunk prefill"
    assert state["long"].stats.prefill_passes == 10
    assert long_out == engine.generate(ids[1000:1300], max_new_tokens=5).output_ids
    running.cancel()
    one.close()


def test_a_failing_request_fails_alone(tiny):
    engine, ids = tiny

    def broken(s, x, tokens):
        raise RuntimeError("drafter exploded")

    good = dict(prompt=ids[10:30], max_new_tokens=30)
    expected = engine.generate(**good).output_ids
    bad = engine.submit(ids[:12], max_new_tokens=10, drafter=broken)
    with pytest.raises(OrthrusError, match="drafter exploded"):
        bad.wait()
    assert engine.generate(**good).output_ids == expected
    assert engine.scheduler_stats()["slots_in_use"] == 0


def test_sampled_requests_depend_on_their_seed_only(tiny):
    """A sampled request's output is the same alone and in a batch with greedy and other sampled requests."""
    engine, ids = tiny
    sampled = [dict(prompt=ids[40 * i:40 * i + 9], max_new_tokens=24, temperature=0.8, top_k=20, top_p=0.95,
                    seed=100 + i) for i in range(4)]
    greedy = [dict(prompt=ids[500 + 40 * i:500 + 40 * i + 15], max_new_tokens=30) for i in range(3)]
    alone = [engine.generate(**c).output_ids for c in sampled + greedy]
    mixed = _concurrently([lambda c=c: engine.generate(**c) for c in sampled + greedy], [0.0] * 7)
    assert [r.output_ids for r in mixed] == alone
    assert engine.generate(**{**sampled[0], "seed": 7}).output_ids != alone[0]  # the seed matters


def test_request_and_engine_statistics(tiny):
    engine, ids = tiny
    r = engine.generate(ids[200:260], max_new_tokens=64)
    st = r.stats
    assert st.new_tokens == 64 and st.cycles > 0 and st.prefill_passes == 2
    assert sum(st.accepted_per_pos) == st.cycle_tokens - st.cycles
    assert all(a >= b for a, b in zip(st.accepted_per_pos, st.accepted_per_pos[1:])), "acceptance must be a prefix"
    assert st.acceptance_by_position[0] == st.accepted_per_pos[0] / st.cycles
    assert st.ttft_s >= st.prefill_s > 0 and st.itl_s > 0 and st.finish_reason == "length"
    d = engine.scheduler_stats()
    assert d["tokens_per_pass"] > 0 and d["passes"] >= d["steps"] and d["padded_rows"] >= d["rows"]


def test_batched_pass_rows_equal_single_rows(tiny):
    """The batched programs: each row of a 3-row verify equals the same block run alone (one row), on distinct
    slots and with two rows of one slot (consecutive prompt chunks)."""
    engine, ids = tiny
    prog = engine.programs["verify"]
    cfg = engine.config
    b = engine.block_size
    shape = engine.cache_shape(4)
    kc = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    vc = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    tokens = torch.tensor([ids[0:b], ids[b:2 * b], ids[2 * b:3 * b]])
    start, slots = torch.tensor([5, 40, 40 + b]), torch.tensor([2, 0, 0])
    with torch.no_grad():
        k1, v1 = kc.clone(), vc.clone()
        together = prog(engine.weights, tokens, start, slots, k1, v1)
        k2, v2 = kc.clone(), vc.clone()
        alone = [prog(engine.weights, tokens[i:i + 1], start[i:i + 1], slots[i:i + 1], k2, v2)[0] for i in range(3)]
    for i in range(3):
        assert torch.allclose(together[i], alone[i], atol=1e-5, rtol=1e-5), i
    assert torch.equal(k1, k2) and torch.equal(v1, v2)
    assert together.shape == (3, b, cfg.vocab_size)


def test_a_build_that_cannot_fit_is_refused_with_the_numbers():
    from orthrus_export.bench import qwen3_config
    from orthrus_export.builder import check_memory, memory_budget
    from orthrus_runtime.profiles import load_profile
    cfg = qwen3_config("8b")
    fits = check_memory(cfg, load_profile("h100"), "bf16", 4096, 16)
    assert fits == memory_budget(cfg, "bf16", 4096, 16) and 16e9 < fits["weights"] < 20e9
    assert fits["kv_cache"] == 2 * 36 * 17 * 8 * (4096 + 32) * 128 * 2
    with pytest.raises(OrthrusError, match=r"needs \d+\.\d GiB .*KV cache \d+\.\d for 256 sequences of 32768 tokens.*"
                                           r"h100 has 72\.0 GiB usable.*lower --max-batch-size or --max-seq-len"):
        check_memory(cfg, load_profile("h100"), "bf16", 32768, 256)


def test_cli_batch_arguments_are_checked(tiny, tmp_path):
    from test_cli import cli
    engine, _ = tiny
    rc, _, err = cli("build", "--model", "tiny", "--out", tmp_path / "e", "--max-batch-size", "0", "--no-progress")
    assert rc == 2 and "--max-batch-size 0 must be between 1 and" in err and not (tmp_path / "e").exists()
    rc, _, err = cli("bench", "--engine", engine.path, "--batch", "1,16", "--contexts", "64")
    assert rc == 2 and "--batch 1,16: every size must be in 1..8" in err
    rc, _, err = cli("bench", "--engine", engine.path, "--batch", "one", "--contexts", "64")
    assert rc == 2 and "--batch takes comma-separated batch sizes" in err
    rc, out, err = cli("bench", "--engine", engine.path, "--batch", "1,2", "--contexts", "64", "--iters", "1",
                       "--no-sampled", "--json")
    result = json.loads(out)
    rows = result["batches"]
    assert rc == 0 and [r["batch"] for r in rows] == [1, 2] and rows[1]["ms"]["cycle"] > 0
    assert rows[0]["ratio_to_first"]["cycle"] == 1.0
    # each size's cycle floor: the GEMMs' larger bound (bytes or FLOPs at the rate measured in the run) + K/V
    from orthrus_export.profile import floors_ms
    bw, rate = result["copy_bandwidth_GBps"] * 1e9, result["matmul_TFLOPs"]["float32"] * 1e12
    for r in rows:
        want = sum(floors_ms(engine.config, engine.weights, "cycle", 64, r["batch"], engine.k_cache.element_size(),
                             bw, rate).values())
        assert r["floor_ms"] == pytest.approx(want, rel=1e-6)
        assert r["cycle_over_floor"] == pytest.approx(r["ms"]["cycle"] / r["floor_ms"])
    assert rows[1]["floor_ms"] > rows[0]["floor_ms"]


def test_max_active_one_turns_batching_off(tiny):
    """``max_active=1``: concurrent requests run one after another (every step holds one request's rows), each equal
    to its run on the batching engine; values outside 1 … max batch size are refused with the range."""
    engine, ids = tiny
    prompts = [ids[i * 40:i * 40 + 20 + 7 * i] for i in range(3)]
    expected = [engine.generate(p, max_new_tokens=12).output_ids for p in prompts]
    serial = Engine.load(engine.path, max_active=1)
    try:
        handles = [serial.submit(p, max_new_tokens=12) for p in prompts]  # all queued at once
        spans: list = [None] * 3

        def consume(i):
            chunks = []
            for chunk in handles[i]:
                chunks.append((time.perf_counter(), chunk))
            spans[i] = (chunks[0][0], chunks[-1][0], [t for _, c in chunks for t in c])
        threads = [threading.Thread(target=consume, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        assert [s[2] for s in spans] == expected
        order = sorted(spans)
        # one at a time: a request's first tokens come after the previous request's last
        assert all(order[i + 1][0] >= order[i][1] for i in range(2)), [(s[0], s[1]) for s in order]
        st = serial.scheduler_stats()
        assert st["slots"] == 1 and st["requests_finished"] == 3
    finally:
        serial.close()
    for bad in (0, 9):
        with pytest.raises(OrthrusError, match="between 1 and the engine's max batch size 8"):
            Engine.load(engine.path, max_active=bad)
