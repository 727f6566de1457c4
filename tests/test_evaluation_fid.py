"""libs.evaluation.fid and scripts/fid_reference_stats.py against pytorch-fid, with random Inception weights (no downloads)."""
import logging
import math
import os
import runpy
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import pytorch_fid.inception
import torch
from PIL import Image
from pytorch_fid.fid_score import calculate_frechet_distance, get_activations

import libs.evaluation.fid
from libs.evaluation.adm_metrics import load_reference
from libs.evaluation.fid import (FID_WEIGHTS_URL, StreamingMoments, activation_statistics, default_weights_path,
                      fid_inception_v3, folder_loader, frechet_distance, image_files, load_inception)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "fid_reference_stats.py"
N_IMAGES, BATCH = 6, 4  # two batches, the second one partial

pytestmark = pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # few images: singular covariances


def random_inception_state_dict(seed=0):
    """Random FID-Inception weights that keep activations O(1) (BatchNorm in eval mode uses running stats)."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in fid_inception_v3().state_dict().items()}
    sd = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            sd[key] = torch.tensor(0)
        elif len(shape) == 4:
            sd[key] = torch.randn(shape, generator=g) * math.sqrt(2 / math.prod(shape[1:]))
        elif key.endswith("running_var"):
            sd[key] = 0.5 + torch.rand(shape, generator=g)
        elif key.endswith("bn.weight"):
            sd[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            sd[key] = 0.1 * torch.randn(shape, generator=g)
    return sd


@pytest.fixture(scope="module")
def weights_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(random_inception_state_dict(), path)
    return path


@pytest.fixture(scope="module")
def model(weights_path):
    return load_inception(weights_path, device="cpu")


@pytest.fixture(scope="module")
def image_data(tmp_path_factory):
    """(uint8 NHWC array, folder holding the same images as PNGs plus a non-image file)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(N_IMAGES, 32, 32, 3), dtype=np.uint8)
    folder = tmp_path_factory.mktemp("images")
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    (folder / "notes.txt").write_text("not an image")
    return images, folder


def pool_features(model, batches):
    """(N, 2048) float64 final-pool features of image batches (B, 3, H, W) in [0, 1]."""
    return np.concatenate([model(batch).numpy() for batch in batches]).astype(np.float64)


@pytest.fixture(scope="module")
def folder_acts(model, image_data):
    return pool_features(model, folder_loader(str(image_data[1]), batch_size=BATCH, num_workers=0))


def _mu_sigma(path):
    reference = load_reference(path)
    return reference.mu, reference.sigma


def random_stats(rng, dim=32, n=100):
    act = rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim)) + rng.normal(size=dim)
    return act.mean(axis=0), np.cov(act, rowvar=False)


def test_frechet_distance_matches_pytorch_fid():
    rng = np.random.default_rng(1)
    for dim, n, rel in [(32, 100, 1e-10), (256, 1000, 1e-10), (64, 20, 1e-6)]:
        # Full rank: measured <= 1.5e-12 apart. Rank-deficient: scipy's sqrtm is only ~sqrt(machine eps)
        # accurate there (measured 3e-8 apart; ours is within 3e-16 of a 40-digit reference).
        mu1, s1 = random_stats(rng, dim, n)
        mu2, s2 = random_stats(rng, dim, n)
        ours = frechet_distance(mu1, s1, mu2, s2)
        assert ours == pytest.approx(calculate_frechet_distance(mu1, s1, mu2, s2), rel=rel)
        assert ours > 0
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(mu1, s1, mu2[:-1], s2[:-1, :-1])


def test_frechet_distance_exact_on_singular_commuting_covariances():
    """Sigma_i = Q diag(d_i) Q^T with zeros in d_i: Tr sqrtm(sigma1 sigma2) = sum sqrt(d1 d2).

    Rounding of sigma_i gives the zero eigenvalues of sigma1 sigma2 values ~1e-16, whose square roots shift the
    trace by ~1e-8 whatever the method (measured: ours 1e-9 relative, pytorch-fid 5e-9).
    """
    rng = np.random.default_rng(4)
    q, _ = np.linalg.qr(rng.normal(size=(48, 48)))
    d1, d2 = rng.uniform(0.1, 3, 48), rng.uniform(0.1, 3, 48)
    d1[:20], d2[10:25] = 0, 0
    s1, s2 = (q * d1) @ q.T, (q * d2) @ q.T
    mu1, mu2 = rng.normal(size=48), rng.normal(size=48)
    exact = np.sum((mu1 - mu2) ** 2) + d1.sum() + d2.sum() - 2 * np.sqrt(d1 * d2).sum()
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(exact, rel=1e-8)
    assert frechet_distance(mu1, np.zeros((48, 48)), mu2, s2) == pytest.approx(
        np.sum((mu1 - mu2) ** 2) + d2.sum(), rel=1e-12)
    with pytest.raises(ValueError, match="not covariance"):
        frechet_distance(mu1, s1, mu2, -s2)
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(mu1 * np.nan, s1, mu2, s2)


