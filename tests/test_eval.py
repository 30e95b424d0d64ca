"""selfflow-eval: ADM-suite metrics on the standard FID InceptionV3 from a local file.

The real 2015-12-05 weights cannot be used here: a randomly initialised network of the same
architecture, saved in pytorch-fid's layout, stands in. What a real run depends on is checked
against torch-fidelity's own forward and maths, and against the metrics' definitions.
"""

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfflow.data.folders.adm_crop import adm_center_crop
from selfflow.evaluation.eval_sets import load_eval_set
from selfflow.evaluation.image_batches import folder_images, npz_images
from selfflow.evaluation.inception import SPATIAL_DIM, WEIGHTS_FILE, load_inception, read_weights
from selfflow.evaluation.standard_metrics import (
    EvalSet,
    GaussianStats,
    frechet_distance,
    inception_score,
    precision_recall,
    standard_metrics,
)
from selfflow.io.images import MAX_PIXELS
from tests.helpers.eval_files import random_inception_state, smooth_images
from tests.helpers.hostile import CreatesAFile

pytest.importorskip("torch_fidelity")


@pytest.fixture(scope="module")
def extractor(inception_file):
    return load_inception(inception_file)


def corrupt(images: np.ndarray, strength: float, seed: int = 1) -> np.ndarray:
    """Blend toward uniform noise: strength 0 keeps the images, 1 replaces them."""
    noise = np.random.default_rng(seed).integers(0, 256, images.shape)
    return np.round((1 - strength) * images + strength * noise).astype(np.uint8)


def library_network(inception_file):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    return FeatureExtractorInceptionV3(
        "inception-v3-compat",
        ["2048", "logits_unbiased"],
        feature_extractor_weights_path=str(inception_file),
    )


# ----------------------------------------------------------------------------- features, statistics


