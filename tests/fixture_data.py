"""The session's data: small demo worlds prepared through the prepare job's code, synthetic shards, SD-2's
architecture at narrow width, and helpers that read them."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Callable
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


TarEntry = tuple[tarfile.TarInfo, bytes] | bytes
"""A tar member as `tar_bytes` writes it: a header and its data, or raw header blocks written as they are."""


def tar_bytes(entries: list[TarEntry], tar_format: int = tarfile.USTAR_FORMAT) -> bytes:
    """A tar of `entries` in order (each member's size set to its data's), ended by two zero blocks."""
    out = bytearray()
    for entry in entries:
        if isinstance(entry, bytes):
            out += entry
            continue
        info, data = entry
        info.size = len(data)
        out += info.tobuf(tar_format) + data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)
    return bytes(out + b"\0" * (2 * tarfile.BLOCKSIZE))


def gnu_sparse_header(name: str, declared: int) -> bytes:
    """One GNU-format header of an old-style sparse member (type ``S``) with no data in the archive that
    declares `declared` bytes (its ``realsize`` field): a reader that extracts it gets that many zero bytes."""
    info = tarfile.TarInfo(name)
    info.type, info.size = tarfile.GNUTYPE_SPARSE, 0
    block = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    block[483:495] = tarfile.itn(declared, 12, tarfile.GNU_FORMAT)
    block[148:156] = b" " * 8
    block[148:155] = b"%06o\0" % tarfile.calc_chksums(bytes(block))[0]
    return bytes(block)


def _member(name: str, kind: bytes = tarfile.REGTYPE, **fields) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    for field, value in fields.items():
        setattr(info, field, value)
    return info


HUGE = 1 << 30  # what a sparse member declares: far above any member bound, and more than a test may allocate
BAD_MEMBERS: dict[str, tuple[str | None, Callable[[], TarEntry], str, int]] = {
    # case: (the member it replaces, or None: added last; the entry; the member's name; the tar's format)
    "sparse-gnu": ("000000002.jpg", lambda: gnu_sparse_header("000000002.jpg", HUGE), "000000002.jpg",
                   tarfile.GNU_FORMAT),
    "sparse-pax": ("000000002.jpg", lambda: (_member("000000002.jpg", pax_headers={
        "GNU.sparse.major": "0", "GNU.sparse.minor": "1", "GNU.sparse.name": "000000002.jpg",
        "GNU.sparse.realsize": str(HUGE), "GNU.sparse.map": "0,0"}), b""), "000000002.jpg", tarfile.PAX_FORMAT),
    "symlink": ("000000002.jpg", lambda: (_member("000000002.jpg", tarfile.SYMTYPE, linkname="/etc/passwd"), b""),
                "000000002.jpg", tarfile.USTAR_FORMAT),
    "hard-link": ("000000002.jpg", lambda: (_member("000000002.jpg", tarfile.LNKTYPE, linkname="000000001.jpg"),
                                            b""), "000000002.jpg", tarfile.USTAR_FORMAT),
    "device": ("000000002.jpg", lambda: (_member("000000002.jpg", tarfile.CHRTYPE, devmajor=1, devminor=3), b""),
               "000000002.jpg", tarfile.USTAR_FORMAT),
    "traversal": (None, lambda: (_member("../x"), b"x"), "../x", tarfile.USTAR_FORMAT),
    "bad-name": ("000000002.jpg", lambda: (_member("000000002.exe"), b"MZ"), "000000002.exe", tarfile.USTAR_FORMAT),
    "other-shard": ("000000002.jpg", lambda: (_member("000010002.jpg"), b"\xff\xd8"), "000010002.jpg",
                    tarfile.USTAR_FORMAT),
    "oversized": ("000000002.cls", lambda: (_member("000000002.cls"), b"1" * 100), "000000002.cls",
                  tarfile.USTAR_FORMAT),
}
"""Members a shard's tar must never hold, each behind a _stats.json that matches the tar (`tamper_shard`)."""


def tamper_shard(root, shard: int, case: str) -> None:
    """Put the `BAD_MEMBERS` entry `case` into a committed shard's tar and record the new tar's size and sha256
    in its ``_stats.json``, as the writer would: a reader must refuse it for what it holds, not for a checksum."""
    from skindual.fingerprint import canonical_json
    from skindual.shard_format import shard_names
    from skindual.storage import open_storage

    storage = open_storage(root)
    tar_name, _, stats_name = shard_names(shard)
    replaced, entry, _, tar_format = BAD_MEMBERS[case]
    with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(tar_name))) as tar:
        members: list[TarEntry] = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    names = [m[0].name for m in members if not isinstance(m, bytes)]
    if replaced is None:
        members.append(entry())
    else:
        members[names.index(replaced)] = entry()
    raw = tar_bytes(members, tar_format)
    stats = json.loads(storage.read_bytes(stats_name)) | {"tar_sha256": hashlib.sha256(raw).hexdigest(),
                                                          "tar_bytes": len(raw)}
    storage.write_bytes(tar_name, raw)
    storage.write_bytes(stats_name, canonical_json(stats))


