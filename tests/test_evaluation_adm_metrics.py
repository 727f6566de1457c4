"""libs/evaluation/adm_metrics.py against independent implementations written here, hand-made cases with known answers, and
torch-fidelity (when installed) fed the same features."""
import math

import numpy as np
import pytest
import torch

import libs.evaluation.adm_metrics as am
from libs.files import UnreadableFile
from libs.evaluation.adm_metrics import (Reference, inception_score, knn_radii, load_reference, precision_recall,
                              sample_metrics, save_reference)
from libs.evaluation.fid import activation_statistics, frechet_distance

pytestmark = pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")


def naive_inception_score(logits, split_size):
    """exp(mean_x KL(p(y|x) || p(y))) per split, averaged: written from the definition, one sample at a time."""
    scores = []
    for start in range(0, len(logits), split_size):
        rows = [np.exp(r - r.max()) / np.exp(r - r.max()).sum() for r in logits[start:start + split_size]]
        marginal = np.mean(rows, axis=0)
        kl = [sum(p * math.log(p / q) for p, q in zip(row, marginal) if p > 0) for row in rows]
        scores.append(math.exp(np.mean(kl)))
    return float(np.mean(scores))


def test_inception_score_known_answers():
    k = 10
    confident = 60.0 * np.eye(k)[np.arange(200) % k]             # sure of one class, classes balanced
    assert inception_score(confident) == pytest.approx(k, rel=1e-12)
    assert inception_score(np.tile(np.arange(k, dtype=float), (50, 1))) == pytest.approx(1.0, abs=1e-12)
    assert inception_score(np.zeros((30, 1008))) == pytest.approx(1.0, abs=1e-12)   # uniform predictions
    # Splits of 5,000 in order: the first split is balanced (IS = k), the second all one class (IS = 1).
    split = np.concatenate([60.0 * np.eye(k)[np.arange(5000) % k], np.tile(60.0 * np.eye(k)[0], (5000, 1))])
    assert inception_score(split) == pytest.approx((k + 1) / 2, rel=1e-12)
    assert inception_score(np.array([[1e4, -1e4, 0.0]] * 3)) == pytest.approx(1.0)  # no log(0) from underflow
    with pytest.raises(ValueError, match="logits"):
        inception_score(np.zeros(5))


def test_inception_score_matches_a_naive_implementation():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3, size=(120, 17))
    for split in (5000, 50, 7):                                   # one split; partial last splits
        assert inception_score(logits, split) == pytest.approx(naive_inception_score(logits, split), rel=1e-11)


def test_inception_score_matches_torch_fidelity():
    fidelity = pytest.importorskip("torch_fidelity.metric_isc")
    logits = np.random.default_rng(1).normal(scale=4, size=(10_000, 1008)).astype(np.float32)
    # torch-fidelity cuts N into `splits` equal parts (shuffled by default): 2 unshuffled parts = ADM's splits of 5000.
    theirs = fidelity.isc_features_to_metric(torch.from_numpy(logits), splits=2, shuffle=False)
    assert inception_score(logits) == pytest.approx(theirs["inception_score_mean"], rel=1e-12)


def naive_precision_recall(ref, gen, k=3):
    """From the definition with exact float64 distances: the radius of a point is the distance to its k-th nearest
    other point; a point is covered if within (<=) the radius of a point of the other set."""
    def radii(x):
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
        return np.array([np.sort(np.delete(row, i))[k - 1] for i, row in enumerate(d)])
    cross = np.sqrt(((gen[:, None] - ref[None]) ** 2).sum(-1))       # (n_gen, n_ref)
    precision = np.mean([(row <= radii(ref)).any() for row in cross])
    recall = np.mean([(col <= radii(gen)).any() for col in cross.T])
    return precision, recall


def test_precision_recall_on_a_hand_made_line():
    # Reference 0, 1, 2, 3, 4, 10 on a line: 3rd-neighbour radii 3, 2, 2, 2, 3, 8 (10 covers [2, 18]).
    ref = np.array([[0.0], [1], [2], [3], [4], [10]]) * np.array([[1.0, 0.0]])
    assert knn_radii(torch.tensor(ref, dtype=torch.float32)).tolist() == [9, 4, 4, 4, 9, 64]   # squared
    # 3.5 (within 2 of 2), 18 (on 10's boundary: ties count), 18.5 and -3.5 (outside every ball) -> 2 of 4.
    gen = np.array([[3.5, 0], [18, 0], [18.5, 0], [-3.5, 0]])
    precision, recall = precision_recall(ref, gen)
    # Sample radii (3rd neighbour): 3.5 -> 15, 18 -> 21.5, 18.5 -> 22, -3.5 -> 22: -3.5 covers [-25.5, 18.5], so
    # recall is 1.
    assert (precision, recall) == (0.5, 1.0)
    assert naive_precision_recall(ref, gen) == (0.5, 1.0)
    assert precision_recall(ref, ref) == (1.0, 1.0)
    with pytest.raises(ValueError, match="more than 3 points"):
        precision_recall(ref[:3], gen)
    with pytest.raises(ValueError, match="layout"):
        precision_recall(ref, gen[:, :1])


def test_precision_recall_matches_a_naive_implementation_in_any_block_size(monkeypatch):
    rng = np.random.default_rng(2)
    ref = rng.normal(size=(60, 8))
    gen = np.concatenate([rng.normal(size=(30, 8)), rng.normal(loc=1.5, size=(45, 8))])   # half off-manifold
    expected = naive_precision_recall(ref, gen)
    assert 0 < expected[0] < 1 and 0 < expected[1] <= 1
    assert precision_recall(ref, gen) == pytest.approx(expected, abs=1e-12)
    monkeypatch.setattr(am, "_BLOCK_ELEMENTS", 7 * 60)             # blocks of 7 rows (last one partial)
    assert precision_recall(ref, gen) == pytest.approx(expected, abs=1e-12)


