#!/usr/bin/env python
"""selfflow benchmark suite: step times, method overheads as ratios, memory, FLOPs and MFU; prints a
table and JSON.

    python -m tools.bench --out bench.json       # the full suite on this machine's default device
    python -m tools.bench --quick --only adaln   # a smaller, faster subset
    python -m tools.bench --only official        # XL/2 step: selfflow against the released code

Every comparison is measured in the same run (this machine is shared and noisy: read ratios, not
absolutes). Each case runs in its own subprocess so that its peak memory is its own. On CPU, peak
memory is the growth of the process's resident set over its size before the case (ru_maxrss); on
CUDA, torch.cuda.max_memory_allocated.
Records: {"name", "config", "step_s_median", "tokens_per_s", "peak_mem_mb",
"device", ...extra fields}.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from selfflow.interop.official import OfficialSelfFlow
from selfflow.models.layers import TransformerBlock, modulate
from selfflow.models.transformer import SelfFlowTransformer
from selfflow.objectives.selfflow import SelfFlowObjective, default_layers
from selfflow.tokenizers.image import ImagePatchTokenizer
from selfflow.tokens import Condition, Tokens

# ---------------------------------------------------------------- measurement helpers


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_calls(fn, device: str, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def time_alternating(fns: dict, device: str, warmup: int, iters: int) -> dict[str, list[float]]:
    """time_calls for several functions, one call of each in turn: load on a shared machine hits
    them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            times[name] += time_calls(fn, device, warmup=0, iters=1)
    return times


def resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


class PeakMemory:
    """Peak memory of the block: CUDA allocator peak, or CPU resident-set growth."""

    def __init__(self, device: str):
        self.device, self.mb = device, 0.0

    def __enter__(self):
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start = resident_mb()
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            self.mb = (torch.cuda.max_memory_allocated() - self.start) / 2**20
        else:
            self.mb = max(
                0.0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - self.start
            )


def peak_memory_of(steps: dict, device: str) -> dict[str, float]:
    """Peak memory (MB) of one call of each step, in order (on CPU the resident-set peak
    only grows: coarse)."""
    peaks = {}
    for name, step in steps.items():
        with PeakMemory(device) as memory:
            step()
        peaks[name] = memory.mb
    return peaks


