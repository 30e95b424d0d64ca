import pytest
import torch

from selfflow.models.transformer import SelfFlowTransformer
from selfflow.objectives.ema import EMA
from selfflow.objectives.representation import cosine_distance
from selfflow.objectives.selfflow import SelfFlowObjective, default_layers
from selfflow.tokenizers.image import ImagePatchTokenizer
from selfflow.tokens import Condition
from tests.helpers.models import randomize_zero_init


def make_objective(**kwargs) -> SelfFlowObjective:
    torch.manual_seed(0)
    model = SelfFlowTransformer({"image": 12}, width=32, depth=4, heads=2, num_classes=10)
    randomize_zero_init(model)
    return SelfFlowObjective(model, **{"ema_decay": 0.9, **kwargs})


def batch(b=6):
    tokenizer = ImagePatchTokenizer(patch_size=2, channels=3, image_size=8)
    return tokenizer.encode(torch.rand(b, 3, 8, 8)), Condition(torch.randint(0, 10, (b,)))


class Recorder:
    """Records the arguments of every forward of a module."""

    def __init__(self, module):
        self.calls = []
        module.register_forward_pre_hook(
            lambda m, args, kwargs: self.calls.append((args, kwargs)),
            with_kwargs=True,
        )


def test_default_layers_match_the_paper_at_xl_depth():
    assert default_layers(28) == (8, 20)
    assert default_layers(4) == (1, 3)


def test_vanilla_settings_give_plain_flow_matching():
    objective = make_objective(mask_ratio=0.0, gamma=0.0)
    student, teacher = Recorder(objective.model), Recorder(objective.teacher.module)
    tokens, labels = batch()
    out = objective(tokens, labels)
    assert out.loss_rep is None and objective.head is None
    assert len(student.calls) == 1 and len(teacher.calls) == 0  # no teacher forward at all
    (noised, levels, index, condition), _ = student.calls[0]
    x_t = noised.x
    per_token = torch.gather(levels, 1, index)
    assert torch.all(per_token == per_token[:, :1])  # one level per sample
    t = per_token[..., None]
    x1 = (x_t - (1 - t) * tokens.x) / t  # recover the noise from the student's input
    with torch.no_grad():
        velocity = objective.model(noised, levels, index, condition).velocity
    torch.testing.assert_close(
        out.loss,
        ((velocity - (x1 - tokens.x)) ** 2).mean(),
        rtol=1e-4,
        atol=1e-5,
    )
    torch.testing.assert_close(out.loss, out.loss_flow)


def test_teacher_sees_the_cleaner_view_of_the_same_sample_and_noise():
    objective = make_objective(mask_ratio=0.25, gamma=0.8, class_dropout=0.5)
    student, teacher = Recorder(objective.model), Recorder(objective.teacher.module)
    tokens, labels = batch(16)
    out = objective(tokens, labels)
    (student_tokens, levels, index, student_condition), _ = student.calls[0]
    teacher_args, teacher_kwargs = teacher.calls[0]
    teacher_tokens, teacher_levels, teacher_index, teacher_condition = teacher_args
    x_t, teacher_x = student_tokens.x, teacher_tokens.x
    per_token = torch.gather(levels, 1, index)  # [B, N]
    assert torch.all(index.sum(dim=1) == 4)  # 25% of 16 tokens
    assert torch.all(teacher_index == 0) and teacher_levels.shape == (16, 1)  # one level a sample
    assert torch.all(teacher_levels <= per_token)  # never noisier than the student on any token
    torch.testing.assert_close(teacher_levels[:, 0], levels.min(dim=1).values)
    # one shared noise draw: the teacher input lies on the same straight path as the student's
    t = per_token[..., None]
    x1 = (x_t - (1 - t) * tokens.x) / t
    tt = teacher_levels[..., None]
    torch.testing.assert_close(teacher_x, (1 - tt) * tokens.x + tt * x1, rtol=1e-4, atol=1e-4)
    # the same condition (labels per sample, one dropout draw) for both views, expanded to each
    # view's levels
    assert student_condition is teacher_condition and student_condition.labels.shape == (16, 1)
    student_ids = objective.model.label_ids(student_condition.labels, levels)
    teacher_ids = objective.model.label_ids(teacher_condition.labels, teacher_levels)
    assert student_ids.shape == (16, 1) and torch.equal(student_ids[:, 0], teacher_ids[:, 0])
    dropped = student_ids == 10  # some labels dropped to the null class, not all
    assert dropped.any() and not dropped.all()
    assert teacher_kwargs["stop_after"] == objective.teacher_layer == 3
    torch.testing.assert_close(out.loss, out.loss_flow + 0.8 * out.loss_rep)
    assert 0 <= out.loss_rep <= 2


def test_gradients_reach_student_and_head_but_not_teacher():
    objective = make_objective()
    tokens, labels = batch()
    objective(tokens, labels).loss.backward()
    assert objective.model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert objective.head.linear1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in objective.teacher.parameters())


def test_cosine_loss_is_over_the_feature_axis():
    a = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # [B=1, N=2, D=2]
    assert torch.allclose(cosine_distance(a, a), torch.zeros(1, 2))
    assert torch.allclose(cosine_distance(a, -a), torch.full((1, 2), 2.0))
    b = torch.tensor([[[3.0, 0.0], [0.0, 5.0]]])  # same directions per token, different norms
    assert torch.allclose(cosine_distance(a, b), torch.zeros(1, 2), atol=1e-6)
    # over the token axis these would not be parallel; the loss must not see that
    c = torch.tensor([[[1.0, 0.0], [0.0, -1.0]]])
    assert torch.allclose(cosine_distance(a, c), torch.tensor([[0.0, 2.0]]))


def test_ema_update_follows_the_decay():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9, warmup=False)
    before = ema.module.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.module.weight, 0.9 * before + 0.1 * model.weight)
    assert int(ema.num_updates) == 1
    warm = EMA(model, decay=0.999, warmup=True)
    assert warm.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)


def test_invalid_objective_settings_name_the_key():
    with pytest.raises(ValueError, match="objective.student_layer=3 and objective.teacher_layer=2"):
        make_objective(student_layer=3, teacher_layer=2)
    with pytest.raises(ValueError, match="teacher_layer=9"):
        make_objective(student_layer=1, teacher_layer=9)
    with pytest.raises(ValueError, match="objective.gamma"):
        make_objective(gamma=-1)
    with pytest.raises(ValueError, match=r"objective.mask_ratio=0.7 is out of range"):
        make_objective(mask_ratio=0.7)
    with pytest.raises(ValueError, match=r"objective.mask_ratio.image=0.6"):
        make_objective(mask_ratio={"image": 0.6})
    with pytest.raises(ValueError, match=r"no value for modalities \['image'\]"):
        make_objective(mask_ratio={"audio": 0.5})
    with pytest.raises(ValueError, match="ema_decay"):
        make_objective(ema_decay=1.0)


def test_projection_head_starts_like_the_released_projector():
    """xavier-uniform weights and zero biases (PyTorch's default would give non-zero biases)."""
    import math

    from selfflow.objectives.representation import ProjectionHead

    torch.manual_seed(0)
    head = ProjectionHead(64)
    for linear in (head.linear1, head.linear2):
        assert not linear.bias.any()
        fan_out, fan_in = linear.weight.shape
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        assert linear.weight.abs().max() <= bound and linear.weight.abs().max() > 0.9 * bound
