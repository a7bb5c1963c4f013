"""Finding unreadable images before they reach a decoder, with the result cached on disk.

Two levels:

* ``quick`` reads each file's header and last bytes: a JPEG must start with the SOI marker,
  have well-formed marker segments up to its first scan (SOS), a frame header (SOF) among
  them, and hold the EOI marker near its end; a PNG must start with its IHDR chunk and end with
  its IEND chunk; anything else (and a JPEG or PNG that fails the end checks) is decoded with
  PIL to decide. This catches empty, truncated and non-image files and JPEGs whose header
  tables are damaged, the ones that make DALI's decoder abort the whole pipeline, at the cost
  of a few small reads per file.
* Both levels skip an image whose header declares more pixels than :func:`max_image_pixels`
  (PIL's decompression-bomb limit, ``2 * PIL.Image.MAX_IMAGE_PIXELS`` = 178,956,970 pixels by
  default, about 13,377 x 13,377; ``PIL.Image.MAX_IMAGE_PIXELS = None`` lifts it): a 1 KB file
  can declare 20000 x 20000 pixels, which a decoder allocates (1.2 GB) before it finds the data
  missing. The ``pytorch`` backend's PIL refuses the same files as it opens them, so every
  backend skips the same images.
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
CACHE_VERSION = 2  # 2: JPEG header segments and declared image sizes are checked
DEFAULT_CACHE_DIR = Path("~/.cache/pedconv/data-scans")
CACHE_DIR_ENV = "PEDCONV_DATA_CACHE"

JPEG_SOI = b"\xff\xd8\xff"
JPEG_EOI = b"\xff\xd9"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_IEND = b"IEND"
# Some writers pad JPEGs after the EOI marker; look for it in this many trailing bytes.
TAIL_BYTES = 1024
# JPEG markers: start of frame (the image size), start of scan (the header ends), end of image, standalone ones.
JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # less DHT, JPG, DAC
JPEG_SOS, JPEG_EOI_MARKER = 0xDA, 0xD9
JPEG_STANDALONE = frozenset([0x01, *range(0xD0, 0xD8)])  # TEM, RST0-7: no length field
# A header with more segments than this is not a real JPEG (they have about ten).
MAX_JPEG_SEGMENTS = 1000
# File reads overlap well; this many threads keep a local disk or a network file system busy.
SCAN_THREADS = 16
# Files per task: one future per file would cost too much memory on ImageNet-sized folders.
SCAN_CHUNK = 512
# How many unreadable files are named one per line before the rest are only counted.
MAX_NAMED = 20


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR).expanduser()


def max_image_pixels() -> int | None:
    """The most pixels an image may declare: PIL's decompression-bomb limit (None: no limit)."""
    limit = Image.MAX_IMAGE_PIXELS
    return None if limit is None else 2 * int(limit)


def _size_error(width: int, height: int) -> str | None:
    if width <= 0 or height <= 0:
        return f"declares a size of {width} x {height} pixels"
    limit = max_image_pixels()
    if limit is not None and width * height > limit:
        return (f"declares {width} x {height} pixels, more than the limit of {limit} "
                "(PIL's decompression-bomb limit, 2 x PIL.Image.MAX_IMAGE_PIXELS)")
    return None


