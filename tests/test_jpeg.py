"""skindual/jpeg.py: a JPEG's metadata stripped losslessly (the real dataset keeps the pixels, not the notes)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageCms

from skindual.jpeg import strip_metadata

PIXELS = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
GPS_IFD = 0x8825


def jpeg_with_metadata(pixels: np.ndarray, **save: object) -> bytes:
    """A JPEG of `pixels` as a camera and an editor leave it: EXIF (make, model, date, orientation, GPS position),
    an ICC profile, XMP and a comment."""
    exif = Image.Exif()
    exif[0x010F], exif[0x0110], exif[0x0132], exif[0x0112] = "DermaCam", "DC-1", "2024:05:06 07:08:09", 6
    exif[GPS_IFD] = {1: "N", 2: (52.0, 31.0, 12.5), 3: "E", 4: (13.0, 24.0, 5.5)}
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90, exif=exif.tobytes(), comment=b"patient 4711",
                                 icc_profile=ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes(),
                                 xmp=b"<x:xmpmeta>GPSLatitude 52,31.2N</x:xmpmeta>", **save)
    return buffer.getvalue()


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def has_no_metadata(data: bytes) -> bool:
    image = Image.open(io.BytesIO(data))
    return (not image.getexif() and not image.getexif().get_ifd(GPS_IFD)
            and set(image.info) <= {"jfif", "jfif_version", "jfif_unit", "jfif_density", "adobe",
                                    "adobe_transform", "progressive", "progression"}
            and not any(needle in data for needle in (b"Exif", b"DermaCam", b"patient", b"ICC_PROFILE", b"xmpmeta")))


@pytest.mark.parametrize("save", [{}, {"progressive": True}, {"restart_marker_rows": 1}], ids=str)
def test_exif_gps_icc_xmp_and_comments_go_and_the_pixels_stay(save):
    source = jpeg_with_metadata(PIXELS, **save)
    assert Image.open(io.BytesIO(source)).getexif().get_ifd(GPS_IFD)  # the camera's position is there
    stripped = strip_metadata(source)
    assert has_no_metadata(stripped) and np.array_equal(decoded(stripped), decoded(source))
    assert strip_metadata(stripped) == stripped and len(stripped) < len(source)


def test_a_plain_jpeg_is_kept_byte_for_byte_and_adobes_colour_transform_stays():
    buffer = io.BytesIO()
    Image.fromarray(PIXELS).save(buffer, "JPEG")
    assert strip_metadata(buffer.getvalue()) == buffer.getvalue()  # the JFIF header alone: nothing to strip
    cmyk = io.BytesIO()
    Image.fromarray(PIXELS).convert("CMYK").save(cmyk, "JPEG")  # Adobe APP14: how to decode it
    assert strip_metadata(cmyk.getvalue()) == cmyk.getvalue()


def test_a_jfif_thumbnail_and_bytes_after_the_image_go():
    buffer = io.BytesIO()
    Image.fromarray(PIXELS).save(buffer, "JPEG")
    plain = buffer.getvalue()
    jfif_end = 4 + int.from_bytes(plain[4:6], "big")
    thumbnail = bytes(range(2 * 2 * 3))  # 2×2 RGB
    app0 = plain[6:jfif_end - 2] + bytes((2, 2)) + thumbnail
    with_thumbnail = plain[:2] + b"\xff\xe0" + (len(app0) + 2).to_bytes(2, "big") + app0 + plain[jfif_end:]
    assert strip_metadata(with_thumbnail + b"appended secrets") == plain
    with pytest.raises(ValueError, match="not a JPEG"):
        strip_metadata(b"\x89PNG\r\n")
