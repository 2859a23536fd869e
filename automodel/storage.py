"""Where a run writes (output_dir, the tokenisation cache, the Hugging Face cache, the temporary directory), and
one line when the filesystem refuses a write: full, over quota, read-only or not permitted, naming the place, the
setting that chose it and what to do."""

import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Optional

# errno -> (what happened, whether freeing space is the way out)
REFUSALS = {errno.ENOSPC: ("no space left on", True), errno.EDQUOT: ("disk quota exceeded on", True),
            errno.EROFS: ("read-only filesystem at", False), errno.EACCES: ("no permission to write to", False),
            errno.EPERM: ("no permission to write to", False)}
NEARLY_FULL = 64 << 20  # bytes free below which a write that failed without saying why is taken for a full disk


def automodel_cache() -> Path:
    """$AUTOMODEL_CACHE, else ~/.cache/automodel (an empty value is unset: never the working directory)."""
    return Path(os.environ.get("AUTOMODEL_CACHE") or Path.home() / ".cache" / "automodel")


def huggingface_cache() -> Path:
    return Path(os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                / "huggingface")


def places(output_dir: Optional[Path], cache_dir: Optional[str] = None) -> list[tuple[Path, str, str]]:
    """(directory, what it is, the setting that chooses it) for everything a run writes, most specific first."""
    found = [(Path(output_dir), "the run's directory", "output_dir")] if output_dir is not None else []
    found.append((Path(cache_dir) if cache_dir else automodel_cache(), "the tokenisation cache",
                  "data.cache_dir or $AUTOMODEL_CACHE"))
    found.append((Path(os.environ["HF_DATASETS_CACHE"]), "the datasets cache", "$HF_DATASETS_CACHE")
                 if os.environ.get("HF_DATASETS_CACHE") else (huggingface_cache(), "the Hugging Face cache", "$HF_HOME"))
    found.append((Path(tempfile.gettempdir()), "the temporary directory", "$TMPDIR"))
    return found


def errno_of(error: BaseException) -> Optional[int]:
    """The OS error behind an exception: an OSError's errno, or the `os error N` that safetensors' (Rust) errors
    quote."""
    if isinstance(error, OSError) and error.errno is not None:
        return error.errno
    found = re.search(r"os error (\d+)", str(error))
    return int(found.group(1)) if found else None


def free_bytes(path: Path) -> Optional[int]:
    """Free bytes on the filesystem holding `path` (its nearest existing parent); None if that cannot be asked."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def nearly_full(path: Path) -> bool:
    free = free_bytes(path)
    return free is not None and free < NEARLY_FULL


def explain(error: BaseException, output_dir: Optional[Path], cache_dir: Optional[str] = None) -> Optional[str]:
    """One line for a write the filesystem refused; None for any other error."""
    code = errno_of(error)
    if code not in REFUSALS:
        return None
    what, space = REFUSALS[code]
    known = places(output_dir, cache_dir)
    path = getattr(error, "filename", None)
    if path is None:  # a write() says no name: the place with the least room (space), else output_dir
        path = min(known, key=lambda p: free_bytes(p[0]) or 0)[0] if space else known[0][0]
    path = Path(path)
    place = next(((name, knob) for directory, name, knob in known if _under(path, directory)), None)
    line = f"{what} {path}" + (f" ({place[0]}, {place[1]})" if place else "")
    elsewhere = f"set {place[1]} to another directory" if place else "write elsewhere"
    if space:
        free = free_bytes(path)
        line += f", {free / 2**20:,.1f} MiB free now" if free is not None else ""
        line += ": free space there and run again" + (" (the run resumes from its last good checkpoint)"
                                                       if output_dir is not None else "") + f", or {elsewhere}"
    else:
        line += f": {elsewhere}, one this process can write"
    return line


def _under(path: Path, place: Path) -> bool:
    try:
        path.absolute().relative_to(Path(place).absolute())
        return True
    except ValueError:
        return False
