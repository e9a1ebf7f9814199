"""Images: where a record's image comes from, and reading it, checked.

A record's image is a path (`ImagePath`, checked when the dataset is loaded to be a regular file inside the image
root), a cell of a parquet file (`ParquetImage`: the bytes stay in the file until the image is used), raw bytes or
a PIL image. The first two remember where they come from (`Source`), so that `load_image`, which reads and
decodes every image, can say which dataset file, record and field named an image it cannot use (`DataError`).
`check_images` decodes many images at once, in worker processes, for `python data.py check`.
"""
from __future__ import annotations

import functools
import io
import os
import stat
import sys
import zlib
from dataclasses import dataclass
from typing import NamedTuple, Sequence

from PIL import Image, ImageOps


MAX_IMAGE_PIXELS = 8192 * 8192  # refuse larger images: a decompression bomb guard (PIL's own warns only)
MAX_ASPECT_RATIO = 200  # Qwen2.5-VL's image processor (smart_resize) refuses longer/shorter side ratios
MAX_IMAGE_BYTES = 64 * 2**20  # a file larger than this is refused before it is read into memory


class DataError(ValueError):
    """A dataset does not hold what its layout promises; the message names file, record and field.

    `problem` is a short name for what was wrong ("bad record", "missing", "not an image", "corrupt", ...), used
    to count problems (`python data.py check`); `field` is the record's field at fault, where there is one (it
    goes into the list `python data.py check` writes).
    """

    def __init__(self, message: str, problem: str = "bad record", field: str | None = None):
        super().__init__(message)
        self.problem, self.field = problem, field


class Source(NamedTuple):
    """Where an image comes from: the dataset file, the index of its record there, and the field naming it."""
    file: str
    record: int
    field: str

    def __str__(self) -> str:
        return f"{self.file}: record {self.record}: field '{self.field}'"


class ImagePath(str):
    """An image file's path: a plain str everywhere, which also remembers the record that named it."""

    def __new__(cls, path: str, source: Source):
        self = super().__new__(cls, path)
        self.source = source
        return self

    def __getnewargs__(self):  # pickling (worker processes) rebuilds it with its source
        return str(self), self.source


@dataclass(frozen=True, slots=True)  # slots: a million of them stay small
class ParquetImage:
    """An image stored in a parquet cell, read only when it is used: a loaded dataset holds no image bytes."""
    file: str
    row_group: int
    row: int  # within the row group
    column: str
    key: str | None  # "bytes" in an HF image struct {bytes, path}; None in a binary column
    source: Source

    def __str__(self) -> str:
        return f"(parquet cell: row group {self.row_group}, row {self.row})"


def _image_error(image, problem: str, what: str) -> DataError:
    source = getattr(image, "source", None)
    name = "" if isinstance(image, (bytes, bytearray, Image.Image)) else f" {image}"
    return DataError(f"{source}: image{name}: {what}" if source else f"image{name}: {what}", problem,
                     source.field if source else None)


def _image_bytes(image) -> bytes:
    """The encoded bytes of a path, parquet cell or bytes; a missing, empty, oversized file or a directory raises."""
    if isinstance(image, ParquetImage):
        raw = _parquet_cell(image)
    elif isinstance(image, (bytes, bytearray)):
        raw = bytes(image)
    else:
        if "\0" in str(image):  # os.stat would raise ValueError("embedded null byte"), naming nothing
            raise _image_error(image, "bad path", "the path holds a NUL byte")
        try:
            size = os.stat(image).st_size
        except FileNotFoundError:
            raise _image_error(image, "missing", "does not exist") from None
        if os.path.isdir(image):
            raise _image_error(image, "directory", "is a directory, not an image file")
        if size > MAX_IMAGE_BYTES:
            raise _image_error(image, "too large", f"{size} bytes, over MAX_IMAGE_BYTES={MAX_IMAGE_BYTES}")
        try:
            with open(image, "rb") as f:
                raw = f.read(MAX_IMAGE_BYTES + 1)  # stops at the cap even if the file grew since stat
        except OSError as e:  # permissions, a file removed since stat, an I/O error
            raise _image_error(image, "unreadable", f"cannot be read ({type(e).__name__}: {e.strerror})") from None
    if not raw:
        raise _image_error(image, "empty", "is empty (0 bytes)")
    if len(raw) > MAX_IMAGE_BYTES:
        raise _image_error(image, "too large", f"over MAX_IMAGE_BYTES={MAX_IMAGE_BYTES} bytes")
    return raw


