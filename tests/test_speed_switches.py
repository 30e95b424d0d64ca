"""Each memory/speed switch is a config key that trains and does what it says."""

import csv
from pathlib import Path

import pytest
import torch

from selfflow.tokens import Condition
from selfflow.training.build import build_run


def fit(cfg):
    run = build_run(cfg)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    return run


def test_bf16_mixed_precision_runs_matmuls_in_bf16_and_keeps_fp32_weights(tiny_train_cfg):
    run = build_run(tiny_train_cfg("trainer.precision=bf16-mixed", "trainer.max_steps=2"))
    seen = []
    run.module.model.blocks[0].attn.qkv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert torch.bfloat16 in seen
    assert all(p.dtype == torch.float32 for p in run.module.parameters())
    assert all(torch.isfinite(p).all() for p in run.module.model.parameters())


def test_gradient_accumulation_updates_the_ema_and_logs_the_learning_rate_once_per_optimizer_step(
    tiny_train_cfg,
):
    run = fit(tiny_train_cfg("trainer.accumulate_grad_batches=2", "trainer.max_steps=3"))
    assert run.trainer.global_step == 3
    assert int(run.module.objective.teacher.num_updates) == 3
    with open(Path(run.run_dir) / "metrics.csv") as f:
        logged = [
            (int(row["step"]), float(row["lr-AdamW"]))
            for row in csv.DictReader(f)
            if row.get("lr-AdamW")
        ]
    assert [step for step, _ in logged] == [
        0,
        1,
        2,
    ]  # one learning rate per step, not one per micro-batch
    assert logged[0][1] < logged[1][1] < logged[2][1]  # the warm-up


@pytest.mark.parametrize("switch, forwards_per_step", [("false", 1), ("true", 2)])
def test_activation_checkpointing_switch_recomputes_the_blocks_in_training(
    tiny_train_cfg, switch, forwards_per_step
):
    run = build_run(
        tiny_train_cfg(
            f"model.activation_checkpointing={switch}",
            "trainer.max_steps=2",
            "callbacks.samples.every_n_steps=0",
            "~callbacks.probe",
        )
    )
    from tests.helpers.models import count_calls

    calls = []
    count_calls(
        run.module.model.blocks[-1].mlp, calls
    )  # the student's last block (the teacher is its own copy)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert run.trainer.global_step == 2 and len(calls) == 2 * forwards_per_step


def test_teacher_forward_stops_at_its_layer(tiny_train_cfg):
    run = build_run(
        tiny_train_cfg(
            "model.depth=4",
            "objective.student_layer=1",
            "objective.teacher_layer=3",
            "trainer.max_steps=1",
        )
    )
    calls = {"teacher": [], "student": []}
    for name, model in (("teacher", run.module.ema_model), ("student", run.module.model)):
        for number, block in enumerate(model.blocks, start=1):
            block.register_forward_hook(lambda m, i, o, n=number, who=name: calls[who].append(n))
        model.final_layers["image"].register_forward_hook(
            lambda m, i, o, who=name: calls[who].append("head")
        )
    batch = next(iter(run.datamodule.train_dataloader()))
    tokens = run.module.tokenizers["image"].encode(batch["data"])
    run.module.objective(tokens, Condition(batch["label"]))
    assert calls["teacher"] == [1, 2, 3]  # never block 4, never the output head
    assert calls["student"] == [1, 2, 3, 4, "head"]


@pytest.mark.slow
def test_compile_switch_gives_the_same_outputs_and_state_dict_keys(tiny_train_cfg):
    from selfflow.models.transformer import SelfFlowTransformer

    torch.manual_seed(0)
    eager = SelfFlowTransformer({"image": 12}, width=32, depth=2, heads=2, num_classes=10)
    torch.manual_seed(0)
    compiled = SelfFlowTransformer(
        {"image": 12}, width=32, depth=2, heads=2, num_classes=10, compile=True
    )
    assert list(eager.state_dict()) == list(compiled.state_dict())
    for p in list(eager.parameters()):
        torch.nn.init.normal_(p, std=0.1)
    compiled.load_state_dict(eager.state_dict())
    x, pos = torch.randn(2, 16, 12), torch.randint(0, 4, (2, 16, 4))
    t, labels = torch.rand(2), Condition(torch.tensor([1, 10]))
    from torch._dynamo.utils import counters

    counters.clear()
    torch.testing.assert_close(
        compiled.velocity(x, t, pos, labels, "image"),
        eager.velocity(x, t, pos, labels, "image"),
        rtol=1e-4,
        atol=1e-5,
    )
    assert counters["stats"]["unique_graphs"] >= 1  # the blocks really ran as compiled graphs
    run = fit(
        tiny_train_cfg(
            "model.compile=true", "trainer.max_steps=2", "callbacks.samples.every_n_steps=0"
        )
    )
    assert run.trainer.global_step == 2
