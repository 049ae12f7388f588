"""The network: a torchvision or timm backbone (balatro_train/backbones.py) behind an input layer, one head per
task (linear, or an embedding head: balatro_train/embedding.py); how it is built from a config or a checkpoint;
the freeze strategies and the optimizer's parameter groups."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable

import torch
from hydra.utils import get_class
from torch import nn

from balatro_train.backbones import build_backbone
from balatro_train.embedding import CosineClassifier
from balatro_train.errors import UnknownCallable, UserError

log = logging.getLogger(__name__)


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ImageInput(nn.Module):
    """The model's first layer: uint8 images as they are stored and loaded, (N, H, W, 3) RGB, to the
    normalised float (N, 3, H, W) batch in channels_last memory, on whatever device the model is.

    Doing this in the model keeps batches 4x smaller through collation, pinning and the copy to the
    device, and means no caller (Recognizer, an exported ONNX or TorchScript model) can forget to
    normalise. The permute of an NHWC tensor already is NCHW in channels_last memory.
    """

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(std).view(1, 3, 1, 1)), persistent=False)
        self.register_buffer("shift", (torch.tensor(mean) / torch.tensor(std)).view(1, 3, 1, 1), persistent=False)
        self.memory_format = torch.channels_last

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images.permute(0, 3, 1, 2).float() * self.scale - self.shift).contiguous(
            memory_format=self.memory_format
        )


LINEAR_HEAD = {"_target_": "torch.nn.Linear", "_partial_": True}  # conf/heads/standard.yaml's, always there
HeadFactory = Callable[[int, int], nn.Module]  # (features, classes) -> head, e.g. a partial of nn.Linear
MODEL_TARGET = "balatro_train.model.CardNet"
# The heads a config may name (conf/heads/standard.yaml): a model is built from its config as data, through
# these constructors only, so that a checkpoint's saved config can never name something else to call.
HEAD_CLASSES: dict[str, type[nn.Module]] = {
    "torch.nn.Linear": nn.Linear,
    "balatro_train.embedding.CosineClassifier": CosineClassifier,
}


class CardNet(nn.Module):
    """uint8 (N, H, W, 3) images -> input layer -> shared backbone -> one head per task; forward returns
    {task: logits}. `heads` builds a task's head from (features, classes); by default an `nn.Linear`."""

    def __init__(
        self,
        backbone: str,
        num_classes: dict[str, int],
        pretrained: bool = True,
        weights: str | None = None,
        mean: list[float] = IMAGENET_MEAN,
        std: list[float] = IMAGENET_STD,
        heads: dict[str, HeadFactory] | None = None,
    ):
        super().__init__()
        self.backbone_name = backbone
        self.input = ImageInput(mean, std)
        built = build_backbone(backbone, pretrained, weights)
        self.backbone, self.pretrained_source = built.module, built.source
        self.pretrained_loaded = built.source is not None
        features = built.features
        heads = heads or {}
        self.heads = nn.ModuleDict({task: heads.get(task, nn.Linear)(features, n) for task, n in num_classes.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        images = self.input(images)
        # A fully frozen backbone needs no autograd graph: it is then only a feature extractor.
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.backbone_trains()):
            features = self.backbone(images)
        return {task: head(features) for task, head in self.heads.items()}

    def use_channels_last(self, channels_last: bool = True) -> CardNet:
        """NHWC memory for the weights and the input (trainer.channels_last): the faster layout for
        oneDNN on CPUs and for tensor cores; built models use it unless told otherwise."""
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.input.memory_format = memory_format
        return self.to(memory_format=memory_format)

    def backbone_trains(self) -> bool:
        return any(p.requires_grad for p in self.backbone.parameters())


def build_model(
    model_cfg,
    class_names: dict[str, list[str]],
    state_dict: dict | None = None,
    heads: dict[str, HeadFactory] | None = None,
) -> nn.Module:
    """The model a `model` config describes, with one head per task of `class_names` (built by `heads`,
    see `head_factories`); with `state_dict` (a checkpoint's), those weights, and then the config's
    initial weights (model.pretrained, model.weights) are neither downloaded nor read. Training,
    resume, init_from, inference and export all build it here, from the config as data (`model_options`):
    a saved config is never instantiated."""
    initial = {} if state_dict is None else {"pretrained": False, "weights": None}
    model = CardNet(
        **{**model_options(model_cfg), **initial},
        num_classes={task: len(names) for task, names in class_names.items()},
        heads=heads or {},
    )
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model.use_channels_last()


def model_options(model_cfg) -> dict:
    """CardNet's arguments from a `model` config (conf/model/*.yaml): its `_target_` must be CardNet and
    every other key one of CardNet's data arguments (backbone, pretrained, weights, mean, std)."""
    model_cfg = dict(model_cfg)
    target = model_cfg.pop("_target_", MODEL_TARGET)
    if target != MODEL_TARGET:
        raise UnknownCallable("model", target, [MODEL_TARGET])
    accepted = set(inspect.signature(CardNet).parameters) - {"num_classes", "heads"}
    unknown = sorted(set(model_cfg) - accepted)
    if unknown:
        raise UserError(
            f"model.{unknown[0]} is not an option of the model (its options: {', '.join(sorted(accepted))})"
        )
    return {key: list(value) if key in ("mean", "std") else value for key, value in model_cfg.items()}


def head_configs(config) -> dict:
    """{task: the config of its head} from a run config (composed, or a checkpoint's saved one):
    tasks.<task>.head names a `_partial_` node of `heads` (conf/heads/standard.yaml). Configs written
    before heads existed name none: their tasks get the linear head, which is always there."""
    heads = {"linear": LINEAR_HEAD, **(config.get("heads") or {})}
    chosen = {}
    for task, task_cfg in (config.get("tasks") or {}).items():
        name = task_cfg.get("head", "linear")
        if name not in heads:
            raise UserError(
                f"tasks.{task}.head={name} is not one of the heads ({', '.join(heads) or 'none defined'}); "
                f"pick one of those, or define heads.{name}"
            )
        chosen[task] = heads[name]
    return chosen


def head_factories(config) -> dict[str, HeadFactory]:
    """{task: what builds its head} (see head_configs): one of HEAD_CLASSES with the config's numbers."""
    return {
        task: head_factory(head, f"heads.{config['tasks'][task].get('head', 'linear')}")
        for task, head in head_configs(config).items()
    }


def head_factory(head_cfg: dict, key: str) -> HeadFactory:
    """A partial of the head class `head_cfg` names, with its options (numbers such as scale, margin)."""
    head_class = HEAD_CLASSES.get(head_cfg.get("_target_"))
    if head_class is None:
        raise UnknownCallable(key, head_cfg.get("_target_"), list(HEAD_CLASSES))
    options = {k: v for k, v in head_cfg.items() if k not in ("_target_", "_partial_")}
    if any(k.startswith("_") or not isinstance(v, (int, float, bool)) for k, v in options.items()):
        raise UserError(f"{key}: a head's options are numbers (e.g. scale, margin), not {options}")
    return functools.partial(head_class, **options)


def freeze_backbone(model: CardNet, trainable: list[str] | None) -> CardNet:
    """Freeze every backbone parameter except those under the named modules; heads always train.

    `trainable=None` trains everything, `[]` nothing of the backbone. Frozen BatchNorm layers
    are kept in eval mode by `keep_frozen_batchnorm_in_eval`, so their running statistics stay.
    """
    if trainable is not None:
        names = {name for name, _ in model.backbone.named_children()}
        unknown = [t for t in trainable if t not in names]
        if unknown:
            raise UserError(
                f"freeze.trainable names {unknown}, which {model.backbone_name} does not have "
                f"(its top-level modules: {', '.join(sorted(names))})"
            )
        for name, param in model.backbone.named_parameters():
            param.requires_grad = name.split(".")[0] in trainable
    return model


def keep_frozen_batchnorm_in_eval(model: nn.Module) -> None:
    """Call after model.train(): a BatchNorm whose weights are frozen must not update its statistics."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()


def with_parameter_groups(
    model: CardNet, optimizer: str, lr_backbone: float | None = None, lr_heads: float | None = None, **options
) -> torch.optim.Optimizer:
    """The torch optimizer class `optimizer` (e.g. "torch.optim.AdamW") with its `options` (lr,
    weight_decay, ...) over the model's two named parameter groups, backbone and heads, each on its
    own learning rate where given. conf/optimizer/*.yaml instantiate it as a partial taking the model."""
    return get_class(optimizer)(parameter_groups(model, lr_backbone, lr_heads), **options)


def parameter_groups(model: CardNet, lr_backbone: float | None, lr_heads: float | None) -> list[dict]:
    """Backbone and heads as two optimizer groups; a group without its own lr uses the optimizer's."""
    groups = [  # named, so that each group's learning rate is logged as lr/<name>
        {"name": "backbone", "params": [p for p in model.backbone.parameters() if p.requires_grad], "lr": lr_backbone},
        {"name": "heads", "params": list(model.heads.parameters()), "lr": lr_heads},
    ]
    for group in groups:
        if group["lr"] is None:
            del group["lr"]
    return [group for group in groups if group["params"]]