def load_image(image) -> Image.Image:
    """A path, parquet cell, raw bytes or PIL image -> a fully decoded RGB PIL image, EXIF-rotated, size-checked.

    Every pixel is decoded here (`Image.load()`), so a truncated or corrupt file fails now, with a `DataError`
    naming the image's record, rather than somewhere inside the image processor. Palette, alpha, grayscale and
    16-bit images are converted to 8-bit RGB (alpha over white). A PIL image (or a tensor made one) is held to
    the same size and aspect-ratio limits as a file.
    """
    if isinstance(image, Image.Image):
        _check_size(image, *image.size)
        return _rgb(image)
    raw = _image_bytes(image)
    if raw.startswith(b"\x89PNG\r\n\x1a\n") and (bad := _png_checksum_error(raw)):
        raise _image_error(image, "corrupt", bad)
    try:
        decoded = Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError as e:
        raise _image_error(image, "too many pixels", str(e)) from None
    except Image.UnidentifiedImageError:
        raise _image_error(image, "not an image", f"not an image file (it starts with {raw[:20]!r})") from None
    except Exception as e:  # a known format with a broken header
        raise _image_error(image, "corrupt", f"cannot be decoded ({type(e).__name__}: {e})") from None
    _check_size(image, *decoded.size)
    try:
        decoded.load()
        return _rgb(decoded)
    except Exception as e:  # truncated data, a bad checksum, a broken stream: PIL raises OSError, SyntaxError...
        raise _image_error(image, "corrupt", f"cannot be decoded ({type(e).__name__}: {e})") from None


def _check_size(image, width: int, height: int) -> None:
    """Some pixels, no more than MAX_IMAGE_PIXELS, no aspect ratio over MAX_ASPECT_RATIO (the image processor's)."""
    if not width or not height:
        raise _image_error(image, "empty", f"{width}x{height} pixels: no pixels")
    if width * height > MAX_IMAGE_PIXELS:
        raise _image_error(image, "too many pixels",
                           f"{width}x{height} pixels is over MAX_IMAGE_PIXELS={MAX_IMAGE_PIXELS}")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise _image_error(image, "aspect ratio", f"{width}x{height} pixels: the aspect ratio is over "
                                                  f"MAX_ASPECT_RATIO={MAX_ASPECT_RATIO}")


def _png_checksum_error(raw: bytes) -> str | None:
    """The first PNG chunk whose CRC-32 is wrong (PIL checks only the chunks before the image data), or None."""
    pos = 8  # after the signature; each chunk: length (4), type (4), data (length), CRC-32 of type + data (4)
    while pos + 12 <= len(raw):
        length = int.from_bytes(raw[pos:pos + 4], "big")
        kind, end = raw[pos + 4:pos + 8], pos + 8 + length
        if end + 4 > len(raw):
            return f"PNG chunk {kind!r} at byte {pos} runs past the end of the file"
        if zlib.crc32(raw[pos + 4:end]) != int.from_bytes(raw[end:end + 4], "big"):
            return f"PNG chunk {kind!r} at byte {pos} fails its CRC-32 checksum"
        if kind == b"IEND":
            return None
        pos = end + 4
    return None


def _rgb(image: Image.Image) -> Image.Image:
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.point(lambda v: v / 256).convert("L")  # 16-bit grayscale -> 8-bit
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


# ----------------------------------------------------------------------------------------------------------
# Image paths, checked when a dataset is loaded: the errors name file, record and field.


@functools.lru_cache(maxsize=4096)
def _real(directory: str) -> str:
    return os.path.realpath(directory)


