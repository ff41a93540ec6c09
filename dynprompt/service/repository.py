"""The model repository on disk: which folder is which model and version, read safely.

The layout is Triton's and TF Serving's: a model's name is its folder, and its
versions sit side by side as numbered sub-folders.

    repo/sst2/dynprompt.json          sst2, version 1 (an unversioned checkpoint)
    repo/sst2/2/dynprompt.json        sst2, version 2
    repo/rte/3/dynprompt.json         rte, version 3

The `name` inside a checkpoint's `dynprompt.json` does not decide what it is served
as: a copied folder can never take over another model's name. A checkpoint folder
given as the repository itself is a repository of one, served under that folder's
name. Folders whose name starts with "." are skipped, so a checkpoint written into
`repo/.incoming/` and renamed into place appears whole or not at all.

Only regular files inside their checkpoint folder are read, each under a size cap
checked before the first byte is read: a FIFO, a device or a symlink pointing out of
the folder is refused without ever blocking on it, and a 100 MB `dynprompt.json`
costs one `fstat`. A checkpoint's files are known by their `stat` signature, so an
unchanged checkpoint is recognised without reading it.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from dynprompt.models.checkpoint import CONFIG_FILE, WEIGHTS_FILE, CheckpointError
from dynprompt.models.config import NAME_PATTERN

# dynprompt.json holds a few KB of settings and training metrics; weights are a few
# hundred KB, or a whole backbone for `finetune` (a large T5 is ~3 GB in fp32).
MAX_CONFIG_BYTES = 1 << 20
MAX_WEIGHTS_BYTES = 16 << 30
_VERSION = re.compile(r"^[1-9][0-9]{0,17}$")
_CHUNK = 1 << 20

# (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns): what tells a changed file from an
# unchanged one without reading it (ctime moves on every write, rename and `touch`).
Signature = tuple[int, int, int, int, int]
Stats = tuple[Signature | None, Signature | None]  # (dynprompt.json, weights)


class RepositoryError(ValueError):
    """A model repository that cannot be served, with the path that says why."""


@dataclass(frozen=True)
class Candidate:
    """A folder that holds (or claims to hold) one version of one model."""

    name: str
    version: int
    path: Path
    label: str  # how reload reports name it: "sst2" (unversioned folder) or "sst2/2"


@dataclass
class Scan:
    candidates: list[Candidate] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)  # folder -> why it is not served

    @property
    def empty(self) -> bool:
        """Nothing in the repository even looks like a checkpoint."""
        return not self.candidates and not self.refused


def _holds_config(folder: Path) -> bool:
    # lexists: a dynprompt.json that is a FIFO or a dangling link still makes a candidate,
    # so that it is refused with its reason rather than ignored without a word.
    return os.path.lexists(folder / CONFIG_FILE)


def _subfolders(folder: Path) -> list[os.DirEntry[str]]:
    with os.scandir(folder) as entries:
        return sorted(
            (e for e in entries if not e.name.startswith(".") and e.is_dir()),
            key=lambda e: e.name,
        )


def _bad_name(name: str) -> str | None:
    if NAME_PATTERN.match(name):
        return None
    return (
        f"folder name {name!r} is not a model name (1-128 letters, digits, '.', '_', '-', "
        "starting with a letter or digit)"
    )


def scan(root: Path) -> Scan:
    """The checkpoints of `root` by name and version; reads directory entries only."""
    if not root.is_dir():
        raise RepositoryError(f"{root}: model repository folder not found")
    found = Scan()
    if _holds_config(root):  # a checkpoint folder given directly: a repository of one
        name = root.resolve().name
        problem = _bad_name(name)
        if problem is not None:
            found.refused[str(root)] = problem
        else:
            found.candidates.append(Candidate(name, 1, root, name))
        return found
    try:
        models = _subfolders(root)
    except OSError as exc:
        raise RepositoryError(f"{root}: cannot list the model repository: {exc}") from exc
    for entry in models:
        folder = Path(entry.path)
        try:
            inner = [e for e in _subfolders(folder) if _holds_config(Path(e.path))]
        except OSError:  # unlistable (a volume's lost+found): only its own checkpoint counts
            inner = []
        unversioned = _holds_config(folder)
        if not unversioned and not inner:
            continue
        problem = _bad_name(entry.name)
        if problem is not None:
            found.refused[str(folder)] = problem
            continue
        if unversioned:
            found.candidates.append(Candidate(entry.name, 1, folder, entry.name))
        for sub in inner:
            path = Path(sub.path)
            if not _VERSION.match(sub.name):
                found.refused[str(path)] = (
                    f"{sub.name!r} is not a version: versions of model {entry.name!r} are "
                    "sub-folders named 1, 2, 3, ..."
                )
                continue
            version = int(sub.name)
            found.candidates.append(Candidate(entry.name, version, path, f"{entry.name}/{version}"))
    return found


def find_checkpoints(root: Path) -> list[Path]:
    """`root` itself if it is a checkpoint, else every checkpoint folder of the layout."""
    return [c.path for c in scan(root).candidates]


# --------------------------------------------------------------------------- files


def signature(path: Path) -> Signature | None:
    """The file's `stat` signature (following links, never opening it); None when absent."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def stats(folder: Path) -> Stats:
    return signature(folder / CONFIG_FILE), signature(folder / WEIGHTS_FILE)


