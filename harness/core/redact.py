"""Secret values kept out of every file the harness writes (results.json, cell.json, worker.json, logs, the reports).

A name is secret when its last word ends in TOKEN, KEY(S), SECRET(S), PASSWORD(S), PASSWD, PASSPHRASE,
AUTHORIZATION, AUTH, CREDENTIAL(S) or COOKIE(S), in any case and any spelling of words (HF_TOKEN, api_key, apiKey,
x-api-key, DB_PASSWORD, api_keys, credentials); not when its last word says something else (`chunk_token_ids`,
`token_counts`, `num_key_value_heads`), only points at a secret (`api_key_env`, `HF_TOKEN_PATH`) or is the unit of
a rate (`bytes_per_token`).

Masked, found by key or by shape:
- every value under a secret key (strings and numbers, and everything inside a list or mapping under one);
- the value after a secret flag in an argv list (`--api-key VALUE`, `--api-key=VALUE`);
- inside any string: a URL's user part when it has no password (`https://TOKEN@host`), its password
  (`https://user:PASSWORD@host`), `NAME=value` with a secret NAME (`HF_TOKEN=...`, `?api_key=...`), a header or
  mapping entry (`Authorization: Bearer ...`, `"api_key": "..."`) and a secret flag followed by its value;
- by value: every secret found so far, and the values of this process's environment variables with secret names,
  wherever they appear in a later string (an error message or log line that quotes one).

The worker still needs the real values: the runner hands it the unredacted plan on its stdin, never in a file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

MASK = "***"
_SECRET_WORDS = ("TOKEN", "KEY", "KEYS", "SECRET", "SECRETS", "PASSWORD", "PASSWORDS", "PASSWD", "PASSPHRASE",
                 "AUTHORIZATION", "AUTH", "CREDENTIAL", "CREDENTIALS", "COOKIE", "COOKIES")
_POINTER_WORDS = {"ENV", "VAR", "NAME", "FILE", "PATH", "DIR"}  # api_key_env: where a secret is, not the secret
_WORD = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z0-9]+(?![a-z])")
_MIN_SCRUBBED = 4  # shorter values would mask innocent text wherever they occur
_MIN_FROM_ENVIRONMENT = 8  # an environment's secret-named flags (USE_AUTH=true) are no secrets: real ones are long

_URL_USERINFO = re.compile(r"(?<=://)(?P<user>[^/:@\s\"']*)(?::(?P<password>[^/@\s\"']*))?@")
_ASSIGNMENT = re.compile(r"(?P<name>[A-Za-z_][\w.-]*)=(?P<value>[^\s&'\"#,;]+)")
_ENTRY = re.compile(r"(?P<quote>[\"']?)(?P<name>[A-Za-z][\w-]*)(?P=quote)\s*:\s*"
                    r"(?P<scheme>(?:Bearer|Basic|Token|Digest)\s+)?[\"']?(?P<value>[^\s\"',;{}\[\]]+)")
_FLAG = re.compile(r"(?<![\w-])(?P<name>--?[A-Za-z][\w-]*)\s+[\"']?(?P<value>[^\s\"'-][^\s\"']*)")


def _words(name: str) -> list[str]:
    return [w.upper() for w in _WORD.findall(name)]


def is_secret_name(name: str) -> bool:
    words = _words(name)
    return (bool(words) and words[-1] not in _POINTER_WORDS and words[-1].endswith(_SECRET_WORDS)
            and words[-2:-1] != ["PER"])


def _entry_name(m: re.Match[str]) -> bool:
    """A `name: value` entry is a header or a mapping's, not prose ("first token: 12 ms"): the name is quoted,
    capitalized (Authorization) or spelled with - or _ (x-api-key, api_key)."""
    name = m["name"]
    return bool(m["quote"]) or name[0].isupper() or "-" in name or "_" in name


class Redactor:
    """Masks secrets in JSON-like data or text; the values it found are masked in every later string too. The
    values of this process's secret-named environment variables are known from the start."""

    def __init__(self, *sources: Any, environ: Mapping[str, str] | None = None):
        self.values: set[str] = set()
        for name, value in (os.environ if environ is None else environ).items():
            if is_secret_name(name) and len(value) >= _MIN_FROM_ENVIRONMENT:
                self.values.add(value)
        for source in sources:
            self(source)

    def __call__(self, data: Any) -> Any:
        """A copy of data with every secret masked."""
        self._walk(data, False)  # first find every secret in it: a string seen before the key that names its value
        return self._walk(data, False)

    def _walk(self, data: Any, secret: bool) -> Any:
        if isinstance(data, dict):
            return {k: self._walk(v, secret or is_secret_name(str(k))) for k, v in data.items()}
        if isinstance(data, (list, tuple)):
            return [self._walk(item, True) for item in data] if secret else self._list(data)
        if secret and isinstance(data, str):
            return self._mask(data)
        if secret and isinstance(data, (int, float)) and not isinstance(data, bool):
            return self._mask(str(data))
        if isinstance(data, str):
            return self._scrub(data)
        return data

    def _list(self, items: list[Any] | tuple[Any, ...]) -> list[Any]:
        out: list[Any] = []
        flag_before = False
        for item in items:
            if isinstance(item, str) and flag_before:
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
            out.append(self._walk(item, False))
        return out

    def _mask(self, value: str) -> str:
        if len(value) >= _MIN_SCRUBBED and value != MASK:
            self.values.add(value)
        return MASK

    def _scrub(self, text: str) -> str:
        text = _URL_USERINFO.sub(self._userinfo, text)
        text = _ASSIGNMENT.sub(lambda m: self._named(m, True), text)
        text = _ENTRY.sub(lambda m: self._named(m, _entry_name(m)), text)
        text = _FLAG.sub(lambda m: self._named(m, True), text)
        for value in sorted(self.values, key=len, reverse=True):
            if value in text:
                text = text.replace(value, MASK)
        return text

    def _userinfo(self, m: re.Match[str]) -> str:
        if m["password"] is not None:  # user:password@ - the user is a name, the password the secret
            return f"{m['user']}:{self._mask(m['password']) if m['password'] else ''}@"
        return f"{self._mask(m['user']) if m['user'] else ''}@"  # TOKEN@: the user part is the credential

    def _named(self, m: re.Match[str], applies: bool) -> str:
        if not applies or m["value"] == MASK or not is_secret_name(m["name"].lstrip("-")):
            return m[0]
        start, end = m.span("value")
        return m[0][:start - m.start()] + self._mask(m["value"]) + m[0][end - m.start():]


