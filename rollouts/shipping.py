"""Files that must reach actors on other nodes, through the Ray object store.

A job's driver prepares the policy directory in its local cache, and checkpoints are written into its run
directory; the actors may run on nodes that share neither. So the policy travels as its files (put in the object
store once, written into the node's cache the first time an actor there needs it), and checkpoints come back to
the driver as bytes, which writes the run directory alone. A node that sees the same path (one machine, or a
shared filesystem) reads it directly and nothing is copied.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ShippedDir:
    """A directory as actors on any node can open it: its path on the driver's node, and (when it was small
    enough to ship) an ObjectRef to its files and their digest."""

    path: str
    files: Any = None  # ObjectRef to {relative path: bytes}
    digest: str = ""


def read_tree(root: Path, only: tuple[str, ...] = ()) -> dict[str, bytes]:
    """Every file under `root` by relative path (with `only`, those under these top-level names)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and (not only or rel.split("/", 1)[0] in only):
            out[rel] = path.read_bytes()
    return out


def write_tree(files: dict[str, bytes], root: Path) -> None:
    for rel, data in files.items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def ship_dir(path: Path, max_bytes: int) -> ShippedDir:
    """Put `path`'s files in the object store when they total at most `max_bytes` (else only the path)."""
    import ray

    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    if size > max_bytes:
        return ShippedDir(str(path))
    files = read_tree(path)
    digest = hashlib.sha256(b"".join(k.encode() + hashlib.sha256(v).digest() for k, v in files.items())).hexdigest()[
        :16
    ]
    return ShippedDir(str(path), ray.put(files), digest)


def open_dir(source: str | ShippedDir, cache: Path) -> str:
    """A local path to the directory: its own path if this node sees it, else its shipped files written once
    into `cache/<digest>` (renamed into place, so concurrent actors on a node never see half a copy)."""
    if isinstance(source, str):
        return source
    if Path(source.path).is_dir():
        return source.path
    if source.files is None:
        raise FileNotFoundError(
            f"{source.path} is not on this node and was too big to ship through Ray (cluster.ship_max_mb): put it on "
            f"storage every node mounts at that path"
        )
    import ray

    target = cache / source.digest
    if not target.is_dir():
        tmp = cache / f".{source.digest}.{os.getpid()}"
        write_tree(ray.get(source.files), tmp)
        try:
            tmp.rename(target)
        except OSError:  # another actor on this node got there first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def cache_dir(configured: str | None) -> Path:
    """Where built policies are cached: `warm_start.cache_dir`, else $TIDERL_CACHE, else ~/.cache/tiderl."""
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("TIDERL_CACHE", Path.home() / ".cache" / "tiderl")).expanduser()


def shipped_cache(configured: str | None) -> Path:
    """Where an actor on a node without the driver's disk unpacks a shipped directory (`open_dir`)."""
    return cache_dir(configured) / "shipped"
