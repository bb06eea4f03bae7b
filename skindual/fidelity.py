"""Image fidelity: feature extractors, Fréchet and kernel distances, the real-feature cache.

The distances are clean-fid's own maths (`cleanfid.fid.fid_from_feats`, `kernel_distance`) on
whatever features an extractor gives.  Only clean-fid's InceptionV3 (the torchscript
``inception-2015-12-05.pt`` with its "clean" PIL-bicubic resize to 299²) gives "FID" and "KID";
a distance in any other feature space is reported under that space's name (`metric_names`):
``FD_lesioncnn`` / ``KD_lesioncnn``, never as FID, since its values are not comparable with FIDs.

Extractors (`build_extractor`):

- ``inception``: clean-fid's InceptionV3 (what ``cleanfid.features.build_feature_extractor("clean")``
  builds, without its download).  Weights from ``--inception-weights`` or clean-fid's cache
  (``/tmp/inception-2015-12-05.pt``); missing weights are one `UserError` saying how to get them.  The
  file is TorchScript, i.e. code: it is loaded only from bytes whose sha256 is `INCEPTION_SHA256`
  (clean-fid's file), and an s3:// copy is cached on each node under that digest (`fetch_inception`).
- ``lesion-cnn``: the penultimate layer (128-d) of `skindual.quality.LesionClassifier` trained on
  the real images at the evaluation's size; its weights are cached by the content of its
  training set, steps and seed.  Offline, and it knows what lesions look like.
- ``random-cnn``: the same network with a fixed seeded random initialisation (no training).

Real features are cached as ``.npy`` under the cache folder, keyed by the extractor's fingerprint
(its weights' sha256 and its preprocessing) and a content hash of the real images.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from skindual.errors import UserError
from skindual.quality import LesionClassifier, images_to_tensor, train_classifier
from skindual.storage import cache_root, file_sha256, is_remote, open_storage

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/" + INCEPTION_FILE
INCEPTION_SHA256 = "f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4"
"""The sha256 of `INCEPTION_URL`'s file (README, "Evaluation"): no other bytes are loaded as the Inception."""
CLEAN_FID_CACHE = Path("/tmp")  # where clean-fid's feature_extractor keeps the weights on Linux/macOS
EXTRACTORS = ("inception", "lesion-cnn", "random-cnn")


