"""Folders the engine works in, and deletes from: only ones it made itself, proven by a marker file it wrote inside.

A folder the user names (offload_dir, prefix_cache_dir) is used as it is when it does not exist yet (the engine makes
it, and marks it) or carries a marker; otherwise the engine works in a marked subfolder of it, `own_engine/`, beside
the user's files, which it never touches. A subfolder of that name without a marker is refused. When done, the engine
removes what it put there by name (the KV files, say) and its marker, then the folder only if nothing else is left:
one folder may serve both uses, and a file put into it later stays.
"""
import shutil
from pathlib import Path

from .errors import EngineError

SUBFOLDER = "own_engine"


def _marker(directory: Path, use: str) -> Path:
    return directory / f".own_engine-{use}"


def _ours(directory: Path) -> bool:
    return directory.is_dir() and any(directory.glob(".own_engine-*"))


def claim(directory: Path, use: str) -> Path:
    """The folder to work in for the folder the user named as `use` (offload_dir, ...): one the engine made, now or
    before, marked for that use. EngineError when there is none to be had."""
    for candidate in (Path(directory), Path(directory) / SUBFOLDER):
        if _ours(candidate):
            mark(candidate, use)
            return candidate
        try:
            candidate.mkdir(parents=True)
        except FileExistsError:
            continue  # the user's: look at its subfolder
        except OSError as e:
            raise EngineError(f"{use} {directory}: cannot create {candidate}: {e.strerror or e}") from None
        mark(candidate, use)
        return candidate
    raise EngineError(f"{use} {directory}: it holds files of yours, and so does {Path(directory) / SUBFOLDER}, where "
                      f"the engine would work beside them: name an empty or new folder")


def claimable(directory: Path, use: str) -> str | None:
    """Why claim() would refuse the folder, without making anything; None when it would not."""
    for candidate in (Path(directory), Path(directory) / SUBFOLDER):
        if _ours(candidate) or not candidate.exists():
            return None
        if not candidate.is_dir():
            return f"{use}: {candidate} is a file, not a folder"
    return (f"{use}: {directory} holds files of yours, and so does {Path(directory) / SUBFOLDER}, where the engine "
            f"would work beside them: name an empty or new folder")


def mark(directory: Path, use: str) -> None:
    _marker(Path(directory), use).write_text(f"made by own_engine for its {use}: it removes what it wrote here\n")


def release(directory: Path, use: str, contents: tuple[str, ...]) -> None:
    """Remove `contents` (names in the folder) and the use's marker, then the folder if that left it empty. Nothing
    happens to a folder not marked for that use."""
    directory = Path(directory)
    if not _marker(directory, use).is_file():
        return
    for name in contents:
        shutil.rmtree(directory / name, ignore_errors=True)
    _marker(directory, use).unlink(missing_ok=True)
    try:
        directory.rmdir()
    except OSError:
        pass  # not empty: what is left is not this use's
