"""Multi-process training on CPU (gloo), through the real CLI in a subprocess as Lightning
launches it."""

import csv
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from tests.helpers.configs import SMALL_JOINT, compose_train
from tests.helpers.runs import train_cli


def first_losses(run_dir: Path) -> dict[str, float]:
    with open(run_dir / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss_flow")]
    return {k: float(rows[0][k]) for k in ("train/loss_flow",)}


@pytest.mark.slow
def test_two_process_ddp_keeps_ranks_identical_with_their_own_noise(tmp_path):
    ddp = train_cli(tmp_path, "ddp", "trainer=ddp", "trainer.devices=2", "data.batch_size=8")
    single = train_cli(tmp_path, "single", "data.batch_size=16")
    rank0 = torch.load(ddp / "dump" / "rank0.pt", weights_only=True)
    rank1 = torch.load(ddp / "dump" / "rank1.pt", weights_only=True)
    assert rank0["world_size"] == 2 and rank0["step"] == rank1["step"] == 4
    for part in ("model", "ema"):
        for key, value in rank0[part].items():
            torch.testing.assert_close(value, rank1[part][key], rtol=0, atol=0, msg=f"{part}.{key}")
    # the weights moved, and each rank drew its own masks and noise
    assert not torch.equal(rank0["first_draw"], rank1["first_draw"])
    # at initialisation the output is zero, so the flow loss is E|x1 - x0|^2 over the batch: a
    # rank's half of the global batch must give the same value as the one-process run's full batch,
    # up to sampling noise
    assert first_losses(ddp)["train/loss_flow"] == pytest.approx(
        first_losses(single)["train/loss_flow"], rel=0.1
    )


JOINT_MODALITIES = ("audio", "image", "video")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["per_step", "packed"])
def test_joint_training_on_two_processes_keeps_the_ranks_identical_after_every_step(tmp_path, mode):
    """The joint default on 2 processes: every rank trains the same modalities at a step (per_step:
    one modality per global batch; packed: the same count of each), on its own samples, and the
    weights (student and EMA) are bit-identical on both ranks after every step, with no
    unused-parameter search in DDP."""
    pytest.importorskip("espeakng_loader")
    steps = 6
    run = train_cli(
        tmp_path,
        mode,
        "trainer=ddp",
        "trainer.devices=2",
        *SMALL_JOINT,
        f"data.mode={mode}",
        "data.batch_size=4",
        f"trainer.max_steps={steps}",
        "~callbacks.probe",
    )
    dumps = [torch.load(run / "dump" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    rank0, rank1 = (dump["steps"] for dump in dumps)
    assert len(rank0) == len(rank1) == steps
    for step, (a, b) in enumerate(zip(rank0, rank1)):
        assert (a["model"], a["ema"]) == (b["model"], b["ema"]), (
            f"the ranks' weights differ after step {step}"
        )
        assert {m: n for m, (n, _) in a["contents"].items()} == {
            m: n for m, (n, _) in b["contents"].items()
        }
        assert a["contents"] != b["contents"]  # each rank its own samples
    assert rank0[0]["model"] != rank0[-1]["model"] and rank0[0]["ema"] != rank0[-1]["ema"]
    drawn = [tuple(step["contents"]) for step in rank0]
    # the optimizer stepped each modality's own parameters only at the steps holding that modality,
    # as on one process
    assert dumps[0]["optimizer_steps"] == {
        m: sum(m in modalities for modalities in drawn) for m in JOINT_MODALITIES
    }
    if mode == "per_step":  # one modality a step, and the draw moves between modalities
        assert all(len(modalities) == 1 for modalities in drawn) and len(set(drawn)) > 1
    else:  # some step lacks a modality: its head must still be in step on both ranks
        assert len(set(drawn)) > 1


def test_ddp_and_fsdp_trainer_configs_build(tmp_path):
    ddp = compose_train(["trainer=ddp"], tmp_path)
    assert ddp.trainer.strategy == "ddp" and ddp.trainer.gradient_clip_val == 1.0
    fsdp = compose_train(["trainer=fsdp"], tmp_path)
    strategy = instantiate(fsdp.trainer.strategy)
    assert type(strategy).__name__ == "FSDPStrategy"
    from selfflow.models.layers import TransformerBlock

    assert strategy.kwargs["use_orig_params"] is True
    assert TransformerBlock in strategy.kwargs["auto_wrap_policy"]._module_classes
    assert strategy.sharding_strategy.name == "FULL_SHARD"


def test_callbacks_stand_down_when_the_model_is_sharded_over_ranks(caplog):
    from types import SimpleNamespace

    from lightning.pytorch.strategies import SingleDeviceStrategy

    from selfflow.training.distributed import (
        callback_forward_context,
        fsdp_strategy,
        sharded_over_ranks,
    )

    fsdp, single = fsdp_strategy(), SingleDeviceStrategy("cpu")
    many = SimpleNamespace(strategy=fsdp, world_size=2, is_global_zero=True)
    with caplog.at_level("WARNING", logger="selfflow.training"):
        assert sharded_over_ranks(many, "sample grids")
        assert sharded_over_ranks(many, "sample grids")  # warned once
    assert [r.getMessage() for r in caplog.records].count(
        "sample grids are off under FSDP on 2 ranks; run selfflow-sample / "
        "selfflow-probe on a checkpoint"
    ) == 1
    assert not sharded_over_ranks(
        SimpleNamespace(strategy=fsdp, world_size=1, is_global_zero=True), "probes"
    )
    assert not sharded_over_ranks(
        SimpleNamespace(strategy=single, world_size=2, is_global_zero=True), "probes"
    )
    with callback_forward_context(SimpleNamespace(strategy=single)):  # no autocast outside FSDP
        assert not torch.is_autocast_enabled("cpu")


def test_an_absent_modality_has_gradients_for_ddp_and_none_for_the_optimizer():
    """A step without audio still reaches the audio parameters (zero gradients, so DDP needs no
    search), and they lose those gradients again before the optimizer step unless another rank's
    batch held audio."""
    from types import SimpleNamespace

    from selfflow.models.transformer import SelfFlowTransformer
    from selfflow.tokens import Condition
    from selfflow.training.distributed import ModalityParameters

    model = SelfFlowTransformer({"image": 4, "audio": 8}, width=16, depth=1, heads=2, num_classes=3)
    parameters = ModalityParameters(model)
    x, pos = torch.randn(2, 5, 4), torch.zeros(2, 5, 4, dtype=torch.long)
    loss = (
        model.velocity(x, torch.rand(2), pos, Condition(torch.tensor([0, 1])), "image")
        .square()
        .mean()
    )
    tied = parameters.in_graph(loss, ["image"])
    assert tied.item() == loss.item()
    tied.backward()
    assert all(p.grad is not None for p in model.parameters())
    audio, image = parameters.by_modality["audio"], parameters.by_modality["image"]
    assert all(torch.count_nonzero(p.grad) == 0 for p in audio)
    gradients = [p.grad.clone() for p in audio]
    audio_on_another_rank = SimpleNamespace(
        root_device=torch.device("cpu"),
        reduce=lambda flags, reduce_op: flags + torch.tensor([1.0, 0.0]),
    )
    parameters.drop_absent(["image"], audio_on_another_rank)  # flags in name order: audio, image
    assert all(torch.equal(p.grad, g) for p, g in zip(audio, gradients))
    parameters.drop_absent(["image"])
    assert all(p.grad is None for p in audio) and all(p.grad is not None for p in image)
