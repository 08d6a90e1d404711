"""Backend kinds by name. Modules are imported on first use, so validating a scenario never loads an engine.

A kind is one class, or `Variants`: several classes, one chosen by an option (llama_cpp and vllm by `mode`).
Plugins: a module named in LLMBENCH_PLUGINS (comma-separated) is imported and may call `register`.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from backends.base import Backend
from harness.core.errors import UserError


@dataclass(frozen=True)
class Variants:
    """A kind whose option `option` (else `default`) names the class: value → "module:Class"."""
    option: str
    default: str
    classes: dict[str, str]


_BUILTIN: dict[str, str | Variants] = {
    "transformers": "backends.transformers_backend:TransformersBackend",
    "openai": "backends.openai_backend:OpenAIBackend",
    "tgi": "backends.tgi_backend:TGIBackend",
    "own": "backends.own_backend:OwnBackend",
    "llama_cpp": Variants("mode", "in_process", {
        "in_process": "backends.llama_cpp.in_process:LlamaCppInProcessBackend",
        "server": "backends.llama_cpp.server:LlamaCppServerBackend",
        "llama_server": "backends.llama_cpp.server:LlamaServerBackend"}),
    "vllm": Variants("mode", "server", {
        "server": "backends.vllm_backend:VLLMServerBackend",
        "in_process": "backends.vllm_backend:VLLMInProcessBackend"}),
}
_registered: dict[str, type[Backend]] = {}


class PluginError(UserError):
    """A module named in LLMBENCH_PLUGINS cannot be imported."""


class UnknownVariant(UserError):
    """The option that selects a kind's variant names none of them."""

    def __init__(self, kind: str, option: str, value: Any, accepted: list[str]):
        self.kind, self.option, self.value, self.accepted = kind, option, value, accepted
        super().__init__(f"options.{option}: expected {' or '.join(accepted)} for kind {kind}, got {value!r}")


_plugins_loaded = False


def register(cls: type[Backend]) -> type[Backend]:
    _registered[cls.kind] = cls
    return cls


def _load_plugins() -> None:
    global _plugins_loaded
    if not _plugins_loaded:
        _plugins_loaded = True
        for mod in filter(None, os.environ.get("LLMBENCH_PLUGINS", "").split(",")):
            try:
                importlib.import_module(mod.strip())
            except ImportError as e:
                raise PluginError(f"LLMBENCH_PLUGINS: cannot import {mod.strip()!r}: {e}") from None


def known_kinds() -> list[str]:
    _load_plugins()
    return sorted({*_BUILTIN, *_registered})


def get_backend_class(kind: str, options: Mapping[str, Any] | None = None) -> type[Backend]:
    """The class of `kind`; for a kind with variants, the one `options` selects (without options, the default one).
    KeyError for an unknown kind, UnknownVariant for an option naming no variant."""
    _load_plugins()
    if kind in _registered:
        return _registered[kind]
    if kind not in _BUILTIN:
        raise KeyError(kind)
    target = _BUILTIN[kind]
    if isinstance(target, Variants):
        value = (options or {}).get(target.option, target.default)
        if not isinstance(value, str) or value not in target.classes:
            raise UnknownVariant(kind, target.option, value, list(target.classes))
        target = target.classes[value]
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)