def jpeg_header_error(file, size: int) -> str | None:
    """Walk a JPEG's marker segments from SOI to the first SOS (``file`` is open in binary mode); the reason it is
    broken or too large, or None. Reads only the header: a few hundred bytes to a few KB."""
    file.seek(2)
    frame = None
    for _ in range(MAX_JPEG_SEGMENTS):
        byte = file.read(1)
        if byte != b"\xff":
            return f"broken JPEG header: no marker at byte {file.tell() - len(byte)}"
        marker = 0xFF
        while marker == 0xFF:  # fill bytes
            read = file.read(1)
            if not read:
                return "broken JPEG header: the file ends inside it"
            marker = read[0]
        if marker in JPEG_STANDALONE:
            continue
        if marker < 0xC0 or marker in (0xD8, JPEG_EOI_MARKER):  # not a marker a header holds
            return f"broken JPEG header: marker 0x{marker:02X} at byte {file.tell() - 2}"
        field = file.read(2)
        if len(field) < 2:
            return "broken JPEG header: the file ends inside it"
        length = int.from_bytes(field, "big")
        start = file.tell()
        if length < 2 or start + length - 2 > size:
            return f"broken JPEG header: segment 0x{marker:02X} at byte {start - 4} has length {length}"
        body = file.read(length - 2) if marker in JPEG_SOF or marker == JPEG_SOS else b""
        if marker in JPEG_SOF:
            if frame is not None:
                return "broken JPEG header: two frame headers (SOF)"
            count = body[5] if len(body) > 5 else 0
            if not 1 <= count <= 4 or length != 8 + 3 * count:
                return f"broken JPEG header: frame header of length {length} for {count} components"
            frame = {body[6 + 3 * index] for index in range(count)}  # the component ids
            reason = _size_error(int.from_bytes(body[3:5], "big"), int.from_bytes(body[1:3], "big"))
            if reason:
                return reason
        if marker == JPEG_SOS:
            if frame is None:
                return "broken JPEG header: image data before a frame header (SOF)"
            count = body[0] if body else 0
            if not 1 <= count <= 4 or length != 6 + 2 * count:
                return f"broken JPEG header: scan header of length {length} for {count} components"
            if not {body[1 + 2 * index] for index in range(count)} <= frame:
                return "broken JPEG header: the scan names components the frame does not have"
            return None
        file.seek(start + length - 2)
    return f"broken JPEG header: more than {MAX_JPEG_SEGMENTS} segments"


def png_header_error(head: bytes) -> str | None:
    """The IHDR chunk that must follow a PNG's signature: its size within the limit."""
    if len(head) < 24 or head[12:16] != b"IHDR":
        return "broken PNG header: no IHDR chunk"
    return _size_error(int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big"))


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
            head = file.read(24)
            size = file.seek(0, os.SEEK_END)
            header = None
            if head.startswith(JPEG_SOI):
                header = jpeg_header_error(file, size)
            elif head.startswith(PNG_SIGNATURE):
                header = png_header_error(head)
            file.seek(max(0, size - TAIL_BYTES))
            tail = file.read()
    except OSError as error:
        return f"cannot read: {error.strerror or error}"
    if size == 0:
        return "empty file"
    if header is not None:
        return header
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
    """Hash of the folder, the image-size limit, its files, their sizes and modification times."""
    digest = hashlib.sha256(f"{listing.root.resolve()}\0{max_image_pixels()}".encode())
    for path, label in listing.samples:
        try:
            stat = os.stat(path)
            digest.update(f"{path}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path}\0{label}\0missing\n".encode())
    return digest.hexdigest()


def _cache_path(cache_dir: Path, level: str, digest: str) -> Path:
    return cache_dir / f"{level}-{digest[:32]}.json"


def _read_level(cache_dir: Path, level: str, digest: str) -> dict[str, str] | None:
    try:
        content = json.loads(_cache_path(cache_dir, level, digest).read_text())
    except (OSError, ValueError):
        return None
    if content.get("version") == CACHE_VERSION and content.get("digest") == digest:
        return dict(content["unreadable"])
    return None


def _read_cache(cache_dir: Path, level: str, digest: str) -> dict[str, str] | None:
    # A full scan answers a quick question too, and knows more: it is read first.
    for candidate in reversed(LEVELS[LEVELS.index(level):]):
        cached = _read_level(cache_dir, candidate, digest)
        if cached is not None:
            return cached
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


def add_unreadable(listing: ImageFolderListing, unreadable: dict[str, str], *,
                   cache_dir: Path | str | None = None) -> None:
    """Record images found unreadable elsewhere (a DALI decode failure) in the listing's cached scans, so that the
    next scan of the same listing skips them; a quick scan's cache is started if there is none."""
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    digest = listing_digest(listing)
    found = False
    for level in LEVELS:
        cached = _read_level(cache_dir, level, digest)
        if cached is not None:
            _write_cache(cache_dir, level, digest, listing, {**cached, **unreadable})
            found = True
    if not found:
        _write_cache(cache_dir, "quick", digest, listing, dict(unreadable))


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
