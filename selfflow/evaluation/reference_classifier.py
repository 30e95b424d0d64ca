"""A small local reference classifier whose penultimate features define the space for
sample metrics.

Trained once per labelled dataset (`selfflow-reference`) and saved as `model.safetensors` +
`config.json`, so that Frechet distance and classifier accuracy of class-conditional samples need no
downloaded network. For audio the same CNN reads a fixed log-mel image of each waveform
(`MelImage`), and for video the frames stacked as channels (`FrameStack`, so the first convolution
sees the motion), so generated recordings and clips are judged like generated images. Any other
local extractor with `features(images) -> [B, D]` (and optionally `logits(images)`) plugs into
`selfflow.evaluation.sample_metrics` by a Hydra `_target_`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange, reduce
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from selfflow.io.safe_files import replace_atomically, write_json_atomically

WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"


def conv_block(channels_in: int, channels_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels_in, channels_out, 3, padding=1),
        nn.GroupNorm(min(8, channels_out), channels_out),
        nn.ReLU(),
    )


def match_images(images: Tensor, channels: int, image_size: int) -> Tensor:
    """images: [B, C, H, W] in [0, 1] -> [B, channels, image_size, image_size] (grey <-> RGB,
    bilinear resize)."""
    if images.shape[1] != channels:
        if images.shape[1] == 1:
            images = images.expand(-1, channels, -1, -1)
        elif channels == 1:
            images = images.mean(1, keepdim=True)
        else:
            raise ValueError(
                f"the reference classifier takes {channels}-channel images, got {images.shape[1]}"
            )
    if images.shape[-2:] != (image_size, image_size):
        images = F.interpolate(
            images.float(),
            size=(image_size, image_size),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )
    return images


class MelImage(nn.Module):
    """Waves [B, S] or [B, 1, S] -> log-mel images [B, 1, n_mels, frames] in [0, 1] (a fixed
    transform, no weights): magnitudes mapped by log(mel + 1e-4), with log(1e-4) -> 0 and log(100)
    -> 1, clamped."""

    LOG_FLOOR, LOG_CEILING = math.log(1e-4), math.log(100.0)

    def __init__(self, sample_rate: int, num_samples: int, n_mels: int = 32, frames: int = 64):
        super().__init__()
        import torchaudio

        self.sample_rate, self.num_samples, self.n_mels, self.frames = (
            sample_rate,
            num_samples,
            n_mels,
            frames,
        )
        hop = max(1, num_samples // frames)
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate, n_fft=max(64, 4 * hop), hop_length=hop, n_mels=n_mels, power=1.0
        )

    def forward(self, waves: Tensor) -> Tensor:
        if waves.ndim == 3:
            waves = waves[:, 0]
        if waves.ndim != 2 or waves.shape[1] != self.num_samples:
            raise ValueError(
                f"the audio reference classifier takes waves [B, {self.num_samples}] "
                f"({self.num_samples / self.sample_rate:g} s at {self.sample_rate} Hz), got "
                f"{list(waves.shape)}"
            )
        log_mel = torch.log(self.mel(waves.float()) + 1e-4)[
            :, None, :, : self.frames
        ]  # [B, 1, n_mels, frames]
        return ((log_mel - self.LOG_FLOOR) / (self.LOG_CEILING - self.LOG_FLOOR)).clamp(0, 1)

    def pool(self, features: Tensor) -> Tensor:
        return features

    def config(self) -> dict[str, Any]:
        return {
            "sample_rate": self.sample_rate,
            "num_samples": self.num_samples,
            "n_mels": self.n_mels,
            "frames": self.frames,
        }


class FrameStack(nn.Module):
    """Clips [B, T, C, H, W] -> images [B, T C, H, W]: the frames as channels (a fixed transform, no
    weights), so the first convolution sees the motion. `pool` leaves the features as they are."""

    def __init__(self, num_frames: int):
        super().__init__()
        self.num_frames = num_frames

    def check(self, clips: Tensor) -> None:
        if clips.ndim != 5 or clips.shape[1] != self.num_frames:
            raise ValueError(
                f"the video reference classifier takes clips [B, {self.num_frames}, C, H, "
                f"W], got {list(clips.shape)}"
            )

    def forward(self, clips: Tensor) -> Tensor:
        self.check(clips)
        return rearrange(clips, "b t c h w -> b (t c) h w")

    def pool(self, features: Tensor) -> Tensor:
        return features

    def config(self) -> dict[str, Any]:
        return {"num_frames": self.num_frames}


class EachFrame(FrameStack):
    """Clips [B, T, C, H, W] -> images [B T, C, H, W]: every frame read alone, and `pool` averages
    the frames' features [B T, D] -> [B, D], so a clip is judged by what all its frames show (what
    it depicts, not how it moves)."""

    def forward(self, clips: Tensor) -> Tensor:
        self.check(clips)
        return rearrange(clips, "b t c h w -> (b t) c h w")

    def pool(self, features: Tensor) -> Tensor:
        return reduce(features, "(b t) d -> b d", "mean", t=self.num_frames)

    def config(self) -> dict[str, Any]:
        return {"num_frames": self.num_frames, "frames": "each"}


VIDEO_FRONTS = {
    "stacked": FrameStack,
    "each": EachFrame,
}  # video={"frames": ...}: how a clip's frames are read


def video_front(num_frames: int, frames: str = "stacked") -> FrameStack:
    if frames not in VIDEO_FRONTS:
        raise ValueError(
            f"video frames={frames!r} is unknown; choose one of {sorted(VIDEO_FRONTS)}"
        )
    return VIDEO_FRONTS[frames](num_frames)


class ReferenceCNN(nn.Module):
    """Compact CNN: three conv stages (width, 2 width, 4 width), global average pool -> features [B,
    4 width] -> linear classifier. Takes [B, C, H, W] in [0, 1]; other sizes and grey/RGB are
    adapted on the way in. audio: `MelImage` settings (waves in, instead of images); video:
    `video_front` settings (clips in): frames "stacked" as channels (then `channels` is frames x
    clip channels) or "each" read alone and pooled.
    """

    def __init__(
        self,
        num_classes: int,
        channels: int = 1,
        image_size: int = 16,
        width: int = 16,
        class_names: list[str] | None = None,
        audio: dict[str, int] | None = None,
        video: dict[str, Any] | None = None,
    ):
        super().__init__()
        if audio and video:
            raise ValueError(
                "a reference classifier reads waves (audio) or clips (video), not both"
            )
        self.front = MelImage(**audio) if audio else video_front(**video) if video else None
        self.modality = "audio" if audio else "video" if video else "image"
        if num_classes < 2:
            raise ValueError(
                f"a reference classifier needs a labelled dataset with >= 2 "
                f"classes, got {num_classes}"
            )
        self.num_classes, self.channels, self.image_size, self.width = (
            num_classes,
            channels,
            image_size,
            width,
        )
        self.class_names = list(class_names or [str(i) for i in range(num_classes)])
        self.body = nn.Sequential(
            conv_block(channels, width),
            conv_block(width, width),
            nn.AvgPool2d(2),
            conv_block(width, 2 * width),
            conv_block(2 * width, 2 * width),
            nn.AvgPool2d(2),
            conv_block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, num_classes)

    @property
    def feature_dim(self) -> int:
        return 4 * self.width

    def prepare(self, inputs: Tensor) -> Tensor:
        """Images [B, C, H, W] in [0, 1] (waves [B, (1,) S] for audio, clips [B, T, C, H, W] for
        video) -> [B', channels, S, S] in [0, 1] (B' = B T for frames read each alone)."""
        inputs = inputs.to(self.head.weight.device, torch.float32)
        return self.prepare_images(self.front(inputs) if self.front is not None else inputs)

    def prepare_images(self, images: Tensor) -> Tensor:
        """Images [B, C, H, W] as the front gives them (or single frames) -> [B, channels, S, S]."""
        return match_images(
            images.to(self.head.weight.device, torch.float32), self.channels, self.image_size
        )

    def features_of_prepared(self, images: Tensor) -> Tensor:
        """images: [B', channels, S, S] as `prepare` gives them -> features [B, 4 width] (a clip's
        frames read alone are pooled into one)."""
        features = self.body(images * 2 - 1)
        return features if self.front is None else self.front.pool(features)

    def features(self, inputs: Tensor) -> Tensor:
        """Images [B, C, H, W] in [0, 1] (waves for audio, clips for video) -> [B, 4 width]."""
        return self.features_of_prepared(self.prepare(inputs))

    def logits(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))

    forward = logits

    def config(self) -> dict[str, Any]:
        return {
            "architecture": "ReferenceCNN",
            "num_classes": self.num_classes,
            "channels": self.channels,
            "image_size": self.image_size,
            "width": self.width,
            "class_names": self.class_names,
            "modality": self.modality,
            **{
                kind: self.front.config() if self.modality == kind else None
                for kind in ("audio", "video")
            },
        }

    def save(self, folder: str | os.PathLike, **info: Any) -> Path:
        """`folder/model.safetensors` + `folder/config.json` (the architecture plus any `info`)."""
        from safetensors.torch import save

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous().cpu() for k, v in self.state_dict().items()}
        with replace_atomically(folder / WEIGHTS_FILE) as file:
            file.write(save(state))
        write_json_atomically(folder / CONFIG_FILE, {**self.config(), **info})
        return folder


def load_reference_classifier(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> ReferenceCNN:
    """The classifier saved by `ReferenceCNN.save` (a folder with model.safetensors and
    config.json), in eval mode."""
    from safetensors.torch import load_file

    folder = Path(path).expanduser()
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(
            f"reference={folder} is not a reference classifier folder (needs {CONFIG_FILE} and "
            f"{WEIGHTS_FILE}); make one with selfflow-reference out={folder}"
        )
    config = json.loads((folder / CONFIG_FILE).read_text())
    if config.get("architecture") != "ReferenceCNN":
        raise ValueError(
            f"{folder / CONFIG_FILE} describes architecture {config.get('architecture')!r}, not "
            f"ReferenceCNN; plug other extractors in with feature_extractor._target_"
        )
    model = ReferenceCNN(
        config["num_classes"],
        config["channels"],
        config["image_size"],
        config["width"],
        config.get("class_names"),
        config.get("audio"),
        config.get("video"),
    )
    try:
        model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    except RuntimeError as error:
        raise ValueError(
            f"{folder / WEIGHTS_FILE} does not fit the architecture in {CONFIG_FILE}: {error}"
        ) from error
    return model.to(device).eval()


def random_shift(images: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate a batch by up to `max_shift` pixels (edge padding): cheap augmentation
    against overfitting."""
    if max_shift == 0:
        return images
    dy, dx = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=generator))
    padded = F.pad(images, (max_shift,) * 4, mode="replicate")
    h, w = images.shape[-2:]
    return padded[..., max_shift + dy : max_shift + dy + h, max_shift + dx : max_shift + dx + w]


