"""Log-mel audio tokenizer: shapes, (t, h, 0, 0) ids, close round trips through Griffin-Lim
(tolerances stated below), and the latent variant with a tiny TorchScript autoencoder saved here."""

import math

import pytest
import torch
from torch import nn

from selfflow.tokenizers.audio import PEAK_LIMIT, AudioMelTokenizer
from selfflow.tokenizers.latent import AudioLatentTokenizer
from tests.helpers.configs import SHARED_DATA


def tone(freq: float, rate: int = 8000, seconds: float = 1.0) -> torch.Tensor:
    return 0.5 * torch.sin(2 * math.pi * freq * torch.arange(int(rate * seconds)) / rate)


def speech_batch() -> torch.Tensor:
    """[3, 1, 8000] real speech: two words from espeak-ng and, where the shared data is present, an
    FSDD recording."""
    import torchaudio

    from selfflow.data.builtin.speech_synth import Espeak
    from selfflow.io.audio import fit_length, read_audio

    engine = Espeak.get()
    waves = []
    for word, voice in (("three", "en+m3"), ("seven", "en+f2")):
        spoken = torch.from_numpy(engine.say(word, voice) / 32768.0).float()[None]
        waves.append(
            fit_length(
                torchaudio.functional.resample(spoken, engine.sample_rate, 8000), 8000, False
            )[0]
        )
    recording = SHARED_DATA / "fsdd" / "recordings" / "3_jackson_0.wav"
    waves.append(
        read_audio(recording, 8000, 8000)[0] if recording.is_file() else waves[0].roll(2000)
    )
    return torch.stack(waves)[:, None]


def test_default_tokens_and_position_ids():
    tokenizer = AudioMelTokenizer()
    assert (
        tokenizer.token_channels == 32
        and tokenizer.grid == (8, 8)
        and tokenizer.sample_rate == 8000
    )
    tokens = tokenizer.encode(speech_batch())
    assert tokens.x.shape == (3, 64, 32) and tokens.modality == "audio"
    assert tokens.pos[0, :3].tolist() == [
        [0, 0, 0, 0],
        [0, 1, 0, 0],
        [0, 2, 0, 0],
    ]  # time-major, then frequency
    assert tokens.pos[0, -1].tolist() == [7, 7, 0, 0]
    silence = tokenizer.encode(torch.zeros(1, 8000))
    torch.testing.assert_close(silence.x, torch.full_like(silence.x, -1.0))
    assert tokens.x.min() >= -1 and tokens.x.max() < 1.2


def test_a_tone_lands_in_its_mel_band():
    tokenizer = AudioMelTokenizer()
    low, high = (tokenizer.log_mel(tone(f)[None]).mean(-1)[0].argmax() for f in (200, 2000))
    assert low < high
    assert abs(float(tokenizer.mel.mel_scale.fb[:, low].argmax()) * 4000 / 256 - 200) < 120


def test_decode_gives_waves_whose_log_mel_is_close_to_the_tokens():
    """Mel inversion + 32 Griffin-Lim iterations: re-encoding decoded speech gives back its tokens
    within a mean absolute error of 0.06 per clip on the [-1, 1] scale (measured 0.03-0.04), 0.05 on
    the loud tokens. (Pure tones fare worse, ~0.2: least-squares mel inversion spreads a tone over
    its whole mel band.)"""
    tokenizer = AudioMelTokenizer()
    waves = speech_batch()
    tokens = tokenizer.encode(waves)
    decoded = tokenizer.decode(tokens.x)
    assert decoded.shape == (3, 8000) and torch.isfinite(decoded).all()
    again = tokenizer.encode(decoded)
    error = (again.x - tokens.x).abs()
    assert (error.mean(dim=(1, 2)) < 0.06).all(), error.mean(dim=(1, 2))
    loud = tokens.x > -0.3
    assert error[loud].mean() < 0.05
    torch.testing.assert_close(
        tokenizer.tokens_to_log_mel(tokens.x), tokenizer.log_mel(waves)
    )  # exact re-layout
    # a decoded tone keeps its pitch to within a mel band (~100 Hz wide at 1 kHz with 32 bands up to
    # 4 kHz)
    spectrum = torch.fft.rfft(tokenizer.decode(tokenizer.encode(tone(1000)[None]).x)[0]).abs()
    assert abs(float(spectrum.argmax()) - 1000) < 100


