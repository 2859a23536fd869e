"""What a local training source holds, checked cheaply: its size and a digest of its bytes (all of a file up to
1.06 MiB; of a larger one, 17 evenly spaced blocks of 64 KiB including its first and last), so that a resumed run
can tell that the file under a path is not the one its checkpoint trained on (replaced, truncated, shuffled,
edited). A directory is its files, each so (beyond 16 files, each by its size and its first and last 4 KiB: a
directory of 10,000 shards is read in 80 MB). A hub dataset id has no local bytes: it is identified by its id, as the config says."""

import hashlib
from pathlib import Path
from typing import Optional

from automodel.config import DataConfig

BLOCKS = 16  # a larger one: BLOCKS + 1 evenly spaced blocks


def file_identity(path: Path, block: int = 1 << 16, blocks: int = BLOCKS) -> str:
    """"<size> bytes, sha256 <16 hex digits>" of the file's bytes (all of them, or `blocks` + 1 sampled blocks)."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= (blocks + 1) * block:  # no larger than the sample: all of it
            digest.update(f.read())
        else:
            for k in range(blocks + 1):
                f.seek(k * (size - block) // blocks)
                digest.update(f.read(block))
    return f"{size} bytes, sha256 {digest.hexdigest()[:16]}"


def source_identity(source: str) -> Optional[str]:
    """A local file's identity; a directory's (its files, hidden ones aside: smaller blocks when there are many);
    None for a hub dataset id."""
    path = Path(source).expanduser()
    if path.is_file():
        return file_identity(path)
    if not path.is_dir():
        return None
    files = sorted(p for p in path.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
    few = len(files) <= 16
    digest = hashlib.sha256()
    for file in files:
        ident = file_identity(file) if few else file_identity(file, 1 << 12, 1)
        digest.update(f"{file.relative_to(path)}\0{ident}\0".encode())
    return f"{len(files)} files, sha256 {digest.hexdigest()[:16]}"


def training_identity(data_cfg: DataConfig) -> dict[str, str]:
    """{source: identity} of the local training sources (validation data may change on resume)."""
    return {src.source: ident for src in data_cfg.train if (ident := source_identity(src.source)) is not None}
