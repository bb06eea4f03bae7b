"""skindual.images: shard members are opened only as the format their names give, and their size is checked
against what the sample's json records before a pixel is decoded, on every reader (`pairs.decode_sample`,
`shards.read_shards`, the mask source)."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageDraw
from test_data import EPS, png_header

from skindual import images
from skindual.errors import DataError
from skindual.mask_source import given_mask
from skindual.pairs import decode_sample
from skindual.quality import MaskLimits
from skindual.shard_store import commit_shard
from skindual.shards import read_shards
from skindual.storage import open_storage

KEY = "000010002"  # shard 1, index 2
WIDTH, HEIGHT = 24, 16


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def sample(**members: bytes) -> dict:
    """A shard sample as the readers get it: an ellipse on skin at WIDTH×HEIGHT, its mask and its json; `members`
    replace or add members."""
    mask = Image.new("L", (WIDTH, HEIGHT), 0)
    ImageDraw.Draw(mask).ellipse((6, 4, 18, 12), fill=255)
    image = Image.new("RGB", (WIDTH, HEIGHT), (222, 180, 160))
    image.paste((90, 50, 30), mask=mask)
    return {"__key__": KEY, "jpg": encoded(image, "JPEG"), "seg.png": encoded(mask, "PNG"), "cls": b"4",
            "txt": b"a melanoma", "json": json.dumps({"key": KEY, "width": WIDTH, "height": HEIGHT}).encode(),
            **members}


def test_a_good_sample_decodes():
    pair = decode_sample(sample())
    assert pair["image"].shape == (HEIGHT, WIDTH, 3) and pair["mask"].sum() > 0 and pair["class_index"] == 4


@pytest.mark.parametrize("member, data, said", [
    ("jpg", encoded(Image.new("RGB", (WIDTH, HEIGHT)), "PNG"), "member 000010002.jpg of shard 00001 cannot be decoded "
                                                               "as JPEG"),
    ("jpg", EPS, "member 000010002.jpg of shard 00001 cannot be decoded as JPEG"),
    ("seg.png", encoded(Image.new("L", (WIDTH, HEIGHT)), "JPEG"), "member 000010002.seg.png of shard 00001 cannot be "
                                                                  "decoded as PNG"),
], ids=["png-in-jpg", "postscript-in-jpg", "jpeg-in-seg.png"])
def test_a_member_is_opened_only_as_its_names_format(member, data, said):
    with pytest.raises(DataError, match=said + r".*run the job that wrote the dataset again"):
        decode_sample(sample(**{member: data}))


@pytest.mark.parametrize("members, said", [
    ({"json": json.dumps({"width": 64, "height": HEIGHT}).encode()}, "jpg of shard 00001 is 24x16 but is recorded as "
                                                                     "64x16"),
    ({"seg.png": png_header((12000, 12000))}, "seg.png of shard 00001 is 12000x12000, more than the 67108864 pixels"),
    ({"ignore.png": png_header((600, 450))}, "ignore.png of shard 00001 is 600x450 but is recorded as 24x16"),
], ids=["image-not-its-recorded-size", "huge-mask", "ignore-map-not-its-recorded-size"])
def test_a_members_size_is_checked_against_its_record_before_decoding(members, said):
    with pytest.raises(DataError, match=said):
        decode_sample(sample(**members), size=8)


def test_read_shards_decodes_through_the_same_checks(tmp_path):
    table = pa.Table.from_pylist([{"key": KEY, "class_code": "mel", "status": "ok", "reason": None}])
    good, bad = open_storage(str(tmp_path / "good")), open_storage(str(tmp_path / "bad"))
    commit_shard(good, 1, [sample()], table, "fp")
    commit_shard(bad, 1, [sample(jpg=EPS)], table, "fp")
    (read,) = list(read_shards(good.url))
    expected = decode_sample(sample())
    assert np.array_equal(read["image"], expected["image"]) and np.array_equal(read["mask"], expected["mask"])
    assert read["class_index"] == 4 and read["prompt"] == "a melanoma" and read["meta"]["width"] == WIDTH
    with pytest.raises(DataError, match=r"member 000010002\.jpg of shard 00001 \(.*00001\.tar\) cannot be decoded as JPEG"):
        list(read_shards(bad.url))


def test_a_given_mask_is_opened_only_as_png():
    mask, _ = given_mask(sample()["seg.png"], 16, 0, MaskLimits(min_area=0, max_area=1, min_main_share=0))
    assert mask.shape == (16, 16)
    with pytest.raises(DataError, match="a --mask-source mask cannot be decoded as PNG"):
        given_mask(EPS, 16, 0, MaskLimits())


def test_a_name_without_an_image_extension_is_refused():
    assert images.image_format("x/ISIC_1.JPEG") == "JPEG" and images.image_format("seg.png") == "PNG"
    with pytest.raises(DataError, match=r"ISIC_1\.eps: not a \.jpg, \.jpeg or \.png name"):
        images.image_format("ISIC_1.eps")