def test_features_and_statistics_equal_torch_fidelity_for_the_same_file_and_images(
    inception_file, extractor, tmp_path
):
    from torch_fidelity.metric_fid import fid_features_to_statistics

    images = smooth_images(
        3, size=(40, 48)
    )  # neither square nor 299: the library's TF1 resize is exercised
    network = library_network(inception_file)
    spatial_maps = []
    network.Mixed_6d.branch1x1.register_forward_hook(
        lambda module, inputs, output: spatial_maps.append(output)
    )
    with torch.no_grad():
        pool, logits = network(torch.from_numpy(images).permute(0, 3, 1, 2))
    # ADM: mixed_6/conv in NHWC, its first 7 channels, each image flattened
    spatial = spatial_maps[0].permute(0, 2, 3, 1)[..., :7].reshape(len(images), -1)
    assert spatial.shape[1] == SPATIAL_DIM == 2023

    ours = extractor(images)
    for got, expected in ((ours.pool, pool), (ours.spatial, spatial), (ours.logits, logits)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(
        ours.logits, network.fc(pool), rtol=1e-3, atol=1e-4
    )  # no bias: ADM's softmax input

    np.savez(tmp_path / "images.npz", arr_0=images)
    side = load_eval_set(
        tmp_path / "images.npz", extractor, batch_size=2
    )  # two batches streamed from the .npz
    torch.testing.assert_close(side.pool, pool, rtol=1e-5, atol=1e-6)
    library_stats = fid_features_to_statistics(side.pool)
    np.testing.assert_array_equal(side.pool_stats.mu, library_stats["mu"])
    np.testing.assert_array_equal(side.pool_stats.sigma, library_stats["sigma"])
    spatial_stats = GaussianStats.of(
        ours.spatial
    )  # ADM: np.mean and np.cov(rowvar=False) of the features
    np.testing.assert_array_equal(spatial_stats.mu, np.mean(ours.spatial.numpy(), axis=0))
    np.testing.assert_array_equal(spatial_stats.sigma, np.cov(ours.spatial.numpy(), rowvar=False))
    np.testing.assert_allclose(side.spatial_stats.mu, spatial_stats.mu, rtol=1e-5, atol=1e-6)
    assert side.count == 3 and side.image_size == (40, 48)


def test_the_network_runs_in_true_float32(extractor):
    """TF32 (on by default for cuDNN convolutions) would round the features of Ampere and later GPUs
    to 10 bits."""
    seen = []
    hook = extractor.network.Mixed_7c.register_forward_hook(
        lambda module, inputs, output: seen.append(torch.backends.cudnn.conv.fp32_precision)
    )
    before = torch.backends.cudnn.conv.fp32_precision
    try:
        extractor(smooth_images(1))
    finally:
        hook.remove()
    assert seen == ["ieee"] and torch.backends.cudnn.conv.fp32_precision == before


@pytest.mark.slow
def test_fid_of_a_set_with_itself_is_zero_and_grows_as_images_are_corrupted(extractor):
    images = smooth_images(16)
    clean = GaussianStats.of(extractor(images).pool)
    itself = abs(frechet_distance(clean, clean))  # zero up to the round-off of 2,048 square roots
    assert itself < 1e-5 * np.trace(clean.sigma)
    fids = [
        frechet_distance(clean, GaussianStats.of(extractor(corrupt(images, s)).pool))
        for s in (0.1, 0.4, 1.0)
    ]
    assert 100 * itself < fids[0] < fids[1] < fids[2], fids


# ------------------------------------------------------------------------------- metric definitions


def definition_precision_recall(
    samples: np.ndarray, ref: np.ndarray, k: int = 3
) -> tuple[float, float]:
    """Kynkaanniemi et al. as ADM computes it, by brute force: radius = distance to the k-th nearest
    other point."""

    def radii(points):
        return np.sort(np.linalg.norm(points[:, None] - points[None], axis=-1), axis=1)[:, k]

    def on_manifold(points, manifold):
        return (
            (np.linalg.norm(points[:, None] - manifold[None], axis=-1) <= radii(manifold)[None])
            .any(1)
            .mean()
        )

    return on_manifold(samples, ref), on_manifold(ref, samples)


def test_precision_and_recall_on_known_point_clouds():
    rng = np.random.default_rng(0)
    cluster_a, cluster_b = rng.normal(0, 1, (50, 8)), rng.normal(100, 1, (50, 8))
    ref = torch.tensor(np.concatenate([cluster_a, cluster_b]), dtype=torch.float32)
    assert precision_recall(ref, ref) == (1.0, 1.0)
    assert precision_recall(ref[:50] + 1000, ref) == (0.0, 0.0)  # disjoint
    # mode collapse: every sample is real (precision 1) but half of the reference is never produced
    # (recall 0.5)
    assert precision_recall(ref[:50], ref) == (1.0, 0.5)
    # overlapping clouds: the definition, brute force
    samples, partial = rng.normal(0, 1, (40, 5)), rng.normal(0.7, 1.3, (30, 5))
    expected = definition_precision_recall(samples, partial)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    got = precision_recall(
        torch.tensor(samples, dtype=torch.float32), torch.tensor(partial, dtype=torch.float32)
    )
    assert got == pytest.approx(expected, abs=1e-6)  # counts out of 40 and 30: any miss is >= 0.025


def test_inception_score_averages_adm_splits_of_5000_consecutive_samples():
    """12,000 samples: splits of 5,000, 5,000 and 2,000 whose confident predictions spread over 10,
    2 and 5 classes; ADM averages the three scores (about 10, 2 and 5)."""
    classes = np.concatenate([np.arange(5000) % 10, np.arange(5000) % 2, 10 + np.arange(2000) % 5])
    logits = torch.tensor(
        np.eye(1008)[classes] * 20 + np.random.default_rng(0).normal(0, 1, (12000, 1008))
    )
    p = torch.softmax(logits.double(), dim=1).numpy()
    scores = []
    for start in range(0, len(p), 5000):  # ADM's compute_inception_score
        part = p[start : start + 5000]
        scores.append(
            np.exp(np.mean(np.sum(part * (np.log(part) - np.log(part.mean(0, keepdims=True))), 1)))
        )
    assert scores == pytest.approx([10, 2, 5], rel=0.01)
    assert inception_score(logits) == pytest.approx(np.mean(scores), rel=1e-9)


def test_metrics_that_need_images_are_null_with_a_note_when_a_side_holds_statistics_only():
    rng = np.random.default_rng(0)
    features = [torch.tensor(rng.normal(0, 1, (20, 8)), dtype=torch.float32) for _ in range(2)]
    samples = EvalSet(
        name="samples.npz",
        pool_stats=GaussianStats.of(features[0]),
        spatial_stats=GaussianStats.of(features[0]),
        pool=features[0],
        logits=torch.zeros(20, 1008),
        count=20,
    )
    ref = EvalSet(name="ref.npz", pool_stats=GaussianStats.of(features[1]), spatial_stats=None)
    metrics = standard_metrics(samples, ref)
    assert metrics["fid"] == pytest.approx(frechet_distance(samples.pool_stats, ref.pool_stats))
    assert metrics["fid"] > 0 and metrics["inception_score"] == pytest.approx(1.0)
    assert metrics["sfid"] is None and metrics["precision"] is None and metrics["recall"] is None
    assert any(n.startswith("sfid: ref.npz") for n in metrics["notes"])
    assert any(n.startswith("precision, recall: ref.npz") for n in metrics["notes"])


# -------------------------------------------------------------------------------------- input files


def adm_statistics(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "mu": rng.normal(size=2048),
        "sigma": np.eye(2048) * 2.0,
        "mu_s": rng.normal(size=2023),
        "sigma_s": np.eye(2023) * 3.0,
    }


def test_an_adm_layout_reference_file_is_read_and_its_statistics_take_precedence(
    extractor, tmp_path
):
    stats = adm_statistics()
    np.savez(tmp_path / "stats_only.npz", **stats)
    ref = load_eval_set(tmp_path / "stats_only.npz", extractor)
    np.testing.assert_array_equal(ref.pool_stats.mu, stats["mu"])
    np.testing.assert_array_equal(ref.pool_stats.sigma, stats["sigma"])
    np.testing.assert_array_equal(ref.spatial_stats.mu, stats["mu_s"])
    np.testing.assert_array_equal(ref.spatial_stats.sigma, stats["sigma_s"])
    assert ref.pool is None and ref.logits is None and ref.count is None
    # an ADM reference batch: images for precision/recall, stored statistics for FID/sFID (as
    # ADM's evaluator)
    images = smooth_images(3)
    np.savez(tmp_path / "batch.npz", arr_0=images, **stats)
    batch = load_eval_set(tmp_path / "batch.npz", extractor)
    np.testing.assert_array_equal(batch.pool_stats.mu, stats["mu"])
    np.testing.assert_array_equal(batch.spatial_stats.sigma, stats["sigma_s"])
    assert batch.pool.shape == (3, 2048) and batch.count == 3
    # pytorch-fid's statistics files hold mu and sigma only: FID works, sFID has nothing to compare
    np.savez(tmp_path / "pytorch_fid.npz", mu=stats["mu"], sigma=stats["sigma"])
    assert load_eval_set(tmp_path / "pytorch_fid.npz", extractor).spatial_stats is None


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"mu": np.zeros(1000), "sigma": np.eye(1000)}, "the ADM layout needs float [2048]"),
        ({"arr_0": np.zeros((2, 8, 8, 3), np.float32)}, "images must be uint8 [N, H, W, 3]"),
        ({"arr_0": np.zeros((2, 8, 8), np.uint8)}, "images must be uint8 [N, H, W, 3]"),
        ({"labels": np.arange(3)}, "holds neither images"),
    ],
)
def test_unusable_npz_files_are_named_in_one_line(extractor, tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises((ValueError, KeyError), match=message.replace("[", r"\[")) as error:
        load_eval_set(tmp_path / "bad.npz", extractor)
    assert "\n" not in str(error.value)


def npz_with_header_only(path: Path, shape: tuple[int, ...], data: bytes = b"") -> None:
    """An .npz whose arr_0 header claims `shape` (uint8) but holds only `data`."""
    member = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        member, {"descr": "|u1", "fortran_order": False, "shape": shape}
    )
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("arr_0.npy", member.getvalue() + data)


