"""Class vocabulary, prompt template and the class-balanced prompt table.

Pure logic, no I/O beyond writing a table: everything here is deterministic in
its arguments, so the same arguments give the same table byte for byte and a
generation run can be redone from its prompt table alone.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from skindual.errors import UserError

MAX_SAMPLES_PER_SHARD = 10_000  # sample keys are shard * 10**4 + index (docs/architecture.md, "Formats")


@dataclass(frozen=True)
class LesionClass:
    code: str  # HAM10000 `dx`
    index: int  # class index written to `{key}.cls`
    name: str
    description: str  # short clinical look, used in prompts


# HAM10000's seven diagnoses in its usual alphabetical order (the index is the label).
CLASSES: tuple[LesionClass, ...] = (
    LesionClass("akiec", 0, "actinic keratosis", "a rough red scaly patch with an ill-defined border"),
    LesionClass("bcc", 1, "basal cell carcinoma", "a pearly pink nodule with branching red vessels"),
    LesionClass("bkl", 2, "benign keratosis", "a waxy tan stuck-on plaque with crypts"),
    LesionClass("df", 3, "dermatofibroma", "a small brown ring around a white centre"),
    LesionClass("mel", 4, "melanoma", "a large dark asymmetric lesion with blue grey areas"),
    LesionClass("nv", 5, "melanocytic nevus", "a round brown regular mole"),
    LesionClass("vasc", 6, "vascular lesion", "red purple lobules with a sharp border"),
)
CLASS_BY_CODE: dict[str, LesionClass] = {c.code: c for c in CLASSES}
CLASS_CODES: tuple[str, ...] = tuple(c.code for c in CLASSES)

# HAM10000 `localization` and `sex` values.
LOCALIZATIONS = (
    "abdomen", "acral", "back", "chest", "ear", "face", "foot", "genital", "hand",
    "lower extremity", "neck", "scalp", "trunk", "unknown", "upper extremity",
)
SEXES = ("female", "male", "unknown")

DEFAULT_TEMPLATE = "a dermoscopy image of {name}, {description}"
ATTRIBUTE_TEMPLATE = "{site}{patient}"  # appended when attributes are known


def lesion_class(code: str) -> LesionClass:
    """The class of a HAM10000 `dx` code; a clear error for an unknown one."""
    try:
        return CLASS_BY_CODE[code]
    except KeyError:
        raise UserError(
            f"unknown class {code!r}; known classes are {', '.join(CLASS_CODES)}"
        ) from None


def build_prompt(
    code: str,
    localization: str | None = None,
    age: float | None = None,
    sex: str | None = None,
    template: str = DEFAULT_TEMPLATE,
) -> str:
    """The text prompt for one lesion: class name and look, then body site, age and sex where known.

    >>> build_prompt("nv", "back", 45, "male")
    'a dermoscopy image of melanocytic nevus, a round brown regular mole, on the back, 45 year old male'
    """
    cls = lesion_class(code)
    prompt = template.format(name=cls.name, description=cls.description, code=cls.code)
    if localization and localization != "unknown":
        prompt += f", on the {localization}"
    known_age = age is not None and not (isinstance(age, float) and math.isnan(age))
    known_sex = sex in ("female", "male")
    if known_age or known_sex:
        words = []
        if known_age:
            words.append(f"{int(age)} year old")
        if known_sex:
            words.append(sex)
        else:
            words.append("patient")
        prompt += ", " + " ".join(words)
    return prompt


def row_seed(run_seed: int, row_id: int, attempt: int = 0) -> int:
    """The sampling seed of one prompt row: a 63-bit hash of (run seed, row id, attempt).

    It never depends on where the row lands in a batch or on which actor, so the
    same prompt table regenerates the same pairs; `attempt` > 0 gives the seeds
    used when quality control rejects a sample and it is drawn again.
    """
    digest = hashlib.blake2b(f"{run_seed}/{row_id}/{attempt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def parse_per_class(value: str | int | Mapping[str, int], classes: Sequence[str] | None = None) -> dict[str, int]:
    """`--per-class`: one count for every class (`5000`) or a mapping (`df=5000,vasc=4000`).

    Returns counts in class-index order, only for classes with a positive count.
    """
    codes = list(classes) if classes else list(CLASS_CODES)
    for code in codes:
        lesion_class(code)
    if isinstance(value, Mapping):
        counts = dict(value)
    elif isinstance(value, int) or str(value).strip().isdigit():
        counts = {code: int(value) for code in codes}
    else:
        counts = {}
        for part in str(value).split(","):
            code, sep, number = part.partition("=")
            code = code.strip()
            if not sep or not number.strip().isdigit():
                raise UserError(
                    f"--per-class {value!r}: expected a count (5000) or code=count pairs (df=5000,vasc=4000)"
                )
            if code in counts:
                raise UserError(f"--per-class {value!r}: {code} is given twice; give each class once")
            counts[code] = int(number)
    for code in counts:
        lesion_class(code)
        if code not in codes:
            raise UserError(f"--per-class names {code!r}, which --classes leaves out")
    ordered = {c.code: counts[c.code] for c in CLASSES if counts.get(c.code, 0) > 0}
    if not ordered:
        raise UserError(f"--per-class {value!r} asks for no samples at all; give a positive count")
    return ordered


PROMPT_TABLE_SCHEMA = pa.schema(
    [
        ("row_id", pa.int64()),
        ("key", pa.string()),
        ("shard", pa.int32()),
        ("class_code", pa.string()),
        ("class_index", pa.int8()),
        ("prompt", pa.string()),
        ("seed", pa.int64()),
        ("source_key", pa.string()),  # mask-conditioned rows: the real pair whose mask is given ("{shard:05d}/{key}")
        ("augmentation_seed", pa.int64()),  # mask-conditioned rows: the seed of that mask's augmentation
    ]
)


def sample_key(shard: int, index: int) -> str:
    """The 9-digit WebDataset key of sample `index` in `shard` (shard * 10**4 + index)."""
    if not 0 <= index < MAX_SAMPLES_PER_SHARD:
        raise ValueError(f"sample index {index} out of range 0..{MAX_SAMPLES_PER_SHARD - 1}")
    return f"{shard * MAX_SAMPLES_PER_SHARD + index:09d}"


def prompt_table(
    per_class: Mapping[str, int],
    seed: int = 0,
    samples_per_shard: int = 1000,
    template: str = DEFAULT_TEMPLATE,
    attributes: Mapping[str, Sequence[Attributes]] | None = None,
    sources: Mapping[str, Sequence[tuple[str, Attributes]]] | None = None,
) -> pa.Table:
    """The class-balanced prompt table that generation maps over.

    Classes are interleaved evenly (row r of a class with n rows sits at
    position (r + 1/2) / n), so every shard holds the classes in the asked
    proportions.  With `attributes` (per class, a pool of (localization, age,
    sex) tuples taken from real metadata) each row picks one from the pool by a
    hash of its seed, so prompts follow the real data's sites and patients.
    With `sources` (per class, row r's given mask: its source key and its real
    row's attributes; `skindual.mask_source.source_table`) row r of a class
    takes its attributes from that row and records the source key and an
    augmentation seed (`augmentation_seed`).
    """
    if not 1 <= samples_per_shard <= MAX_SAMPLES_PER_SHARD:
        raise UserError(f"--samples-per-shard {samples_per_shard}: must be between 1 and {MAX_SAMPLES_PER_SHARD}")
    order = sorted(
        ((r + 0.5) / n, lesion_class(code).index, code, r)
        for code, n in per_class.items()
        for r in range(n)
    )
    columns: dict[str, list] = {name: [] for name in PROMPT_TABLE_SCHEMA.names}
    for row_id, (_, class_index, code, r) in enumerate(order):
        shard, index = divmod(row_id, samples_per_shard)
        s = row_seed(seed, row_id)
        localization = age = sex = source = None
        pool = (attributes or {}).get(code)
        if sources is not None:
            source, (localization, age, sex) = sources[code][r]
        elif pool:
            localization, age, sex = pool[s % len(pool)]
        columns["row_id"].append(row_id)
        columns["key"].append(sample_key(shard, index))
        columns["shard"].append(shard)
        columns["class_code"].append(code)
        columns["class_index"].append(class_index)
        columns["prompt"].append(build_prompt(code, localization, age, sex, template))
        columns["seed"].append(s)
        columns["source_key"].append(source)
        columns["augmentation_seed"].append(augmentation_seed(seed, row_id) if source is not None else None)
    return pa.table(columns, schema=PROMPT_TABLE_SCHEMA)


def augmentation_seed(run_seed: int, row_id: int) -> int:
    """The seed of a mask-conditioned row's mask augmentation: a 63-bit hash of (run seed, row id), apart from
    its sampling seeds (`row_seed`)."""
    digest = hashlib.blake2b(f"augmentation/{run_seed}/{row_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


Attributes = tuple[str | None, float | None, str | None]  # (localization, age, sex) of one lesion image


def attribute_distribution(rows: pa.Table) -> dict[str, list[list]]:
    """Per class code, how often each (localization, age, sex) occurs in `rows` (a table with
    ``class_code``, ``localization``, ``age``, ``sex``): ``[[site, age, sex, count], ...]`` sorted, so the
    same rows give the same JSON (an adapter records its training data's)."""
    counts: dict[str, dict[tuple, int]] = {}
    columns = [rows.column(n).to_pylist() for n in ("class_code", "localization", "age", "sex")]
    for code, site, age, sex in zip(*columns):
        key = (site, None if age is None or (isinstance(age, float) and math.isnan(age)) else float(age), sex)
        counts.setdefault(code, {})[key] = counts.setdefault(code, {}).get(key, 0) + 1
    return {code: [[*key, n] for key, n in sorted(found.items(), key=lambda kv: tuple(map(str, kv[0])))]
            for code, found in sorted(counts.items())}


def attribute_pools(distribution: Mapping[str, Sequence[Sequence]]) -> dict[str, list[Attributes]]:
    """`attribute_distribution` → per class the multiset of its (site, age, sex) tuples, each as often as
    it occurred: `prompt_table` draws from it by a row's seed, so the draws follow the counts."""
    return {code: [(site, age, sex) for site, age, sex, n in entries for _ in range(int(n))]
            for code, entries in distribution.items()}


def write_prompt_table(table: pa.Table, path: str) -> None:
    """Write a prompt table as parquet with fixed settings (same table, same bytes)."""
    pq.write_table(table, path, compression="zstd", use_dictionary=True, write_statistics=True)


def prompt_vocabulary(template: str = DEFAULT_TEMPLATE) -> list[str]:
    """Every word the prompts of this module can contain (for the demo model's word-level tokenizer)."""
    texts: list[str] = [build_prompt(c.code, template=template) for c in CLASSES]
    texts += [f"on the {site}" for site in LOCALIZATIONS]
    texts += ["year old patient"] + list(SEXES) + [str(a) for a in range(0, 100)]
    return sorted({w for text in texts for w in _words(text)})


def _words(text: str) -> Iterable[str]:
    return text.replace(",", " ").lower().split()