def matmul_flops_per_s(device: str, dtype: torch.dtype, size: int = 2048, iters: int = 10) -> float:
    """The machine's measured dense matmul rate: the ceiling that MFU is computed against."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    times = time_calls(lambda: a @ b, device, warmup=2, iters=iters)
    return 2 * size**3 / statistics.median(times)


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def record(name, config, times, tokens, peak_mb, device, **extra) -> dict:
    step = statistics.median(times)
    return {
        "name": name,
        "config": config,
        "step_s_median": step,
        "tokens_per_s": tokens / step,
        "peak_mem_mb": round(peak_mb, 1),
        "device": device_name(device),
        **extra,
    }


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    return f"cpu ({torch.get_num_threads()} threads)"


# ---------------------------------------------------------------- what is measured


def make_batch(batch: int, grid: int, channels: int, device: str) -> tuple[Tokens, torch.Tensor]:
    h, w = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    pos = (
        torch.stack([torch.zeros_like(h), h, w, torch.zeros_like(h)], -1)
        .reshape(1, -1, 4)
        .expand(batch, -1, -1)
    )
    x = torch.randn(batch, grid * grid, channels)
    return Tokens(x.to(device), pos.to(device), "image"), torch.randint(
        0, 10, (batch,), device=device
    )


def train_step_fn(objective: SelfFlowObjective, tokens: Tokens, labels, dtype):
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    device_type = tokens.x.device.type

    def step():
        with torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32):
            loss = objective(tokens, Condition(labels=labels)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        objective.update_teacher()

    return step


def case_training_step(args, variant: str) -> dict:
    """One optimizer step of Self-Flow (teacher + head + masks) or of vanilla flow matching,
    same model."""
    torch.manual_seed(0)
    model = SelfFlowTransformer(
        {"image": args.channels},
        width=args.width,
        depth=args.depth,
        heads=args.heads,
        num_classes=10,
        activation_checkpointing=variant == "selfflow_checkpointed",
    )
    settings = {
        "selfflow": {"mask_ratio": 0.25, "gamma": 0.8},
        "selfflow_checkpointed": {"mask_ratio": 0.25, "gamma": 0.8},
        "vanilla": {"mask_ratio": 0.0, "gamma": 0.0},
    }[variant]
    objective = SelfFlowObjective(model, ema_decay=0.9999, **settings).to(args.device)
    tokens, labels = make_batch(args.batch, args.grid, args.channels, args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    step = train_step_fn(objective, tokens, labels, dtype)
    with PeakMemory(args.device) as memory:  # first, so that nothing before it has raised the peak
        times = time_calls(step, args.device, args.warmup, args.iters)
    flops = count_flops(step)
    student, teacher = default_layers(args.depth)
    config = dict(
        width=args.width,
        depth=args.depth,
        heads=args.heads,
        batch=args.batch,
        tokens=args.grid**2,
        dtype=args.dtype,
        student_layer=student,
        teacher_layer=teacher,
        **settings,
    )
    achieved = flops / statistics.median(times)
    return record(
        f"train_step/{variant}",
        config,
        times,
        args.batch * args.grid**2,
        memory.mb,
        args.device,
        flops_per_step=flops,
        achieved_flops_per_s=achieved,
    )


class NaiveAdaLNBlock(nn.Module):
    """Reference only: the released model's way, the modulation MLP run on every token's
    own vector."""

    def __init__(self, block: TransformerBlock):
        super().__init__()
        self.block = block

    def forward(self, x, cond_per_token):
        b = self.block
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = b.adaLN_modulation(
            cond_per_token
        ).chunk(6, dim=-1)
        x = x + gate_a * b.attn(modulate(b.norm1(x), shift_a, scale_a))
        return x + gate_m * b.mlp(modulate(b.norm2(x), shift_m, scale_m))


def case_adaln(args, width: int, variant: str) -> dict:
    """Forward + backward of one transformer block with per-token conditioning: distinct vectors
    vs naive."""
    torch.manual_seed(0)
    heads = max(1, width // 64)
    block = TransformerBlock(width, heads).to(args.device)
    for p in block.adaLN_modulation.parameters():
        nn.init.normal_(p, std=0.02)
    tokens = args.adaln_tokens
    x = torch.randn(args.adaln_batch, tokens, width, device=args.device, requires_grad=True)
    cond = torch.randn(
        args.adaln_batch, 2, width, device=args.device, requires_grad=True
    )  # (t, s) per sample
    index = (torch.rand(args.adaln_batch, tokens, device=args.device) < 0.25).long()
    naive = NaiveAdaLNBlock(block)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]

    def forward():
        with torch.autocast(args.device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
            if variant == "distinct":
                return block(x, cond, index)
            per_token = torch.gather(cond, 1, index[..., None].expand(-1, -1, width))
            return naive(x, per_token)

    def step():
        forward().float().square().mean().backward()

    with torch.no_grad():
        per_token = torch.gather(cond, 1, index[..., None].expand(-1, -1, width))
        difference = (block(x, cond, index) - naive(x, per_token)).abs().max().item()
    with PeakMemory(args.device) as memory:
        times = time_calls(step, args.device, args.warmup, args.iters)
    flops = count_flops(step)
    config = {
        "width": width,
        "heads": heads,
        "batch": args.adaln_batch,
        "tokens": tokens,
        "dtype": args.dtype,
    }
    return record(
        f"adaln/{variant}/w{width}",
        config,
        times,
        args.adaln_batch * tokens,
        memory.mb,
        args.device,
        flops_per_step=flops,
        max_abs_difference_to_naive=difference,
    )


PACKING_LENGTHS = (
    [16] * 8 + [64] * 4 + [32] * 6 + [128] * 2 + [24] * 4 + [96] * 2
)  # images, clips, audio


def case_packing(args, variant: str) -> dict:
    """One training step on a realistic length mix, padded to the longest sample or packed
    into rows."""
    from selfflow.data.batching.packing import pack

    torch.manual_seed(0)
    model = SelfFlowTransformer(
        {"image": args.channels},
        width=args.width,
        depth=args.depth,
        heads=args.heads,
        num_classes=10,
        attention=args.attention,
    )
    objective = SelfFlowObjective(model, mask_ratio=0.25, gamma=0.8).to(args.device)
    lengths = [n * args.packing_scale for n in PACKING_LENGTHS]
    labels = torch.randint(0, 10, (len(lengths),))
    if variant == "padded":
        longest = max(lengths)
        valid = torch.arange(longest)[None] < torch.tensor(lengths)[:, None]
        pos = (
            torch.stack(
                [
                    torch.zeros(longest),
                    torch.arange(longest) // 16,
                    torch.arange(longest) % 16,
                    torch.zeros(longest),
                ],
                -1,
            )
            .long()
            .expand(len(lengths), -1, -1)
        )
        batch = Tokens(
            torch.randn(len(lengths), longest, args.channels).to(args.device),
            pos.to(args.device),
            "image",
            valid.to(args.device),
        )
        step_labels = labels.to(args.device)
    else:
        samples = [
            Tokens(
                torch.randn(1, n, args.channels, device=args.device),
                torch.randint(0, 16, (1, n, 4), device=args.device),
                "image",
            )
            for n in lengths
        ]
        batch = pack(samples, labels.tolist(), row_length=max(lengths), null_label=model.null_class)
        step_labels = None
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if args.packing_pass == "train":
        step = train_step_fn(objective, batch, step_labels, dtype)
    else:  # student and teacher forwards without gradients (FlexAttention has no backward on CPU)
        step = torch.no_grad()(lambda: objective(batch, Condition(labels=step_labels)))
    with PeakMemory(args.device) as memory:
        times = time_calls(step, args.device, args.warmup, args.iters)
    rows = batch.x.shape[0]
    config = {
        "width": args.width,
        "depth": args.depth,
        "samples": len(lengths),
        "useful_tokens": sum(lengths),
        "rows": rows,
        "row_length": batch.x.shape[1],
        "dtype": args.dtype,
        "attention": args.attention,
        "packing_pass": args.packing_pass,
    }
    return record(
        f"packing/{variant}",
        config,
        times,
        sum(lengths),
        memory.mb,
        args.device,
        computed_tokens=rows * batch.x.shape[1],
    )


def case_attention(args) -> list[dict]:
    """One attention layer on the packing case's rows (width and heads of the training-step model):
    SDPA with the dense block mask against FlexAttention's block mask, timed in alternation.
    Forward + backward on CUDA (flex compiled); forward only on CPU, where FlexAttention is the
    unfused reference and has no backward."""
    from selfflow.data.batching.packing import pack
    from selfflow.models.attention import Attention, GroupMask

    on_gpu = args.device.startswith("cuda")
    lengths = [n * args.packing_scale for n in PACKING_LENGTHS]
    samples = [
        Tokens(torch.zeros(1, n, 1), torch.zeros(1, n, 4, dtype=torch.long), "image")
        for n in lengths
    ]
    segment = pack(samples, [0] * len(lengths), row_length=max(lengths), null_label=0).segment.to(
        args.device
    )
    torch.manual_seed(0)
    layers = {
        backend: Attention(args.width, args.heads, backend=backend).to(args.device)
        for backend in ("sdpa", "flex")
    }
    layers["flex"].load_state_dict(layers["sdpa"].state_dict())
    if args.compile:  # both layers compiled: on CPU too, FlexAttention then runs fused kernels
        for layer in layers.values():
            layer.compile()
    x = torch.randn(*segment.shape, args.width, device=args.device, requires_grad=on_gpu)
    mask = GroupMask(
        segment, contiguous=True
    )  # one mask object for every call: its block mask is built once
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]

    def step_of(layer):
        @torch.set_grad_enabled(on_gpu)
        def step():
            with torch.autocast(
                args.device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32
            ):
                out = layer(x, mask=mask)
            if on_gpu:
                out.float().square().mean().backward()

        return step

    steps = {backend: step_of(layer) for backend, layer in layers.items()}
    memory = peak_memory_of(steps, args.device)
    times = time_alternating(steps, args.device, args.warmup, args.iters)
    config = {
        "width": args.width,
        "heads": args.heads,
        "rows": segment.shape[0],
        "row_length": segment.shape[1],
        "useful_tokens": sum(lengths),
        "dtype": args.dtype,
        "compile": args.compile,
        "pass": "forward + backward" if on_gpu else "forward, no gradients",
    }
    return [
        record(
            f"attention/{backend}",
            config,
            times[backend],
            sum(lengths),
            memory[backend],
            args.device,
        )
        for backend in steps
    ]


OFFICIAL_GRID, OFFICIAL_CHANNELS, OFFICIAL_CLASSES = (
    16,
    16,
    1000,
)  # 256 tokens of 4 x 2 x 2 SD-VAE latents


def official_model(args) -> SelfFlowTransformer:
    """selfflow's XL/2 as `load_official` builds it (sincos positions, time scale 1, 1000 classes),
    adaLN and output layers random so that the per-token and distinct-level paths compute something
    to compare."""
    torch.manual_seed(0)
    model = SelfFlowTransformer(
        {"image": OFFICIAL_CHANNELS},
        width=args.official_width,
        depth=args.official_depth,
        heads=args.official_heads,
        num_classes=OFFICIAL_CLASSES,
        pos_embed="sincos",
        time_scale=1.0,
    )
    for name, p in model.named_parameters():
        if "adaLN_modulation" in name or "final_layers" in name:
            nn.init.normal_(p, std=0.02)
    return model.to(args.device)


def released_per_token_forward(
    model: SelfFlowTransformer, blocks: list[nn.Module], x, t, pos, labels
):
    """The released SelfFlowPerTokenDiT's code path on `model`'s weights: every token is its own
    conditioning vector (t: [B, N]), so the timestep MLP and every adaLN MLP run on N vectors per
    sample. blocks: the model's blocks wrapped as `NaiveAdaLNBlock`s (compiled with --compile)."""
    cond = model.conditioning(t, labels)  # [B, N, D]
    h = model.embed_tokens(Tokens(x, pos, "image"))
    for block in blocks:
        h = block(h, cond)
    final = model.final_layers["image"]
    shift, scale = final.adaLN_modulation(cond).chunk(2, dim=-1)
    return final.linear(modulate(final.norm(h), shift, scale))