def test_images_stream_in_batches_and_hostile_headers_are_refused_before_allocation(tmp_path):
    images = smooth_images(7, size=(8, 6))
    np.savez(tmp_path / "samples.npz", arr_0=images)
    source = npz_images(tmp_path / "samples.npz")
    assert (source.count, source.size) == (7, (8, 6))
    blocks = list(source.batches(3))
    assert [len(b) for b in blocks] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(blocks), images)

    npz_with_header_only(
        tmp_path / "bomb.npz", (2, 100_000, 100_000, 3)
    )  # 60 GB promised, nothing there
    with pytest.raises(ValueError, match=f"at most {MAX_PIXELS} pixels"):
        npz_images(tmp_path / "bomb.npz")
    npz_with_header_only(tmp_path / "many.npz", (10**9, 8, 8, 3))
    with pytest.raises(ValueError, match="between 1 and 1000000 images"):
        npz_images(tmp_path / "many.npz")
    npz_with_header_only(tmp_path / "truncated.npz", (4, 8, 8, 3), bytes(8 * 8 * 3 * 2))
    with pytest.raises(ValueError, match="truncated"):
        list(npz_images(tmp_path / "truncated.npz").batches(3))


def test_a_folder_is_read_recursively_sorted_with_adm_centre_crop_to_the_evaluation_size(tmp_path):
    images = smooth_images(3, size=(32, 32))
    (tmp_path / "ref" / "b").mkdir(parents=True)
    Image.fromarray(images[0]).save(tmp_path / "ref" / "b" / "0.png")  # at the size: as it is
    wide = smooth_images(1, size=(32, 48), seed=5)[0]
    Image.fromarray(wide).save(tmp_path / "ref" / "a_wide.png")  # sorted first
    # twice the size by pixel repetition: ADM's box halving gives the image back exactly
    Image.fromarray(images[1].repeat(2, 0).repeat(2, 1)).save(
        tmp_path / "ref" / "b" / "1_large.png"
    )
    (tmp_path / "ref" / "notes.txt").write_text("not an image")
    source = folder_images(tmp_path / "ref", (32, 32))
    assert source.count == 3
    read = np.concatenate(list(source.batches(2)))
    np.testing.assert_array_equal(read[0], wide[:, 8:40])  # centre crop of the short side's square
    np.testing.assert_array_equal(read[1], images[0])
    np.testing.assert_array_equal(read[2], images[1])
    assert np.asarray(adm_center_crop(Image.fromarray(wide), 16)).shape == (16, 16, 3)
    with pytest.raises(ValueError, match=r"a_wide.png .*square"):
        list(folder_images(tmp_path / "ref", (32, 40)).batches(4))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no image files"):
        folder_images(tmp_path / "empty", None)


