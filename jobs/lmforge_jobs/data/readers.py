"""WARC reading through fastwarc (``sources[].warc.reader``): the same documents as the warcio reader.

:class:`FastWarcSourceReader` is :class:`~lmforge_jobs.data.blocks.WarcSourceReader` with fastwarc's C++
record parser in place of warcio's Python one. Each fastwarc record is shown to the one function that
turns a record into a document (:func:`~lmforge_jobs.data.blocks.warc_record_to_dict`) through a view
with warcio's names, so both readers keep and skip the same records, with the same ids, urls, dates and
text; the file is opened the same way (the same decompression), so a truncated file fails the same way.
HTTP payloads sent chunked or compressed are decoded by warcio's own decoders, as warcio would.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable
from typing import Any

from datatrove.data import DocumentsPipeline

from lmforge_jobs.data.blocks import UnreadableInput, WarcSourceReader, warc_record_to_dict
from lmforge_jobs.data.config import WarcReaderKind


class _Headers:
    """warcio's ``StatusAndHeaders.get_header`` over a fastwarc header map (both case-insensitive)."""

    def __init__(self, headers: Any) -> None:
        self._headers = headers

    def get_header(self, name: str, default: str | None = None) -> str | None:
        return self._headers.get(name, default)


class _Record:
    """A fastwarc record under the names :func:`warc_record_to_dict` reads (warcio's)."""

    def __init__(self, record: Any) -> None:
        self.rec_type = record.headers.get("WARC-Type")  # as warcio takes it
        self.rec_headers = _Headers(record.headers)
        self.http_headers = _Headers(record.http_headers) if record.http_headers is not None else None
        self._record = record

    def content_stream(self) -> io.RawIOBase | Any:
        """The payload, decoded as warcio's ``content_stream`` decodes it (chunks, content encoding)."""
        raw = self._record.reader.read()
        if self.http_headers is None:
            return io.BytesIO(raw)
        encoding = (self.http_headers.get_header("Content-Encoding") or "").lower() or None
        chunked = self.http_headers.get_header("Transfer-Encoding") == "chunked"
        if encoding is None and not chunked:
            return io.BytesIO(raw)
        from warcio.bufferedreaders import BufferedReader, ChunkedDataReader

        if encoding not in BufferedReader.get_supported_decompressors():
            encoding = None
        if chunked:
            return ChunkedDataReader(io.BytesIO(raw), decomp_type=encoding)
        return BufferedReader(io.BytesIO(raw), decomp_type=encoding) if encoding else io.BytesIO(raw)


class FastWarcSourceReader(WarcSourceReader):
    """:class:`WarcSourceReader` parsing records with fastwarc (see the module docstring)."""

    name = "🕷 WARC (fastwarc)"
    _requires_dependencies = ["fastwarc", "warcio"]

    def _read_all(self, filepath: str) -> DocumentsPipeline:
        from fastwarc.warc import ArchiveIterator

        with self.data_folder.open(filepath, "rb", compression=self.compression) as f:
            try:
                for index, record in enumerate(ArchiveIterator(f, parse_http=True)):
                    with self.track_time():
                        found = warc_record_to_dict(_Record(record))
                        document = found and self.get_document_from_dict(found, filepath, index)
                    if document:
                        yield document
            except (EOFError, OSError, zlib.error) as exc:  # broken or truncated, as warcio reports it
                raise UnreadableInput(filepath, str(exc) or type(exc).__name__) from None


def fastwarc_available() -> bool:
    try:
        import fastwarc.warc  # noqa: F401
    except ImportError:
        return False
    return True


def warc_reader(kind: WarcReaderKind | str) -> Callable[..., WarcSourceReader]:
    """The reader class for ``sources[].warc.reader``."""
    kind = WarcReaderKind(kind)
    if kind is WarcReaderKind.auto:
        kind = WarcReaderKind.fastwarc if fastwarc_available() else WarcReaderKind.warcio
    return FastWarcSourceReader if kind is WarcReaderKind.fastwarc else WarcSourceReader


__all__ = ["FastWarcSourceReader", "WarcReaderKind", "fastwarc_available", "warc_reader"]
