"""The Self-Flow objective: dual-timestep flow matching plus EMA self-distillation of features."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from selfflow.flow.dual_timestep import DualLevels, DualTimestepScheduler, check_mask_ratio
from selfflow.flow.path import interpolate, velocity_target
from selfflow.flow.timesteps import TimestepDistribution
from selfflow.models.attention import GroupMask
from selfflow.models.transformer import SelfFlowTransformer
from selfflow.objectives.ema import EMA
from selfflow.objectives.flow_loss import (
    bucket_sums,
    masked_mean,
    own_channels,
    token_squared_error,
)
from selfflow.objectives.gamma_schedule import GammaSchedule
from selfflow.objectives.repa import token_grid
from selfflow.objectives.representation import ProjectionHead, cosine_distance
from selfflow.tokens import Condition, PackedTokens, TokenModalities, Tokens


def sampling_weights_name(decay: float) -> str:
    """`ema_<decay>`: how `weights=` names an extra sampling EMA (e.g. ema_0.9999).

    Args:
        decay: The EMA's decay.

    Returns:
        The name `weights=` takes.
    """
    return f"ema_{float(decay)!r}"


def sampling_ema_key(name: str) -> str:
    """The module key of a sampling EMA named `name` (module names cannot hold dots): ema_0.9999 ->
    ema_0_9999.

    Args:
        name: The EMA's name, `ema_<decay>`.

    Returns:
        The name with its dots replaced by underscores.
    """
    return name.replace(".", "_")


def default_layers(depth: int) -> tuple[int, int]:
    """Student and teacher layers at about 0.3 and 0.7 of the depth (8 and 20 of 28).

    Args:
        depth: The model's blocks.

    Returns:
        (student layer, teacher layer), 1-based, the student's before the teacher's.
    """
    student = max(1, round(0.3 * depth))
    teacher = min(depth, max(student + 1, round(0.7 * depth)))
    return student, teacher


def check_loss_settings(
    gamma: float,
    class_dropout: float,
    caption_dropout: float,
    loss_buckets: int,
) -> None:
    """The ranges of the objective's plain numbers, each error naming its config key.

    Args:
        gamma: Weight of the representation loss.
        class_dropout: Probability of dropping a label.
        caption_dropout: Probability of dropping a caption.
        loss_buckets: Noise-level ranges the flow loss is logged in.

    Raises:
        ValueError: The first value out of range.
    """
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or gamma < 0:
        raise ValueError(
            f"objective.gamma={gamma} must be one number >= 0 (0 turns the representation "
            "loss off; to change it over training set objective.gamma_schedule.kind)"
        )
    for key, value in (("class_dropout", class_dropout), ("caption_dropout", caption_dropout)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"objective.{key}={value} must be in [0, 1]")
    if isinstance(loss_buckets, bool) or not isinstance(loss_buckets, int) or loss_buckets < 1:
        raise ValueError(f"objective.loss_buckets={loss_buckets!r} must be an integer >= 1")


def resolve_layers(depth: int, student: int | None, teacher: int | None) -> tuple[int, int]:
    """The student and teacher layers, None taking `default_layers`.

    Args:
        depth: The model's blocks.
        student: 1-based student block, or None.
        teacher: 1-based teacher block, or None.

    Returns:
        (student layer, teacher layer).

    Raises:
        ValueError: Not 1 <= student < teacher <= depth.
    """
    auto_student, auto_teacher = default_layers(depth)
    student = auto_student if student is None else student
    teacher = auto_teacher if teacher is None else teacher
    if not 1 <= student < teacher <= depth:
        raise ValueError(
            f"objective.student_layer={student} and objective.teacher_layer={teacher} must "
            f"satisfy 1 <= student_layer < teacher_layer <= model depth ({depth})"
        )
    return student, teacher


def resolve_mask_ratios(
    mask_ratio: float | Mapping[str, float],
    modalities: list[str],
) -> dict[str, float]:
    """One checked mask ratio per modality.

    Args:
        mask_ratio: One ratio in [0, 0.5] for all, or one per modality.
        modalities: The model's modalities.

    Returns:
        Modality -> its ratio.

    Raises:
        ValueError: A ratio out of range, or a modality without one.
    """
    per_modality = isinstance(mask_ratio, Mapping)
    ratios = dict(mask_ratio) if per_modality else dict.fromkeys(modalities, mask_ratio)
    missing = set(modalities) - set(ratios)
    if missing:
        raise ValueError(f"objective.mask_ratio has no value for modalities {sorted(missing)}")
    key = "objective.mask_ratio"
    keys = {m: f"{key}.{m}" if per_modality else key for m in ratios}
    return {m: check_mask_ratio(r, keys[m]) for m, r in ratios.items()}


def check_loss_weights(loss_weights: dict[str, float] | None) -> dict[str, float]:
    """Modality -> its non-negative loss weight (missing modalities weigh 1).

    Args:
        loss_weights: The configured weights, or None.

    Returns:
        The weights as floats.

    Raises:
        ValueError: A negative weight.
    """
    weights = {m: float(w) for m, w in (loss_weights or {}).items()}
    negative = {m: w for m, w in weights.items() if w < 0}
    if negative:
        raise ValueError(f"objective.loss_weights must be >= 0, got {negative}")
    return weights


def sampling_emas(model: nn.Module, decays, warmup: bool) -> nn.ModuleDict:
    """The extra EMAs of the student to sample from, keyed by `sampling_ema_key`.

    Args:
        model: The student.
        decays (Sequence[float]): One decay per EMA.
        warmup: Warm each decay up over the first updates.

    Returns:
        Key -> EMA.

    Raises:
        ValueError: A decay listed twice.
    """
    names = [sampling_weights_name(d) for d in decays]
    if len(set(names)) < len(names):
        raise ValueError(
            f"objective.sampling_ema_decays={list(decays)} repeats a decay; list each once",
        )
    return nn.ModuleDict(
        {
            sampling_ema_key(name): EMA(
                model,
                float(d),
                warmup,
                key="objective.sampling_ema_decays",
            )
            for name, d in zip(names, decays)
        }
    )


@dataclass
class ObjectiveOutput:
    """The losses of one training step and what the logs show of it.

    Attributes:
        loss: The scalar to minimise, loss_flow + gamma * loss_rep.
        loss_flow: The flow-matching loss over the data tokens.
        loss_rep: The representation loss; None when gamma == 0 (no teacher forward).
        gamma: The representation loss weight at this step (objective.gamma times its schedule).
        flow_bucket_sums: [buckets] flow error summed per noise-level range.
        flow_bucket_counts: [buckets] tokens per noise-level range.
        levels: The step's dual-timestep levels and mask.
        per_modality: Modality -> its detached losses, for logging.
    """

    loss: Tensor  # scalar: loss_flow + gamma * loss_rep
    loss_flow: Tensor
    loss_rep: Tensor | None  # None when gamma == 0 (no teacher forward)
    gamma: float  # the representation loss weight at this step (objective.gamma times its schedule)
    flow_bucket_sums: Tensor  # [buckets] flow error summed per noise-level range
    flow_bucket_counts: Tensor  # [buckets]
    levels: DualLevels = field(repr=False)
    # modality -> its detached losses, for logging
    per_modality: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    loss_align: Tensor | None = None  # REPA's alignment loss (objective.alignment), None without it


class SelfFlowObjective(nn.Module):
    """Owns the student (`model`), its EMA teacher and the projection head; computes the training
    loss. Text tokens are never noised and the losses cover data tokens only.

    Args:
        model: The student.
        mask_ratio: One ratio in [0, 0.5], or one per modality (method defaults: image 0.25, video
            0.10, audio 0.50).
        gamma: Weight of the representation loss (0 = dual-timestep only; with mask_ratio 0:
            vanilla flow matching).
        student_layer: 1-based block whose output the head projects; None for about 0.3 of the
            depth.
        teacher_layer: 1-based teacher block it is compared with; None for about 0.7 of the depth.
        ema_decay: The teacher's EMA decay.
        ema_warmup: Warm the decay up over the first updates.
        timesteps: The distribution p(t) both levels are drawn from; None for uniform.
        mask_mode: `exact` or `bernoulli` masking.
        class_dropout: Probability of replacing a label with the null label, shared by student and
            teacher.
        attention_separation: Block attention between the two noise groups in the student
            (ablation); with text, each group attends to its own copy of the text tokens.
        loss_buckets: Noise-level ranges the flow loss is logged in.
        loss_weights: Modality -> weight of its per-token losses (joint training); None for 1 each.
        caption_dropout: Probability of replacing a caption with the null text (classifier-free
            guidance), shared by student and teacher like the label dropout.
        gamma_schedule: Gamma over training (a factor of it per optimizer step); None for constant.
        sampling_ema_decays: Extra EMAs of the student, one full model copy each (no gradient, no
            optimizer state), updated with the teacher and read as `weights=ema_<decay>` by
            selfflow-sample and selfflow-probe: a slower EMA to sample from than the teacher.
        alignment: REPA's alignment to an external encoder (`repa.REPAAlignment`, built with the
            model's width and depth and `encoder`); `forward` then needs the batch's clean images
            (objective=repa).
        encoder: The local folder of REPA's encoder (read only with `alignment`, so that one sweep
            over the objectives can name it for all).

    Raises:
        ValueError: A value out of range, layers not 1 <= student < teacher <= depth, a modality
            without a mask ratio, a repeated sampling EMA decay, or `alignment` without `encoder`.
    """

    def __init__(
        self,
        model: SelfFlowTransformer,
        mask_ratio: float | dict[str, float] = 0.25,
        gamma: float = 0.8,
        student_layer: int | None = None,
        teacher_layer: int | None = None,
        ema_decay: float = 0.9999,
        ema_warmup: bool = True,
        timesteps: TimestepDistribution | None = None,
        mask_mode: str = "exact",
        class_dropout: float = 0.1,
        attention_separation: bool = False,
        loss_buckets: int = 4,
        loss_weights: dict[str, float] | None = None,
        caption_dropout: float = 0.1,
        gamma_schedule: GammaSchedule | None = None,
        sampling_ema_decays: tuple[float, ...] | list[float] = (),
        alignment: Callable[..., nn.Module] | None = None,
        encoder: str | None = None,
    ):
        super().__init__()
        check_loss_settings(gamma, class_dropout, caption_dropout, loss_buckets)
        self.caption_dropout = float(caption_dropout)
        student_layer, teacher_layer = resolve_layers(model.depth, student_layer, teacher_layer)
        self.mask_ratios = resolve_mask_ratios(mask_ratio, list(model.token_channels))
        ratio = max(self.mask_ratios.values())
        self.scheduler = DualTimestepScheduler(ratio, timesteps, mask_mode)
        self.loss_weights = check_loss_weights(loss_weights)
        self.model = model
        self.teacher = EMA(model, ema_decay, ema_warmup)
        self.sampling_emas = sampling_emas(model, sampling_ema_decays, ema_warmup)
        self.gamma_schedule = gamma_schedule or GammaSchedule()
        self.head = ProjectionHead(model.width) if gamma > 0 else None
        self.gamma, self.class_dropout = float(gamma), float(class_dropout)
        self.student_layer, self.teacher_layer = student_layer, teacher_layer
        self.attention_separation, self.loss_buckets = attention_separation, loss_buckets
        self.alignment = None
        if alignment is not None:
            if not encoder:
                raise ValueError(
                    "objective=repa needs objective.encoder=DIR: a local folder with a "
                    "transformers Dinov2Model (save_pretrained); nothing is downloaded"
                )
            self.alignment = alignment(width=model.width, depth=model.depth, encoder=encoder)

    def drop_condition(self, condition: Condition, samples: tuple[int, int], device) -> Condition:
        """Classifier-free guidance dropout, drawn once and shared by the student and the teacher:
        each sample's label ([R, S] samples) with probability class_dropout (all of them for an
        unconditional model), each caption with probability caption_dropout.

        Args:
            condition: The batch's condition, labels per sample [R, S].
            samples: (R, S), the shape of the label draw.
            device (torch.device | str): Where the draw is made.

        Returns:
            The condition with the dropped labels and captions replaced by their null.
        """
        if condition.labels is None or self.model.num_classes == 0:
            condition = replace(condition, labels=None)  # the model's null class
        else:
            condition = condition.drop(
                torch.rand(samples, device=device) < self.class_dropout,
                only="labels",
            )
        if condition.text is not None and self.caption_dropout > 0:
            draw = torch.rand(condition.text.batch_size, device=condition.text.valid.device)
            rows = draw < self.caption_dropout
            condition = condition.drop(rows, only="text")
        return condition

    @staticmethod
    def attention_mask(groups: Tensor | None, contiguous: bool = True) -> GroupMask | None:
        """groups: [B, N] long, -1 on padding: tokens attend within their own group only (None: no
        blocking).

        Args:
            groups: [B, N] long group of each token, -1 on padding; None for full attention.
            contiguous: Whether each group's tokens are consecutive (lets flash-attn's varlen kernel
                run).

        Returns:
            The attention mask, or None.
        """
        return None if groups is None else GroupMask(groups, contiguous)

    def gamma_at(self, step: int | None) -> float:
        """The representation loss weight at optimizer step `step` (None: objective.gamma,
        unscheduled).

        Args:
            step: The optimizer step; None for the unscheduled gamma.

        Returns:
            objective.gamma times its schedule at `step`.
        """
        return self.gamma if step is None else self.gamma * self.gamma_schedule(step)

    def forward(
        self,
        tokens: Tokens | PackedTokens,
        condition: Condition | None = None,
        step: int | None = None,
        images: Tensor | None = None,
    ) -> ObjectiveOutput:
        """The losses of one training step.

        Args:
            tokens: A padded batch of one modality, or packed rows.
            condition: The batch's labels ([B]; packed rows carry theirs inside the packing),
                captions and size conditioning; None for unconditional.
            step: The optimizer step, for the gamma schedule.
            images: The clean images [B, C, H, W] in [0, 1] (REPA's alignment).

        Returns:
            The losses, the step's levels and the per-modality logs.

        Raises:
            ValueError: Text or size conditioning with packed rows.
        """
        condition = self.checked_condition(tokens, condition)
        x0, segment, valid = tokens.x, tokens.segment, tokens.valid  # [R, N, C], [R, N], [R, N]
        ratios = self.sample_mask_ratios(tokens)  # [R, S]
        dual = self.scheduler.for_segments(segment, ratios.shape[1], ratios)
        x1 = self.shared_noise(tokens)  # one noise draw for student and teacher
        # labels per sample [R, S]; dropped once, shared by student and teacher
        labels = replace(condition, labels=self.sample_labels(tokens, condition.labels))
        condition = self.drop_condition(labels, tuple(ratios.shape), x0.device)
        sample_groups, groups = self.attention_groups(segment, valid, dual, ratios)
        want_rep = self.gamma > 0
        student = self.model(
            replace(tokens, x=interpolate(x0, x1, dual.per_token)),
            dual.levels,
            dual.index,
            condition,
            attn_mask=groups,
            hidden_layers=self._hidden_layers(want_rep),
        )
        velocity = velocity_target(x0, x1)
        channels = tokens.channel_counts  # [R, N] on packed rows, else None
        flow_error = token_squared_error(student.velocity, velocity, channels)  # [R, N]
        weights = tokens.modalities.per_token(lambda name: self.loss_weights.get(name, 1.0))
        loss_flow = masked_mean(flow_error * weights, valid)
        loss_rep, rep_error = None, None
        if want_rep:
            target = self.teacher_features(tokens, x0, x1, dual, condition, sample_groups)
            rep_error = cosine_distance(self.head(student.hidden[self.student_layer]), target)
            loss_rep = masked_mean(rep_error * weights, valid)  # rep_error: [R, N]
        loss_align = self._alignment_loss(student.hidden, tokens, images)
        errors = (flow_error.detach(), None if rep_error is None else rep_error.detach())
        gamma = self.gamma_at(step)
        return self._output(tokens, dual, loss_flow, loss_rep, gamma, loss_align, errors)

    def _output(
        self,
        tokens: Tokens | PackedTokens,
        dual: DualLevels,
        loss_flow: Tensor,
        loss_rep: Tensor | None,
        gamma: float,
        loss_align: Tensor | None,
        errors: tuple[Tensor, Tensor | None],
    ) -> ObjectiveOutput:
        """The total loss and what the logs show: level buckets and per-modality losses."""
        loss = loss_flow if loss_rep is None else loss_flow + gamma * loss_rep
        if loss_align is not None:
            loss = loss + self.alignment.weight * loss_align
        flow_error, rep_error = errors  # detached, [R, N] each
        sums, counts = bucket_sums(flow_error, dual.per_token, self.loss_buckets, tokens.valid)
        return ObjectiveOutput(
            loss=loss,
            loss_flow=loss_flow,
            loss_rep=loss_rep,
            gamma=gamma,
            flow_bucket_sums=sums,
            flow_bucket_counts=counts,
            levels=dual,
            per_modality=self._per_modality(flow_error, rep_error, tokens.modalities),
            loss_align=loss_align,
        )

    @staticmethod
    def checked_condition(tokens: Tokens | PackedTokens, condition: Condition | None) -> Condition:
        """The batch's condition (None: unconditional), refused where packing cannot carry it.

        Args:
            tokens: The batch.
            condition: Its condition, or None.

        Returns:
            The condition.

        Raises:
            ValueError: Text or size conditioning with packed rows.
        """
        condition = condition or Condition()
        extras = (condition.text, condition.sizes)
        if isinstance(tokens, PackedTokens) and any(e is not None for e in extras):
            raise ValueError(
                "text and size conditioning work with padded batches; turn data packing off",
            )
        return condition

    @staticmethod
    def shared_noise(tokens: Tokens | PackedTokens) -> Tensor:
        """x1 ~ N(0, I) like the tokens; on packed rows only each token's own channels are noised,
        so the zero padding of narrower modalities stays zero.

        Args:
            tokens: The batch.

        Returns:
            [R, N, C] the noise.
        """
        x1 = torch.randn_like(tokens.x)
        channels = tokens.channel_counts
        if channels is not None:
            x1 = torch.where(own_channels(channels, tokens.x.shape[-1]), x1, 0.0)
        return x1

    def sample_mask_ratios(self, tokens: Tokens | PackedTokens) -> Tensor:
        """[R, S] mask ratio of each sample's modality (0 on empty sample slots).

        Args:
            tokens: The batch.

        Returns:
            [R, S] float ratios on the tokens' device.
        """
        slots, rows = tokens.num_segments, []
        for row in tokens.sample_modalities:
            rows.append([self.mask_ratios[m] for m in row] + [0.0] * (slots - len(row)))
        return torch.tensor(rows, device=tokens.x.device)

    @staticmethod
    def sample_labels(tokens: Tokens | PackedTokens, labels: Tensor | None) -> Tensor | None:
        """[R, S] class label of each sample: packed rows carry theirs, a padded batch's are given.

        Args:
            tokens: The batch.
            labels: [B] the labels of a padded batch, or None.

        Returns:
            [R, S] long labels, or None for an unlabelled padded batch.
        """
        if isinstance(tokens, PackedTokens):
            return tokens.segment_labels
        return None if labels is None else labels[:, None]

    def attention_groups(
        self, segment: Tensor, valid: Tensor | None, dual: DualLevels, ratios: Tensor
    ) -> tuple[GroupMask | None, GroupMask | None]:
        """Attention stays within a sample (packed rows), within a noise group (the separation
        ablation), and away from padding.

        Args:
            segment: [R, N] long sample of each token, -1 on padding.
            valid: [R, N] bool, False on padding; None when every token is valid.
            dual: The step's levels (its index splits the noise groups).
            ratios: [R, S] the samples' mask ratios.

        Returns:
            (the teacher's groups: samples, the student's: samples or noise groups); None where
            nothing needs blocking.
        """
        sample_groups = self.attention_mask(segment if valid is not None else None)
        if self.attention_separation and float(ratios.max()) > 0:
            noise_groups = torch.where(segment >= 0, dual.index, -1)
            return sample_groups, self.attention_mask(noise_groups, contiguous=False)
        return sample_groups, sample_groups

    @torch.no_grad()
    def teacher_features(
        self,
        tokens: Tokens | PackedTokens,
        x0: Tensor,
        x1: Tensor,
        dual: DualLevels,
        condition: Condition,
        groups: GroupMask | None,
    ) -> Tensor:
        """The EMA teacher's block `teacher_layer` output on the cleaner view, min(t, s) per sample.

        Args:
            tokens: The batch.
            x0: [R, N, C] the clean tokens.
            x1: [R, N, C] the noise shared with the student.
            dual: The step's levels.
            condition: The condition after dropout, shared with the student.
            groups: The samples' attention groups.

        Returns:
            [R, N, D] the teacher's features, without gradient.
        """
        return self.teacher.module(
            replace(tokens, x=interpolate(x0, x1, dual.teacher_per_token)),
            dual.teacher_levels,
            dual.teacher_index,
            condition,
            attn_mask=groups,
            hidden_layers=(self.teacher_layer,),
            stop_after=self.teacher_layer,
        ).hidden[self.teacher_layer]

    def _hidden_layers(self, want_rep: bool) -> tuple[int, ...]:
        """The student blocks whose outputs the losses read: Self-Flow's and REPA's layers."""
        layers = (self.student_layer,) if want_rep else ()
        if self.alignment is not None and self.alignment.layer not in layers:
            layers = (*layers, self.alignment.layer)
        return layers

    def _alignment_loss(self, hidden: dict, tokens, images: Tensor | None) -> Tensor | None:
        """REPA's loss, mean over tokens and samples (None without objective.alignment)."""
        if self.alignment is None:
            return None
        if tokens.modalities.single != "image" or tokens.valid is not None:
            raise ValueError(
                "objective=repa aligns image tokens of unpacked batches; train on image data "
                "without packing or buckets (REPA for video and audio: docs/results.md)"
            )
        if images is None:
            raise ValueError(
                "objective=repa needs the batch's clean images: pass images=[B, C, H, W]",
            )
        return self.alignment(hidden[self.alignment.layer], images, token_grid(tokens)).mean()

    @staticmethod
    def _per_modality(
        flow_error: Tensor,
        rep_error: Tensor | None,
        modalities: TokenModalities,
    ) -> dict:
        """{modality: {"loss_flow": ..., "loss_rep": ...}} over each modality's tokens."""
        out = {}
        for name, sel in modalities.masks.items():
            if sel is not None and not bool(sel.any()):
                continue
            out[name] = {"loss_flow": masked_mean(flow_error, sel)}
            if rep_error is not None:
                out[name]["loss_rep"] = masked_mean(rep_error, sel)
        return out

    def update_teacher(self) -> None:
        """Call after every optimizer step: the teacher and the sampling EMAs follow the student."""
        for ema in (self.teacher, *self.sampling_emas.values()):
            ema.update(self.model)
