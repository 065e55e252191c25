"""Opening a text source: plain, or compressed (gzip, bzip2, zstd) and decompressed as a stream.

The compression is told by the file's first bytes (a misnamed `.csv` that is really gzip still reads),
and anything else that is not text (a zip archive, a spreadsheet, an xz file) is refused with an error
that says what the file looks like and what to do. Decompression runs in pyarrow's C codecs, which
release the GIL, so the reader thread still overlaps with validation.
"""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa

from client.ingest.schema import IngestError

_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bz2", b"\x28\xb5\x2f\xfd": "zstd"}
_NOT_TEXT = {
    b"PK\x03\x04": "a zip archive (or an .xlsx workbook): extract or export it as CSV first",
    b"\xfd7zXZ": "an xz file: decompress it first (xz -d), or recompress as .gz/.bz2/.zst",
    b"7z\xbc\xaf": "a 7-Zip archive: extract it first",
    b"\xd0\xcf\x11\xe0": "an old Excel/Office file: export it as CSV first",
    b"PAR1": "a Parquet file: use --format parquet",
}
_BUFFER = 1 << 20


def sniff(path: Path) -> str | None:
    """The stream compression of `path` from its magic bytes (None: not compressed)."""
    with Path(path).open("rb") as handle:
        head = handle.read(8)
    return next((codec for magic, codec in _MAGIC.items() if head.startswith(magic)), None)


def check_text(path: Path, sample: bytes) -> None:
    """Refuse a source whose first bytes are not text, naming what it looks like."""
    for magic, what in _NOT_TEXT.items():
        if sample.startswith(magic):
            raise IngestError(f"{path.name} is not a text export but {what}")
    head = sample[:65536]
    # a stray NUL is a bad row (quarantined); a text full of them is UTF-16 or binary
    if head.startswith((b"\xff\xfe", b"\xfe\xff")) or (len(head) >= 256 and head.count(0) > len(head) // 4):
        raise IngestError(
            f"{path.name} holds NUL bytes, so it is not a UTF-8 text export (UTF-16 or binary?); "
            "re-export it as UTF-8 CSV or JSON Lines (compressed .gz/.bz2/.zst files are fine)"
        )


class _Decompressed(io.RawIOBase):
    """A raw stream over pyarrow's decompressing reader; `readinto` fills the buffer unless at the end
    (pyarrow may return short reads, which would otherwise make many small batches)."""

    def __init__(self, path: Path, codec: str) -> None:
        self._file = pa.OSFile(str(path), "rb")
        self._stream = pa.CompressedInputStream(self._file, codec)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        filled = 0
        while filled < len(view):
            got = self._stream.readinto(view[filled:])
            if not got:
                break
            filled += got
        return filled

    def compressed_position(self) -> int:
        """Compressed bytes consumed so far (for estimating the decompressed size)."""
        return int(self._file.tell())

    def close(self) -> None:
        if not self.closed:
            self._stream.close()
            self._file.close()
        super().close()


def open_source(path: Path) -> io.BufferedReader:
    """`path` opened for binary reading, decompressed if it is gzip, bzip2 or zstd."""
    codec = sniff(path)
    if codec is None:
        return Path(path).open("rb")
    return io.BufferedReader(_Decompressed(Path(path), codec), buffer_size=_BUFFER)


def sample(path: Path, size: int) -> tuple[bytes, float]:
    """The first `size` decompressed bytes and the decompressed-to-file size ratio seen on them."""
    codec = sniff(path)
    if codec is None:
        with Path(path).open("rb") as handle:
            return handle.read(size), 1.0
    raw = _Decompressed(Path(path), codec)
    try:
        buf = bytearray(size)
        got = raw.readinto(memoryview(buf))
        # the whole file fitted: the exact ratio; else compressed bytes read so far (read-ahead makes
        # that an over-estimate, so the ratio errs low, which only means fewer, larger partitions)
        consumed = Path(path).stat().st_size if got < size else raw.compressed_position()
        return bytes(buf[:got]), max(1.0, got / max(1, consumed))
    finally:
        raw.close()
