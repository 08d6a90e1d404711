"""Loading a scenario file: YAML, validation into `Scenario`, and the checks that need the file system or the network.
Every user mistake raises ScenarioError naming the file and the field."""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml
from pydantic import ValidationError

from harness.config.prompt_checks import (PromptCheckError, check_context, check_prompt_files,
                                          resolve_prompt_paths)
from harness.config.scenario import Scenario, TraceLoad
from harness.core.errors import UserError


class ScenarioError(UserError):
    """A user mistake in a scenario: printed without a traceback, exit code 2."""


# ---- loading ------------------------------------------------------------------------------------------------------

_UNION_MEMBER = re.compile(r"^(int|float|str|bool|list\[.*\]|constrained-.*|function-.*|LengthDist)$")


def _loc(loc: tuple) -> str:
    out, previous = "", None
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _UNION_MEMBER.match(part) or (part in ("sequential", "concurrency", "poisson", "trace", "capacity",
                                                    "synthetic", "file", "document", "shared_prefix", "conversation")
                                           and previous in ("load", "prompts")):
            pass  # pydantic's union tags add noise to the path the user sees (the tag only: load.concurrency stays)
        else:
            out += f".{part}" if out else str(part)
        previous = part
    return out or "(top level)"


_BRANCH_KINDS = (("list[", "list", "a list (a sweep over its values)"), ("bool", "bool", "true or false"),
                 ("int", "int", "an integer"), ("float", "float", "a number"), ("str", "str", "a string"))


_MODEL_WORDS = {"LengthDist": "a length distribution ({dist: ..., ...})",
                "ThinkTime": "a think-time distribution ({dist: ..., ...})"}


def _branch(tag: str) -> tuple[str, str]:
    """(the JSON type a union member takes, how to say it): 'constrained-int' → an integer, a model → a mapping."""
    for marker, kind, words in _BRANCH_KINDS:
        if tag.startswith(marker) or tag.removeprefix("constrained-").startswith(marker):
            return kind, words
    model = tag.rsplit(", ", 1)[-1].rstrip("]")
    return "dict", _MODEL_WORDS.get(model, f"a mapping ({model})")


def _kind(value: Any) -> str:
    return {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "dict"}.get(type(value), "?")


def union_errors(errors: list[dict]) -> list[dict]:
    """Of the errors of a value that matches none of a union's members, those of the member that takes the value's
    type (a mapping → the mapping's own complaint, not "should be a valid integer"); where no member takes it, one
    error listing what would have been taken."""
    groups: dict[tuple, list[tuple[int, dict]]] = {}
    for e in errors:
        at = next((i for i, p in enumerate(e["loc"]) if isinstance(p, str) and _UNION_MEMBER.match(p)), None)
        groups.setdefault(e["loc"][:at] if at is not None else e["loc"], []).append((at, e))
    out = []
    for where, members in groups.items():
        if members[0][0] is None or len({e["loc"][at] for at, e in members}) < 2:
            out += [e for _, e in members]
            continue
        value = next((e["input"] for at, e in members if len(e["loc"]) == at + 1), None)
        fits = [e for at, e in members if _branch(e["loc"][at])[0] in (_kind(value), "float" if _kind(value) == "int"
                                                                         else None)]
        if fits:
            out += fits
        else:
            taken = dict.fromkeys(_branch(e["loc"][at])[1] for at, e in members)
            out.append({"loc": where, "type": "union", "msg": f"expected {' or '.join(taken)}", "input": value})
    return out


def format_validation_error(source: str, err: ValidationError, prefix: str = "") -> str:
    """One line per field: 'file: field: what was expected (got ...)'; of a union's members, the one that takes the
    value's type says what is wrong (union_errors)."""
    problems: dict[str, list[str]] = {}
    for e in union_errors(err.errors()):
        where = _loc(tuple(e["loc"]))
        where = f"{prefix}.{where}" if prefix and where != "(top level)" else (prefix or where)
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        # A check of the whole scenario (no field) names what it refuses itself: its input is the whole file.
        got = "" if e["type"] in ("missing", "extra_forbidden") or not e["loc"] else f" (got {e['input']!r:.80})"
        if msg + got not in problems.setdefault(where, []):
            problems[where].append(msg + got)
    return "\n".join([f"{source}: invalid scenario"] + [f"  {w}: {' or '.join(m)}" for w, m in problems.items()])


# ---- YAML with limits ---------------------------------------------------------------------------------------------