class FeatureExtractor(Protocol):
    name: str  # "inception" gives FID/KID; any other name X gives FD_X/KD_X
    fingerprint: str  # changes whenever the features would

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 N×H×W×3 → float64 N×D."""


def metric_names(extractor_name: str) -> tuple[str, str]:
    """(Fréchet, kernel) distance names for features of `extractor_name`."""
    return ("FID", "KID") if extractor_name == "inception" else (f"FD_{extractor_name}", f"KD_{extractor_name}")


def frechet_distance(feats1: np.ndarray, feats2: np.ndarray) -> float:
    """Fréchet distance of the Gaussians fitted to two feature sets (clean-fid's `fid_from_feats`).

    Round-off can leave identical sets a hair below 0; that is returned as 0.
    """
    from cleanfid.fid import fid_from_feats
    from scipy.linalg import LinAlgWarning

    _need_two(feats1, feats2)
    with warnings.catch_warnings():  # fewer samples than dimensions: singular covariances, expected
        warnings.simplefilter("ignore", LinAlgWarning)
        return max(0.0, float(fid_from_feats(np.asarray(feats1, np.float64), np.asarray(feats2, np.float64))))


@dataclass
class Moments:
    """Sufficient statistics of a feature set for the Fréchet distance, in float64: they add up, so a
    set's can be summed from any split of it (per shard, per class, per worker) in any order."""

    count: int
    total: np.ndarray  # Σ x, shape D
    outer: np.ndarray  # Σ x xᵀ, shape D×D

    @classmethod
    def of(cls, features: np.ndarray) -> Moments:
        f = np.asarray(features, np.float64)
        return cls(len(f), f.sum(0), f.T @ f)

    def __add__(self, other: Moments) -> Moments:
        return Moments(self.count + other.count, self.total + other.total, self.outer + other.outer)

    def mean_and_covariance(self) -> tuple[np.ndarray, np.ndarray]:
        """The mean and the unbiased covariance (ddof 1, as `np.cov` and clean-fid)."""
        mean = self.total / self.count
        return mean, (self.outer - self.count * np.outer(mean, mean)) / (self.count - 1)


def frechet_from_moments(a: Moments, b: Moments) -> float:
    """`frechet_distance` of two feature sets given by their `Moments` (clean-fid's `frechet_distance`)."""
    from cleanfid.fid import frechet_distance as clean_frechet_distance
    from scipy.linalg import LinAlgWarning

    if min(a.count, b.count) < 2:
        raise ValueError(f"a distance needs at least 2 samples per set, got {[a.count, b.count]}")
    with warnings.catch_warnings():  # fewer samples than dimensions: singular covariances, expected
        warnings.simplefilter("ignore", LinAlgWarning)
        return max(0.0, float(clean_frechet_distance(*a.mean_and_covariance(), *b.mean_and_covariance())))


def kernel_distance(feats1: np.ndarray, feats2: np.ndarray, num_subsets: int = 100,
                    max_subset_size: int = 1000, seed: int = 0) -> float:
    """Unbiased MMD² with the cubic polynomial kernel over random subsets (clean-fid's KID maths).

    clean-fid draws the subsets from numpy's global generator; it is seeded here and restored after.
    """
    from cleanfid.fid import kernel_distance as clean_kernel_distance

    _need_two(feats1, feats2)
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        return float(clean_kernel_distance(np.asarray(feats1, np.float64), np.asarray(feats2, np.float64),
                                           num_subsets=num_subsets, max_subset_size=max_subset_size))
    finally:
        np.random.set_state(state)


def _need_two(*sets: np.ndarray) -> None:
    if min(len(s) for s in sets) < 2:
        raise ValueError(f"a distance needs at least 2 samples per set, got {[len(s) for s in sets]}")


def feature_spread(features: np.ndarray, max_rows: int = 1000, seed: int = 0) -> float | None:
    """Mean Euclidean distance between two different rows (None below 2 rows): how varied a set is.

    Above `max_rows` rows, a seeded random `max_rows` of them (the distances are O(n²))."""
    f = np.asarray(features, np.float64)
    if len(f) < 2:
        return None
    if len(f) > max_rows:
        f = f[np.random.default_rng(seed).choice(len(f), max_rows, replace=False)]
    from scipy.spatial.distance import pdist

    return float(pdist(f).mean())


def sample_ranks(keys: Sequence[str], seed: int) -> np.ndarray:
    """A seeded pseudo-random rank (uint64) per sample key: a set's seeded sample of at most k is its k
    smallest ranks, whichever order or split the samples come in (a bottom-k sketch)."""
    return np.asarray([int.from_bytes(hashlib.blake2b(f"{seed}/{k}".encode(), digest_size=8).digest(), "little")
                       for k in keys], np.uint64)


@dataclass
class FeatureSummary:
    """What the fidelity measures need of one (set, class): the `Moments` of all its features and a
    seeded sample of at most k of them (`sample_ranks`), which KID and the diversity are computed from."""

    moments: Moments
    sample: np.ndarray  # min(k, count) × D
    ranks: np.ndarray  # the sample's ranks, ascending
    k: int  # the most the sample holds

    @classmethod
    def of(cls, features: np.ndarray, keys: Sequence[str], seed: int, k: int) -> FeatureSummary:
        ranks = sample_ranks(keys, seed)
        keep = np.argsort(ranks, kind="stable")[:k]
        return cls(Moments.of(features), np.asarray(features, np.float64)[keep], ranks[keep], k)

    def __add__(self, other: FeatureSummary) -> FeatureSummary:
        """The summary of both sets: moments summed, and the k smallest ranks of both samples (the same
        sample in whatever order the parts are added)."""
        ranks = np.concatenate([self.ranks, other.ranks])
        keep = np.argsort(ranks, kind="stable")[:min(self.k, other.k)]
        return FeatureSummary(self.moments + other.moments, np.concatenate([self.sample, other.sample])[keep],
                              ranks[keep], min(self.k, other.k))


def fidelity_from_summaries(name: str, real: dict[int, FeatureSummary], synthetic: dict[int, FeatureSummary],
                            class_codes: Sequence[str], *, num_subsets: int = 100, max_subset_size: int = 1000,
                            seed: int = 0) -> dict:
    """Fréchet and kernel distances, overall and per class (classes of `synthetic`), under the names of
    `metric_names(name)`, and the diversity of each side: `feature_spread` of the real and of the
    synthetic sample and ``spread_ratio`` = synthetic / real (1: as varied as the real images; well below
    1: the generator repeats itself, which FD alone can hide when the repeated samples are typical).

    FD comes from the summed `Moments` (all samples); KD and the spreads from the seeded samples (each
    at most `max_subset_size`; all classes together: the sample of the whole set).  A class with fewer
    than 2 samples on either side gets None values (and its counts).
    """
    fd, kd = metric_names(name)

    def pair(a: FeatureSummary | None, b: FeatureSummary | None) -> dict:
        n_a, n_b = (x.moments.count if x is not None else 0 for x in (a, b))
        out: dict = {"n_real": n_a, "n_synthetic": n_b, fd: None, kd: None,
                     "spread_real": None, "spread_synthetic": None, "spread_ratio": None}
        if n_a >= 2 and n_b >= 2:
            out[fd] = frechet_from_moments(a.moments, b.moments)
            out[kd] = kernel_distance(a.sample, b.sample, num_subsets, max_subset_size, seed)
            out["spread_real"], out["spread_synthetic"] = (feature_spread(x.sample, max_subset_size, seed) for x in (a, b))
            out["spread_ratio"] = out["spread_synthetic"] / out["spread_real"] if out["spread_real"] else None
        return out

    def whole(summaries: dict[int, FeatureSummary]) -> FeatureSummary | None:
        parts = [summaries[c] for c in sorted(summaries)]
        return sum(parts[1:], parts[0]) if parts else None

    per_class = {class_codes[c]: pair(real.get(c), synthetic[c]) for c in sorted(synthetic)}
    return {"extractor": name, "fd_name": fd, "kd_name": kd, "overall": pair(whole(real), whole(synthetic)),
            "per_class": per_class}


def fidelity_metrics(name: str, real: np.ndarray, real_labels: np.ndarray, synthetic: np.ndarray,
                     synthetic_labels: np.ndarray, class_codes: Sequence[str], *, num_subsets: int = 100,
                     max_subset_size: int = 1000, seed: int = 0) -> dict:
    """`fidelity_from_summaries` of two feature sets held in memory (rows keyed by their index)."""

    def summaries(features: np.ndarray, labels: np.ndarray, prefix: str) -> dict[int, FeatureSummary]:
        keys = np.asarray([f"{prefix}{i}" for i in range(len(features))])
        return {int(c): FeatureSummary.of(features[labels == c], keys[labels == c], seed, max_subset_size)
                for c in np.unique(labels)}

    return fidelity_from_summaries(name, summaries(real, real_labels, "r"), summaries(synthetic, synthetic_labels, "s"),
                                   class_codes, num_subsets=num_subsets, max_subset_size=max_subset_size, seed=seed)


# --------------------------------------------------------------------------- extractors


class InceptionExtractor:
    """clean-fid's InceptionV3 pool features (2048-d) with its "clean" resize to 299×299."""

    name = "inception"

    def __init__(self, weights: str | os.PathLike[str], device: str = "cpu", batch_size: int = 32,
                 sha256: str = INCEPTION_SHA256):
        """The weights' bytes are read once and checked against `sha256` before TorchScript sees them; the
        checked bytes are what clean-fid's wrapper loads (from a private temp folder)."""
        from cleanfid.inception_torchscript import InceptionV3W
        from cleanfid.resize import build_resizer

        data = checked_inception(weights, sha256)
        folder = Path(tempfile.mkdtemp(prefix="skindual-inception-"))
        try:  # InceptionV3W loads {folder}/inception-2015-12-05.pt
            (folder / INCEPTION_FILE).write_bytes(data)
            self.model = InceptionV3W(str(folder), download=False, resize_inside=False)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        self.device, self.batch_size = torch.device(device), batch_size
        self.model = self.model.to(self.device).eval()
        self.resize = build_resizer("clean")
        self.fingerprint = f"inception-clean:{sha256}"

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        feats = []
        for i in range(0, len(images), self.batch_size):
            batch = np.stack([self.resize(img) for img in images[i:i + self.batch_size]])  # float 0..255
            x = torch.from_numpy(batch).permute(0, 3, 1, 2).to(self.device)
            feats.append(self.model(x).double().cpu().numpy())
        return np.concatenate(feats) if feats else np.zeros((0, 2048))


class CNNExtractor:
    """Penultimate features of a `LesionClassifier`, at the network's own input size."""

    def __init__(self, name: str, model: torch.nn.Module, size: int, device: str = "cpu", batch_size: int = 256):
        self.name, self.size, self.batch_size = name, size, batch_size
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        digest = hashlib.sha256(f"{name}:{size}".encode())
        for key, value in sorted(model.state_dict().items()):
            digest.update(key.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
        self.fingerprint = f"{name}:{digest.hexdigest()}"

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        feats = []
        for i in range(0, len(images), self.batch_size):
            x = images_to_tensor(images[i:i + self.batch_size], self.device)
            if x.shape[-2:] != (self.size, self.size):
                x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
            feats.append(self.model.features(x).mean((2, 3)).double().cpu().numpy())
        return np.concatenate(feats) if feats else np.zeros((0, 0))

    @torch.no_grad()
    def classify_features(self, features: np.ndarray) -> np.ndarray:
        """The class a `LesionClassifier` extractor predicts from features it gave (its head)."""
        if not len(features):
            return np.zeros(0, np.int64)
        x = torch.as_tensor(np.asarray(features), dtype=torch.float32, device=self.device)
        return self.model.head(x).argmax(1).cpu().numpy()


def checked_inception(weights: str | os.PathLike[str], sha256: str = INCEPTION_SHA256, label: str = "") -> bytes:
    """The bytes of an Inception weights file, once their sha256 is `sha256`; else one `UserError` naming
    `label` (default: the file)."""
    data = Path(weights).read_bytes()
    found = hashlib.sha256(data).hexdigest()
    if found != sha256:
        raise UserError(f"--inception-weights {label or weights}: its sha256 is {found}, not {sha256} (clean-fid's "
                        f"{INCEPTION_FILE}), so it is not loaded; download it again from {INCEPTION_URL}")
    return data


def fetch_inception(location: str | os.PathLike[str], s3_endpoint: str | None = None, sha256: str = INCEPTION_SHA256,
                    cache: Path | None = None) -> Path:
    """A node-local path of the Inception weights at `location`: a local path as it is; an s3:// URL downloaded
    once per node into ``<cache>/inception/<sha256>.pt`` (keyed by content, so another URL with other bytes
    never passes for it), the download checked against `sha256` before it takes that name."""
    location = str(location)
    if not is_remote(location):
        return Path(location)
    target = (cache or cache_root()) / "inception" / f"{sha256}.pt"
    if target.is_file():
        return target  # named by its digest once checked; InceptionExtractor checks the bytes it loads again
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".fetch-", suffix=".pt")
    os.close(fd)
    try:
        parent, _, name = location.rpartition("/")
        open_storage(parent, s3_endpoint).download_file(name, tmp)
        if file_sha256(tmp) != sha256:
            checked_inception(tmp, sha256, label=location)  # raises, naming the URL
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def find_inception_weights(path: str = "", s3_endpoint: str | None = None, sha256: str = INCEPTION_SHA256) -> Path | str:
    """The Inception weights: `path` (a local file, or an s3:// URL the workers fetch and check), else
    clean-fid's cached copy; a local file is checked against `sha256` here, before any work.  A `UserError`
    saying how to get them."""
    if path and path.startswith("s3://"):
        parent, _, name = path.rpartition("/")
        if not open_storage(parent, s3_endpoint).exists(name):
            raise UserError(f"--inception-weights {path}: no such object; upload clean-fid's {INCEPTION_FILE} "
                            f"(download: {INCEPTION_URL}) there")
        return path
    if path:
        if not Path(path).is_file():
            raise UserError(f"--inception-weights {path}: no such file; give the path of clean-fid's "
                            f"{INCEPTION_FILE} (download: {INCEPTION_URL})")
        checked_inception(path, sha256)
        return Path(path)
    cached = CLEAN_FID_CACHE / INCEPTION_FILE
    if cached.is_file():
        checked_inception(cached, sha256)
        return cached
    raise UserError(f"clean-fid's Inception weights are not cached ({cached} is missing) and are not downloaded "
                    f"here: download {INCEPTION_URL} and pass --inception-weights PATH (or put it at {cached}), "
                    "or pass --feature-extractor lesion-cnn to measure offline (reported as FD_lesioncnn, not FID)")


def build_extractor(kind: str, *, size: int, device: str = "cpu", inception_weights: str = "",
                    train: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None, steps: int = 300,
                    seed: int = 0, cache_dir: str | os.PathLike[str] | None = None,
                    inception_sha256: str = INCEPTION_SHA256) -> FeatureExtractor:
    """An extractor of `EXTRACTORS`.  ``lesion-cnn`` trains on ``train()``'s (real images, class
    indices), or loads the weights cached for that content, `steps`, `seed` and `size`; ``inception`` loads
    weights whose sha256 is `inception_sha256` only."""
    if kind == "inception":
        return InceptionExtractor(fetch_inception(find_inception_weights(inception_weights, sha256=inception_sha256)),
                                  device, sha256=inception_sha256)
    if kind == "random-cnn":
        torch.manual_seed(seed)
        return CNNExtractor("randomcnn", LesionClassifier(), size, device)
    if kind != "lesion-cnn":
        raise UserError(f"--feature-extractor {kind!r}: choose one of {', '.join(EXTRACTORS)}")
    if train is None:
        raise ValueError("lesion-cnn needs the real images to train on")
    images, labels = train()
    key = hashlib.sha256(f"lesioncnn-v1:{steps}:{seed}:{size}:{array_digest(images)}:{array_digest(labels)}".encode())
    path = feature_cache(cache_dir) / f"lesioncnn-{key.hexdigest()[:32]}.safetensors"
    from safetensors.torch import load_file, save_file

    model = LesionClassifier()
    if path.is_file():
        model.load_state_dict(load_file(str(path)))
    else:
        model = train_classifier(images, labels, steps=steps, seed=seed, batch_size=min(64, max(8, len(images))))
        _atomic(path, lambda tmp: save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp))
    return CNNExtractor("lesioncnn", model, size, device)


# --------------------------------------------------------------------------- caching


def feature_cache(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder: `cache_dir`, else ``$SKINDUAL_CACHE/features`` (default ``~/.cache/skindual``)."""
    if cache_dir:
        return Path(cache_dir)
    return cache_root() / "features"


def array_digest(array: np.ndarray) -> str:
    """sha256 of an array's dtype, shape and bytes."""
    array = np.ascontiguousarray(array)
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.data)
    return digest.hexdigest()


def _atomic(path: Path, write: Callable[[str], object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def cached_features(extractor: FeatureExtractor, images: np.ndarray,
                    cache_dir: str | os.PathLike[str] | None = None) -> tuple[np.ndarray, bool]:
    """(features of `images`, whether they came from the cache), keyed by extractor and image content."""
    key = hashlib.sha256(f"{extractor.fingerprint}:{array_digest(images)}".encode()).hexdigest()
    path = feature_cache(cache_dir) / f"{extractor.name}-{key[:32]}.npy"
    if path.is_file():
        return np.load(path), True
    feats = extractor(images)
    _atomic(path, lambda tmp: np.save(tmp, feats))
    return feats, False
