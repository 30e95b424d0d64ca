"""Files from others, second round: code named by a shared file (a TorchScript autoencoder path in a
stored config) and sizes read from a file (a released checkpoint's depth and width, an .npz header).
Each hostile file is built here; each test asserts a one-line refusal and that nothing else happened
(no marker file, no allocation past a memory limit)."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from selfflow.interop.checkpoint import load_checkpoint
from selfflow.interop.export import EXPORT_CONFIG, export_weights
from selfflow.io.sizes import FileSizeError, bounded_bytes, bounded_size
from selfflow.tokenizers.latent import AudioLatentTokenizer
from selfflow.tokenizers.pretrained import check_part
from tests.helpers.hostile import (
    PlainAutoencoder,
    assert_one_line_exit_2,
    autoencoder_writing_on_load,
    crafted,
    lines_of,
    one_line,
    run_bounded,
    run_cli,
)

LATENT_TOKENIZERS = {
    "audio": {"_target_": "selfflow.tokenizers.latent.AudioLatentTokenizer", "sample_rate": 8000},
    "video": {
        "_target_": "selfflow.tokenizers.latent.VideoLatentTokenizer",
        "num_frames": 2,
        "image_size": 8,
    },
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def naming_an_autoencoder(kind: str, path: Path, fingerprint: str | None = None):
    """An edit of a stored config: its image tokenizer becomes a latent tokenizer naming the file
    `path`."""
    spec = {**LATENT_TOKENIZERS[kind], "autoencoder_path": str(path)}
    if fingerprint is not None:
        spec["fingerprint"] = fingerprint
    return lambda config: config["tokenizer"].update(image=spec)


def exported_with(tiny_checkpoint: Path, folder: Path, edit) -> Path:
    """An export of the tiny checkpoint whose config.json `edit` changed."""
    export_weights(tiny_checkpoint, folder)
    meta = json.loads((folder / EXPORT_CONFIG).read_text())
    edit(meta["config"])
    (folder / EXPORT_CONFIG).write_text(json.dumps(meta))
    return folder


# --- code named by a file: stored autoencoder paths are never loaded ------------------------------


@pytest.mark.parametrize("kind", sorted(LATENT_TOKENIZERS))
def test_a_stored_autoencoder_path_is_never_loaded_from_a_checkpoint_or_an_export(
    tiny_checkpoint,
    tmp_path,
    kind,
):
    marker = tmp_path / "pwned"
    evil = autoencoder_writing_on_load(tmp_path / "autoencoder.pt", marker)
    # even with its own fingerprint stored beside it
    edit = naming_an_autoencoder(kind, evil, sha256(evil))
    checkpoint = crafted(tiny_checkpoint, tmp_path / "evil.ckpt", edit)
    export = exported_with(tiny_checkpoint, tmp_path / "export", edit)
    for source in (checkpoint, export):
        with pytest.raises(ValueError) as refused:
            load_checkpoint(source)
        assert "a stored path is never loaded: pass vae=PATH" in one_line(refused.value)
        assert "tokenizer.image.autoencoder_path=" in str(refused.value)
    assert not marker.exists()


@pytest.mark.parametrize("kind", sorted(LATENT_TOKENIZERS))
def test_an_autoencoder_the_user_names_is_refused_before_it_loads_when_its_fingerprint_differs(
    tiny_checkpoint, tmp_path, kind
):
    marker = tmp_path / "pwned"
    evil = autoencoder_writing_on_load(tmp_path / "autoencoder.pt", marker)
    trained_with = "0" * 64
    edit = naming_an_autoencoder(kind, evil, trained_with)
    checkpoint = crafted(tiny_checkpoint, tmp_path / "evil.ckpt", edit)
    with pytest.raises(ValueError) as refused:
        load_checkpoint(checkpoint, vae=str(evil))
    expected = f"vae={evil} holds another autoencoder (fingerprint {sha256(evil)[:16]})"
    assert expected in one_line(refused.value)
    # the tokenizer itself checks before torch.jit.load, whoever builds it
    with pytest.raises(ValueError, match="holds another autoencoder"):
        AudioLatentTokenizer(str(evil), fingerprint=trained_with)
    assert not marker.exists()


def test_an_autoencoder_fingerprint_is_the_sha256_of_its_file_taken_at_construction(tmp_path):
    path = tmp_path / "plain.pt"
    torch.jit.save(torch.jit.script(PlainAutoencoder()), str(path))
    tokenizer = AudioLatentTokenizer(str(path), fingerprint=sha256(path))
    assert tokenizer.fingerprint == sha256(path)
    moved = shutil.copy(path, tmp_path / "moved.pt")  # the same file elsewhere is the same part
    assert check_part(moved, sha256(path), "autoencoder_path", "vae") == sha256(path)


@pytest.mark.slow
def test_sample_cli_refuses_a_stored_autoencoder_path_in_one_line(tiny_checkpoint, tmp_path):
    marker = tmp_path / "pwned"
    evil = autoencoder_writing_on_load(tmp_path / "autoencoder.pt", marker)
    edit = naming_an_autoencoder("audio", evil)
    checkpoint = crafted(tiny_checkpoint, tmp_path / "evil.ckpt", edit)
    arguments = [f"ckpt={checkpoint}", f"out_dir={tmp_path / 'out'}"]
    result = run_cli("selfflow.cli.sample", arguments, tmp_path)
    assert_one_line_exit_2(result, "selfflow-sample", "a stored path is never loaded")
    assert not marker.exists()


# --- sizes read from a file: one bound helper -----------------------------------------------------


def test_sizes_read_from_a_file_are_whole_numbers_within_their_bound_and_products_never_wrap():
    assert bounded_size(3, 4, "f n") == 3 and bounded_size(2.0, 4, "f n") == 2
    for value, message in (
        (5, "outside \\[1, 4\\]"),
        (True, "not a whole number"),
        ("3", "not a whole number"),
    ):
        with pytest.raises(FileSizeError, match=f"f n is .*{message}"):
            bounded_size(value, 4, "f n")
    assert bounded_bytes([2, 3], 4, 24, "f x") == 24
    expected = "declares \\[64, 4096, 4096, 3\\] \\(3,221,225,472 bytes\\)"
    with pytest.raises(FileSizeError, match=expected):
        bounded_bytes([64, 4096, 4096, 3], 1, 1 << 30, "f x")
    with pytest.raises(FileSizeError):  # 2**64 elements: a product in int64 would wrap to 0
        bounded_bytes([2**32, 2**32], 1, 1 << 40, "f x")


# --- released checkpoints: sizes bounded, keys checked, the model built on meta first -------------


def test_a_released_checkpoint_naming_block_99999_is_refused_under_a_memory_limit(tmp_path):
    from tests.helpers.released import GRID, numpy_sincos_grid, released_state_dict

    state = released_state_dict()
    state["blocks.99999.attn.qkv.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "huge-depth.pt")
    wide = released_state_dict()  # every key of a 2-block model, a width of 16384 claimed by two
    wide["x_embedder.proj.weight"] = torch.zeros(16384, 16)
    wide["pos_embed"] = torch.from_numpy(numpy_sincos_grid(16384, GRID)).float()[None]
    torch.save(wide, tmp_path / "huge-width.pt")
    output = run_bounded(f"""
        from selfflow.interop.official import load_official
        for name in ("huge-depth", "huge-width"):
            load = lambda: load_official("{tmp_path}/" + name + ".pt", heads=2)
            print(name + ":", refusal(load))
        """)
    outcome = lines_of(output)
    depth_refused = "huge-depth.pt: the block count is 100000, outside [1, 512]"
    assert depth_refused in outcome["huge-depth"], output
    assert "does not fit this model" in outcome["huge-width"], output  # on meta: nothing allocated


def test_a_partial_released_checkpoint_names_the_missing_entry():
    from selfflow.interop.official import load_official
    from tests.helpers.released import released_state_dict

    state = released_state_dict()
    del state["final_layer.linear.weight"]
    with pytest.raises(ValueError) as refused:
        load_official(state, heads=2)
    assert "has no tensor 'final_layer.linear.weight'" in one_line(refused.value)
    state = released_state_dict()
    del state["blocks.1.mlp.fc2.bias"]
    expected = "no tensor 'blocks.1.mlp.fc2.bias' \\(1 of the 32 entries"
    with pytest.raises(ValueError, match=expected):
        load_official(state, heads=2)


# --- .npz headers: the declared bytes must fit in what the member holds ---------------------------


def npz_with_header(
    path: Path,
    shape: tuple[int, ...],
    data: bytes = b"",
    compress: int = zipfile.ZIP_STORED,
) -> Path:
    """An .npz whose arr_0 header declares uint8 `shape`, followed by `data` only."""
    header = io.BytesIO()
    fields = {"descr": "|u1", "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(header, fields)
    with zipfile.ZipFile(path, "w", compression=compress) as archive:
        archive.writestr("arr_0.npy", header.getvalue() + data)
    return path


def test_an_npz_header_declaring_more_than_its_member_holds_is_refused_under_a_memory_limit(
    tmp_path,
):
    npz_with_header(tmp_path / "huge.npz", (64, 4096, 4096, 3), b"\0" * 1000)
    zeros = b"\0" * (64 << 20)
    npz_with_header(tmp_path / "bomb.npz", (64, 4096, 4096, 3), zeros, zipfile.ZIP_DEFLATED)
    np.savez(tmp_path / "real.npz", np.zeros((3, 8, 8, 3), np.uint8))
    np.savez_compressed(tmp_path / "packed.npz", np.zeros((3, 8, 8, 3), np.uint8))
    output = run_bounded(f"""
        from selfflow.evaluation.image_batches import npz_images
        for name in ("huge", "bomb", "real", "packed"):
            path = "{tmp_path}/" + name + ".npz"
            print(name + ":", refusal(lambda: sum(len(b) for b in npz_images(path).batches(64))))
        """)
    outcome = lines_of(output)
    assert "declares [64, 4096, 4096, 3] (3,221,225,472 bytes)" in outcome["huge"], output
    # deflate bounds what 64 MB can expand to
    assert "declares [64, 4096, 4096, 3]" in outcome["bomb"], output
    assert outcome["real"] == outcome["packed"] == "loaded", output


# --- a checkpoint's data position is data like any other ------------------------------------------


CRAFTED_POSITIONS = ["ab", ["epoch"], {"epoch": 1}, {"epoch": -1, "batches_done": 0}]


@pytest.mark.parametrize("state", CRAFTED_POSITIONS)
def test_a_crafted_data_position_in_a_checkpoint_is_refused_in_one_line(state):
    from selfflow.data.batching.order import stored_position
    from selfflow.training.mixture import MixtureDataModule

    with pytest.raises(ValueError) as refused:
        stored_position(state)
    assert "the checkpoint's data position" in one_line(refused.value)
    assert "resume from a checkpoint selfflow wrote" in str(refused.value)
    mixture = MixtureDataModule.__new__(MixtureDataModule)  # the load path of both data modules
    with pytest.raises(ValueError, match="the checkpoint's data position"):
        mixture.load_state_dict(state)
    assert stored_position({}) is None and stored_position({"epoch": 2, "batches_done": 5}) == {
        "epoch": 2,
        "batches_done": 5,
    }
