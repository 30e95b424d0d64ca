"""Every config in conf/ composes and builds; a few real training steps run; a
checkpoint resumes."""

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from selfflow.training.build import build_module, build_run
from selfflow.training.datamodule import has_captions, sample_geometry
from selfflow.training.validate import ConfigError, tokenizer_configs, validate_config
from tests.helpers.configs import TINY, TINY_SIZES, compose_plain, compose_train
from tests.helpers.files import write_folder, write_tiny_dinov2

CONF = Path(__file__).resolve().parents[1] / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_every_group_has_its_options():
    for group in (
        "data",
        "tokenizer",
        "model",
        "objective",
        "trainer",
        "logger",
        "callbacks",
        "experiment",
    ):
        assert options(group), f"conf/{group} is empty"


def test_the_default_is_the_joint_setup_and_one_modality_is_one_override_away(tmp_path):
    default = compose_plain([], tmp_path)
    assert set(default.data.sources) == set(default.tokenizer) == {"image", "video", "audio"}
    assert default.objective.mask_ratio == {"image": 0.25, "video": 0.10, "audio": 0.50}
    assert (
        compose_plain(["experiment=multimodal_digits"], tmp_path) == default
    )  # still a valid name for it
    for overrides, modality in (
        (["data=image_folder", "data.root=DIR"], "image"),
        (["data=audio_folder", "data.root=DIR"], "audio"),
        (["experiment=video_digits"], "video"),
    ):
        cfg = compose_plain(overrides, tmp_path)
        assert list(tokenizer_configs(cfg)) == [
            modality
        ]  # the other configured tokenizers are not built


def test_image_folder_data_alone_trains_images_only(cifar_classes, tmp_path):
    from selfflow.interop.checkpoint import load_checkpoint
    from selfflow.training.run import train

    cfg = compose_train(
        ["data=image_folder", f"data.root={cifar_classes}", "trainer.max_steps=2"],
        tmp_path / "run",
        tiny=TINY_SIZES,
    )  # no experiment: the root defaults with the data swapped
    run = train(cfg)
    assert list(run.module.tokenizers) == ["image"] and run.module.model.token_channels == {
        "image": 3 * 4 * 4
    }
    assert run.trainer.global_step == 2 and run.datamodule.num_classes == 3
    assert sorted(p.name for p in (tmp_path / "run" / "samples").iterdir()) == ["image"]
    stored = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt").config.tokenizer
    assert OmegaConf.to_container(stored) == {
        "image": {  # every argument: sampling rebuilds it without the data
            "_target_": "selfflow.tokenizers.image.ImagePatchTokenizer",
            "patch_size": 4,
            "channels": 3,
            "image_size": 32,
        }
    }


@pytest.mark.parametrize("name", [n for n in options("model") if n != "base"])
def test_model_presets_build(name, tmp_path):
    cfg = compose_plain([f"model={name}"], tmp_path)
    with torch.device("meta"):  # no memory, no init cost: the shapes are what is checked
        model = instantiate(cfg.model)(token_channels={"image": 16}, num_classes=1000)
    expected = {
        "tiny": (4, 128, 4),
        "S": (12, 384, 6),
        "B": (12, 768, 12),
        "L": (24, 1024, 16),
        "XL": (28, 1152, 16),
    }
    assert (model.depth, model.width, model.heads) == expected[name]
    assert len(model.blocks) == model.depth
    if name == "XL":  # the SiT-XL/2 transformer is about 675M parameters
        assert 600e6 < sum(p.numel() for p in model.blocks.parameters()) < 700e6
    size, base = (
        OmegaConf.to_container(c.model) for c in (cfg, compose_plain(["model=base"], tmp_path))
    )
    assert {
        k: v for k, v in size.items() if k not in ("depth", "width", "heads")
    } == {  # the rest is base.yaml's
        k: v for k, v in base.items() if k not in ("depth", "width", "heads")
    }


def test_model_base_takes_any_size_and_names_the_missing_ones(tiny_train_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"model.depth must be set \(model.depth=...\)"):
        validate_config(compose_plain(["model=base"], tmp_path))
    validate_config(
        tiny_train_cfg("model=base", "model.depth=3", "model.width=48", "model.heads=3")
    )


def test_the_data_configs_share_one_base_that_is_not_a_data_option():
    """The data module wrapper and the bad-file key are written once (conf/data_base), not in each
    data config."""
    texts = {path: path.read_text() for path in CONF.rglob("*.yaml")}
    wrapper = "_target_: selfflow.training.datamodule.SelfFlowDataModule"
    wrappers = [p.name for p, text in texts.items() if wrapper in text]
    policies = [p.name for p, text in texts.items() if "on_bad_file: ${..on_bad_file}" in text]
    assert wrappers == ["module.yaml"] and policies == ["files.yaml"]
    assert "module" not in options("data") and "files" not in options("data")
    composed = [compose_plain([f"data={name}"], Path("/run")).data for name in options("data")]
    targets = {data._target_ for data in composed}
    assert targets == {  # every data config builds one through its base, the mixture aside
        "selfflow.training.datamodule.SelfFlowDataModule",
        "selfflow.training.mixture.MixtureDataModule",
    }


