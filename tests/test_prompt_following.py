"""selfflow-prompt-following: prompts judged by a reference classifier, on a tiny
text-conditioned run."""

import json
from pathlib import Path

import pytest
from PIL import Image

from selfflow.cli.prompt_following import prompt_following, prompt_specs
from selfflow.evaluation import prompt_following as tool
from tests.helpers.configs import compose


def run_cli(*overrides: str) -> dict:
    """selfflow-prompt-following with these key=value overrides (conf/prompt_following.yaml)."""
    return prompt_following(compose("prompt_following", list(overrides)))


def test_prompts_parse_to_the_reference_classes_and_defaults_cover_every_class():
    names = [str(i) for i in range(10)]
    assert tool.parse_prompt("a handwritten four=4", names) == ("a handwritten four", 4, None)
    assert tool.parse_prompt("x = y=7", names) == (
        "x = y",
        7,
        None,
    )  # the last '=' separates the class
    with pytest.raises(ValueError, match="TEXT=CLASS"):
        tool.parse_prompt("a handwritten four", names)
    with pytest.raises(ValueError, match="not one of"):
        tool.parse_prompt("a cat=cat", names)
    prompts = tool.default_prompts(names)
    assert {label for _, label, _ in prompts} == set(range(10))
    assert ("a handwritten four", 4, True) in prompts and (
        "a picture of a four",
        4,
        False,
    ) in prompts
    spoken = tool.default_prompts(names, "audio")
    assert ("a voice saying four", 4, True) in spoken and (
        "four, spoken out loud",
        4,
        False,
    ) in spoken
    assert len(spoken) == 40
    from selfflow.data.builtin.captioned import AUDIO_TEMPLATES, DIGIT_TEMPLATES

    for modality, training in (
        ("image", DIGIT_TEMPLATES),
        ("audio", AUDIO_TEMPLATES),
    ):  # "seen" means seen
        assert set(tool.SEEN_TEMPLATES[modality]) <= set(training)
        assert not set(tool.UNSEEN_TEMPLATES[modality]) & set(training)
    summary = tool.summary(
        [{"accuracy": 1.0, "seen_phrasing": True}, {"accuracy": 0.0, "seen_phrasing": False}], 10
    )
    assert summary == {
        "accuracy": 0.5,
        "chance": 0.1,
        "accuracy_seen_phrasings": 1.0,
        "accuracy_unseen_phrasings": 0.0,
    }


def test_the_config_takes_one_prompt_or_a_list_and_names_what_is_missing():
    assert prompt_specs(compose("prompt_following", []).prompt) == []  # null: the default prompts
    one = compose("prompt_following", ["prompt='a handwritten four=4'"])
    assert prompt_specs(one.prompt) == ["a handwritten four=4"]
    many = compose("prompt_following", ["prompt=['a handwritten four=4','the digit 7=7']"])
    assert prompt_specs(many.prompt) == ["a handwritten four=4", "the digit 7=7"]
    defaults = compose("prompt_following", [])
    assert (defaults.per_prompt, defaults.steps, defaults.cfg_scale) == (16, 25, 3.0)
    with pytest.raises(ValueError, match=r"reference=\.\.\. is required"):
        prompt_following(compose("prompt_following", ["ckpt=run.ckpt", "out=out"]))


def test_the_vae_key_reaches_the_checkpoint_loader(tmp_path, monkeypatch):
    """vae= names a latent model's VAE as for selfflow-sample (the path a checkpoint stores is never
    loaded)."""
    import selfflow.interop.checkpoint as checkpoint
    from selfflow.evaluation.reference_classifier import ReferenceCNN

    seen = {}

    def loader(path, weights="ema", vae=None):
        seen.update(path=path, vae=vae)
        raise LookupError("loaded")

    monkeypatch.setattr(checkpoint, "load_checkpoint", loader)
    ReferenceCNN(10, channels=1, image_size=16, width=4).save(tmp_path / "ref")
    with pytest.raises(LookupError, match="loaded"):
        run_cli("ckpt=run.ckpt", f"reference={tmp_path / 'ref'}", "out=o", "vae={image: /vae}")
    assert seen == {"path": Path("run.ckpt"), "vae": {"image": "/vae"}}


