"""Audio tokenizer: patches of a log-mel spectrogram (time x frequency) with (t, h, 0, 0) position
ids, decoded back to a waveform by mel inversion and Griffin-Lim so that samples can be heard."""

from __future__ import annotations

import copy
import math

import torch
from einops import rearrange
from torch import Tensor

from selfflow.tokenizers.base import Tokenizer
from selfflow.tokenizers.video import grid_positions
from selfflow.tokens import Tokens

PEAK_LIMIT = 10 ** (
    -1 / 20
)  # -1 dBFS: decoded and written audio never comes closer to full scale than this


def limit_peak(wave: Tensor, limit: float = PEAK_LIMIT) -> Tensor:
    """wave: [..., S] -> the same, each clip whose peak exceeds `limit` scaled down to peak there
    (quieter clips keep their level) and NaN/inf samples silenced, so that no decoded sample reaches
    a speaker at full scale.

    Args:
        wave: [..., S] waves in [-1, 1] full scale.
        limit: The highest peak a clip may keep (PEAK_LIMIT = -1 dBFS).

    Returns:
        [..., S] waves with finite samples and peaks at most `limit`.
    """
    wave = torch.nan_to_num(wave, nan=0.0, posinf=0.0, neginf=0.0)
    peak = wave.abs().amax(dim=-1, keepdim=True)
    return wave * (limit / peak.clamp_min(limit))


def as_mono_batch(wave: Tensor, num_samples: int, what: str) -> Tensor:
    """[B, S] or [B, 1, S] -> [B, S] float32, or a ValueError naming the expected length.

    Args:
        wave: [B, S] or [B, 1, S] mono waves.
        num_samples: S, the length the caller expects.
        what: Who expects it, for the error message.

    Returns:
        [B, S] float32 waves.

    Raises:
        ValueError: The waves are not mono or not `num_samples` long.
    """
    if wave.ndim == 3 and wave.shape[1] == 1:
        wave = wave[:, 0]
    if wave.ndim != 2 or wave.shape[1] != num_samples:
        raise ValueError(
            f"{what} expects mono waves [B, 1, {num_samples}] or [B, {num_samples}], got "
            f"{list(wave.shape)}; the tokenizer was built for the data's "
            f"data.dataset.sample_rate and duration"
        )
    return wave.float()


def import_torchaudio():
    """torchaudio, imported on first use: image and video runs work without its native library."""
    import torchaudio

    return torchaudio


