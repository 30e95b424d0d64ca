"""Import of the released Self-Flow ImageNet checkpoint (SiT-XL/2 layout, per-token timesteps)
into selfflow.

The released model takes pre-patchified latent tokens `x: [B, 256, 16]` in (c p1 p2) order (4 SD-VAE
channels, patch 2, a 16 x 16 grid), embeds `1 - t` where t is the paper's level (0 data, 1 noise)
and returns the *negated* network output, whose 8 channels per patch position come in (p q c) order
with only c < 4 used (learn_sigma). Its velocity is therefore the paper's `x1 - x0`.

The conversion makes a plain `SelfFlowTransformer` (pos_embed=sincos, time_scale=1, 1000 classes +
null class 1000) that computes exactly that velocity in selfflow's own convention, so that sampling,
probing and fine-tuning need no special case:
- the final linear keeps the rows of c < 4, reordered to (c p q), and negated (the sign);
- the time flip is folded into the first timestep-MLP weight: the sin/cos features of `1 - t` are a
  fixed linear map (a rotation per frequency) of those of `t`, computed in float64.

`save_official` is the inverse: a selfflow model in those conventions (`experiment=imagenet256`)
becomes a state dict that the released model code loads with `strict=True` (`pos_embed` buffer, zero
learn_sigma rows, the projector from the objective's head), and `initialize_from_official` starts
training from the released weights (`selfflow-train init=official:PATH`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from selfflow.interop.state_check import check_state_fits
from selfflow.io.safe_files import replace_atomically
from selfflow.io.sizes import bounded_size
from selfflow.models.distinct_levels import distinct_levels
from selfflow.models.embeddings import sincos_2d
from selfflow.models.transformer import SelfFlowTransformer
from selfflow.objectives.representation import ProjectionHead
from selfflow.tokenizers.image import ImagePatchTokenizer
from selfflow.tokens import Condition, Tokens

RELEASED = {
    "depth": 28,
    "width": 1152,
    "heads": 16,
    "patch_size": 2,
    "latent_channels": 4,
    "num_classes": 1000,
    "grid": 16,
}
SD_VAE_SCALE = 0.18215  # the released model's latent space: SD-VAE latents times this
# (selfflow, released) names of each block's linear layers
BLOCK_LINEARS = (
    ("attn.qkv", "attn.qkv"),
    ("attn.proj", "attn.proj"),
    ("mlp.0", "mlp.fc1"),
    ("mlp.2", "mlp.fc2"),
    ("adaLN_modulation.1", "adaLN_modulation.1"),
)
FREQUENCY_DIM = 256  # sinusoidal timestep features of the released t_embedder
WRAPPER_KEYS = ("model", "ema", "state_dict")  # where training scripts nest the weights
MAX_RELEASED_DEPTH, MAX_RELEASED_WIDTH = 512, 16384  # the released model: 28 blocks of width 1152
# which of a file's nested weights to load (official_weights=...): `model`, as the released sampler
# does, or `ema`
OFFICIAL_WEIGHTS = ("model", "ema")
OFFICIAL_PREFIX = (
    "official:"  # ckpt=official:PATH (selfflow-sample), init=official:PATH (selfflow-train)
)


def read_state_dict(
    path_or_state_dict: str | os.PathLike | dict[str, Tensor], weights: str = "model"
) -> dict[str, Tensor]:
    """The released weights as a flat dict: loaded safely (weights only), unwrapped, `module.`
    prefixes dropped. weights: the nested entry to take from a file holding several (`model`, as the
    released sampler does, or `ema`); a file with only one takes that one."""
    if weights not in OFFICIAL_WEIGHTS:
        choices = "model (the released sampler's choice) or ema"
        raise ValueError(f"official_weights={weights!r} is unknown; choose {choices}")
    if isinstance(path_or_state_dict, dict):
        state = path_or_state_dict
    else:
        path = Path(path_or_state_dict).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"released checkpoint {path} does not exist; pass the path of the downloaded "
                f"Self-Flow .pt file (ckpt=official:PATH)"
            )
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(path))
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(
                f"cannot load {path} safely: {type(error).__name__}: {error}"
            ) from error
    for key in (weights, *WRAPPER_KEYS):
        if isinstance(state.get(key), dict) and "x_embedder.proj.weight" not in state:
            state = state[key]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if "x_embedder.proj.weight" not in state:
        raise ValueError(
            "this state dict is not in the released Self-Flow layout (no "
            "'x_embedder.proj.weight'); for selfflow's own checkpoints use "
            "ckpt=PATH without official:"
        )
    return state


def time_flip_matrix(frequency_dim: int = FREQUENCY_DIM, max_period: float = 10000.0) -> Tensor:
    """A [F, F] float64 matrix with features(1 - t) = A @ features(t) for the (cos, sin)
    timestep features."""
    half = frequency_dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / half)
    cos, sin = torch.diag(freqs.cos()), torch.diag(freqs.sin())
    # cos(f (1 - t)) = cos f cos ft + sin f sin ft;  sin(f (1 - t)) = sin f cos ft - cos f sin ft
    return torch.cat([torch.cat([cos, sin], 1), torch.cat([sin, -cos], 1)], 0)


def output_rows(patch_size: int, out_channels: int, keep_channels: int) -> Tensor:
    """Indices of the released final-layer rows, (p q c) order, that give our (c p q) rows for c
    < keep_channels."""
    index = torch.arange(patch_size * patch_size * out_channels)
    index = rearrange(index, "(p q c) -> c p q", p=patch_size, q=patch_size, c=out_channels)
    return rearrange(index[:keep_channels], "c p q -> (c p q)")


def released_keys(depth: int) -> list[str]:
    """The entries a released checkpoint of `depth` blocks must hold (the projector is optional)."""
    linears = ["x_embedder.proj", "t_embedder.mlp.0", "t_embedder.mlp.2", "final_layer.linear"]
    linears += ["final_layer.adaLN_modulation.1"]
    linears += [f"blocks.{i}.{theirs}" for i in range(depth) for _, theirs in BLOCK_LINEARS]
    keys = [f"{name}.{kind}" for name in linears for kind in ("weight", "bias")]
    return ["pos_embed", "y_embedder.embedding_table.weight", *keys]


def released_depth(state: dict[str, Tensor], source: str) -> int:
    """The block count read off the key names, bounded (a key `blocks.99999.` must not size a
    model), with every entry of every block present as a tensor."""
    blocks = [k for k in state if isinstance(k, str) and k.startswith("blocks.")]
    indices = {k.split(".")[1] for k in blocks if k.count(".") > 1}
    if not indices or not all(index.isdigit() and len(index) < 12 for index in indices):
        raise ValueError(f"{source} has no blocks.<n>.* entries; not a released checkpoint")
    depth = 1 + max(map(int, indices))
    bounded_size(depth, MAX_RELEASED_DEPTH, f"{source}: the block count")
    missing = [key for key in released_keys(depth) if not isinstance(state.get(key), Tensor)]
    if missing:
        raise ValueError(
            f"{source} is incomplete: it has no tensor {missing[0]!r} ({len(missing)} of the "
            f"{len(released_keys(depth))} entries of a {depth}-block model are missing); "
            "download the released .pt file again"
        )
    return depth


def describe_layout(
    state: dict[str, Tensor],
    patch_size: int,
    latent_channels: int,
    source: str = "the released checkpoint",
) -> dict[str, int]:
    """Sizes read off the weights (heads cannot be, so they are an argument of `load_official`),
    each bounded and every required entry present before anything is built."""
    depth = released_depth(state, source)
    width, token_channels = state["x_embedder.proj.weight"].shape
    bounded_size(width, MAX_RELEASED_WIDTH, f"{source}: the width of x_embedder.proj.weight")
    if token_channels != latent_channels * patch_size**2:
        raise ValueError(
            f"x_embedder.proj takes {token_channels} channels per token, not latent_channels * "
            f"patch_size^2 = {latent_channels * patch_size**2}; pass the checkpoint's patch_size "
            f"and latent_channels"
        )
    out = state["final_layer.linear.weight"].shape[0] // patch_size**2
    if out not in (latent_channels, 2 * latent_channels):
        raise ValueError(
            f"final_layer.linear emits {out} channels per position; expected {latent_channels} or "
            f"{2 * latent_channels} (learn_sigma)"
        )
    num_tokens = state["pos_embed"].shape[-2] if state["pos_embed"].ndim >= 2 else 0
    grid = math.isqrt(num_tokens)
    if grid * grid != num_tokens or state["pos_embed"].numel() != num_tokens * width:
        shape = list(state["pos_embed"].shape)
        raise ValueError(f"{source}: pos_embed {shape} is not a square grid of width {width}")
    return {
        "width": width,
        "depth": depth,
        "out_channels": out,
        "grid": grid,
        "num_classes": state["y_embedder.embedding_table.weight"].shape[0] - 1,
        "token_channels": token_channels,
    }


def released_transformer(
    layout: dict[str, int], converted: dict[str, Tensor], heads: int, attention: str, source: str
) -> SelfFlowTransformer:
    """The `SelfFlowTransformer` of `layout` holding `converted`: built on the meta device and
    checked against every key and shape first, so that sizes read from the file allocate nothing
    until the file's own tensors fill them."""
    arguments = {
        "token_channels": {"image": layout["token_channels"]},
        "width": layout["width"],
        "depth": layout["depth"],
        "heads": heads,
        "num_classes": layout["num_classes"],
        "pos_embed": "sincos",
        "time_scale": 1.0,
        "attention": attention,
        "modality_embedding": False,  # the released layout has none: zero and frozen here
    }
    with torch.device("meta"):
        check_state_fits(SelfFlowTransformer(**arguments).state_dict(), converted, source)
    model = SelfFlowTransformer(**arguments)
    model.load_state_dict(converted)
    return model


