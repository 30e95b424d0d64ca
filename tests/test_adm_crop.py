"""The ADM centre crop (data.dataset.crop=adm): box halvings, a bicubic resize to the size, the
centre square."""

import numpy as np
import pytest
import torch
from PIL import Image

from selfflow.data.folders.adm_crop import adm_center_crop
from selfflow.data.folders.image_folder import ImageFolder, load_image


def blocky_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 [H, W]: constant 2x2 blocks of multiples of 4, so that two box halvings are exact
    4x4 means."""
    values = np.random.default_rng(seed).integers(0, 64, (height // 2, width // 2)) * 4
    return np.kron(values, np.ones((2, 2), dtype=np.int64)).astype(np.uint8)


def test_two_box_halvings_then_the_centre_square_of_a_known_image():
    pixels = blocky_image(
        32, 64
    )  # smaller side 32 >= 2 * 8, 16 >= 2 * 8, then 8: two halvings, no resize
    out = np.asarray(adm_center_crop(Image.fromarray(pixels), 8))
    # 4x4 means of the original columns 16..47 (the centre 8 of the 16 halved columns)
    expected = pixels[:, 16:48].reshape(8, 4, 8, 4).mean(axis=(1, 3))
    np.testing.assert_array_equal(out, expected)


def test_bicubic_resize_to_the_smaller_side_then_the_centre():
    ramp = np.tile(np.arange(50, dtype=np.uint8) * 5, (30, 1))  # columns 0, 5, 10, ... 245
    out = adm_center_crop(
        Image.fromarray(ramp), 16
    )  # 30 < 2 * 16: no halving; 50x30 -> 27x16; left = 5
    assert out.size == (16, 16)
    resized = Image.fromarray(ramp).resize((27, 16), Image.BICUBIC)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(resized)[:, 5:21])
    columns = np.asarray(out)[8]
    assert 0 < columns[0] < columns[-1] < 245  # the middle of the ramp, increasing


def test_image_folder_crop_adm_loads_the_adm_crop(tmp_path):
    pixels = blocky_image(32, 64, seed=1)
    (tmp_path / "train" / "a").mkdir(parents=True)
    Image.fromarray(np.stack([pixels] * 3, -1)).save(tmp_path / "train" / "a" / "0.png")
    folder = ImageFolder(str(tmp_path), "train", image_size=8, crop="adm")
    image, _ = folder[0]
    expected = (
        torch.from_numpy(pixels[:, 16:48].reshape(8, 4, 8, 4).mean(axis=(1, 3))).float() / 255
    )
    torch.testing.assert_close(image, expected.expand(3, 8, 8))
    centre = load_image(
        tmp_path / "train" / "a" / "0.png", 8, 3
    )  # the default crop differs on this image
    assert not torch.equal(centre, image)
    with pytest.raises(
        ValueError, match="data.dataset.crop='middle' is unknown; choose one of center, adm"
    ):
        ImageFolder(str(tmp_path), "train", image_size=8, crop="middle")


def test_image_shards_crop_adm_like_the_folder(tmp_path):
    from selfflow.cli.shards import main as shards_main
    from selfflow.data.shards.dataset import ImageShards

    pixels = np.stack([blocky_image(32, 64, seed=2)] * 3, -1)
    (tmp_path / "images" / "a").mkdir(parents=True)
    for name in ("0.png", "1.png"):  # one goes to the test split
        Image.fromarray(pixels).save(tmp_path / "images" / "a" / name)
    shards_main(
        [
            "write",
            str(tmp_path / "images"),
            str(tmp_path / "shards"),
            "--modality",
            "image",
            "--splits",
            "train",
        ]
    )
    folder = ImageFolder(str(tmp_path / "images"), "train", image_size=8, crop="adm")
    shards = ImageShards(str(tmp_path / "shards"), "train", image_size=8, crop="adm")
    torch.testing.assert_close(shards[0][0], folder[0][0])
