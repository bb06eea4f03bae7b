"""The session's data: small demo worlds prepared through the prepare job's code, synthetic shards, SD-2's
architecture at narrow width, and helpers that read them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


EVAL_SYNTHETIC_SIZE = 32  # the synthetic pairs' side (the demo generator's would be 64)


def write_test_shards(root, pairs, per_shard: int = 16, size: int = EVAL_SYNTHETIC_SIZE, first_shard: int = 0,
                      ignore_rows: int = 0) -> None:
    """Commit `pairs` [(class code, seed)] as WebDataset shards under `root` (local or s3://), each a
    procedural demo lesion rendered at size × size: stand-ins for a generation run's output.  The first
    `ignore_rows` pixel rows of every other pair (odd index) are its ignore map."""
    from skindual.demo.render import render_lesion
    from skindual.prompts import CLASS_BY_CODE, build_prompt, sample_key
    from skindual.shard_format import Sample
    from skindual.shard_store import write_shard
    from skindual.storage import open_storage

    storage = open_storage(root)
    run_info = {"base_model": "test", "adapter_sha256": "", "layout": "channels", "scheduler": "ddim",
                "steps": 1, "guidance": 1.0, "fingerprint": "test", "image_format": "jpg"}
    for start in range(0, len(pairs), per_shard):
        shard, samples = first_shard + start // per_shard, []
        for index, (code, seed) in enumerate(pairs[start:start + per_shard]):
            image, mask = render_lesion(code, seed, (size, size))
            ignore = None
            if ignore_rows and index % 2:
                ignore = np.zeros(mask.shape, np.uint8)
                ignore[:ignore_rows] = 1
            samples.append(Sample(key=sample_key(shard, index), row_id=start + index, class_code=code,
                                  class_index=CLASS_BY_CODE[code].index, prompt=build_prompt(code), seed=seed,
                                  image=image, mask=mask, ignore=ignore,
                                  disagreement=None if ignore is None else float(ignore.mean())))
        write_shard(storage, shard, samples, run_info)


def assert_outlined(sheet: np.ndarray, box: tuple[int, int, int, int], mask: np.ndarray, colour=(0, 255, 0)) -> None:
    """The picture in `box` shows `mask`'s outline in `colour`: on every pixel of the mask's edge at that scale, and
    nowhere farther than 2 px from it (not a tint over the lesion, not on the skin around it)."""
    from PIL import Image
    from scipy import ndimage

    x0, y0, x1, y1 = box
    drawn = np.all(sheet[y0:y1, x0:x1] == colour, axis=-1)
    scaled = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((x1 - x0, y1 - y0),
                                                                             Image.Resampling.BILINEAR)) >= 128
    edge = scaled & ~ndimage.binary_erosion(scaled, border_value=1)
    assert edge.sum() > 10 and drawn[edge].mean() > 0.98
    assert drawn[~ndimage.binary_dilation(edge, iterations=2)].sum() <= 0.01 * drawn.sum()


def prepare_folder(folder: Path, output: Path, per_shard: int = 100) -> Path:
    """A HAM10000-layout folder through the prepare job's code (in this process): its real dataset."""
    from skindual.prepare import PrepareConfig, prepare_here

    prepare_here(PrepareConfig(ham10000=str(folder), output=str(output), samples_per_shard=per_shard))
    return output


@pytest.fixture(scope="session")
def eval_world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A small demo world for the evaluation and export jobs: a HAM10000-layout folder (8 images per
    class, 16 nv) prepared into a real dataset (2 shards), and 4 synthetic pairs per class in 2
    committed shards."""
    from skindual.demo import render
    from skindual.prompts import CLASS_CODES

    root = tmp_path_factory.mktemp("eval-world")
    render.write_demo_dataset(root / "data", {c: 16 if c == "nv" else 8 for c in CLASS_CODES}, seed=3)
    real = prepare_folder(root / "data", root / "real", per_shard=40)
    pairs = [(code, 10_000 + 100 * i + k) for i, code in enumerate(CLASS_CODES) for k in range(4)]
    write_test_shards(root / "synthetic", pairs)
    return {"root": root, "real": str(real), "synthetic": str(root / "synthetic"), "pairs": pairs}


@pytest.fixture(scope="session")
def demo_real(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The prepared real dataset of a small demo world (2% of the demo counts: 10-134 images a class)."""
    from skindual.demo import render

    root = tmp_path_factory.mktemp("demo")
    render.write_demo_dataset(root / "data", render.demo_counts(0.02), seed=1)
    return prepare_folder(root / "data", root / "real")


@pytest.fixture(scope="session")
def sd2_bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """SD-2's architecture at 1/8 width, random weights, built in code and saved as `from_pretrained`
    folders: "base" (stable-diffusion-2-base: epsilon prediction, PNDM, 512²) and "v"
    (stable-diffusion-2: v-prediction, DDIM, 768²)."""
    from skindual.sd2 import save_sd2_pipeline

    root = tmp_path_factory.mktemp("sd2")
    return {variant: save_sd2_pipeline(root / variant, variant, width=8, seed=i)
            for i, variant in enumerate(("base", "v"))}


def real_batch(real: Path | str, size: int, n: int = 2) -> dict:
    """The first training batch of `n` pairs of a prepared dataset's train split at `size` (unbalanced)."""
    from skindual.finetune import local_batches, training_rows, training_selection
    from skindual.pairs import read_index

    selection = training_selection(training_rows(read_index(str(real))), False, 0)
    return next(local_batches(str(real), selection, size, n))


def folder_arrays(root: Path | str, size: int):
    """Every pair of a HAM10000-layout folder in memory at `size`: (images, masks, class indices)."""
    import numpy as np

    from skindual import data

    table = data.read_ham10000(str(root)).table
    pairs = [data.load_pair(i, m, size) for i, m in zip(table.column("image_path").to_pylist(),
                                                        table.column("mask_path").to_pylist())]
    return (np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]),
            np.asarray(table.column("class_index").to_pylist(), np.int64))