# ------------------------------------------------------------------------------------- weights file


def test_missing_wrong_or_unsafe_weights_files_are_refused_in_one_line_naming_the_expected_file(
    tmp_path,
):
    state = random_inception_state()
    cases = {
        "missing.pth": None,
        "resnet.pth": {"conv1.weight": torch.zeros(64, 3, 7, 7)},
        "wrong_shape.pth": {**state, "fc.weight": torch.zeros(1000, 2048)},
        "not_weights.pth": [1, 2, 3],
        "unsafe.pth": CreatesAFile(tmp_path / "pwned"),
    }
    for name, content in cases.items():
        if content is not None:
            torch.save(content, tmp_path / name)
        with pytest.raises((ValueError, FileNotFoundError)) as error:
            load_inception(tmp_path / name)
        message = str(error.value)
        assert (
            WEIGHTS_FILE in message
            and f"inception={tmp_path / name}" in message
            and "\n" not in message
        ), name
    assert not (tmp_path / "pwned").exists()


def test_the_weights_are_unpickled_with_weights_only(tmp_path, monkeypatch):
    seen = {}
    real_load = torch.load

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real_load(*args, **kwargs)

    torch.save({"x": torch.zeros(1)}, tmp_path / "w.pth")
    monkeypatch.setattr(torch, "load", spy)
    read_weights(tmp_path / "w.pth")
    assert seen["weights_only"] is True


# ---------------------------------------------------------------------------------------------- CLI


def compose_eval(*overrides: str):
    from hydra import compose, initialize_config_module

    with initialize_config_module("selfflow.conf", version_base="1.3"):
        return compose("eval", overrides=["progress=false", *overrides])


