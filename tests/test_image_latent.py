"""Image-latent tokenizers (tokenizer=image_sdvae / image_flux_vae): tokens of the VAE posterior,
the VAE never in a checkpoint (its folder and fingerprint are), another VAE refused wherever a
checkpoint is loaded."""

import shutil

import pytest
import torch
from einops import rearrange

from selfflow.io.model_folders import vae_fingerprint
from selfflow.tokenizers.image_latent import ImageLatentTokenizer
from tests.helpers.files import write_tiny_vae


def test_tokens_are_the_scaled_posterior_in_c_p_q_patches(tiny_vae):
    tokenizer = ImageLatentTokenizer(tiny_vae, image_size=32, patch_size=2).eval()
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    mean, std = tokenizer.posterior(images)  # [3, 4, 4, 4]
    expected = rearrange(mean * 0.18215, "b c (h p) (w q) -> b (h w) (c p q)", p=2, q=2)
    tokens = tokenizer.encode(images)
    torch.testing.assert_close(tokens.x, expected)
    assert tokens.pos[0, :, 1:3].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert tokenizer.token_channels == 16 and tokenizer.decode(tokens.x).shape == (3, 3, 32, 32)
    tokenizer.train()  # training draws from the posterior: mean + std * noise
    draws = rearrange(
        tokenizer.encode(images.repeat(200, 1, 1, 1)).x, "(k b) n c -> k b n c", k=200
    )
    torch.testing.assert_close(draws.mean(0), expected, atol=0.02, rtol=0)
    spread = rearrange(std * 0.18215, "b c (h p) (w q) -> b (h w) (c p q)", p=2, q=2)
    torch.testing.assert_close(draws.std(0), spread, atol=0.01, rtol=0.15)


def test_scale_and_shift_come_from_the_vae_config_and_can_be_overridden(tmp_path):
    from hydra.utils import instantiate

    from selfflow.training.validate import tokenizer_configs
    from tests.helpers.configs import compose_plain

    folder = write_tiny_vae(
        tmp_path / "flux-like", latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159
    )
    cfg = compose_plain(
        [
            "experiment=imagenet256",
            "tokenizer=image_flux_vae",
            f"tokenizer.image.vae={folder}",
            "data.dataset.image_size=32",
            "data.root=unused",
        ],
        tmp_path,
    )
    tokenizer = instantiate(tokenizer_configs(cfg)["image"]).eval()  # image_size from the data
    assert (tokenizer.scale, tokenizer.shift, tokenizer.token_channels) == (0.3611, 0.1159, 64)
    images = torch.rand(2, 3, 32, 32)
    mean, _ = tokenizer.posterior(images)
    z = rearrange(tokenizer.encode(images).x, "b (h w) (c p q) -> b c (h p) (w q)", h=2, p=2, q=2)
    torch.testing.assert_close(z, (mean - 0.1159) * 0.3611)
    torch.testing.assert_close(
        tokenizer.decode(tokenizer.encode(images).x),
        ((tokenizer.vae.decode(mean).sample + 1) / 2).clamp(0, 1),
        atol=1e-5,
        rtol=0,
    )
    overridden = ImageLatentTokenizer(folder, image_size=32, scale=1.0, shift=0.0)
    assert (overridden.scale, overridden.shift) == (1.0, 0.0)
    with pytest.raises(
        ValueError, match="16 latent channels, not tokenizer.image.latent_channels=4"
    ):
        ImageLatentTokenizer(folder, image_size=32, latent_channels=4)


def test_cached_latents_and_images_are_told_apart_by_shape(tiny_vae):
    tokenizer = ImageLatentTokenizer(tiny_vae, image_size=32).eval()
    z = torch.randn(2, 4, 4, 4)
    torch.testing.assert_close(
        tokenizer.encode(z).x,
        rearrange(z * 0.18215, "b c (h p) (w q) -> b (h w) (c p q)", p=2, q=2),
    )
    with pytest.raises(
        ValueError, match=r"takes images \[B, 3, 32, 32\] or cached latents \[B, 4, 4, 4\]"
    ):
        tokenizer.encode(torch.rand(2, 3, 64, 64))


