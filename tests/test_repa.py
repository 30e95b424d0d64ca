"""objective=repa: REPA's alignment loss to a frozen DINOv2 (a tiny random one of the real
architecture), its defaults, its encoder kept out of checkpoints and bound by fingerprint; the three
objectives from one sweep."""

import sys

import pytest
import torch
import torch.nn.functional as F

from selfflow.interop.checkpoint import read_checkpoint
from selfflow.objectives.repa import REPAAlignment, default_alignment_layer
from selfflow.training.build import build_run
from tests.helpers.files import write_tiny_dinov2

transformers = pytest.importorskip("transformers")

REPA = [
    "objective=repa",
    "objective.alignment.projector_dim=64",
    "callbacks.samples.every_n_steps=0",
]


def test_repa_defaults_layer_8_of_28_projector_mlp_and_lambda(tiny_dinov2):
    assert [default_alignment_layer(d) for d in (28, 24, 12, 4, 2)] == [8, 7, 3, 1, 1]
    alignment = REPAAlignment(width=48, depth=28, encoder=tiny_dinov2)
    linears = [m for m in alignment.projector if isinstance(m, torch.nn.Linear)]
    shapes = [(m.in_features, m.out_features) for m in linears]
    assert shapes == [(48, 2048), (2048, 2048), (2048, 16)]
    assert sum(isinstance(m, torch.nn.SiLU) for m in alignment.projector) == 2
    assert alignment.layer == 8 and alignment.weight == 0.5


def reference_features(folder, images, size):
    """DINOv2's normalised patch tokens of `images` resized to `size`, as REPA preprocesses them."""
    model = transformers.Dinov2Model.from_pretrained(str(folder)).eval()
    x = F.interpolate(images, size=size, mode="bicubic", align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.no_grad():
        return model(pixel_values=(x - mean) / std).last_hidden_state[:, 1:]


def test_loss_is_negative_cosine_to_the_encoders_patch_features_of_the_clean_image(tiny_dinov2):
    torch.manual_seed(0)
    alignment = REPAAlignment(width=32, depth=4, encoder=tiny_dinov2, projector_dim=64)
    images, hidden = torch.rand(2, 3, 16, 16), torch.randn(2, 16, 32)
    target = reference_features(tiny_dinov2, images, (56, 56))  # 4 x 4 tokens at patch 14: 56 px
    expected = -F.cosine_similarity(alignment.projector(hidden), target, dim=-1)
    torch.testing.assert_close(alignment(hidden, images, (4, 4)), expected, atol=1e-5, rtol=1e-5)
    # another encoder resolution: its 2 x 2 patch grid is interpolated to the student's 4 x 4
    small = REPAAlignment(
        width=32,
        depth=4,
        encoder=tiny_dinov2,
        projector_dim=64,
        encoder_resolution=28,
    )
    features = reference_features(tiny_dinov2, images, (28, 28))
    grid = features.reshape(2, 2, 2, -1).permute(0, 3, 1, 2)
    up = F.interpolate(grid, size=(4, 4), mode="bilinear", align_corners=False)
    up = up.flatten(2).transpose(1, 2)
    torch.testing.assert_close(small.encoder(images, (4, 4)), up, atol=1e-5, rtol=1e-5)


def test_a_repa_run_trains_and_its_checkpoint_holds_no_encoder(tiny_train_cfg, tiny_dinov2):
    encoder = f"objective.encoder={tiny_dinov2}"
    run = build_run(tiny_train_cfg(*REPA, encoder, "trainer.max_steps=2"))
    objective = run.module.objective
    assert objective.gamma == 0 and objective.head is None
    assert max(objective.mask_ratios.values()) == 0
    run.trainer.fit(run.module, datamodule=run.datamodule)
    ckpt = read_checkpoint(run.run_dir / "checkpoints" / "last.ckpt")
    keys = list(ckpt["state_dict"])
    assert any(k.startswith("objective.alignment.projector.") for k in keys)
    assert not [k for k in keys if "encoder" in k or "dinov2" in k.lower()]
    assert not [k for k in run.module.state_dict() if ".encoder." in k]
    assert not [n for n, _ in run.module.named_parameters() if ".encoder." in n]
    stored = ckpt["selfflow_config"]["objective"]["alignment"]
    assert stored["fingerprint"] == objective.alignment.encoder.fingerprint
    encoder_size = sum(p.numel() for p in objective.alignment.encoder.encoder.parameters())
    saved = sum(v.numel() for v in ckpt["state_dict"].values())
    assert saved == sum(v.numel() for v in run.module.state_dict().values()) and encoder_size > 0


def test_resuming_with_another_encoder_is_refused(tiny_train_cfg, tiny_dinov2, tmp_path):
    from selfflow.training.run import train

    encoder = f"objective.encoder={tiny_dinov2}"
    first = build_run(tiny_train_cfg(*REPA, encoder, run_dir=tmp_path / "a"))
    first.trainer.fit(first.module, datamodule=first.datamodule)
    other = write_tiny_dinov2(tmp_path / "other-dinov2", seed=1)
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match="another REPA encoder .*objective.encoder="):
        train(tiny_train_cfg(*REPA, f"objective.encoder={other}", f"ckpt_path={ckpt}"))