def test_inputs_are_checked_before_any_work(tmp_path):
    from selfflow.cli.eval import evaluate

    np.savez(tmp_path / "samples.npz", arr_0=smooth_images(2))
    out = f"out={tmp_path / 'metrics.json'}"
    with pytest.raises(ValueError, match=r"ref=\.\.\. is required"):
        evaluate(compose_eval(f"samples={tmp_path / 'samples.npz'}", "inception=x.pth", out))
    with pytest.raises(FileNotFoundError, match="samples=.*nothing.npz: no such file or folder"):
        evaluate(
            compose_eval(
                f"samples={tmp_path / 'nothing.npz'}", f"ref={tmp_path}", "inception=x.pth", out
            )
        )
    with pytest.raises(FileNotFoundError, match=f"inception=x.pth: no such file; .*{WEIGHTS_FILE}"):
        evaluate(
            compose_eval(
                f"samples={tmp_path / 'samples.npz'}", f"ref={tmp_path}", "inception=x.pth", out
            )
        )
    assert not (tmp_path / "metrics.json").exists()


def run_eval(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "selfflow.cli.eval", *args, "progress=false"],
        check=False,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ},
    )


def test_samples_and_reference_images_of_different_sizes_are_warned_about():
    from selfflow.evaluation.fid_job import size_mismatch

    stats = GaussianStats(np.zeros(2), np.eye(2))
    at = {
        size: EvalSet(name="x", pool_stats=stats, spatial_stats=stats, image_size=size)
        for size in ((32, 32), (256, 256), None)
    }
    assert size_mismatch(at[(32, 32)], at[(256, 256)]) == (
        "samples are 32x32 pixels, the reference images 256x256; "
        "both are resized to 299x299, but published numbers "
        "compare images of one resolution"
    )
    assert (
        size_mismatch(at[(32, 32)], at[(32, 32)]) is None
        and size_mismatch(at[(32, 32)], at[None]) is None
    )


@pytest.mark.slow
def test_cli_end_to_end_with_a_folder_reference_whose_statistics_are_reused(
    inception_file, tmp_path
):
    samples = smooth_images(8, seed=1)
    np.savez(tmp_path / "samples.npz", arr_0=samples, labels=np.arange(8))
    (tmp_path / "train").mkdir()
    for i, image in enumerate(np.concatenate([samples[:4], smooth_images(4, seed=2)])):
        Image.fromarray(image).save(tmp_path / "train" / f"{i:02d}.png")
    first = run_eval(
        "samples=samples.npz",
        "ref=train",
        f"inception={inception_file}",
        "out=eval/metrics.json",
        cwd=tmp_path,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert list(metrics)[:9] == [
        "fid",
        "sfid",
        "inception_score",
        "precision",
        "recall",
        "num_samples",
        "num_ref",
        "inception",
        "library",
    ]
    assert metrics["library"].startswith("torch-fidelity ") and metrics["inception"] == str(
        inception_file
    )
    assert (metrics["num_samples"], metrics["num_ref"]) == (8, 8)
    assert all(
        np.isfinite(metrics[k]) for k in ("fid", "sfid", "inception_score", "precision", "recall")
    )
    assert metrics["fid"] > 0 and metrics["standard_inception_weights"] is False
    assert "not comparable with published ones" in first.stderr  # random weights: warned
    assert f"FID {metrics['fid']:.4g}" in first.stdout
    stats = tmp_path / "eval" / "train_inception_stats.npz"
    assert (
        metrics["ref_stats"] == str(Path("eval") / "train_inception_stats.npz") and stats.is_file()
    )
    assert not list(tmp_path.glob("*.log")) and not (tmp_path / ".hydra").exists()

    again = run_eval(
        "samples=samples.npz",
        f"ref={stats}",
        f"inception={inception_file}",
        "out=again.json",
        cwd=tmp_path,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    reused = json.loads((tmp_path / "again.json").read_text())
    for key in ("fid", "sfid", "precision", "recall"):
        assert reused[key] == pytest.approx(metrics[key], rel=1e-6, abs=1e-9), key
    assert reused["num_ref"] == 8 and reused["ref_stats"] is None


@pytest.mark.slow
def test_cli_errors_are_one_line(tmp_path):
    np.savez(tmp_path / "samples.npz", arr_0=smooth_images(2))
    result = run_eval(
        "samples=samples.npz", "ref=samples.npz", "inception=nowhere.pth", cwd=tmp_path
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[0].startswith(
        "selfflow-eval: error: inception=nowhere.pth: no such file; "
    )
    assert WEIGHTS_FILE in result.stderr.splitlines()[0]
    result = run_eval("sample=samples.npz", cwd=tmp_path)
    assert result.returncode == 2 and "did you mean samples?" in result.stderr
    assert not (tmp_path / "metrics.json").exists()
