"""Atomic file and folder writes, and run records (arguments, versions, commit, data hashes)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from mogu.errors import MoGUError


# Every folder mogu writes carries this file; mogu replaces a folder only when it names the same kind.
MARKER_FILE = ".mogu-artifact.json"


class RefusedOverwriteError(MoGUError):
    """A write would replace or delete a folder mogu did not write (or one that must never be replaced)."""


def folder_kind(path: Path) -> str | None:
    """The kind of mogu artefact ``path`` holds (its marker), or None for a folder mogu did not write.

    Checkpoints saved before the marker existed are recognised by their ``mogu_config.json``, which
    mogu alone writes with a ``format_version``."""
    marker = path / MARKER_FILE
    if marker.is_file():
        try:
            kind = json.loads(marker.read_text(encoding="utf-8")).get("kind")
        except (OSError, ValueError, AttributeError):
            return None
        return kind if isinstance(kind, str) else None
    config = path / "mogu_config.json"
    if config.is_file():
        try:
            if "format_version" in json.loads(config.read_text(encoding="utf-8")):
                return "checkpoint"
        except (OSError, ValueError, TypeError):
            return None
    return None


def _never_replaced(resolved: Path) -> str | None:
    """Why ``resolved`` may never be replaced, even with --overwrite (None if it may)."""
    roots = {Path("/").resolve(): "the file-system root", Path.home().resolve(): "your home folder",
             Path.cwd().resolve(): "the current folder"}
    for root, name in roots.items():
        if resolved == root:
            return f"it is {name}"
        if resolved in root.parents:
            return f"it holds {name}"
    return None


def _replaced_whole(input_path: Path, folder: Path) -> bool:
    """A folder that is replaced as a whole loses every input inside it."""
    return input_path == folder or folder in input_path.parents


def _never_written(path: Path, protected, lost=_replaced_whole) -> str | None:
    """Why nothing may be written to ``path``, whatever --overwrite says: a root, home or current folder (or
    one above them), or an input of the command (``protected``) that the write would lose (``lost(input,
    folder)``, resolved paths); else None."""
    resolved = path.resolve()
    why = _never_replaced(resolved)
    for item in protected:
        if item is None or not Path(item).expanduser().exists():
            continue
        rp = Path(item).expanduser().resolve()
        if lost(rp, resolved):
            why = why or f"it {'is' if rp == resolved else 'holds'} {item}, an input of this command"
    return why


def _lost_in_run_folder(input_path: Path, folder: Path) -> bool:
    """A run folder's fresh run replaces its own files and deletes its checkpoint and stage folders; an input
    elsewhere inside it (``--data run1/data --out run1``) is kept, the folder itself as an input never is."""
    return (input_path == folder or (input_path.parent == folder and input_path.is_file())
            or any(d in input_path.parents for d in (folder / "checkpoints", folder / "stages")))


def check_replaceable(path: str | Path, *, kind: str, overwrite: bool = False,
                      protected: "list[str | Path] | tuple" = ()) -> None:
    """Raise RefusedOverwriteError unless writing a ``kind`` artefact to ``path`` loses nothing mogu did not write.

    Allowed: a missing or empty folder, or one whose marker names the same ``kind``; anything else only with
    ``overwrite``. Never, whatever ``overwrite`` says: ``/``, the home or current folder (or a folder above
    them), and a folder that is or holds one of ``protected`` (the command's model and data paths)."""
    path = Path(path).expanduser()
    why = _never_written(path, protected)
    if why:
        raise RefusedOverwriteError(f"refusing to write a {kind} to {path}: {why}; choose another folder")
    if not path.exists():
        return
    if not path.is_dir():
        raise RefusedOverwriteError(f"refusing to write a {kind} to {path}: it is a file; choose a folder path")
    if not any(path.iterdir()) or overwrite:
        return
    owner = folder_kind(path)
    if owner == kind:
        return
    what = f"holds a mogu {owner}, not a {kind}" if owner else "holds files mogu did not write"
    raise RefusedOverwriteError(f"refusing to replace {path}: it {what}. Choose another folder, or pass "
                                "--overwrite (Python: overwrite=True) to replace it")


RUN_KIND = "run folder"  # a command's output folder: run.json, metrics, checkpoints, data files


def _legacy_run_folder(path: Path) -> bool:
    """A run folder written before run folders had a marker: its run.json is a mogu run record."""
    try:
        record = json.loads((path / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and {"argv", "versions", "git_commit"} <= set(record)


def check_run_folder(path: str | Path, *, command: str, overwrite: bool | None = False,
                     protected: "list[str | Path] | tuple" = ()) -> None:
    """Raise RefusedOverwriteError unless ``command`` may write its run files (run.json, metrics, checkpoints,
    data files: replaced or deleted on a fresh run) into ``path``: a missing or empty folder, or one mogu
    wrote as a run folder; anything else only with ``overwrite`` (None: the command has no such flag). Never
    an input of the command itself, nor ``/``, the home or the current folder."""
    path = Path(path).expanduser()
    why = _never_written(path, protected, lost=_lost_in_run_folder)
    if why:
        raise RefusedOverwriteError(f"refusing to write {command}'s files to {path}: {why}; choose another folder")
    if not path.exists():
        return
    if not path.is_dir():
        raise RefusedOverwriteError(f"refusing to write {command}'s files to {path}: it is a file; choose a folder")
    if overwrite or not any(path.iterdir()) or folder_kind(path) == RUN_KIND or _legacy_run_folder(path):
        return
    way_out = "" if overwrite is None else ", or pass --overwrite (Python: overwrite=True)"  # None: no such flag
    raise RefusedOverwriteError(f"refusing to write {command}'s files to {path}: it holds files mogu did not write "
                                f"(its run files would replace or delete them). Choose another folder{way_out}")


def mark_run_folder(path: str | Path) -> None:
    """Create ``path`` (if needed) and mark it as a mogu run folder, so later runs may write into it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if folder_kind(path) is None:
        atomic_write_text(path / MARKER_FILE, json.dumps({"kind": RUN_KIND, "mogu_version": _mogu_version()}) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | Path, *, kind: str, overwrite: bool = False,
                     protected: "list[str | Path] | tuple" = ()) -> Iterator[Path]:
    """Yield a scratch folder; on success it replaces ``path`` in one rename.

    ``path`` must be replaceable (:func:`check_replaceable`): mogu never replaces a folder it did not
    write unless ``overwrite``. The scratch folder gets the marker naming ``kind``. An exception (or a
    kill) before the rename leaves ``path`` as it was: a reader never sees a half-written checkpoint.
    """
    path = Path(path)
    check_replaceable(path, kind=kind, overwrite=overwrite, protected=protected)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        (tmp / MARKER_FILE).write_text(json.dumps({"kind": kind, "mogu_version": _mogu_version()}) + "\n")
        _fsync_tree(tmp)
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}-{time.time_ns()}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _mogu_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("mogu")
    except metadata.PackageNotFoundError:
        return "unknown"


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def git_commit(package_dir: str | Path | None = None) -> str | None:
    """mogu's own commit when it runs from a mogu checkout (``src/mogu`` under the work tree's top, beside
    mogu's pyproject.toml); None for an installed package, even one inside another project's git tree."""
    try:
        root = Path(package_dir or Path(__file__).parent).resolve()
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=root, capture_output=True, text=True,
                             timeout=5)
        if top.returncode != 0:
            return None
        top_dir = Path(top.stdout.strip()).resolve()
        pyproject = top_dir / "pyproject.toml"
        if root != top_dir / "src" / "mogu" or not pyproject.is_file() or 'name = "mogu"' not in pyproject.read_text(
                encoding="utf-8", errors="replace"):
            return None
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def library_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for name in ("mogu", "torch", "transformers", "tokenizers", "peft", "accelerate", "safetensors", "numpy",
                 "scikit-learn", "datasets", "deepspeed", "bitsandbytes", "gguf"):  # what can change a result
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def run_record(args: dict[str, Any], data_files: list[str | Path] = ()) -> dict[str, Any]:
    return {
        "argv": sys.argv,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in args.items()},
        "versions": library_versions(),
        "git_commit": git_commit(),
        "platform": platform.platform(),
        "data_sha256": {str(p): sha256_file(p) for p in data_files if Path(p).is_file()},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
