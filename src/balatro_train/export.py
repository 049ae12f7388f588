"""`python -m balatro_train.export checkpoint=<file or run folder> format=onnx|torchscript|original [out=...]
[overwrite=true] [benchmark=true]`

Writes the model for deployment with a dynamic batch size, input `images` (uint8, N x S x S x 3 RGB,
as `Recognizer.prepare` or `Preprocessing.square` makes them: the model converts and normalises
them itself) and one logits output per task, in the checkpoint's task order. Beside it,
`<out without suffix>.json` holds the class names and the preprocessing constants; the same
entries are in the ONNX file's metadata_props (JSON strings) and in the TorchScript file's
extra file `balatro_train.json`. An embedding head's logits are its scale x the cosine to each class
prototype; `unknown` in the JSON gives each such task's scale and calibrated threshold: a deployment
calls a card unknown when max(logits) / scale is below the threshold. Default `out`: next to the
checkpoint, `<stem>.onnx` or `<stem>.torchscript.pt`.

Neither `out` nor its sidecar JSON is ever the checkpoint (refused, whatever `overwrite` says), and
either replaces an existing file only with overwrite=true, the default `out` too: a second export of
the same checkpoint needs it (balatro_train/outputs.py). Both are written atomically.

`format=original` writes instead the checkpoint that the original ai-balatro pipeline
(jcloix/ai-balatro, `utils/inference_utils.py`) loads unchanged: `{"model": <its MultiHeadModel
state dict>, "head_states": {task: {"class_names": [...]}}}`, plain tensors and data only, resnet18
checkpoints only. Default `out`: `best_model.pth` next to the checkpoint (that pipeline reads
`data/models/best_model.pth`); no sidecar JSON. That pipeline resizes to 224x224 and normalises with
the ImageNet mean/std: a model trained otherwise is exported, with a warning.

`benchmark=true` (onnx, torchscript) then times single-image and batch-32 inference of the exported
model and of PyTorch eager on `benchmark_threads` CPU threads, and prints a table.
"""

from __future__ import annotations

import inspect
import io
import json
import logging
import time
import warnings
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from balatro_train.atomic import save_bytes
from balatro_train.checkpoint import Checkpoint, load_checkpoint
from balatro_train.config import CONFIG_DIR
from balatro_train.errors import UserError, exit_on_user_error
from balatro_train.inference import log_to_stderr, resolve_checkpoint
from balatro_train.model import IMAGENET_MEAN, IMAGENET_STD
from balatro_train.outputs import check_outputs

log = logging.getLogger("balatro_train.export")
FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
MIN_OPSET = 17
ORIGINAL_NAME = "best_model.pth"  # ai-balatro's inference tools load data/models/best_model.pth by default
ORIGINAL_SIZE = 224  # and it normalises with:
# Export's own config directory, not conf/: Hydra reads a key that shares its name with a config group of
# the primary config's directory as a group override, so conf/benchmark/ (the training sweeps) turned
# `benchmark=true` into "Config group override must be a string or a list. Got bool".
EXPORT_CONFIG_DIR = str(Path(CONFIG_DIR).with_name("conf_export"))


@hydra.main(version_base="1.3", config_path=EXPORT_CONFIG_DIR, config_name="export")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    log_to_stderr()
    if cfg.benchmark and cfg.format == "original":
        raise UserError("benchmark=true times format=onnx or format=torchscript; drop it for format=original")
    out = export(cfg.checkpoint, cfg.format, cfg.out, cfg.opset, cfg.overwrite)
    if cfg.benchmark:
        print_table(benchmark(out, cfg.format, cfg.benchmark_threads, cfg.benchmark_runs))


class Exportable(nn.Module):
    """CardNet's input layer, backbone and heads as a plain graph: CardNet.forward switches autograd on
    and off, which neither exporter should see. Returns a tuple (ONNX) or a dict (TorchScript) of logits."""

    def __init__(self, model: nn.Module, tasks: list[str], as_dict: bool):
        super().__init__()
        self.model, self.tasks, self.as_dict = model, tasks, as_dict

    def forward(self, images: torch.Tensor):
        features = self.model.backbone(self.model.input(images))
        logits = [self.model.heads[task](features) for task in self.tasks]
        return dict(zip(self.tasks, logits, strict=True)) if self.as_dict else tuple(logits)


