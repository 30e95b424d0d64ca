"""The standard FID InceptionV3 (TensorFlow's 2015-12-05 graph, ported to PyTorch) from a local
weights file, with the three outputs that the ADM evaluation suite reads: pool_3, the spatial map
`mixed_6/conv`, and the logits.

The network, its TensorFlow-1-exact bilinear resize to 299x299 and its input scaling `(x - 128) /
128` are torch-fidelity's (`FeatureExtractorInceptionV3`); this module loads the weights safely and
taps the spatial map. Nothing is ever downloaded: the library's download path needs a `None` weights
path, which is never passed.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from torch import Tensor

# pytorch-fid's name; torch-fidelity's holds the same tensors
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_SHA256_PREFIX = (
    "6726825d"  # the hash in the file names (torch hub's <name>-<sha256 prefix>.pth)
)
# TF node `mixed_6/conv` is the ReLU output of the 1x1 branch of the seventh mixed block (mixed,
# mixed_1..mixed_10 are Mixed_5b..5d, 6a..6e, 7a..7c): [N, 192, 17, 17], of which ADM keeps the
# first 7 channels
SPATIAL_MODULE = "Mixed_6d.branch1x1"
SPATIAL_CHANNELS = 7
POOL_DIM, SPATIAL_DIM, LOGITS_DIM = 2048, SPATIAL_CHANNELS * 17 * 17, 1008
WEIGHTS_HINT = (
    f"it must be the FID Inception weights {WEIGHTS_FILE} (pytorch-fid's file; torch-fidelity's "
    f"weights-inception-2015-12-05-6726825d.pth also works); see docs/evaluation.md to get it"
)


@dataclass
class InceptionFeatures:
    """What the ADM suite computes per image, in float32 on the CPU."""

    pool: Tensor  # [N, 2048] pool_3: FID, precision and recall
    # [N, 2023] mixed_6/conv[..., :7] flattened in (h, w, c) order as ADM's NHWC reshape: sFID
    spatial: Tensor
    logits: (
        Tensor  # [N, 1008] pool_3 @ W.T without the bias, as ADM's softmax graph: Inception Score
    )

    @classmethod
    def concat(cls, parts: list[InceptionFeatures]) -> InceptionFeatures:
        return cls(
            *(
                torch.cat([getattr(p, name) for p in parts])
                for name in ("pool", "spatial", "logits")
            )
        )

    def __len__(self) -> int:
        return len(self.pool)


@contextmanager
def full_float32() -> Iterator[None]:
    """Convolutions and matrix products in true float32 (no TF32 on Ampere and later GPUs), as the
    reference TensorFlow graph computed them; the previous setting is restored afterwards."""
    conv, matmul = (
        torch.backends.cudnn.conv.fp32_precision,
        torch.backends.cuda.matmul.fp32_precision,
    )
    torch.backends.cudnn.conv.fp32_precision = torch.backends.cuda.matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = (
            conv,
            matmul,
        )


class InceptionExtractor:
    """`extractor(images: uint8 [B, H, W, 3])` -> InceptionFeatures of the batch; any H, W (resized
    to 299)."""

    def __init__(self, network: torch.nn.Module, weights: Path, sha256: str, device: torch.device):
        self.network = network.to(device).eval()
        self.weights, self.sha256, self.device = weights, sha256, device
        self._spatial: list[Tensor] = []
        self.network.get_submodule(SPATIAL_MODULE).register_forward_hook(self._keep_spatial)

    @property
    def is_standard(self) -> bool:
        """Whether the file's content hash is the one in the standard file's name (numbers
        comparable to papers)."""
        return self.sha256.startswith(WEIGHTS_SHA256_PREFIX)

    def _keep_spatial(self, _module, _inputs, output: Tensor) -> None:
        # output: [B, 192, 17, 17] -> [B, 17 * 17 * 7]
        self._spatial.append(
            rearrange(output[:, :SPATIAL_CHANNELS], "b c h w -> b (h w c)").float().cpu()
        )

    @torch.no_grad()
    def __call__(self, images: np.ndarray | Tensor) -> InceptionFeatures:
        pixels = rearrange(torch.as_tensor(np.array(images)), "b h w c -> b c h w").to(
            self.device
        )  # [B, 3, H, W]
        self._spatial.clear()
        with full_float32():
            pool, logits = self.network(pixels)
        return InceptionFeatures(pool.float().cpu(), self._spatial.pop(), logits.float().cpu())


def read_weights(path: str | os.PathLike) -> dict[str, Tensor]:
    """The file's tensors, unpickled with weights_only=True: a file that holds code is refused,
    never run."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"inception={path}: no such file; {WEIGHTS_HINT}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = " ".join(str(error).split())[:120]
        raise ValueError(
            f"inception={path} is not a safe PyTorch weights file ({type(error).__name__}: "
            f"{reason}); {WEIGHTS_HINT}"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"inception={path} holds no state dict of tensors; {WEIGHTS_HINT}")
    return state


def load_inception(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> InceptionExtractor:
    """The FID InceptionV3 with the weights of `path` (pytorch-fid's or torch-fidelity's file).

    A missing file, a file that is not a state dict, or one whose keys or shapes are not the
    network's ends in one line naming the expected file.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from selfflow.io.digests import file_digest

    path = Path(path).expanduser()
    state = read_weights(path)
    # the library unpickles its weights with weights_only=False: it only ever sees bytes serialised
    # here from the tensors read safely above
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    try:
        network = FeatureExtractorInceptionV3(
            "inception-v3-compat",
            ["2048", "logits_unbiased"],
            feature_extractor_weights_path=buffer,
        )
    except RuntimeError as error:  # load_state_dict: missing or unexpected keys, wrong shapes
        reason = " ".join(str(error).split())[:200]
        raise ValueError(
            f"inception={path} does not fit the FID InceptionV3 ({reason}...); {WEIGHTS_HINT}"
        ) from None
    return InceptionExtractor(network, path, file_digest(path), torch.device(device))
