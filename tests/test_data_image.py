import pytest
import torch

from selfflow.data.batching.collate import collate_samples
from selfflow.data.builtin.digits import DigitImages
from selfflow.data.folders.image_folder import ImageFolder
from selfflow.io.bad_files import BadFileError
from tests.helpers.configs import shared_dataset
from tests.helpers.files import write_folder


def test_builtin_digits_are_real_labelled_images_with_disjoint_splits():
    train, test = DigitImages("train", image_size=16), DigitImages("test", image_size=16)
    assert len(train) + len(test) == 1797
    image, _label = train[0]
    assert image.shape == (1, 16, 16) and image.min() >= 0 and image.max() <= 1
    assert set(train.labels.tolist()) == set(range(10))
    # no test image also appears in train
    flat_train = {tuple(x.flatten().tolist()) for x in train.images[:, :, ::2, ::2]}
    overlap = sum(tuple(x.flatten().tolist()) in flat_train for x in test.images[:, :, ::2, ::2])
    assert overlap < 5  # the original set holds a handful of exact duplicates
    assert DigitImages("train", image_size=8, channels=3)[0][0].shape == (3, 8, 8)


def test_image_folder_labels_resizes_and_crops(tmp_path):
    write_folder(tmp_path)
    train = ImageFolder(str(tmp_path), "train", image_size=8, test_fraction=0.34)
    test = ImageFolder(str(tmp_path), "test", image_size=8, test_fraction=0.34)
    assert train.class_names == ["cat", "dog"] and train.num_classes == 2
    assert len(train) + len(test) == 6 and set(train.paths).isdisjoint(test.paths)
    image, label = train[0]
    assert image.shape == (3, 8, 8)
    expected = (40 * label + 10 * int(train.paths[0].stem)) / 255
    assert torch.allclose(image, torch.full_like(image, expected), atol=1 / 255)


def test_image_folder_skips_a_corrupt_file_and_records_it(tmp_path):
    write_folder(tmp_path / "d")
    (tmp_path / "d" / "cat" / "broken.png").write_bytes(b"not a png at all")
    record = tmp_path / "skipped.tsv"
    dataset = ImageFolder(str(tmp_path / "d"), "train", image_size=8, test_fraction=0.1)
    dataset.bad_files.record_path = record
    broken = next(i for i, p in enumerate(dataset.paths) if p.name == "broken.png")
    assert dataset[broken] is None
    batch = collate_samples("image")([dataset[i] for i in range(len(dataset))])
    assert batch["data"].shape[0] == len(dataset) - 1
    assert "broken.png" in record.read_text() and "UnidentifiedImageError" in record.read_text()
    strict = ImageFolder(
        str(tmp_path / "d"), "train", image_size=8, test_fraction=0.1, on_bad_file="error"
    )
    with pytest.raises(BadFileError, match="broken.png"):
        strict[broken]


def test_image_folder_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.root=.*nowhere"):
        ImageFolder(str(tmp_path / "nowhere"))
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "a" / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no files with extensions"):
        ImageFolder(str(tmp_path / "empty"))


def test_image_folder_on_real_cifar_photos():
    root = shared_dataset("cifar10-small")
    train = ImageFolder(str(root), "train", image_size=32)
    test = ImageFolder(str(root), "test", image_size=32)
    assert len(train) == 10000 and len(test) == 2000 and train.num_classes == 10
    assert train.class_names[0] == "airplane"
    images = torch.stack([test[i][0] for i in range(0, 2000, 200)])
    assert images.shape == (10, 3, 32, 32)
    assert images.std() > 0.1  # real photos, not blank
    assert [test[i][1] for i in range(0, 2000, 200)] == list(range(10))
