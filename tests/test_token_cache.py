"""Cached tokens: the same tokens as encoding on the fly, and a stale cache is refused."""
import pytest
import torch

from selfflow.data.digits import DigitImages
from selfflow.data.token_cache import CachedTokens, build_token_cache, cache_folder, fingerprint
from selfflow.tokenizers.image import ImagePatchTokenizer


def digits_batches(dataset, tokenizer):
    def batches():
        for start in range(0, len(dataset), 50):
            items = [dataset[i] for i in range(start, min(start + 50, len(dataset)))]
            yield tokenizer.encode(torch.stack([d for d, _ in items])).x, torch.tensor([y for _, y in items])

    return batches


def test_cached_tokens_equal_the_tokenizer_output(tmp_path):
    dataset = DigitImages("test", image_size=8)
    tokenizer = ImagePatchTokenizer(patch_size=2, channels=1, image_size=8)
    tok_cfg = {"_target_": "selfflow.tokenizers.image.ImagePatchTokenizer", "patch_size": 2}
    data_cfg = {"split": "test", "image_size": 8}
    key = fingerprint(tok_cfg, data_cfg)
    folder = build_token_cache(key, digits_batches(dataset, tokenizer), len(dataset), 16, 4, cache_dir=tmp_path)
    cached = CachedTokens(tok_cfg, data_cfg, num_classes=10, cache_dir=str(tmp_path))
    assert cached.folder == folder and len(cached) == len(dataset)
    x, label = cached[7]
    expected = tokenizer.encode(dataset[7][0][None]).x[0]
    torch.testing.assert_close(x, expected, atol=1e-3, rtol=1e-3)  # stored as float16
    assert label == dataset[7][1]


def test_a_changed_autoencoder_file_or_preprocessing_never_reuses_the_cache(tmp_path):
    weights = tmp_path / "ae.pt"
    weights.write_bytes(b"first weights")
    tok_cfg = {"_target_": "x.LatentTokenizer", "autoencoder_path": str(weights)}
    key = fingerprint(tok_cfg, {"image_size": 8})
    folder = cache_folder(key, tmp_path)
    build_token_cache(key, lambda: iter([(torch.zeros(2, 4, 3), torch.tensor([0, 1]))]), 2, 4, 3, cache_dir=tmp_path)
    assert CachedTokens(tok_cfg, {"image_size": 8}, cache_dir=str(tmp_path)).folder == folder
    weights.write_bytes(b"retrained weights")  # same path, different content
    with pytest.raises(FileNotFoundError, match="no token cache for this tokenizer and data"):
        CachedTokens(tok_cfg, {"image_size": 8}, cache_dir=str(tmp_path))
    weights.write_bytes(b"first weights")
    with pytest.raises(FileNotFoundError, match="tools/cache_tokens.py"):
        CachedTokens(tok_cfg, {"image_size": 16}, cache_dir=str(tmp_path))  # other preprocessing
    assert len(CachedTokens(tok_cfg, {"image_size": 8}, cache_dir=str(tmp_path))) == 2


def test_training_reads_the_cache_built_by_the_tool_and_refuses_another_tokenizer(tiny_train_cfg, tmp_path):
    import importlib.util
    from pathlib import Path

    from selfflow.training.build import build_run
    from tests.conftest import TINY

    spec = importlib.util.spec_from_file_location("cache_tokens", Path(__file__).parents[1] / "tools" / "cache_tokens.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    folders = tool.main([*TINY, f"cache_dir={tmp_path / 'cache'}"])
    assert len(folders) == 2 and all((f / "tokens.npy").is_file() for f in folders)

    run = build_run(tiny_train_cfg("cache_tokens=true", f"cache_dir={tmp_path / 'cache'}", "trainer.max_steps=2"))
    assert type(run.datamodule.train_set).__name__ == "CachedTokens" and run.module.tokens_from_cache
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert run.trainer.global_step == 2
    with pytest.raises(FileNotFoundError, match="no token cache"):
        build_run(tiny_train_cfg("cache_tokens=true", f"cache_dir={tmp_path / 'cache'}", "tokenizer.image.patch_size=2"))
