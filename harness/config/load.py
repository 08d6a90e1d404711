"""Loading a scenario file: YAML, validation into `Scenario`, and the checks that need the file system or the network.
Every user mistake raises ScenarioError naming the file and the field."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

import yaml
from pydantic import ValidationError

from harness.config.scenario import Scenario
from harness.core.errors import UserError


class ScenarioError(UserError):
    """A user mistake in a scenario: printed without a traceback, exit code 2."""


# ---- loading ------------------------------------------------------------------------------------------------------

_UNION_MEMBER = re.compile(r"^(int|float|str|bool|list\[.*\]|constrained-.*|function-.*)$")


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _UNION_MEMBER.match(part) or (part in ("sequential", "concurrency", "poisson", "synthetic")
                                           and out.endswith(("load", "prompts"))):
            continue  # pydantic's union tags add noise to the path the user sees
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def format_validation_error(source: str, err: ValidationError, prefix: str = "") -> str:
    """One line per field: 'file: field: what was expected (got ...)'; union alternatives joined with 'or'."""
    problems: dict[str, list[str]] = {}
    for e in err.errors():
        where = _loc(tuple(e["loc"]))
        where = f"{prefix}.{where}" if prefix and where != "(top level)" else (prefix or where)
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        got = "" if e["type"] in ("missing", "extra_forbidden") else f" (got {e['input']!r:.80})"
        if msg + got not in problems.setdefault(where, []):
            problems[where].append(msg + got)
    return "\n".join([f"{source}: invalid scenario"] + [f"  {w}: {' or '.join(m)}" for w, m in problems.items()])


def load_scenario(path: Path | str) -> Scenario:
    """Parse and fully validate a scenario; every user mistake raises ScenarioError naming file and field."""
    path = Path(path)
    if not path.is_file():
        raise ScenarioError(f"{path}: no such scenario file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ScenarioError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        raise ScenarioError(f"{path}: the file is empty; expected a mapping with name, models, backends, workloads")
    if not isinstance(data, dict):
        raise ScenarioError(f"{path}: the top level must be a mapping (name, models, backends, ...), got a {type(data).__name__}")
    try:
        scenario = Scenario.model_validate(data)
    except ValidationError as e:
        raise ScenarioError(format_validation_error(str(path), e)) from None
    _resolve_paths(scenario, path.parent)
    _check_backends(scenario, str(path))
    return scenario


def _resolve_paths(scenario: Scenario, base: Path) -> None:
    for name, m in scenario.models.items():
        if m.path is not None:
            m.path = (base / m.path).expanduser().resolve() if not m.path.is_absolute() else m.path
    for b in scenario.backends:
        if b.python is not None and not b.python.is_absolute():
            # Normalized but not resolved: a venv's python is a symlink to the base interpreter, which lacks the venv.
            b.python = Path(os.path.normpath(base.absolute() / b.python))


def _check_backends(scenario: Scenario, source: str) -> None:
    from backends.registry import UnknownVariant, get_backend_class, known_kinds

    for name, m in scenario.models.items():
        if m.path is not None and not (m.path / "config.json").is_file():
            raise ScenarioError(f"{source}: models.{name}.path: expected an HF model folder with config.json, "
                                f"but {m.path} {'has none' if m.path.is_dir() else 'does not exist'}")
    for i, b in enumerate(scenario.backends):
        where = f"{source}: backends[{i}]"
        try:
            cls = get_backend_class(b.kind, b.options)
        except KeyError:
            raise ScenarioError(f"{where}.kind: unknown backend kind {b.kind!r}; known: {', '.join(known_kinds())}") from None
        except UnknownVariant as e:  # its message starts with the option's path under the backend
            raise ScenarioError(f"{where}.{e}") from None
        try:
            cls.Options.model_validate(b.options)
        except ValidationError as e:
            raise ScenarioError(format_validation_error(source, e, prefix=f"backends[{i}].options")) from None
        problem = cls.check_spec(b)
        if problem:
            raise ScenarioError(f"{where}: {problem}")
        if b.python is not None and not b.python.is_file():
            raise ScenarioError(f"{where}.python: expected a Python interpreter, {b.python} does not exist")


def check_reachable(scenario: Scenario, source: str, timeout: float = 3.0) -> None:
    """Attached servers must answer before anything runs: a typo in a URL should not cost a whole matrix."""
    for i, b in enumerate(scenario.backends):
        if b.url is None:
            continue
        u = urlparse(b.url)
        port = u.port or (443 if u.scheme == "https" else 80)
        try:
            socket.create_connection((u.hostname, port), timeout=timeout).close()
        except OSError as e:
            raise ScenarioError(f"{source}: backends[{i}].url: cannot reach {b.url}: {e.strerror or e}") from None
