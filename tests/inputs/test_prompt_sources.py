"""What a workload sends: each prompt source (synthetic, file, document, shared_prefix), length distributions, a
tokenizer whose vocabulary is syllables rather than English words, and the checks `bench validate` makes up front."""

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml

from harness.config.load import ScenarioError, load_scenario
from harness.config.prompts import LengthDist
from harness.config.scenario import Workload
from harness.inputs.exact import single_token_words
from harness.inputs.lengths import draw_lengths
from harness.inputs.prompts import PromptError, make_prompts
from tests.conftest import ROOT, scenario_dict


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def syllable_tokenizer(kind: str):
    """A tokenizer trained offline on syllable words ("kamo rivetu"): no English word is one token in it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = np.random.default_rng(0)
    syllables = [c + v for c in "bdgklmnprstvz" for v in "aeiou"]
    corpus = [" ".join("".join(rng.choice(syllables, size=rng.integers(2, 5))) for _ in range(30))
              for _ in range(2000)]
    special = ["<s>", "</s>", "[UNK]"]
    if kind == "bpe":
        tk = Tokenizer(models.BPE(unk_token="[UNK]"))
        tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=special,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tk = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tk.pre_tokenizer, tk.decoder = pre_tokenizers.Whitespace(), decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=600, special_tokens=special)
    tk.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="[UNK]")


def workload(**kw) -> Workload:
    return Workload.model_validate({"name": "w", "output_tokens": 8, "num_requests": 4, "warmup_requests": 1, **kw})


# ---- synthetic, and any tokenizer -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_synthetic_prompts_are_exact_in_a_syllable_tokenizer(kind):
    tok = syllable_tokenizer(kind)
    assert len(single_token_words(tok)) < 20  # the common-words path cannot work: the vocabulary is used
    w = workload(input_tokens={"dist": "uniform", "min": 5, "max": 300}, num_requests=30)
    entries = make_prompts(tok, w, 31, seed=3)
    assert [len(e.token_ids) for e in entries] == [len(tok.encode(e.text)) for e in entries]
    assert len({len(e.token_ids) for e in entries}) > 10  # lengths were drawn, and each one was hit exactly
    assert all(5 <= len(e.token_ids) <= 300 for e in entries)
    assert "[UNK]" not in "".join(e.text for e in entries) and tok.unk_token_id not in entries[0].token_ids
    assert [e.text for e in make_prompts(tok, w, 31, seed=3)] == [e.text for e in entries]  # seeded


def test_synthetic_prompts_keep_the_common_words_path(tokenizer):
    entries = make_prompts(tokenizer, workload(input_tokens=64), 5, seed=0)
    assert all(len(e.token_ids) == 64 == len(tokenizer.encode(e.text)) for e in entries)
    assert set(" ".join(e.text for e in entries).split()) <= set(single_token_words(tokenizer))
    assert all(e.max_tokens is None for e in entries)  # the workload's output_tokens


# ---- length distributions -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", [
    {"dist": "normal", "mean": 200, "std": 60, "min": 100, "max": 260},
    {"dist": "lognormal", "mean": 200, "std": 150, "min": 20, "max": 900},
    {"dist": "uniform", "min": 10, "max": 20},
    {"dist": "fixed", "mean": 77},
])
def test_length_distributions_are_seeded_and_bounded(spec):
    d = LengthDist.model_validate(spec)
    a = draw_lengths(d, 4000, np.random.default_rng(1))
    assert a == draw_lengths(d, 4000, np.random.default_rng(1))
    assert a != draw_lengths(d, 4000, np.random.default_rng(2)) or spec["dist"] == "fixed"
    assert min(a) >= d.low and max(a) <= d.high
    if spec["dist"] == "lognormal":  # mean and std are the lengths' own, not their logarithm's
        assert np.mean(a) == pytest.approx(200, rel=0.1) and np.std(a) == pytest.approx(150, rel=0.2)
    if spec["dist"] == "normal":
        assert min(a) == 100 and max(a) == 260  # clipped to the bounds
    if spec["dist"] == "uniform":
        assert set(a) == set(range(10, 21))


def test_drawn_lengths_are_recorded_per_request(tokenizer):
    w = workload(input_tokens={"dist": "normal", "mean": 60, "std": 20, "min": 10, "max": 100},
                 output_tokens={"dist": "uniform", "min": 1, "max": 50}, num_requests=20)
    entries = make_prompts(tokenizer, w, 21, seed=0)
    assert len({len(e.token_ids) for e in entries}) > 5 and all(10 <= len(e.token_ids) <= 100 for e in entries)
    assert len({e.max_tokens for e in entries}) > 5 and all(1 <= e.max_tokens <= 50 for e in entries)


def test_every_repetition_draws_the_same_lengths(tokenizer):
    """A length distribution is drawn once for a repetition and repeated for every repetition (in the same order),
    so the spread between repetitions measures the machine, not the draw; the texts still differ (no prefix cache
    may make a later repetition faster). The warm-up, of another length, has its own draw."""
    w = workload(input_tokens={"dist": "lognormal", "mean": 40, "std": 20, "min": 8, "max": 120},
                 output_tokens={"dist": "uniform", "min": 1, "max": 64}, num_requests=10, warmup_requests=2)
    entries = make_prompts(tokenizer, w, 2 + 3 * 10, seed=0)
    reps = [entries[2 + 10 * k: 2 + 10 * (k + 1)] for k in range(3)]
    lengths = [[(len(e.token_ids), e.max_tokens) for e in rep] for rep in reps]
    assert lengths[0] == lengths[1] == lengths[2] and len(set(lengths[0])) > 5
    assert len({e.text for rep in reps for e in rep}) == 30


@pytest.mark.parametrize("spec, message", [
    ({"dist": "normal", "mean": 10, "std": 2}, "needs max"),
    ({"dist": "uniform", "min": 30, "max": 20}, "below min"),
    ({"dist": "fixed"}, "needs mean"),
])
def test_bad_distributions_are_refused_naming_the_field(write_scenario, tiny_model, spec, message):
    path = write_scenario(scenario_dict(tiny_model, [{"name": "hf", "kind": "transformers"}],
                                        [{"name": "w", "input_tokens": spec, "output_tokens": 4, "num_requests": 2}]))
    with pytest.raises(ScenarioError, match=rf"workloads\[0\]\.input_tokens.*{message}"):
        load_scenario(path)


def test_a_sweep_of_plain_numbers_still_expands():
    names = [c.spec.name for c in workload(input_tokens=[16, 32]).expand()]
    assert names == ["w[input_tokens=16]", "w[input_tokens=32]"]


# ---- files ----------------------------------------------------------------------------------------------------------

def file_entries(tokenizer, path, count=5, **source):
    return make_prompts(tokenizer, workload(prompts={"type": "file", "path": str(path), **source},
                                            **({"input_tokens": 12} if source.get("truncate") else {})), count, 0)


def test_text_file_one_prompt_per_line_in_order_then_again(tokenizer, tmp_path):
    (tmp_path / "p.txt").write_text("first question about the river\n\nsecond one\nthird <b>bold</b> & more\n")
    entries = file_entries(tokenizer, tmp_path / "p.txt")
    assert [e.text for e in entries] == ["first question about the river", "second one", "third <b>bold</b> & more",
                                         "first question about the river", "second one"]
    assert entries[0].token_ids == tokenizer.encode(entries[0].text)


def test_jsonl_prompts_with_output_lengths_and_truncation(tokenizer, tmp_path):
    rows = [{"prompt": " ".join(["the river"] * 40), "output_tokens": 7}, {"prompt": "short one", "output_tokens": 3}]
    (tmp_path / "p.jsonl").write_text("\n".join(map(json.dumps, rows)))
    entries = file_entries(tokenizer, tmp_path / "p.jsonl", 2, output_from="data", truncate=True)
    assert [e.max_tokens for e in entries] == [7, 3]
    assert len(entries[0].token_ids) == 12 and entries[1].text == "short one"  # cut to input_tokens; short kept


def test_jsonl_messages_are_rendered_with_the_chat_template(tokenizer, tmp_path):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "name a river"}]
    (tmp_path / "m.jsonl").write_text(json.dumps({"messages": messages}) + "\n")
    (entry, *_) = file_entries(tokenizer, tmp_path / "m.jsonl", 1)
    assert entry.messages == messages
    assert entry.text == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert entry.token_ids == tokenizer.encode(entry.text, add_special_tokens=False)  # the template has its BOS


def test_sharegpt_json_and_a_dataset_saved_to_disk(tokenizer, tmp_path):
    import datasets

    rows = [{"id": "a", "conversations": [{"from": "human", "value": "what is a river"},
                                          {"from": "gpt", "value": "water that flows in a long line"}]},
            {"id": "b", "conversations": [{"from": "gpt", "value": "an answer with no question"}]},  # unusable
            {"id": "c", "conversations": [{"from": "human", "value": "and a lake"}]}]  # no reply: workload's length
    (tmp_path / "sg.json").write_text(json.dumps(rows))
    entries = file_entries(tokenizer, tmp_path / "sg.json", 2, output_from="data")
    assert [e.text for e in entries] == ["what is a river", "and a lake"]
    assert entries[0].max_tokens == len(tokenizer.encode("water that flows in a long line", add_special_tokens=False))
    assert entries[1].max_tokens is None
    datasets.Dataset.from_list([{"prompt": "from disk one"}, {"prompt": "from disk two"}]).save_to_disk(
        str(tmp_path / "ds"))
    assert [e.text for e in file_entries(tokenizer, tmp_path / "ds", 2)] == ["from disk one", "from disk two"]


# ---- documents and shared prefixes ----------------------------------------------------------------------------------

MARKS = {"contract": ("MASTER SERVICES AGREEMENT", "1.1 "),
         "medical": ("PATIENT RECORD", "VISIT "), "log": ("Z INFO ", "com.acme.")}


@pytest.mark.parametrize("kind", ["contract", "medical", "log"])
def test_documents_are_shared_by_their_questions(tokenizer, kind):
    w = workload(input_tokens=1500, num_requests=6,
                 prompts={"type": "document", "kind": kind, "questions_per_document": 3})
    entries = make_prompts(tokenizer, w, 1 + 2 * 6, seed=0)  # a warm-up, then two repetitions of 6
    assert [e.group for e in entries] == [0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5][:13]
    for g in {e.group for e in entries}:
        members = [e for e in entries if e.group == g]
        assert len(members[0].token_ids) == 1500  # the first question's prompt is exact
        doc = members[0].text.split("\n\nQuestion: ")[0]
        assert all(m.text.startswith(doc + "\n\nQuestion: ") and m.text.endswith("\nAnswer:") for m in members)
        assert len({m.text for m in members}) == len(members)  # each asks something else
        shared = len(tokenizer.encode(doc)) - 1  # the document's tokens, less one its boundary may merge
        assert all(m.token_ids[:shared] == members[0].token_ids[:shared] for m in members)
    text = entries[1].text
    assert all(mark in text for mark in MARKS[kind])
    docs = {e.text.split("\n\nQuestion: ")[0] for e in entries}
    assert len(docs) == 5  # fresh per repetition: a prefix cache cannot carry one repetition into the next


def test_documents_reach_long_sizes_quickly(tokenizer):
    import time

    t = time.perf_counter()
    (entry,) = make_prompts(tokenizer, workload(input_tokens=32768, warmup_requests=0, num_requests=1,
                                                prompts={"type": "document", "kind": "log"}), 1, seed=0)
    assert len(entry.token_ids) == 32768 and "Traceback" in entry.text
    assert time.perf_counter() - t < 30


def test_documents_from_the_users_files(tokenizer, tmp_path):
    (tmp_path / "a.txt").write_text("the river " * 400)
    (tmp_path / "b.txt").write_text("a short memo")
    w = workload(input_tokens=200, num_requests=4, warmup_requests=0,
                 prompts={"type": "document", "files": [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")],
                          "questions_per_document": 2})
    entries = make_prompts(tokenizer, w, 4, seed=0)
    assert len(entries[0].token_ids) == 200 and entries[0].text.startswith("the river the river")
    assert entries[2].text.startswith("a short memo\n\nQuestion: ")  # shorter than input_tokens: sent whole


def test_shared_prefixes_are_shared_by_groups(tokenizer):
    w = workload(input_tokens=120, num_requests=6, warmup_requests=0,
                 prompts={"type": "shared_prefix", "prefixes": 2, "prefix_tokens": 80})
    entries = make_prompts(tokenizer, w, 12, seed=0)
    assert [e.group for e in entries] == [0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3]
    assert all(len(e.token_ids) == 120 for e in entries)
    for g in range(4):
        members = [e.token_ids for e in entries if e.group == g]
        assert all(m[:80] == members[0][:80] for m in members) and len({tuple(m) for m in members}) == 3
    assert entries[0].token_ids[:80] != entries[1].token_ids[:80]


def test_a_prefix_must_leave_room_for_the_suffix():
    with pytest.raises(ValueError, match="prefix_tokens"):
        workload(input_tokens=50, prompts={"type": "shared_prefix", "prefix_tokens": 50})


def test_a_tokenizer_that_cannot_reach_a_length_fails_the_cell_not_the_run(tokenizer):
    with pytest.raises(PromptError, match="no room"):
        make_prompts(tokenizer, workload(input_tokens=20,
                                         prompts={"type": "document", "kind": "contract"}), 2, seed=0)


# ---- checks up front: bench validate --------------------------------------------------------------------------------

def validate(path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", "validate", str(path)], capture_output=True,
                          text=True, cwd=ROOT)


def test_output_beyond_the_context_exits_2_naming_the_field(write_scenario, tiny_model):
    s = scenario_dict(tiny_model, [{"name": "hf", "kind": "transformers"}],
                      [{"name": "w", "input_tokens": 64, "output_tokens": 100000, "num_requests": 2}])
    s["models"] = {"tiny": {"synthetic": {"preset": "tiny-llama"}}}
    done = validate(write_scenario(s))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "workloads[0].output_tokens" in done.stderr and "4096-token context" in done.stderr


@pytest.mark.parametrize("backend, workload_, field, context", [
    ({"name": "hf", "kind": "transformers"}, {"input_tokens": 5000, "output_tokens": 8}, "input_tokens", "4096"),
    ({"name": "ll", "kind": "llama_cpp", "options": {"n_ctx": 256}}, {"input_tokens": 200, "output_tokens": 100},
     "output_tokens", "options.n_ctx"),
    ({"name": "v", "kind": "vllm", "options": {"max_model_len": 512}},
     {"input_tokens": {"dist": "uniform", "min": 10, "max": 500}, "output_tokens": 20}, "output_tokens",
     "options.max_model_len"),
    ({"name": "o", "kind": "own", "options": {"max_context": 300}}, {"input_tokens": 290, "output_tokens": 16},
     "output_tokens", "options.max_context"),
])
def test_context_from_config_json_or_the_backends_options(write_scenario, tiny_model, backend, workload_, field,
                                                          context):
    path = write_scenario(scenario_dict(tiny_model, [backend], [{"name": "w", "num_requests": 2, **workload_}]))
    with pytest.raises(ScenarioError, match=rf"workloads\[0\]\.{field}: .*{context}"):
        load_scenario(path)


def test_a_missing_or_empty_prompt_file_exits_2_naming_the_field(write_scenario, tiny_model, tmp_path):
    wl = [{"name": "w", "output_tokens": 4, "num_requests": 2, "prompts": {"type": "file", "path": "nope.jsonl"}}]
    done = validate(write_scenario(scenario_dict(tiny_model, [{"name": "hf", "kind": "transformers"}], wl)))
    assert done.returncode == 2 and "workloads[0].prompts.path" in done.stderr and "does not exist" in done.stderr
    (tmp_path / "empty.jsonl").write_text(json.dumps({"other": 1}) + "\n")
    wl[0]["prompts"]["path"] = "empty.jsonl"
    with pytest.raises(ScenarioError, match=r"workloads\[0\]\.prompts\.path: .*no usable rows"):
        load_scenario(write_scenario(scenario_dict(tiny_model, [{"name": "hf", "kind": "transformers"}], wl)))
    (tmp_path / "p.txt").write_text("a prompt\n")
    wl[0]["prompts"] |= {"path": "p.txt", "output_from": "data"}
    with pytest.raises(ScenarioError, match=r"workloads\[0\]\.prompts\.output_from"):
        load_scenario(write_scenario(scenario_dict(tiny_model, [{"name": "hf", "kind": "transformers"}], wl)))


def test_bench_schema_shows_the_keys():
    done = subprocess.run([sys.executable, "-m", "harness.cli", "schema"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0
    for key in ("questions_per_document", "prefix_tokens", "output_from", "truncate", "lognormal", "kind"):
        assert key in done.stdout, key


# ---- the scenarios shipped ------------------------------------------------------------------------------------------

def test_chat_dataset_scenario_reads_the_file_its_script_writes(tmp_path):
    out = tmp_path / "chat.json"
    subprocess.run([sys.executable, "scripts/make-chat-dataset.py", "--out", str(out), "--rows", "20"], cwd=ROOT,
                   check=True, capture_output=True)
    rows = json.loads(out.read_text())
    assert len(rows) == 20 and rows[0]["conversations"][0]["from"] == "human"
    scenario = yaml.safe_load((ROOT / "scenarios/chat-dataset.yaml").read_text())
    default = subprocess.run([sys.executable, "-c", "import runpy; print(runpy.run_path("
                              "'scripts/make-chat-dataset.py')['DEFAULT_OUT'])"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
    assert (ROOT / "scenarios" / scenario["workloads"][0]["prompts"]["path"]).resolve() == ROOT / default
    scenario["workloads"][0]["prompts"]["path"] = str(out)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(scenario))
    assert load_scenario(tmp_path / "s.yaml").workloads[0].prompts.output_from == "data"


def test_prompt_files_are_built_once_and_named_after_all_that_decides_them(write_scenario, tiny_model, tmp_path):
    from rich.console import Console

    from harness.records import PROMPT_FILE
    from harness.run.plan import CellPlanner

    (tmp_path / "p.txt").write_text("one\ntwo\n")
    wl = [{"name": n, "output_tokens": 4, "num_requests": 2, "prompts": {"type": "file", "path": "p.txt"}}
          for n in ("a", "b")]
    scenario = load_scenario(write_scenario(scenario_dict(tiny_model, [{"name": "hf", "kind": "transformers"}], wl)))
    planner = CellPlanner(scenario, tmp_path / "out", Console(quiet=True))
    path = planner.prompts_file("tiny", tiny_model, scenario.workload("a").spec)
    assert planner.prompts_file("tiny", tiny_model, scenario.workload("b").spec) == path  # the name decides nothing
    assert [e.text for e in PROMPT_FILE.validate_json(path.read_bytes())] == ["one", "two", "one"]  # warm-up first
    (tmp_path / "p.txt").write_text("three\n")
    again = planner.prompts_file("tiny", tiny_model, scenario.workload("a").spec)
    assert again != path and [e.text for e in PROMPT_FILE.validate_json(again.read_bytes())] == ["three"] * 3
