"""Finding unreadable images before they reach a decoder, with the result cached on disk.

Two levels:

* ``quick`` reads each file's first and last bytes: a JPEG must start with the SOI marker and
  hold the EOI marker near its end, a PNG must end with its IEND chunk; anything else (and a
  JPEG or PNG that fails these checks) is decoded with PIL to decide. This catches empty,
  truncated and non-image files, the ones that make DALI's decoder abort the whole pipeline,
  at the cost of two small reads per file.
* ``full`` decodes every file with PIL (JPEGs at 1/8 scale, which still reads all their data).

Results are cached as JSON in `cache_dir`, keyed by the folder's listing with each file's size
and modification time, so a second run on unchanged data only pays for the ``stat`` calls.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from .common import ImageFolderListing
from .progress import progress_bar

logger = logging.getLogger(__name__)

LEVELS = ("quick", "full")
CACHE_VERSION = 1
DEFAULT_CACHE_DIR = Path("~/.cache/pedconv/data-scans")
CACHE_DIR_ENV = "PEDCONV_DATA_CACHE"

JPEG_SOI = b"\xff\xd8\xff"
JPEG_EOI = b"\xff\xd9"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_IEND = b"IEND"
# Some writers pad JPEGs after the EOI marker; look for it in this many trailing bytes.
TAIL_BYTES = 1024
# File reads overlap well; this many threads keep a local disk or a network file system busy.
SCAN_THREADS = 16
# Files per task: one future per file would cost too much memory on ImageNet-sized folders.
SCAN_CHUNK = 512
# How many unreadable files are named one per line before the rest are only counted.
MAX_NAMED = 20


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR).expanduser()


def decode_error(path: str) -> str | None:
    """PIL's complaint about the file, or None when it decodes."""
    try:
        with Image.open(path) as image:
            if image.format == "JPEG":
                # DCT scaling: far less work, but every byte of the entropy-coded data is read.
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
        return f"{type(error).__name__}: {error}"
    return None


def quick_error(path: str) -> str | None:
    """Structure check from the file's ends; falls back to decoding when unsure."""
    try:
        with open(path, "rb") as file:
            head = file.read(8)
            size = file.seek(0, os.SEEK_END)
            file.seek(max(0, size - TAIL_BYTES))
            tail = file.read()
    except OSError as error:
        return f"cannot read: {error.strerror or error}"
    if size == 0:
        return "empty file"
    if head.startswith(JPEG_SOI) and JPEG_EOI in tail:
        return None
    if head.startswith(PNG_SIGNATURE) and PNG_IEND in tail[-16:]:
        return None
    return decode_error(path)


def full_error(path: str) -> str | None:
    return quick_error(path) or decode_error(path)


def _check_all(check, paths: list[str]) -> dict[str, str]:
    found = {}
    for path in paths:
        reason = check(path)
        if reason is not None:
            found[path] = reason
    return found


def listing_digest(listing: ImageFolderListing) -> str:
    """Hash of the folder, its files, their sizes and modification times."""
    digest = hashlib.sha256(str(listing.root.resolve()).encode())
    for path, label in listing.samples:
        try:
            stat = os.stat(path)
            digest.update(f"{path}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path}\0{label}\0missing\n".encode())
    return digest.hexdigest()


def _cache_path(cache_dir: Path, level: str, digest: str) -> Path:
    return cache_dir / f"{level}-{digest[:32]}.json"


def _read_cache(cache_dir: Path, level: str, digest: str) -> dict[str, str] | None:
    # A full scan answers a quick question too.
    for candidate in LEVELS[LEVELS.index(level):]:
        path = _cache_path(cache_dir, candidate, digest)
        try:
            content = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if content.get("version") == CACHE_VERSION and content.get("digest") == digest:
            return dict(content["unreadable"])
    return None


def _write_cache(cache_dir: Path, level: str, digest: str, listing: ImageFolderListing,
                 unreadable: dict[str, str]) -> None:
    path = _cache_path(cache_dir, level, digest)
    content = {
        "version": CACHE_VERSION,
        "digest": digest,
        "root": str(listing.root),
        "level": level,
        "files": len(listing),
        "unreadable": unreadable,
    }
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".tmp{os.getpid()}")
        temporary.write_text(json.dumps(content, indent=1))
        temporary.replace(path)  # atomic: ranks scanning at once never see half a file
    except OSError as error:
        logger.warning("could not cache the data scan in %s: %s", cache_dir, error.strerror or error)


def find_unreadable(
    listing: ImageFolderListing,
    level: str = "quick",
    *,
    cache_dir: Path | str | None = None,
    threads: int = SCAN_THREADS,
) -> dict[str, str]:
    """Paths of the listing's unreadable images mapped to the reason, using the cache."""
    if level not in LEVELS:
        raise ValueError(f"unknown scan level {level!r}; valid: {', '.join(LEVELS)}")
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    digest = listing_digest(listing)
    cached = _read_cache(cache_dir, level, digest)
    if cached is not None:
        logger.debug("data scan of %s found in cache %s", listing.root, cache_dir)
        return cached

    check = quick_error if level == "quick" else full_error
    logger.info("checking %d images in %s for unreadable files (%s scan, cached afterwards)",
                len(listing), listing.root, level)
    paths = [path for path, _ in listing.samples]
    chunks = [paths[start:start + SCAN_CHUNK] for start in range(0, len(paths), SCAN_CHUNK)]
    unreadable: dict[str, str] = {}
    bar = progress_bar(len(paths), f"checking {os.path.basename(str(listing.root)) or listing.root}", "img")
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        # PIL releases the GIL while decoding, so threads also spread the full scan over cores.
        for chunk, chunk_result in zip(chunks, pool.map(lambda chunk: _check_all(check, chunk), chunks)):
            unreadable.update(chunk_result)
            if bar is not None:
                bar.update(len(chunk))
    if bar is not None:
        bar.close()
    _write_cache(cache_dir, level, digest, listing, unreadable)
    return unreadable


def log_skipped(unreadable: dict[str, str], split: str) -> None:
    """One warning line per skipped file (up to MAX_NAMED), then a count."""
    for path, reason in list(unreadable.items())[:MAX_NAMED]:
        logger.warning("skipping unreadable %s image %s (%s)", split, path, reason)
    if len(unreadable) > MAX_NAMED:
        logger.warning("skipping %d more unreadable %s images", len(unreadable) - MAX_NAMED, split)


def drop_unreadable(
    listing: ImageFolderListing,
    split: str,
    level: str,
    *,
    cache_dir: Path | str | None = None,
) -> ImageFolderListing:
    """The listing less its unreadable images, each named in a warning."""
    unreadable = find_unreadable(listing, level, cache_dir=cache_dir)
    log_skipped(unreadable, split)
    return listing.without(set(unreadable))