def test_fid_of_a_set_with_itself_is_zero(folder_acts):
    mu, sigma = random_stats(np.random.default_rng(2))
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)
    mu, sigma = activation_statistics(folder_acts)  # real 2048-d statistics of rank N-1 = 5
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)


def test_activation_statistics(folder_acts):
    mu, sigma = activation_statistics(folder_acts.astype(np.float32))
    assert mu.dtype == sigma.dtype == np.float64 and mu.shape == (2048,) and sigma.shape == (2048, 2048)
    np.testing.assert_allclose(sigma, np.cov(folder_acts, rowvar=False), rtol=1e-6, atol=1e-12)
    with pytest.raises(ValueError, match="N>=2"):
        activation_statistics(folder_acts[:1])


def test_activations_match_pytorch_fid(weights_path, model, image_data, folder_acts):
    images, folder = image_data
    state_dict = torch.load(weights_path, weights_only=True)
    with mock.patch.object(pytorch_fid.inception, "load_state_dict_from_url", return_value=state_dict):
        reference = pytorch_fid.inception.InceptionV3([3]).eval()
    files = [str(folder / f"{i:03d}.png") for i in range(N_IMAGES)]
    expected = get_activations(files, reference, batch_size=BATCH, dims=2048, device="cpu", num_workers=0)
    assert folder_acts.shape == (N_IMAGES, 2048) and folder_acts.std() > 1e-2
    np.testing.assert_allclose(folder_acts, expected, rtol=1e-4, atol=1e-5)

    tensors = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    in_memory = pool_features(model, tensors.split(BATCH))
    np.testing.assert_allclose(in_memory, folder_acts, rtol=1e-5, atol=1e-6)
    captured = {}                                   # TF mixed_6/conv = Mixed_6d's 1x1 branch (see FIDInception)
    mixed_6d = reference.blocks[2][6]
    assert mixed_6d.branch1x1.conv.in_channels == 768 and mixed_6d.branch7x7_1.conv.out_channels == 160
    hook = mixed_6d.branch1x1.register_forward_hook(lambda module, args, out: captured.update(out=out))
    with torch.no_grad():
        direct = reference(tensors[:BATCH])[0].flatten(1).numpy()
    hook.remove()
    np.testing.assert_allclose(in_memory[:BATCH], direct, rtol=1e-4, atol=1e-5)

    features = model.activations(tensors[:BATCH])
    assert torch.equal(features["pool"], model(tensors[:BATCH]))
    assert captured["out"].shape == (BATCH, 192, 17, 17)
    expected_spatial = captured["out"][:, :7].permute(0, 2, 3, 1).reshape(BATCH, 2023)   # NHWC, as TF flattens
    torch.testing.assert_close(features["spatial"], expected_spatial, rtol=1e-4, atol=1e-5)
    assert features["spatial"].min() >= 0 and features["spatial"].std() > 1e-2          # post-ReLU
    logits = torch.from_numpy(direct) @ state_dict["fc.weight"].T                      # no fc.bias, as ADM
    torch.testing.assert_close(features["logits"], logits, rtol=1e-4, atol=1e-4)