def test_the_vae_is_held_outside_the_module_state_and_moves_with_it(tiny_vae):
    tokenizer = ImageLatentTokenizer(tiny_vae, image_size=32)
    assert tokenizer.state_dict() == {} and list(tokenizer.parameters()) == []
    tokenizer.to(torch.float64)
    assert tokenizer.vae.dtype == torch.float64


def test_the_fingerprint_follows_the_content_not_the_folder(tiny_vae, tmp_path):
    copy = shutil.copytree(tiny_vae, tmp_path / "moved")
    assert vae_fingerprint(copy) == vae_fingerprint(tiny_vae)
    other = write_tiny_vae(tmp_path / "other", seed=1)
    assert vae_fingerprint(other) != vae_fingerprint(tiny_vae)
    with pytest.raises(ValueError, match="holds another VAE"):
        ImageLatentTokenizer(other, image_size=32, fingerprint=vae_fingerprint(tiny_vae))
    with pytest.raises(
        FileNotFoundError, match="tokenizer.image.vae=.* is not a diffusers AutoencoderKL folder"
    ):
        ImageLatentTokenizer(tmp_path / "nothing", image_size=32)


def latent_run_args(cifar_classes, vae) -> list[str]:
    return [
        "data=image_folder",
        f"data.root={cifar_classes}",
        "tokenizer=image_sdvae",
        f"tokenizer.image.vae={vae}",
        "data.dataset.image_size=32",
        "callbacks.samples.every_n_steps=2",
    ]


def test_a_checkpoint_keeps_the_vae_folder_and_fingerprint_never_its_weights(
    tiny_train_cfg, tiny_vae, cifar_classes, tmp_path, monkeypatch
):
    from selfflow.interop.checkpoint import load_checkpoint, read_checkpoint
    from selfflow.training.run import train

    monkeypatch.chdir(
        tiny_vae.parent
    )  # a relative tokenizer.image.vae is stored as the absolute folder
    run = train(
        tiny_train_cfg(*latent_run_args(cifar_classes, tiny_vae.name), "trainer.max_steps=2")
    )
    monkeypatch.chdir(tmp_path)
    checkpoint = read_checkpoint(run.run_dir / "checkpoints" / "last.ckpt")
    assert not [
        k for k in checkpoint["state_dict"] if "vae" in k or "encoder" in k or "decoder" in k
    ]
    assert all(k.startswith("objective.") for k in checkpoint["state_dict"])
    stored = checkpoint["selfflow_config"]["tokenizer"]["image"]
    assert stored["vae"] == str(tiny_vae) and stored["fingerprint"] == vae_fingerprint(tiny_vae)
    assert (run.run_dir / "samples" / "image" / "step_0000002.png").is_file()  # decoded by the VAE
    with pytest.raises(ValueError, match="a stored path is never loaded: pass vae=PATH"):
        load_checkpoint(run.run_dir / "checkpoints" / "last.ckpt")  # the user names the VAE
    loaded = load_checkpoint(run.run_dir / "checkpoints" / "last.ckpt", vae=str(tiny_vae))
    assert not loaded.tokenizers["image"].training  # sampling and probing read the posterior mean

    moved = shutil.copytree(tiny_vae, tmp_path / "moved-vae")
    assert load_checkpoint(run.run_dir / "checkpoints" / "last.ckpt", vae=str(moved)).tokenizers[
        "image"
    ].vae_path == str(moved)
    other = write_tiny_vae(tmp_path / "other-vae", seed=2)
    with pytest.raises(
        ValueError, match="vae=.*other-vae holds another VAE .* than the one this model was trained"
    ):
        load_checkpoint(run.run_dir / "checkpoints" / "last.ckpt", vae=str(other))
    with pytest.raises(ValueError, match="trained with another VAE"):  # resuming with another VAE
        train(
            tiny_train_cfg(
                *latent_run_args(cifar_classes, other),
                "trainer.max_steps=4",
                "resume=auto",
                run_dir=run.run_dir,
            )
        )
