"""Texts of an exact length in one tokenizer: filler text, cutting a text to n tokens, and building a prompt
(head + filler, or a document cut before its question) whose encoding has exactly n tokens, special tokens included.

Filler is common English words where each is one token in the tokenizer, with and without a leading space (then
the length is exact by construction). Otherwise, as vLLM's random dataset does, it is tokens drawn from the
tokenizer's own vocabulary (special tokens skipped), decoded, re-encoded and repaired to the length.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from harness.core.errors import BackendError

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
MIN_WORDS = 20  # fewer single-token words make prompts too repetitive: the vocabulary is used instead
REPAIRS = 12  # re-encodings tried before a length is given up on; two or three suffice in practice


class PromptError(BackendError):
    """The prompts cannot be built: the cell fails with this message, the others run."""


def single_token_words(tokenizer) -> list[str]:
    special = set(tokenizer.all_special_ids)  # an unknown word is one token too: the unknown token

    def one(text: str) -> bool:
        ids = tokenizer.encode(text, add_special_tokens=False)
        return len(ids) == 1 and ids[0] not in special

    return [w for w in WORDS if one(w) and one(" " + w)]


def vocabulary(tokenizer) -> np.ndarray:
    """Ids of the ordinary tokens that decode to visible text which encodes back to that one token: no special or
    added tokens, no partial UTF-8, no word-piece continuations that mean nothing alone."""
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    ids = [i for i in range(len(tokenizer)) if i not in special]
    texts = tokenizer.batch_decode([[i] for i in ids])
    again = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return np.array([i for i, t, a in zip(ids, texts, again)
                     if a == [i] and t.strip() and "\ufffd" not in t and t.isprintable()])


class Exact:
    """Exact-length texts in `tokenizer`, with filler drawn from `rng`."""

    def __init__(self, tokenizer, rng: np.random.Generator):
        self.tokenizer, self.rng = tokenizer, rng
        self.n_special = (len(tokenizer.encode("hello", add_special_tokens=True))
                          - len(tokenizer.encode("hello", add_special_tokens=False)))
        self.words = single_token_words(tokenizer)
        self.vocab = vocabulary(tokenizer) if len(self.words) < MIN_WORDS else None
        if self.vocab is not None and len(self.vocab) < MIN_WORDS:
            raise PromptError(f"the tokenizer has only {len(self.vocab)} ordinary tokens that decode to text")

    def count(self, text: str) -> int:
        """Tokens of a whole prompt, special tokens the tokenizer adds included."""
        return len(self.tokenizer.encode(text, add_special_tokens=True))

    def filler(self, n: int) -> str:
        """About n tokens of seeded text (exactly n with single-token words)."""
        if self.vocab is None:
            return " ".join(self.rng.choice(self.words, size=n))
        return self.tokenizer.decode(self.rng.choice(self.vocab, size=n).tolist())

    def cut(self, text: str, n: int) -> str:
        """The text's first n tokens (no special tokens), as text."""
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return text if len(ids) <= n else self.tokenizer.decode(ids[:n])

    def fit(self, build: Callable[[int], str], total: int, start: int, what: str) -> str:
        """A prompt of exactly `total` tokens: build(k) must grow with k (the tokens of its variable part), tried
        from `start`; k moves by the difference until the encoding has `total` tokens."""
        k, tried = start, set()
        for _ in range(REPAIRS):
            if k < 0:
                break
            text = build(k)
            got = self.count(text)
            if got == total:
                return text
            tried.add(k)
            # The difference, or one step when that was tried: merges at a boundary can move the count by more.
            step = total - got
            k = k + step if k + step not in tried else k + (1 if step > 0 else -1)
        raise PromptError(f"cannot build {what} of exactly {total} tokens in this tokenizer (its merges across the "
                          f"boundary keep changing the count)")

    def padded(self, head: str, total: int, what: str) -> str:
        """head, a space, then seeded filler: exactly `total` tokens in all."""
        used = self.n_special + (self.count_plain(head) + 1 if head else 0)
        if used >= total:
            raise PromptError(f"{what} of {total} tokens leaves no room for text after {used} of prefix and special "
                              f"tokens")
        # Drawn vocabulary re-encodes to fewer tokens than were drawn: draw twice what is needed, the fitter cuts.
        filler = self.filler((total - used) * (1 if self.vocab is None else 2) + 16)
        head = head + " " if head else ""
        return self.fit(lambda k: head + self.cut(filler, k), total, total - used, what)

    def count_plain(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=True)