def test_features_ignore_the_callers_autocast(model, image_data):
    x = torch.from_numpy(image_data[0][:1]).permute(0, 3, 1, 2).float() / 255
    plain = model.activations(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model.activations(x)
    assert all(mixed[k].dtype == torch.float32 and torch.equal(mixed[k], v) for k, v in plain.items())


def test_streaming_moments_equal_numpy_cov():
    rng = np.random.default_rng(6)
    rows = rng.normal(size=(257, 40)) * rng.uniform(0.1, 3, 40) + 1e4          # a large mean: no cancellation
    moments = StreamingMoments()
    for batch in np.split(rows, [1, 50, 51, 200]):                            # uneven batches, one of 1 row
        moments.update(batch)
    mu, sigma = moments.statistics()
    np.testing.assert_allclose(mu, rows.mean(0), rtol=1e-14)
    np.testing.assert_allclose(sigma, np.cov(rows, rowvar=False), rtol=1e-9, atol=1e-12)
    assert np.array_equal(sigma, sigma.T)
    one = StreamingMoments()
    one.update(rows[:1])
    with pytest.raises(ValueError, match="at least 2"):
        one.statistics()
    with pytest.raises(ValueError, match="non-empty"):
        one.update(rows[:0])


def test_image_files(image_data, tmp_path):
    files = image_files(str(image_data[1]))
    assert [os.path.basename(f) for f in files] == [f"{i:03d}.png" for i in range(N_IMAGES)]
    with pytest.raises(ValueError, match="no .png"):
        image_files(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="missing"):
        image_files(str(tmp_path / "missing"))


def test_missing_weights_name_path_and_url_and_nothing_is_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    default = tmp_path / "hub" / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth"
    assert default_weights_path() == str(default)
    with pytest.raises(FileNotFoundError) as err:
        load_inception()
    assert str(default) in str(err.value) and FID_WEIGHTS_URL in str(err.value)
    assert not default.exists()


def test_wrong_weights_file(tmp_path):
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"(?s)bad.pth.*Missing key"):
        load_inception(tmp_path / "bad.pth", device="cpu")


def test_stats_script_on_folder_and_npz(tmp_path, weights_path, model, image_data, folder_acts, caplog):
    images, folder = image_data
    mu, sigma = activation_statistics(folder_acts)
    tensors = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    spatial = np.concatenate([model.activations(b)["spatial"].numpy() for b in tensors.split(BATCH)])
    mu_s, sigma_s = activation_statistics(spatial)
    main = runpy.run_path(str(SCRIPT))["main"]
    common = ["--weights", str(weights_path), "--batch-size", str(BATCH), "--device", "cpu"]

    caplog.set_level(logging.INFO)
    main([str(folder), str(tmp_path / "folder.npz"), "--num-workers", "0", *common])
    assert str(tmp_path / "folder.npz") in caplog.text
    np.savez(tmp_path / "batch.npz", arr_0=images, arr_1=np.arange(N_IMAGES))  # ADM reference-batch layout
    main([str(tmp_path / "batch.npz"), str(tmp_path / "uint8.npz"), "--pr-subset", "4", "--seed", "3", *common])
    for name in ("folder.npz", "uint8.npz"):
        mu2, sigma2 = _mu_sigma(str(tmp_path / name))                   # a valid FID statistics file
        np.testing.assert_allclose(mu2, mu, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(sigma2, sigma, rtol=1e-4, atol=1e-7)
        ref = load_reference(str(tmp_path / name))
        np.testing.assert_allclose(ref.mu_s, mu_s, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ref.sigma_s, sigma_s, rtol=1e-4, atol=1e-6)
    subset = np.sort(np.random.default_rng(3).choice(N_IMAGES, 4, replace=False))
    for name, rows in (("folder.npz", np.arange(N_IMAGES)), ("uint8.npz", subset)):
        with np.load(tmp_path / name) as f:
            assert f["n_images"] == N_IMAGES and f["pr_indices"].tolist() == rows.tolist()
            assert f["pr_features"].dtype == np.float32
            np.testing.assert_allclose(f["pr_features"], folder_acts[rows], rtol=1e-5, atol=1e-6)

    np.savez(tmp_path / "float.npz", images=images.transpose(0, 3, 1, 2).astype(np.float32) / 255)
    with pytest.raises(KeyError, match="arr_0.*images"):
        main([str(tmp_path / "float.npz"), str(tmp_path / "x.npz"), *common])
    np.savez(tmp_path / "signed.npz", arr_0=images.astype(np.float32) / 127.5 - 1)
    with pytest.raises(ValueError, match=r"\[0,1\]"):
        main([str(tmp_path / "signed.npz"), str(tmp_path / "x.npz"), *common])
    with pytest.raises(ValueError, match="pr-subset"):
        main([str(tmp_path / "batch.npz"), str(tmp_path / "x.npz"), "--pr-subset", "0", *common])

    out = tmp_path / "float_stats.npz"
    run = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "float.npz"), str(out), "--key", "images",
                          *common], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert str(out) in run.stderr
    mu2, sigma2 = _mu_sigma(str(out))
    np.testing.assert_allclose(mu2, mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sigma2, sigma, rtol=1e-4, atol=1e-7)