def image_file(root, relative: str, source, index, key: str) -> ImagePath:
    """An image path of a record, checked: relative, inside the image root (symlinks resolved), a file.

    The directories' real paths are cached, so a file costs two system calls (lstat, stat), not one per
    path component: a million images load in seconds.
    """
    where, root = Source(str(source), index, key), str(root or "")
    if "\0" in relative:  # the OS refuses such a path (os.stat: "embedded null byte"), so no file can be named
        raise DataError(f"{where}: image path {relative!r} holds a NUL byte", "bad path", key)
    if os.path.isabs(relative):
        raise DataError(f"{where}: image path {relative!r} is absolute; image paths are relative to the image "
                        f"root ({root or '.'})", "outside root", key)
    path = os.path.join(root, relative)
    real = os.path.normpath(os.path.join(_real(os.path.dirname(path) or "."), os.path.basename(path)))
    if os.path.islink(real):
        real = os.path.realpath(real)
    real_root = _real(root or ".")
    if real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep):
        raise DataError(f"{where}: image {path} resolves to {real}, outside the image root {real_root}", "outside root",
                        key)
    try:
        mode = os.stat(real).st_mode
    except OSError:
        raise DataError(f"{where}: image file {path} does not exist", "missing", key) from None
    if stat.S_ISDIR(mode):
        raise DataError(f"{where}: image {path} is a directory, not an image file", "directory", key)
    if not stat.S_ISREG(mode):
        raise DataError(f"{where}: image {path} is not a regular file", "missing", key)
    return ImagePath(path, where)


# ----------------------------------------------------------------------------------------------------------
# Parquet: rows read a row group at a time, image cells left in the file until used.


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading parquet needs pyarrow: pip install pyarrow") from None
    return pq


@functools.lru_cache(maxsize=16)
def parquet_file(path: str):
    """The opened parquet file; a file that is not parquet (or is truncated: the footer is at its end) raises a
    DataError naming it, not pyarrow's "Parquet magic bytes not found", which does not say which file."""
    pq = _pyarrow_parquet()
    try:
        return pq.ParquetFile(path)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file", "missing") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not a parquet file", "not parquet") from None
    except Exception as e:  # pyarrow.ArrowInvalid (not parquet), OSError (unreadable)
        raise DataError(f"{path}: not a parquet file ({type(e).__name__}: {e}; the file starts with "
                        f"{_first_bytes(path)!r})", "not parquet") from None


def _first_bytes(path: str, n: int = 16) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


@functools.lru_cache(maxsize=2)  # the two images of a pair often share a row group
def _row_group_column(path: str, row_group: int, column: str):
    """One column of one row group: the unit a parquet image is read in. HF's `datasets` writes image datasets
    in row groups of 100 rows; a file written as one huge row group reads its whole column per image."""
    return parquet_file(path).read_row_group(row_group, columns=[column], use_threads=False).column(0)


def _parquet_cell(image: ParquetImage) -> bytes:
    try:
        value = _row_group_column(image.file, image.row_group, image.column)[image.row].as_py()
    except DataError:
        raise
    except Exception as e:  # a damaged page, or the file changed since it was loaded
        raise _image_error(image, "corrupt", f"its row group cannot be read ({type(e).__name__}: {e})") from None
    value = value.get(image.key) if isinstance(value, dict) else value
    return value or b""