def test_precision_recall_matches_torch_fidelity():
    fidelity = pytest.importorskip("torch_fidelity.metric_prc")
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(300, 8)).astype(np.float32)
    gen = (rng.normal(size=(400, 8)) + 0.8).astype(np.float32)           # partly off the reference manifold
    theirs = fidelity.prc_features_to_metric(torch.from_numpy(gen), torch.from_numpy(ref), prc_neighborhood=3,
                                             prc_batch_size=128, save_cpu_ram=False, verbose=False)
    ours = precision_recall(ref, gen)
    assert 0.05 < ours[0] < 0.95 and 0.05 < ours[1] < 0.95
    # The same points counted (torch-fidelity averages in float32: 1e-6 is far below one point, 1/300).
    assert ours == pytest.approx((theirs["precision"], theirs["recall"]), abs=1e-6)


def random_features(rng, n):
    return {"pool": np.abs(rng.normal(size=(n, 2048))).astype(np.float32),
            "spatial": np.abs(rng.normal(size=(n, 2023))).astype(np.float32),
            "logits": rng.normal(size=(n, 1008)).astype(np.float32)}


def test_sample_metrics_compute_what_the_reference_allows():
    rng = np.random.default_rng(4)
    features = random_features(rng, 40)
    mu, sigma = np.full(2048, 0.8), np.eye(2048)
    mu_s, sigma_s = np.full(2023, 0.7), 0.5 * np.eye(2023)
    pr = np.abs(rng.normal(size=(25, 2048))).astype(np.float32)
    metrics, missing = sample_metrics(features, Reference("full.npz", mu, sigma, mu_s, sigma_s, pr))
    assert missing == {} and set(metrics) == {"fid", "sfid", "inception_score", "precision", "recall"}
    assert metrics["fid"] == frechet_distance(*activation_statistics(features["pool"]), mu, sigma)
    # sFID is the FID of the spatial features.
    assert metrics["sfid"] == frechet_distance(*activation_statistics(features["spatial"]), mu_s, sigma_s)
    assert metrics["inception_score"] == inception_score(features["logits"])
    assert (metrics["precision"], metrics["recall"]) == precision_recall(pr, features["pool"])

    metrics, missing = sample_metrics(features, Reference("old.npz", mu, sigma))
    assert set(metrics) == {"fid", "inception_score"} and set(missing) == {"sfid", "precision", "recall"}
    assert all("old.npz" in why and "fid_reference_stats.py" in why for why in missing.values())
    metrics, missing = sample_metrics({k: v[:3] for k, v in features.items()}, Reference("r", mu, sigma, pr_features=pr))
    assert "precision" not in metrics and "more than k=3 samples" in missing["recall"]


def test_reference_files(tmp_path):
    rng = np.random.default_rng(5)
    arrays = dict(mu=rng.normal(size=2048), sigma=np.eye(2048), mu_s=rng.normal(size=2023), sigma_s=np.eye(2023),
                  pr_features=rng.normal(size=(5, 2048)), pr_indices=np.array([0, 2, 3, 7, 9]), n_images=10)
    path = tmp_path / "sub" / "ref"                               # no .npz suffix: written exactly there
    save_reference(str(path), **arrays)
    ref = load_reference(str(path))
    for key in ("mu", "sigma", "mu_s", "sigma_s"):
        np.testing.assert_array_equal(getattr(ref, key), arrays[key])
    assert ref.pr_features.dtype == np.float32
    np.testing.assert_array_equal(ref.pr_features, arrays["pr_features"].astype(np.float32))
    with np.load(path) as f:
        assert f["n_images"] == 10 and f["pr_indices"].tolist() == [0, 2, 3, 7, 9]
    plain = np.load(str(path))                                    # still a plain FID statistics file
    mu, sigma = plain['mu'], plain['sigma']
    np.testing.assert_array_equal(mu, arrays["mu"])

    np.savez(tmp_path / "uvit.npz", mu=arrays["mu"], sigma=arrays["sigma"])     # U-ViT's files (mu, sigma only) load
    ref = load_reference(str(tmp_path / "uvit.npz"))
    assert ref.mu_s is None and ref.sigma_s is None and ref.pr_features is None

    missing = tmp_path / "fid_stats_imagenet256_guided_diffusion.npz"
    with pytest.raises(FileNotFoundError) as err:
        load_reference(str(missing))
    assert str(missing) in str(err.value) and "fid_stats/" in str(err.value)
    for bad, match in [(dict(mu=arrays["mu"]), "lacks"), (dict(arrays, sigma_s=None), "only one of"),
                       (dict(arrays, mu_s=arrays["mu"], sigma_s=arrays["sigma"]), "mu_s has shape"),
                       (dict(arrays, pr_features=np.zeros((3, 7))), "pr_features has shape"),
                       (dict(arrays, sigma=np.eye(3)), "sigma has shape")]:
        np.savez(tmp_path / "bad.npz", **{k: v for k, v in bad.items() if v is not None})
        with pytest.raises(ValueError, match=match):
            load_reference(str(tmp_path / "bad.npz"))
    whole = path.read_bytes()
    path.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(UnreadableFile, match=f"^{path}: is truncated"):
        load_reference(str(path))
