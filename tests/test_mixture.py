"""Joint training data: modality mixtures per step and packed, resumable, with the checks named
by key."""

from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import Dataset

from selfflow.data.batching.mixture import check_pack_length, pack_groups
from selfflow.tokenizers.image import ImagePatchTokenizer
from selfflow.training.datamodule import SelfFlowDataModule
from selfflow.training.mixture import MixtureDataModule


class Constant(Dataset):
    """n items whose data is the item's index, so batches can be traced back to samples."""

    num_classes = 3

    def __init__(self, n: int, shape=(1, 4, 4)):
        self.n, self.shape = n, shape

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.full(self.shape, float(i)), i % 3


def sources():
    image = SelfFlowDataModule.from_splits(Constant(40), Constant(8), "image", batch_size=4)
    audio = SelfFlowDataModule.from_splits(
        Constant(12, (1, 2, 8)), Constant(4, (1, 2, 8)), "audio", batch_size=4
    )
    return {"image": image, "audio": audio}


def batches(data, count):
    loader = data.train_dataloader()
    it = iter(loader)
    return [next(it) for _ in range(count)]


def test_per_step_mode_draws_one_modality_per_batch_by_weight():
    data = MixtureDataModule(
        sources(), {"image": 0.75, "audio": 0.25}, {"image": 4, "audio": 2}, batches_per_epoch=400
    )
    drawn = batches(data, 400)
    modalities = [b["modality"] for b in drawn]
    assert set(modalities) == {"image", "audio"}
    assert 0.68 < modalities.count("image") / 400 < 0.82
    assert all(b["data"].shape[0] == (4 if b["modality"] == "image" else 2) for b in drawn)
    # a modality's stream covers its dataset before repeating
    seen = torch.cat([b["data"][:, 0, 0, 0] for b in drawn if b["modality"] == "audio"])[:12]
    assert sorted(seen.long().tolist()) == list(range(12))


def test_mixture_order_is_a_function_of_seed_and_position():
    first = batches(
        MixtureDataModule(sources(), {"image": 1, "audio": 1}, 4, seed=3, batches_per_epoch=10), 6
    )
    resumed_data = MixtureDataModule(
        sources(), {"image": 1, "audio": 1}, 4, seed=3, batches_per_epoch=10
    )
    resumed_data.load_state_dict({"epoch": 0, "batches_done": 4})
    resumed = batches(resumed_data, 2)
    for a, b in zip(first[4:], resumed):
        assert a["modality"] == b["modality"] and torch.equal(a["data"], b["data"])


@pytest.mark.parametrize(
    "mode, batch_size", [("per_step", {"image": 4, "audio": 2}), ("packed", 6)]
)
def test_every_rank_draws_the_same_modalities_from_its_own_samples(mode, batch_size):
    """One modality per global batch (per_step) or the same count of each per rank (packed): the
    draw does not depend on the rank, the samples do."""
    data = MixtureDataModule(
        sources(), {"image": 0.75, "audio": 0.25}, batch_size, mode=mode, batches_per_epoch=30
    )
    ranks = []
    for rank in (0, 1):
        data.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        ranks.append(batches(data, 30))
    for a, b in zip(*ranks):
        counts = [
            {
                m: len(g["label"])
                for m, g in (x["groups"] if "groups" in x else {x["modality"]: x}).items()
            }
            for x in (a, b)
        ]
        assert counts[0] == counts[1]
    per_step_modalities = {b["modality"] for b in ranks[0]}
    assert per_step_modalities >= ({"image", "audio"} if mode == "per_step" else {"mixed"})

    def images(batch):  # the image samples' indices (their data is the index)
        group = (
            batch["groups"].get("image")
            if "groups" in batch
            else batch
            if batch["modality"] == "image"
            else None
        )
        return [] if group is None else group["data"][:, 0, 0, 0].long().tolist()

    first_pass = [
        [i for b in rank for i in images(b)][:20] for rank in ranks
    ]  # 40 images: 20 a rank a pass
    assert len(first_pass[1]) == 20 and sorted(first_pass[0] + first_pass[1]) == list(range(40))


def test_packed_mode_mixes_modalities_and_packs_them_into_rows():
    data = MixtureDataModule(
        sources(), {"image": 1, "audio": 1}, 8, mode="packed", pack_length=32, batches_per_epoch=5
    )
    batch = next(b for b in batches(data, 5) if b["modality"] == "mixed")
    assert set(batch["groups"]) == {"image", "audio"} and batch["pack_length"] == 32
    tokenizers = {"image": ImagePatchTokenizer(2, 1, 4), "audio": ImagePatchTokenizer(2, 1, (2, 8))}
    tokenizers["audio"].modality = "audio"
    packed = pack_groups(batch["groups"], tokenizers, 32, null_label=3)
    assert packed.num_tokens == sum(g["data"].shape[0] for g in batch["groups"].values()) * 4
    assert set(packed.modality_masks) == {"image", "audio"}


def test_mixture_configuration_errors_name_the_key():
    with pytest.raises(ValueError, match=r"data.weights names \['video'\]"):
        MixtureDataModule(sources(), {"image": 1, "video": 1}, 4)
    with pytest.raises(ValueError, match="sum to a positive value"):
        MixtureDataModule(sources(), {"image": 0, "audio": 0}, 4)
    with pytest.raises(ValueError, match="data.mode"):
        MixtureDataModule(sources(), {"image": 1}, 4, mode="zip")
    with pytest.raises(
        ValueError, match=r"data.pack_length=8 is shorter than a image sample \(16 tokens\)"
    ):
        check_pack_length(8, {"image": ImagePatchTokenizer(2, 1, 8)})
