"""Published video and audio VAEs as tokenizers (tokenizer=video_vae / audio_vae): tiny randomly
initialised instances of the real diffusers classes, saved with save_pretrained; tokens in latent
time, scale and shift from the VAE's config, the VAE refused by fingerprint and never loaded from a
stored path, and the whole way through selfflow-train, selfflow-cache and selfflow-sample."""

import json
import os
import shutil
import subprocess
import wave

import pytest
import torch
from einops import rearrange
from omegaconf import OmegaConf

from selfflow.data.shards.latent_cache import LatentCache
from selfflow.io.model_folders import vae_fingerprint
from selfflow.tokenizers.audio_vae import AudioVaeTokenizer
from selfflow.tokenizers.autoencoders import AUTOENCODERS
from selfflow.tokenizers.pretrained import point_parts
from selfflow.tokenizers.video_vae import VideoVaeTokenizer
from tests.helpers.files import TINY_VIDEO_VAES, write_tiny_audio_vae, write_tiny_video_vae

# latents_mean / latents_std of the tiny Wan VAE's config (tests.helpers.files.TINY_VIDEO_VAES)
WAN_MEAN_STD = ([0.1, -0.2, 0.3, 0.0], [0.5, 1.0, 2.0, 4.0])
# moving digits as 5 grey frames of 16x16 (Wan: 1 + 4k frames), few clips
VIDEO_DATA = [
    "experiment=video_digits",
    "tokenizer=video_vae",
    "data.dataset.num_frames=5",
    "data.dataset.clips_train=40",
    "data.dataset.clips_test=8",
]
# spoken digits, 1 s at 8 kHz, 2 voices; tokens of 20 latent frames (50 tokens)
AUDIO_DATA = [
    "experiment=audio_digits",
    "tokenizer=audio_vae",
    "tokenizer.audio.patch_frames=20",
    "data.dataset.voices=[en+m1,en+f1]",
    "data.dataset.takes=3",
    "data.dataset.test_takes=1",
]


@pytest.fixture(scope="module")
def video_vae(tmp_path_factory):
    return write_tiny_video_vae(tmp_path_factory.mktemp("wan") / "tiny-wan")


@pytest.fixture(scope="module")
def audio_vae(tmp_path_factory):
    return write_tiny_audio_vae(tmp_path_factory.mktemp("oobleck") / "tiny-oobleck")


def video_tokenizer(folder, **options) -> VideoVaeTokenizer:
    geometry = {"channels": 1, "num_frames": 5, "image_size": 16, "patch_size": 2, **options}
    return VideoVaeTokenizer(folder, **geometry)


