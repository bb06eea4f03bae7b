"""skindual.fidelity: clean-fid's FD/KD maths against closed forms, names, the caches, the extractors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from skindual import fidelity
from skindual.errors import UserError
from skindual.fidelity import (CNNExtractor, InceptionExtractor, build_extractor, cached_features, fetch_inception,
                               fidelity_metrics, find_inception_weights, frechet_distance, kernel_distance, metric_names)
from skindual.storage import file_sha256, open_storage


def gaussian_with_exact_moments(rng: np.random.Generator, n: int, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """n samples whose sample mean and (ddof=1) sample covariance are exactly `mean` and `cov`."""
    x = rng.standard_normal((n, len(mean)))
    x -= x.mean(0)
    x = x @ np.linalg.inv(np.linalg.cholesky(np.cov(x, rowvar=False))).T  # whitened: sample cov = I
    return x @ np.linalg.cholesky(cov).T + mean


def rotation(d: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q


def test_frechet_distance_matches_the_closed_form():
    # Σ1 = R diag(a) Rᵀ and Σ2 = R diag(b) Rᵀ commute, so Tr((Σ1Σ2)^½) = Σ √(a·b):
    # d² = |μ1 − μ2|² + Σ (√a − √b)²
    rng, r = np.random.default_rng(0), rotation(6, 1)
    a, b = np.array([1.0, 2, 3, 4, 5, 6]), np.array([2.0, 2, 1, 0.5, 5, 9])
    mu1, mu2 = np.zeros(6), np.array([1.0, -1, 0, 2, 0, 0.5])
    x = gaussian_with_exact_moments(rng, 400, mu1, r @ np.diag(a) @ r.T)
    y = gaussian_with_exact_moments(rng, 300, mu2, r @ np.diag(b) @ r.T)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_of_sampled_gaussians_converges():
    rng = np.random.default_rng(1)
    x = rng.normal(0.0, 1.0, (20_000, 4))
    y = rng.normal(0.5, 2.0, (20_000, 4))
    expected = 4 * 0.5**2 + 4 * (1 - 2) ** 2  # |Δμ|² + Σ(σ1 − σ2)²
    assert frechet_distance(x, y) == pytest.approx(expected, rel=0.03)


def unbiased_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """MMD² with k(x, y) = (xᵀy/d + 1)³, the unbiased estimator, written out independently."""
    d, m = x.shape[1], len(x)
    kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
    off = lambda k: (k.sum() - np.trace(k)) / (m * (m - 1))  # noqa: E731
    return off(kxx) + off(kyy) - 2 * kxy.mean()


def test_kernel_distance_is_the_unbiased_mmd_and_near_zero_for_one_distribution():
    rng = np.random.default_rng(2)
    x, y = rng.normal(0, 1, (60, 8)), rng.normal(0.3, 1, (60, 8))
    # one subset of all samples is the whole set (in another order): the estimator over the full sets
    assert kernel_distance(x, y, num_subsets=1, max_subset_size=60) == pytest.approx(unbiased_mmd2(x, y), rel=1e-9)
    a, b = rng.normal(0, 1, (1000, 8)), rng.normal(0, 1, (1000, 8))
    shifted = kernel_distance(a, a + 0.5, num_subsets=10, max_subset_size=500)
    assert abs(kernel_distance(a, b, num_subsets=10, max_subset_size=500)) < 0.01 * shifted  # one distribution
    # identical sets: each sample meets itself in the cross term, a bias of O(1/m) below 0
    identical = [kernel_distance(a[:m], a[:m], num_subsets=10) for m in (100, 1000)]
    assert -0.02 * shifted < identical[1] < 0 and identical[1] == pytest.approx(identical[0] / 10, rel=0.2)


def test_kernel_distance_is_seeded_and_leaves_numpys_global_generator_alone():
    rng = np.random.default_rng(3)
    x, y = rng.normal(0, 1, (50, 4)), rng.normal(0, 1, (70, 4))
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    assert kernel_distance(x, y, 10, 20, seed=5) == kernel_distance(x, y, 10, 20, seed=5)
    assert kernel_distance(x, y, 10, 20, seed=5) != kernel_distance(x, y, 10, 20, seed=6)
    assert (np.random.get_state()[1] == before).all()
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(x[:1], y)


def test_metric_names_never_call_another_space_fid():
    assert metric_names("inception") == ("FID", "KID")
    assert metric_names("lesioncnn") == ("FD_lesioncnn", "KD_lesioncnn")
    rng = np.random.default_rng(4)
    real, synthetic = rng.normal(0, 1, (30, 3)), rng.normal(0, 1, (12, 3))
    real_labels, synthetic_labels = np.repeat([0, 1, 2], 10), np.array([0] * 6 + [1] * 5 + [2])
    out = fidelity_metrics("lesioncnn", real, real_labels, synthetic, synthetic_labels, ["a", "b", "c"],
                           num_subsets=5)
    assert (out["fd_name"], out["kd_name"]) == ("FD_lesioncnn", "KD_lesioncnn")
    assert "FID" not in str(out)
    assert out["overall"]["FD_lesioncnn"] > 0 and out["per_class"]["a"]["n_synthetic"] == 6
    assert out["per_class"]["c"]["FD_lesioncnn"] is None  # one synthetic sample: no distance


def test_feature_spread_is_the_mean_pairwise_distance_and_the_ratio_sees_a_repeating_generator():
    from scipy.spatial.distance import pdist

    from skindual.fidelity import feature_spread

    rng = np.random.default_rng(5)
    x = rng.normal(0, 1, (40, 6))
    assert feature_spread(x) == pytest.approx(pdist(x).mean())
    assert feature_spread(x[:1]) is None and feature_spread(np.repeat(x[:1], 5, 0)) == pytest.approx(0, abs=1e-6)
    # capped at max_rows by a seeded subsample
    assert feature_spread(x, max_rows=10) == feature_spread(x, max_rows=10) != feature_spread(x)

    # per class: synthetic features at half the real spread (same centre) read as ratio 0.5
    real, labels = rng.normal(0, 1, (400, 6)), np.repeat([0, 1], 200)
    narrow = np.concatenate([real[:200] * 0.5, real[200:]])
    out = fidelity_metrics("lesioncnn", real, labels, narrow, labels, ["a", "b"], num_subsets=5)
    assert out["per_class"]["a"]["spread_ratio"] == pytest.approx(0.5)
    assert out["per_class"]["b"]["spread_ratio"] == pytest.approx(1.0)
    assert out["per_class"]["a"]["spread_real"] == pytest.approx(pdist(real[:200]).mean())


def tiny_images(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_real_features_are_cached_by_content(tmp_path):
    torch.manual_seed(0)
    extractor = build_extractor("random-cnn", size=16)
    images = tiny_images(5)
    first, hit = cached_features(extractor, images, tmp_path)
    again, hit_again = cached_features(extractor, images, tmp_path)
    assert (hit, hit_again) == (False, True) and np.array_equal(first, again) and first.shape == (5, 128)
    changed = images.copy()
    changed[0, 0, 0, 0] ^= 1
    assert cached_features(extractor, changed, tmp_path)[1] is False
    other = build_extractor("random-cnn", size=16, seed=1)
    assert other.fingerprint != extractor.fingerprint and cached_features(other, images, tmp_path)[1] is False


def test_lesion_cnn_weights_are_cached_by_training_content(tmp_path):
    images, labels = tiny_images(14), np.arange(14) % 7
    calls = []

    def train():
        calls.append(1)
        return images, labels

    first = build_extractor("lesion-cnn", size=16, train=train, steps=2, cache_dir=tmp_path)
    second = build_extractor("lesion-cnn", size=16, train=train, steps=2, cache_dir=tmp_path)
    assert first.name == "lesioncnn" and first.fingerprint == second.fingerprint
    assert len(list(tmp_path.glob("lesioncnn-*.safetensors"))) == 1
    assert np.allclose(first(images), second(images))
    assert first(tiny_images(3, size=24)).shape == (3, 128)  # resized to the network's own size


def test_missing_inception_weights_say_how_to_provide_them(tmp_path, monkeypatch):
    monkeypatch.setattr(fidelity, "CLEAN_FID_CACHE", tmp_path)
    with pytest.raises(UserError) as err:
        find_inception_weights()
    message = str(err.value)
    assert "\n" not in message
    for hint in ("--inception-weights", fidelity.INCEPTION_FILE, "--feature-extractor lesion-cnn", "FD_lesioncnn"):
        assert hint in message
    with pytest.raises(UserError, match="--inception-weights .*no such file"):
        find_inception_weights(str(tmp_path / "nope.pt"))
    with pytest.raises(UserError):
        build_extractor("inception", size=64)


class _FakeInceptionLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2048)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


class _FakeInception(nn.Module):
    """The shape of clean-fid's torchscript Inception: `.layers(x)` maps normalised 299² images to 2048-d."""

    def __init__(self):
        super().__init__()
        self.layers = _FakeInceptionLayers()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def scripted_inception(path, seed: int = 0) -> str:
    """A TorchScript stand-in of clean-fid's Inception saved at `path`; its sha256."""
    torch.manual_seed(seed)
    torch.jit.script(_FakeInception()).save(str(path))
    return file_sha256(path)