def convert_state_dict(
    state: dict[str, Tensor], layout: dict[str, int], patch_size: int, latent_channels: int
) -> dict[str, Tensor]:
    """Released keys -> `SelfFlowTransformer` keys (modality "image"), flip and sign folded in
    (float64 math)."""
    rows = output_rows(patch_size, layout["out_channels"], latent_channels)
    flip = time_flip_matrix(state["t_embedder.mlp.0.weight"].shape[1])
    converted = {
        "input_proj.image.weight": state["x_embedder.proj.weight"],
        "input_proj.image.bias": state["x_embedder.proj.bias"],
        "modality_embed.image": torch.zeros(layout["width"]),
        "t_embedder.mlp.0.weight": (state["t_embedder.mlp.0.weight"].double() @ flip).float(),
        "t_embedder.mlp.0.bias": state["t_embedder.mlp.0.bias"],
        "t_embedder.mlp.2.weight": state["t_embedder.mlp.2.weight"],
        "t_embedder.mlp.2.bias": state["t_embedder.mlp.2.bias"],
        "y_embedder.embedding_table.weight": state["y_embedder.embedding_table.weight"],
        "final_layers.image.linear.weight": -state["final_layer.linear.weight"][rows],
        "final_layers.image.linear.bias": -state["final_layer.linear.bias"][rows],
    }
    for kind in ("weight", "bias"):
        converted[f"final_layers.image.adaLN_modulation.1.{kind}"] = state[
            f"final_layer.adaLN_modulation.1.{kind}"
        ]
        for i in range(layout["depth"]):
            for ours, theirs in BLOCK_LINEARS:
                converted[f"blocks.{i}.{ours}.{kind}"] = state[f"blocks.{i}.{theirs}.{kind}"]
    return {k: v.float() for k, v in converted.items()}


