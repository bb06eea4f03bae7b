"""Image bytes from outside, opened safely: the one way skindual turns a JPEG or PNG file or shard member
into pixels.

Every image, mask and ignore map is opened as the single format its file or member name's extension
names (``.jpg``/``.jpeg``: JPEG, ``.png``: PNG), so bytes of any other format (PostScript in a ``.jpg``,
which PIL would otherwise hand to Ghostscript) are refused instead of decoded.  The header's width and
height are checked before a pixel is decoded: at most `MAX_PIXELS`, and equal to the size a record
gives (a shard sample's json, a mask's image) where there is one.  Every refusal is one `DataError`
naming the file or member and saying what to do.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from skindual.errors import DataError
from skindual.prompts import MAX_SAMPLES_PER_SHARD

IMAGE_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG"}
"""A name's extension → the one format (PIL's name) its bytes are opened as."""
MAX_PIXELS = 1 << 26
"""The most pixels an image, mask or ignore map may have (about 67 megapixels): well above any dermoscopy
photograph, well below what would exhaust a worker's memory when decoded."""
REPLACE = "replace it with an intact copy"
RERUN = "run the job that wrote the dataset again"


def image_format(name: str) -> str:
    """The format `name`'s extension pins (``JPEG`` or ``PNG``); a `DataError` for any other extension."""
    extension = name.rpartition(".")[2].lower()  # a member's own name ("jpg", "seg.png") works too
    if extension not in IMAGE_FORMATS:
        raise DataError(f"{name}: not a .jpg, .jpeg or .png name, so no image format is known for it; "
                        "give JPEG images and PNG masks with those extensions")
    return IMAGE_FORMATS[extension]


def open_image(data: bytes, name: str, size: tuple[int, int] | None = None, *, what: str | None = None,
               fix: str = REPLACE) -> Image.Image:
    """`data` opened as the format `name`'s extension pins, its header read and nothing decoded yet.

    A `DataError` naming `what` (default: `name`) and ending in `fix` when the bytes are not that format,
    hold more than `MAX_PIXELS` pixels, or are not `size` (width, height) where that is given.
    """
    fmt, what = image_format(name), what or name
    try:
        with warnings.catch_warnings():  # a decompression-bomb warning: refused below, by our own bound
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=[fmt])
    except Image.DecompressionBombError:
        raise DataError(f"{what} holds more than {MAX_PIXELS} pixels, more than an image may have here; {fix}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{what} cannot be decoded as {fmt}, the format its name says ({_reason(e)}); {fix}") from None
    width, height = image.size
    if width * height > MAX_PIXELS:
        image.close()
        raise DataError(f"{what} is {width}x{height}, more than the {MAX_PIXELS} pixels an image may have here; {fix}")
    if size is not None and (width, height) != tuple(size):
        image.close()
        raise DataError(f"{what} is {width}x{height} but is recorded as {size[0]}x{size[1]}; {fix}")
    return image


def decode_image(data: bytes, name: str, mode: str, size: tuple[int, int] | None = None, *,
                 draft: int | None = None, what: str | None = None, fix: str = REPLACE) -> Image.Image:
    """`open_image`, then decoded into `mode` (``RGB``, ``L``); a JPEG at the smallest scale that still
    covers `draft` × `draft` when given (PIL's draft mode).  Bytes that stop decoding part-way are a
    `DataError` too."""
    what = what or name
    with open_image(data, name, size, what=what, fix=fix) as image:
        if draft is not None:
            image.draft(mode, (draft, draft))
        try:
            return image.convert(mode)
        except (OSError, SyntaxError, ValueError) as e:
            raise DataError(f"{what} cannot be decoded ({_reason(e)}); {fix}") from None


def recorded_size(meta: Mapping[str, Any]) -> tuple[int, int] | None:
    """The (width, height) a shard sample's json records, or None when it records none."""
    width, height = meta.get("width"), meta.get("height")
    if isinstance(width, int) and isinstance(height, int):
        return width, height
    return None


def member_label(sample: Mapping[str, Any], member: str) -> str:
    """How a message names one member of a shard sample: ``member 000010004.jpg of shard 00001`` (and the
    shard's location when the reader gives it)."""
    key = str(sample.get("__key__", "?"))
    shard = f" of shard {int(key) // MAX_SAMPLES_PER_SHARD:05d}" if key.isdigit() else ""
    url = str(sample.get("__url__") or "")  # the shard's tar, where `shards.read_shards` gives it
    where = f" ({url})" if url else ""
    return f"member {key}.{member}{shard}{where}"


def decode_members(sample: Mapping[str, Any], meta: Mapping[str, Any],
                   draft: int | None = None) -> tuple[Image.Image, np.ndarray, np.ndarray | None]:
    """A shard sample's image (RGB; a JPEG drafted to cover `draft` when given), mask and ignore map (uint8
    0/1; None when the sample has none), each opened as its member name's format and checked against the
    width and height its json (`meta`) records before it is decoded."""
    size = recorded_size(meta)
    member = "jpg" if "jpg" in sample else "png"
    image = decode_image(sample[member], member, "RGB", size, draft=draft, what=member_label(sample, member), fix=RERUN)
    masks = [(np.asarray(decode_image(sample[m], m, "L", size, what=member_label(sample, m), fix=RERUN)) >= 128)
             .astype(np.uint8) if m in sample else None for m in ("seg.png", "ignore.png")]
    return image, masks[0], masks[1]


def _reason(exc: BaseException) -> str:
    """An exception's message without PIL's ``<_io.BytesIO object at 0x…>``."""
    return re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(exc)).strip() or type(exc).__name__
