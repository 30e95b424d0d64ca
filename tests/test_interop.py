"""The released Self-Flow checkpoint converter against an independent reference forward written from
the facts of the released layout (SiT-XL/2 style DiT with per-token adaLN, learn_sigma, (p q c)
output, 1 - t, negated output).
"""

import pytest
import torch
import torch.nn.functional as F

from selfflow.interop.official import (
    convert_state_dict,
    describe_layout,
    load_official,
    output_rows,
    time_flip_matrix,
)
from selfflow.models.embeddings import sinusoidal_embedding
from selfflow.tokens import Condition, Tokens
from tests.helpers.released import (
    DEPTH,
    GRID,
    HEADS,
    LATENT,
    PATCH,
    WIDTH,
    ReleasedDiT,
    inputs,
    reference_forward,
    released_state_dict,
)


def test_converted_model_matches_the_reference_forward_per_sample_levels():
    state = released_state_dict()
    model = load_official(state, heads=HEADS)
    x, t, y = inputs()
    with torch.no_grad():
        ours, reference = model(x, t, y), reference_forward(state, x, t, y)
    assert reference.abs().mean() > 0.1  # a non-trivial output, so the comparison means something
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=1e-5)


def test_converted_model_matches_the_reference_forward_per_token_levels():
    state = released_state_dict(seed=2)
    model = load_official(state, heads=HEADS)
    x, _, y = inputs()
    t = torch.rand(3, GRID * GRID, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(
            model(x, t, y), reference_forward(state, x, t, y), atol=2e-5, rtol=1e-5
        )


def test_time_flip_matrix_maps_features_of_t_to_features_of_one_minus_t():
    t = torch.rand(50, dtype=torch.float64)
    flip = time_flip_matrix(256)
    torch.testing.assert_close(
        sinusoidal_embedding(t, 256).double() @ flip.T,
        sinusoidal_embedding(1 - t, 256).double(),
        atol=1e-6,
        rtol=0,
    )


def test_output_rows_keep_the_first_channels_in_c_p_q_order():
    rows = output_rows(patch_size=2, out_channels=8, keep_channels=4)
    # (p q c) index of (c, p, q) is (p * 2 + q) * 8 + c
    expected = [(p * 2 + q) * 8 + c for c in range(4) for p in range(2) for q in range(2)]
    assert rows.tolist() == expected


def test_loads_from_a_file_with_wrappers_and_module_prefixes_and_keeps_the_projector(tmp_path):
    state = released_state_dict(seed=3)
    path = tmp_path / "selfflow_imagenet256.pt"
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, path)
    model = load_official(path, heads=HEADS)
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            model(x, t, y), reference_forward(state, x, t, y), atol=2e-5, rtol=1e-5
        )
    assert model.num_classes == 1000 and model.null_class == 1000
    torch.testing.assert_close(model.projector.linear1.weight, state["projector.linear1.weight"])


def test_converted_weights_are_a_plain_selfflow_model_in_our_convention():
    """The inner SelfFlowTransformer needs no wrapper: its velocity is the released model's at the
    same t."""
    state = released_state_dict(seed=4)
    official = load_official(state, heads=HEADS)
    x, t, y = inputs()
    pos = official.patches.positions(3)
    with torch.no_grad():
        torch.testing.assert_close(
            official.model.velocity(x, t, pos, Condition(y), "image"),
            reference_forward(state, x, t, y),
            atol=2e-5,
            rtol=1e-5,
        )
    assert official.model.pos_embed == "sincos" and official.model.t_embedder.scale == 1.0


def test_a_file_with_model_and_ema_loads_model_like_the_released_sampler_or_ema(tmp_path):
    online, ema = released_state_dict(seed=7), released_state_dict(seed=8)
    path = tmp_path / "both.pt"
    torch.save({"ema": ema, "model": online}, path)
    x, t, y = inputs()
    with torch.no_grad():
        for weights, state in ((None, online), ("model", online), ("ema", ema)):
            options = {} if weights is None else {"weights": weights}
            model = load_official(path, heads=HEADS, **options)
            expected = reference_forward(state, x, t, y)
            torch.testing.assert_close(model(x, t, y), expected, atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="official_weights='online' is unknown"):
        load_official(path, heads=HEADS, weights="online")


def test_bad_files_and_layouts_fail_with_clear_messages(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_official(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="not in the released Self-Flow layout"):
        load_official({"weight": torch.zeros(2)})
    state = released_state_dict()
    state["pos_embed"] = torch.randn_like(state["pos_embed"])
    with pytest.raises(ValueError, match="pos_embed"):
        load_official(state, heads=HEADS)
    with pytest.raises(ValueError, match="patch_size"):
        load_official(released_state_dict(), heads=HEADS, patch_size=4)


def selfflow_model(seed=0, **overrides):
    """A selfflow model in the released conventions with every weight random (no adaLN-Zero),
    modality embedding included (save_official folds it into the input bias)."""
    from selfflow.models.transformer import SelfFlowTransformer

    options = {
        "width": WIDTH,
        "depth": DEPTH,
        "heads": HEADS,
        "num_classes": 1000,
        "pos_embed": "sincos",
        "time_scale": 1.0,
        **overrides,
    }
    model = SelfFlowTransformer({"image": LATENT * PATCH * PATCH}, **options)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=g) * 0.2)
    return model.eval()


def projection_head(seed=0):
    from selfflow.objectives.representation import ProjectionHead

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return ProjectionHead(WIDTH)