@pytest.mark.slow
def test_a_text_run_is_judged_per_prompt_with_a_grid(tiny_train_cfg, tmp_path):
    from selfflow.evaluation.reference_classifier import ReferenceCNN

    ckpt = _trained_checkpoint(
        tiny_train_cfg,
        "experiment=text_digits",
        "data.batch_size=4",
        "callbacks.samples.prompts=[seven]",
    )
    ReferenceCNN(10, channels=1, image_size=16, width=4).save(tmp_path / "ref")
    report = run_cli(
        f"ckpt={ckpt}",
        f"reference={tmp_path / 'ref'}",
        f"out={tmp_path / 'out'}",
        "prompt=['a handwritten four=4','the digit 7=7']",
        "per_prompt=3",
        "steps=2",
    )
    saved = json.loads((tmp_path / "out" / "prompt_following.json").read_text())
    assert saved == report and [p["prompt"] for p in saved["prompts"]] == [
        "a handwritten four",
        "the digit 7",
    ]
    for row in saved["prompts"]:
        correct = sum(p == row["class"] for p in row["predicted"])
        # the accuracy is a float32 share: 1/3 is not Python's 1/3 to the last bit
        assert len(row["predicted"]) == 3 and row["accuracy"] == pytest.approx(correct / 3)
    assert saved["chance"] == 0.1 and saved["accuracy_seen_phrasings"] is None
    assert Image.open(tmp_path / "out" / "prompt_grid.png").size == (
        2 * (2 + 3 * 18),
        2 * (2 + 2 * 18),
    )
    with pytest.raises(ValueError, match="not a text-to-image checkpoint"):
        tool.judge(
            _trained_checkpoint(tiny_train_cfg, run_dir=tmp_path / "plain"),
            ReferenceCNN(10, 1, 16, 4),
            [("four", 4, None)],
            1,
            1,
            1.0,
            0,
        )


def _trained_checkpoint(tiny_train_cfg, *overrides: str, run_dir: Path | None = None) -> Path:
    """The last checkpoint of a 2-step tiny run with these overrides (the digit images
    by default)."""
    from selfflow.training.build import build_run

    cfg = tiny_train_cfg(
        "trainer.max_steps=2", "callbacks.samples.every_n_steps=0", *overrides, run_dir=run_dir
    )
    run = build_run(cfg)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    return Path(cfg.run_dir) / "checkpoints" / "last.ckpt"


@pytest.mark.slow
def test_a_text_to_audio_run_is_judged_by_an_audio_reference(tiny_train_cfg, tmp_path):
    from selfflow.evaluation.reference_classifier import ReferenceCNN

    ckpt = _trained_checkpoint(
        tiny_train_cfg,
        "experiment=text_audio_digits",
        "data.batch_size=4",
        "callbacks.samples.prompts=[seven]",
    )
    ReferenceCNN(
        10, channels=1, image_size=16, width=4, audio={"sample_rate": 8000, "num_samples": 8000}
    ).save(tmp_path / "ref")
    files = [f"ckpt={ckpt}", f"reference={tmp_path / 'ref'}", f"out={tmp_path / 'out'}"]
    report = run_cli(*files, "per_prompt=2", "steps=2")
    assert len(report["prompts"]) == 40 and report["prompts"][0]["prompt"] == "a voice saying zero"
    assert all(len(row["predicted"]) == 2 for row in report["prompts"])
    assert (
        Image.open(tmp_path / "out" / "prompt_grid.png").size[0] > 400
    )  # one spectrogram per prompt
    with pytest.raises(ValueError, match="not a text-to-image checkpoint"):
        tool.judge(ckpt, ReferenceCNN(10, 1, 16, 4), [("four", 4, None)], 1, 1, 1.0, 0)