def test_no_data_config_mirrors_a_train_split():
    for path in sorted((CONF / "data").glob("*.yaml")):
        text = path.read_text()
        assert "${..train." not in text and "\ntrain:" not in text and "\ntest:" not in text, (
            path.name
        )


def fill_for(overrides: list[str], tmp_path: Path) -> list[str]:
    """What `overrides` still need to pass start-up (folders that need not exist: nothing
    is read)."""
    extra: list[str] = []
    for _ in range(3):  # a fill may need another: latent_cache -> an SD-VAE tokenizer -> its folder
        cfg = compose_train([*overrides, *extra], tmp_path / "compose", tiny=TINY_SIZES)
        wanted = []
        if "root" in cfg.data.keys() and OmegaConf.is_missing(cfg.data, "root"):  # noqa: SIM118 - ??? is not `in`
            wanted.append(f"data.root={tmp_path / 'nothing'}")
        if has_captions(cfg.data) and "text" not in cfg.tokenizer:
            wanted.append("tokenizer=[image_pixels,video_tubelets,audio_mel,text_minilm]")
        cached = cfg.data.get("modality")  # a latent cache needs the VAE tokenizer of its modality
        latent = "LatentCache" in str(OmegaConf.select(cfg, "data.dataset._target_"))
        if latent and "vae" not in cfg.tokenizer[cached]:
            wanted.append("tokenizer=" + {"image": "image_sdvae"}.get(cached, f"{cached}_vae"))
        for modality, spec in cfg.tokenizer.items():
            wanted += [
                f"tokenizer.{modality}.{key}={tmp_path / 'none'}"
                for key in ("vae", "autoencoder_path")
                if key in spec.keys() and OmegaConf.is_missing(spec, key)  # noqa: SIM118 - ??? is not `in`
            ]
        if cfg.objective.get("alignment") is not None and not cfg.objective.get("encoder"):
            wanted.append(f"objective.encoder={write_tiny_dinov2(tmp_path / 'dinov2')}")
        extra += [w for w in wanted if w not in extra]
    return extra


@pytest.mark.parametrize(
    "group, option",
    [
        (g, o)
        for g in (
            "data",
            "tokenizer",
            "model",
            "objective",
            "trainer",
            "logger",
            "callbacks",
            "paths",
            "experiment",
        )
        for o in options(g)
        if (g, o) != ("model", "base")
    ],
)
def test_every_config_option_passes_start_up(group, option, tmp_path):
    """Each option of each group composes with tiny sizes, and its data module, model, objective,
    training module, optimizer and callbacks build (on the meta device: no data is read) through the
    start-up checks."""
    overrides = [f"{group}={option}"]
    if group == "tokenizer":  # data of the tokenizer's modality (text: captioned digit images)
        experiment = {
            "image": "digits",
            "video": "video_digits",
            "audio": "audio_digits",
            "text": "text_digits",
        }
        tokenizers = "[image_pixels,text_minilm]" if option == "text_minilm" else option
        overrides = [f"experiment={experiment[option.split('_')[0]]}", f"tokenizer={tokenizers}"]
    cfg = compose_train(
        [*overrides, *fill_for(overrides, tmp_path)], tmp_path / "run", tiny=TINY_SIZES
    )
    validate_config(cfg)
    assert set(tokenizer_configs(cfg)) >= set(sample_geometry(cfg.data))


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
        extra = [
            f"tokenizer.image.vae={request.getfixturevalue('tiny_vae')}",
            "data.dataset.image_size=32",
        ]
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
    cfg = compose_train(
        [
            "data=image_folder",
            f"data.root={tmp_path / 'images'}",
            "data.dataset.image_size=16",
            "objective.mask_mode=bernoulli",
            "objective.attention_separation=true",
            "objective.timesteps._target_=selfflow.flow.timesteps.LogitNormal",
        ],
        tmp_path / "run",
    )
    run = build_run(cfg)
    assert run.datamodule.num_classes == 2
    assert run.module.objective.attention_separation


