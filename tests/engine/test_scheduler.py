"""Continuous batching: requests join and leave between steps, prefills are chunked and interleaved with decodes,
a sequence is preempted (and recomputed) when KV blocks run out, and every request gets the tokens it gets alone."""
import dataclasses

import pytest
import torch

from own_engine import Engine
from own_engine.scheduler import Scheduler
from own_engine.sequence import SamplingParams, Sequence

PROMPTS = [list(range(100, 140)), [5, 77, 300, 12, 9, 401, 33], [7, 7, 8, 9, 300, 2, 11, 60, 61, 62, 63, 64] * 3]


@pytest.fixture
def engine(tiny_model):
    path, _ = tiny_model("llama_gqa2")
    with Engine.from_pretrained(path, block_size=16, prefill_chunk=8, max_context=96, max_batch=3,
                                prefix_cache=False) as engine:
        yield engine


def alone(engine, prompt, n=24, **options):
    return engine.generate(prompt, max_new_tokens=n, ignore_eos=True, **options)


def traced(engine, monkeypatch) -> list[list[tuple[int, int]]]:
    """Record the (sequence, rows) of every pass the scheduler asks for."""
    passes, forward = [], engine.forward
    monkeypatch.setattr(engine, "forward", lambda work, phase: passes.append(list(work)) or forward(work, phase))
    return passes


def test_requests_joining_mid_decode_get_their_tokens_alone(engine, monkeypatch):
    expected = [alone(engine, p) for p in PROMPTS]
    passes = traced(engine, monkeypatch)
    scheduler = Scheduler(engine)
    requests = [Sequence(p, SamplingParams(24, ignore_eos=True)) for p in PROMPTS]
    scheduler.add(requests[0])
    for _ in range(8):  # the first request's prompt (5 steps of 8 rows), then decoding
        scheduler.step()
    assert 0 < len(requests[0].output) < 24
    scheduler.add(requests[1])
    scheduler.add(requests[2])
    while scheduler.busy:
        scheduler.step()
    assert [r.output for r in requests] == expected and all(r.error is None for r in requests)
    assert all(sum(n for _, n in p) <= engine.plan.step_tokens == 8 for p in passes)
    mixed = [p for p in passes if any(n == 1 for _, n in p) and any(n > 1 for _, n in p)]
    assert mixed  # a prompt went through in chunks while another sequence kept decoding
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_a_pass_no_decode_waits_behind_takes_a_whole_chunk(tiny_model, monkeypatch):
    """With max_batch > 1 and no chunk asked for: a lone prompt goes through in passes of a whole (CPU) chunk; once
    a sequence decodes, a pass is at most step_tokens rows (it waits behind it), and every token is as alone."""
    path, _ = tiny_model("llama_gqa2")
    with Engine.from_pretrained(path, block_size=16, max_context=4096, max_batch=2, prefix_cache=False) as engine:
        plan, long_prompt = engine.plan, [(7 * i) % 300 + 5 for i in range(3000)]
        assert (plan.prefill_chunk, plan.step_tokens) == (2048, 512)
        expected = [alone(engine, p, 4) for p in (long_prompt, long_prompt[:1500])]
        passes = traced(engine, monkeypatch)
        scheduler = Scheduler(engine)
        requests = [Sequence(p, SamplingParams(4, ignore_eos=True)) for p in (long_prompt, long_prompt[:1500])]
        scheduler.add(requests[0])
        scheduler.step()
        scheduler.step()  # the prompt's rest: 952 rows, then its first decode
        scheduler.add(requests[1])
        while scheduler.busy:
            scheduler.step()
    assert [r.output for r in requests] == expected
    assert [sum(n for _, n in p) for p in passes[:2]] == [2048, 952]
    assert all(sum(n for _, n in p) <= 512 for p in passes[2:]) and any(len(p) == 2 for p in passes[2:])


def test_a_sequence_reaching_eos_leaves_while_the_others_continue(engine):
    expected = [alone(engine, p) for p in PROMPTS]
    eos = expected[1][5]
    stop = expected[1].index(eos)
    engine.config = dataclasses.replace(engine.config, eos_token_ids=(eos,))
    requests = [Sequence(p, SamplingParams(24, ignore_eos=i != 1)) for i, p in enumerate(PROMPTS)]
    finished = []
    scheduler = Scheduler(engine)
    for r in requests:
        r.on_finish = finished.append
        scheduler.add(r)
    while scheduler.busy:
        scheduler.step()
    assert requests[1].output == expected[1][:stop + 1] and finished[0] is requests[1]
    assert requests[0].output == expected[0] and requests[2].output == expected[2]


