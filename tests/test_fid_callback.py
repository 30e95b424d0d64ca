"""In-training FID (`callbacks.fid`): `val/fid` of EMA samples at the configured steps, equal
to selfflow-sample's metrics=fid on the checkpoint of that step; off by default."""

import csv

import numpy as np
import pytest
import torch

from tests.helpers.eval_files import smooth_images
from tests.helpers.runs import run_sample, train_cli

pytest.importorskip("torch_fidelity")


def counted(monkeypatch, module, name: str) -> list[int]:
    """Count the calls of `module.name` (the callback imports it from there when it runs)."""
    calls, original = [], getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


@pytest.mark.slow
def test_val_fid_is_logged_at_the_configured_steps_and_equals_metrics_fid_of_the_checkpoint(
    tiny_train_cfg, tmp_path, inception_file, monkeypatch
):
    import lightning as L

    from selfflow.evaluation import eval_sets, inception
    from selfflow.training.build import build_run
    from selfflow.training.fid_callback import FIDCallback

    np.savez(tmp_path / "ref.npz", arr_0=smooth_images(6, size=(16, 16)))
    fid = [
        "callbacks.fid.every_n_steps=2",
        f"callbacks.fid.ref={tmp_path / 'ref.npz'}",
        f"callbacks.fid.inception={inception_file}",
        "callbacks.fid.num_samples=4",
        "callbacks.fid.batch_size=3",
        "callbacks.fid.steps=2",
    ]

    def train(run_dir, *overrides):
        L.seed_everything(0)
        run = build_run(
            tiny_train_cfg(
                "trainer.max_steps=4",
                "~callbacks.samples",
                "~callbacks.probe",
                *overrides,
                run_dir=run_dir,
            )
        )
        run.trainer.fit(run.module, datamodule=run.datamodule)
        return run

    loads, ref_stats = (
        counted(monkeypatch, inception, "load_inception"),
        counted(monkeypatch, eval_sets, "reference_pool_stats"),
    )
    run = train(tmp_path / "a", *fid)
    assert len(loads) == 1 and len(ref_stats) == 1  # once per run, reused at every evaluation
    callback = next(c for c in run.trainer.callbacks if isinstance(c, FIDCallback))
    with open(tmp_path / "a" / "metrics.csv") as f:
        logged = {
            int(r["step"]): float(r["val/fid"]) for r in csv.DictReader(f) if r.get("val/fid")
        }
    assert sorted(logged) == [2, 4] and [s for s, _ in callback.history] == [2, 4]
    assert logged[4] == pytest.approx(callback.history[-1][1]) and logged[4] > 0

    # the same samples and reference through selfflow-sample metrics=fid, from the checkpoint of
    # step 4
    summary = run_sample(
        tmp_path / "a" / "checkpoints" / "last.ckpt",
        tmp_path / "sampled",
        "num_samples=4",
        "steps=2",
        "sampler=euler",
        "metrics=fid",
        f"fid_ref={tmp_path / 'ref.npz'}",
        f"inception={inception_file}",
        "per_sample_files=false",
    )
    assert summary["metrics"]["fid"] == pytest.approx(logged[4], rel=1e-5)

    loads.clear()
    plain = train(
        tmp_path / "b"
    )  # off by default: no Inception loaded, nothing logged, the same training
    assert loads == []
    with open(tmp_path / "b" / "metrics.csv") as f:
        assert "val/fid" not in next(csv.reader(f))
    for a, b in zip(run.module.objective.parameters(), plain.module.objective.parameters()):
        assert torch.equal(a, b)  # the callback draws from its own RNG scope


def test_enabling_it_without_its_files_is_one_line_naming_the_key(tmp_path):
    from selfflow.training.fid_callback import FIDCallback

    with pytest.raises(
        ValueError, match=r"callbacks.fid.ref=None: no such file or folder; val/fid needs"
    ):
        FIDCallback(every_n_steps=100)
    with pytest.raises(ValueError, match=r"callbacks.fid.inception=.*nope.pth: no such file"):
        FIDCallback(every_n_steps=100, ref=str(tmp_path), inception=str(tmp_path / "nope.pth"))
    with pytest.raises(ValueError, match="num_samples=1 >= 2"):
        FIDCallback(num_samples=1)
    assert FIDCallback().every_n_steps == 0  # the default: off, no files needed


def test_a_reference_with_adm_statistics_gives_them_without_running_its_images(
    tmp_path, inception_file
):
    from selfflow.evaluation.eval_sets import reference_pool_stats
    from selfflow.evaluation.inception import load_inception

    rng = np.random.default_rng(0)
    mu, a = rng.normal(size=2048), rng.normal(size=(2048, 8))
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=a @ a.T, arr_0=smooth_images(2))

    def no_forward(images):
        raise AssertionError("the reference's images were run through the network")

    stats = reference_pool_stats(tmp_path / "stats.npz", no_forward)
    np.testing.assert_array_equal(stats.mu, mu)
    np.testing.assert_array_equal(stats.sigma, a @ a.T)
    np.savez(tmp_path / "images.npz", arr_0=smooth_images(3))  # images only: their statistics
    assert reference_pool_stats(
        tmp_path / "images.npz", load_inception(inception_file)
    ).mu.shape == (2048,)


@pytest.mark.slow
def test_on_two_ddp_processes_each_samples_its_block_and_val_fid_is_that_of_all_samples(
    tmp_path, inception_file
):

    np.savez(tmp_path / "ref.npz", arr_0=smooth_images(6, size=(16, 16)))
    run_dir = train_cli(
        tmp_path,
        "ddp",
        "trainer=ddp",
        "trainer.devices=2",
        "callbacks.fid.every_n_steps=4",
        f"callbacks.fid.ref={tmp_path / 'ref.npz'}",
        f"callbacks.fid.inception={inception_file}",
        "callbacks.fid.num_samples=5",
        "callbacks.fid.batch_size=2",
        "callbacks.fid.steps=2",
    )
    with open(run_dir / "metrics.csv") as f:
        logged = {
            int(r["step"]): float(r["val/fid"]) for r in csv.DictReader(f) if r.get("val/fid")
        }
    assert sorted(logged) == [4]  # once, by rank 0
    # blocks of 2 and 3 samples, gathered in index order: the FID of the 5 samples of the
    # step-4 checkpoint
    summary = run_sample(
        run_dir / "checkpoints" / "last.ckpt",
        tmp_path / "sampled",
        "num_samples=5",
        "steps=2",
        "sampler=euler",
        "metrics=fid",
        f"fid_ref={tmp_path / 'ref.npz'}",
        f"inception={inception_file}",
        "per_sample_files=false",
    )
    assert summary["metrics"]["fid"] == pytest.approx(logged[4], rel=1e-5)