def write_test_output(root, pairs, per_shard: int = 16, ignore_rows: int = 0, license: str = "",
                      complete: bool = True) -> dict:
    """`write_test_shards`, then the run files a generation run writes after them (its ``manifest.json``, the
    shards' counts and the run's settings, as `generate.run_generate` records them) and its dataset card: a
    stand-in for a finished generate output.  The manifest."""
    from dataclasses import asdict

    from skindual.card import write_card
    from skindual.generate_config import GenerateConfig
    from skindual.run_files import write_run_files
    from skindual.storage import open_storage

    write_test_shards(root, pairs, per_shard, ignore_rows=ignore_rows)
    asked: dict[str, int] = {}
    for code, _ in pairs:
        asked[code] = asked.get(code, 0) + 1
    cfg = GenerateConfig(per_class=",".join(f"{c}={n}" for c, n in asked.items()), steps=1, guidance=1.0,
                         qc_segmenter="qc-segmenter" if ignore_rows else "", license=license,
                         samples_per_shard=per_shard, output=str(root))
    resolved = {"base_model": "test", "adapter": "none", "layout": "channels", "resolution": EVAL_SYNTHETIC_SIZE,
                "qc_segmenter": "sha256:" + "ab" * 32 if ignore_rows else "none", "mask_source": "none",
                "device": "cpu", "device_model": "cpu:1 threads", "dtype": "fp32"}
    storage = open_storage(root)
    manifest = write_run_files(storage, {"config": asdict(cfg), "resolved": resolved, "asked_per_class": asked,
                                         "fingerprint": "test", "complete": complete,
                                         "versions": {"skindual": "0.1.0"}})
    write_card(storage, manifest)
    return manifest


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
    committed shards with a generate output's manifest and card."""
    from skindual.demo import render
    from skindual.prompts import CLASS_CODES

    root = tmp_path_factory.mktemp("eval-world")
    render.write_demo_dataset(root / "data", {c: 16 if c == "nv" else 8 for c in CLASS_CODES}, seed=3)
    real = prepare_folder(root / "data", root / "real", per_shard=40)
    pairs = [(code, 10_000 + 100 * i + k) for i, code in enumerate(CLASS_CODES) for k in range(4)]
    write_test_output(root / "synthetic", pairs)
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
    from skindual.finetune import training_rows, training_selection
    from skindual.pairs import local_batches, read_index

    selection = training_selection(training_rows(read_index(str(real))), False, 0)
    return next(local_batches(str(real), selection, size, n))


def read_card(folder: Path) -> tuple[dict, str]:
    """An output's dataset card: its YAML header and its body."""
    import yaml

    text = (Path(folder) / "README.md").read_text()
    _, header, body = text.split("---\n", 2)
    return yaml.safe_load(header), body


def card_table(body: str, heading: str) -> dict[str, list[str]]:
    """The rows of the first table under a card's `heading`: first cell (backticks dropped) → the other cells."""
    section = body.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| ")]
    return {cells[0].strip().strip("`"): [c.strip() for c in cells[1:]] for cells in rows[2:]}


def folder_arrays(root: Path | str, size: int):
    """Every pair of a HAM10000-layout folder in memory at `size`: (images, masks, class indices)."""
    import numpy as np

    from skindual import data

    table = data.read_ham10000(str(root)).table
    pairs = [data.load_pair(i, m, size) for i, m in zip(table.column("image_path").to_pylist(),
                                                        table.column("mask_path").to_pylist())]
    return (np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]),
            np.asarray(table.column("class_index").to_pylist(), np.int64))


def shard_snapshot(storage) -> dict[str, str]:
    """sha256 of every shard file of an output (a `Storage`): what the same settings must reproduce.  A
    ``_stats.json`` is taken without what storage's listing said of the files at commit (`LISTING_FIELDS`: a
    folder's mtimes, S3's ETags), which differ between two runs of the same bytes."""
    import hashlib
    import json

    from skindual.shard_format import LISTING_FIELDS

    def content(name: str) -> bytes:
        data = storage.read_bytes(name)
        if name.endswith("_stats.json"):
            stats = {k: v for k, v in json.loads(data).items() if k not in LISTING_FIELDS}
            data = json.dumps(stats, sort_keys=True).encode()
        return data

    return {n: hashlib.sha256(content(n)).hexdigest() for n in storage.list()
            if n.endswith((".tar", ".parquet", "_stats.json"))}
