"""skindual.data on tiny HAM10000 and ISIC 2018 folders built in tmp_path."""

from __future__ import annotations

import csv
import io
import os
import random
import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageDraw

from skindual.data import (
    HAM_COLUMNS,
    HAM_MASKS,
    ISIC_IMAGES,
    ISIC_MASKS,
    SKIP_REASONS,
    SOURCE_SCHEMA,
    TRAINING_TABLE_SCHEMA,
    load_pair,
    read_ham10000,
    read_isic2018,
    training_table,
)
from skindual.errors import DataError, UserError
from skindual.prompts import CLASS_CODES, build_prompt

SIZE = (32, 24)  # width, height: not square, so load_pair has to crop
LESIONS = {"akiec": 3, "bcc": 3, "bkl": 4, "df": 1, "mel": 5, "nv": 8, "vasc": 2}


def ellipse_mask(size: tuple[int, int] = SIZE) -> Image.Image:
    w, h = size
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=255)
    return mask


def write_pair(image_path: Path, mask_path: Path, size: tuple[int, int] = SIZE) -> None:
    """A skin-coloured JPEG with a brown ellipse, and the ellipse's exact PNG mask."""
    mask = ellipse_mask(size)
    image = Image.new("RGB", size, (222, 180, 160))
    image.paste((90, 50, 30), mask=mask)
    image_path.parent.mkdir(parents=True, exist_ok=True)
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    image.save(image_path, quality=95)
    mask.save(mask_path)


def ham_rows(lesions: dict[str, int] = LESIONS) -> list[dict]:
    """Rows for `lesions[code]` lesions per class; every other lesion has two images."""
    rows, image = [], 24306
    for code in CLASS_CODES:
        for i in range(lesions.get(code, 0)):
            lesion = f"HAM_{code}{i:03d}"
            for _ in range(1 + i % 2):
                rows.append({
                    "lesion_id": lesion, "image_id": f"ISIC_{image:07d}", "dx": code, "dx_type": "histo",
                    "age": "" if image % 5 == 0 else "45.0", "sex": "unknown" if image % 3 == 0 else "female",
                    "localization": "back",
                })
                image += 1
    return rows


def write_csv(root: Path, rows: list[dict], columns: tuple[str, ...] = HAM_COLUMNS) -> Path:
    path = root / "HAM10000_metadata.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def make_ham(root: Path, rows: list[dict] | None = None, *, dataset: bool = False, empty_files: bool = False) -> Path:
    """A HAM10000 folder: images alternate between two part folders, masks in the tschandl folder."""
    rows = ham_rows() if rows is None else rows
    columns = HAM_COLUMNS
    if dataset:
        columns += ("dataset",)
        for i, row in enumerate(rows):
            row["dataset"] = "vidir_modern" if i % 2 else "rosendahl"
    for i, row in enumerate(rows):
        image = root / f"HAM10000_images_part_{1 + i % 2}" / f"{row['image_id']}.jpg"
        mask = root / HAM_MASKS / f"{row['image_id']}_segmentation.png"
        if empty_files:  # enough for check_files=False
            image.parent.mkdir(parents=True, exist_ok=True)
            mask.parent.mkdir(parents=True, exist_ok=True)
            image.touch()
            mask.touch()
        else:
            write_pair(image, mask)
    write_csv(root, rows, columns)
    return root


def make_isic(root: Path, n: int = 4) -> Path:
    for i in range(n):
        write_pair(root / ISIC_IMAGES / f"ISIC_{i:07d}.jpg", root / ISIC_MASKS / f"ISIC_{i:07d}_segmentation.png")
    (root / ISIC_IMAGES / "LICENSE.txt").write_text("CC-BY-NC")
    return root


def image_of(root: Path, image_id: str) -> Path:
    return next(root.rglob(f"{image_id}.jpg"))


def mask_of(root: Path, image_id: str) -> Path:
    return root / HAM_MASKS / f"{image_id}_segmentation.png"


# --- HAM10000 reader -----------------------------------------------------------------------------