@pytest.mark.parametrize(
    "experiment, data",
    [
        ("text_video_digits", "captioned_video_folder"),
        ("text_audio_digits", "captioned_audio_folder"),
    ],
)
def test_captioned_video_and_audio_folder_configs_build_a_text_run(tmp_path, experiment, data):
    import soundfile

    from tests.helpers.files import tone, write_video_folder

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
        overrides += ["data.dataset.channels=1", "data.dataset.image_size=16"]
    cfg = compose_train(overrides, tmp_path / "run")
    run = build_run(cfg)
    assert run.datamodule.train_set.has_captions and "text" in run.module.tokenizers
    batch = next(iter(run.datamodule.train_dataloader()))
    assert all(
        caption in ("something low", "something high", "something walk", "something wave")
        for caption in batch["caption"]
    )


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
    for name in (
        "train/loss",
        "train/loss_flow",
        "train/loss_rep",
        "train/grad_norm",
        "train/samples_per_s",
        "train/tokens_per_s",
        "lr-AdamW",
    ):
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
    run = build_run(
        tiny_train_cfg("objective.mask_ratio=0", "objective.gamma=0", "trainer.max_steps=2")
    )
    run.trainer.fit(run.module, datamodule=run.datamodule)
    rows = read_metrics(Path(run.run_dir) / "metrics.csv")
    assert "train/loss_rep" not in rows[0]
    assert run.module.objective.head is None


class CaptureStart(L.Callback):
    def on_train_start(self, trainer, module):
        self.step = trainer.global_step
        self.ema = {k: v.clone() for k, v in module.objective.teacher.state_dict().items()}
        self.exp_avg = [s["exp_avg"].clone() for s in trainer.optimizers[0].state.values()]


def test_resume_continues_from_the_saved_step_with_ema_and_optimizer_state(
    tiny_train_cfg, tmp_path
):
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


def test_data_without_its_tokenizer_or_captions_without_text_stop_at_start_up(tiny_train_cfg):
    cfg = tiny_train_cfg("tokenizer=video_tubelets")
    with pytest.raises(
        ConfigError, match="data gives 'image' samples but tokenizer.image is not configured"
    ):
        validate_config(cfg)
    with pytest.raises(ValueError, match="tokenizer.image is not configured"):
        build_module(cfg, instantiate(cfg.data))
    with pytest.raises(
        ConfigError, match="the data has captions but no text tokenizer is configured"
    ):
        validate_config(tiny_train_cfg("data=text_digits"))
    with pytest.raises(
        ConfigError, match="tokenizer.text is configured but the data has no captions"
    ):
        validate_config(tiny_train_cfg("tokenizer=[image_pixels,text_minilm]"))


def test_checkpoint_loads_back_for_inference_with_ema_or_online_weights(tiny_train_cfg, tmp_path):
    from selfflow.interop.checkpoint import load_checkpoint

    run = build_run(tiny_train_cfg("trainer.max_steps=2"))
    run.trainer.fit(run.module, datamodule=run.datamodule)
    path = Path(run.run_dir) / "checkpoints" / "last.ckpt"
    ema = load_checkpoint(path, weights="ema")
    online = load_checkpoint(path, weights="online")
    assert ema.step == 2 and list(ema.tokenizers) == ["image"]
    for (name, a), b in zip(
        ema.model.state_dict().items(), run.module.ema_model.state_dict().values()
    ):
        torch.testing.assert_close(a, b, msg=name)
    torch.testing.assert_close(
        online.model.blocks[0].attn.qkv.weight, run.module.model.blocks[0].attn.qkv.weight
    )
    assert not torch.equal(
        ema.model.blocks[0].attn.qkv.weight, online.model.blocks[0].attn.qkv.weight
    )


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
    with pytest.raises(
        ValueError, match=r"'weight' has shape \(4, 5\) in the checkpoint but \(4, 3\)"
    ):
        load_state_checked(model, {"weight": torch.zeros(4, 5), "bias": torch.zeros(4)}, "test")


@pytest.mark.parametrize("name", ["image_folder", "video_folder", "audio_folder"])
def test_data_on_bad_file_is_one_key_for_both_splits(name, tmp_path):
    from selfflow.training.datamodule import SelfFlowDataModule

    cfg = compose_train(
        [f"data={name}", f"data.root={tmp_path}", "data.on_bad_file=error"], tmp_path / "run"
    )
    assert OmegaConf.to_container(cfg.data, resolve=True)["dataset"]["on_bad_file"] == "error"
    with pytest.raises(ValueError, match="data.on_bad_file='sometimes'"):
        SelfFlowDataModule.from_splits([1], [1], "image", on_bad_file="sometimes")


def callback_names() -> list[str]:
    import yaml

    return sorted(yaml.safe_load((CONF / "callbacks" / "default.yaml").read_text()))