def test_without_transformers_the_error_names_the_extra(tiny_dinov2, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'selfflow\[text\]'"):
        REPAAlignment(width=32, depth=4, encoder=tiny_dinov2)


def test_a_folder_without_a_model_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="objective.encoder=.*no config.json"):
        REPAAlignment(width=32, depth=4, encoder=tmp_path)


def test_repa_on_latent_images_aligns_the_decoded_clean_latents(tiny_vae):
    """Images in the batch are the encoder's input as they are; a latent cache gives no pixels: its
    clean latents are decoded by the VAE."""
    from selfflow.objectives.repa import clean_images
    from selfflow.tokenizers.image_latent import ImageLatentTokenizer

    tokenizer = ImageLatentTokenizer(tiny_vae, image_size=32, patch_size=1, latent_channels=4)
    tokenizer = tokenizer.eval()
    images = torch.rand(2, 3, 32, 32)
    tokens = tokenizer.encode(images)
    assert clean_images(images, tokens, tokenizer) is images  # pixels in the batch: kept
    latents = torch.randn(2, *tokenizer.latent_shape)
    decoded = clean_images(latents, tokenizer.encode(latents), tokenizer)
    assert decoded.shape == (2, 3, 32, 32)
    torch.testing.assert_close(decoded, tokenizer.decode(tokenizer.encode(latents).x))


@pytest.mark.slow
def test_a_repa_run_killed_at_a_checkpoint_resumes_exactly(tiny_dinov2, tmp_path):
    """kill -9 at a checkpoint, resume=auto: every step's loss and the final weights (projector
    included) equal those of a run never interrupted."""
    from tests.helpers.files import write_noise_images
    from tests.helpers.runs import EVERY, assert_same_run, finish, kill_when, resume_run_args, start

    images = write_noise_images(tmp_path / "images")
    repa = [
        "objective=repa",
        f"objective.encoder={tiny_dinov2}",
        "objective.alignment.projector_dim=64",
    ]

    def args(run_dir, *extra):
        return resume_run_args(["data=image_folder"], images, run_dir, 0, *repa, *extra)

    finish(start(args(tmp_path / "reference"), tmp_path))
    run_dir = tmp_path / "run"
    at = run_dir / "checkpoints" / f"step_{3 * EVERY:07d}.ckpt"
    kill_when(start(args(run_dir), tmp_path), at)
    finish(start(args(run_dir, "resume=auto"), tmp_path))
    assert_same_run(tmp_path / "reference", run_dir)


@pytest.mark.slow
def test_one_sweep_trains_selfflow_repa_and_vanilla(tiny_dinov2, tmp_path):
    """selfflow-train -m objective=selfflow,repa,vanilla: the paper's comparison from one
    command."""
    import os
    import shutil
    import subprocess

    from tests.helpers.configs import TINY

    exe = shutil.which("selfflow-train") or "selfflow-train"
    args = [
        "-m",
        "objective=selfflow,repa,vanilla",
        f"objective.encoder={tiny_dinov2}",  # read by repa only
        *TINY,
        "trainer.max_steps=2",
        "callbacks.samples.every_n_steps=0",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [exe, *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    checkpoints = [read_checkpoint(p) for p in (tmp_path / "sweep").glob("*/checkpoints/last.ckpt")]
    kinds = {}
    for ckpt in checkpoints:
        objective = ckpt["selfflow_config"]["objective"]
        kind = "selfflow" if objective["gamma"] > 0 else "vanilla"
        kind = "repa" if objective["alignment"] else kind
        kinds[kind] = {k.split(".")[1] for k in ckpt["state_dict"] if k.startswith("objective.")}
        assert ckpt["global_step"] == 2
    assert sorted(kinds) == ["repa", "selfflow", "vanilla"]
    assert kinds["selfflow"] - kinds["vanilla"] == {"head"}  # the rest is shared: model, EMA
    assert kinds["repa"] - kinds["vanilla"] == {"alignment"}


@pytest.mark.parametrize("objective", ["selfflow", "repa", "vanilla"])
def test_experiment_imagenet256_accepts_each_objective(objective, tiny_dinov2, tiny_vae, tmp_path):
    """The paper's setting keeps each objective's own options: the experiment sets only what they
    share."""
    from selfflow.training.validate import validate_config
    from tests.helpers.configs import compose_plain

    cfg = compose_plain(
        [
            "experiment=imagenet256",
            f"objective={objective}",
            f"objective.encoder={tiny_dinov2}",
            f"tokenizer.image.vae={tiny_vae}",
            f"data.root={tmp_path}",
        ],
        tmp_path / "run",
    )
    validate_config(cfg)  # builds the XL model, the objective and the optimizer on the meta device
    expected = {"selfflow": (0.25, 0.8), "repa": (0.0, 0.0), "vanilla": (0.0, 0.0)}[objective]
    assert (cfg.objective.mask_ratio.image, cfg.objective.gamma) == expected
    assert cfg.objective.ema_decay == 0.9999
    assert (cfg.objective.alignment is not None) == (objective == "repa")


def test_repa_without_an_encoder_folder_names_the_key(tiny_train_cfg):
    from selfflow.training.validate import ConfigError, validate_config

    with pytest.raises(ConfigError, match="objective=repa needs objective.encoder=DIR"):
        validate_config(tiny_train_cfg("objective=repa"))
