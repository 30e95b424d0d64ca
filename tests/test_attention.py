"""FlexAttention (block-sparse) against SDPA with the dense mask, the kernel choice, and the
block-mask cache.

FlexAttention has no backward on CPU (PyTorch 2.11 to 2.14), so CPU tests compare forwards; the
gradient comparison is GPU-marked.
"""

import pytest
import torch

from selfflow.models import attention as attention_module
from selfflow.models.attention import Attention, GroupMask, choose_kernel
from tests.helpers.models import inputs, randomize_zero_init, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile.*")

WIDTH, HEADS, N = 64, 4, 100  # N not a multiple of FlexAttention's 128-token blocks


def packed_groups() -> torch.Tensor:
    """Two packed rows: samples of 30 and 50 tokens then padding; samples of 60 and 40."""
    return torch.tensor([[0] * 30 + [1] * 50 + [-1] * 20, [0] * 60 + [2] * 40])


def separation_groups() -> torch.Tensor:
    """The attention-separation ablation: each token in its noise group (0 or 1, scattered), padding
    at the end."""
    groups = (torch.rand(2, N, generator=torch.Generator().manual_seed(3)) < 0.25).long()
    groups[0, 90:] = -1
    return groups


def text_like_mask() -> GroupMask:
    """Data tokens in two packed samples, then text tokens shared by every group; padding in both
    parts."""
    groups = torch.cat([packed_groups()[:, :80], torch.zeros(2, 20, dtype=torch.long)], dim=1)
    groups[0, 95:] = -1  # text padding
    shared = torch.zeros(2, N, dtype=torch.bool)
    shared[:, 80:] = True
    return GroupMask(groups, shared=shared)


def attention_pair() -> tuple[Attention, Attention]:
    torch.manual_seed(0)
    flex = Attention(WIDTH, HEADS, backend="flex")
    sdpa = Attention(WIDTH, HEADS, backend="sdpa")
    sdpa.load_state_dict(flex.state_dict())
    return flex, sdpa


def valid_queries(mask) -> torch.Tensor:
    """[B, N] bool: queries whose output means something (a query on padding is irrelevant)."""
    if isinstance(mask, GroupMask):
        return mask.groups >= 0
    return torch.ones(mask.shape[0], N, dtype=torch.bool)


