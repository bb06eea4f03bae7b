import hashlib

import pyarrow.parquet as pq
import pytest

from skindual.errors import UserError
from skindual.prompts import (
    CLASSES, build_prompt, parse_per_class, prompt_table, prompt_vocabulary, row_seed, sample_key,
    write_prompt_table,
)


def test_vocabulary_is_ham10000_in_index_order():
    assert [c.code for c in CLASSES] == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert [c.index for c in CLASSES] == list(range(7))
    assert all(c.name and c.description for c in CLASSES)


def test_prompt_uses_known_attributes_only():
    assert build_prompt("df") == "a dermoscopy image of dermatofibroma, a small brown ring around a white centre"
    full = build_prompt("mel", "back", 60.0, "female")
    assert full.endswith(", on the back, 60 year old female")
    assert build_prompt("mel", "unknown", float("nan"), "unknown") == build_prompt("mel")
    assert build_prompt("mel", None, None, "male").endswith(", male")
    assert build_prompt("nv", template="{code}: {name}") == "nv: melanocytic nevus"


def test_unknown_class_names_the_value_and_the_choices():
    with pytest.raises(UserError, match=r"'xyz'.*akiec, bcc"):
        build_prompt("xyz")


def test_row_seed_depends_on_run_seed_row_and_attempt_only():
    assert row_seed(1, 5) == row_seed(1, 5)
    seeds = {row_seed(1, 5), row_seed(2, 5), row_seed(1, 6), row_seed(1, 5, attempt=1)}
    assert len(seeds) == 4
    assert all(0 <= s < 2**63 for s in seeds)


def test_parse_per_class_forms_and_errors():
    assert parse_per_class(3) == {c.code: 3 for c in CLASSES}
    assert parse_per_class("2", classes=["df", "vasc"]) == {"df": 2, "vasc": 2}
    assert parse_per_class("vasc=4,df=5") == {"df": 5, "vasc": 4}  # class-index order
    with pytest.raises(UserError, match="--per-class"):
        parse_per_class("df:5")
    with pytest.raises(UserError, match="'nope'"):
        parse_per_class("nope=3")
    with pytest.raises(UserError, match="leaves out"):
        parse_per_class("mel=3", classes=["df"])
    with pytest.raises(UserError, match="no samples"):
        parse_per_class(0)


def test_prompt_table_is_balanced_interleaved_and_keyed():
    table = prompt_table({"df": 6, "nv": 3, "vasc": 3}, seed=7, samples_per_shard=4)
    rows = table.to_pylist()
    assert [r["row_id"] for r in rows] == list(range(12))
    assert [r["class_code"] for r in rows].count("df") == 6
    # every shard of 4 holds df:nv:vasc as 2:1:1
    for shard in range(3):
        codes = sorted(r["class_code"] for r in rows if r["shard"] == shard)
        assert codes == ["df", "df", "nv", "vasc"]
    assert rows[5]["key"] == sample_key(1, 1) == "000010001"
    assert all(r["seed"] == row_seed(7, r["row_id"]) for r in rows)
    assert all(r["prompt"] == build_prompt(r["class_code"]) for r in rows)


def test_prompt_table_attributes_follow_the_pool_deterministically():
    pool = {"mel": [("back", 50.0, "male"), ("face", 70.0, "female")]}
    a = prompt_table({"mel": 20}, seed=1, attributes=pool).column("prompt").to_pylist()
    assert a == prompt_table({"mel": 20}, seed=1, attributes=pool).column("prompt").to_pylist()
    assert {p.split(", on the ")[1] for p in a} == {"back, 50 year old male", "face, 70 year old female"}


def test_prompt_table_parquet_is_byte_reproducible(tmp_path):
    digests = []
    for name in ("a.parquet", "b.parquet"):
        write_prompt_table(prompt_table(parse_per_class(50), seed=3, samples_per_shard=100), str(tmp_path / name))
        digests.append(hashlib.sha256((tmp_path / name).read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    assert pq.read_table(tmp_path / "a.parquet").num_rows == 350


def test_samples_per_shard_bounds():
    with pytest.raises(UserError, match="--samples-per-shard"):
        prompt_table({"df": 1}, samples_per_shard=10_001)
    with pytest.raises(ValueError):
        sample_key(0, 10_000)


def test_vocabulary_covers_every_prompt_word():
    words = set(prompt_vocabulary())
    for c in CLASSES:
        assert set(build_prompt(c.code, "lower extremity", 35, "female").replace(",", " ").split()) <= words
