"""Multi-turn sessions (`prompts: {type: conversation}`): sessions cut from each repetition's turns, each turn's
prompt the history with the model's real answers, turns in order with the think time between, sessions as the
load's items."""

import json
from collections import defaultdict

import numpy as np
import pytest
import yaml
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from harness.config.conversation import ConversationPrompts, ThinkTime
from harness.config.load import load_scenario
from harness.inputs.conversation import draw_think, render_chat
from harness.records import PROMPT_FILE, PromptEntry, RequestRecord, load_run, read_requests
from harness.run.conversation import Conversation
from harness.run.runner import Runner
from tests.conftest import scenario_dict


def conversation_scenario(tiny_model, backend, *, num_requests=6, turns=3, think=0.1, load=None, **extra):
    return scenario_dict(tiny_model, [backend], [{
        "name": "chat", "input_tokens": 12, "output_tokens": 6, "num_requests": num_requests, "warmup_requests": 1,
        "prompts": {"type": "conversation", "turns": turns, "think_time_s": think},
        "load": load or {"type": "concurrency", "concurrency": 2}}], **extra)


SCRIPTED = {"name": "s", "kind": "scripted", "options": {"ttft_s": 0.01, "itl_s": 0.002, "record_requests": True}}
HF = {"name": "hf", "kind": "transformers", "options": {"dtype": "float32"}}


@pytest.fixture(scope="module")
def chatted(tiny_model, tmp_path_factory):
    """One run: 2 sessions of 3 turns at once, on the scripted backend and on HF transformers (a real engine)."""
    tmp = tmp_path_factory.mktemp("conversation")
    path = tmp / "scenario.yaml"
    path.write_text(yaml.safe_dump(conversation_scenario(tiny_model, SCRIPTED, record_outputs=True)
                                   | {"backends": [SCRIPTED, HF]}))
    out = tmp / "out"
    assert Runner(load_scenario(path), str(path), out, write_report=False).run() == 0
    cells = {c.backend: c for c in load_run(out).cells}
    entries = PROMPT_FILE.validate_json(next((out / "prompts").glob("*.json")).read_bytes())
    return out, cells, entries


def sessions_of(out, cell) -> list[list[RequestRecord]]:
    by_session = defaultdict(list)
    for r in sorted(read_requests(cell.requests_path(out)), key=lambda r: r.id):
        by_session[r.session].append(r)
    return list(by_session.values())


def test_each_turn_sends_the_history_with_the_real_answers(chatted, tiny_model):
    out, cells, entries = chatted
    cell = cells["s"]
    seen = {d["id"]: d for line in (out / "cells" / cell.id / "seen.jsonl").read_text().splitlines()
            if (d := json.loads(line))}
    sessions = sessions_of(out, cell)
    assert len(sessions) == 2 and all([r.turn for r in s] == [0, 1, 2] for s in sessions)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    # the scripted backend streams token ids 0, 1, ...: its answer is their text, decoded by the harness
    answer = Tokenizer.from_file(str(tiny_model / "tokenizer.json")).decode(list(range(6)), skip_special_tokens=True)
    for turns in sessions:
        history = []
        for r in turns:
            history.append(entries[r.id].messages[0])
            # what was sent is the whole history, in the model's chat template, every earlier answer in it
            assert seen[r.id]["prompt"] == render_chat(tokenizer, history)[0]
            assert r.input_tokens == len(render_chat(tokenizer, history)[1])
            assert r.output_text == answer
            history.append({"role": "assistant", "content": answer})
        # turns go one after another, the think time (0.1 s) after the answer before the next
        for a, b in zip(turns, turns[1:]):
            assert b.t_send - a.chunk_times[-1] >= 0.1 - 1e-3
    # the two sessions ran at once (concurrency 2 counts sessions): their first turns left together
    assert abs(sessions[0][0].t_send - sessions[1][0].t_send) < 0.05 and cell.metrics.value("completed") == 6


def test_turn_two_carries_turn_ones_real_answer_on_a_real_engine(chatted, tiny_model):
    """HF transformers on the tiny model: the answers are the model's own (greedy), and each later turn's prompt,
    as the engine counted it, is exactly the history with those answers in it."""
    out, cells, entries = chatted
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    for turns in sessions_of(out, cells["hf"]):
        assert [r.turn for r in turns] == [0, 1, 2]
        history, questions = [], []
        for r in turns:
            history.append(entries[r.id].messages[0])
            questions.append(entries[r.id].messages[0])
            assert r.input_tokens == len(render_chat(tokenizer, history)[1])
            if len(questions) > 1:  # without the answers it would be shorter
                assert r.input_tokens > len(render_chat(tokenizer, questions)[1])
            assert r.output_text and len(r.output_token_ids) == 6
            history.append({"role": "assistant", "content": r.output_text})


