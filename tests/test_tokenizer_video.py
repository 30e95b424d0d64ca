"""Video tubelet tokenizer (exact round trip, channel order, (t, h, w, 0) ids) and the latent
variant with a tiny TorchScript autoencoder saved here."""

import pytest
import torch
from torch import nn

from selfflow.tokenizers.latent import VideoLatentTokenizer
from selfflow.tokenizers.video import VideoTubeletTokenizer


def test_round_trip_is_exact_and_scaled_to_unit_range():
    tokenizer = VideoTubeletTokenizer(
        tubelet_frames=2, patch_size=4, channels=3, num_frames=6, image_size=8
    )
    video = torch.rand(2, 6, 3, 8, 8)
    tokens = tokenizer.encode(video)
    assert tokens.x.shape == (2, 3 * 2 * 2, 3 * 2 * 4 * 4) and tokenizer.token_channels == 96
    assert tokens.modality == "video" and tokens.x.min() >= -1 and tokens.x.max() <= 1
    torch.testing.assert_close(tokenizer.decode(tokens.x), video)


def test_tubelet_channels_and_position_ids_follow_t_h_w_order():
    tokenizer = VideoTubeletTokenizer(
        tubelet_frames=2, patch_size=2, channels=1, num_frames=4, image_size=4
    )
    video = torch.rand(1, 4, 1, 4, 4)
    tokens = tokenizer.encode(video)
    # token 3 = tubelet t=0, h=1, w=1: frames 0-1, rows 2-3, columns 2-3, frame-major then row-major
    expected = (
        torch.stack([video[0, f, 0, r, c] for f in (0, 1) for r in (2, 3) for c in (2, 3)]) * 2 - 1
    )
    torch.testing.assert_close(tokens.x[0, 3], expected)
    assert tokens.pos[0].tolist() == [
        [t, h, w, 0] for t in range(2) for h in range(2) for w in range(2)
    ]
    assert tokenizer.positions(3).shape == (3, 8, 4)


def test_wrong_shapes_are_explained():
    with pytest.raises(
        ValueError, match="tubelets of 3 frames x 4 x 4 do not divide .* 8 frames x 16 x 16"
    ):
        VideoTubeletTokenizer(tubelet_frames=3, patch_size=4, num_frames=8, image_size=16)
    tokenizer = VideoTubeletTokenizer(
        tubelet_frames=2, patch_size=4, channels=1, num_frames=8, image_size=16
    )
    with pytest.raises(
        ValueError,
        match=r"expects \[B, T, 1, 16, 16\] \(B, T, C, H, W; T = 8 or another whole "
        r"number of tubelets\), got \[2, 1, 16, 16\]",
    ):
        tokenizer.encode(torch.rand(2, 1, 16, 16))
    with pytest.raises(
        ValueError, match="a clip of 7 frames is not a whole number of tokenizer.video tubelets"
    ):
        tokenizer.encode(torch.rand(2, 7, 1, 16, 16))


def test_clips_of_other_frame_counts_tokenize_to_their_own_length():
    tokenizer = VideoTubeletTokenizer(
        tubelet_frames=2, patch_size=4, channels=1, num_frames=8, image_size=16
    )
    clips = torch.rand(2, 12, 1, 16, 16)
    tokens = tokenizer.encode(clips)
    fresh = VideoTubeletTokenizer(
        tubelet_frames=2, patch_size=4, channels=1, num_frames=12, image_size=16
    )
    torch.testing.assert_close(tokens.x, fresh.encode(clips).x)
    assert torch.equal(tokens.pos, fresh.positions(2)) and tokens.x.shape == (2, 96, 32)
    torch.testing.assert_close(
        tokenizer.decode(tokens.x), clips
    )  # exact inverse at the clip's own length
    assert tokenizer.num_frames == 8 and tokenizer.at_frames(4).grid == (2, 4, 4)


class PixelShuffleVideoAE(nn.Module):
    """A stand-in autoencoder: 2x2 space-to-depth (exactly invertible) and a
    learnable-looking scale."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(2.0))

    @torch.jit.export
    def encode(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, C, H, W] -> [B, T, 4C, H/2, W/2]
        b, t, c, h, w = x.shape
        z = torch.nn.functional.pixel_unshuffle(x.reshape(b * t, c, h, w), 2)
        return z.reshape(b, t, c * 4, h // 2, w // 2) * self.gain

    @torch.jit.export
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        b, t, c, h, w = z.shape
        x = torch.nn.functional.pixel_shuffle(z.reshape(b * t, c, h, w) / self.gain, 2)
        return x.reshape(b, t, c // 4, h * 2, w * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def test_latent_tokenizer_loads_a_local_torchscript_and_round_trips(tmp_path):
    path = tmp_path / "ae.pt"
    torch.jit.save(torch.jit.script(PixelShuffleVideoAE()), str(path))
    tokenizer = VideoLatentTokenizer(
        str(path), tubelet_frames=2, patch_size=2, channels=1, num_frames=4, image_size=8, scale=0.5
    )
    # latents [B, 4, 4, 4, 4] in tubelets of 2 x 2 x 2: grid 2 x 2 x 2, 4 * 8 channels
    assert tokenizer.grid == (2, 2, 2) and tokenizer.token_channels == 32
    video = torch.rand(3, 4, 1, 8, 8)
    tokens = tokenizer.encode(video)
    assert tokens.x.shape == (3, 8, 32) and tokens.pos[0, -1].tolist() == [1, 1, 1, 0]
    torch.testing.assert_close(
        tokens.x.abs().max(), torch.tensor(1.0), atol=0.05, rtol=0
    )  # (2x-1) * 2 * 0.5
    torch.testing.assert_close(tokenizer.decode(tokens.x), video, atol=1e-6, rtol=0)
    assert not any(p.requires_grad for p in tokenizer.parameters())


def test_latent_tokenizer_errors_name_the_file(tmp_path):
    with pytest.raises(
        FileNotFoundError, match="tokenizer.video.autoencoder_path=.*missing.pt does not exist"
    ):
        VideoLatentTokenizer(str(tmp_path / "missing.pt"))
    (tmp_path / "weights.pt").write_bytes(b"not torchscript")
    with pytest.raises(ValueError, match="weights.pt is not a loadable TorchScript module"):
        VideoLatentTokenizer(str(tmp_path / "weights.pt"))
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), str(tmp_path / "linear.pt"))
    with pytest.raises(ValueError, match="linear.pt has no encode\\(\\) method"):
        VideoLatentTokenizer(str(tmp_path / "linear.pt"))