def two_levels_per_sample(
    batch: int, n: int, device: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Self-Flow training batch's levels: (levels [B, 2], index [B, N], per-token levels
    [B, N])."""
    generator = torch.Generator().manual_seed(1)
    levels = torch.rand(batch, 2, generator=generator)
    index = (torch.rand(batch, n, generator=generator) < 0.25).long()
    return levels.to(device), index.to(device), torch.gather(levels, 1, index).to(device)


def case_official(args, with_grad: bool) -> list[dict]:
    """XL/2 at 256 tokens, one model: the released per-token path against selfflow's (adaLN on each
    sample's distinct levels), timed in alternation so that a noisy machine slows both alike.

    with_grad: a training step's forward + backward (selfflow's model called with its level table,
    as training does); else a forward without gradients (selfflow through `OfficialSelfFlow.forward`
    with per-token levels)."""
    model = official_model(args)
    naive = [NaiveAdaLNBlock(block) for block in model.blocks]
    n, batch = OFFICIAL_GRID**2, args.official_batch
    official = OfficialSelfFlow(model, None, OFFICIAL_GRID, 2, OFFICIAL_CHANNELS // 4)
    pos = ImagePatchTokenizer(2, OFFICIAL_CHANNELS // 4, 2 * OFFICIAL_GRID).positions(
        batch, args.device
    )
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(batch, n, OFFICIAL_CHANNELS, generator=generator).to(args.device)
    target = torch.randn(batch, n, OFFICIAL_CHANNELS, generator=generator).to(args.device)
    labels = torch.randint(0, OFFICIAL_CLASSES, (batch,), generator=generator).to(args.device)
    levels, index, per_token = two_levels_per_sample(batch, n, args.device)

    def released(rows: slice = slice(None)):
        return released_per_token_forward(
            model, naive, x[rows], per_token[rows], pos[rows], labels[rows]
        )

    def selfflow(rows: slice = slice(None)):
        if with_grad:
            noised = Tokens(x[rows], pos[rows], "image")
            return model(noised, levels[rows], index[rows], Condition(labels=labels[rows])).velocity
        return official(x[rows], per_token[rows], labels[rows])

    with torch.no_grad():  # the same function: compared on the first sample, eager, in fp32
        difference = (selfflow(slice(0, 1)) - released(slice(0, 1))).abs().max().item()
    if args.compile:  # model.compile=true: each block compiled (the released path's blocks too)
        for block in (*model.blocks, *naive):
            block.compile()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    device_type = args.device.split(":")[0]

    def step_of(forward):
        def step():
            with torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32):
                if not with_grad:
                    with torch.no_grad():
                        return forward()
                loss = (forward().float() - target).square().mean()
            model.zero_grad(set_to_none=True)
            loss.backward()

        return step

    steps = {
        "selfflow": step_of(selfflow),
        "released": step_of(released),
    }  # selfflow first: CPU peaks are coarse
    memory = peak_memory_of(steps, args.device)
    times = time_alternating(steps, args.device, args.warmup, args.iters)
    config = {
        "width": args.official_width,
        "depth": args.official_depth,
        "heads": args.official_heads,
        "batch": batch,
        "tokens": n,
        "dtype": args.dtype,
        "compile": args.compile,
        "pass": "forward + backward" if with_grad else "forward, no gradients",
    }
    out = []
    for variant, step in steps.items():
        with torch.compiler.set_stance("force_eager"):
            flops = count_flops(step)
        levels_of = {"selfflow": "distinct per sample (2)", "released": "per token"}[variant]
        out.append(
            record(
                f"official{'' if with_grad else '_forward'}/{variant}",
                {**config, "levels": levels_of},
                times[variant],
                batch * n,
                memory[variant],
                args.device,
                flops_per_step=flops,
                achieved_flops_per_s=flops / statistics.median(times[variant]),
            )
        )
        if variant == "selfflow":
            out[-1]["max_abs_difference_to_released"] = difference
        if args.profile:
            out[-1]["profile"] = profile_table(step, args.device)
    return out


def profile_table(step, device: str, steps: int = 3, rows: int = 15) -> str:
    """Where a step's time goes: the torch.profiler table of its most expensive operators
    (self time)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + (
        [ProfilerActivity.CUDA] if device.startswith("cuda") else []
    )
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            step()
        sync(device)
    key = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=key, row_limit=rows)


