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

from harness.config.prompt_checks import (PromptCheckError, check_context, check_prompt_files,
                                          resolve_prompt_paths)
from harness.config.scenario import Scenario, TraceLoad
from harness.core.errors import UserError


class ScenarioError(UserError):
    """A user mistake in a scenario: printed without a traceback, exit code 2."""


# ---- loading ------------------------------------------------------------------------------------------------------

_UNION_MEMBER = re.compile(r"^(int|float|str|bool|list\[.*\]|constrained-.*|function-.*|LengthDist)$")


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _UNION_MEMBER.match(part) or (part in ("sequential", "concurrency", "poisson", "trace", "capacity",
                                                    "synthetic", "file", "document", "shared_prefix", "conversation")
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
        # A check of the whole scenario (no field) names what it refuses itself: its input is the whole file.
        got = "" if e["type"] in ("missing", "extra_forbidden") or not e["loc"] else f" (got {e['input']!r:.80})"
        if msg + got not in problems.setdefault(where, []):
            problems[where].append(msg + got)
    return "\n".join([f"{source}: invalid scenario"] + [f"  {w}: {' or '.join(m)}" for w, m in problems.items()])


# ---- YAML with limits ---------------------------------------------------------------------------------------------

MAX_DEPTH = 64  # nested mappings and lists, aliases expanded; real scenarios use fewer than 10
MAX_VALUES = 100_000  # values once every alias is expanded where it is used: an alias bomb is refused, not expanded
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
    """Refuse an alias that contains itself, and a document whose aliases expand beyond MAX_VALUES values or
    MAX_DEPTH levels. Sizes are counted per distinct node (memoized), so an alias bomb costs linear time here."""
    size: dict[int, int] = {}
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
            depth[key] = 1 + max((depth[id(c)] for c in children), default=0)
            if size[key] > MAX_VALUES or depth[key] > MAX_DEPTH:
                what = f"more than {MAX_VALUES:,} values" if size[key] > MAX_VALUES else f"more than {MAX_DEPTH} levels"
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
    """safe_load within the limits above; raises yaml.YAMLError."""
    loader = _LimitedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def load_scenario(path: Path | str) -> Scenario:
    """Parse and fully validate a scenario; every user mistake raises ScenarioError naming file and field."""
    path = Path(path)
    try:
        text = path.read_text()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise ScenarioError(f"{path}: no such scenario file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ScenarioError(f"{str(path)[:200]}: cannot read the scenario: {getattr(e, 'strerror', None) or e}") from None
    try:
        data = load_yaml(text)
    except (yaml.YAMLError, ValueError) as e:  # ValueError: a tagged or timestamp-like value that is none (2001-02-30)
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
    resolve_prompt_paths(scenario, path.parent)
    _check_backends(scenario, str(path))
    _check_traces(scenario, str(path))  # before the context check, which reads a trace's lengths
    try:
        check_prompt_files(scenario, str(path))
        check_context(scenario, str(path))
    except PromptCheckError as e:
        raise ScenarioError(str(e)) from None
    return scenario


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
