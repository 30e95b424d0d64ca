"""selfflow-sample: outputs, NFE, guidance, seeds across batch sizes, labels, errors, the
released-checkpoint path."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from selfflow.models.transformer import SelfFlowTransformer
from selfflow.sampling.generate import (
    GuidedVelocity,
    NoiseSource,
    generate,
    sample_generators,
    sample_tokens,
)
from selfflow.sampling.job import drawn_labels, resolve_labels
from selfflow.tokens import Condition
from tests.helpers.models import TOKENIZER, random_model
from tests.helpers.runs import run_sample


@pytest.mark.parametrize("sampler, steps", [("euler", 4), ("heun", 5), ("sde", 4)])
def test_image_outputs_npz_and_nfe(tiny_checkpoint, tmp_path, sampler, steps, capsys):
    summary = run_sample(
        tiny_checkpoint,
        tmp_path,
        "num_samples=7",
        "batch_size=3",
        f"sampler={sampler}",
        f"steps={steps}",
    )
    assert summary["nfe"] == steps and summary["sampler"] == sampler
    assert f"NFE={steps}" in capsys.readouterr().out
    pngs = sorted((tmp_path / "images").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(7)]
    assert Image.open(pngs[0]).size == (16, 16)
    assert Image.open(tmp_path / "grid.png").width > 16
    with np.load(tmp_path / "samples.npz") as npz:
        assert npz["arr_0"].dtype == np.uint8 and npz["arr_0"].shape == (7, 16, 16, 3)
        labels = npz["labels"].tolist()
        assert labels == drawn_labels(7, 10, 0).tolist()
        np.testing.assert_array_equal(
            npz["arr_0"][2], np.asarray(Image.open(pngs[2]).convert("RGB"))
        )
    recorded = json.loads((tmp_path / "sampling.json").read_text())
    assert recorded["nfe"] == steps and recorded["labels"] == labels


def test_same_seed_same_samples_for_any_batch_size(tiny_checkpoint, tmp_path):
    arrays = {}
    for name, overrides in {
        "b1": ["batch_size=1"],
        "b4": ["batch_size=4"],
        "b4_sde": ["batch_size=4", "sampler=sde"],
        "b2_sde": ["batch_size=2", "sampler=sde"],
        "seed1": ["batch_size=4", "seed=1"],
    }.items():
        run_sample(tiny_checkpoint, tmp_path / name, "num_samples=5", "steps=4", *overrides)
        with np.load(tmp_path / name / "samples.npz") as npz:
            arrays[name] = npz["arr_0"]
    np.testing.assert_array_equal(arrays["b1"], arrays["b4"])
    np.testing.assert_array_equal(arrays["b4_sde"], arrays["b2_sde"])
    assert not np.array_equal(arrays["b4"], arrays["seed1"])
    assert not np.array_equal(arrays["b4"], arrays["b4_sde"])


def test_per_sample_noise_depends_only_on_seed_and_index():
    whole = NoiseSource(generators=sample_generators(3, range(6)))((6, 4, 2), "cpu")
    tail = NoiseSource(generators=sample_generators(3, range(4, 6)))((2, 4, 2), "cpu")
    torch.testing.assert_close(whole[4:], tail)
    assert not torch.equal(whole[0], whole[1])


def counting(model):
    calls = []
    original = model.velocity

    def velocity(x, t, pos, labels, modality):
        calls.append(len(x))
        return original(x, t, pos, labels, modality)

    model.velocity = velocity
    return calls


def test_guidance_scale_one_equals_no_guidance_and_costs_one_call_per_step():
    model = random_model()
    labels = Condition(torch.tensor([1, 2, 3]))
    plain = generate(model, TOKENIZER, labels, steps=6, generator=torch.Generator().manual_seed(0))
    calls = counting(model)
    guided = generate(
        model, TOKENIZER, labels, steps=6, cfg_scale=1.0, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(plain, guided)
    assert calls == [3] * 6


def test_fp32_sampling_keeps_a_callers_autocast_and_bf16_adds_its_own():
    """Under FSDP mixed precision the parameters are bf16 and the caller's autocast must reach
    the model."""
    model = random_model()
    seen = []
    original = model.velocity

    def spy(*args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return original(*args, **kwargs)

    model.velocity = spy
    pos, labels, x, t = (
        TOKENIZER.positions(2),
        Condition(torch.tensor([1, 2])),
        torch.randn(2, 16, 16),
        torch.full((2,), 0.5),
    )
    with torch.no_grad():
        GuidedVelocity(model, pos, labels, "image")(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = GuidedVelocity(model, pos, labels, "image")(x, t)
        GuidedVelocity(model, pos, labels, "image", autocast=torch.bfloat16)(x, t)
    assert seen == [False, True, True] and out.dtype == torch.float32


def test_guidance_applies_inside_the_interval_only():
    model = random_model()
    labels = Condition(torch.tensor([1, 2]))
    pos = TOKENIZER.positions(2)
    velocity = GuidedVelocity(
        model, pos, labels, "image", cfg_scale=3.0, guidance_interval=(0.3, 0.7)
    )
    x = torch.randn(2, 16, 16)
    calls = counting(model)
    with torch.no_grad():
        outside = velocity(x, torch.full((2,), 0.9))
        inside = velocity(x, torch.full((2,), 0.5))
    assert calls == [2, 4]  # once on the conditional batch outside; once on [cond; null] inside
    with torch.no_grad():
        c = SelfFlowTransformer.velocity(model, x, torch.full((2,), 0.5), pos, labels, "image")
        u = SelfFlowTransformer.velocity(
            model, x, torch.full((2,), 0.5), pos, Condition(torch.full((2,), 10)), "image"
        )
        plain = SelfFlowTransformer.velocity(model, x, torch.full((2,), 0.9), pos, labels, "image")
    torch.testing.assert_close(inside, u + 3.0 * (c - u))
    torch.testing.assert_close(outside, plain)
    # a full run: 10 Euler steps, levels 1.0, 0.9, ..., 0.1; guided at 0.7 .. 0.3 (5 steps)
    calls.clear()
    out = sample_tokens(
        model, TOKENIZER, labels, steps=10, cfg_scale=3.0, guidance_interval=(0.3, 0.7)
    )
    assert out.nfe == 10 and out.model_calls == 10 and sorted(calls) == [2] * 5 + [4] * 5


def test_unset_labels_are_drawn_uniformly_from_the_seed_like_the_released_sampler():
    """labels=null: every sample's class drawn at random (the released protocol: 50,000 samples of
    1000 classes give uneven counts), fixed by the seed; labels=balanced keeps exactly N / classes
    per class."""
    drawn = resolve_labels(None, 50_000, 1000, 1000, seed=0)
    counts = torch.bincount(drawn, minlength=1000)
    assert counts.min() < 50 < counts.max() and counts.sum() == 50_000
    assert torch.equal(drawn, resolve_labels(None, 50_000, 1000, 1000, seed=0))
    assert not torch.equal(drawn, resolve_labels(None, 50_000, 1000, 1000, seed=1))
    assert resolve_labels("balanced", 5, 3, 3).tolist() == [0, 1, 2, 0, 1]
    assert torch.bincount(resolve_labels("balanced", 50_000, 1000, 1000)).tolist() == [50] * 1000


def test_labels_list_and_unconditional():
    assert resolve_labels([7, 2], 5, 10, 10).tolist() == [7, 2, 7, 2, 7]
    assert resolve_labels(None, 3, 0, 0).tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="labels=.*class ids in 0..9"):
        resolve_labels([12], 2, 10, 10)


def test_user_errors_name_the_key(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="sampler='rk4' is unknown"):
        run_sample(tiny_checkpoint, tmp_path, "sampler=rk4", "num_samples=2")
    with pytest.raises(ValueError, match="modality=audio"):
        run_sample(tiny_checkpoint, tmp_path, "modality=audio", "num_samples=2")
    with pytest.raises(ValueError, match="guidance_interval"):
        run_sample(
            tiny_checkpoint, tmp_path, "guidance_interval=[0.8,0.2]", "num_samples=2", "cfg_scale=2"
        )
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_sample(tmp_path / "missing.ckpt", tmp_path)
    with pytest.raises(ValueError, match="metrics=true needs reference"):
        run_sample(tiny_checkpoint, tmp_path, "metrics=true", "num_samples=2")


def test_online_weights_differ_from_ema(tiny_checkpoint, tmp_path):
    run_sample(tiny_checkpoint, tmp_path / "ema", "num_samples=2", "steps=2")
    run_sample(tiny_checkpoint, tmp_path / "online", "num_samples=2", "steps=2", "weights=online")
    with (
        np.load(tmp_path / "ema" / "samples.npz") as a,
        np.load(tmp_path / "online" / "samples.npz") as b,
    ):
        assert not np.array_equal(a["arr_0"], b["arr_0"])


def test_video_and_audio_samples_are_written(tmp_path):
    from selfflow.sampling.modalities import MODALITIES

    clips = torch.rand(2, 4, 3, 16, 16)
    videos = MODALITIES["video"].write(
        clips, tmp_path / "videos", ["a", "b"], SimpleNamespace(fps=4)
    )["videos"]
    assert [p.name for p in videos] == ["a.mp4", "b.mp4"] and all(
        p.stat().st_size > 0 for p in videos
    )
    files = MODALITIES["audio"].write(
        torch.rand(2, 8000) * 2 - 1,
        tmp_path / "audio",
        ["a", "b"],
        SimpleNamespace(sample_rate=8000),
    )
    import soundfile

    wave, rate = soundfile.read(files["audio"][0])
    assert rate == 8000 and len(wave) == 8000
    assert Image.open(files["spectrograms"][1]).width > 0


def save_tiny_vae(folder: Path):
    diffusers = pytest.importorskip(
        "diffusers", reason="the [vae] extra (diffusers) is not installed"
    )
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4,
        layers_per_block=1,
    )
    vae.save_pretrained(folder)
    return vae


def test_released_checkpoint_cli_path_decodes_with_a_local_vae(tmp_path, capsys):
    from tests.helpers.released import released_state_dict

    save_tiny_vae(tmp_path / "vae")
    ckpt = tmp_path / "selfflow_imagenet256.pt"
    torch.save(released_state_dict(width=64, grid=4), ckpt)  # heads: the released 16
    summary = run_sample(
        f"official:{ckpt}",
        tmp_path / "out",
        f"vae={tmp_path / 'vae'}",
        "num_samples=3",
        "steps=3",
        "labels=[1,1000]",
    )
    assert (
        summary["sampler"] == "sde" and summary["nfe"] == 3
    )  # the released recipe's sampler by default
    with np.load(tmp_path / "out" / "samples.npz") as npz:
        assert (
            npz["arr_0"].shape == (3, 16, 16, 3) and npz["arr_0"].dtype == np.uint8
        )  # 8x8 latents, VAE x2
        assert npz["labels"].tolist() == [1, 1000, 1]
    with pytest.raises(ValueError, match="pass vae=LOCAL_DIR"):
        run_sample(f"official:{ckpt}", tmp_path / "out2", "num_samples=1")


def run_cli(args, cwd, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "selfflow.cli.sample", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ},
    )


@pytest.mark.slow
def test_sample_cli_as_a_user_runs_it(tiny_checkpoint, tmp_path):
    result = run_cli(
        [
            f"ckpt={tiny_checkpoint}",
            "num_samples=4",
            "steps=3",
            "sampler=heun",
            "cfg_scale=2",
            "guidance_interval=[0.2,0.9]",
            f"out_dir={tmp_path / 'out'}",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "NFE=3" in result.stdout and (tmp_path / "out" / "samples.npz").is_file()
    bad = run_cli([f"ckpt={tmp_path / 'nope.ckpt'}", f"out_dir={tmp_path / 'bad'}"], cwd=tmp_path)
    assert (
        bad.returncode == 2
        and "selfflow-sample: error:" in bad.stderr
        and "Traceback" not in bad.stderr
    )


def test_sample_writer_dispatches_video_and_audio(tmp_path):
    from selfflow.sampling.chunks import ChunkStore
    from selfflow.sampling.job import SampleWriter, stored_form

    def write(writer, store, chunks):
        for chunk, samples in enumerate(chunks):
            writer.add(samples, store.ranges[chunk])
            store.write(
                chunk, torch.zeros(len(samples), dtype=torch.long), stored_form(writer.io, samples)
            )
        return writer.finish(store, torch.zeros(store.ranges[-1].stop, dtype=torch.long), nrow=None)

    video = SampleWriter("video", SimpleNamespace(fps=4), tmp_path / "v", grid_upscale=1)
    files = write(
        video,
        ChunkStore(tmp_path / "v", 3, 2),
        [torch.rand(2, 4, 3, 8, 8), torch.rand(1, 4, 3, 8, 8)],
    )
    assert sorted(p.name for p in files["videos"].iterdir()) == [
        "000000.mp4",
        "000001.mp4",
        "000002.mp4",
    ]
    assert Image.open(files["contact_sheet"]).height > 3 * 8
    audio = SampleWriter("audio", SimpleNamespace(sample_rate=8000), tmp_path / "a", grid_upscale=1)
    files = write(audio, ChunkStore(tmp_path / "a", 2, 2), [torch.rand(2, 4000) - 0.5])
    assert sorted(p.name for p in files["audio"].iterdir()) == [
        "000000.png",
        "000000.wav",
        "000001.png",
        "000001.wav",
    ]
    assert "npz" not in files and not (tmp_path / "a" / "samples.npz").exists()


def test_bf16_autocast_is_close_to_fp32_and_auto_means_fp32_on_cpu():
    from selfflow.sampling.generate import autocast_dtype

    assert autocast_dtype(torch.device("cpu"), "auto") is None
    assert autocast_dtype(torch.device("cpu"), "bf16") is torch.bfloat16
    model, labels = random_model(), Condition(torch.tensor([0, 1]))
    runs = {
        p: sample_tokens(
            model,
            TOKENIZER,
            labels,
            steps=4,
            precision=p,
            noise=NoiseSource(generators=sample_generators(0, range(2))),
        ).tokens
        for p in ("fp32", "bf16")
    }
    assert runs["bf16"].dtype == torch.float32
    assert not torch.equal(runs["fp32"], runs["bf16"])
    torch.testing.assert_close(runs["bf16"], runs["fp32"], atol=0.1, rtol=0.05)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_sampling_matches_cpu_noise_and_uses_bf16_where_supported():
    model, labels = random_model(), Condition(torch.tensor([0, 1]))
    cpu = sample_tokens(
        model,
        TOKENIZER,
        labels,
        steps=4,
        precision="fp32",
        noise=NoiseSource(generators=sample_generators(0, range(2))),
    ).tokens
    gpu = sample_tokens(
        model.cuda(),
        TOKENIZER,
        labels,
        steps=4,
        precision="auto",
        noise=NoiseSource(generators=sample_generators(0, range(2))),
    ).tokens
    torch.testing.assert_close(
        gpu.cpu(), cpu, atol=0.1, rtol=0.05
    )  # same per-sample noise on any device


def test_fid_jobs_default_to_the_released_protocol(tiny_checkpoint, tmp_path, monkeypatch):
    """metrics=fid with nothing else said: SDE, 250 steps, guidance only at noise levels <= 0.7 (the
    released sampler's interval); a quick look keeps Euler 50 over [0, 1]; what the user sets
    wins."""
    from selfflow.evaluation.fid_job import FidJobMetrics

    # no Inception file here: neither the inputs' check nor selfflow-eval runs
    monkeypatch.setattr(FidJobMetrics, "before_loading", lambda self, out_dir, device: None)
    monkeypatch.setattr(FidJobMetrics, "finish", lambda self, out_dir, summary: {})
    fid_options = ("metrics=fid", "num_samples=1", "cfg_scale=2")
    fid = run_sample(tiny_checkpoint, tmp_path / "fid", *fid_options)
    assert (fid["sampler"], fid["steps"], fid["guidance_interval"]) == ("sde", 250, [0.0, 0.7])
    quick = ("num_samples=1", "cfg_scale=2", "steps=2")
    plain = run_sample(tiny_checkpoint, tmp_path / "plain", *quick)
    assert (plain["sampler"], plain["guidance_interval"]) == ("euler", [0.0, 1.0])
    told_options = (
        "metrics=fid",
        "num_samples=1",
        "sampler=heun",
        "steps=4",
        "guidance_interval=[0.1,0.9]",
    )
    told = run_sample(tiny_checkpoint, tmp_path / "told", *told_options)
    assert (told["sampler"], told["steps"], told["guidance_interval"]) == ("heun", 4, [0.1, 0.9])