def secret_variable(name: str) -> str:
    """The environment variable a masked value under `name` (a key or a flag) is taken from where it runs:
    HF_TOKEN for HF_TOKEN, API_KEY for api_key and --api-key."""
    return re.sub(r"\W", "_", name.lstrip("-")).upper()


def restore(data: Any, environ: Mapping[str, str]) -> tuple[Any, list[str]]:
    """`data` as a Redactor masked it, each masked value under a secret key or after a secret flag put back from the
    variable of that name in `environ` (secret_variable): for a machine that gets the masked data and keeps the
    secrets in its own environment (a Ray node). Also returns what could not be put back: the variables missing,
    and strings with a secret masked inside them (a URL's password), which have no name to look up."""
    missing: list[str] = []

    def value(name: str) -> str:
        variable = secret_variable(name)
        if variable not in environ:
            missing.append(variable)
            return MASK
        return environ[variable]

    def walk(item: Any, key: str | None) -> Any:
        if isinstance(item, dict):
            return {k: walk(v, str(k)) for k, v in item.items()}
        if isinstance(item, list):
            out: list[Any] = []
            flag: str | None = None
            for x in item:
                if x == MASK and (name := flag or key):
                    out.append(value(name))
                elif isinstance(x, str) and x.startswith("-") and x.endswith("=" + MASK):
                    out.append(x.removesuffix(MASK) + value(x.partition("=")[0]))
                else:
                    out.append(walk(x, None))
                flag = x if isinstance(x, str) and x.startswith("-") and "=" not in x and is_secret_name(x) else None
            return out
        if item == MASK and key is not None:
            return value(key)
        if isinstance(item, str) and MASK in item:
            missing.append(f"a secret inside {item[:60]!r}")
        return item

    return walk(data, None), missing