class FramesOf(Dataset):
    """The frames of a clip dataset as samples of their own: item i is frame i % T of clip i // T
    ([C, H, W]), labelled as its clip."""

    def __init__(self, clips: Dataset, num_frames: int):
        self.clips, self.num_frames = clips, num_frames

    def __len__(self) -> int:
        return len(self.clips) * self.num_frames

    def __getitem__(self, i: int):
        clip, label = self.clips[i // self.num_frames]
        return clip[i % self.num_frames], label


@torch.no_grad()
def accuracy(model: ReferenceCNN, dataset: Dataset, batch_size: int = 256) -> float:
    model.eval()
    correct = total = 0
    for images, labels in DataLoader(dataset, batch_size=batch_size):
        correct += int((model.logits(images).argmax(-1).cpu() == torch.as_tensor(labels)).sum())
        total += len(labels)
    return correct / max(total, 1)


def train_reference_classifier(
    train_set: Dataset,
    test_set: Dataset | None,
    num_classes: int,
    channels: int,
    image_size: int,
    width: int = 16,
    epochs: int = 15,
    batch_size: int = 32,
    lr: float = 2e-3,
    max_shift: int = 1,
    seed: int = 0,
    device: str = "cpu",
    class_names: list[str] | None = None,
    log=print,
    audio: dict[str, int] | None = None,
    video: dict[str, int] | None = None,
) -> tuple[ReferenceCNN, float | None]:
    """Train a `ReferenceCNN` with AdamW and a cosine schedule; returns it (eval mode) and its
    test accuracy.

    audio: `MelImage` settings when the datasets give waves (then `channels` is 1 and
    `image_size` the square the log-mel image is resized to); video: `video_front` settings when
    they give clips (frames read "each" alone are learnt as samples of their own: then
    `batch_size` counts frames)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = ReferenceCNN(num_classes, channels, image_size, width, class_names, audio, video).to(
        device
    )
    prepare = model.prepare
    if isinstance(
        model.front, EachFrame
    ):  # learn from frames of many clips per batch (a batch of a few clips'
        train_set = FramesOf(
            train_set, model.front.num_frames
        )  # frames barely learns), judge whole clips
        prepare = model.prepare_images
    loader = DataLoader(
        train_set,
        batch_size=batch_size,
        shuffle=True,
        drop_last=len(train_set) > batch_size,
        generator=generator,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, epochs * len(loader)))
    for epoch in range(epochs):
        model.train()
        for images, labels in loader:
            images = random_shift(prepare(images), max_shift, generator)
            logits = model.head(model.body(images * 2 - 1))
            loss = F.cross_entropy(logits, torch.as_tensor(labels, device=device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        log(f"epoch {epoch + 1}/{epochs}: train loss {loss.item():.4f}")
    test_accuracy = accuracy(model, test_set) if test_set is not None and len(test_set) else None
    return model.eval(), test_accuracy


def reference_input(
    dataset: Dataset, modality: str, video_frames: str = "stacked"
) -> dict[str, Any]:
    """What the classifier reads, from the dataset's own geometry: images as they are ([C, S, S]);
    recordings as a fixed 32 x 32 log-mel image of `num_samples` at `sample_rate` (`MelImage`);
    clips with their frames stacked as channels ([T C, S, S], `FrameStack`: motion) or,
    video_frames="each", every frame alone ([C, S, S], `EachFrame`: what the frames show)."""
    if modality == "image":
        return {"channels": int(dataset.channels), "image_size": int(dataset.image_size)}
    if modality == "audio":
        return {
            "channels": 1,
            "image_size": 32,
            "audio": {
                "sample_rate": int(dataset.sample_rate),
                "num_samples": int(dataset.num_samples),
            },
        }
    if modality == "video":
        front = video_front(int(dataset.num_frames), video_frames)
        frames_in_channels = 1 if isinstance(front, EachFrame) else int(dataset.num_frames)
        return {
            "channels": frames_in_channels * int(dataset.channels),
            "image_size": int(dataset.image_size),
            "video": front.config(),
        }
    raise ValueError(
        f"the reference classifier judges images, video or audio; this data gives {modality!r} "
        f"samples (for a multi-modal run pick one: experiment=digits, video_digits or audio_digits)"
    )