@pytest.mark.parametrize(
    "mask",
    [
        GroupMask(packed_groups(), contiguous=True),
        GroupMask(separation_groups()),
        text_like_mask(),
        GroupMask(packed_groups()).dense,
    ],
    ids=["packed_rows", "separation_ablation", "shared_text_tokens", "dense_tensor"],
)
def test_flex_attention_equals_sdpa_with_the_dense_mask(mask):
    flex, sdpa = attention_pair()
    x = torch.randn(2, N, WIDTH, generator=torch.Generator().manual_seed(1))
    rope = (torch.randn(2, 1, N, WIDTH // HEADS // 2), torch.randn(2, 1, N, WIDTH // HEADS // 2))
    with torch.no_grad():
        assert flex.kernel_for(x, mask) == "flex" and sdpa.kernel_for(x, mask) == "sdpa"
        out_flex, out_sdpa = flex(x, rope, mask), sdpa(x, rope, mask)
    valid = valid_queries(mask)
    torch.testing.assert_close(out_flex[valid], out_sdpa[valid], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(out_flex).all()


def test_padding_is_never_a_key_and_a_padding_query_gets_a_finite_output():
    mask = GroupMask(packed_groups(), contiguous=True)
    q, k, v = torch.randn(3, 2, HEADS, N, WIDTH // HEADS).unbind(0)
    with torch.no_grad():
        out = attention_module.run_flex(q, k, v, mask)
        k2, v2 = k.clone(), v.clone()
        k2[0, :, 80:] += 100.0  # the padding of row 0
        v2[0, :, 80:] += 100.0
        changed = attention_module.run_flex(q, k2, v2, mask)
    torch.testing.assert_close(out[0, :, :80], changed[0, :, :80])
    assert torch.all(out[0, :, 80:] == 0)  # a padding query sees no key: zero, not NaN


def test_group_mask_dense_form_of_shared_tokens():
    groups = torch.tensor(
        [[0, 0, 1, -1, 7, -1]],
    )  # two groups, data padding, a text token, text padding
    shared = torch.tensor([[False, False, False, False, True, True]])
    dense = GroupMask(groups, shared=shared).dense[0, 0]
    assert dense[0].tolist() == [
        True,
        True,
        False,
        False,
        True,
        False,
    ]  # own group and the valid text token
    assert dense[4].tolist() == [
        True,
        True,
        True,
        False,
        True,
        False,
    ]  # text sees every valid token
    assert dense[3].tolist() == [
        False,
        False,
        False,
        True,
        False,
        True,
    ]  # padding sees padding only
    assert not GroupMask(groups, contiguous=True, shared=shared).fits_varlen


def test_model_forward_with_flex_equals_sdpa_and_builds_one_block_mask_per_mask(monkeypatch):
    built = []
    create = attention_module.create_block_mask
    monkeypatch.setattr(
        attention_module,
        "create_block_mask",
        lambda *a, **kw: built.append(1) or create(*a, **kw),
    )
    tokens, labels = inputs(batch=2)
    levels, index = torch.rand(2, 2), (torch.rand(2, 16) < 0.25).long()
    for groups in (
        torch.tensor([[0] * 6 + [1] * 7 + [-1] * 3, [0] * 16]),
        torch.where(index.bool(), 1, 0),
    ):
        outs = []
        for backend in ("flex", "sdpa"):
            model = tiny_model(attention=backend, width=32, depth=3)
            randomize_zero_init(model)
            with torch.no_grad():
                out = model(tokens, levels, index, labels, attn_mask=GroupMask(groups))
                outs.append(out.velocity)
        valid = groups >= 0
        torch.testing.assert_close(outs[0][valid], outs[1][valid], rtol=1e-5, atol=1e-5)
    assert len(built) == 2  # one block mask per mask object, reused by the model's 3 blocks


def test_auto_picks_flex_for_masked_attention_on_cuda_only():
    packed, bf16 = GroupMask(packed_groups(), contiguous=True), torch.bfloat16
    dense = packed.dense
    assert choose_kernel("auto", "cpu", torch.float32, packed, flash_installed=False) == "sdpa"
    assert choose_kernel("auto", "cuda", bf16, packed, flash_installed=False) == "flex"
    assert choose_kernel("auto", "cuda", bf16, dense, flash_installed=False) == "flex"
    assert choose_kernel("auto", "cuda", bf16, None, flash_installed=False) == "sdpa"
    assert choose_kernel("auto", "cuda", bf16, packed, flash_installed=True) == "flash"
    separation = GroupMask(separation_groups())
    assert choose_kernel("auto", "cuda", bf16, separation, flash_installed=True) == "flex"
    assert choose_kernel("sdpa", "cuda", bf16, packed, flash_installed=False) == "sdpa"
    assert choose_kernel("flex", "cpu", torch.float32, packed, flash_installed=False) == "flex"
    assert choose_kernel("flex", "cpu", torch.float32, None, flash_installed=False) == "sdpa"


def test_flex_on_cpu_refuses_training_with_a_message_naming_the_option():
    flex, _ = attention_pair()
    x = torch.randn(2, N, WIDTH)
    with pytest.raises(ValueError, match="model.attention=flex cannot train on CPU"):
        flex(x, mask=GroupMask(packed_groups()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "groups",
    [packed_groups(), separation_groups()],
    ids=["packed_rows", "separation_ablation"],
)
def test_compiled_flex_attention_matches_sdpa_forward_and_gradients_on_gpu(groups):
    flex, sdpa = (module.cuda() for module in attention_pair())
    mask = GroupMask(groups.cuda())
    x = torch.randn(2, N, WIDTH, device="cuda", requires_grad=True)
    assert flex.kernel_for(x, mask) == "flex"
    valid = mask.groups >= 0
    results = []
    for module in (flex, sdpa):
        out = module(x, mask=mask)
        loss = (out * valid[..., None]).square().sum()
        results.append((out, *torch.autograd.grad(loss, (x, module.qkv.weight))))
    assert all(torch.isfinite(ours).all() for ours in results[0])
    torch.testing.assert_close(results[0][0][valid], results[1][0][valid], rtol=1e-4, atol=1e-4)
    for ours, reference in zip(results[0][1:], results[1][1:]):
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)