MAX_DEPTH = 64  # nested mappings and lists, aliases expanded; real scenarios use fewer than 10
MAX_VALUES = 100_000  # values once every alias is expanded where it is used: an alias bomb is refused, not expanded
MAX_EXPANDED_BYTES = 8 * 2**20  # the text of every value, aliases expanded: a long string aliased a thousand times
MAX_FILE_BYTES = 8 * 2**20  # a scenario, gate policy or guide rules file; prompts and traces live in files of their own
MAX_INT_CHARS = 30  # an integer literal longer than this is no count, size or seed anyone means


class _LimitedLoader(yaml.SafeLoader):
    """PyYAML's safe loader with limits: nesting depth, size with aliases expanded, no recursive aliases, no
    duplicate keys, no giant integers. Each refusal is a MarkedYAMLError, so it names the line like a syntax error."""

    def __init__(self, stream):
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent, index):
        # The composer recurses once per level: without a limit, deep nesting ends in a RecursionError.
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # keys a merge (<<) brings in may be overridden: that is what merges are for
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:
                continue  # an unhashable key: the safe constructor refuses it with its own message
            if first is not None:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r:.60} (first given on "
                                                        f"line {first + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node):
        if len(node.value) > MAX_INT_CHARS:
            raise yaml.constructor.ConstructorError(None, None, f"an integer of {len(node.value)} characters is too "
                                                    f"large", node.start_mark)
        return super().construct_yaml_int(node)


_LimitedLoader.add_constructor("tag:yaml.org,2002:int", _LimitedLoader.construct_yaml_int)


def _check_expansion(root: yaml.Node) -> None:
    """Refuse an alias that contains itself, and a document whose aliases expand beyond MAX_VALUES values,
    MAX_EXPANDED_BYTES of text or MAX_DEPTH levels. Sizes are counted per distinct node (memoized), so an alias bomb
    costs linear time here."""
    size: dict[int, int] = {}
    nbytes: dict[int, int] = {}
    depth: dict[int, int] = {}
    open_nodes: set[int] = set()  # the path from the root: an alias back into it is recursive
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        children = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode)
                    else node.value if isinstance(node, yaml.SequenceNode) else [])
        if finished:
            open_nodes.discard(key)
            size[key] = 1 + sum(size[id(c)] for c in children)
            nbytes[key] = (len(node.value) if isinstance(node, yaml.ScalarNode) else 0) + sum(nbytes[id(c)]
                                                                                            for c in children)
            depth[key] = 1 + max((depth[id(c)] for c in children), default=0)
            what = (f"more than {MAX_VALUES:,} values" if size[key] > MAX_VALUES else
                    f"more than {MAX_EXPANDED_BYTES // 2**20} MiB of text" if nbytes[key] > MAX_EXPANDED_BYTES else
                    f"more than {MAX_DEPTH} levels" if depth[key] > MAX_DEPTH else None)
            if what:
                raise yaml.composer.ComposerError(None, None, f"with its aliases expanded this is {what}",
                                                  node.start_mark)
        elif key in open_nodes:
            raise yaml.composer.ComposerError(None, None, "an alias refers to a value that contains it (recursive)",
                                              node.start_mark)
        elif key not in size:
            open_nodes.add(key)
            stack.append((node, True))
            stack += [(c, False) for c in children]