def test_a_record_keeps_the_answer_only_with_record_outputs(tiny_model):
    entries = [PromptEntry(text="hi", token_ids=[1], messages=[{"role": "user", "content": "hi"}], session=4, turn=1)]
    conversation = Conversation(tiny_model, entries)
    for keep in (True, False):
        rec = RequestRecord(id=0, repetition=0, t_send=0.0, chunk_times=[1.0], output_text="yes", output_token_ids=[7])
        conversation.note(rec, keep)
        assert (rec.session, rec.turn) == (4, 1) and conversation.answers[0] == "yes"
        assert (rec.output_text, rec.output_token_ids) == (("yes", [7]) if keep else (None, None))


async def test_a_session_is_an_item_whose_turns_follow_the_answers(tiny_model):
    """A session leaves when its Due says (with the wait for the backend, if it had one); each later turn is due once
    the answer before it is in and the think time has passed, never waits for the backend again, and carries the
    answers; a failed turn ends the session, and a turn due after the deadline is not sent."""
    from harness.core.events import Request, now
    from harness.run.loadgen import Due

    entries = [PromptEntry(text=f"q{k}", token_ids=[1], messages=[{"role": "user", "content": f"q{k}"}], session=0,
                           turn=k, think_s=0.05 if k else 0.0) for k in range(3)]
    conversation = Conversation(tiny_model, entries)
    sent, failing = [], set()

    async def send(request, due):
        sent.append((due, now(), request.prompt))
        rec = RequestRecord(id=request.id, repetition=0, t_send=now(), chunk_times=[now()],
                            output_text=f"answer {request.id}", error="boom" if request.id in failing else None)
        conversation.note(rec, keep_outputs=False)
        return rec

    def session():
        (one,) = conversation.sessions([Request(id=k, prompt=e.text, prompt_token_ids=e.token_ids, max_tokens=4)
                                        for k, e in enumerate(entries)])
        return one

    first = Due(t_scheduled=now(), t_queued=now() - 0.5)
    records = await session().send(first, send, deadline=now() + 10)
    assert [r.turn for r in records] == [0, 1, 2] and sent[0][0] == first
    for (due, t, _), (before, _, _) in zip(sent[1:], sent):
        assert due.t_queued is None and t >= due.t_scheduled >= before.t_scheduled + 0.05
    assert "answer 0" in sent[1][2] and "answer 1" in sent[2][2] and "q2" in sent[2][2]  # the real answers in it

    failing.add(1)
    records = await session().send(Due(now()), send, deadline=now() + 10)
    assert [r is not None for r in records] == [True, True, False]  # turn 1 failed: nothing to carry into turn 2
    failing.clear()
    records = await session().send(Due(now()), send, deadline=now() + 0.01)
    assert [r is not None for r in records] == [True, False, False]  # turn 1 was due after the deadline


def test_sessions_are_cut_from_each_repetitions_turns(write_scenario, tiny_model, tmp_path):
    from rich.console import Console

    from harness.run.plan import CellPlanner

    backend = {"name": "s", "kind": "scripted"}
    data = conversation_scenario(tiny_model, backend, num_requests=7, turns=3,
                                 think={"dist": "uniform", "min": 0.5, "max": 1.5}) | {"repetitions": 2}
    scenario = load_scenario(write_scenario(data))
    (tmp_path / "out").mkdir()
    plan = CellPlanner(scenario, tmp_path / "out", Console(quiet=True)).plan(scenario.cells()[0])
    entries = PROMPT_FILE.validate_json(plan.prompts_file.read_bytes())
    assert len(entries) == 1 + 2 * 7
    rep = entries[1:8]
    assert [e.turn for e in rep] == [0, 1, 2, 0, 1, 2, 0]  # the last session is cut short
    assert len({e.session for e in rep}) == 3 and not {e.session for e in rep} & {e.session for e in entries[8:]}
    assert all(e.think_s == 0 for e in rep if e.turn == 0)
    assert all(0.5 <= e.think_s <= 1.5 for e in rep if e.turn)
    assert all(e.messages == [{"role": "user", "content": e.messages[0]["content"]}] for e in entries)


def test_think_times_follow_their_distribution():
    rng = np.random.default_rng(0)
    assert draw_think(0.25, 3, rng) == [0.25] * 3
    drawn = draw_think(ThinkTime(dist="exponential", mean=2.0, max=5.0), 4000, rng)
    assert max(drawn) <= 5.0 and np.mean(drawn) == pytest.approx(2.0 * (1 - np.exp(-2.5)), rel=0.05)
    with pytest.raises(ValueError, match="dist uniform needs max"):
        ThinkTime(dist="uniform")
    with pytest.raises(ValueError, match="turns: at least 1"):
        ConversationPrompts(type="conversation", turns=0)


def test_a_conversation_runs_on_one_load_generator(tiny_model):
    from pydantic import ValidationError

    from harness.config.scenario import Scenario

    data = conversation_scenario(tiny_model, SCRIPTED, load={"type": "concurrency", "concurrency": 2, "clients": 2})
    with pytest.raises(ValidationError, match=r"workloads\[0\].load: a conversation's sessions run in the worker"):
        Scenario.model_validate(data)