class OfficialSelfFlow(nn.Module):
    """The released model as selfflow modules: `model` (a SelfFlowTransformer in selfflow's
    convention) and the self-distillation `projector`. `forward(x, t, y)` is the released model's
    forward in the paper's convention.
    """

    def __init__(
        self,
        model: SelfFlowTransformer,
        projector: ProjectionHead | None,
        grid: int,
        patch_size: int,
        latent_channels: int,
    ):
        super().__init__()
        self.model, self.projector = model, projector
        self.grid, self.patch_size, self.latent_channels = grid, patch_size, latent_channels
        # the released tokens are (c p q) patches of the latent grid in row-major order: our image
        # patch layout
        self.patches = ImagePatchTokenizer(patch_size, latent_channels, grid * patch_size)

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def null_class(self) -> int:
        return self.model.null_class

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """x: [B, N, C p p] tokens in (c p q) order; t: [B] or [B, N] levels (0 data, 1 noise); y:
        [B] labels (1000 = null) -> velocity x1 - x0, [B, N, C p p]."""
        b, n, _ = x.shape
        if n != self.grid**2:
            raise ValueError(
                f"the released model takes {self.grid**2} tokens ({self.grid}x{self.grid}), got {n}"
            )
        pos = self.patches.positions(b, x.device)
        if t.dim() == 1:
            return self.model.velocity(x, t, pos, Condition(labels=y), "image")
        levels, index = distinct_levels(
            t
        )  # the modulation MLPs run on each sample's few distinct levels, not on N
        return self.model(Tokens(x, pos, "image"), levels, index, Condition(labels=y)).velocity

    def velocity(
        self, x: Tensor, t: Tensor, pos: Tensor, condition: Condition, modality: str = "image"
    ) -> Tensor:
        """The interface `selfflow.sampling.generate` calls (one level per sample)."""
        return self.model.velocity(x, t, pos, condition, "image")