def survey(root: Path) -> dict[str, Stats]:
    """Every candidate folder with its files' signatures: a poll's cheap view of the repository."""
    return {str(c.path): stats(c.path) for c in scan(root).candidates}


@dataclass(frozen=True)
class Files:
    """A checkpoint's two files as they were read."""

    stats: Stats
    config_digest: str  # sha256 of dynprompt.json
    checksum: str  # the served `version`: `dynprompt.models.checkpoint.weights_checksum`

    def same_content(self, other: Files) -> bool:
        return (self.config_digest, self.checksum) == (other.config_digest, other.checksum)


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _open_regular(path: Path, folder: Path, limit: int) -> tuple[int, os.stat_result]:
    """An open descriptor of `path`, once it is known to be a regular file inside `folder`
    of at most `limit` bytes. Nothing is read and nothing can block: the type is checked
    before opening (`stat`), and again on the descriptor, which is opened non-blocking."""
    try:
        real = path.resolve(strict=True)
        inside = real.is_relative_to(folder.resolve(strict=True))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
        raise CheckpointError(f"{path}: cannot resolve: {exc}") from None
    if not inside:
        raise CheckpointError(
            f"{path}: a symlink to {real}, outside its checkpoint folder; only files inside "
            "the folder are read"
        )
    try:
        before = os.stat(real)
        if not stat.S_ISREG(before.st_mode):
            raise CheckpointError(f"{path}: {_kind(before.st_mode)}; only regular files are read")
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot open: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # replaced between the stat and the open
            raise CheckpointError(f"{path}: {_kind(st.st_mode)}; only regular files are read")
        if st.st_size > limit:
            raise CheckpointError(
                f"{path}: {st.st_size} bytes, over the limit of {limit} bytes for this file"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def _digest(fd: int, path: Path, limit: int) -> str:
    digest = hashlib.sha256()
    size = 0
    while block := os.read(fd, _CHUNK):
        size += len(block)
        if size > limit:
            raise CheckpointError(f"{path}: grew past the limit of {limit} bytes while read")
        digest.update(block)
    return digest.hexdigest()


def _sig(st: os.stat_result) -> Signature:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def inspect(folder: Path) -> Files:
    """Check a checkpoint's files (regular, inside `folder`, under the caps) and hash them.

    Raises `CheckpointError` naming the file and the reason.
    """
    sigs: list[Signature] = []
    digests = []
    for name, limit in ((CONFIG_FILE, MAX_CONFIG_BYTES), (WEIGHTS_FILE, MAX_WEIGHTS_BYTES)):
        path = folder / name
        fd, st = _open_regular(path, folder, limit)
        try:
            digests.append(_digest(fd, path, limit))
        finally:
            os.close(fd)
        sigs.append(_sig(st))
    return Files((sigs[0], sigs[1]), digests[0], digests[1][:16])