def test_inception_path_runs_clean_fids_model_wrapper_and_resize(tmp_path, monkeypatch):
    """The real Inception cannot be downloaded here: a torchscript stand-in of the same interface (taken by its
    own sha256) checks the plumbing (clean-fid's InceptionV3W, its 299² "clean" resize, weights found by path or
    in the cache)."""
    weights = tmp_path / "my-inception.pt"
    digest = scripted_inception(weights)
    extractor = InceptionExtractor(weights, sha256=digest)
    feats = extractor(tiny_images(3, size=32))
    assert extractor.name == "inception" and feats.shape == (3, 2048) and np.isfinite(feats).all()
    # the same images at another size resize to the same 299² input, up to resampling
    assert metric_names(extractor.name) == ("FID", "KID")
    cache = tmp_path / "clean-fid-cache"
    cache.mkdir()
    (cache / fidelity.INCEPTION_FILE).write_bytes(weights.read_bytes())
    monkeypatch.setattr(fidelity, "CLEAN_FID_CACHE", cache)
    cached = build_extractor("inception", size=64, inception_sha256=digest)
    assert cached.fingerprint == extractor.fingerprint == f"inception-clean:{digest}"
    assert np.allclose(cached(tiny_images(3, size=32)), feats)


def test_inception_weights_load_only_when_their_sha256_is_clean_fids(tmp_path, monkeypatch):
    """The weights are TorchScript, i.e. code: bytes whose sha256 is not clean-fid's file's are refused in one line,
    before TorchScript reads them, wherever they come from (a path, clean-fid's cache, at plan time or in a worker)."""
    weights = tmp_path / fidelity.INCEPTION_FILE
    digest = scripted_inception(weights)
    refused = rf"its sha256 is {digest}, not {fidelity.INCEPTION_SHA256} \(clean-fid's inception-2015-12-05.pt\), so it is not loaded"
    with pytest.raises(UserError, match=rf"^--inception-weights {weights}: {refused}; download it again from https://"):
        InceptionExtractor(weights)
    with pytest.raises(UserError, match=refused):
        find_inception_weights(str(weights))  # the plan's check, before any cluster work
    with pytest.raises(UserError, match=refused):
        build_extractor("inception", size=64, inception_weights=str(weights))
    monkeypatch.setattr(fidelity, "CLEAN_FID_CACHE", tmp_path)
    with pytest.raises(UserError, match=refused):
        find_inception_weights()
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not TorchScript at all")
    with pytest.raises(UserError, match="its sha256 is"):  # the digest is checked first: TorchScript never saw it
        InceptionExtractor(junk)


