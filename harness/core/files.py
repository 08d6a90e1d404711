"""Files the harness writes: atomically, so a crash leaves the old file or the new one, never half of one; and in a
folder it shares with the user's files, only over and away files it wrote itself (a manifest lists them)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from harness.core.errors import UserError

WRITTEN = ".llmbench-written.json"  # the manifest of what we wrote into a folder that may hold other files
MADE = ".llmbench-made"  # in a folder we made, whose whole content is ours to remove


def atomic_write(path: Path, data: str | bytes) -> None:
    with atomic_path(path) as tmp:
        with tmp.open("wb") as f:
            f.write(data if isinstance(data, bytes) else data.encode())
            f.flush()
            os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A new file beside `path` to write, for a library that writes to a path itself (pandas, matplotlib): it
    replaces `path` when the block ends, and is removed if the block raises."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace_written(folder: Path, files: dict[str, bytes], writer: str) -> None:
    """Write `files` (name: content) into `folder`, and remove the files an earlier call wrote there that are not
    among them; nothing else in the folder is touched. A file of one of those names that we did not write is
    refused (UserError), never replaced. `writer` names the command in that message ("bench report")."""
    folder.mkdir(parents=True, exist_ok=True)
    ours = _written(folder)
    foreign = sorted(name for name in files if name not in ours and (folder / name).exists())
    if foreign:
        raise UserError(f"{folder}: {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''} exist(s) and were "
                        f"not written by {writer}; choose another output folder (it never replaces files of yours)")
    _record(folder, ours | set(files))  # first: a crash from here on leaves every file we wrote listed
    for name, data in files.items():
        atomic_write(folder / name, data)
    for name in ours - set(files):
        if (folder / name).is_file() and not (folder / name).is_symlink():
            (folder / name).unlink()
    _record(folder, set(files))


def _written(folder: Path) -> set[str]:
    """What the manifest says we wrote; an unreadable manifest vouches for nothing."""
    try:
        names = json.loads((folder / WRITTEN).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    return {n for n in names if isinstance(n, str) and "/" not in n and n not in ("", ".", "..")}


def _record(folder: Path, names: set[str]) -> None:
    atomic_write(folder / WRITTEN, json.dumps({"files": sorted(names)}, indent=1))


def make_folder(folder: Path) -> None:
    """Create `folder` (and its parents), marked as ours: remove_folder may empty it later."""
    folder.mkdir(parents=True)
    (folder / MADE).touch()


def is_ours(folder: Path, also_ours_if: str | None = None) -> bool:
    """Whether we made `folder`: make_folder's marker, or a file named `also_ours_if` that only we write there (for
    folders made before the marker)."""
    return (folder / MADE).is_file() or bool(also_ours_if and (folder / also_ours_if).is_file())


def remove_folder(folder: Path, also_ours_if: str | None = None) -> None:
    """Remove a folder we made (is_ours); refuse (UserError) one we did not make. Nothing there: nothing to do."""
    if not folder.exists():
        return
    if not is_ours(folder, also_ours_if):
        raise UserError(f"{folder}: exists and was not made by bench, so it is not removed; choose another output "
                        f"folder")
    shutil.rmtree(folder)


def cache_root() -> Path:
    """Where built models and converted GGUF files are kept between runs."""
    return Path(os.environ.get("LLMBENCH_CACHE", Path.home() / ".cache" / "llmbench"))
