"""The crop classifier: any timm model, cross-entropy, and per-split metrics that also feed the label tables.

The checkpoint's ``hyper_parameters`` hold only plain values (``class_names``, ``model_name``, ``data_config``,
``crop_rule``, ...), so it loads with ``weights_only=True``. Every checkpoint also holds the model part that
deployment reads (:mod:`animl_lightning.core.model_file`), written by :meth:`CropClassifier.on_save_checkpoint`.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning import LightningModule
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.types import OptimizerLRScheduler
from timm.data.config import resolve_model_data_config
from timm.data.mixup import Mixup
from timm.loss.cross_entropy import SoftTargetCrossEntropy
from timm.utils.model_ema import ModelEmaV3
from torch import Tensor, nn
from torch.nn import functional
from typing_extensions import override

from animl_lightning.core.contract import SPLIT_NAMES
from animl_lightning.core.crop_rule import CropRule
from animl_lightning.core.errors import AnimlError, ConfigError, require
from animl_lightning.core.label_index import LabelIndex
from animl_lightning.core.model_file import (
    TTA_MODES,
    WEIGHTS_PREFIX,
    CheckpointError,
    DeployableModel,
    create_network,
    provenance,
    temperature_of,
    with_tta,
)
from animl_lightning.train.checkpointing import (
    RNG_STATES_KEY,
    RNG_STATES_PER_RANK_KEY,
    CheckpointContents,
    capture_rng_states,
    read_checkpoint,
    restore_rng_states,
    rng_states_to_restore,
)
from animl_lightning.train.datamodule import resolve_input_size
from animl_lightning.train.pretrained import PretrainedWeightsError, load_pretrained_file
from animl_lightning.train.recipe_settings import check_recipe_settings, log_label_prior
from animl_lightning.train.scores import macro_scores
from animl_lightning.train.split_metrics import SplitMetrics, metrics_key

log = logging.getLogger(__name__)

# The training weights of a run with an EMA; ``state_dict`` holds the averaged weights, which are the ones deployed.
LIVE_WEIGHTS_KEY = "animl_live_weights"

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]
Batch = tuple[Tensor, Tensor, Tensor]


class CropClassifier(LightningModule):
    """A timm classifier over crops, with per-split metrics and checkpointed preprocessing.

    Logged (per epoch, ``<split>`` in train/val/test): ``<split>/loss``, ``<split>/top1``, ``<split>/top3`` (3 or
    more labels), ``<split>/balanced_accuracy`` (mean recall over labels present in the split, from the
    confusion matrix, equal to the mean ``recall`` of the per-label table), ``<split>/precision_macro`` and
    ``<split>/recall_macro`` (torchmetrics macro averages). Train metrics come from augmented batches; train.py
    evaluates the train crops in eval mode separately.

    Set :attr:`test_split` to make the test loop evaluate (and log as) another split, e.g. the train crops with
    the eval transform.
    """

    # Set with object.__setattr__ (see __init__): the average is no child module, so its weights never enter the
    # state dict as extra keys.
    _ema: ModelEmaV3 | None

    def __init__(
        self,
        model_name: str,
        class_names: Sequence[str],
        pretrained: bool = False,
        pretrained_file: str | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        drop_rate: float = 0.0,
        label_smoothing: float = 0.0,
        finetune_epochs: int = 0,
        channels_last: bool = True,
        compile: bool = False,
        data_config: Mapping[str, Any] | None = None,
        crop_rule: CropRule | Mapping[str, Any] | None = None,
        drop_path_rate: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        ema_decay: float = 0.0,
        backbone_lr_scale: float = 1.0,
        logit_adjustment: float = 0.0,
        tta: str = "none",
        model_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        """Build the timm model and the metrics.

        Args:
            model_name: any ``timm.create_model`` name, e.g. ``efficientnet_b3``.
            class_names: label names in index order (``label_index.json``); sizes the head.
            pretrained: load timm's ImageNet weights (hub download) before replacing the head.
            pretrained_file: load weights from this local file instead (``.safetensors``, or a torch state dict /
                Lightning checkpoint read with ``weights_only=True``); head weights of another shape are dropped.
            optimizer: ``params -> Optimizer`` (a Hydra ``_partial_``); required for fitting only.
            scheduler: ``optimizer -> LRScheduler`` stepped once per epoch, or None.
            drop_rate: dropout before the classifier head.
            label_smoothing: cross-entropy label smoothing for the training loss.
            finetune_epochs: train only the head for this many epochs first (frozen parts keep BN in eval mode).
            channels_last: use channels-last memory format on CUDA.
            compile: ``torch.compile`` the network when fitting.
            data_config: preprocessing (timm data config keys); None = the model's own default config.
            crop_rule: how ``prepare.py`` cut the crops (``prepare_info.json`` ``crops``), as a
                :class:`~animl_lightning.core.crop_rule.CropRule` or its dict; None = the default rule.
            drop_path_rate: stochastic depth rate of the network (timm's ``drop_path_rate``).
            mixup_alpha: mixup's Beta parameter (0 = off); with ``cutmix_alpha`` through timm's ``Mixup`` and its
                soft-target cross-entropy.
            cutmix_alpha: CutMix's Beta parameter (0 = off).
            mixup_prob: probability that a batch is mixed at all (when mixup or CutMix is on).
            mixup_switch_prob: with both on, probability of CutMix instead of mixup for a batch.
            ema_decay: decay of an exponential moving average of the weights (timm's ``ModelEmaV3`` with warmup;
                0 = off). The averaged weights are validated, kept as checkpoints and deployed.
            backbone_lr_scale: learning rate of everything but the classifier head, relative to the optimizer's.
            logit_adjustment: tau of the logit-adjusted loss (Menon et al. 2021): the training logits get
                ``tau * log(label prior of the train split)`` added, so rare labels are not crowded out (0 = off).
            tta: test-time augmentation of every prediction (``none`` or ``hflip``: mean logits of the crop and its
                mirror image), in the tables, calibration, classify and the exported graphs alike.
            model_kwargs: further ``timm.create_model`` arguments (e.g. ``img_size`` of a ViT).
        """
        # Normalise before save_hyperparameters (which reads these locals) so the checkpoint holds only plain
        # Python values, whatever container Hydra passed in.
        class_names = [str(name) for name in class_names]
        model_name = str(model_name)
        pretrained_file = None if pretrained_file in (None, "") else str(pretrained_file)
        data_config = dict(data_config) if data_config is not None else None
        model_kwargs = {str(k): v for k, v in (model_kwargs or {}).items()}
        if crop_rule is None:
            rule = CropRule()
        else:
            rule = crop_rule if isinstance(crop_rule, CropRule) else CropRule.from_dict(crop_rule, "crop_rule")
        # The hyper-parameter is the rule's dict: a CropRule object would make the checkpoint need pickle to load.
        crop_rule = rule.to_dict()
        require(bool(model_name), "model.model_name", "must name a timm model")
        require(len(class_names) >= 2, "class_names", f"needs at least 2 labels, got {class_names}")
        require(len(set(class_names)) == len(class_names), "class_names", f"has duplicates: {class_names}")
        require(0.0 <= drop_rate < 1.0, "model.drop_rate", f"must be in [0, 1), got {drop_rate}")
        require(0.0 <= label_smoothing < 1.0, "model.label_smoothing", f"must be in [0, 1), got {label_smoothing}")
        require(finetune_epochs >= 0, "model.finetune_epochs", f"must be >= 0, got {finetune_epochs}")
        check_recipe_settings(
            drop_path_rate=drop_path_rate,
            mixup_alpha=mixup_alpha,
            cutmix_alpha=cutmix_alpha,
            mixup_prob=mixup_prob,
            mixup_switch_prob=mixup_switch_prob,
            ema_decay=ema_decay,
            backbone_lr_scale=backbone_lr_scale,
            logit_adjustment=logit_adjustment,
            tta=tta,
        )
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.class_names: list[str] = class_names
        self.crop_rule: CropRule = rule
        self.test_split: str = "test"
        # Set from the checkpoint's calibration record (calibrate=true); 1.0 means uncalibrated softmax.
        self.temperature: float = 1.0
        self._resume_rng: dict[str, Any] | None = None
        # Held outside the module tree: their tensors must not become keys of the state dict that deployment loads.
        object.__setattr__(self, "_ema", None)
        self._ema_from_checkpoint: dict[str, Tensor] | None = None
        self._log_prior: Tensor | None = None
        self._mixup: Mixup | None = None
        if mixup_alpha > 0 or cutmix_alpha > 0:
            self._mixup = Mixup(
                mixup_alpha=mixup_alpha,
                cutmix_alpha=cutmix_alpha,
                prob=mixup_prob,
                switch_prob=mixup_switch_prob,
                label_smoothing=label_smoothing,
                num_classes=len(class_names),
            )

        use_hub = pretrained and pretrained_file is None
        if pretrained and pretrained_file is not None:
            log.info("model.pretrained_file is set; using %s instead of timm's hub weights", pretrained_file)
        try:
            self.model = create_network(
                model_name,
                len(class_names),
                model_kwargs,
                pretrained=use_hub,
                drop_rate=drop_rate,
                drop_path_rate=drop_path_rate,
            )
        except OSError as err:  # hub download: offline, no cache, HTTP errors (huggingface_hub raises OSErrors)
            raise PretrainedWeightsError(
                f"model.pretrained=true: cannot download timm's weights for {model_name!r} ({err}); "
                "connect to the internet once (weights are cached), or set model.pretrained_file=PATH to a local "
                "weights file, or model.pretrained=false"
            ) from err
        if pretrained_file is not None:
            load_pretrained_file(self.model, pretrained_file)

        if data_config is None:
            data_config = resolve_model_data_config(self.model)
            built = built_input_size(self.model)
            if built is not None:
                # timm keeps the pretraining size in the resolved config when model_kwargs.img_size builds the network
                # for another one (a DINOv2 ViT says 518 px when built for 224), so the network's own size wins.
                data_config = {**data_config, "input_size": (int(data_config["input_size"][0]), *built[0])}
        self.data_config = data_config

        self.metrics = nn.ModuleDict({metrics_key(s): SplitMetrics(len(class_names), s) for s in SPLIT_NAMES})

    @property
    def data_config(self) -> dict[str, Any]:
        """Preprocessing config stored in the checkpoint (``input_size``, ``mean``, ``std``, ``interpolation``, ...)."""
        return dict(self.hparams["data_config"])

    @data_config.setter
    def data_config(self, value: Mapping[str, Any]) -> None:
        config = resolve_input_size(value, None)
        built = built_input_size(self.model)
        height, width = config["input_size"][1:]
        if built is not None and built[1] and (height, width) != built[0]:
            # Caught here, before fitting, rather than as timm's assertion in the first forward pass.
            raise ConfigError(
                f"data.image_size: {height}x{width} px, but {self.hparams['model_name']} takes only "
                f"{built[0][0]}x{built[0][1]} px (its position embeddings are sized for it); set "
                f"model.model_kwargs.img_size={height} together with data.image_size, or leave data.image_size null"
            )
        self.hparams["data_config"] = config

    @classmethod
    def from_checkpoint(cls, path: str | Path | CheckpointContents) -> CropClassifier:
        """A trained classifier in eval mode on the CPU, from :func:`read_checkpoint` (``weights_only=True``).

        Never downloads or reads other weights (``pretrained`` and ``pretrained_file`` are switched off).

        Raises:
            CheckpointError: the file is unusable, or its weights do not fit the architecture it names.
        """
        contents = path if isinstance(path, CheckpointContents) else read_checkpoint(path)
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
        kwargs = {k: v for k, v in contents.hparams.items() if k in accepted}
        # From the model part: checkpoints written before the crop rule was one hyper-parameter have loose keys.
        kwargs.update(pretrained=False, pretrained_file=None, compile=False, crop_rule=contents.crop_rule)
        try:
            model = cls(**kwargs)
            model.load_state_dict(contents.state_dict)
        except (RuntimeError, TypeError, AnimlError) as err:
            raise CheckpointError(
                f"checkpoint {contents.path}: its weights do not fit {contents.model_name} with "
                f"{len(contents.class_names)} labels: {str(err).splitlines()[0]}"
            ) from err
        model.temperature = contents.temperature
        model.eval()
        return model

    @override
    def forward(self, images: Tensor) -> Tensor:
        """Logits of a batch of preprocessed crops, as evaluated and deployed (with the run's ``tta``).

        While fitting with an EMA, validation sees the averaged weights: they are the ones checkpointed.
        """
        if self.hparams["channels_last"] and images.is_cuda:
            images = images.contiguous(memory_format=torch.channels_last)
        network: nn.Module = self._ema.module if self._ema is not None else self.model
        logits: Tensor = with_tta(network, self.tta)(images)
        return logits

    @property
    def tta(self) -> str:
        """The test-time augmentation of every prediction (:data:`TTA_MODES`)."""
        return str(self.hparams.get("tta", "none"))

    @tta.setter
    def tta(self, mode: str) -> None:
        require(mode in TTA_MODES, "eval.tta", f"must be one of {list(TTA_MODES)}, got {mode!r}")
        self.hparams["tta"] = mode

    def inference_network(self) -> nn.Module:
        """The network that deployment runs and exports: the timm model with the checkpoint's ``tta`` built in."""
        return with_tta(self.model, self.tta)

    def deployable_model(self, weights: Mapping[str, Tensor]) -> DeployableModel:
        """The model part of this classifier's checkpoints, with ``weights`` as the network's (the deployed ones)."""
        data_dir = self.hparams.get("data_dir")
        return DeployableModel(
            model_name=str(self.hparams["model_name"]),
            labels=LabelIndex.of(self.class_names),
            crop_rule=self.crop_rule,
            preprocessing=self.data_config,
            weights=weights,
            tta=self.tta,
            model_kwargs=dict(self.hparams.get("model_kwargs") or {}),
            provenance=provenance(str(data_dir) if data_dir else None),
        )

    @override
    def setup(self, stage: str) -> None:
        # Lets Lightning's model summary count the FLOPs of one crop (it prints 0 without an example input).
        self.example_input_array = torch.zeros(1, *self.data_config["input_size"])
        # setup runs before the move to the device; the memory format survives the later ``.to(device)``.
        if self.hparams["channels_last"] and self.trainer.strategy.root_device.type == "cuda":
            self.model.to(memory_format=torch.channels_last)
        if stage == "fit" and self.hparams["compile"]:
            # Module.compile keeps parameter names (no "_orig_mod." prefix), so checkpoints stay loadable.
            self.model.compile()
        if stage == "fit" and self.hparams.get("logit_adjustment", 0.0) > 0:
            self._log_prior = log_label_prior(self._train_label_counts())

    def _train_label_counts(self) -> np.ndarray:
        datamodule = getattr(self.trainer, "datamodule", None)
        counts = getattr(datamodule, "train_label_counts", None)
        if counts is None:
            raise ConfigError("model.logit_adjustment: needs the label counts of a CropDataModule's train split")
        result: np.ndarray = counts()
        return result

    @override
    def on_fit_start(self) -> None:
        decay = float(self.hparams.get("ema_decay", 0.0))
        if decay <= 0:
            return
        # Warmup lets the average follow the weights closely over the first steps of a short fine-tuning run.
        ema = ModelEmaV3(self.model, decay=decay, use_warmup=True)
        if self._ema_from_checkpoint is not None:
            ema.module.load_state_dict(self._ema_from_checkpoint)
            self._ema_from_checkpoint = None
        object.__setattr__(self, "_ema", ema)

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._ema is not None:
            self._ema.update(self.model, step=self.global_step)

    @override
    def on_fit_end(self) -> None:
        if self._ema is not None:
            # Whatever is evaluated next without a checkpoint (no best.ckpt was kept) sees the averaged weights too.
            self.model.load_state_dict(self._ema.module.state_dict())
            object.__setattr__(self, "_ema", None)

    @override
    def on_train_epoch_start(self) -> None:
        if self._resume_rng is not None:
            # Restored here, not at load time: the sanity check between loading and this point draws random numbers
            # (DataLoader seeds) that the uninterrupted run never drew.
            restore_rng_states(self._resume_rng)
            self._resume_rng = None
            # On resume Lightning made this epoch's loader iterator before the sanity check; an uninterrupted run
            # makes it after this hook. Making it again here draws the loader seed and the sampler's indices from the
            # restored generators, exactly as the uninterrupted run did.
            fetcher = getattr(self.trainer.fit_loop, "_data_fetcher", None)
            if fetcher is not None:
                iter(fetcher)
        self._split_metrics("train").reset()
        self._apply_finetune_mode()

    @override
    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        loss, _ = self._shared_step(batch, "train", fitting=True)
        self.log("train/batch_loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True)
        return loss

    @override
    def on_train_epoch_end(self) -> None:
        self._log_epoch_metrics("train")

    @override
    def on_validation_epoch_start(self) -> None:
        self._split_metrics("val").reset()

    @override
    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._shared_step(batch, "val")

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val")

    @override
    def on_test_epoch_start(self) -> None:
        require(
            self.test_split in SPLIT_NAMES, "test_split", f"must be one of {list(SPLIT_NAMES)}, got {self.test_split!r}"
        )
        self._split_metrics(self.test_split).reset()

    @override
    def test_step(self, batch: Batch, batch_idx: int) -> dict[str, Tensor]:
        _, logits = self._shared_step(batch, self.test_split)
        probs = (logits.detach().float() / self.temperature).softmax(dim=-1)
        return {"probs": probs, "target": batch[1], "index": batch[2]}

    @override
    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics(self.test_split)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._ema is not None:
            # The averaged weights are the model (evaluated, calibrated, deployed); the live ones only resume a fit.
            state = checkpoint["state_dict"]
            averaged = self._ema.module.state_dict()
            checkpoint[LIVE_WEIGHTS_KEY] = {k: v for k, v in state.items() if k.startswith("model.")}
            for key, value in averaged.items():
                state[f"model.{key}"] = value.detach().clone()
        # The model part deployment reads (the weights are state_dict's, already under the "model." prefix).
        state = checkpoint["state_dict"]
        weights = {k[len(WEIGHTS_PREFIX) :]: v for k, v in state.items() if k.startswith(WEIGHTS_PREFIX)}
        self.deployable_model(weights).write_into(checkpoint)
        # A resumed run draws the same batches, augmentations and dropout masks as an uninterrupted one.
        states = capture_rng_states()
        checkpoint[RNG_STATES_KEY] = states
        if self._trainer is not None and self.trainer.world_size > 1 and torch.distributed.is_initialized():
            # Every DDP rank has its own generators but only rank 0 writes the file, so it must hold all of them.
            # Lightning's Trainer.save_checkpoint builds the dict (and calls this hook) on every rank before its own
            # barrier, so this collective is met by all ranks whenever the save itself can complete.
            per_rank: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(per_rank, states)
            checkpoint[RNG_STATES_PER_RANK_KEY] = per_rank

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.temperature = temperature_of(checkpoint)
        # Only a resumed fit draws from the generators again; evaluation and inference loads leave them alone.
        if self._trainer is None or self.trainer.state.fn != TrainerFn.FITTING:
            return
        live = checkpoint.get(LIVE_WEIGHTS_KEY)
        if isinstance(live, Mapping):
            # Resuming: the network continues from its training weights, the EMA from the averaged ones.
            state = checkpoint["state_dict"]
            self._ema_from_checkpoint = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
            state.update(live)
        states, inexact = rng_states_to_restore(checkpoint, self.trainer.global_rank, self.trainer.world_size)
        if inexact is not None and self.trainer.is_global_zero:
            log.warning("resume is not bit-exact: %s", inexact)
        self._resume_rng = dict(states) if states is not None else None

    @override
    def predict_step(self, batch: Tensor | Sequence[Tensor], batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Class probabilities of a batch (a tensor, or a tuple whose first item is the images)."""
        images = batch if isinstance(batch, Tensor) else batch[0]
        probs: Tensor = (self(images).float() / self.temperature).softmax(dim=-1)
        return probs

    @override
    def configure_optimizers(self) -> OptimizerLRScheduler:
        if self.optimizer_factory is None:
            raise ConfigError("optimizer: must be set to train (a config of configs/optimizer/)")
        scale = float(self.hparams.get("backbone_lr_scale", 1.0))
        if scale == 1.0:
            optimizer = self.optimizer_factory(self.parameters())
        else:
            head = {id(p) for p in self.model.get_classifier().parameters()}  # type: ignore[operator]
            groups = [
                {"params": [p for p in self.parameters() if id(p) not in head]},
                {"params": [p for p in self.parameters() if id(p) in head]},
            ]
            optimizer = self.optimizer_factory(groups)  # type: ignore[arg-type]  # torch takes param groups
            # Before the scheduler exists, so that it takes the scaled rate as the backbone's base rate.
            optimizer.param_groups[0]["lr"] *= scale
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def confusion_matrix(self, split: str) -> np.ndarray:
        """The (DDP-gathered) confusion matrix of ``split`` for the current epoch; rows = true labels.

        Under DDP every rank must call this (torchmetrics syncs state on compute).
        """
        confusion = self._split_metrics(split).confusion
        if confusion.update_count == 0 and not torch.distributed.is_initialized():
            return np.zeros((len(self.class_names),) * 2, dtype=np.int64)
        return confusion.compute().detach().cpu().numpy().astype(np.int64)

    def _split_metrics(self, split: str) -> SplitMetrics:
        metrics = self.metrics[metrics_key(split)]
        assert isinstance(metrics, SplitMetrics)
        return metrics

    def _shared_step(self, batch: Batch, split: str, fitting: bool = False) -> tuple[Tensor, Tensor]:
        images, target = batch[0], batch[1]
        if fitting:
            logits, loss = self._training_loss(images, target)
        else:
            logits = self(images)
            loss = functional.cross_entropy(logits, target)
        metrics = self._split_metrics(split)
        probs = logits.detach().float().softmax(dim=-1)
        batch_size = int(target.shape[0])
        metrics.scalars.update(probs, target)
        metrics.loss.update(loss.detach(), weight=batch_size)
        metrics.confusion.update(probs, target)
        return loss, logits

    def _training_loss(self, images: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """Logits of the (possibly mixed) batch and the training loss of the recipe."""
        if self.hparams["channels_last"] and images.is_cuda:
            images = images.contiguous(memory_format=torch.channels_last)
        # timm's batch mixing pairs each crop with its mirror position in the batch, so it needs an even batch.
        mixing = self._mixup is not None and images.shape[0] % 2 == 0
        soft: Tensor | None = None
        if mixing:
            assert self._mixup is not None
            images, soft = self._mixup(images, target)
        logits: Tensor = self.model(images)
        adjusted = logits
        if self._log_prior is not None:
            tau = float(self.hparams["logit_adjustment"])
            adjusted = logits + tau * self._log_prior.to(device=logits.device, dtype=logits.dtype)
        if soft is not None:
            # The soft targets already hold the label smoothing (timm's Mixup applies it).
            loss: Tensor = SoftTargetCrossEntropy()(adjusted, soft)
        else:
            loss = functional.cross_entropy(adjusted, target, label_smoothing=self.hparams["label_smoothing"])
        return logits, loss

    def _log_epoch_metrics(self, split: str) -> None:
        """Compute and log the split's epoch metrics, on every rank, in one fixed order.

        Metric objects are computed here and logged as plain values, never handed to ``self.log``: Lightning would
        compute a logged Metric (a collective under DDP) wherever its value is first read, and the progress bar reads
        them on rank 0 only, so the ranks' collectives would pair up wrongly and abort the run.
        """
        metrics = self._split_metrics(split)
        confusion = self.confusion_matrix(split)
        if confusion.sum() == 0:
            return
        values = {name: float(value) for name, value in metrics.scalars.compute().items()}
        values[f"{split}/loss"] = float(metrics.loss.compute())
        values[f"{split}/balanced_accuracy"] = macro_scores(confusion)["balanced_accuracy"]
        for name, value in values.items():
            # Every rank holds the same gathered value, so the mean over ranks is that value.
            self.log(name, value, prog_bar=name in {"val/loss", "val/balanced_accuracy"}, sync_dist=True)

    def logged_metric_names(self) -> set[str]:
        """Every metric name this classifier logs (what ``monitor`` may name)."""
        names = {"loss", "top1", "balanced_accuracy", "precision_macro", "recall_macro"}
        if len(self.class_names) >= 3:
            names.add("top3")
        return {f"{split}/{name}" for split in SPLIT_NAMES for name in names} | {"train/batch_loss"}

    def _apply_finetune_mode(self) -> None:
        finetune_epochs: int = self.hparams["finetune_epochs"]
        if finetune_epochs == 0:
            return
        head: nn.Module = self.model.get_classifier()  # type: ignore[operator]
        head_params = {id(p) for p in head.parameters()}
        frozen = self.current_epoch < finetune_epochs
        for param in self.model.parameters():
            param.requires_grad_(not frozen or id(param) in head_params)
        if frozen:
            self.model.eval()
            head.train()
        else:
            self.model.train()
        if self.current_epoch in (0, finetune_epochs):
            log.info("epoch %d: training %s", self.current_epoch, "the head only" if frozen else "all layers")


def built_input_size(network: nn.Module) -> tuple[tuple[int, int], bool] | None:
    """The (height, width) a timm network with a patch embedding was built for, and whether it takes only that size.

    ViT-like networks size their position embeddings for ``img_size`` and refuse any other input unless created with
    ``dynamic_img_size=True``; convolutional networks (None here) take any size.
    """
    patch_embed = getattr(network, "patch_embed", None)
    size = getattr(patch_embed, "img_size", None)
    if size is None:
        return None
    return (int(size[0]), int(size[1])), bool(getattr(patch_embed, "strict_img_size", False))