# ---------------------------------------------------------------- the suite


CASES = ("train", "adaln", "packing")  # the default suite
EXTRA_CASES = ("attention", "official", "official_forward")


def run_case(payload) -> list[dict]:
    name, args, extra = payload
    torch.set_num_threads(args.threads)
    if name == "train":
        return [case_training_step(args, *extra)]
    if name == "adaln":
        return [case_adaln(args, *extra)]
    if name == "packing":
        return [case_packing(args, *extra)]
    if name == "attention":
        return case_attention(args)
    if name in ("official", "official_forward"):
        return case_official(args, with_grad=name == "official")
    raise ValueError(name)


def ratio(records: dict, slower: str, faster: str) -> float:
    return records[slower]["step_s_median"] / records[faster]["step_s_median"]


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", help="write the JSON records here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on CUDA, fp32 on CPU"
    )
    parser.add_argument("--quick", action="store_true", help="fewer iterations and smaller sizes")
    parser.add_argument(
        "--only",
        choices=[*CASES, *EXTRA_CASES],
        action="append",
        help="run only these cases (attention: one layer, SDPA against FlexAttention on packed "
        "rows; official, official_forward: XL/2 against the released code path; these three "
        "are not part of the default suite)",
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--width", type=int, help="model width (default: 384 on GPU, 256 on CPU; official: 1152)"
    )
    parser.add_argument(
        "--depth", type=int, help="model depth (default: 12 on GPU, 10 on CPU; official: 28)"
    )
    parser.add_argument(
        "--heads", type=int, help="attention heads (default: width / 64; official: 16)"
    )
    parser.add_argument(
        "--batch",
        type=int,
        help="batch size (default: 64 on GPU, 16 on CPU; official: 32 on GPU, 2 on CPU)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="official cases: model.compile=true (every block "
        "compiled, the released path's too); attention case: "
        "both layers compiled",
    )
    parser.add_argument(
        "--profile", action="store_true", help="official cases: add a profiler table of the step"
    )
    parser.add_argument(
        "--packing-scale", type=int, default=1, help="multiply the packing case's sample lengths"
    )
    parser.add_argument(
        "--packing-pass",
        choices=["train", "forward"],
        default="train",
        help="packing case: a training step, or student and teacher forwards without gradients",
    )
    parser.add_argument(
        "--attention",
        choices=["auto", "sdpa", "flex"],
        default="auto",
        help="packing case: model.attention (auto: flash-attn's variable-length kernel when "
        "installed, else FlexAttention on CUDA and the dense block mask on CPU; sdpa: always "
        "the dense mask; flex: always FlexAttention)",
    )
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    on_gpu = args.device.startswith("cuda")
    # the released model's size (SiT-XL/2) for the official cases, unless
    # --width/--depth/--heads/--batch say otherwise
    args.official_width, args.official_depth = args.width or 1152, args.depth or 28
    args.official_heads, args.official_batch = args.heads or 16, args.batch or (32 if on_gpu else 2)
    # the training-step model: DiT-S-like on GPU, a small one on CPU, unless --width/--depth/--batch
    # say otherwise
    width, depth, heads = (384, 12, 6) if on_gpu else (256, 10, 4)
    args.heads = args.heads or (max(1, args.width // 64) if args.width else heads)
    args.width = args.width or width
    args.depth = args.depth or (depth // 2 if args.quick else depth)
    args.batch = args.batch or (64 if on_gpu else 16)
    args.grid, args.channels = (16, 16) if on_gpu else (8, 12)
    args.adaln_tokens = 256  # SiT-XL/2 on 256px images: 16x16 latent patches
    args.adaln_batch = 32 if on_gpu else 4
    args.warmup, args.iters = (
        (2, 5) if args.quick else ((10, 30) if on_gpu else (3, 15))
    )  # GPU: clocks ramp up
    cases = args.only or list(CASES)

    payloads = []
    if "train" in cases:
        payloads += [
            ("train", args, (v,)) for v in ("vanilla", "selfflow", "selfflow_checkpointed")
        ]
    if "adaln" in cases:
        widths = (384, 1152)
        payloads += [("adaln", args, (w, v)) for w in widths for v in ("naive", "distinct")]
    if "packing" in cases:
        payloads += [("packing", args, (v,)) for v in ("padded", "packed")]
    payloads += [(case, args, ()) for case in EXTRA_CASES if case in cases]

    context = mp.get_context("spawn")
    records = []
    for payload in payloads:  # one fresh process per case, one at a time
        with context.Pool(1) as pool:
            records += pool.apply(run_case, (payload,))
    by_name = {r["name"]: r for r in records}

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    ceiling = matmul_flops_per_s(args.device, dtype)
    for r in records:
        if "achieved_flops_per_s" in r:
            r["matmul_ceiling_flops_per_s"] = ceiling
            r["mfu"] = r["achieved_flops_per_s"] / ceiling
    summary = {
        "name": "summary",
        "config": {"dtype": args.dtype},
        "step_s_median": None,
        "tokens_per_s": None,
        "peak_mem_mb": None,
        "device": device_name(args.device),
        "matmul_ceiling_flops_per_s": ceiling,
    }
    if "train" in cases:
        summary["selfflow_over_vanilla_step"] = ratio(
            by_name, "train_step/selfflow", "train_step/vanilla"
        )
        summary["checkpointing_time_cost"] = ratio(
            by_name, "train_step/selfflow_checkpointed", "train_step/selfflow"
        )
        summary["checkpointing_memory_saving"] = 1 - (
            by_name["train_step/selfflow_checkpointed"]["peak_mem_mb"]
            / max(by_name["train_step/selfflow"]["peak_mem_mb"], 1e-9)
        )
    if "adaln" in cases:
        for w in (384, 1152):
            summary[f"adaln_distinct_speedup_w{w}"] = ratio(
                by_name, f"adaln/naive/w{w}", f"adaln/distinct/w{w}"
            )
    if "packing" in cases:
        summary["packed_over_padded_useful_tokens_per_s"] = (
            by_name["packing/packed"]["tokens_per_s"] / by_name["packing/padded"]["tokens_per_s"]
        )
        summary["packed_over_padded_peak_memory"] = by_name["packing/packed"]["peak_mem_mb"] / max(
            by_name["packing/padded"]["peak_mem_mb"], 1e-9
        )
    if "attention" in cases:
        summary["attention_flex_over_sdpa_time"] = ratio(
            by_name, "attention/flex", "attention/sdpa"
        )
    if "official" in cases:  # target: <= 0.8 on a GPU
        summary["official_selfflow_over_released_step"] = ratio(
            by_name, "official/selfflow", "official/released"
        )
    if "official_forward" in cases:  # target: >= 1.25
        summary["official_forward_released_over_selfflow"] = ratio(
            by_name, "official_forward/released", "official_forward/selfflow"
        )
    records.append(summary)
    print_table(records)
    for r in records:
        if "profile" in r:
            print(f"\nprofile of {r['name']} ({r['device']}):\n{r['profile']}")
    if args.out:
        Path(args.out).write_text(json.dumps(records, indent=2))
        print(f"wrote {args.out}")
    return records


def print_table(records: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"selfflow benchmarks on {records[-1]['device']}")
    for column in ("name", "step ms", "tokens/s", "peak MB", "GFLOP/step", "MFU"):
        table.add_column(column, justify="right" if column != "name" else "left")
    for r in records[:-1]:
        table.add_row(
            r["name"],
            f"{1000 * r['step_s_median']:.1f}",
            f"{r['tokens_per_s']:.0f}",
            f"{r['peak_mem_mb']:.0f}",
            f"{r.get('flops_per_step', 0) / 1e9:.2f}",
            f"{r['mfu']:.1%}" if "mfu" in r else "",
        )
    console = Console()
    console.print(table)
    for key, value in records[-1].items():
        if isinstance(value, float) and key != "matmul_ceiling_flops_per_s":
            console.print(f"  {key}: {value:.3f}")
    console.print(
        f"  matmul ceiling: {records[-1]['matmul_ceiling_flops_per_s'] / 1e9:.0f} GFLOP/s"
    )


if __name__ == "__main__":
    main()