def test_inception_weights_from_s3_are_cached_on_a_node_by_their_sha256(tmp_path, s3_env, monkeypatch):
    """Each node fetches --inception-weights s3://... once into a file named by the expected sha256; a URL whose
    bytes are other weights is refused, naming it, and leaves nothing in the cache."""
    from skindual.evaluate_features import ExtractorSpec

    good, other = tmp_path / "good.pt", tmp_path / "other.pt"
    digest, other_digest = scripted_inception(good, 0), scripted_inception(other, 1)
    store = open_storage(f"{s3_env}/models")
    store.upload_file(good, f"a/{fidelity.INCEPTION_FILE}")
    store.upload_file(other, f"b/{fidelity.INCEPTION_FILE}")
    cache = tmp_path / "node-cache"
    with pytest.raises(UserError, match=rf"^--inception-weights {store.join('b/' + fidelity.INCEPTION_FILE)}: its sha256 "
                                        rf"is {other_digest}, not {digest}"):
        fetch_inception(store.join(f"b/{fidelity.INCEPTION_FILE}"), sha256=digest, cache=cache)
    assert list((cache / "inception").iterdir()) == []
    local = fetch_inception(store.join(f"a/{fidelity.INCEPTION_FILE}"), sha256=digest, cache=cache)
    assert local == cache / "inception" / f"{digest}.pt" and file_sha256(local) == digest
    assert fetch_inception(store.join(f"a/{fidelity.INCEPTION_FILE}"), sha256=digest, cache=cache) == local
    # evaluation's workers take clean-fid's digest: the stand-in is refused there, naming its URL
    monkeypatch.setenv("SKINDUAL_CACHE", str(cache))
    with pytest.raises(UserError, match=rf"--inception-weights {store.join('a/' + fidelity.INCEPTION_FILE)}: its sha256"):
        ExtractorSpec("inception", 64, inception=store.join(f"a/{fidelity.INCEPTION_FILE}")).build("cpu")
    assert sorted(p.name for p in (cache / "inception").iterdir()) == [f"{digest}.pt"]  # only checked bytes are kept


def test_cnn_extractor_fingerprint_follows_the_weights():
    torch.manual_seed(0)
    from skindual.quality import LesionClassifier

    model = LesionClassifier()
    a = CNNExtractor("x", model, 16).fingerprint
    with torch.no_grad():
        model.head.bias.add_(1)
    assert CNNExtractor("x", model, 16).fingerprint != a
