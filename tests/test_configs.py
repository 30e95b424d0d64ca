"""Every config in conf/ composes and builds; a few real training steps run; a checkpoint resumes."""
import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from selfflow.training.build import build_module, build_run
from tests.conftest import compose_train
from tests.test_data_image import write_folder

CONF = Path(__file__).resolve().parents[1] / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_every_group_has_its_options():
    for group in ("data", "tokenizer", "model", "objective", "trainer", "logger", "callbacks", "experiment"):
        assert options(group), f"conf/{group} is empty"


def compose_plain(overrides: list[str], run_dir: Path):
    """The config as a user gets it, without the test's tiny sizes."""
    from hydra import compose, initialize_config_module

    with initialize_config_module("selfflow.conf", version_base="1.3"):
        return compose("train", overrides=[*overrides, f"run_dir={run_dir}"])


def test_the_default_is_the_joint_experiment_and_one_modality_is_one_override_away(tmp_path, capsys):
    from selfflow.cli.train import check_data_fits_experiment

    default = compose_plain([], tmp_path)
    assert set(default.data.sources) == {"image", "video", "audio"} and set(default.tokenizer) == set(default.data.sources)
    assert compose_plain(["experiment=digits"], tmp_path).data.modality == "image"
    check_data_fits_experiment(default, [])
    check_data_fits_experiment(compose_plain(["experiment=digits", "data=image_folder"], tmp_path),
                               ["experiment=digits", "data=image_folder"])
    for data, experiment in (("image_folder", "digits"), ("audio_folder", "audio_digits"),
                             ("captioned_video_folder", "text_video_digits")):
        with pytest.raises(SystemExit):
            check_data_fits_experiment(compose_plain([f"data={data}"], tmp_path), [f"data={data}"])
        assert f"add experiment={experiment} to train on" in capsys.readouterr().err


