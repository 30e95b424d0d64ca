import pytest
import torch

from selfflow.tokenizers.image import ImagePatchTokenizer


def test_encode_decode_round_trip_is_exact_and_scaled_to_unit_range():
    tokenizer = ImagePatchTokenizer(patch_size=4, channels=3, image_size=(8, 12))
    images = torch.rand(2, 3, 8, 12)
    tokens = tokenizer.encode(images)
    assert tokens.x.shape == (2, 6, 48) and tokenizer.token_channels == 48
    assert tokens.x.min() >= -1 and tokens.x.max() <= 1
    torch.testing.assert_close(tokenizer.decode(tokens.x), images)


def test_token_channels_follow_c_p_q_order_and_positions_are_row_major():
    tokenizer = ImagePatchTokenizer(patch_size=2, channels=2, image_size=4)
    images = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4) / 31
    tokens = tokenizer.encode(images)
    # token 1 is the patch at row 0, column 1: channel 0 pixels (0,2),(0,3),(1,2),(1,3), then
    # channel 1's
    expected = (
        torch.stack([images[0, c, r, col] for c in range(2) for r in (0, 1) for col in (2, 3)]) * 2
        - 1
    )
    torch.testing.assert_close(tokens.x[0, 1], expected)
    assert tokens.pos[0].tolist() == [[0, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 1, 1, 0]]


def test_wrong_shapes_are_explained():
    with pytest.raises(ValueError, match="patch_size=3 must divide"):
        ImagePatchTokenizer(patch_size=3, channels=3, image_size=16)
    tokenizer = ImagePatchTokenizer(patch_size=2, channels=3, image_size=16)
    with pytest.raises(ValueError, match=r"expects \[B, 3, 16, 16\]"):
        tokenizer.encode(torch.rand(1, 1, 16, 16))