@pytest.mark.parametrize("name", callback_names())
def test_removing_any_one_callback_leaves_the_others_building(name, tmp_path):
    """`~callbacks.<name>` alone: no other callback interpolates from it (the full default set, tiny
    sizes)."""
    every_callback = [o for o in TINY if not o.startswith("~callbacks.")]
    cfg = compose_train([f"~callbacks.{name}"], tmp_path / "run", tiny=every_callback)
    OmegaConf.resolve(cfg)  # an interpolation into the removed callback fails here
    assert name not in cfg.callbacks and len(cfg.callbacks) == len(callback_names()) - 1
    validate_config(cfg)  # and every remaining callback builds


FILE_SUFFIXES = {"json", "safetensors", "pt", "pth", "ckpt", "npz", "npy", "yaml", "py", "csv"}


def config_key_paths() -> dict[str, str | None]:
    """Every key path (and each prefix) that conf/ can put in a composed config, with the `_target_`
    of its node: the top-level configs, each group option under its group (at the top for `#
    @package _global_` files) and the options a defaults list places elsewhere
    (`digits@sources.image`), read as plain YAML."""
    import yaml

    paths: dict[str, str | None] = {}

    def walk(node, prefix: str, group: str) -> None:
        if prefix:  # an option that only extends another (defaults: [selfflow]) keeps its target
            target = node.get("_target_") if isinstance(node, dict) else None
            paths[prefix] = target or paths.get(prefix)
        if not isinstance(node, dict):
            return
        for item in node.get("defaults") or []:
            if isinstance(item, str) and "@" in item:  # option@package: its keys under the package
                option, package = item.split("@")
                where = CONF / (option[1:] if option.startswith("/") else f"{group}/{option}")
                placed = yaml.safe_load(where.with_suffix(".yaml").read_text())
                here = prefix if package == "_here_" else f"{prefix}.{package}"  # _here_: this node
                walk(placed, here, where.parent.relative_to(CONF).as_posix())
        for key, value in node.items():
            if key != "defaults":
                walk(value, f"{prefix}.{key}" if prefix else str(key), group)

    for path in CONF.rglob("*.yaml"):
        text = path.read_text()
        group = path.parent.relative_to(CONF).as_posix()
        top = group == "." or text.startswith("# @package _global_")
        walk(yaml.safe_load(text) or {}, "" if top else group, group)
    for path in list(paths):  # the nodes between (data.sources of data.sources.image)
        while "." in path:
            path = path.rsplit(".", 1)[0]
            paths.setdefault(path, None)
    return paths


def is_config_key(key: str, paths: dict[str, str | None]) -> bool:
    """In conf/, or an argument of the class its parent node builds (settable with `+key=...`)."""
    from selfflow.training.validate import target_parameters

    parent, _, name = key.rpartition(".")
    target = paths.get(parent)
    arguments = target_parameters(target) or set() if isinstance(target, str) else set()
    return key in paths or name in arguments


def keys_named_in_error_messages() -> dict[str, str]:
    """Dotted config keys (`data.dataset.image_size`) written in the string literals of every
    `raise` in selfflow/, with where each is; the part of an f-string before a `{...}` counts up to
    its last whole name."""
    import ast
    import re

    groups = {p.split(".")[0] for p in config_key_paths() if "." in p}
    names = "|".join(sorted(groups))
    pattern = re.compile(rf"(?<![\w./-])((?:{names})(?:\.[A-Za-z_][A-Za-z0-9_]*)+)(\.?)")
    found: dict[str, str] = {}
    for source in sorted((CONF.parent / "selfflow").rglob("*.py")):
        for node in ast.walk(ast.parse(source.read_text())):
            if not isinstance(node, ast.Raise) or node.exc is None:
                continue
            for string in ast.walk(node.exc):
                parts = string.values if isinstance(string, ast.JoinedStr) else [string]
                for index, part in enumerate(parts):
                    if not (isinstance(part, ast.Constant) and isinstance(part.value, str)):
                        continue
                    for match in pattern.finditer(part.value):
                        key = match.group(1)
                        at_end = match.end() == len(part.value) and index + 1 < len(parts)
                        cut = at_end and not match.group(2)  # "x.y{z}": y may be half a name
                        key = key.rsplit(".", 1)[0] if cut else key
                        if key.rsplit(".", 1)[-1] not in FILE_SUFFIXES:
                            where = f"{source.relative_to(CONF.parent)}:{node.lineno}"
                            found.setdefault(key, where)
    return found


def test_every_config_key_an_error_message_names_exists():
    known = config_key_paths()
    named = keys_named_in_error_messages()
    assert "data.dataset.image_size" in named and "trainer.max_steps" in named  # f-strings too
    missing = {key: where for key, where in named.items() if not is_config_key(key, known)}
    assert not missing, f"error messages name config keys that conf/ does not have: {missing}"
