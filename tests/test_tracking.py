"""Experiment tracking and training controls: hyperparameters and sample media in wandb and
TensorBoard, sweep folders and run names from the overrides, text progress without a terminal, the
last step always logged, learning-rate and gamma schedules (exact after a resume), extra sampling
EMAs, debug=fast and the per-key --help."""

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers.configs import SMALL_JOINT, compose_sample, compose_train
from tests.helpers.wandb_files import wandb_run

# the joint default made small, with one set of samples at the end: an image grid, video clips,
# audio clips
JOINT_MEDIA = [
    *SMALL_JOINT,
    "callbacks.samples.every_n_steps=0",
    "callbacks.samples.max_classes=2",
    "callbacks.samples.logged_clips=2",
    "data.batch_size=4",
    "~callbacks.probe",
]


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def per_step(rows: list[dict[str, str]], column: str) -> dict[int, float]:
    return {int(r["step"]): float(r[column]) for r in rows if r.get(column)}


def fit(cfg):
    """A run as selfflow-train makes it (start-up checks, resume, fit, loggers closed)."""
    from selfflow.training.run import train

    return train(cfg)


# --- schedules ------------------------------------------------------------------------------------


def test_learning_rate_schedules_at_known_steps():
    from selfflow.training.schedules import LRSchedule

    base, floor = 1e-3, 1e-4
    cosine = LRSchedule("cosine", warmup_steps=2, min_lr=floor, decay_steps=12)
    linear = LRSchedule("linear", warmup_steps=2, min_lr=floor, decay_steps=12)
    constant = LRSchedule("constant", warmup_steps=2)
    for schedule in (
        cosine,
        linear,
        constant,
    ):  # warm-up: (step + 1) / (warmup + 1), as before the schedules
        assert [schedule.factor(s, base) for s in (0, 1, 2)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert cosine.factor(7, base) * base == pytest.approx(
        floor + (base - floor) * 0.5
    )  # halfway: the mean
    assert linear.factor(7, base) * base == pytest.approx(floor + (base - floor) * 0.5)
    assert cosine.factor(4, base) * base == pytest.approx(
        floor + (base - floor) * 0.5 * (1 + math.cos(math.pi / 5))
    )
    assert linear.factor(4, base) * base == pytest.approx(floor + (base - floor) * 0.8)
    for schedule in (cosine, linear):
        assert schedule.factor(12, base) * base == pytest.approx(floor)
        assert schedule.factor(50, base) * base == pytest.approx(floor)  # min_lr after decay_steps
    assert constant.factor(50, base) == 1.0
    with pytest.raises(ValueError, match="lr_schedule.shape='step' is unknown"):
        LRSchedule("step")
    with pytest.raises(
        ValueError, match="lr_schedule=cosine decays until lr_schedule.decay_steps=-1"
    ):
        LRSchedule("cosine", decay_steps=-1)
    with pytest.raises(ValueError, match="lr_schedule.min_lr=0.01 is above optimizer.lr=0.001"):
        LRSchedule("cosine", min_lr=1e-2, decay_steps=10).check_base_lr(1e-3)


def test_gamma_schedules_at_known_steps():
    from selfflow.objectives.gamma_schedule import GammaSchedule

    assert [GammaSchedule()(s) for s in (0, 5, 10**6)] == [1.0, 1.0, 1.0]
    assert [GammaSchedule("warmup", 4)(s) for s in (0, 1, 2, 4, 9)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert [GammaSchedule("cutoff", 3)(s) for s in (0, 2, 3, 9)] == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="objective.gamma_schedule.kind='ramp' is unknown"):
        GammaSchedule("ramp", 3)
    with pytest.raises(
        ValueError, match="objective.gamma_schedule.steps=0 must be an integer >= 1"
    ):
        GammaSchedule("warmup", 0)


SCHEDULED = [
    "lr_schedule=cosine",
    "lr_warmup_steps=1",
    "lr_schedule.min_lr=1.0e-4",
    "trainer.max_steps=6",
    "objective.gamma_schedule.kind=warmup",
    "objective.gamma_schedule.steps=4",
    "objective.sampling_ema_decays=[0.1]",
    "callbacks.checkpoint.every_n_train_steps=2",
    "callbacks.samples.every_n_steps=0",
    "~callbacks.probe",
]


def test_lr_and_gamma_follow_their_schedules_and_a_resumed_run_continues_them_exactly(tmp_path):
    from selfflow.objectives.gamma_schedule import GammaSchedule
    from selfflow.training.schedules import LRSchedule

    whole = fit(compose_train(SCHEDULED, tmp_path / "whole"))
    rows = read_rows(tmp_path / "whole" / "metrics.csv")
    lr, gamma = per_step(rows, "lr-AdamW"), per_step(rows, "train/gamma")
    schedule, ramp = LRSchedule("cosine", 1, 1e-4, 6), GammaSchedule("warmup", 4)
    assert lr == pytest.approx({s: 1e-3 * schedule.factor(s, 1e-3) for s in range(6)})
    assert gamma == pytest.approx({s: 0.8 * ramp(s) for s in range(6)})
    assert lr[5] < lr[3] < lr[1] and gamma[0] == 0.0 and gamma[5] == pytest.approx(0.8)

    # a run killed after step 2 (its checkpoint) and continued: the same lr, gamma and loss at every
    # later step
    resumed = fit(
        compose_train(
            [*SCHEDULED, f"ckpt_path={tmp_path / 'whole' / 'checkpoints' / 'step_0000002.ckpt'}"],
            tmp_path / "resumed",
        )
    )
    again = read_rows(tmp_path / "resumed" / "metrics.csv")
    for column in ("lr-AdamW", "train/gamma", "train/loss"):
        later = {s: v for s, v in per_step(rows, column).items() if s >= 2}
        assert per_step(again, column) == later, column
    for a, b in zip(
        whole.module.objective.sampling_emas.parameters(),
        resumed.module.objective.sampling_emas.parameters(),
    ):
        torch.testing.assert_close(
            a, b, rtol=0, atol=0
        )  # the extra EMA is checkpointed and resumed too


def test_a_run_shorter_than_the_logging_interval_still_logs_its_last_step(tiny_train_cfg, tmp_path):
    fit(
        tiny_train_cfg(
            "trainer.max_steps=3",
            "trainer.log_every_n_steps=25",
            "callbacks.samples.every_n_steps=0",
            "~callbacks.probe",
        )
    )
    rows = read_rows(tmp_path / "run" / "metrics.csv")
    assert set(per_step(rows, "train/loss")) == {
        2
    }  # the last step (Lightning's step numbers start at 0)
    assert set(per_step(rows, "lr-AdamW")) == {2}
    assert any(c.startswith("train/loss_flow_t") for r in rows for c, v in r.items() if v)


# --- extra sampling EMAs --------------------------------------------------------------------------

EXTRA_EMA = [
    "objective.sampling_ema_decays=[0.1]",
    "trainer.max_steps=3",
    "optimizer.lr=0.01",
    "lr_warmup_steps=0",
    "~callbacks.samples",
    "~callbacks.probe",
]


@pytest.fixture(scope="module")
def extra_ema_run(tmp_path_factory):
    """A tiny run keeping an extra EMA of decay 0.1 (far from the teacher's), and its
    last checkpoint."""
    run_dir = tmp_path_factory.mktemp("extra_ema")
    return fit(compose_train(EXTRA_EMA, run_dir)), run_dir / "checkpoints" / "last.ckpt"


def test_an_extra_sampling_ema_follows_the_student_is_checkpointed_and_unknown_ones_are_named(
    extra_ema_run,
):
    from selfflow.interop.checkpoint import load_checkpoint

    run, ckpt = extra_ema_run
    extra = run.module.objective.sampling_emas["ema_0_1"]
    assert int(extra.num_updates) == 3 and extra.decay == 0.1
    trainable = {id(p) for group in run.trainer.optimizers[0].param_groups for p in group["params"]}
    assert not any(id(p) in trainable for p in extra.parameters())  # not optimised
    loaded = load_checkpoint(ckpt, weights="ema_0.1")
    for a, b in zip(loaded.model.parameters(), extra.module.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    teacher = load_checkpoint(ckpt, weights="ema").model
    assert not torch.equal(
        teacher.blocks[0].attn.qkv.weight, loaded.model.blocks[0].attn.qkv.weight
    )
    with pytest.raises(
        ValueError,
        match=r"weights='ema_0.5' is not in checkpoint .*choose one of: ema, online, "
        r"ema_0.1$",
    ):
        load_checkpoint(ckpt, weights="ema_0.5")


def test_selfflow_sample_reads_an_extra_ema_and_shows_no_progress_without_a_terminal(
    extra_ema_run, tmp_path, capsys
):
    from selfflow.cli.sample import sample

    arrays = {}
    for weights in ("ema", "ema_0.1"):
        summary = sample(
            compose_sample(
                f"ckpt={extra_ema_run[1]}",
                f"out_dir={tmp_path / weights}",
                f"weights={weights}",
                "num_samples=4",
                "steps=2",
                "progress=true",
            )
        )
        assert summary["weights"] == weights
        arrays[weights] = np.load(tmp_path / weights / "samples.npz")["arr_0"]
    assert not np.array_equal(
        arrays["ema"], arrays["ema_0.1"]
    )  # the samples come from the extra EMA's weights
    captured = capsys.readouterr()  # pytest's capture is not a terminal, like a batch job's log
    assert "sampling (" not in captured.out + captured.err


def test_the_probe_reads_an_extra_ema_and_keeps_its_bars_out_of_a_log(
    extra_ema_run, tmp_path, capsys, monkeypatch
):
    from hydra import compose, initialize_config_module

    import selfflow.interop.checkpoint
    from selfflow.cli.probe import probe

    run, ckpt = extra_ema_run
    probed = []
    load = selfflow.interop.checkpoint.load_checkpoint
    monkeypatch.setattr(
        selfflow.interop.checkpoint,
        "load_checkpoint",
        lambda *args, **kwargs: probed.append(load(*args, **kwargs)) or probed[-1],
    )
    with initialize_config_module("selfflow.conf", version_base="1.3"):
        cfg = compose(
            "probe",
            overrides=[
                f"ckpt={ckpt}",
                f"out_dir={tmp_path}",
                "cache_dir=null",
                "weights=ema_0.1",
                "layers=[1]",
                "head.epochs=2",
                "head.learning_rates=[0.1]",
                "head.weight_decays=[0.0]",
                "progress=true",
            ],
        )
    ((path, document),) = probe(cfg).values()
    (model,) = [p.model for p in probed]
    for a, b in zip(
        model.parameters(), run.module.objective.sampling_emas["ema_0_1"].module.parameters()
    ):
        torch.testing.assert_close(
            a.cpu(), b, rtol=0, atol=0
        )  # the features came from the extra EMA
    assert path.is_file() and document["results"]
    captured = capsys.readouterr()
    assert "\r" not in captured.err + captured.out  # no tqdm bar redrawn into a log file


# --- loggers: hyperparameters, scalars, media -----------------------------------------------------


def test_an_offline_wandb_run_holds_the_config_the_scalars_and_the_sample_media(tmp_path):
    fit(
        compose_train(
            [*JOINT_MEDIA, "logger=wandb", "trainer.log_every_n_steps=25"], tmp_path / "run"
        )
    )
    run = wandb_run(tmp_path / "run")
    config = run["config"]
    assert config["objective.gamma"] == 0.8 and config["model.depth"] == 2 and "overrides" in config
    assert config["data.sources.audio.dataset.voices"] == [
        "en+m1",
        "en+f1",
    ]  # flattened, lists kept whole
    losses = [
        row for row in run["history"] if "train/loss" in row
    ]  # 3 steps < log_every_n_steps: the last one
    assert [row["trainer/global_step"] for row in losses] == [2]
    media = {
        key.split(".")[0]: row for row in run["history"] for key in row if key.endswith("._type")
    }
    assert media["samples/image"]["samples/image._type"] == "images/separated"
    assert media["samples/audio"]["samples/audio._type"] == "images/separated"  # the spectrograms
    assert media["samples/audio/clips"]["samples/audio/clips._type"] == "audio"
    assert media["samples/video/clips"]["samples/video/clips._type"] == "videos"
    assert {row["trainer/global_step"] for row in media.values()} == {
        3
    }  # the step the samples were made at
    (folder,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    assert len(list(folder.glob("files/media/audio/**/*.wav"))) == 2  # logged_clips=2
    assert len(list(folder.glob("files/media/videos/**/*.mp4"))) == 2


def tensorboard_hparams(folder: Path) -> tuple[dict, list[str]]:
    """(hyperparameters, metric names) of the hparams summaries in a TensorBoard run folder."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    hparams, metrics = {}, []
    for path in folder.glob("events.out.tfevents.*"):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name != "hparams":
                    continue
                data = plugin_data_pb2.HParamsPluginData.FromString(
                    value.metadata.plugin_data.content
                )
                if data.WhichOneof("data") == "session_start_info":
                    hparams.update(
                        {
                            k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind"))
                            for k, v in data.session_start_info.hparams.items()
                        }
                    )
                elif data.WhichOneof("data") == "experiment":
                    metrics += [m.name.tag for m in data.experiment.metric_infos]
    return hparams, metrics


def test_a_tensorboard_run_holds_the_hparams_with_final_metrics_the_scalars_and_the_sample_media(
    tmp_path,
):
    import yaml
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fit(
        compose_train([*JOINT_MEDIA, "logger=tensorboard", "objective.gamma=0.5"], tmp_path / "run")
    )
    folder = tmp_path / "run" / "tensorboard"
    events = EventAccumulator(str(folder), size_guidance={"images": 0, "audio": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "lr-AdamW"} <= set(tags["scalars"])
    assert (
        "samples/image" in tags["images"] and "samples/audio" in tags["images"]
    )  # grid and spectrograms
    videos = [t for t in tags["images"] if t.startswith("samples/video/clips/")]
    recordings = [t for t in tags["audio"] if t.startswith("samples/audio/clips/")]
    assert len(videos) == 2 and len(recordings) == 2
    gif = events.Images(videos[0])[0]
    assert gif.encoded_image_string[:6] == b"GIF89a" and gif.step == 3
    assert events.Audio(recordings[0])[0].step == 3 and events.Images("samples/image")[0].step == 3
    hparams, metrics = tensorboard_hparams(folder)
    assert hparams["objective.gamma"] == 0.5 and hparams["model.width"] == 32
    assert {"train/loss", "train/loss_flow", "train/loss_rep"} <= set(
        metrics
    )  # shown beside the hyperparameters
    assert (
        yaml.safe_load((tmp_path / "run" / "hparams.yaml").read_text())["objective.gamma"] == 0.5
    )  # CSV's


# --- sweeps, names, progress without a terminal ---------------------------------------------------


def test_run_names_come_from_the_overrides():
    from selfflow.training.run_name import override_name

    assert override_name(["objective.gamma=0"]) == "gamma=0"
    assert override_name(
        [
            "seed=1",
            "objective.gamma=0.8",
            "hydra.run.dir=x",
            "run_dir=y",
            "resume=auto",
            "logger=wandb",
            "debug=fast",
            "~callbacks.probe",
            "~callbacks.samples=null",
        ]
    ) == ("gamma=0.8,seed=1")  # where and how a run is kept or shown, and deletions, are left out
    assert (
        override_name(["seed=1", "objective.gamma=0.8"], leave_out=("seed",)) == "gamma=0.8"
    )  # wandb's group
    assert override_name(
        ["data.sources.image.batch_size=4", "data.sources.video.batch_size=2", "model=S"]
    ) == (
        "data.sources.image.batch_size=4,data.sources.video.batch_size=2,model=S"
    )  # ambiguous: keys stay whole
    assert (
        override_name(["data.root=/data/images"]) == "root=-data-images"
    )  # one folder, never a path
    assert override_name([]) == ""


def test_without_a_terminal_the_progress_is_a_text_line_with_losses_throughput_and_eta(
    tiny_train_cfg, caplog, monkeypatch
):
    from hydra.utils import instantiate

    from selfflow.training.progress import StepProgressBar, TextProgress, step_progress

    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    cfg = tiny_train_cfg(
        "trainer.max_steps=4",
        "trainer.log_every_n_steps=3",
        "trainer.enable_progress_bar=true",
        "+callbacks.progress={_target_:selfflow.training.progress.step_progress}",
        "callbacks.samples.every_n_steps=0",
        "~callbacks.probe",
    )
    assert isinstance(instantiate(cfg.callbacks.progress), TextProgress)
    assert isinstance(step_progress(terminal=True), StepProgressBar)
    with caplog.at_level("INFO", logger="selfflow"):
        fit(cfg)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [line.split(" |")[0] for line in lines] == [
        "step 3/4 (75.0%)",
        "step 4/4 (100.0%)",
    ]  # every 3, the last
    assert all(
        " | loss " in line
        and " | loss_flow " in line
        and " | loss_rep " in line
        and " tokens/s | ETA " in line
        for line in lines
    ), lines


@pytest.mark.slow
def test_a_multirun_names_its_folders_and_wandb_runs_by_the_overrides_and_logs_text_progress(
    tmp_path,
):
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "selfflow.cli.train",
            "-m",
            "objective.gamma=0,0.8",
            "debug=fast",
            "experiment=digits",
            "logger=wandb",
            "~callbacks.probe",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
        env={**os.environ, "WANDB_MODE": "offline"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    names = {"experiment=digits,gamma=0": 0.0, "experiment=digits,gamma=0.8": 0.8}
    assert {p.name for p in sweep.iterdir() if p.is_dir()} == set(names)
    for name, gamma in names.items():
        run = wandb_run(sweep / name)  # one wandb run per job, named and grouped by its overrides
        assert (run["name"], run["group"], run["config"]["objective.gamma"]) == (name, name, gamma)
        log = (
            sweep / name / "train.log"
        ).read_text()  # stdout is a pipe here: text lines, not a bar
        assert (
            "step 2/6 (33.3%) | loss " in log
            and "step 6/6 (100.0%) | loss " in log
            and " ETA " in log
        )
    assert result.stdout.count("step 6/6 (100.0%)") == 2
    assert "━" not in result.stdout  # no rich bar in a log


# --- debug=fast, --help ---------------------------------------------------------------------------


def test_debug_fast_runs_every_part_of_a_run_and_resumes(tmp_path):
    from hydra import compose, initialize_config_module

    def compose_fast(*overrides):
        with initialize_config_module("selfflow.conf", version_base="1.3"):
            return compose(
                "train", overrides=["debug=fast", f"run_dir={tmp_path / 'run'}", *overrides]
            )

    assert (
        compose_fast().data.sources
    )  # made for the default (joint) experiment; images only here, for speed
    assert (
        fit(compose_fast("experiment=digits", "trainer.max_steps=3")).trainer.global_step == 3
    )  # stopped early
    assert (
        fit(compose_fast("experiment=digits", "resume=auto")).trainer.global_step == 6
    )  # continued
    run = tmp_path / "run"
    assert {p.name for p in (run / "checkpoints").glob("*.ckpt")} >= {
        "step_0000003.ckpt",
        "step_0000006.ckpt",
    }
    assert (run / "samples" / "image" / "step_0000004.png").is_file()
    assert (run / "samples" / "image" / "final.png").is_file()
    rows = read_rows(run / "metrics.csv")
    assert 6 in per_step(rows, "probe/top1")
    assert sorted(per_step(rows, "train/loss")) == [
        1,
        2,
        3,
        5,
    ]  # every 2 steps and each run's last, across the resume


def test_help_lists_each_key_of_the_main_groups_with_its_comment():
    from hydra import compose, initialize_config_module

    from selfflow.cli.config_help import key_comments, keys_help

    assert key_comments("a: 1  # one\n# two\n# lines\nb:\n  c: 'x # y'   # three\nd: 2\n") == [
        ("a", "one"),
        ("b", "two lines"),
        ("b.c", "three"),
        ("d", ""),
    ]
    with initialize_config_module("selfflow.conf", version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["lr_schedule=cosine", "objective.gamma=0.5"],
            return_hydra_config=True,
        )
    text = keys_help(cfg, dict(cfg.hydra.runtime.choices))
    lines = {line.split()[0]: line for line in text.splitlines()}
    assert (
        "weight of the representation loss" in lines["objective.gamma=0.5"]
    )  # the composed value, the comment
    assert (
        "the lr reached at decay_steps" in lines["lr_schedule.min_lr=0.0"]
    )  # the chosen option's own keys
    assert "every random draw" in lines["seed=0"] and "callbacks.samples.cfg_scale=6.0" in lines
