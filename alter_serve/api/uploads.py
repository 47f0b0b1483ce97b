"""Multipart uploads streamed straight to disk.

FastAPI's `UploadFile` parameters make Starlette parse the whole body first, spooling each file
into a temp file of its own (in RAM up to 1 MiB, then in the system temp folder), which the route
then copies again. Here the body is read once, as it arrives (`request.stream()`), through
python-multipart's streaming parser, and each file part is written to its final name in a folder
the caller chose (under the registry's data directory, so the validated bundle is read from the
disk it is stored on). Memory use is one network chunk, whatever the upload's size; a part over its
byte cap stops the upload at once with 413, and unknown or missing fields are a 400.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from fastapi import Request
from python_multipart import MultipartParser
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import parse_options_header

from .errors import invalid, too_large

MAX_TEXT_FIELD_BYTES = 4096  # a name or a flag


@dataclass(frozen=True, slots=True)
class FilePart:
    """A file field: where it is written, and the most bytes it may have."""

    filename: str
    max_bytes: int


@dataclass
class _Receiver:
    """python-multipart callbacks: headers name the part; its bytes go to its file or text buffer."""

    folder: Path
    files: dict[str, FilePart]
    texts: dict[str, bytearray] = field(default_factory=dict)
    received: set[str] = field(default_factory=set)
    _header: bytearray = field(default_factory=bytearray)
    _value: bytearray = field(default_factory=bytearray)
    _disposition: bytes = b""
    _name: str | None = None
    _out: BinaryIO | None = None
    _size: int = 0

    def callbacks(self) -> dict:
        return {"on_part_begin": self._begin, "on_header_field": self._header_field, "on_header_value": self._header_value,
                "on_header_end": self._header_end, "on_headers_finished": self._headers_done,
                "on_part_data": self._data, "on_part_end": self._end}

    def _begin(self) -> None:
        self._disposition, self._name, self._size = b"", None, 0

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        if bytes(self._header).lower() == b"content-disposition":
            self._disposition = bytes(self._value)
        self._header.clear()
        self._value.clear()

    def _headers_done(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name in self.received:
            raise invalid(f"The form field '{name}' was sent twice.", name)
        if name in self.files:
            self._out = (self.folder / self.files[name].filename).open("wb")
        elif name in self.texts:
            pass
        else:
            raise invalid(f"Unexpected form field '{name}'; expected {sorted([*self.files, *self.texts])}.", name)
        self._name = name

    def _data(self, data: bytes, start: int, end: int) -> None:
        self._size += end - start
        if self._out is not None:
            limit = self.files[self._name].max_bytes
            if self._size > limit:
                raise too_large(limit)
            self._out.write(data[start:end])
        elif self._size > MAX_TEXT_FIELD_BYTES:
            raise invalid(f"The form field '{self._name}' is longer than {MAX_TEXT_FIELD_BYTES} bytes.", self._name)
        else:
            self.texts[self._name] += data[start:end]

    def _end(self) -> None:
        self.close()
        if self._name is not None:
            self.received.add(self._name)

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None


async def receive_form(request: Request, folder: Path, files: dict[str, FilePart],
                       texts: tuple[str, ...] = ()) -> dict[str, str]:
    """Stream the multipart/form-data body of `request` into `folder`: each field of `files` is
    written to `folder / filename` as it arrives (at most `max_bytes`); every field of `files` is
    required, the `texts` fields are optional. Returns the text fields sent."""
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise invalid("Send the upload as multipart/form-data (curl -F, or `alter-serve bundles upload`).")
    receiver = _Receiver(folder, files, {name: bytearray() for name in texts})
    parser = MultipartParser(boundary, receiver.callbacks())
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise invalid(f"The multipart body could not be parsed: {exc}.") from None
    finally:
        receiver.close()
    missing = sorted(set(files) - receiver.received)
    if missing:
        raise invalid(f"The upload lacks the form field(s) {missing}.", missing[0])
    return {name: receiver.texts[name].decode("utf-8", "replace") for name in texts if name in receiver.received}
