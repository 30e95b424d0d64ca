"""Stand-ins for the evaluation's input files (the real Inception weights cannot be downloaded here)
and images with some structure, shared by the FID tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def random_inception_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """The FID InceptionV3's tensors (torchvision's Inception3 with 1,008 classes and no auxiliary
    head, the module names pytorch-fid's and torch-fidelity's files use), He-initialised so that
    activations stay O(1)."""
    import torchvision

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        network = torchvision.models.inception_v3(
            weights=None, aux_logits=False, num_classes=1008, init_weights=False
        )
        for module in network.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    # converted TensorFlow weights carry no BatchNorm step counters
    return {k: v for k, v in network.state_dict().items() if not k.endswith("num_batches_tracked")}


def write_inception_file(folder: Path) -> Path:
    """A stand-in for the FID Inception weights file: same architecture, tensor names and file name,
    random weights."""
    from selfflow.evaluation.inception import WEIGHTS_FILE

    path = Path(folder) / WEIGHTS_FILE
    torch.save(random_inception_state(), path)
    return path


def smooth_images(n: int, size: tuple[int, int] = (32, 32), seed: int = 0) -> np.ndarray:
    """uint8 [n, h, w, 3]: blurry colour fields, unlike each other and unlike noise."""
    coarse = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    fine = torch.nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
    return (fine * 255).round().byte().permute(0, 2, 3, 1).numpy()
