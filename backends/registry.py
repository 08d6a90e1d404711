"""Backend kinds by name. Modules are imported on first use, so validating a scenario never loads an engine.

Plugins: a module named in LLMBENCH_PLUGINS (comma-separated) is imported and may call `register`.
"""

from __future__ import annotations

import importlib
import os

from backends.base import Backend
from harness.core.errors import UserError

_BUILTIN = {
    "transformers": "backends.transformers_backend:TransformersBackend",
    "openai": "backends.openai_backend:OpenAIBackend",
    "tgi": "backends.tgi_backend:TGIBackend",
    "own": "backends.own_backend:OwnBackend",
    "llama_cpp": "backends.llamacpp_backend:LlamaCppBackend",
    "vllm": "backends.vllm_backend:VLLMBackend",
}
_registered: dict[str, type[Backend]] = {}


class PluginError(UserError):
    """A module named in LLMBENCH_PLUGINS cannot be imported."""


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


def get_backend_class(kind: str) -> type[Backend]:
    _load_plugins()
    if kind in _registered:
        return _registered[kind]
    if kind not in _BUILTIN:
        raise KeyError(kind)
    module, name = _BUILTIN[kind].split(":")
    return getattr(importlib.import_module(module), name)
