"""The local store, `$LILMISTRAL_HOME` (default ~/.lilmistral):

    models/NAME/TAG/          a converted model (see docs/format.md); manifest.json is written last and the
                              folder is renamed into place, so a model is either whole or absent
    downloads/NAME/TAG/REV/   files being pulled: FILE.partial while incomplete (resumed from its size),
                              FILE once verified; removed after a successful convert
    locks/NAME@TAG.lock       held (flock) while NAME:TAG is pulled: a second pull waits, rm refuses
    models.toml               your own registry entries (override the shipped ones)
    history                   the REPL's input history

Folders starting with "." are temporary (a convert or rm in progress) and are never listed.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import LilmistralError
from .registry import ModelRef


def default_home() -> Path:
    return Path(os.environ.get("LILMISTRAL_HOME") or "~/.lilmistral").expanduser()


@dataclass(frozen=True)
class InstalledModel:
    name: str
    tag: str
    path: Path
    manifest: dict
    size: int
    modified: float

    @property
    def quant(self) -> str:
        return self.manifest.get("quant", {}).get("scheme", "?")


def folder_size(path: Path) -> int:
    """Bytes of the files in a folder (or of one file)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class Store:
    def __init__(self, home: Path | None = None) -> None:
        self.home = home or default_home()
        self.models = self.home / "models"
        self.downloads = self.home / "downloads"

    def _inside(self, path: Path, root: Path) -> Path:
        """Every path a name leads to must stay inside the store (names are validated too; this is the backstop)."""
        if not path.resolve().is_relative_to(root.resolve()):
            raise LilmistralError(f"{path} is outside the store")
        return path

    def model_dir(self, ref: ModelRef) -> Path:
        return self._inside(self.models / ref.name / ref.tag, self.models)

    def download_dir(self, ref: ModelRef, revision: str) -> Path:
        return self._inside(self.downloads / ref.name / ref.tag / revision, self.downloads)

    @contextmanager
    def pull_lock(self, ref: ModelRef, on_wait: Callable[[], None]) -> Iterator[None]:
        """Hold ref's lock (released when its process ends, however it ends); on_wait() first if another holds it."""
        import fcntl

        locks = self.home / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / f"{ref.name}@{ref.tag}.lock", "a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                on_wait()
                fcntl.flock(fh, fcntl.LOCK_EX)
            yield

    def installed(self, ref: ModelRef) -> InstalledModel | None:
        path = self.model_dir(ref)
        return self._read(ref.name, ref.tag, path)

    def _read(self, name: str, tag: str, path: Path) -> InstalledModel | None:
        try:
            manifest = json.loads((path / "manifest.json").read_text())
            mtime = (path / "manifest.json").stat().st_mtime
        except (OSError, ValueError):
            return None
        return InstalledModel(name, tag, path, manifest, folder_size(path), mtime)

    def list(self) -> list[InstalledModel]:
        found = []
        if not self.models.is_dir():
            return found
        for name_dir in sorted(self.models.iterdir()):
            if name_dir.name.startswith(".") or not name_dir.is_dir():
                continue
            for tag_dir in sorted(name_dir.iterdir()):
                if tag_dir.name.startswith("."):
                    continue
                model = self._read(name_dir.name, tag_dir.name, tag_dir)
                if model:
                    found.append(model)
        return found

    def remove(self, ref: ModelRef) -> int:
        """Delete a model and any download of it (an interrupted pull's too); returns the bytes freed. Not while
        it is being pulled."""
        if not self._has_files(ref):
            raise LilmistralError(f"{ref.display} is not pulled")
        with self.pull_lock(ref, on_wait=lambda: _being_pulled(ref)):
            if not self._has_files(ref):  # removed while this waited
                raise LilmistralError(f"{ref.display} is not pulled")
            return self._remove(ref)

    def _has_files(self, ref: ModelRef) -> bool:
        return self.model_dir(ref).exists() or (self.downloads / ref.name / ref.tag).exists()

    def _remove(self, ref: ModelRef) -> int:
        path, freed = self.model_dir(ref), 0
        if path.exists():
            freed = folder_size(path)
            trash = path.parent / f".{path.name}.rm-{uuid.uuid4().hex[:8]}"
            os.rename(path, trash)  # atomic: `list` never sees a half-deleted model
            shutil.rmtree(trash, ignore_errors=True)
        downloads = self.downloads / ref.name / ref.tag
        if downloads.exists():
            freed += folder_size(downloads)
            shutil.rmtree(downloads, ignore_errors=True)
        for parent in (path.parent, downloads.parent):
            if parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
        return freed

    @property
    def history_file(self) -> Path:
        return self.home / "history"

    @property
    def conversations_dir(self) -> Path:
        return self.home / "conversations"


def human_parameters(n: int) -> str:
    """A parameter count as Ollama shows it: 7.25B, 134.52M."""
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _being_pulled(ref: ModelRef) -> None:
    raise LilmistralError(f"{ref.display} is being pulled; stop that pull first")


def sync(path: Path) -> None:
    """A file's writes, or a folder's entries (the files renamed into it), flushed to the disk (where the file
    system can: some network ones refuse a folder's)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def write_durably(path: Path, text: str) -> None:
    """text into `path` through a temporary file renamed over it, each on the disk before the next step: a
    crash, even the machine's, leaves the old file or the new one, whole. (Two processes may write one path.)"""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sync(path.parent)


def require_space(folder: Path, needed: int, what: str) -> None:
    """A clear error, before writing, when `folder`'s file system has less than `needed` bytes free."""
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise LilmistralError(f"{what} needs {human_size(needed)} in {folder}, which has {human_size(free)} free")


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def human_age(t: float) -> str:
    s = time.time() - t
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if s >= size:
            n = int(s // size)
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return "just now"
