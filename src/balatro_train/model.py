"""A torchvision backbone with one linear head per task, and the freeze strategies."""

from __future__ import annotations

import logging
import warnings

import torch
import torchvision
from torch import nn

from balatro_train.errors import UserError

log = logging.getLogger(__name__)


class CardNet(nn.Module):
    """Shared backbone -> features -> one `nn.Linear` head per task; forward returns {task: logits}."""

    def __init__(self, backbone: str, num_classes: dict[str, int], pretrained: bool = True):
        super().__init__()
        self.backbone_name = backbone
        self.backbone, self.pretrained_loaded = _load_backbone(backbone, pretrained)
        features = _drop_classifier(self.backbone, backbone)
        self.heads = nn.ModuleDict({task: nn.Linear(features, n) for task, n in num_classes.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        # A fully frozen backbone needs no autograd graph: it is then only a feature extractor.
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.backbone_trains()):
            features = self.backbone(images)
        return {task: head(features) for task, head in self.heads.items()}

    def backbone_trains(self) -> bool:
        return any(p.requires_grad for p in self.backbone.parameters())


def _load_backbone(name: str, pretrained: bool) -> tuple[nn.Module, bool]:
    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise UserError(f"model.backbone={name} is not a torchvision classification model "
                        f"(available: {', '.join(available)})")
    if pretrained:
        weights = torchvision.models.get_model_weights(name).DEFAULT
        try:
            return torchvision.models.get_model(name, weights=weights), True
        except Exception as e:  # no network, a proxy, a corrupt cache: train anyway, but say so
            warnings.warn(f"model.pretrained=true but the {weights} ImageNet weights could not be "
                          f"loaded ({type(e).__name__}: {e}); training {name} from random init. "
                          f"The checkpoint records pretrained_loaded=false.", stacklevel=2)
            log.warning("ImageNet weights for %s unavailable (%s): random init", name, type(e).__name__)
    return torchvision.models.get_model(name, weights=None), False


def _drop_classifier(model: nn.Module, name: str) -> int:
    """Replace the model's last nn.Linear (its ImageNet classifier) by Identity; return its width."""
    linears = [(path, m) for path, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(f"model.backbone={name} has no linear classifier to replace with task heads")
    path, last = linears[-1]
    model.set_submodule(path, nn.Identity())
    return last.in_features


def freeze_backbone(model: CardNet, trainable: list[str] | None) -> CardNet:
    """Freeze every backbone parameter except those under the named modules; heads always train.

    `trainable=None` trains everything, `[]` nothing of the backbone. Frozen BatchNorm layers
    are kept in eval mode by `keep_frozen_batchnorm_in_eval`, so their running statistics stay.
    """
    if trainable is not None:
        names = {name for name, _ in model.backbone.named_children()}
        unknown = [t for t in trainable if t not in names]
        if unknown:
            raise UserError(f"freeze.trainable names {unknown}, which {model.backbone_name} does not have "
                            f"(its top-level modules: {', '.join(sorted(names))})")
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