def test_wild_tokens_decode_to_bounded_audio():
    """An untrained or unstable model's tokens (huge, NaN, inf) decode to finite waves peaking at -1
    dBFS at most: the tokens are clamped to the tokenizer's range [-1, 1] before inversion, the
    waves limited after it."""
    tokenizer = AudioMelTokenizer()
    tokens = tokenizer.encode(speech_batch()).x
    wild = tokens * 1e4
    wild[0, 0, 0], wild[1, 0, 0] = float("nan"), float("inf")
    waves = tokenizer.decode(wild)
    assert torch.isfinite(waves).all()
    assert waves.abs().amax(dim=-1).tolist() == pytest.approx(
        [PEAK_LIMIT] * 3
    )  # loud, limited, not silenced
    torch.testing.assert_close(waves[2:], tokenizer.decode(wild[2:].clamp(-1, 1)))
    assert tokenizer.decode(torch.ones_like(tokens[:1])).abs().max() == pytest.approx(
        PEAK_LIMIT
    )  # the loudest
    assert (
        tokenizer.decode(tokens).abs().amax(dim=-1) < 0.8 * PEAK_LIMIT
    ).all()  # speech keeps its own level


def test_wrong_sizes_are_explained():
    with pytest.raises(ValueError, match="patches of 8 frames x 5 mel bins do not divide"):
        AudioMelTokenizer(patch_mels=5)
    tokenizer = AudioMelTokenizer()
    with pytest.raises(
        ValueError, match=r"expects mono waves \[B, 1, 8000\] .* got \[2, 2, 8000\]"
    ):
        tokenizer.encode(torch.zeros(2, 2, 8000))


def test_clips_of_other_durations_tokenize_to_their_own_length():
    tokenizer = AudioMelTokenizer()  # 1 s at 8 kHz: 64 tokens, time patches of 1000 samples
    wave = 0.1 * torch.randn(2, 1, 16000, generator=torch.Generator().manual_seed(0))
    tokens = tokenizer.encode(wave)
    fresh = AudioMelTokenizer(duration=2.0)
    torch.testing.assert_close(tokens.x, fresh.encode(wave).x)
    assert tokens.x.shape == (2, 128, 32) and torch.equal(tokens.pos, fresh.positions(2))
    assert (
        tokenizer.decode(tokens.x).shape == (2, 16000) and tokenizer.num_samples == 8000
    )  # unchanged
    torch.testing.assert_close(tokenizer.decode(tokens.x), fresh.decode(tokens.x))
    half = tokenizer.at_duration(0.5)
    assert (half.num_samples, half.grid) == (4000, (4, 8)) and half.positions(1).shape == (1, 32, 4)
    assert half.mel is tokenizer.mel  # the transforms are shared, not copied
    with pytest.raises(
        ValueError,
        match=r"8100 samples .* not a whole number of tokenizer.audio time patches "
        r"\(1000 samples = 0.125 s",
    ):
        tokenizer.encode(torch.zeros(1, 8100))
    with pytest.raises(ValueError, match="not whole time patches"):
        tokenizer.decode(torch.zeros(1, 60, 32))


class FrameAE(nn.Module):
    """A stand-in audio autoencoder: frames of 100 samples as 100 latent channels
    (exactly invertible)."""

    @torch.jit.export
    def encode(self, wave: torch.Tensor) -> torch.Tensor:  # [B, S] -> [B, 100, S / 100]
        return wave.reshape(wave.shape[0], -1, 100).transpose(1, 2)

    @torch.jit.export
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z.transpose(1, 2).reshape(z.shape[0], 1, -1)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(wave))


def test_latent_audio_tokenizer_round_trips_through_a_local_torchscript(tmp_path):
    path = tmp_path / "audio_ae.pt"
    torch.jit.save(torch.jit.script(FrameAE()), str(path))
    tokenizer = AudioLatentTokenizer(
        str(path), sample_rate=8000, duration=1.0, patch_frames=2, scale=2.0
    )
    assert tokenizer.token_channels == 200 and tokenizer.sample_rate == 8000
    waves = speech_batch()
    tokens = tokenizer.encode(waves)
    assert tokens.x.shape == (3, 40, 200)
    assert tokens.pos[0, :2].tolist() == [[0, 0, 0, 0], [1, 0, 0, 0]]
    torch.testing.assert_close(tokenizer.decode(tokens.x), waves[:, 0])
    loud = tokenizer.decode(
        tokens.x * 1e8
    )  # a wild decoder output: limited to -1 dBFS, not clipped
    torch.testing.assert_close(loud, waves[:, 0] * PEAK_LIMIT / waves.abs().amax(dim=-1))
    with pytest.raises(ValueError, match="divisible by patch_frames=3"):
        AudioLatentTokenizer(str(path), patch_frames=3)