def test_save_official_loads_strictly_into_the_released_layout_and_computes_the_same_velocity():
    from selfflow.interop.official import save_official

    model, head = selfflow_model(), projection_head()
    released = ReleasedDiT()
    released.load_state_dict(save_official(model, head, grid=GRID), strict=True)
    x, t, y = inputs()
    pos = load_official(released_state_dict(), heads=HEADS).patches.positions(3)
    levels = torch.rand(
        3, GRID * GRID, generator=torch.Generator().manual_seed(7)
    )  # per-token levels
    with torch.no_grad():
        ours = model.velocity(x, t, pos, Condition(y), "image")
        assert ours.abs().mean() > 0.1
        torch.testing.assert_close(released(x, t, y), ours, atol=2e-5, rtol=1e-5)
        index = torch.arange(GRID * GRID).expand(3, -1)
        ours = model(Tokens(x, pos, "image"), levels, index, Condition(y)).velocity
        torch.testing.assert_close(released(x, levels, y), ours, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(
            released.projector.linear2(F.silu(released.projector.linear1(x.new_ones(WIDTH)))),
            head(x.new_ones(WIDTH)),
        )


def test_load_official_and_save_official_are_inverse_both_ways():
    from selfflow.interop.official import save_official

    model, head = selfflow_model(seed=1), projection_head(1)
    official = load_official(save_official(model, head, grid=GRID), heads=HEADS)
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            official(x, t, y),
            model.velocity(x, t, official.patches.positions(3), Condition(y), "image"),
            atol=2e-5,
            rtol=1e-5,
        )
    state = released_state_dict(seed=5)
    back = save_official(load_official(state, heads=HEADS))
    assert set(back) == set(state)
    used = output_rows(PATCH, 2 * LATENT, LATENT)
    for key, value in state.items():
        if key.startswith(
            "final_layer.linear."
        ):  # learn_sigma rows are not part of the velocity: zeros
            torch.testing.assert_close(back[key][used], value[used], atol=1e-5, rtol=0)
            assert not back[key][sorted(set(range(len(value))) - set(used.tolist()))].any()
        else:
            torch.testing.assert_close(back[key], value, atol=1e-5, rtol=0, msg=key)


def test_save_official_refuses_a_model_outside_the_released_conventions():
    from selfflow.interop.official import save_official

    with pytest.raises(ValueError, match="model.pos_embed=sincos and model.time_scale=1"):
        save_official(selfflow_model(pos_embed="rope"))
    with pytest.raises(ValueError, match="model.pos_embed=sincos and model.time_scale=1"):
        save_official(selfflow_model(time_scale=1000.0))
    with pytest.raises(ValueError, match="no place for.*q_norm"):
        save_official(selfflow_model(qk_norm=True))


def test_init_official_starts_student_teacher_and_head_from_the_released_weights(
    tiny_train_cfg, tiny_vae, cifar_classes, tmp_path
):
    from selfflow.training.build import build_run

    state = released_state_dict(
        grid=2, classes=3, seed=6
    )  # 32 px -> 4x4 latents -> 2x2 patches; 3 classes
    path = tmp_path / "released.pt"
    torch.save({"ema": state}, path)
    run = build_run(
        tiny_train_cfg(
            "experiment=imagenet256",
            f"data.root={cifar_classes}",
            "data.dataset.image_size=32",
            f"tokenizer.image.vae={tiny_vae}",
            f"model.width={WIDTH}",
            f"model.depth={DEPTH}",
            f"model.heads={HEADS}",
            "global_batch_size=6",
            "data.num_workers=0",
            f"init=official:{path}",
            "trainer.max_steps=2",
        )
    )
    objective = run.module.objective
    x = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0, 2, 3])
    pos = run.module.tokenizers["image"].positions(3)
    with torch.no_grad():
        for model in (
            objective.model,
            objective.teacher.module,
        ):  # a fresh EMA equal to the released weights
            torch.testing.assert_close(
                model.velocity(x, t, pos, Condition(y), "image"),
                reference_forward(state, x, t, y),
                atol=2e-5,
                rtol=1e-5,
            )
    torch.testing.assert_close(objective.head.linear1.weight, state["projector.linear1.weight"])
    assert int(objective.teacher.num_updates) == 0 and objective.teacher.current_decay() == 0.9999
    # exactly the released parameter set is trained: no per-modality embedding of selfflow's own
    trainable = {name for name, p in objective.model.named_parameters() if p.requires_grad}
    released = set(convert_state_dict(state, describe_layout(state, 2, 4), 2, 4))
    assert trainable == released - {"modality_embed.image"}
    run.trainer.fit(run.module, datamodule=run.datamodule)  # and it trains (fine-tuning)
    assert run.trainer.global_step == 2
    # zero and frozen: the released function
    assert not objective.model.modality_embed["image"].any()


def test_init_official_names_what_does_not_fit(tiny_train_cfg, tiny_vae, cifar_classes, tmp_path):
    from selfflow.training.build import build_run

    path = tmp_path / "released.pt"
    torch.save(released_state_dict(grid=2, classes=1000), path)
    common = [
        "experiment=imagenet256",
        f"data.root={cifar_classes}",
        "data.dataset.image_size=32",
        f"tokenizer.image.vae={tiny_vae}",
        f"model.width={WIDTH}",
        f"model.depth={DEPTH}",
        f"model.heads={HEADS}",
        "global_batch_size=6",
    ]
    with pytest.raises(
        ValueError, match="y_embedder.embedding_table.weight.*\\(1001, 32\\).*\\(4, 32\\)"
    ):
        build_run(tiny_train_cfg(*common, f"init=official:{path}"))  # 1000 classes, the data has 3
    with pytest.raises(ValueError, match="model.pos_embed=sincos"):
        build_run(tiny_train_cfg(*common, "model.pos_embed=rope", f"init=official:{path}"))
    with pytest.raises(ValueError, match="use init=official:PATH"):
        build_run(tiny_train_cfg(*common, f"init={path}"))