def test_a_single_modality_data_without_its_experiment_is_named_in_one_line(tmp_path, capsys):
    from selfflow.cli.train import check_data_fits_experiment

    with pytest.raises(SystemExit) as stop:
        check_data_fits_experiment(compose_plain(["data=audio_folder"], tmp_path), ["data=audio_folder"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "selfflow-train: error: data=audio_folder gives audio only, but the default experiment (multimodal_digits) "
        "trains images, videos and audio together; add experiment=audio_digits to train on audio alone: "
        "selfflow-train experiment=audio_digits data=audio_folder ...")


@pytest.mark.parametrize("name", options("model"))
def test_model_presets_build(name, tmp_path):
    cfg = compose_plain([f"model={name}"], tmp_path)
    with torch.device("meta"):  # no memory, no init cost: the shapes are what is checked
        model = instantiate(cfg.model)(token_channels={"image": 16}, num_classes=1000)
    expected = {"tiny": (4, 128, 4), "S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
    assert (model.depth, model.width, model.heads) == expected[name]
    assert len(model.blocks) == model.depth
    if name == "XL":  # the SiT-XL/2 transformer is about 675M parameters
        assert 600e6 < sum(p.numel() for p in model.blocks.parameters()) < 700e6


@pytest.mark.parametrize("name", options("logger"))
def test_loggers_build(name, tmp_path):
    cfg = compose_train([f"logger={name}"], tmp_path)
    loggers = [instantiate(c) for c in cfg.logger.values()]
    assert any(type(lg).__name__ == "CSVLogger" for lg in loggers)


@pytest.mark.parametrize("name", options("experiment"))
def test_experiments_build(name, tmp_path, request):
    write_folder(tmp_path / "images", per_class=4, size=(32, 32))
    extra = []
    if name == "imagenet256":  # SD-VAE latents: a tiny VAE, 32 px images
        extra = [f"tokenizer.image.vae={request.getfixturevalue('tiny_vae')}", "data.train.image_size=32"]
    cfg = compose_train([f"experiment={name}", *extra], tmp_path / "run")
    if "root" in list(cfg.data.keys()) and OmegaConf.is_missing(cfg.data, "root"):
        cfg.data.root = str(tmp_path / "images")
    run = build_run(cfg)
    assert run.module.model.num_classes == run.datamodule.num_classes > 0
    batch = next(iter(run.datamodule.train_dataloader()))
    tokens = run.module.tokenizers[batch["modality"]].encode(batch["data"])
    assert tokens.x.shape[-1] == run.module.model.token_channels[batch["modality"]]


def test_image_folder_data_and_objective_options_build(tmp_path):
    write_folder(tmp_path / "images", per_class=4, size=(32, 32))
    cfg = compose_train(["data=image_folder", f"data.root={tmp_path / 'images'}", "data.train.image_size=16",
                         "objective.mask_mode=bernoulli", "objective.attention_separation=true",
                         "objective.timesteps._target_=selfflow.flow.timesteps.LogitNormal"], tmp_path / "run")
    run = build_run(cfg)
    assert run.datamodule.num_classes == 2
    assert run.module.objective.attention_separation


@pytest.mark.parametrize("experiment, data", [("text_video_digits", "captioned_video_folder"),
                                              ("text_audio_digits", "captioned_audio_folder")])
def test_captioned_video_and_audio_folder_configs_build_a_text_run(tmp_path, experiment, data):
    import soundfile

    from tests.test_data_audio import tone
    from tests.test_data_video import write_video_folder

    root = tmp_path / "files"
    if data == "captioned_video_folder":
        write_video_folder(root, per_class=3, num_frames=20, size=16)
        files = sorted(root.rglob("*.mp4"))
    else:
        for c, name in enumerate(("low", "high")):
            (root / name).mkdir(parents=True)
            for i in range(3):
                soundfile.write(root / name / f"{i}.wav", tone(300 + 500 * c, 1.0, 8000), 8000)
        files = sorted(root.rglob("*.wav"))
    for path in files:
        path.with_suffix(".txt").write_text(f"something {path.parent.name}")
    overrides = [f"experiment={experiment}", f"data={data}", f"data.root={root}"]
    if data == "captioned_video_folder":
        overrides += ["data.train.channels=1", "data.train.image_size=16"]
    cfg = compose_train(overrides, tmp_path / "run")
    run = build_run(cfg)
    assert run.datamodule.train_set.has_captions and "text" in run.module.tokenizers
    batch = next(iter(run.datamodule.train_dataloader()))
    assert all(caption in ("something low", "something high", "something walk", "something wave")
               for caption in batch["caption"])


def read_metrics(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_a_few_training_steps_write_checkpoints_metrics_and_samples(tiny_train_cfg, tmp_path):
    cfg = tiny_train_cfg("trainer.max_steps=4")
    run = build_run(cfg)
    before = run.module.model.blocks[0].attn.qkv.weight.clone()
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert run.trainer.global_step == 4
    assert not torch.equal(before, run.module.model.blocks[0].attn.qkv.weight)
    assert int(run.module.objective.teacher.num_updates) == 4
    run_dir = Path(cfg.run_dir)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "checkpoints" / "step_0000002.ckpt").is_file()
    rows = read_metrics(run_dir / "metrics.csv")
    columns = set(rows[0])
    for name in ("train/loss", "train/loss_flow", "train/loss_rep", "train/grad_norm", "train/samples_per_s",
                 "train/tokens_per_s", "lr-AdamW"):
        assert name in columns, name
    assert any(c.startswith("train/loss_flow_t") for c in columns)
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 4 and all(loss > 0 for loss in losses)
    from PIL import Image

    grid = Image.open(run_dir / "samples" / "image" / "final.png")
    assert grid.width > 16 and grid.height > 16
    assert (run_dir / "samples" / "image" / "step_0000002.png").is_file()
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["selfflow_format"] == 1 and ckpt["selfflow_config"]["model"]["depth"] == 2
    assert any(k.startswith("objective.teacher.module.") for k in ckpt["state_dict"])


def test_vanilla_baseline_trains_without_a_teacher_forward(tiny_train_cfg):
    run = build_run(tiny_train_cfg("objective.mask_ratio=0", "objective.gamma=0", "trainer.max_steps=2"))
    run.trainer.fit(run.module, datamodule=run.datamodule)
    rows = read_metrics(Path(run.run_dir) / "metrics.csv")
    assert "train/loss_rep" not in rows[0]
    assert run.module.objective.head is None


class CaptureStart(L.Callback):
    def on_train_start(self, trainer, module):
        self.step = trainer.global_step
        self.ema = {k: v.clone() for k, v in module.objective.teacher.state_dict().items()}
        self.exp_avg = [s["exp_avg"].clone() for s in trainer.optimizers[0].state.values()]


def test_resume_continues_from_the_saved_step_with_ema_and_optimizer_state(tiny_train_cfg, tmp_path):
    first = build_run(tiny_train_cfg("trainer.max_steps=4", run_dir=tmp_path / "a"))
    first.trainer.fit(first.module, datamodule=first.datamodule)
    ckpt_path = tmp_path / "a" / "checkpoints" / "step_0000002.ckpt"
    saved = torch.load(ckpt_path, weights_only=False)

    second = build_run(tiny_train_cfg("trainer.max_steps=4", run_dir=tmp_path / "b"))
    capture = CaptureStart()
    second.trainer.callbacks.append(capture)
    second.trainer.fit(second.module, datamodule=second.datamodule, ckpt_path=str(ckpt_path))
    assert capture.step == 2 and second.trainer.global_step == 4
    for key, value in capture.ema.items():
        torch.testing.assert_close(value, saved["state_dict"][f"objective.teacher.{key}"])
    assert int(capture.ema["num_updates"]) == 2
    saved_exp_avg = [s["exp_avg"] for s in saved["optimizer_states"][0]["state"].values()]
    assert len(saved_exp_avg) == len(capture.exp_avg)
    for a, b in zip(capture.exp_avg, saved_exp_avg):
        torch.testing.assert_close(a, b)
    rows = read_metrics(tmp_path / "b" / "metrics.csv")
    assert {int(r["step"]) for r in rows if r.get("train/loss")} == {2, 3}


def test_build_module_rejects_data_without_a_tokenizer(tiny_train_cfg):
    cfg = tiny_train_cfg()
    datamodule = instantiate(cfg.data)
    datamodule.modality = "audio"
    with pytest.raises(ValueError, match="tokenizer.audio is not configured"):
        build_module(cfg, datamodule)


def test_checkpoint_loads_back_for_inference_with_ema_or_online_weights(tiny_train_cfg, tmp_path):
    from selfflow.interop.checkpoint import load_checkpoint

    run = build_run(tiny_train_cfg("trainer.max_steps=2"))
    run.trainer.fit(run.module, datamodule=run.datamodule)
    path = Path(run.run_dir) / "checkpoints" / "last.ckpt"
    ema = load_checkpoint(path, weights="ema")
    online = load_checkpoint(path, weights="online")
    assert ema.step == 2 and list(ema.tokenizers) == ["image"]
    for (name, a), b in zip(ema.model.state_dict().items(), run.module.ema_model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    torch.testing.assert_close(online.model.blocks[0].attn.qkv.weight, run.module.model.blocks[0].attn.qkv.weight)
    assert not torch.equal(ema.model.blocks[0].attn.qkv.weight, online.model.blocks[0].attn.qkv.weight)


def test_checkpoint_errors_are_clear_and_unsafe_files_are_not_executed(tiny_train_cfg, tmp_path):
    from selfflow.interop.checkpoint import load_checkpoint, load_state_checked
    from tests.helpers.hostile import hostile_checkpoint

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.ckpt")
    marker = tmp_path / "pwned"
    evil = hostile_checkpoint(tmp_path / "evil.ckpt", marker)
    with pytest.raises(ValueError, match="cannot load checkpoint .* safely"):
        load_checkpoint(evil)
    assert not marker.exists()
    model = torch.nn.Linear(3, 4)
    with pytest.raises(ValueError, match=r"'weight' has shape \(4, 5\) in the checkpoint but \(4, 3\)"):
        load_state_checked(model, {"weight": torch.zeros(4, 5), "bias": torch.zeros(4)}, "test")


@pytest.mark.parametrize("name", ["image_folder", "video_folder", "audio_folder"])
def test_data_on_bad_file_is_one_key_for_both_splits(name, tmp_path):
    from selfflow.training.datamodule import SelfFlowDataModule

    cfg = compose_train([f"data={name}", f"data.root={tmp_path}", "data.on_bad_file=error"], tmp_path / "run")
    assert cfg.data.train.on_bad_file == cfg.data.test.on_bad_file == "error"
    with pytest.raises(ValueError, match="data.on_bad_file='sometimes'"):
        SelfFlowDataModule([1], [1], "image", on_bad_file="sometimes")
