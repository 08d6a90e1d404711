"""Full KV blocks persisted under `prefix_cache_dir`, so a later run on the same document starts warm.

One file per block, named by its key (block_manager.block_hash), holding its K and V in every layer. The manifest
lists the blocks and is keyed by everything that changes their bytes: the model's files, the KV and compute dtypes,
the block size. A manifest that cannot be read, or was written for another key, is rebuilt (its blocks removed),
never trusted; a block file of the wrong size is dropped. The folder is one the engine made (owned.claim): a
`prefix_cache_dir` holding the user's files is worked in beside them, in a subfolder, never emptied.

Blocks are written on a thread of the store's (`save`), started with the first of them, so the engine goes on while
the disk takes them (65 blocks of the 201M model, a 2,048-token document: 20-40 ms); the engine hands them over
once it is idle (Engine.persist).
"""
import json
import os
import queue
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from . import owned
from .errors import EngineError
from .weights import read_into

FORMAT = 1


class PrefixStore:
    def __init__(self, directory: Path, key: dict[str, object], block_shape: tuple[int, ...],
                 dtype: torch.dtype) -> None:
        self.dir, self.shape, self.dtype = owned.claim(directory, "prefix_cache_dir"), block_shape, dtype
        self.nbytes = torch.Size(block_shape).numel() * dtype.itemsize
        self.buffer = torch.empty(block_shape, dtype=dtype)  # what get() read last
        self.key = {"format": FORMAT, **key}
        self.manifest = self.dir / "manifest.json"
        try:
            old = json.loads(self.manifest.read_text())
            trusted = old["key"] == self.key and all(isinstance(h, str) for h in old["blocks"])
        except (OSError, ValueError, KeyError, TypeError):
            trusted = False
        if not trusted:
            shutil.rmtree(self.dir / "blocks", ignore_errors=True)
            old = {"blocks": []}
        (self.dir / "blocks").mkdir(parents=True, exist_ok=True)
        self.blocks = {bytes.fromhex(h) for h in old["blocks"] if self._size(h) == self.nbytes}
        self.lock = threading.Lock()  # blocks: the writer adds, a reader drops a damaged one, the manifest lists them
        self.rebuilt = not trusted
        self.error: str | None = None  # why writing stopped (a full disk): what was queued after it is dropped
        self.queue: queue.Queue[list[tuple[bytes, torch.Tensor]] | None] = queue.Queue()
        self.writer: threading.Thread | None = None
        self.flush()

    def __contains__(self, h: bytes) -> bool:
        return h in self.blocks

    def get(self, h: bytes) -> torch.Tensor | None:
        """The block's KV [layers, 2, block_size, kv_heads, head_dim], or None when its file is gone or damaged.
        Read into one buffer, valid until the next get: a fresh tensor, or a mapped file (torch.from_file), would
        fault its pages in one by one (63 blocks of a 2,048-token document: ~12 ms)."""
        try:
            with open(self._file(h.hex()), "rb") as f:
                read_into(f.fileno(), 0, self.buffer)
        except (OSError, EngineError):
            with self.lock:
                self.blocks.discard(h)
            return None
        return self.buffer

    def put(self, h: bytes, data: torch.Tensor) -> None:
        tmp = self._file(h.hex()).with_suffix(".tmp")
        data.contiguous().view(-1).view(torch.uint8).numpy().tofile(tmp)
        tmp.replace(self._file(h.hex()))
        with self.lock:
            self.blocks.add(h)

    def flush(self) -> None:
        """Rewrite the manifest atomically: it lists only blocks whose files are complete."""
        tmp = self.manifest.with_suffix(".tmp")
        with self.lock:
            names = sorted(h.hex() for h in self.blocks)
        tmp.write_text(json.dumps({"key": self.key, "blocks": names}))
        tmp.replace(self.manifest)

    def save(self, blocks: list[tuple[bytes, torch.Tensor]], saved: Callable[[int], None]) -> None:
        """Write blocks (keys and data the caller no longer touches), then the manifest, on the store's writer thread;
        saved(n) is called there once they are."""
        if self.writer is None:
            self.writer = threading.Thread(target=self._write, args=(saved,), name="own_engine_prefix_store",
                                           daemon=True)
            self.writer.start()
        self.queue.put(blocks)

    def wait(self) -> None:
        """Return once every block saved so far is written (or writing stopped: `error`)."""
        self.queue.join()

    def close(self) -> None:
        """Write what is queued, then stop the writer."""
        if self.writer is not None:
            self.queue.put(None)
            self.writer.join()
            self.writer = None

    def _write(self, saved: Callable[[int], None]) -> None:
        try:  # the lowest priority (a Linux thread's own nice): the disk can wait, the next token cannot
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except (AttributeError, OSError):  # not Linux, or not allowed: written at the engine's priority
            pass
        while (blocks := self.queue.get()) is not None:
            try:
                if self.error is None:
                    for h, data in blocks:
                        self.put(h, data)
                    self.flush()
                    saved(len(blocks))
            except OSError as e:  # persisting is a bonus: a full disk stops it, not the requests
                self.error = str(e)
            finally:
                self.queue.task_done()
        self.queue.task_done()

    def _file(self, name: str) -> Path:
        return self.dir / "blocks" / f"{name}.kv"

    def _size(self, name: str) -> int:
        try:
            return self._file(name).stat().st_size
        except (OSError, ValueError):
            return -1
