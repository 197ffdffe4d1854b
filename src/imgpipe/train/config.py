"""What a training run is, without torch: the train step's settings and the recipes they hold.

:class:`TrainConfig` (the train step) and :class:`~imgpipe.train.augment_config.AugmentConfig`
(its augmentation recipe, its own module) are plain frozen dataclasses (how a split is streamed, ``LoaderConfig``, is
:mod:`imgpipe.train.loader_config`'s), apart from the torch code that uses them (:mod:`imgpipe.steps.train`, :mod:`imgpipe.train.augment`,
:mod:`imgpipe.train.loader`), so that reading a config or compiling the pipeline
(``imgpipe compile`` in the ``cpu`` image) needs no torch.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import ClassVar, Literal

from imgpipe import storage
from imgpipe.config import check_numbers, check_range, did_you_mean
from imgpipe.train.augment_config import AugmentConfig, Policy
from imgpipe.train.loader_config import (
    MAX_BATCH,
    MAX_CACHE_GB,
    TRAIN_LOADER_ENGINES,
    LoaderConfig,
    default_cache_bytes,
    resolve_engine,
)
from imgpipe.train.recipes import (
    BASE,
    DOMAIN_FIELDS,
    DOMAIN_NAMES,
    MAY_STAY_UNSET,
    RECIPE_FIELDS,
    RECIPES,
    Domain,
    Recipe,
)

__all__ = [
    "TrainConfig",
    "WEIGHTS_CACHE",
    "default_weights_cache",
]

# The pretrained-weights cache's folder: {data_root}/weights in the pipeline, and beside the
# output prefix of a run that names no cache (imgpipe.train.pretrained has the layout below it).
WEIGHTS_CACHE = "weights"
# The most nodes a config may name at all; the operator's cap on a run is lower (remote.trainjob).
MAX_NODES = 64


def default_weights_cache(out: str) -> str:
    """The weights cache of a run that names none: ``weights/`` beside its output prefix.

    ``s3://bucket/exp/train`` caches in ``s3://bucket/exp/weights``, so runs writing next
    to each other share it.

    Raises:
        ValueError: If ``out`` is a bucket or file system root, with nothing beside it.
    """
    out = storage.normalize_uri(out).rstrip("/")
    parent, _, name = out.rpartition("/")
    if not name or parent.endswith((":/", "://")):
        raise ValueError(f"output {out} lies at a root, with no folder beside it for weights/; set weights_cache")
    return storage.join(parent, WEIGHTS_CACHE)


@dataclass(frozen=True)
class TrainConfig:
    """Settings of the train step.

    The fields a size recipe or a domain sets (:data:`imgpipe.train.recipes.RECIPE_FIELDS`
    and ``DOMAIN_FIELDS``) default to ``None``, "unset": the train step fills them
    (:func:`imgpipe.train.recipes.resolve`) once it knows the data, a value set here winning
    field by field; :attr:`resolved` tells whether that has happened.

    Attributes:
        model: torchvision classification model name (``weights=None``) or ``tiny_cnn``.
        recipe: Training recipe by dataset size: ``small`` (under 50 images per class, or
            under a thousand in all), ``medium`` (thousands), ``large`` (hundreds of thousands),
            ``auto`` (chosen from the train split's counts) or ``none`` (imgpipe's base settings). It
            sets the policy, RandAugment N/M, MixUp/CutMix, label smoothing, weight decay,
            drop path, epochs and the linear-probe schedule; fields set explicitly win.
        domain: What the images are: ``natural``, ``text`` (no flips), ``medical``
            (conservative, orientation kept), ``satellite`` (vertical flips and quarter
            turns), ``product`` (no hue change). It sets the flips, rotation, colour jitter,
            hue, noise and JPEG augmentation, and which flips test-time augmentation uses.
        epochs: Passes over the training split. Unset: the recipe's or domain's value (imgpipe.train.recipes).
        batch_size: Images per step per rank (the global batch is ``batch_size x ranks``).
        eval_batch_size: Images per batch per rank of the evaluations (validation, test;
            precise BN measures in the training's batches). 0: twice ``batch_size`` (timm's ``--validation-batch-size``
            is one such setting): a forward pass without gradients holds far less than a
            training step, and a CPU's takes a quarter less time per image at 128 than at 64
            (docs/training.md). Scores do not depend on it.
        lr: Peak AdamW learning rate, as given: no scaling. Unset: ``lr_base`` scaled to the
            global batch (:func:`imgpipe.train.schedule.effective_lr`).
        lr_base: Peak learning rate for a global batch of ``lr_base_size`` images; the run's is
            ``lr_base x sqrt(global batch / lr_base_size)`` (timm's rule for AdamW-type
            optimizers), logged and in ``metrics.json``.
        lr_base_size: The global batch ``lr_base`` is meant for (> 0).
        weight_decay: AdamW decoupled weight decay (not applied to norms and biases). Unset: the recipe's or domain's value (imgpipe.train.recipes).
        warmup_fraction: Linear warmup of the learning rate, as a fraction of all steps, in
            [0, 1). A backbone part that unfreezes later warms up over as many steps again.
        label_smoothing: Target smoothing, 0 to disable. Unset: the recipe's or domain's value (imgpipe.train.recipes).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
        aug_policy: ``randaugment``, ``trivialaugment``, ``autoaugment``, ``basic`` (no
            policy) or ``none`` (no augmentation). Unset: the recipe's or domain's value (imgpipe.train.recipes).
        aug_device: Where training augmentation runs: ``cpu`` (per sample in the
            loader workers), ``gpu`` (batched with kornia on the training device, also
            on CPU tensors) or ``auto``: ``gpu`` when training on CUDA with few CPU cores
            per rank, else ``cpu`` (by measurement: imgpipe.train.loader_config.augments_on_device).
        hflip: Random horizontal flips; off for text, digits and other mirror-sensitive data.
            Unset: the recipe's or domain's value (imgpipe.train.recipes).
        vflip: Random vertical flips (overhead, microscope images). Unset: the recipe's or domain's value (imgpipe.train.recipes).
        rot90: Random quarter turns (overhead, microscope images). Unset: the recipe's or domain's value (imgpipe.train.recipes).
        mixup: MixUp Beta alpha; 0 disables. Unset: the recipe's or domain's value (imgpipe.train.recipes).
        cutmix: CutMix Beta alpha; 0 disables. Unset: the recipe's or domain's value (imgpipe.train.recipes).
        mixup_prob: Probability that a batch is mixed at all (MixUp or CutMix), as timm's
            ``--mixup-prob``; the other batches train on their own images. Unset: the recipe's or domain's value (imgpipe.train.recipes).
        mixup_switch_prob: Probability of CutMix instead of MixUp for a mixed batch when
            both alphas are positive, as timm's ``--mixup-switch-prob``. Unset: the recipe's value.
        randaugment_n: RandAugment operations per image (1-4). Unset: the recipe's or domain's value (imgpipe.train.recipes).
        randaugment_m: RandAugment magnitude (0-30). Unset: the recipe's or domain's value (imgpipe.train.recipes).
        policy_exclude: Policy operations never applied (e.g. ``[Rotate, ShearX]``). Unset: the domain's.
        policy_max_m: No policy operation stronger than RandAugment's at this bin (0-30). Unset: the domain's.
        color_jitter: ColorJitter strength (brightness, contrast, saturation); 0 disables.
            Unset: the recipe's or domain's value (imgpipe.train.recipes).
        hue: ColorJitter's hue range (0-0.5); 0 where colour is the label. Unset: the recipe's or domain's value (imgpipe.train.recipes).
        noise_p: Probability of Gaussian noise. Unset: the recipe's or domain's value (imgpipe.train.recipes).
        jpeg_p: Probability of a JPEG re-encoding at quality 40-95. Unset: the recipe's or domain's value (imgpipe.train.recipes).
        grayscale_p: RandomGrayscale probability.
        blur_p: GaussianBlur probability.
        rotation: Maximum degrees of the small random affine; 0 disables. Unset: the recipe's or domain's value (imgpipe.train.recipes).
        random_erasing: RandomErasing probability.
        crop_scale: RandomResizedCrop area range. Unset: the recipe's value (imgpipe.train.recipes).
        amp: bf16 autocast of the training steps on CUDA, and on a CPU with native bf16
            (AVX512-BF16 or AMX; :func:`imgpipe.train.run.cpu_bf16`); evaluation on a CPU
            stays float32, the exported model's arithmetic.
        channels_last: Channels-last memory format: on CUDA throughout; on a CPU for the
            evaluations only, where it is faster (:meth:`imgpipe.train.run.TrainingRun.evaluation_layout`).
        grad_clip: Maximum gradient norm; 0 disables clipping.
        divergence_factor: The run has diverged when a loss is not finite, or when the
            loss (smoothed over twice ``divergence_steps`` steps) stays above this many times
            its lowest value so far for ``divergence_steps`` steps (:mod:`imgpipe.train.divergence`);
            0 leaves only the non-finite rule.
        divergence_steps: How many steps in a row the loss may stay above that limit.
        divergence_restarts: On divergence, restart from the last checkpoint (an epoch's end,
            or the start) with the learning rate halved, up to this many times; 0 stops at
            the first. A run that stops diverged commits its output marked ``diverged``
            (``metrics.json``, the report, the card), which promotion refuses.
        diverged_fails: A run that stopped diverged fails the step after committing its
            output (the message names the epoch, step and learning rate); off, it ends
            normally, marked (a sweep's branches: compare ranks it last).
        num_workers: Loader worker processes per rank; ``None`` derives it from the
            CPUs available to this rank.
        prefetch_factor: Batches each worker prepares ahead.
        pin_memory: Page-locked host batches; ``None`` means "when CUDA is available".
        persistent_workers: Keep training loader workers alive between epochs.
        loader_engine: The loader's workers: DataLoader worker ``processes``, ``threads``
            in the training process (the same batches either way; see :class:`LoaderConfig`),
            or ``auto``: :func:`imgpipe.train.loader_config.resolve_engine`'s choice, by measurement (docs/benchmarks.md,
            "The train step by loader engine and row cache", and "GPU": processes where the workers augment for CUDA).
        loader_cache_gb: Memory, in GiB, for keeping the training rows read in the first
            epoch, so that later epochs neither copy them out of Parquet nor download them
            again (``LoaderConfig.cache_bytes``; 0: none). Unset: :data:`imgpipe.train.loader_config.AUTO_CACHE_FRACTION`
            of the memory the pod may use (its cgroup limit), :func:`imgpipe.train.loader_config.default_cache_bytes`.
        shuffle_buffer: Rows each loader worker mixes at once.
        seed: Base of every random stream of the run.
        deterministic: ``torch.use_deterministic_algorithms`` and no cuDNN autotuning.
        compile: ``torch.compile`` the model (the inductor backend on CUDA; the first steps
            compile, the rest run faster). Off by default: compiling takes minutes on a CPU.
        checkpoint_every_steps: Also write ``checkpoint.pt`` every this many optimizer steps
            within an epoch (0: at epoch ends only); a resume continues from that step, with
            the rest of the epoch's samples in their order (a preempted pod loses at most N steps).
        checkpoint_every_s: At an epoch's end, write ``checkpoint.pt`` only when this many
            seconds have passed since the last one (0: after every epoch). The last epoch, and
            one that stops the run early, are always written. Where epochs take a second or two
            (small images on a CPU) writing the model, the optimizer and the kept weights costs
            as much as the validation; a preempted pod loses at most this much time plus an epoch.
        resume: Continue from ``out/checkpoint.pt`` when it exists.
        weights: Optional URI of initial weights (state dict, model.pt or
            checkpoint.pt) in object storage; never downloaded from a hub.
        pretrained: Name of a member of the model's torchvision weights enum
            (IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT, ...) to start from: downloaded once
            (torch.hub, hash-checked) into weights_cache and read from there by later
            runs and every rank; the classifier head is replaced for the data's classes,
            and images are normalized with the weights' mean and std. Not with weights.
        weights_cache: Object-storage prefix of the pretrained weights cache
            (<model>/<enum name>-<file name> below it); unset: weights/ beside the
            output prefix. The pipeline uses {data_root}/weights.
        freeze_fraction: Fraction of the epochs, in [0, 1), at the start during which only the
            classifier head trains (a linear probe: backbone frozen, its BatchNorm statistics
            fixed); then ``unfreeze_stages`` stages of as many epochs each unfreeze the backbone
            from its end (:func:`imgpipe.train.schedule.unfreeze_plan`). Only with pretrained
            weights. Unset: the recipe's value (imgpipe.train.recipes).
        unfreeze_stages: Stages after the probe (>= 1): 1 unfreezes everything at once; 2 the
            last block, then all; 3 the last block, the last two, then all. Unset: the recipe's.
        drop_path: Stochastic depth rate, for the torchvision models that take one
            (``stochastic_depth_prob``: ConvNeXt, EfficientNet, Swin, MaxViT); others ignore
            it. Left unset by the base settings: the model's own default. Unset: the recipe's or domain's value (imgpipe.train.recipes).
        backbone_lr_mult: The backbone's learning rate as a fraction of the head's; the
            schedule scales both. Unset: 0.1 with pretrained weights (``pretrained`` or
            ``weights``), 1.0 without.
        tta_flip: Also evaluate the test split averaging the predictions of the images and
            their flips, only those training used (horizontal with ``hflip``, vertical with
            ``vflip``): none for the ``text`` and ``medical`` domains.
        patience: Early stopping: end training after this many epochs without a better
            validation score (the ranking metric of :mod:`imgpipe.train.selection`), or at once
            when that score is at its ceiling (1.0), which no later epoch can beat; 0 trains
            every epoch. Either way the best epoch's weights are kept, not the last. Unset: the recipe's value.
        ema_decay: Keep an exponential moving average of the weights, as torchvision's
            references do (``--model-ema-decay``, e.g. 0.99998, adjusted for the batch,
            ranks, ``ema_steps`` and epochs); it is validated every epoch and kept when it
            scores better. 0 disables.
        ema_steps: Optimizer steps between EMA updates (``--model-ema-steps``).
        precise_bn: Before each validation, recompute the batch-norm statistics over this many
            train images in the evaluation view, unmixed (:mod:`imgpipe.train.norm_stats`);
            0 evaluates with the running averages of the training batches.
        class_weights: ``balanced`` weighs each class's loss by ``N / (classes x n_class)`` of
            the train split (scikit-learn's "balanced"; a sample's mean weight is 1), so rare
            classes count as much as common ones; ``none`` weighs every image alike.
        predictions_probs: Also store every class's probability per image in
            ``predictions.parquet`` (``probs``; images x classes floats): what a label audit needs.
        max_steps_per_epoch: Cap on steps per epoch (smoke tests, quick sweeps).
        image_size: Training/evaluation side; ``None`` uses the data's size.
        nodes: Machines to train on. 1 trains in the train task's own pod (on each of its
            GPUs); more runs the step as a Kubeflow Trainer TrainJob of that many nodes,
            each with the task's GPU count (:mod:`imgpipe.remote.trainjob`), up to the
            operator's cap (``$IMGPIPE_TRAIN_MAX_NODES``, default 4).
    """

    # The fields that name something to read: a pipeline task checks them against its
    # read policy (imgpipe.readpolicy) before the step starts.
    READS: ClassVar[tuple[str, ...]] = ("weights", "weights_cache")

    model: str = "resnet18"
    recipe: Recipe = "auto"
    domain: Domain = "natural"
    # None: unset, filled by imgpipe.train.recipes.resolve (here and below).
    epochs: int | None = None
    batch_size: int = 128
    eval_batch_size: int = 0
    lr: float | None = None
    lr_base: float = 1e-3
    lr_base_size: int = 128
    weight_decay: float | None = None
    warmup_fraction: float = 0.1
    label_smoothing: float | None = None
    device: str = "auto"
    # The augmentation fields stay flat (one `train:` section, typed CLI flags and pipeline
    # parameters); their base values are AugmentConfig's, and `augment` rebuilds it.
    aug_policy: Policy | None = None
    aug_device: Literal["auto", "cpu", "gpu"] = "auto"
    hflip: bool | None = None
    vflip: bool | None = None
    rot90: bool | None = None
    mixup: float | None = None
    cutmix: float | None = None
    mixup_prob: float | None = None
    mixup_switch_prob: float | None = None
    randaugment_n: int | None = None
    randaugment_m: int | None = None
    policy_exclude: tuple[str, ...] | None = None
    policy_max_m: int | None = None
    color_jitter: float | None = None
    hue: float | None = None
    noise_p: float | None = None
    jpeg_p: float | None = None
    grayscale_p: float = AugmentConfig.grayscale_p
    blur_p: float = AugmentConfig.blur_p
    rotation: float | None = None
    random_erasing: float = AugmentConfig.random_erasing
    crop_scale: tuple[float, float] | None = None
    amp: bool = True
    channels_last: bool = True
    grad_clip: float = 1.0
    divergence_factor: float = 1.5
    divergence_steps: int = 5
    divergence_restarts: int = 0
    diverged_fails: bool = True
    num_workers: int | None = None
    prefetch_factor: int = 2
    pin_memory: bool | None = None
    persistent_workers: bool = True
    loader_engine: str = "auto"
    loader_cache_gb: float | None = None
    shuffle_buffer: int = 1024
    seed: int = 0
    deterministic: bool = False
    compile: bool = False
    checkpoint_every_steps: int = 0
    checkpoint_every_s: float = 60.0
    resume: bool = False
    weights: str | None = None
    pretrained: str | None = None
    weights_cache: str | None = None
    freeze_fraction: float | None = None
    unfreeze_stages: int | None = None
    drop_path: float | None = None
    backbone_lr_mult: float | None = None
    tta_flip: bool = False
    patience: int | None = None
    ema_decay: float = 0.0
    ema_steps: int = 32
    # 256: on the digits (1,075 train images) as accurate as 512 and the whole split over three
    # seeds, at an eighth of the whole split's cost per epoch (docs/training.md, "Batch-norm statistics").
    precise_bn: int = 256
    class_weights: Literal["none", "balanced"] = "none"
    predictions_probs: bool = False
    max_steps_per_epoch: int | None = None
    image_size: int | None = None
    nodes: int = 1

    def __post_init__(self) -> None:
        # The model list is torchvision's: checked here, where a config is built to train, and
        # not at import, so the pipeline compiles without torch.
        from imgpipe.train.models import available_models

        check_numbers(self)
        models = available_models()
        if self.model not in models:
            raise ValueError(f"unknown model {self.model!r}{did_you_mean(str(self.model), models)}; choose one of: {', '.join(models)}")
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}; choose one of: {', '.join(RECIPES)}")
        if self.loader_engine not in TRAIN_LOADER_ENGINES:
            raise ValueError(f"loader_engine must be one of {', '.join(TRAIN_LOADER_ENGINES)}, got {self.loader_engine!r}")
        if self.domain not in DOMAIN_NAMES:
            raise ValueError(f"unknown domain {self.domain!r}; choose one of: {', '.join(DOMAIN_NAMES)}")
        v = self._filled()
        check_range("epochs", v.epochs, 1, 1_000_000, integer=True)
        check_range("batch_size", self.batch_size, 1, MAX_BATCH, integer=True)
        check_range("eval_batch_size", self.eval_batch_size, 0, MAX_BATCH, integer=True, note="0: twice batch_size")
        if self.loader_cache_gb is not None:
            check_range("loader_cache_gb", self.loader_cache_gb, 0, MAX_CACHE_GB, note="0 keeps nothing; unset: a quarter of the pod's memory")
        if self.lr is not None:
            check_range("lr", self.lr, 0, note="0 trains nothing")
        check_range("lr_base", self.lr_base, 0, low_open=True)
        check_range("weight_decay", v.weight_decay, 0)
        check_range("lr_base_size", self.lr_base_size, 1, integer=True, note="the global batch lr_base is meant for")
        check_range("warmup_fraction", self.warmup_fraction, 0, 1, high_open=True, note="a fraction of the run")
        check_range("freeze_fraction", v.freeze_fraction, 0, 1, high_open=True, note="a fraction of the run")
        check_range("unfreeze_stages", v.unfreeze_stages, 1, 8, integer=True)
        check_range("mixup", v.mixup, 0, note="a Beta alpha; 0 disables")
        check_range("cutmix", v.cutmix, 0, note="a Beta alpha; 0 disables")
        check_range("mixup_prob", v.mixup_prob, 0, 1, note="a probability")
        check_range("mixup_switch_prob", v.mixup_switch_prob, 0, 1, note="a probability")
        check_range("label_smoothing", v.label_smoothing, 0, 1, high_open=True)
        if v.drop_path is not None:
            check_range("drop_path", v.drop_path, 0, 1, high_open=True, note="a stochastic depth rate")
        check_range("grad_clip", self.grad_clip, 0, note="0 disables")
        check_range("divergence_factor", self.divergence_factor, 0, 1e6, note="0: only a non-finite loss is divergence")
        if 0 < self.divergence_factor <= 1:
            raise ValueError(f"divergence_factor must be above 1 (a multiple of the lowest loss) or 0, got {self.divergence_factor}")
        check_range("divergence_steps", self.divergence_steps, 1, 1_000_000, integer=True)
        check_range("divergence_restarts", self.divergence_restarts, 0, 10, integer=True, note="each halves the learning rate")
        check_range("checkpoint_every_steps", self.checkpoint_every_steps, 0, integer=True, note="0: at epoch ends only")
        check_range("checkpoint_every_s", self.checkpoint_every_s, 0, note="seconds; 0: after every epoch")
        check_range("patience", v.patience, 0, integer=True, note="0 trains every epoch")
        check_range("ema_decay", self.ema_decay, 0, 1, high_open=True, note="0 disables; torchvision uses 0.99998")
        if self.class_weights not in ("none", "balanced"):
            raise ValueError(f"class_weights must be none or balanced, got {self.class_weights!r}")
        check_range("ema_steps", self.ema_steps, 1, integer=True)
        check_range("precise_bn", self.precise_bn, 0, integer=True, note="train images; 0 keeps the running averages")
        if self.max_steps_per_epoch is not None:
            check_range("max_steps_per_epoch", self.max_steps_per_epoch, 1, integer=True, note="or unset")
        if self.image_size is not None:
            check_range("image_size", self.image_size, 8, 8192, integer=True, note="or unset: the data's size")
        check_range("nodes", self.nodes, 1, MAX_NODES, integer=True)
        if self.device != "auto" and not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.weights is not None:
            storage.normalize_uri(self.weights)  # raises ValueError for unsupported URIs
        self._check_transfer(v)
        v.augment  # noqa: B018 - building it validates the augmentation fields
        self.loader(shuffle=True)  # noqa: B018 - validates the loader fields

    @property
    def resolved(self) -> bool:
        """Whether every recipe and domain field is set (:func:`imgpipe.train.recipes.resolve` has run)."""
        return all(getattr(self, f) is not None for f in (*RECIPE_FIELDS, *DOMAIN_FIELDS) if f not in MAY_STAY_UNSET)

    def _filled(self) -> TrainConfig:
        """This config with unset fields at :data:`imgpipe.train.recipes.BASE`, for validation only."""
        if self.resolved:
            return self
        unset = {f: BASE[f] for f in (*RECIPE_FIELDS, *DOMAIN_FIELDS) if getattr(self, f) is None and f not in MAY_STAY_UNSET}
        return dataclasses.replace(self, **unset)

    def _check_transfer(self, v: TrainConfig) -> None:
        """The pretrained-weights and fine-tuning fields (``v``: with unset fields filled)."""
        if self.pretrained is not None:
            if self.weights is not None:
                raise ValueError("set pretrained (torchvision weights) or weights (a URI), not both")
            from imgpipe.train.models import resolve_weights

            resolve_weights(self.model, self.pretrained)  # raises for names the model does not have
        if self.weights_cache is not None:
            storage.normalize_uri(self.weights_cache)
        if self.backbone_lr_mult is not None and not 0 < self.backbone_lr_mult < float("inf"):
            raise ValueError(f"backbone_lr_mult must be > 0, got {self.backbone_lr_mult}; freeze_fraction freezes the backbone")

    @property
    def augment(self) -> AugmentConfig:
        """The augmentation recipe these settings describe.

        Raises:
            ValueError: If the config is not resolved (:attr:`resolved`): an unset field has
                no value until the recipe and domain fill it.
        """
        if not self.resolved:
            raise ValueError("the augmentation of an unresolved TrainConfig is not known yet: resolve it first (imgpipe.train.recipes.resolve)")
        return AugmentConfig(
            policy=self.aug_policy,  # type: ignore[arg-type]
            hflip=self.hflip,  # type: ignore[arg-type]
            vflip=self.vflip,  # type: ignore[arg-type]
            rot90=self.rot90,  # type: ignore[arg-type]
            randaugment_n=self.randaugment_n,  # type: ignore[arg-type]
            randaugment_m=self.randaugment_m,  # type: ignore[arg-type]
            policy_exclude=tuple(self.policy_exclude),  # type: ignore[arg-type]
            policy_max_m=self.policy_max_m,  # type: ignore[arg-type]
            color_jitter=self.color_jitter,  # type: ignore[arg-type]
            hue=self.hue,  # type: ignore[arg-type]
            noise_p=self.noise_p,  # type: ignore[arg-type]
            jpeg_p=self.jpeg_p,  # type: ignore[arg-type]
            grayscale_p=self.grayscale_p,
            blur_p=self.blur_p,
            rotation=self.rotation,
            random_erasing=self.random_erasing,
            crop_scale=tuple(self.crop_scale),  # type: ignore[arg-type]
        )

    @property
    def evaluation_batch(self) -> int:
        """The evaluations' batch per rank: ``eval_batch_size``, or twice ``batch_size`` when it is 0."""
        return self.eval_batch_size or min(2 * self.batch_size, MAX_BATCH)

    def loader(self, *, shuffle: bool, persistent: bool | None = None, feeds_gpu_per_sample: bool = False) -> LoaderConfig:
        """Loader settings: training (``shuffle``, ``batch_size``) or evaluation (its order, :attr:`evaluation_batch`).

        ``feeds_gpu_per_sample``: ``resolve_engine``'s.
        """
        return LoaderConfig(
            batch_size=self.batch_size if shuffle else self.evaluation_batch,
            shuffle=shuffle,
            shuffle_buffer=self.shuffle_buffer,
            drop_last=shuffle,
            seed=self.seed,
            num_workers=self.num_workers,
            prefetch_factor=self.prefetch_factor,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers if persistent is None else persistent,
            engine=resolve_engine(self.loader_engine, feeds_gpu_per_sample=feeds_gpu_per_sample),
            cache_bytes=(default_cache_bytes() if self.loader_cache_gb is None else int(self.loader_cache_gb * 2**30)) if shuffle else 0,
        )