def test_ham_reads_every_row_with_its_metadata(tmp_path):
    rows = ham_rows()
    report = read_ham10000(make_ham(tmp_path, rows, dataset=True))
    table = report.table
    assert report.skipped == {} and report.skipped_files == []
    assert table.schema == SOURCE_SCHEMA
    assert table.num_rows == len(rows)
    by_id = {r["image_id"]: r for r in table.to_pylist()}
    for row in rows:
        got = by_id[row["image_id"]]
        assert got["lesion_id"] == row["lesion_id"] and got["class_code"] == row["dx"]
        assert got["class_index"] == CLASS_CODES.index(row["dx"]) and got["source"] == "ham10000"
        assert got["age"] == (float(row["age"]) if row["age"] else None)
        assert got["sex"] == row["sex"] and got["dataset"] == row["dataset"] and got["dx_type"] == "histo"
        assert got["prompt"] == build_prompt(row["dx"], "back", got["age"], row["sex"])
        assert os.path.isabs(got["image_path"]) and os.path.isfile(got["image_path"])
        assert got["mask_path"] == str(mask_of(tmp_path, row["image_id"]))
    folders = {Path(p).parent.name for p in table.column("image_path").to_pylist()}
    assert folders == {"HAM10000_images_part_1", "HAM10000_images_part_2"}
    assert table.column("image_id").to_pylist() == sorted(by_id)


def test_ham_without_dataset_column_has_null_dataset(tmp_path):
    table = read_ham10000(make_ham(tmp_path)).table
    assert table.column("dataset").null_count == table.num_rows


def test_ham_lesion_with_two_diagnoses_is_an_error(tmp_path):
    rows = ham_rows()
    twin = next(r for r in rows if r["lesion_id"] == "HAM_nv001")
    twin["dx"] = "mel"
    with pytest.raises(DataError, match="lesion HAM_nv001 has two diagnoses"):
        read_ham10000(make_ham(tmp_path, rows), skip_bad=True)


# --- bad input: one clear error, or skipped and counted ----------------------------------------------

VICTIM = "ISIC_0024330"  # an nv image: nv keeps other rows when it is skipped


def _rewrite_row(root: Path, **values: str) -> None:
    rows = ham_rows()
    next(r for r in rows if r["image_id"] == VICTIM).update(values)
    write_csv(root, rows)


def _save_as(path: Path, image: Image.Image) -> None:
    image.save(path, format="PNG")


def _jpeg_noise_mask(path: Path) -> None:
    ellipse_mask().save(path.with_suffix(".jpg"), quality=75)
    Image.open(path.with_suffix(".jpg")).save(path)
    path.with_suffix(".jpg").unlink()


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 24\n%%EndComments\nshowpage\n%%EOF\n"
"""PostScript: PIL opens it as EPS (and decodes it with Ghostscript) when the format is not pinned."""


def png_header(size: tuple[int, int]) -> bytes:
    """A PNG whose header says `size` but whose pixel data is a few bytes: the header alone must refuse it."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", *size, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _claim_size(path: Path, size: tuple[int, int]) -> None:
    """Rewrite a baseline JPEG's frame header (SOF0) to claim `size`; its pixel data stays as it was."""
    data = bytearray(path.read_bytes())
    frame = data.index(b"\xff\xc0")
    data[frame + 5:frame + 9] = struct.pack(">HH", size[1], size[0])
    path.write_bytes(bytes(data))


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


