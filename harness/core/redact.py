"""Secret values kept out of every file the harness writes (results.json, cell.json, worker.json, the reports).

A value is secret when the key it is stored under has a word that ends in TOKEN, KEY, SECRET, PASSWORD, PASSWD or
AUTHORIZATION, in any case and any spelling of words (HF_TOKEN, api_key, apiKey, x-api-key, DB_PASSWORD; not when
its last word says it only points at one: api_key_env, HF_TOKEN_PATH), when it follows such a flag in an argv list
(`--api-key VALUE`, `--api-key=VALUE`), or when it is the password of a URL (`https://user:PASSWORD@host`). Strings are masked wherever those rules find them; numbers only when the key's last
word is secret (`num_key_value_heads: 8` stays). Once found, a secret value is also masked inside any other string
(an error message or log tail that quotes it).

The worker still needs the real values: the runner hands it the unredacted plan on its stdin, never in a file.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"
_SECRET_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "PASSWD", "AUTHORIZATION")
_POINTER_WORDS = {"ENV", "VAR", "NAME", "FILE", "PATH", "DIR"}  # api_key_env: where a secret is, not the secret
_WORD = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z0-9]+(?![a-z])")
_URL_PASSWORD = re.compile(r"(?<=://)([^/:@\s]*):([^/@\s]+)@")
_MIN_SCRUBBED = 4  # shorter values would mask innocent text wherever they occur


def _words(name: str) -> list[str]:
    return [w.upper() for w in _WORD.findall(name)]


def is_secret_name(name: str) -> bool:
    words = _words(name)
    if words and words[-1] in _POINTER_WORDS:
        return False
    return any(w.endswith(_SECRET_WORDS) for w in words)


def _last_word_secret(name: str) -> bool:
    words = _words(name)
    return bool(words) and words[-1].endswith(_SECRET_WORDS)


class Redactor:
    """Masks secrets in JSON-like data; the values it found are masked in every later string too."""

    def __init__(self, *sources: Any):
        self.values: set[str] = set()
        for source in sources:
            self(source)

    def __call__(self, data: Any) -> Any:
        """A copy of data with every secret masked."""
        self._walk(data, None)  # first find every secret in it: a string seen before the key that names its value
        return self._walk(data, None)

    def _walk(self, data: Any, key: str | None) -> Any:
        if isinstance(data, dict):
            return {k: self._walk(v, str(k)) for k, v in data.items()}
        if isinstance(data, (list, tuple)):
            return self._list(data, key)
        if key is not None and is_secret_name(key) and isinstance(data, str):
            return self._mask(data)
        if key is not None and _last_word_secret(key) and isinstance(data, (int, float)) and not isinstance(data, bool):
            return self._mask(str(data))
        if isinstance(data, str):
            return self._scrub(data)
        return data

    def _list(self, items: list | tuple, key: str | None) -> list:
        out: list = []
        flag_before = False
        for item in items:
            if isinstance(item, str) and (flag_before or (key is not None and is_secret_name(key))):
                out.append(self._mask(item))
                flag_before = False
                continue
            if isinstance(item, str) and item.startswith("-"):
                name, eq, value = item.lstrip("-").partition("=")
                if is_secret_name(name):
                    out.append(f"{item[:len(item) - len(value)]}{self._mask(value)}" if eq else item)
                    flag_before = not eq
                    continue
            flag_before = False
            out.append(self._walk(item, None))
        return out

    def _mask(self, value: str) -> str:
        if value and value != MASK:
            self.values.add(value)
        return MASK

    def _scrub(self, text: str) -> str:
        for m in _URL_PASSWORD.finditer(text):
            self.values.add(m[2])
        text = _URL_PASSWORD.sub(lambda m: f"{m[1]}:{MASK}@", text)
        for value in sorted(self.values, key=len, reverse=True):
            if len(value) >= _MIN_SCRUBBED:
                text = text.replace(value, MASK)
        return text