def export(checkpoint, fmt: str, out=None, opset: int = MIN_OPSET, overwrite: bool = False) -> Path:
    """Export and write the sidecar JSON (none for format=original); returns the model file's path.
    `overwrite`: `out` and its sidecar may replace existing files (never the checkpoint)."""
    if fmt not in FORMATS and fmt != "original":
        raise UserError(
            f"format={fmt} is not supported: use format=onnx or format=torchscript "
            f"(or format=original for the ai-balatro pipeline)"
        )
    if fmt == "onnx" and opset < MIN_OPSET:
        raise UserError(f"opset={opset} is too old: use opset={MIN_OPSET} or newer")
    path = resolve_checkpoint(checkpoint)
    target = check_targets(path, fmt, out, overwrite)  # before loading anything: a refusal costs nothing
    checkpoint = load_checkpoint(path, "checkpoint")
    if fmt == "original":
        return export_original(checkpoint, path, target)
    model, tasks = checkpoint.model(), checkpoint.tasks
    size = checkpoint.preprocessing.image_size
    meta = metadata(checkpoint, path, fmt)
    example = torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8)
    buffer = io.BytesIO()  # serialised in memory, then written whole: never a half-written file at `target`
    with torch.no_grad():
        if fmt == "onnx":
            export_onnx(Exportable(model, tasks, as_dict=False), example, buffer, tasks, opset, meta)
        else:
            with warnings.catch_warnings():  # torch >= 2.9 deprecates TorchScript; it still loads in C++/Java
                warnings.simplefilter("ignore", FutureWarning)
                traced = torch.jit.trace(Exportable(model, tasks, as_dict=True), example, strict=False)
                torch.jit.save(traced, buffer, _extra_files={"balatro_train.json": json.dumps(meta)})
    save_bytes(buffer.getbuffer(), target)
    save_bytes((json.dumps(meta, indent=1) + "\n").encode(), target.with_suffix(".json"))
    log.info("exported %s to %s (class names and preprocessing in %s)", path, target, target.with_suffix(".json"))
    return target


def check_targets(checkpoint: Path, fmt: str, out, overwrite: bool) -> Path:
    """The model file to write (`out`, or the default beside the checkpoint), once outputs.check_outputs
    has allowed it and its sidecar `<out without suffix>.json` (none for format=original)."""
    default = checkpoint.with_name(ORIGINAL_NAME if fmt == "original" else checkpoint.stem + FORMATS[fmt])
    target = Path(out) if out else default
    value = str(out) if out else f"{default} (the default, beside the checkpoint)"
    outputs = [(target, "")]
    if fmt != "original":
        if target.suffix == ".json":  # the sidecar would then overwrite the model just written
            raise UserError(
                f"out={out}: the model and its sidecar <out without suffix>.json would be one file; "
                f"give an out= ending in {FORMATS[fmt]}"
            )
        outputs.append((target.with_suffix(".json"), "its sidecar"))
    check_outputs(
        "out", value, outputs, [(checkpoint, f"the checkpoint it reads (checkpoint={checkpoint})")], overwrite
    )
    return target


def export_original(state: Checkpoint, checkpoint: Path, out: Path) -> Path:
    """The checkpoint as ai-balatro's `load_model` reads it: `head_states` for the class names (in output
    order), `model` loaded strictly into its MultiHeadModel, whose backbone is
    `nn.Sequential(*list(resnet18().children())[:-1])`: our backbone's children renamed by position."""
    backbone = state.backbone
    if backbone != "resnet18":
        raise UserError(
            f"checkpoint={checkpoint}: format=original needs a resnet18 model, this one is {backbone} "
            f"(the ai-balatro pipeline only builds resnet18); use format=onnx or format=torchscript"
        )
    cosine = state.embedding_tasks
    if cosine:
        raise UserError(
            f"checkpoint={checkpoint}: format=original needs linear heads, but {', '.join(cosine)} has an "
            f"embedding head (the ai-balatro pipeline only builds nn.Linear heads); use format=onnx or "
            f"format=torchscript, or train with tasks.<task>.head=linear"
        )
    prep = metadata(state, checkpoint, "original")["preprocessing"]
    if prep["image_size"] != ORIGINAL_SIZE:
        log.warning(
            "the model was trained at %d px but the ai-balatro pipeline resizes every image to %dx%d: "
            "expect lower accuracy there (retrain with data.image_size=%d)",
            prep["image_size"],
            ORIGINAL_SIZE,
            ORIGINAL_SIZE,
            ORIGINAL_SIZE,
        )
    if not (np.allclose(prep["mean"], IMAGENET_MEAN) and np.allclose(prep["std"], IMAGENET_STD)):
        log.warning(
            "the model normalises with mean %s, std %s but the ai-balatro pipeline uses ImageNet's %s, %s",
            prep["mean"],
            prep["std"],
            IMAGENET_MEAN,
            IMAGENET_STD,
        )
    model = state.model()  # also checks that the weights fit a resnet18 CardNet
    children = [name for name, _ in model.backbone.named_children()]
    assert children[-1] == "fc", children  # the classifier, an Identity here, which MultiHeadModel drops
    position = {name: str(i) for i, name in enumerate(children[:-1])}
    weights = {}
    for key, tensor in model.state_dict().items():
        if key.startswith("backbone."):
            _, child, rest = key.split(".", 2)
            key = f"backbone.{position[child]}.{rest}"
        weights[key] = tensor
    buffer = io.BytesIO()
    torch.save(
        {
            "model": weights,
            "head_states": {task: {"class_names": list(names)} for task, names in state.class_names.items()},
        },
        buffer,
    )
    save_bytes(buffer.getbuffer(), out)
    log.info(
        "exported %s to %s for the ai-balatro pipeline (%s)",
        checkpoint,
        out,
        ", ".join(f"{task}: {len(names)} classes" for task, names in state.class_names.items()),
    )
    return out


