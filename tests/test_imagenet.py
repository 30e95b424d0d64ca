"""experiment=imagenet256: the paper's setting in the released model's layout, runnable end to end
on a stand-in."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from selfflow.interop.official import RELEASED, export_official
from selfflow.objectives.selfflow import default_layers
from selfflow.tokens import Condition
from selfflow.training.validate import tokenizer_configs
from tests.helpers.configs import TINY, compose_plain
from tests.helpers.released import ReleasedDiT


def test_the_experiment_is_the_paper_setting_in_the_released_layout(tmp_path):
    cfg = compose_plain(
        ["experiment=imagenet256", "data.root=/data/imagenet", "tokenizer.image.vae=/models/vae"],
        tmp_path,
    )
    model, objective, tokenizer = (
        cfg.model,
        cfg.objective,
        OmegaConf.create(tokenizer_configs(cfg)["image"]),
    )
    assert (model.depth, model.width, model.heads) == (
        RELEASED["depth"],
        RELEASED["width"],
        RELEASED["heads"],
    )
    assert (model.pos_embed, model.time_scale, model.mlp_ratio, model.qk_norm) == (
        "sincos",
        1.0,
        4.0,
        False,
    )
    assert (
        tokenizer._target_.endswith("ImageLatentTokenizer")
        and tokenizer.patch_size == RELEASED["patch_size"]
    )
    assert tokenizer.latent_channels == RELEASED["latent_channels"] and tokenizer.image_size == 256
    assert (cfg.data.dataset.crop, cfg.data.dataset.image_size, cfg.data.dataset.hflip) == (
        "adm",
        256,
        True,
    )
    assert (objective.mask_ratio.image, objective.gamma, objective.class_dropout) == (
        0.25,
        0.8,
        0.1,
    )
    assert default_layers(model.depth) == (8, 20) and objective.student_layer is None
    assert (objective.ema_decay, objective.ema_warmup) == (0.9999, False)
    assert (cfg.optimizer.lr, list(cfg.optimizer.betas), cfg.optimizer.weight_decay) == (
        1e-4,
        [0.9, 0.999],
        0.0,
    )
    assert (
        cfg.lr_warmup_steps == 0
        and cfg.global_batch_size == 256
        and cfg.trainer.gradient_clip_val == 1.0
    )
    assert (
        cfg.callbacks.checkpoint.every_n_train_steps == cfg.callbacks.samples.every_n_steps == 50000
    )
    smaller = compose_plain(
        ["experiment=imagenet256", "model=B", "data.root=x", "tokenizer.image.vae=y"], tmp_path
    )
    assert (
        smaller.model.depth,
        smaller.model.width,
        smaller.model.pos_embed,
        smaller.model.time_scale,
    ) == (
        12,
        768,
        "sincos",
        1.0,
    )


def test_two_steps_on_cpu_with_a_tiny_width_and_the_export_loads_into_the_released_layout(
    tiny_train_cfg, tiny_vae, cifar_classes
):
    from selfflow.training.run import train

    run = train(
        tiny_train_cfg(
            "experiment=imagenet256",
            f"data.root={cifar_classes}",
            "data.dataset.image_size=32",
            f"tokenizer.image.vae={tiny_vae}",
            "model.width=32",
            "model.depth=2",
            "model.heads=2",
            "global_batch_size=8",
            "trainer.max_steps=2",
        )
    )
    assert run.trainer.global_step == 2 and run.datamodule.batch_size == 8
    assert (run.run_dir / "checkpoints" / "last.ckpt").is_file()
    last = run.run_dir / "checkpoints" / "last.ckpt"
    exported = export_official(last, run.run_dir / "released-layout.pt", vae=str(tiny_vae))
    released = ReleasedDiT(width=32, depth=2, grid=2, classes=3)
    released.load_state_dict(torch.load(exported, weights_only=True), strict=True)
    torch.testing.assert_close(
        released.projector.linear1.weight, run.module.objective.head.linear1.weight
    )
    x, t, y = torch.randn(2, 4, 16), torch.tensor([0.2, 0.7]), torch.tensor([1, 3])
    pos = run.module.tokenizers["image"].positions(2)
    with torch.no_grad():
        torch.testing.assert_close(
            released(x, t, y),
            run.module.ema_model.velocity(x, t, pos, Condition(y), "image"),
            atol=2e-5,
            rtol=1e-5,
        )


def test_global_batch_size_is_split_over_processes_and_accumulation(tmp_path):
    from selfflow.training.build import build_run
    from tests.helpers.configs import compose_train
    from tests.helpers.files import write_folder

    write_folder(tmp_path / "images", per_class=4, size=(32, 32))
    ddp = [
        "data=image_folder",
        f"data.root={tmp_path / 'images'}",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=4",
        "trainer.accumulate_grad_batches=2",
    ]
    run = build_run(compose_train([*ddp, "global_batch_size=16"], tmp_path / "run"))
    assert (
        run.datamodule.batch_size == 2
    )  # 16 = 2 per process x 4 processes x 2 accumulated batches
    with pytest.raises(
        ValueError,
        match=(
            "global_batch_size=12 must be a multiple of the 4 processes x "
            "trainer.accumulate_grad_batches=2"
        ),
    ):
        build_run(compose_train([*ddp, "global_batch_size=12"], tmp_path / "run"))
    assert (
        TINY[0] == "experiment=digits"
    )  # these tiny runs keep data.batch_size when global_batch_size is null
    assert build_run(compose_train(ddp, tmp_path / "run")).datamodule.batch_size == 8


@pytest.mark.slow
def test_the_stand_in_commands_of_docs_imagenet_run_as_printed(cifar_classes, tmp_path):
    """docs/imagenet.md's CIFAR stand-in, command by command (on a smaller copy of the
    CIFAR folder): a tiny VAE, a latent cache, a trained checkpoint with sample grids, samples and
    a probe."""
    docs = Path(__file__).resolve().parents[1] / "docs" / "imagenet.md"
    block = docs.read_text().split("<!-- stand-in")[1].split("```bash\n")[1].split("```")[0]
    first, *commands = block.strip().splitlines()
    assert first == "DATA=../shared/data/cifar10-small"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "WANDB_MODE": "offline",
    }
    result = subprocess.run(
        ["bash", "-c", "\n".join(["set -e", f"DATA={cifar_classes}", *commands])],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "cifar-latents" / "manifest.json").read_text())["splits"] == {
        "train": 24,
        "test": 9,
    }
    assert (tmp_path / "runs" / "standin" / "samples" / "image" / "step_0000100.png").is_file()
    assert (tmp_path / "samples" / "standin" / "grid.png").is_file()
    assert json.loads((tmp_path / "probes" / "standin" / "probe.json").read_text())["results"]