def load_yaml(text: str):
    """safe_load within the limits above; raises yaml.YAMLError, or ValueError for a value it parses but cannot
    hold (a date out of range)."""
    loader = _LimitedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def load_yaml_file(path: Path, what: str, error: type[UserError] = UserError):
    """A YAML file (a scenario, gate policy, guide rules) read and parsed within the limits above: at most
    MAX_FILE_BYTES, UTF-8 text, load_yaml. Every problem raises `error` naming the file and `what` it should be."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise error(f"{str(path)[:200]}: no such {what} file") from None
    except OSError as e:
        raise error(f"{str(path)[:200]}: cannot read the {what} file: {e.strerror or e}") from None
    except ValueError:  # a NUL byte in the path
        raise error(f"{str(path)[:200]!r}: not a usable file name (it holds a NUL byte)") from None
    if len(raw) > MAX_FILE_BYTES:
        raise error(f"{path}: larger than {MAX_FILE_BYTES // 2**20} MiB: not a {what} file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.start}): not a {what} file") from None
    try:
        return load_yaml(text)
    except (yaml.YAMLError, ValueError) as e:  # ValueError: a tagged or timestamp-like value that is none (2001-02-30)
        raise error(f"{path}: not valid YAML: {e}") from None


def load_scenario(path: Path | str) -> Scenario:
    """Parse and fully validate a scenario; every user mistake raises ScenarioError naming file and field."""
    path = Path(path)
    data = load_yaml_file(path, "scenario", ScenarioError)
    if data is None:
        raise ScenarioError(f"{path}: the file is empty; expected a mapping with name, models, backends, workloads")
    if not isinstance(data, dict):
        raise ScenarioError(f"{path}: the top level must be a mapping (name, models, backends, ...), got a {type(data).__name__}")
    if (where := _nul_byte(data)) is not None:
        raise ScenarioError(f"{path}: {where or '(a key)'}: holds a NUL byte, which no file name, URL or option can")
    try:
        scenario = Scenario.model_validate(data)
    except ValidationError as e:
        raise ScenarioError(format_validation_error(str(path), e)) from None
    _resolve_paths(scenario, path.parent)
    resolve_prompt_paths(scenario, path.parent)
    _check_backends(scenario, str(path))
    _check_traces(scenario, str(path))  # before the context check, which reads a trace's lengths
    try:
        check_prompt_files(scenario, str(path))
        check_context(scenario, str(path))
    except PromptCheckError as e:
        raise ScenarioError(str(e)) from None
    return scenario


def _nul_byte(data, where: str = "") -> str | None:
    """Where the first string holding a NUL byte is (the operating system refuses it in paths and arguments)."""
    if isinstance(data, str):
        return where if "\0" in data else None
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        if isinstance(key, str) and "\0" in key:
            return where
        inner = f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}" if where else str(key)
        if (found := _nul_byte(value, inner)) is not None:
            return found
    return None


def _resolve_paths(scenario: Scenario, base: Path) -> None:
    for name, m in scenario.models.items():
        if m.path is not None:
            m.path = (base / m.path).expanduser().resolve() if not m.path.is_absolute() else m.path
    for w in scenario.workloads:
        if isinstance(w.load, TraceLoad):
            w.load.path = (base / w.load.path.expanduser()).resolve()
    for b in scenario.backends:
        if b.python is not None and not b.python.is_absolute():
            # Normalized but not resolved: a venv's python is a symlink to the base interpreter, which lacks the venv.
            b.python = Path(os.path.normpath(base.absolute() / b.python))


def _check_backends(scenario: Scenario, source: str) -> None:
    from backends.registry import UnknownVariant, get_backend_class, known_kinds

    for name, m in scenario.models.items():
        if m.path is not None and not _is_file(m.path / "config.json", f"{source}: models.{name}.path"):
            raise ScenarioError(f"{source}: models.{name}.path: expected an HF model folder with config.json, "
                                f"but {m.path} {'has none' if m.path.is_dir() else 'does not exist'}")
        if m.path is not None:
            _check_model_config(m.path / "config.json", f"{source}: models.{name}.path")
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
        try:
            problem = cls.check_spec(b)
        except OSError as e:  # a path option the file system refuses outright (e.g. too long)
            raise ScenarioError(f"{where}.options: {e.strerror or e}: {str(e.filename)[:80]!r}") from None
        if problem:
            raise ScenarioError(f"{where}: {problem}")
        if b.python is not None and not _is_file(b.python, f"{where}.python"):
            raise ScenarioError(f"{where}.python: expected a Python interpreter, {b.python} does not exist")


def _check_traces(scenario: Scenario, source: str) -> None:
    """A trace that cannot be replayed is refused before anything runs: missing, empty, bad rows, times that go
    back, or fewer rows than a repetition sends."""
    from harness.inputs.trace import TraceError, read_trace

    for i, w in enumerate(scenario.workloads):
        if not isinstance(w.load, TraceLoad):
            continue
        where = f"{source}: workloads[{i}].load.path"
        try:
            rows = read_trace(w.load.path)
        except TraceError as e:
            raise ScenarioError(f"{where}: {e}") from None
        most = max(w.num_requests) if isinstance(w.num_requests, list) else w.num_requests
        if len(rows) < most:
            raise ScenarioError(f"{where}: the trace has {len(rows)} rows, fewer than num_requests ({most}): each "
                                f"repetition replays the first num_requests rows")


def _check_model_config(path: Path, where: str) -> None:
    """Every engine reads config.json as a JSON object (an HF config): anything else is refused here, not met as a
    traceback in a worker."""
    try:
        config = json.loads(path.read_bytes())
    except OSError as e:
        raise ScenarioError(f"{where}: cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:  # not JSON, or not UTF-8
        raise ScenarioError(f"{where}: {path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ScenarioError(f"{where}: {path}: expected a JSON object (an HF model config), got a "
                            f"{type(config).__name__}")


def _is_file(path: Path, where: str) -> bool:
    """Path.is_file, with a path the file system refuses outright (too long, ...) reported as the user's mistake."""
    try:
        return path.is_file()
    except OSError as e:
        raise ScenarioError(f"{where}: {e.strerror or e}: {str(path)[:80]!r}...") from None


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