BREAKERS = {
    # the format is pinned by the extension: PNG or PostScript bytes in a .jpg are refused, never decoded
    "png_image": (lambda root: image_of(root, VICTIM).write_bytes(_png_bytes(Image.new("RGB", SIZE))), "as JPEG"),
    "eps_image": (lambda root: image_of(root, VICTIM).write_bytes(EPS), "as JPEG"),
    # the size is read from the header and checked before a pixel is decoded
    "huge_image": (lambda root: _claim_size(image_of(root, VICTIM), (12000, 12000)), "12000x12000, more than"),
    "huge_mask": (lambda root: mask_of(root, VICTIM).write_bytes(png_header((12000, 12000))), "12000x12000, more than"),
    "mask_header_size": (lambda root: mask_of(root, VICTIM).write_bytes(png_header((600, 450))), "is 600x450 but its image"),
    # an image id names files: one that climbs out of the folder is a bad row, not a traceback
    "climbing_image_id": (lambda root: _rewrite_row(root, image_id="../../x"), "image_id '../../x' is not a plain"),
    "absolute_image_id": (lambda root: _rewrite_row(root, image_id="/tmp/x"), "image_id '/tmp/x' is not a plain"),
    "missing_image": (lambda root: image_of(root, VICTIM).unlink(), f"{VICTIM}.jpg"),
    "garbage_image": (lambda root: image_of(root, VICTIM).write_bytes(b"not a jpeg"), f"{VICTIM}.jpg"),
    "truncated_image": (
        lambda root: image_of(root, VICTIM).write_bytes(image_of(root, VICTIM).read_bytes()[:400]), f"{VICTIM}.jpg"
    ),
    "missing_mask": (lambda root: mask_of(root, VICTIM).unlink(), f"{VICTIM}_segmentation.png"),
    "unreadable_mask": (lambda root: mask_of(root, VICTIM).write_bytes(b"\x89PNG junk"), f"{VICTIM}_segmentation.png"),
    "mask_size": (lambda root: _save_as(mask_of(root, VICTIM), ellipse_mask((24, 32))), "24x32"),
    "nonbinary_mask": (lambda root: _save_as(mask_of(root, VICTIM), ellipse_mask().point(lambda v: v // 2)), "0, 127"),
    "jpeg_noise_mask": (lambda root: _jpeg_noise_mask(mask_of(root, VICTIM)), f"{VICTIM}_segmentation.png"),
    "unknown_dx": (lambda root: _rewrite_row(root, dx="melanoma"), "'melanoma'"),
    "bad_age": (lambda root: _rewrite_row(root, age="forty"), "'forty'"),
}
REASONS = {
    "garbage_image": "unreadable_image", "truncated_image": "unreadable_image", "png_image": "unreadable_image",
    "eps_image": "unreadable_image", "huge_image": "unreadable_image", "huge_mask": "unreadable_mask",
    "mask_header_size": "mask_size", "climbing_image_id": "bad_row", "absolute_image_id": "bad_row",
    "jpeg_noise_mask": "nonbinary_mask", "bad_age": "bad_row",
}


@pytest.mark.parametrize("case", sorted(BREAKERS))
def test_bad_input_is_one_clear_error(tmp_path, case):
    breaker, named = BREAKERS[case]
    root = make_ham(tmp_path)
    breaker(root)
    with pytest.raises(DataError) as error:
        read_ham10000(root)
    message = str(error.value)
    assert named in message and "--skip-bad" in message and "skip_bad" not in message
    assert VICTIM in message or "HAM10000_metadata.csv:" in message
    if case == "unknown_dx":
        assert "akiec, bcc, bkl, df, mel, nv, vasc" in message


@pytest.mark.parametrize("case", sorted(BREAKERS))
def test_bad_input_is_skipped_and_counted(tmp_path, case):
    breaker, _ = BREAKERS[case]
    root = make_ham(tmp_path)
    breaker(root)
    report = read_ham10000(root, skip_bad=True)
    reason = REASONS.get(case, case)
    assert reason in SKIP_REASONS and report.skipped == {reason: 1}
    assert [r for _, r in report.skipped_files] == [reason]
    assert report.table.num_rows == len(ham_rows()) - 1
    assert VICTIM not in report.table.column("image_id").to_pylist()


@pytest.mark.parametrize("line", ["HAM_x,ISIC_9999999,nv,histo,50.0", ",ISIC_9999999,nv,histo,50.0,male,back"])
def test_malformed_csv_row(tmp_path, line):
    root = make_ham(tmp_path)
    with open(root / "HAM10000_metadata.csv", "a") as f:
        f.write(line + "\n")
    with pytest.raises(DataError, match=r"HAM10000_metadata\.csv:\d+: (the row does not have|empty image_id)"):
        read_ham10000(root)
    report = read_ham10000(root, skip_bad=True)
    assert report.skipped == {"bad_row": 1} and report.table.num_rows == len(ham_rows())


def test_unchecked_files_are_not_opened(tmp_path):
    root = make_ham(tmp_path)
    image_of(root, VICTIM).write_bytes(b"not a jpeg")
    assert read_ham10000(root, check_files=False).table.num_rows == len(ham_rows())


def test_missing_csv_column_names_csv_and_column(tmp_path):
    root = make_ham(tmp_path)
    write_csv(root, ham_rows(), tuple(c for c in HAM_COLUMNS if c != "localization"))
    with pytest.raises(DataError, match=r"HAM10000_metadata\.csv has no column 'localization'"):
        read_ham10000(root, skip_bad=True)


@pytest.mark.parametrize("missing", ["HAM10000_metadata.csv", HAM_MASKS])
def test_missing_csv_or_mask_folder(tmp_path, missing):
    root = make_ham(tmp_path)
    target = root / missing
    if target.is_dir():
        for f in target.iterdir():
            f.unlink()
        target.rmdir()
    else:
        target.unlink()
    with pytest.raises(DataError, match=missing):
        read_ham10000(root, skip_bad=True)


def test_image_in_two_folders_is_an_error(tmp_path):
    root = make_ham(tmp_path)
    copy = root / "extra" / f"{VICTIM}.jpg"
    copy.parent.mkdir()
    copy.write_bytes(image_of(root, VICTIM).read_bytes())
    with pytest.raises(DataError, match=f"image {VICTIM} .* is there twice: .*extra/{VICTIM}.jpg"):
        read_ham10000(root, skip_bad=True)


def test_image_listed_twice_in_csv_is_an_error(tmp_path):
    rows = ham_rows()
    root = make_ham(tmp_path, rows)
    write_csv(root, rows + [dict(rows[0])])
    with pytest.raises(DataError, match=f"image {rows[0]['image_id']} is listed again"):
        read_ham10000(root, skip_bad=True)


def test_class_emptied_by_skipping_is_an_error_unless_not_required(tmp_path):
    rows = ham_rows()
    root = make_ham(tmp_path, rows)
    (df_row,) = [r for r in rows if r["dx"] == "df"]
    image_of(root, df_row["image_id"]).write_bytes(b"broken")
    with pytest.raises(DataError, match="no usable images for class df .*all skipped.*require_classes"):
        read_ham10000(root, skip_bad=True)
    report = read_ham10000(root, skip_bad=True, require_classes=["nv", "mel"])
    assert report.skipped == {"unreadable_image": 1}
    assert "df" not in report.table.column("class_code").to_pylist()
    assert read_ham10000(root, skip_bad=True, require_classes=[]).table.num_rows == len(rows) - 1


def test_required_class_without_rows_is_an_error(tmp_path):
    root = make_ham(tmp_path, ham_rows({"nv": 2, "mel": 2}))
    read_ham10000(root)  # classes the CSV does not name are fine by default
    with pytest.raises(DataError, match="no usable images for class vasc .*no rows in the CSV"):
        read_ham10000(root, require_classes=["nv", "vasc"])
    with pytest.raises(UserError, match="unknown class 'cat'"):
        read_ham10000(root, require_classes=["cat"])


# --- training table and split --------------------------------------------------------------------


def _splits(table: pa.Table) -> dict[str, set[str]]:
    lesions: dict[str, set[str]] = {}
    for lesion, split in zip(table.column("lesion_id").to_pylist(), table.column("split").to_pylist()):
        lesions.setdefault(lesion, set()).add(split)
    return lesions


def test_split_keeps_each_lesion_in_one_split_and_is_deterministic(tmp_path):
    root = make_ham(tmp_path)
    table = training_table(root, seed=3).table
    assert table.schema == TRAINING_TABLE_SCHEMA
    assert all(len(s) == 1 for s in _splits(table).values())
    assert set(table.column("split").to_pylist()) == {"train", "val", "test"}
    assert training_table(root, seed=3).table.equals(table)
    assert not training_table(root, seed=4).table.equals(table)


def test_split_does_not_depend_on_csv_row_order(tmp_path):
    rows = ham_rows()
    root = make_ham(tmp_path, rows)
    before = training_table(root).table
    random.Random(1).shuffle(rows)
    write_csv(root, rows)
    assert training_table(root).table.equals(before)


def test_split_is_stratified_by_class_and_train_never_empty(tmp_path):
    lesions = {"nv": 100, "mel": 40, "bkl": 7, "df": 1, "vasc": 2}
    root = make_ham(tmp_path, ham_rows(lesions), empty_files=True)
    table = training_table(root, check_files=False, val_fraction=0.1, test_fraction=0.2).table
    split_of = {(code, lesion): split for lesion, code, split in zip(
        *(table.column(c).to_pylist() for c in ("lesion_id", "class_code", "split")))}
    for code, n in lesions.items():
        got = Counter(split for (c, _), split in split_of.items() if c == code)
        assert sum(got.values()) == n and got["train"] >= 1
        if n >= 7:
            assert got == {"test": round(n * 0.2), "val": round(n * 0.1), "train": n - round(n * 0.2) - round(n * 0.1)}


def test_isic_reader(tmp_path):
    root = make_isic(tmp_path)
    report = read_isic2018(root)
    table = report.table
    assert table.schema == SOURCE_SCHEMA and table.num_rows == 4 and report.skipped == {}
    assert table.column("lesion_id").to_pylist() == table.column("image_id").to_pylist()
    assert set(table.column("class_index").to_pylist()) == {-1}
    assert table.column("class_code").null_count == table.column("prompt").null_count == 4
    assert set(table.column("source").to_pylist()) == {"isic2018"}


def test_isic_reader_bad_input(tmp_path):
    root = make_isic(tmp_path)
    (root / ISIC_MASKS / "ISIC_0000002_segmentation.png").unlink()
    with pytest.raises(DataError, match="ISIC_0000002_segmentation.png"):
        read_isic2018(root)
    report = read_isic2018(root, skip_bad=True)
    assert report.skipped == {"missing_mask": 1} and report.table.num_rows == 3
    with pytest.raises(DataError, match=ISIC_IMAGES):
        read_isic2018(tmp_path / "nowhere")


def test_combined_table_holds_both_sources_split_by_lesion(tmp_path):
    ham, isic = make_ham(tmp_path / "ham"), make_isic(tmp_path / "isic")
    (isic / ISIC_MASKS / "ISIC_0000001_segmentation.png").unlink()
    report = training_table(ham, isic, skip_bad=True)
    table = report.table
    assert report.skipped == {"missing_mask": 1}
    assert table.schema == TRAINING_TABLE_SCHEMA
    assert Counter(table.column("source").to_pylist()) == {"ham10000": len(ham_rows()), "isic2018": 3}
    assert all(len(s) == 1 for s in _splits(table).values())


def test_training_table_refuses_bad_arguments(tmp_path):
    with pytest.raises(UserError, match="no data"):
        training_table()
    with pytest.raises(UserError, match="together < 1"):
        training_table(tmp_path, val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(UserError, match="needs a HAM10000 root"):
        training_table(isic2018=tmp_path, require_classes=["nv"])


def test_image_in_both_sources_is_an_error(tmp_path):
    ham, isic = make_ham(tmp_path / "ham"), make_isic(tmp_path / "isic")
    write_pair(isic / ISIC_IMAGES / f"{VICTIM}.jpg", isic / ISIC_MASKS / f"{VICTIM}_segmentation.png")
    with pytest.raises(DataError, match=f"image {VICTIM} is in both"):
        training_table(ham, isic)


# --- load_pair ------------------------------------------------------------------------------------


@pytest.fixture
def pair(tmp_path) -> tuple[str, str]:
    image, mask = tmp_path / "ISIC_1.jpg", tmp_path / "ISIC_1_segmentation.png"
    write_pair(image, mask)
    return str(image), str(mask)


def test_load_pair_as_stored(pair):
    image, mask = load_pair(*pair, None)
    assert image.shape == (24, 32, 3) and image.dtype == np.uint8
    assert mask.dtype == np.uint8 and np.array_equal(mask, np.asarray(ellipse_mask()) // 255)


@pytest.mark.parametrize("size", [8, 16, 24, 64])
def test_load_pair_crops_square_and_keeps_mask_binary(pair, size):
    image, mask = load_pair(*pair, size)
    assert image.shape == (size, size, 3) and mask.shape == (size, size)
    assert set(np.unique(mask)) == {0, 1}
    cropped = np.asarray(ellipse_mask())[:, 4:28] // 255  # center 24x24 of the 32x24 mask
    assert abs(mask.mean() - cropped.mean()) < 0.08
    if size == 24:
        assert np.array_equal(mask, cropped)
    lesion = image[mask == 1].mean(axis=0)
    skin = image[mask == 0].mean(axis=0)
    assert lesion[0] < skin[0] - 60  # the dark ellipse is where the mask is


@pytest.mark.parametrize("mode", ["1", "01"])
def test_load_pair_accepts_other_binary_masks(pair, mode):
    mask = ellipse_mask()
    (mask.convert("1") if mode == "1" else mask.point(lambda v: v // 255)).save(pair[1])
    assert set(np.unique(load_pair(*pair, 16)[1])) == {0, 1}


def test_load_pair_errors_name_the_file(pair, tmp_path):
    ellipse_mask((20, 20)).save(pair[1])
    with pytest.raises(DataError, match="ISIC_1_segmentation.png is 20x20 but its image .*ISIC_1.jpg is 32x24"):
        load_pair(*pair, 16)
    Path(pair[0]).write_bytes(b"junk")
    with pytest.raises(DataError, match="ISIC_1.jpg cannot be decoded"):
        load_pair(*pair, 16)
    with pytest.raises(DataError, match="nope.jpg not found"):
        load_pair(str(tmp_path / "nope.jpg"), pair[1], 16)
