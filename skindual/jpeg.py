"""A JPEG's metadata stripped without re-encoding: the real dataset keeps the downloaded pixels, not the camera's notes.

A dermoscopy download's JPEGs can carry EXIF (the camera, the date, GPS coordinates), XMP, IPTC, maker notes,
comments and thumbnails (a thumbnail may show what a crop removed).  `strip_metadata` drops every APPn and COM
segment except the two that decoding reads: the JFIF APP0 header (its thumbnail removed) and Adobe's APP14
(the colour transform of YCCK/CMYK and of Adobe's RGB files); the frame, tables and entropy-coded scans are
copied byte for byte, so the decoded pixels are the same.  The ICC profile (APP2) goes too: skindual decodes
every image without colour management (Pillow's RGB), so no pixel it trains or measures on depends on it,
and a profile names the device it came from.  EXIF's orientation goes with the rest: skindual (and the
masks of HAM10000 and ISIC 2018) use the stored pixel grid, which viewers then show as it is.
"""

from __future__ import annotations

SOI, EOI, SOS, COM, APP0, APP14 = 0xD8, 0xD9, 0xDA, 0xFE, 0xE0, 0xEE
JFIF_HEADER = 14
"""Bytes of a JFIF APP0 payload before its thumbnail: identifier, version, units, densities, thumbnail size."""


def _standalone(marker: int) -> bool:
    """A marker without a length: RST0-7, TEM (and SOI / EOI, handled apart)."""
    return 0xD0 <= marker <= 0xD7 or marker == 0x01


def _kept(marker: int, payload: bytes) -> bytes | None:
    """The payload to keep of a segment before the first scan's data, or None to drop it."""
    if marker == APP0:
        if payload.startswith(b"JFIF\0") and len(payload) >= JFIF_HEADER:
            return payload[:JFIF_HEADER - 2] + b"\0\0"  # no thumbnail
        return None  # JFXX (a thumbnail) and other APP0s
    if marker == APP14:
        return payload if payload.startswith(b"Adobe") else None
    if 0xE1 <= marker <= 0xEF or marker == COM:
        return None
    return payload


def _scan_end(data: bytes, start: int) -> int:
    """Where the entropy-coded data from `start` ends: the next marker (0xFF not followed by a stuffed 0
    or a restart marker), or the end of the data."""
    position = start
    while True:
        position = data.find(b"\xff", position)
        if position < 0 or position + 1 >= len(data):
            return len(data)
        following = data[position + 1]
        if following == 0 or 0xD0 <= following <= 0xD7:
            position += 2
            continue
        return position


def strip_metadata(data: bytes) -> bytes:
    """`data` (a baseline or progressive JPEG) without its metadata segments (see the module); the same
    bytes otherwise, anything after the end-of-image marker dropped.  ValueError if it is not a JPEG
    whose segments can be walked."""
    if data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG (no start-of-image marker)")
    out, position, size = [b"\xff\xd8"], 2, len(data)
    while position < size:
        if data[position] != 0xFF:
            raise ValueError(f"no marker at byte {position}")
        while position < size and data[position] == 0xFF:  # fill bytes
            position += 1
        if position >= size:
            break
        marker, position = data[position], position + 1
        if marker == EOI:
            out.append(b"\xff\xd9")
            break
        if _standalone(marker) or marker == SOI:
            out.append(bytes((0xFF, marker)))
            continue
        if position + 2 > size:
            raise ValueError(f"a segment's length is cut at byte {position}")
        length = int.from_bytes(data[position:position + 2], "big")
        if length < 2 or position + length > size:
            raise ValueError(f"a segment of length {length} at byte {position} runs past the data")
        payload, position = data[position + 2:position + length], position + length
        kept = _kept(marker, payload)
        if kept is not None:
            out.append(bytes((0xFF, marker)) + (len(kept) + 2).to_bytes(2, "big") + kept)
        if marker == SOS:
            end = _scan_end(data, position)
            out.append(data[position:end])
            position = end
    return b"".join(out)
