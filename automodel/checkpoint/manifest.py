"""What a checkpoint holds, so that it is checked before it is trusted: each file's size and digest, each trainable
tensor's name, shape and dtype, and the resolved config of the run that wrote it (manifest.json).

Digests are xxHash's 128-bit XXH3: not cryptographic (nothing here defends against an attacker), but it catches a
flipped byte, a truncated or half-copied file, and it reads at memory speed (docs/reliability.md has the cost).
Hashing and verifying are shared out over the ranks, file by file.
"""

import fnmatch
import json
import os
from pathlib import Path
from typing import Any, Optional

import xxhash

MANIFEST = "manifest.json"
BLOCK = 8 << 20
# Files a loader finds by pattern rather than by name (DeepSpeed counts its shards): one the manifest does not list
# would be read, so it is damage. Any other unlisted file (notes, an editor's swap file, NFS's .nfs* leftovers) is
# ignored.
LOADED_BY_PATTERN = ("*_optim_states.pt", "*_model_states.pt")


def file_digest(path: Path, sync: bool = False) -> str:
    """XXH3-128 of a file's bytes; with `sync`, the file is also flushed to disk (fsync) while it is open."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            h.update(block)
        if sync:
            os.fsync(f.fileno())
    return h.hexdigest()


def listed_files(root: Path) -> list[str]:
    """Every file under `root` but the manifest and the completion mark, relative, sorted (the same on every rank)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and p.name not in (MANIFEST, "COMPLETE"))


def hash_share(root: Path, rank: int, world_size: int, sync: bool = False) -> dict[str, dict]:
    """Sizes and digests of this rank's share of the files (every world_size-th, from its rank)."""
    return {name: {"bytes": (root / name).stat().st_size, "xxh3_128": file_digest(root / name, sync)}
            for name in listed_files(root)[rank::world_size]}


def write(root: Path, files: dict[str, dict], tensors: dict[str, list], config: dict[str, Any]) -> None:
    text = json.dumps({"files": files, "tensors": tensors, "config": config}, indent=1, sort_keys=True)
    with open(root / MANIFEST, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def read(root: Path) -> Optional[dict]:
    """The manifest, or None when the checkpoint has none (written before manifests existed)."""
    path = root / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def unlisted(root: Path, manifest: dict) -> list[str]:
    """Files in the checkpoint that its manifest does not list."""
    return sorted(set(listed_files(root)) - set(manifest["files"]))


def check_share(root: Path, manifest: dict, rank: int, world_size: int) -> list[str]:
    """What is wrong with this rank's share of the files the manifest lists (missing, another size, another digest),
    and unlisted files a loader would read (LOADED_BY_PATTERN); [] when all is well."""
    problems = []
    listed = sorted(manifest["files"])
    for name in listed[rank::world_size]:
        path, want = root / name, manifest["files"][name]
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != want["bytes"]:
            problems.append(f"{name} has {path.stat().st_size:,} bytes, not {want['bytes']:,}")
        elif file_digest(path) != want["xxh3_128"]:
            problems.append(f"{name} does not match its digest")
    if rank == 0:
        problems += [f"{name} is not in the manifest, and DeepSpeed would load it" for name in unlisted(root, manifest)
                     if any(fnmatch.fnmatch(Path(name).name, pattern) for pattern in LOADED_BY_PATTERN)]
    return problems


def tensor_table(named: dict[str, tuple[tuple[int, ...], str]]) -> dict[str, list]:
    return {name: [list(shape), dtype] for name, (shape, dtype) in sorted(named.items())}


def tensor_problems(saved: dict[str, list], current: dict[str, list]) -> list[str]:
    """How the checkpoint's trainable tensors differ from the model's (names, shapes, dtypes)."""
    problems = [f"{n}: not in this model" for n in sorted(set(saved) - set(current))]
    problems += [f"{n}: not in the checkpoint" for n in sorted(set(current) - set(saved))]
    for name in sorted(set(saved) & set(current)):
        if saved[name][0] != current[name][0]:
            problems.append(f"{name}: shape {saved[name][0]} in the checkpoint, {current[name][0]} in this model")
        elif saved[name][1] != current[name][1]:
            problems.append(f"{name}: {saved[name][1]} in the checkpoint, {current[name][1]} in this model")
    return problems