class AudioMelTokenizer(Tokenizer):
    """Waves [B, 1, S] -> log-mel [B, n_mels, S / hop] -> tokens [B, (frames/pf)(n_mels/pm), pf pm].

    Mel magnitudes (power 1) are mapped by `log(mel + floor)` and an affine map sending `log(floor)`
    to -1 and `log(ceiling)` to +1, so silence is -1 and loud speech near +1. `decode` inverts the
    log exactly, the mel filterbank by least squares, and the phase with `griffin_lim_iters`
    Griffin-Lim iterations (deterministic start), returning waves [B, S]; round trips are close, not
    exact (see tests/test_tokenizer_audio.py). Tokens are clamped to the tokenizer's range [-1, 1]
    (silence to `ceiling`) before inversion and the waves limited to PEAK_LIMIT (-1 dBFS), so that
    an untrained or unstable model's samples stay bounded.

    Args:
        sample_rate: Samples per second of the waves.
        duration: Seconds of a clip generation starts from.
        n_fft: FFT size of the short-time Fourier transform.
        hop_length: Wave samples between spectrogram frames.
        n_mels: Mel bins of the spectrogram.
        patch_frames: pf, spectrogram frames per patch; divides the frame count.
        patch_mels: pm, mel bins per patch; divides `n_mels`.
        f_min: Lowest frequency of the mel filterbank, in Hz.
        f_max: Highest frequency of the mel filterbank, in Hz; None for half the sample rate.
        floor: Mel magnitude mapped to -1 (silence); added before the log.
        ceiling: Mel magnitude mapped to +1.
        griffin_lim_iters: Griffin-Lim iterations of `decode`.

    Raises:
        ValueError: The patches do not divide the spectrogram, or not 0 < floor < ceiling.
    """

    modality = "audio"

    def __init__(
        self,
        sample_rate: int = 8000,
        duration: float = 1.0,
        n_fft: int = 512,
        hop_length: int = 125,
        n_mels: int = 32,
        patch_frames: int = 8,
        patch_mels: int = 4,
        f_min: float = 0.0,
        f_max: float | None = None,
        floor: float = 1e-4,
        ceiling: float = 100.0,
        griffin_lim_iters: int = 32,
    ):
        super().__init__()
        self.sample_rate, self.num_samples = int(sample_rate), round(sample_rate * duration)
        self.hop_length, self.n_mels = hop_length, n_mels
        self.patch_frames, self.patch_mels = patch_frames, patch_mels
        self.frames = self.num_samples // hop_length
        if patch_frames < 1 or patch_mels < 1 or self.frames % patch_frames or n_mels % patch_mels:
            raise ValueError(
                f"tokenizer.audio patches of {patch_frames} frames x {patch_mels} mel bins do not "
                f"divide the spectrogram of {self.frames} frames (sample_rate * duration / "
                f"hop_length) x {n_mels} mel bins; change "
                f"tokenizer.audio.patch_frames/patch_mels/hop_length/n_mels"
            )
        if not 0 < floor < ceiling:
            raise ValueError(
                f"tokenizer.audio.floor={floor} and ceiling={ceiling} need 0 < floor < ceiling"
            )
        self.grid = (self.frames // patch_frames, n_mels // patch_mels)
        self.token_channels = patch_frames * patch_mels
        self.log_floor, self.log_ceiling = math.log(floor), math.log(ceiling)
        self.floor = floor
        torchaudio = import_torchaudio()
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate,
            n_fft=n_fft,
            hop_length=hop_length,
            f_min=f_min,
            f_max=f_max,
            n_mels=n_mels,
            power=1.0,
        )
        self.inverse_mel = torchaudio.transforms.InverseMelScale(
            n_fft // 2 + 1, n_mels, sample_rate, f_min, f_max
        )
        self.griffin_lim = torchaudio.transforms.GriffinLim(
            n_fft,
            griffin_lim_iters,
            hop_length=hop_length,
            power=1.0,
            length=self.num_samples,
            rand_init=False,
        )

    @property
    def samples_per_patch(self) -> int:
        """Wave samples per time patch: clip lengths are whole multiples of it."""
        return self.hop_length * self.patch_frames

    def at_samples(self, num_samples: int) -> AudioMelTokenizer:
        """The same tokenizer for clips of `num_samples` samples (another duration), sharing
        its transforms.

        Args:
            num_samples: The new clip length, a whole number of `samples_per_patch`.

        Returns:
            This tokenizer when the length is unchanged, otherwise a shallow copy at the new length.

        Raises:
            ValueError: `num_samples` is not a positive multiple of `samples_per_patch`.
        """
        if num_samples == self.num_samples:
            return self
        if num_samples < self.samples_per_patch or num_samples % self.samples_per_patch:
            seconds = self.samples_per_patch / self.sample_rate
            raise ValueError(
                f"an audio clip of {num_samples} samples ({num_samples / self.sample_rate:g} s) is "
                f"not a whole number of tokenizer.audio time patches ({self.samples_per_patch} "
                f"samples = {seconds:g} s at {self.sample_rate} Hz); use durations that are "
                f"multiples of {seconds:g} s"
            )
        other = copy.copy(self)  # shallow: the mel, inverse-mel and Griffin-Lim modules are shared
        other.num_samples = num_samples
        other.frames = num_samples // self.hop_length
        other.grid = (other.frames // self.patch_frames, self.grid[1])
        return other

    def at_duration(self, seconds: float) -> AudioMelTokenizer:
        """The same tokenizer for clips of `seconds` (e.g. to sample another duration).

        Args:
            seconds: The new clip duration, a whole number of time patches.

        Returns:
            The tokenizer of `at_samples` for that many samples.
        """
        return self.at_samples(round(seconds * self.sample_rate))

    at_length = at_duration  # length buckets are in seconds for audio (data.dataset.durations)

    def log_mel(self, wave: Tensor) -> Tensor:
        """wave: [B, 1, S] or [B, S] -> normalised log-mel [B, n_mels, frames] (silence -1, loud
        about +1).

        Args:
            wave: [B, 1, S] or [B, S] mono waves of this tokenizer's length.

        Returns:
            [B, n_mels, frames] log-mel spectrogram in about [-1, 1], computed in float32.
        """
        wave = as_mono_batch(wave, self.num_samples, "audio tokenizer")
        with torch.autocast(wave.device.type, enabled=False):
            mel = self.mel(wave)[
                ..., : self.frames
            ]  # centred STFT frames, the last one (past the end) dropped
            return (
                2
                * (torch.log(mel + self.floor) - self.log_floor)
                / (self.log_ceiling - self.log_floor)
                - 1
            )

    def encode(self, wave: Tensor) -> Tokens:
        """wave: [B, 1, S] or [B, S]; S may differ from the configured duration (duration buckets)
        when it is a whole number of time patches: the token count follows it.

        Args:
            wave: [B, 1, S] or [B, S] mono waves.

        Returns:
            Tokens with x: [B, (frames/pf)(n_mels/pm), pf pm] and ids (t, h, 0, 0).
        """
        tokenizer = self.at_samples(wave.shape[-1])
        spec = tokenizer.log_mel(wave)
        x = rearrange(
            spec, "b (h q) (t p) -> b (t h) (p q)", p=self.patch_frames, q=self.patch_mels
        )
        return Tokens(
            x=x, pos=tokenizer.positions(spec.shape[0], spec.device), modality=self.modality
        )

    def tokens_to_log_mel(self, x: Tensor) -> Tensor:
        """x: [B, N, pf pm] -> normalised log-mel [B, n_mels, frames].

        Args:
            x: [B, N, pf pm] tokens of this tokenizer's duration.

        Returns:
            [B, n_mels, frames] normalised log-mel spectrogram.
        """
        t, h = self.grid
        return rearrange(
            x, "b (t h) (p q) -> b (h q) (t p)", t=t, h=h, p=self.patch_frames, q=self.patch_mels
        )

    def decode(self, x: Tensor) -> Tensor:
        """x: [B, N, pf pm] -> waves [B, S] with peaks <= PEAK_LIMIT (mel inversion + Griffin-Lim);
        S follows N (duration buckets).

        Args:
            x: [B, N, pf pm] tokens, N a whole number of time patches.

        Returns:
            [B, S] waves, S = the time patches times `samples_per_patch`.

        Raises:
            ValueError: N is not a whole number of time patches.
        """
        time_patches, bands = divmod(x.shape[1], self.grid[1])
        if bands or not time_patches:
            raise ValueError(
                f"{x.shape[1]} audio tokens are not whole time patches of {self.grid[1]} tokens"
            )
        tokenizer = self.at_samples(time_patches * self.samples_per_patch)
        spec = torch.nan_to_num(tokenizer.tokens_to_log_mel(x.float()), nan=-1.0).clamp(-1.0, 1.0)
        with torch.autocast(x.device.type, enabled=False):
            log_mel = (spec + 1) / 2 * (self.log_ceiling - self.log_floor) + self.log_floor
            mel = (torch.exp(log_mel) - self.floor).clamp_min(0)
            mel = torch.cat(
                [mel, mel[..., -1:]], dim=-1
            )  # the dropped last STFT frame, so lengths line up
            magnitude = self.inverse_mel(mel)  # [B, n_fft / 2 + 1, frames + 1]
            if tokenizer.num_samples == self.griffin_lim.length:
                return limit_peak(self.griffin_lim(magnitude))
            g = self.griffin_lim
            return limit_peak(
                import_torchaudio().functional.griffinlim(
                    magnitude,
                    g.window,
                    g.n_fft,
                    g.hop_length,
                    g.win_length,
                    g.power,
                    g.n_iter,
                    g.momentum,
                    tokenizer.num_samples,
                    g.rand_init,
                )
            )

    def positions(self, batch_size: int, device=None) -> Tensor:
        """ids (t, h, 0, 0): t = time patch, h = frequency patch.

        Args:
            batch_size: B, the number of samples.
            device (torch.device | str | None): Where the ids are made; None for the default device.

        Returns:
            [B, N, 4] long ids, row-major over (time patch, frequency patch).
        """
        return grid_positions(*self.grid, 1, batch_size, device)