def load_official(
    path_or_state_dict: str | os.PathLike | dict[str, Tensor],
    heads: int = RELEASED["heads"],
    patch_size: int = RELEASED["patch_size"],
    latent_channels: int = RELEASED["latent_channels"],
    attention: str = "auto",
    weights: str = "model",
) -> OfficialSelfFlow:
    """The released Self-Flow checkpoint (a path or a state dict in its layout) as an
    `OfficialSelfFlow`, eval mode. weights: `model` (the released sampler's choice) or `ema`, for a
    file that nests both."""
    state = read_state_dict(path_or_state_dict, weights)
    source = "the released state dict"
    if not isinstance(path_or_state_dict, dict):
        source = str(path_or_state_dict)
    layout = describe_layout(state, patch_size, latent_channels, source)
    if layout["width"] % heads:
        raise ValueError(
            f"width {layout['width']} is not divisible by heads={heads}; "
            f"pass the checkpoint's heads"
        )
    pos = ImagePatchTokenizer(patch_size, latent_channels, layout["grid"] * patch_size).positions(1)
    expected = sincos_2d(pos, layout["width"])[0]
    stored = state["pos_embed"].reshape(-1, layout["width"]).float()
    if not torch.allclose(stored, expected, atol=1e-4):
        raise ValueError(
            "pos_embed of this checkpoint is not the fixed 2D sin-cos grid the released model uses "
            f"(max difference {(stored - expected).abs().max():.3g}); it "
            f"cannot be converted exactly"
        )
    try:
        converted = convert_state_dict(state, layout, patch_size, latent_channels)
    except (KeyError, RuntimeError, IndexError) as error:
        raise ValueError(f"{source}: shapes unlike the released layout's ({error})") from None
    model = released_transformer(layout, converted, heads, attention, source)
    projector = None
    if "projector.linear1.weight" in state:
        hidden = state["projector.linear1.weight"].shape[0]
        projector = ProjectionHead(layout["width"], hidden // layout["width"])
        projector.load_state_dict(
            {
                k.removeprefix("projector."): v.float()
                for k, v in state.items()
                if k.startswith("projector.")
            }
        )
    return OfficialSelfFlow(model, projector, layout["grid"], patch_size, latent_channels).eval()


def check_released_conventions(model: SelfFlowTransformer, what: str) -> None:
    """The released model embeds `1 - t` (time_scale 1) of 256 sinusoidal features and adds a
    sin-cos grid."""
    if (
        model.pos_embed != "sincos"
        or model.t_embedder.scale != 1.0
        or model.t_embedder.frequency_dim != FREQUENCY_DIM
    ):
        raise ValueError(
            f"{what} needs the released model's conventions: model.pos_embed=sincos and "
            f"model.time_scale=1 (experiment=imagenet256 sets them); this model has "
            f"pos_embed={model.pos_embed}, time_scale={model.t_embedder.scale:g}"
        )
    if list(model.token_channels) != ["image"] or model.num_classes < 1:
        raise ValueError(
            f"{what} needs a class-conditional image-only model (the released layout); this one "
            f"generates {sorted(model.token_channels)} with {model.num_classes} classes"
        )


def save_official(
    model: SelfFlowTransformer | OfficialSelfFlow,
    projector: ProjectionHead | None = None,
    grid: int = RELEASED["grid"],
    patch_size: int = RELEASED["patch_size"],
    latent_channels: int = RELEASED["latent_channels"],
    learn_sigma: bool = True,
) -> dict[str, Tensor]:
    """A selfflow model as a state dict in the released layout (the inverse
    of `convert_state_dict`): the released model code (`SelfFlowPerTokenDiT`, learn_sigma) loads it
    with `strict=True` and computes the same velocity.

    projector: the objective's projection head (`objective.head`), saved as `projector.*` (the
    released model has one; without it the key is left out). grid: latent patches per side (16 for
    256 px with SD-VAE, patch 2).
    """
    if isinstance(model, OfficialSelfFlow):
        grid, patch_size, latent_channels = model.grid, model.patch_size, model.latent_channels
        model, projector = model.model, projector if projector is not None else model.projector
    check_released_conventions(model, "save_official")
    if model.token_channels["image"] != latent_channels * patch_size**2:
        raise ValueError(
            f"the model takes {model.token_channels['image']} channels per token, not "
            f"latent_channels * patch_size^2 = {latent_channels * patch_size**2}; pass the "
            f"tokenizer's patch_size and latent_channels"
        )
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    final_weight, final_bias = released_final_linear(
        state,
        model.width,
        patch_size,
        latent_channels,
        learn_sigma,
    )
    flip = time_flip_matrix(FREQUENCY_DIM)  # an involution: features(1 - (1 - t)) = features(t)
    pos = ImagePatchTokenizer(patch_size, latent_channels, grid * patch_size).positions(1)
    released = {
        "x_embedder.proj.weight": state.pop("input_proj.image.weight"),
        # the modality embedding is a constant added after the projection: folded into its bias
        "x_embedder.proj.bias": state.pop("input_proj.image.bias")
        + state.pop("modality_embed.image"),
        "pos_embed": sincos_2d(pos, model.width),  # [1, grid^2, width]
        "t_embedder.mlp.0.weight": (state.pop("t_embedder.mlp.0.weight").double() @ flip).float(),
        "final_layer.linear.weight": final_weight,
        "final_layer.linear.bias": final_bias,
    }
    renames = released_renames(model.depth)
    released.update({theirs: state.pop(ours) for ours, theirs in renames.items()})
    if state:
        raise ValueError(
            f"the model has weights the released layout has no place for: {sorted(state)[:3]} "
            f"(text stream, size conditioning or QK-norm); save_official takes a plain image model"
        )
    if projector is not None:
        released.update(
            {f"projector.{k}": v.detach().float().cpu() for k, v in projector.state_dict().items()}
        )
    return released


def released_final_linear(
    state: dict[str, Tensor],
    width: int,
    patch_size: int,
    latent_channels: int,
    learn_sigma: bool,
) -> tuple[Tensor, Tensor]:
    """The released final linear layer (weight, bias), taken out of `state`: our velocity rows
    negated (the released forward negates its output) and zero rows for the learned sigma.

    Args:
        state: Our image model's state dict; its final linear entries are removed.
        width: The model width.
        patch_size: Latent patch side.
        latent_channels: Latent channels.
        learn_sigma: The released layout's extra sigma channels.

    Returns:
        (weight [P^2 * out, width], bias [P^2 * out]), out = 2 * latent_channels with sigma.
    """
    out_channels = 2 * latent_channels if learn_sigma else latent_channels
    rows = output_rows(patch_size, out_channels, latent_channels)
    weight = torch.zeros(patch_size**2 * out_channels, width)
    bias = torch.zeros(patch_size**2 * out_channels)
    weight[rows] = -state.pop("final_layers.image.linear.weight")  # the released forward negates
    bias[rows] = -state.pop("final_layers.image.linear.bias")
    return weight, bias


def released_renames(depth: int) -> dict[str, str]:
    """Our state-dict key -> the released one, for every tensor that moves over unchanged.

    Args:
        depth: The model's blocks.

    Returns:
        The key map.
    """
    unchanged = (
        "t_embedder.mlp.0.bias",
        "t_embedder.mlp.2.weight",
        "t_embedder.mlp.2.bias",
        "y_embedder.embedding_table.weight",
    )
    renames = {key: key for key in unchanged}
    for kind in ("weight", "bias"):
        final = f"adaLN_modulation.1.{kind}"
        renames[f"final_layers.image.{final}"] = f"final_layer.{final}"
        for i in range(depth):
            for ours, theirs in BLOCK_LINEARS:
                renames[f"blocks.{i}.{ours}.{kind}"] = f"blocks.{i}.{theirs}.{kind}"
    return renames


def export_official(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    weights: str = "ema",
    vae: str | None = None,
) -> Path:
    """A `selfflow-train` checkpoint of a released-layout run (experiment=imagenet256) as a .pt file
    of plain tensors that the released model code loads with strict=True: the EMA (or online)
    weights and the projection head.
    vae: the run's VAE folder (a path a checkpoint stores is never loaded)."""
    from selfflow.interop.checkpoint import load_checkpoint, read_checkpoint

    loaded = load_checkpoint(checkpoint, weights, vae)
    tokenizer = loaded.tokenizers.get("image")
    if tokenizer is None or not hasattr(tokenizer, "latent_shape"):
        raise ValueError(
            f"{checkpoint} is not a VAE-latent image run; the released layout is SD-VAE latents "
            f"(experiment=imagenet256)"
        )
    projector = None
    head = {
        k.removeprefix("objective.head."): v
        for k, v in read_checkpoint(checkpoint)["state_dict"].items()
        if k.startswith("objective.head.")
    }
    if head:
        projector = ProjectionHead(loaded.model.width)
        projector.load_state_dict(head)
    state = save_official(
        loaded.model,
        projector,
        grid=tokenizer.grid[0],
        patch_size=tokenizer.patch_size,
        latent_channels=tokenizer.latent_shape[0],
    )
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    with replace_atomically(out) as file:
        torch.save(state, file)
    return out


def initialize_from_official(
    objective, path: str | os.PathLike, patch_size: int, latent_channels: int
) -> None:
    """Fine-tuning from the released checkpoint: the student, a fresh EMA teacher (and sampling
    EMAs) equal to it, and the projection head (when the objective has one) take the released
    weights. The model must follow the released conventions."""
    model = objective.model
    check_released_conventions(model, "init=official:")
    if any(p.requires_grad for p in model.modality_embed.values()):
        raise ValueError(
            "init=official: needs the released parameter set: set model.modality_embedding=false "
            "(experiment=imagenet256 does), the released layout has no per-modality embedding"
        )
    official = load_official(
        path, heads=model.heads, patch_size=patch_size, latent_channels=latent_channels
    )
    source = f"init=official:{path}"
    check_state_fits(model.state_dict(), official.model.state_dict(), source)
    model.load_state_dict(official.model.state_dict())
    for ema in (
        objective.teacher,
        *objective.sampling_emas.values(),
    ):  # every EMA starts equal to the released model
        ema.module.load_state_dict(official.model.state_dict())
    if objective.head is not None and official.projector is not None:
        check_state_fits(
            objective.head.state_dict(), official.projector.state_dict(), f"{source} (projector)"
        )
        objective.head.load_state_dict(official.projector.state_dict())


def load_official_for_sampling(
    path: str, vae: str | None, weights: str = "model"
) -> tuple[OfficialSelfFlow, dict[str, Any]]:
    """The released model (`weights`: model or ema) and an SD-VAE latent tokenizer (from a local
    diffusers folder) for selfflow-sample."""
    if vae is None:
        raise ValueError(
            "the released checkpoint generates SD-VAE latents: pass vae=LOCAL_DIR, a folder with a "
            "diffusers AutoencoderKL (e.g. sd-vae-ft-ema) saved by save_pretrained"
        )
    from selfflow.io.model_folders import downsampling
    from selfflow.tokenizers.image_latent import ImageLatentTokenizer

    model = load_official(path, weights=weights)
    tokenizer = ImageLatentTokenizer(
        vae,
        image_size=model.grid * model.patch_size * downsampling(vae),
        patch_size=model.patch_size,
        latent_channels=model.latent_channels,
        scale=SD_VAE_SCALE,
        shift=0.0,
    ).eval()
    return model, {"image": tokenizer}