def parquet_rows(path: str, columns: Sequence[str], image_columns: Sequence[str] = ()):
    """(index, row dict) for each row of a parquet file, `columns` only (each must exist), a row group at a time.

    No image bytes are read: a cell of an image column becomes a `ParquetImage` (a reference, read when the
    image is used) wherever the file can hold bytes there, else the path it holds, else its raw value (the
    record's parser reports it). Memory stays bounded by the other columns of one row group.
    """
    pf = parquet_file(path)
    present = pf.schema_arrow.names
    missing = [c for c in columns if c not in present]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; the file has {present}")
    largest = max((pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)), default=0)
    if image_columns and largest > 1000:
        print(f"data: {path}: row groups of up to {largest} rows: each image read reads its whole row group's column "
              f"(rewrite the file with row_group_size=100, as HF's datasets does, for fast random reads)",
              file=sys.stderr)
    index = 0
    for g in range(pf.num_row_groups):
        try:
            rows = pf.read_row_group(g, columns=[c for c in columns if c not in image_columns]).to_pylist()
            cells = {c: _image_cells(pf, g, c) for c in image_columns}
        except Exception as e:  # a damaged page: pyarrow names neither the file nor the rows
            last = index + pf.metadata.row_group(g).num_rows - 1
            raise DataError(f"{path}: row group {g} (records {index}-{last}) cannot be read ({type(e).__name__}: "
                            f"{e})", "corrupt") from None
        for c in image_columns:
            for n, cell in enumerate(cells[c]):
                rows[n][c] = cell if cell is not True else \
                    ParquetImage(path, g, n, c, "bytes" if pf.schema_arrow.field(c).type.num_fields else None,
                                 Source(path, index + n, c))
        for row in rows:
            yield index, row
            index += 1


def _image_cells(pf, group: int, column: str) -> list:
    """Per row of a row group: True where an image column holds bytes, else the path or the raw value there.

    A binary column is taken to hold bytes in every row (an empty or null cell fails when it is decoded);
    an HF image struct {bytes, path} is read for its paths only, and for its bytes only where the file's
    statistics say some are null.
    """
    import pyarrow as pa
    kind, rows = pf.schema_arrow.field(column).type, pf.metadata.row_group(group).num_rows
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return [True] * rows
    if not pa.types.is_struct(kind):
        return pf.read_row_group(group, columns=[column]).column(0).to_pylist()
    names = [kind.field(i).name for i in range(kind.num_fields)]
    paths = pf.read_row_group(group, columns=[f"{column}.path"]).column(0).to_pylist() if "path" in names else [{}] * rows
    paths = [p.get("path") if p else None for p in paths]
    if "bytes" not in names:
        return [p or {} for p in paths]
    meta = pf.metadata.row_group(group)
    stats = next(meta.column(i).statistics for i in range(meta.num_columns)
                 if meta.column(i).path_in_schema == f"{column}.bytes")
    if stats is not None and stats.has_null_count and stats.null_count == 0:
        return [True] * rows
    blobs = pf.read_row_group(group, columns=[f"{column}.bytes"]).column(0).to_pylist()
    return [True if b and b.get("bytes") else (p or {}) for b, p in zip(blobs, paths)]


def expand_paths(paths) -> list[str]:
    """One path or many; a directory stands for its *.parquet files, a pattern for its matches (sorted)."""
    import glob
    out = []
    for p in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        p = str(p)
        if os.path.isdir(p):
            matches = sorted(glob.glob(os.path.join(p, "*.parquet")))
        elif glob.has_magic(p):
            matches = sorted(glob.glob(p))
        else:
            matches = [p]
        if not matches:
            raise DataError(f"{p}: no parquet files there" if os.path.isdir(p) else f"{p}: matches no file", "missing")
        out += matches
    return out


# ----------------------------------------------------------------------------------------------------------
# Decoding many images at once (python data.py check, data.drop_unreadable)


def _check_one(image) -> tuple[str, str] | None:
    try:
        load_image(image)
    except DataError as e:
        return e.problem, str(e)
    return None


def _forget_open_files() -> None:  # a worker process opens its own parquet files
    parquet_file.cache_clear()
    _row_group_column.cache_clear()


def check_images(images: Sequence, workers: int = 0, progress: bool = False) -> list[tuple[int, DataError]]:
    """Decode every image (in `workers` processes; 0 or 1: in this one) -> [(position, DataError)] of the bad ones."""
    from tqdm import tqdm
    if workers > 1 and len(images) > 1:
        import multiprocessing
        with multiprocessing.get_context("fork").Pool(workers, initializer=_forget_open_files) as pool:
            results = list(tqdm(pool.imap(_check_one, images, chunksize=32), total=len(images), disable=not progress,
                                desc="decode"))
    else:
        results = [_check_one(im) for im in tqdm(images, disable=not progress, desc="decode")]
    return [(n, DataError(message, problem)) for n, r in enumerate(results) if r is not None for problem, message in [r]]
