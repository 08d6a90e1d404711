"""Seeded prompts of an exact token length in the model's own tokenizer.

Prompts are built from words that are single tokens in that tokenizer, with and without a leading space, so
the length is exact by construction; the result is checked by re-encoding. Two runs with the same seed send
the same prompts to every backend.

They are built in a subprocess of the runner (`python -m harness.inputs.prompts`), under the cell's timeout once the
tokenizer is loaded: the runner never loads a tokenizer, so it stays small, and a huge num_requests cannot stall it
outside any timeout.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from harness.core.errors import BackendError
from harness.core.files import atomic_write

# Common English words: single tokens in real tokenizers, and the seed corpus of our synthetic ones.
WORDS = """the of and to in is was for on that with as by at from his it an were are which this be or has had not
but first one their its new after who they have her she two been other when there all during into school time may
years more most only over city some world would where later up such used many can state about national out known
university united then made team long three part between well since would both under year early war these while
game series new high work film music then name people group home played back around area second main number south
north based life four river season since under city county end field line water house park road power family small
west east large public later light great old order form left day night sea land book word point story art air car
case city world song band city hand head life page plan rule side sound space study test town unit view wall way
week white black red blue green gold king law love man men model open paper place price rate real rock role room
show stage star store track trade tree turn voice wave wind wood young lake hill ship club data note food""".split()
WORDS = list(dict.fromkeys(WORDS))


class PromptError(BackendError):
    """The prompts cannot be built: the cell fails with this message, the others run."""


@dataclass
class Prompt:
    text: str
    token_ids: list[int]

    def to_dict(self) -> dict:
        return asdict(self)


def single_token_words(tokenizer) -> list[str]:
    def one(text: str) -> bool:
        return len(tokenizer.encode(text, add_special_tokens=False)) == 1

    return [w for w in WORDS if one(w) and one(" " + w)]


def make_prompts(tokenizer, count: int, input_tokens: int, seed: int) -> list[Prompt]:
    """`count` prompts of exactly `input_tokens` tokens, special tokens the tokenizer adds included."""
    n_special = len(tokenizer.encode("hello", add_special_tokens=True)) - len(tokenizer.encode("hello", add_special_tokens=False))
    n_words = input_tokens - n_special
    if n_words < 1:
        raise PromptError(f"input_tokens={input_tokens} leaves no room for text after {n_special} special token(s)")
    words = single_token_words(tokenizer)
    if len(words) < 20:
        raise PromptError(f"the tokenizer has only {len(words)} single-token common words; cannot build exact prompts")
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(count):
        text = " ".join(rng.choice(words, size=n_words))
        ids = tokenizer.encode(text, add_special_tokens=True)
        if len(ids) != input_tokens:
            raise PromptError(f"built a prompt of {len(ids)} tokens instead of {input_tokens}: the tokenizer merges across words")
        prompts.append(Prompt(text, ids))
    return prompts


def write_prompts(path: Path, model_path: Path, count: int, input_tokens: int, seed: int) -> None:
    """Build the prompts with the model's own tokenizer and write them (text, token_ids) to `path`; says "tokenizer
    loaded" on stdout before building (the runner times building apart from loading)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        print("tokenizer loaded", flush=True)
        prompts = make_prompts(tokenizer, count, input_tokens, seed)
    except (OSError, ValueError) as e:
        raise PromptError(str(e)) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps([p.to_dict() for p in prompts]))


if __name__ == "__main__":  # python -m harness.inputs.prompts PATH MODEL_PATH COUNT INPUT_TOKENS SEED
    try:
        write_prompts(Path(sys.argv[1]), Path(sys.argv[2]), *map(int, sys.argv[3:6]))
    except PromptError as e:
        print(e, file=sys.stderr)
        sys.exit(2)