def export_onnx(model: nn.Module, example: torch.Tensor, out: io.BytesIO, tasks: list[str], opset: int, meta: dict):
    """The ONNX model, its metadata_props set and checked, serialised into `out`."""
    import onnx

    # The legacy (TorchScript-based) exporter: the dynamo one needs onnxscript, which this project does not pull
    # in (torch < 2.5 has only the legacy one). Its deprecation warning is expected, not news for the user.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
        exported = io.BytesIO()
        torch.onnx.export(
            model,
            (example,),
            exported,
            opset_version=opset,
            input_names=["images"],
            output_names=tasks,
            dynamic_axes={name: {0: "batch"} for name in ["images", *tasks]},
            do_constant_folding=True,
            **legacy,
        )
    proto = onnx.load_from_string(exported.getvalue())
    onnx.helper.set_model_props(proto, {key: json.dumps(value) for key, value in meta.items()})
    onnx.checker.check_model(proto)
    onnx.save(proto, out)


def metadata(checkpoint: Checkpoint, path: Path, fmt: str) -> dict:
    """What a deployment needs besides the weights: how to prepare an image and how to read the outputs."""
    prep, model_cfg = checkpoint.preprocessing, checkpoint.model_config
    return {
        "format": fmt,
        "checkpoint": str(path),
        "backbone": checkpoint.backbone,
        "input": {
            "name": "images",
            "shape": ["batch", prep.image_size, prep.image_size, 3],
            "dtype": "uint8",
            "layout": "NHWC, RGB",
        },
        "outputs": {
            task: {"shape": ["batch", len(names)], "values": "logits; softmax them"}
            for task, names in checkpoint.class_names.items()
        },
        "class_names": checkpoint.class_names,
        "fields": checkpoint.fields,
        "preprocessing": {
            "steps": "composite transparency on background, resize to image_size x image_size (bilinear), "
            "uint8 RGB; the model itself divides by 255, subtracts mean and divides by std",
            "image_size": prep.image_size,
            "background": list(prep.background),
            "mean": list(model_cfg.get("mean", IMAGENET_MEAN)),
            "std": list(model_cfg.get("std", IMAGENET_STD)),
            "val_transforms": prep.val_transforms,
        },
        # Embedding heads: their outputs are scale x cosine to each class prototype (the prototypes,
        # enrolled cards' included, are the head's weights inside the model).
        "unknown": {
            task: {
                "scale": checkpoint.head_scale(task),
                "threshold": float(checkpoint.unknown_thresholds.get(task, -1.0)),
                "rule": "score = max(output) / scale; below threshold the card is unknown",
            }
            for task in checkpoint.embedding_tasks
        },
    }


def benchmark(exported: Path, fmt: str, threads: int = 2, runs: int = 50) -> list[dict]:
    """Latency of the exported model and of PyTorch eager (as Recognizer runs it) on `threads` CPU threads."""
    meta = json.loads(exported.with_suffix(".json").read_text())
    checkpoint = load_checkpoint(meta["checkpoint"], "checkpoint")
    size = meta["preprocessing"]["image_size"]
    torch.set_num_threads(threads)
    model = checkpoint.model()
    runners = {"pytorch eager (channels_last)": lambda x: model(torch.from_numpy(x))}
    if fmt == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = ort.InferenceSession(str(exported), options, providers=["CPUExecutionProvider"])
        runners["onnxruntime"] = lambda x: session.run(None, {"images": x})
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            scripted = torch.jit.load(str(exported))
        runners["torchscript"] = lambda x: scripted(torch.from_numpy(x))
    rows = []
    with torch.inference_mode():
        for batch in (1, 32):
            images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
            for name, run in runners.items():
                rows.append(
                    {
                        "runtime": name,
                        "batch": batch,
                        "image_size": size,
                        "threads": threads,
                        **time_calls(run, images, runs if batch == 1 else max(3, runs // 5)),
                    }
                )
    return rows


def time_calls(run, images: np.ndarray, runs: int) -> dict:
    for _ in range(3):  # warm-up: allocations, oneDNN/ORT kernel selection
        run(images)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run(images)
        times.append((time.perf_counter() - start) * 1000)
    median = float(np.median(times))
    return {
        "median_ms": median,
        "p90_ms": float(np.percentile(times, 90)),
        "ms_per_image": median / len(images),
        "runs": runs,
    }


def print_table(rows: list[dict]) -> None:
    print(
        f"{'runtime':<32}{'batch':>6}{'median ms':>11}{'p90 ms':>9}{'ms/image':>10}   "
        f"({rows[0]['image_size']}x{rows[0]['image_size']}, {rows[0]['threads']} CPU threads)"
    )
    for r in rows:
        print(f"{r['runtime']:<32}{r['batch']:>6}{r['median_ms']:>11.2f}{r['p90_ms']:>9.2f}{r['ms_per_image']:>10.2f}")


if __name__ == "__main__":
    main()