def test_preemption_when_blocks_run_out_recomputes_and_changes_no_token(tiny_model):
    """KV planned for one sequence of 96 tokens (6 blocks), three admitted: each prompt takes 2 blocks, so all three
    start, and as they grow the newest is sent back to wait, then recomputed."""
    path, _ = tiny_model("llama_gqa2")
    with Engine.from_pretrained(path, block_size=16, max_context=96, max_batch=1) as engine:
        expected = [alone(engine, p[:20], n=40) for p in PROMPTS[::2]] + [alone(engine, PROMPTS[1], n=40)]
        engine.max_batch = 3
        requests = [Sequence(p, SamplingParams(40, ignore_eos=True))
                    for p in (PROMPTS[0][:20], PROMPTS[2][:20], PROMPTS[1])]
        scheduler = Scheduler(engine)
        for r in requests:
            scheduler.add(r)
        while scheduler.busy:
            scheduler.step()
        assert engine.stats.preemptions > 0
        assert [r.output for r in requests] == expected
        assert engine.blocks.num_free == engine.blocks.num_blocks


def test_seeded_sampling_does_not_depend_on_the_batch(engine):
    options = dict(temperature=0.9, top_k=50, seed=3)
    expected = [alone(engine, p, **options) for p in PROMPTS]
    assert engine.generate(PROMPTS, max_new_tokens=24, ignore_eos=True, **options) == expected


def test_a_cancelled_request_leaves_and_frees_its_blocks(engine):
    scheduler = Scheduler(engine)
    params = SamplingParams(10, ignore_eos=True)
    keep, drop = Sequence(PROMPTS[0], params), Sequence(PROMPTS[2], params)
    scheduler.add(keep)
    scheduler.add(drop)
    for _ in range(7):
        scheduler.step()
    drop.cancelled = True
    while scheduler.busy:
        scheduler.step()
    assert len(keep.output) == 10 and len(drop.output) < 10 and drop.error is None
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_a_request_larger_than_the_cache_fails_alone(engine):
    scheduler = Scheduler(engine)
    big, small = Sequence(list(range(90)), SamplingParams(300)), Sequence(PROMPTS[1], SamplingParams(5))
    scheduler.add(big)
    scheduler.add(small)
    while scheduler.busy:
        scheduler.step()
    assert "need 25 KV blocks" in str(big.error) and len(small.output) == 5
    with pytest.raises(type(big.error), match="need 25 KV blocks"):
        engine.generate(list(range(90)), max_new_tokens=300)
    assert torch.is_tensor(engine.prefill([PROMPTS[1]])[1])


def test_the_serving_loop_takes_sequences_from_any_thread(engine):
    """Engine.serve(): the scheduler on a thread of its own; sequences submitted from other threads while it runs
    join between steps and get the tokens they get alone; a cancelled one leaves; close() stops it."""
    import threading

    expected = [alone(engine, p) for p in PROMPTS]
    finished = threading.Semaphore(0)
    seqs = [Sequence(p, SamplingParams(24, ignore_eos=True), on_finish=lambda s: finished.release()) for p in PROMPTS]
    gone = Sequence(PROMPTS[0], SamplingParams(50, ignore_eos=True), on_finish=lambda s: finished.release(),
                    on_token=lambda t: setattr(gone, "cancelled", True))
    loop = engine.serve()
    try:
        loop.submit(gone)
        senders = [threading.Thread(target=loop.submit, args=(s,)) for s in seqs]
        for sender in senders:
            sender.start()
        assert all(finished.acquire(timeout=60) for _ in range(len(seqs) + 1))
    finally:
        loop.close()
    assert [s.output for s in seqs] == expected and not loop.thread.is_alive()
    assert gone.error is None and len(gone.output) == 1  # cancelled at its first token, it left at the next step
    assert engine.blocks.num_free == engine.blocks.num_blocks