def test_video_tokens_are_tubelets_of_the_normalised_latent_in_latent_time(video_vae):
    tokenizer = video_tokenizer(video_vae).eval()
    assert tokenizer.latent_shape == (4, 2, 4, 4) and tokenizer.token_channels == 16
    clips = torch.rand(2, 5, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    mean, std = tokenizer.posterior(clips)  # [2, 4, 2, 4, 4]: 1 + 4k frames -> 1 + k latent frames
    shift, spread = (torch.tensor(v).view(1, 4, 1, 1, 1) for v in WAN_MEAN_STD)

    def tokens_of(z):  # Wan's normalisation: (z - latents_mean) / latents_std, per channel
        return rearrange((z - shift) / spread, "b c t (h p) (w q) -> b (t h w) (c p q)", p=2, q=2)

    expected = tokens_of(mean)
    tokens = tokenizer.encode(clips)
    torch.testing.assert_close(tokens.x, expected)
    # ids (t, h, w, 0): t counts latent frames, not video frames
    assert tokens.pos[0, :, 0].tolist() == [0] * 4 + [1] * 4
    assert tokens.pos[0, :4, 1:].tolist() == [[0, 0, 0], [0, 1, 0], [1, 0, 0], [1, 1, 0]]
    decoded = tokenizer.decode(tokens.x)
    assert decoded.shape == (2, 5, 1, 16, 16) and decoded.min() >= 0 and decoded.max() <= 1
    torch.testing.assert_close(tokenizer.encode(mean).x, expected)  # cached latents: by shape
    longer = tokenizer.at_frames(9)  # selfflow-sample frames=9: 3 latent frames
    assert longer.positions(1)[0, :, 0].unique().tolist() == [0, 1, 2]
    assert longer.decode(longer.encode(torch.rand(1, 9, 1, 16, 16)).x).shape[1] == 9
    tokenizer.train()  # training draws from the posterior: mean + std * noise
    with torch.random.fork_rng():
        torch.manual_seed(0)
        drawn = tokenizer.encode(clips).x
        torch.manual_seed(0)
        torch.testing.assert_close(drawn, tokens_of(mean + std * torch.randn_like(std)))


def test_a_clip_the_video_vae_cannot_encode_is_refused_naming_the_key(video_vae):
    frames = r"data.dataset.num_frames=8: .*1 \+ 4k frames.* 1, 5, 9, 13"
    with pytest.raises(ValueError, match=frames):
        video_tokenizer(video_vae, num_frames=8)
    with pytest.raises(ValueError, match="data.dataset.image_size=18 must be a multiple of 4"):
        video_tokenizer(video_vae, image_size=18)
    with pytest.raises(ValueError, match="data.dataset.channels=2: .* takes 3-channel frames"):
        video_tokenizer(video_vae, channels=2)
    with pytest.raises(ValueError, match=r"takes clips \[B, 5, 1, 16, 16\] or cached latents"):
        video_tokenizer(video_vae).encode(torch.rand(1, 4, 1, 16, 16))


def test_scale_and_shift_come_from_the_vae_config_and_can_be_overridden(video_vae, tmp_path):
    from hydra.utils import instantiate

    from selfflow.training.validate import tokenizer_configs
    from tests.helpers.configs import compose_plain

    cfg = compose_plain([*VIDEO_DATA, f"tokenizer.video.vae={video_vae}"], tmp_path)
    tokenizer = instantiate(tokenizer_configs(cfg)["video"])  # geometry from the data config
    assert (tokenizer.num_frames, tokenizer.channels, tokenizer.image_size) == (5, 1, 16)
    assert tokenizer.shift == [0.1, -0.2, 0.3, 0.0] and tokenizer.scale == [2.0, 1.0, 0.5, 0.25]
    plain = video_tokenizer(video_vae, scale=1.0, shift=0.0, patch_size=1).eval()
    clips = torch.rand(1, 5, 1, 16, 16)
    mean, _ = plain.posterior(clips)
    torch.testing.assert_close(plain.encode(clips).x, rearrange(mean, "b c t h w -> b (t h w) c"))
    with pytest.raises(ValueError, match=r"tokenizer.video.scale must be one finite number or 4"):
        video_tokenizer(video_vae, scale=[1.0, 2.0])
    cog = write_tiny_video_vae(tmp_path / "cog", kind="AutoencoderKLCogVideoX", scaling_factor=0.7)
    assert video_tokenizer(cog, num_frames=9).scale == [0.7] * 4  # CogVideoX: its scaling_factor
    # 5 frames encode into 2 latent frames, which CogVideoX decodes into 8: refused
    with pytest.raises(ValueError, match=r"encodes 1 \+ 8k frames; .* one of 1, 9, 17, 25"):
        video_tokenizer(cog, num_frames=5)


@pytest.mark.parametrize("kind", sorted(TINY_VIDEO_VAES))
def test_each_published_video_vae_class_loads_with_the_geometry_of_its_table_row(kind, tmp_path):
    folder = write_tiny_video_vae(tmp_path / kind, kind=kind)
    geometry = AUTOENCODERS[kind].geometry(json.loads((folder / "config.json").read_text()))
    frames = geometry.valid_steps(2)[1]  # two latent frames (CogVideoX: three)
    tokenizer = video_tokenizer(folder, num_frames=frames, channels=3).eval()
    clips = torch.rand(1, frames, 3, 16, 16)
    mean, _ = tokenizer.posterior(clips)
    assert mean.shape[1:] == tokenizer.latent_shape  # the row predicts what the VAE makes
    assert tokenizer.decode(tokenizer.encode(clips).x).shape == clips.shape


def test_audio_tokens_are_latent_frames_in_latent_time_and_decode_to_the_clip(audio_vae):
    tokenizer = AudioVaeTokenizer(audio_vae, sample_rate=8000, duration=1.0, patch_frames=20).eval()
    assert tokenizer.latent_shape == (4, 1000) and tokenizer.token_channels == 80
    waves = torch.rand(2, 1, 8000, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean, _ = tokenizer.posterior(waves)
    tokens = tokenizer.encode(waves)
    torch.testing.assert_close(tokens.x, rearrange(mean, "b c (t p) -> b t (c p)", p=20))
    assert tokens.pos[0, :, 0].tolist() == list(range(50)) and not tokens.pos[..., 1:].any()
    assert tokenizer.decode(tokens.x).shape == (2, 8000)
    torch.testing.assert_close(tokenizer.encode(mean).x, tokens.x)  # cached latents
    short = AudioVaeTokenizer(audio_vae, sample_rate=8000, duration=0.9995)  # 7996 samples
    assert short.latent_shape == (4, 1000)  # padded with silence to whole latent frames
    assert short.decode(short.encode(waves[..., :7996]).x).shape[1] == 7996  # cut back
    with pytest.raises(ValueError, match="data.dataset.sample_rate=16000: .* works at 8000 Hz"):
        AudioVaeTokenizer(audio_vae, sample_rate=16000)
    with pytest.raises(ValueError, match="tokenizer.audio.patch_frames=3 must divide the 1000"):
        AudioVaeTokenizer(audio_vae, sample_rate=8000, patch_frames=3)


def test_the_vaes_are_held_outside_the_module_state_and_move_with_it(video_vae, audio_vae):
    for tokenizer in (video_tokenizer(video_vae), AudioVaeTokenizer(audio_vae, sample_rate=8000)):
        assert tokenizer.state_dict() == {} and list(tokenizer.parameters()) == []
        tokenizer.to(torch.float64)
        assert tokenizer.vae.dtype == torch.float64


def test_a_changed_folder_is_refused_by_fingerprint_before_anything_loads(
    video_vae,
    tmp_path,
    monkeypatch,
):
    import selfflow.tokenizers.autoencoders as autoencoders

    folder = shutil.copytree(video_vae, tmp_path / "vae")
    trained_with = vae_fingerprint(folder)
    assert vae_fingerprint(shutil.copytree(folder, tmp_path / "moved")) == trained_with  # content
    write_tiny_video_vae(folder, seed=1)  # the same folder, other weights
    monkeypatch.setattr(autoencoders, "load_autoencoder", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(ValueError, match="tokenizer.video.vae=.*vae holds another VAE"):
        video_tokenizer(folder, fingerprint=trained_with)
    with pytest.raises(FileNotFoundError, match="not a diffusers AutoencoderKLWan or .* folder"):
        video_tokenizer(tmp_path / "nothing")
    image_vae = tmp_path / "image-vae"  # a folder of another class is refused by its config alone
    image_vae.mkdir()
    (image_vae / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    other_class = "holds a diffusers AutoencoderKL; the video VAE tokenizer loads"
    with pytest.raises(ValueError, match=other_class):
        video_tokenizer(image_vae)


def test_a_stored_vae_path_is_never_loaded(video_vae, audio_vae, tmp_path):
    video = {"vae": str(tmp_path / "stored-video"), "fingerprint": vae_fingerprint(video_vae)}
    audio = {"vae": str(tmp_path / "stored-audio"), "fingerprint": vae_fingerprint(audio_vae)}
    stored = {
        "tokenizer": {"video": video, "audio": audio},
        "data": {"modality": "video", "dataset": {"vae": str(tmp_path / "stored-video")}},
    }
    with pytest.raises(ValueError, match="pass one path each: vae=\\{audio: PATH, video: PATH\\}"):
        point_parts(OmegaConf.create(stored), str(video_vae), "run.ckpt")
    video_only = OmegaConf.create({**stored, "tokenizer": {"video": stored["tokenizer"]["video"]}})
    with pytest.raises(ValueError, match="a stored path is never loaded: pass vae=PATH"):
        point_parts(video_only, None, "run.ckpt")
    config = OmegaConf.create(stored)
    point_parts(config, {"video": str(video_vae), "audio": str(audio_vae)}, "run.ckpt")
    assert config.tokenizer.video.vae == str(video_vae)
    assert config.tokenizer.audio.vae == str(audio_vae)
    assert config.data.dataset.vae == str(video_vae)  # the video latent cache follows the video VAE
    with pytest.raises(ValueError, match="vae=.*tiny-oobleck holds another VAE"):
        point_parts(OmegaConf.create(stored), dict.fromkeys(["video", "audio"], audio_vae), "x")


def build_cache(*overrides):
    from hydra import compose, initialize_config_module

    from selfflow.training.encode_latents import build_latent_cache

    with initialize_config_module("selfflow.conf", version_base="1.3"):
        return build_latent_cache(compose("cache", overrides=list(overrides)))


CACHE_OPTIONS = [
    "accelerator=cpu",
    "data.num_workers=0",
    "batch_size=5",
    "records_per_shard=7",
    "progress=false",
]


@pytest.mark.slow
def test_the_video_cache_holds_the_posterior_of_each_clip_and_refuses_other_options(
    video_vae,
    tmp_path,
):
    from selfflow.data.builtin.moving_digits import MovingDigits

    vae = f"tokenizer.video.vae={video_vae}"
    out = build_cache(*VIDEO_DATA, vae, f"out_dir={tmp_path / 'c'}", *CACHE_OPTIONS)
    manifest = json.loads((out / "manifest.json").read_text())
    layout = (manifest["modality"], manifest["flips"], manifest["latent_size"])
    assert layout == ("video", 1, [2, 4, 4])
    assert manifest["splits"] == {"train": 40, "test": 8} and manifest["num_frames"] == 5
    options = {"num_frames": 5, "image_size": 16, "channels": 1, "fps": 8.0}
    cache = LatentCache(out, "test", vae=str(video_vae), modality="video", **options)
    clips = MovingDigits("test", num_frames=5, clips_train=40, clips_test=8)
    tokenizer = video_tokenizer(video_vae).eval()
    for i in (0, 7):
        mean, std = tokenizer.posterior(clips[i][0][None])
        moments = torch.stack([mean, std], 1)  # [1 flip, (mean, std), C, T', h, w]
        torch.testing.assert_close(cache.moments(i), moments, atol=2e-3, rtol=2e-3)
    assert cache[3][0].shape == (4, 2, 4, 4)
    other = "made with num_frames=5, but this run asks for data.dataset.num_frames=9"
    with pytest.raises(ValueError, match=other):
        LatentCache(out, vae=str(video_vae), modality="video", **{**options, "num_frames": 9})
    other = "holds video latents, not image; train it with data=video_latent_cache"
    with pytest.raises(ValueError, match=other):
        LatentCache(out, vae=str(video_vae), image_size=16)
    other = "selfflow-cache caches VAE latents: choose tokenizer=video_vae"
    with pytest.raises(ValueError, match=other):
        build_cache("experiment=video_digits", f"out_dir={tmp_path / 'd'}", *CACHE_OPTIONS)


def run(script: str, args: list[str], cwd) -> str:
    """A selfflow console script in a subprocess (the installed entry point); its stdout."""
    exe = shutil.which(script) or script
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    command = [exe, *args]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def train_cache_sample(tmp_path, vae, data: list[str], cached_data: list[str], modality: str):
    """selfflow-train (2 steps), selfflow-cache, selfflow-train on the cache (`cached_data`, 2
    steps) and selfflow-sample of that run's checkpoint; the run folders and the samples folder."""
    from tests.helpers.configs import TINY_SIZES

    key = f"tokenizer.{modality}.vae={vae}"
    tiny = [*TINY_SIZES, "trainer.max_steps=2", "callbacks.samples.every_n_steps=0"]
    run("selfflow-train", [*data, key, *tiny, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    cache = tmp_path / "cache"
    run("selfflow-cache", [*data, key, f"out_dir={cache}", *CACHE_OPTIONS], tmp_path)
    cached = [*cached_data, f"data.root={cache}", key, *tiny]
    run("selfflow-train", [*cached, f"hydra.run.dir={tmp_path / 'cached'}"], tmp_path)
    checkpoint = tmp_path / "cached" / "checkpoints" / "last.ckpt"
    sample = [f"ckpt={checkpoint}", f"vae={vae}", "num_samples=2", "steps=2", "device=cpu"]
    run("selfflow-sample", [*sample, f"out_dir={tmp_path / 'samples'}", "progress=false"], tmp_path)
    return tmp_path / "run", tmp_path / "cached", tmp_path / "samples"


def check_run_stores_no_vae(run_dir, vae, modality: str) -> None:
    from selfflow.interop.checkpoint import load_checkpoint, read_checkpoint

    checkpoint = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert all(k.startswith("objective.") for k in checkpoint["state_dict"])
    stored = checkpoint["selfflow_config"]["tokenizer"][modality]
    assert stored["vae"] == str(vae) and stored["fingerprint"] == vae_fingerprint(vae)
    with pytest.raises(ValueError, match="a stored path is never loaded: pass vae=PATH"):
        load_checkpoint(run_dir / "checkpoints" / "last.ckpt")


@pytest.mark.slow
def test_a_video_vae_trains_caches_trains_from_the_cache_and_samples_mp4(video_vae, tmp_path):
    from selfflow.io.video import read_clip

    cached_data = [
        "experiment=video_digits",
        "tokenizer=video_vae",
        "data=video_latent_cache",
        "data.dataset.num_frames=5",
        "data.dataset.image_size=16",
        "data.dataset.channels=1",
    ]
    runs = train_cache_sample(tmp_path, video_vae, VIDEO_DATA, cached_data, "video")
    for run_dir in runs[:2]:
        check_run_stores_no_vae(run_dir, video_vae, "video")
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["modality"] == "video" and manifest["latent_size"] == [2, 4, 4]
    clips = sorted((runs[2] / "videos").glob("*.mp4"))
    assert len(clips) == 2
    assert len(read_clip(clips[0], 5)) == 5  # decoded by the VAE: 2 latent frames -> 5 frames


@pytest.mark.slow
def test_an_audio_vae_trains_caches_trains_from_the_cache_and_samples_wav(audio_vae, tmp_path):
    cached_data = [
        "experiment=audio_digits",
        "tokenizer=audio_vae",
        "tokenizer.audio.patch_frames=20",
        "data=audio_latent_cache",
        "data.dataset.sample_rate=8000",
    ]
    runs = train_cache_sample(tmp_path, audio_vae, AUDIO_DATA, cached_data, "audio")
    for run_dir in runs[:2]:
        check_run_stores_no_vae(run_dir, audio_vae, "audio")
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["modality"] == "audio" and manifest["latent_size"] == [1000]
    files = sorted((runs[2] / "audio").glob("*.wav"))
    assert len(files) == 2
    with wave.open(str(files[0])) as recording:
        assert (recording.getframerate(), recording.getnframes()) == (8000, 8000)
