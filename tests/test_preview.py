"""jobs/preview.py draws any dataset's pairs on one sheet, a row per class, each image with its mask's outline
(and its ignore map tinted); the prepare job puts the same sheet into its output as preview.png (generation's
preview.png is checked with the generate job's run, in test_generate)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

from fixture_data import assert_outlined, write_test_shards
from job_runs import ok, run_job
from skindual import cli, report
from skindual.pairs import read_index, usable_rows
from skindual.preview import Preview, PreviewConfig, row_label, run_preview
from skindual.shards import read_shards

ROOT = Path(__file__).resolve().parents[1]


def check_sheet(path, preview: Preview, data: str, per_class: int) -> dict:
    """The sheet at `path` is `preview`'s: a row per class present in `data` (its first `per_class` usable pairs in
    key order), each pair's mask outlined in its box; returns the pairs by key."""
    rows = usable_rows(read_index(data)).sort_by("key")
    present = sorted(set(rows.column("class_index").to_pylist()), key=lambda c: (c < 0, c))
    assert [label for label, _ in preview.rows] == [row_label(c) for c in present]
    for label, keys in preview.rows:
        ordered = [k for k, c in zip(rows.column("key").to_pylist(), rows.column("class_index").to_pylist())
                   if row_label(c) == label]
        assert list(keys) == ordered[:per_class]
    pairs = {p["key"]: p for p in read_shards(data)}
    sheet = np.asarray(Image.open(path).convert("RGB"))
    assert sheet.shape[:2] == (preview.image.height, preview.image.width)
    for (_, keys), boxes in zip(preview.rows, preview.boxes):
        for key, box in zip(keys, boxes, strict=True):
            assert_outlined(sheet, box, pairs[key]["mask"])
    return pairs


def test_the_job_draws_a_row_per_class_with_each_mask_outlined_and_the_ignore_map_tinted(tmp_path):
    data = tmp_path / "synthetic"
    write_test_shards(data, [("vasc", 1), ("df", 2), ("vasc", 3), ("df", 4), ("df", 5), ("mel", 6), ("df", 7)],
                      per_shard=3, ignore_rows=8)
    result = ok(run_job("preview", ["--data", str(data), "--output", str(tmp_path / "sheet.png"), "--per-class", "3"]))
    assert result.stdout.strip() == f"done: 6 pairs (df 3, mel 1, vasc 2) at {tmp_path / 'sheet.png'}"
    preview = run_preview(PreviewConfig(data=str(data), output=str(tmp_path / "again.png"), per_class=3))
    assert (tmp_path / "sheet.png").read_bytes() == (tmp_path / "again.png").read_bytes() == preview.png()
    pairs = check_sheet(tmp_path / "sheet.png", preview, str(data), 3)
    # the ignore maps (the first 8 of 32 rows of every other pair in a shard) tinted magenta: green down, red and blue up
    sheet = np.asarray(Image.open(tmp_path / "sheet.png").convert("RGB")).astype(int)
    for (_, keys), boxes in zip(preview.rows, preview.boxes):
        for key, (x0, y0, x1, y1) in zip(keys, boxes):
            image = np.asarray(Image.fromarray(pairs[key]["image"]).resize((x1 - x0, y1 - y0), Image.Resampling.LANCZOS))
            change = (sheet[y0:y1, x0:x1] - image)[: (y1 - y0) // 5]  # inside the ignored rows
            drawn = np.all(sheet[y0:y1, x0:x1][: (y1 - y0) // 5] == report.MASK_OUTLINE, axis=-1)
            green, red_blue = change[~drawn][:, 1].mean(), change[~drawn][:, [0, 2]].mean()
            if pairs[key]["ignore"].any():
                assert green < -30 and red_blue > 10, key
            else:
                assert abs(green) < 2 and abs(red_blue) < 2, key

def test_a_prepared_real_dataset_has_its_preview(demo_real, tmp_path):
    """prepare wrote preview.png: the sheet jobs/preview.py draws of the dataset with its defaults."""
    preview = run_preview(PreviewConfig(data=str(demo_real), output=str(tmp_path / "sheet.png")))
    assert (demo_real / "preview.png").read_bytes() == (tmp_path / "sheet.png").read_bytes()
    check_sheet(demo_real / "preview.png", preview, str(demo_real), 6)
    assert [len(keys) for _, keys in preview.rows] == [6] * 7  # the demo world has every class, each ≥ 6 pairs


def test_the_jobs_mistakes_are_one_line(tmp_path, capsys):
    """Through the job's entry point, in process (the subprocess path is the first test's)."""
    spec = importlib.util.spec_from_file_location("preview_job", ROOT / "jobs" / "preview.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)

    def one_line(argv: list[str]) -> str:
        assert cli.run_job(job.main, PreviewConfig, "preview", argv) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        return line

    assert one_line(["--output", "x.png"]).startswith("error: --data is missing")
    assert one_line(["--data", str(tmp_path / "nothing")]).startswith(f"error: --data {tmp_path / 'nothing'}: no such folder")
    assert one_line(["--data", "x", "--output", "sheet.jpg"]) == (
        "error: --output sheet.jpg: the sheet is a PNG; give a name ending in .png")
    assert one_line(["--data", "x", "--per-class", "0"]) == "error: --per-class 0: must be at least 1"
