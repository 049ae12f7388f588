"""Cards the model never saw: the cosine head, its calibrated "unknown", enrolment without training, and
the open-set benchmark's figures; through the command lines a user runs (their Hydra entry points in this
process, one enrolment as a real command line), on one tiny trained model."""

from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import COSINE, NEW_CARD, compose, cosine_model_folder, run_cli, run_main, tiny_overrides
from omegaconf import OmegaConf
from PIL import Image

import balatro_train.enroll as enroll_main
import balatro_train.evaluate as evaluate_main
import balatro_train.predict as predict_main
from balatro_train.checkpoint import Checkpoint, load_checkpoint
from balatro_train.data import build_data
from balatro_train.embedding import MarginCrossEntropyLoss, unknown_threshold
from balatro_train.enrolment import enroll, enrolment_views
from balatro_train.errors import UserError
from balatro_train.export import export
from balatro_train.inference import Recognizer
from balatro_train.model import build_model, head_factories
from balatro_train.openset import seed_result
from balatro_train.preprocessing import Preprocessing
from balatro_train.train import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cosine_model(tmp_path_factory):
    """A cosine-head model trained on three of the four tiny cards (not Mercury); shared by the module's
    tests, by test_outputs.py and, under pytest-xdist, by the workers (conftest.cosine_model_folder)."""
    work = cosine_model_folder(tmp_path_factory)
    root, run = work / "labelled", work / "run"
    labels = json.loads((root / "cards" / "labels.json").read_text())
    new_card = sorted(root / "cards" / f for f, m in labels.items() if m["name"] == NEW_CARD)
    return SimpleNamespace(
        work=work,
        root=root,
        run=run,
        checkpoint=run / "checkpoints" / "best.pt",
        labels_file=root / "cards" / "labels.json",
        new_card=new_card,
        known=sorted((root / "cards").glob("Joker_00*.png")),
        never_seen=sorted(work.glob("never_seen_*.png")),
    )


@pytest.fixture
def tool(monkeypatch, capsys, tmp_path):
    """`tool(module, *args)`: `python -m <module> <args>` run in this process from tmp_path (conftest.run_main):
    the result's .returncode, .stdout and .stderr."""
    monkeypatch.chdir(tmp_path)
    return lambda module, *args: run_main(module, [*args], monkeypatch, capsys)


def predict_cli(tool, *args: str) -> dict:
    """`python -m balatro_train.predict <args>`'s JSON on stdout; it must succeed."""
    result = tool(predict_main, *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_the_checkpoint_carries_the_threshold_that_accepts_95_percent_of_validation_images(cosine_model):
    state = load_checkpoint(cosine_model.checkpoint)
    data = build_data(OmegaConf.create(state.config), state.class_names, state.split)
    recognizer = Recognizer(state, "cpu")
    scores = recognizer.max_cosines(recognizer.logits([data.val.images[i] for i in range(len(data.val))]))
    threshold = state.unknown_thresholds["identification"]
    assert threshold == pytest.approx(torch.quantile(scores["identification"], 0.05).item(), abs=1e-5)
    assert (scores["identification"] >= threshold).float().mean() >= 0.8  # 6 images: all but the lowest


def test_cards_never_seen_come_back_unknown_below_the_threshold_and_known_ones_above_it_do_not(cosine_model, tool):
    images = [*cosine_model.never_seen, *cosine_model.known]
    result = predict_cli(tool, f"checkpoint={cosine_model.run}", f"images=[{','.join(map(str, images))}]")
    threshold = load_checkpoint(cosine_model.checkpoint).unknown_thresholds["identification"]
    unknown = set()
    for file, r in result.items():
        raw, labels = r["raw"]["identification"], r["labels"]["identification"]
        assert raw["threshold"] == pytest.approx(threshold)
        if raw["score"] < threshold:
            unknown.add(file)
            assert labels[0] == {"label": "unknown", "score": raw["score"]}
            assert len(labels) == 4  # then the nearest known cards, all three
        else:
            assert labels[0]["label"] != "unknown"
    never_seen = {p.name for p in cosine_model.never_seen}
    assert unknown & never_seen  # the trained model rejects cards it never saw...
    assert len(unknown - never_seen) <= len(cosine_model.known) // 2  # ...and accepts most known ones
    rejected = sorted(unknown & never_seen)[0]
    # the override: -1 accepts everything
    accepted = predict_cli(
        tool, f"checkpoint={cosine_model.run}", f"images={cosine_model.work / rejected}", "unknown_threshold=-1"
    )[rejected]
    assert accepted["labels"]["identification"][0]["label"] != "unknown"
    recognizer = Recognizer.from_checkpoint(cosine_model.checkpoint, "cpu")
    assert recognizer.predict(Image.open(cosine_model.work / rejected))["identification"][0] == (
        "unknown",
        pytest.approx(result[rejected]["raw"]["identification"]["score"], abs=1e-5),
    )


def test_enrolled_card_is_then_what_predict_returns_for_its_other_screenshots(cosine_model, tmp_path, tool):
    """The first enrolment is a real `python -m balatro_train.enroll` command line; the rest run its entry
    point in this process."""
    before = hashlib.sha256(cosine_model.checkpoint.read_bytes()).hexdigest()
    out = tmp_path / "enrolled.pt"
    shots = cosine_model.new_card[:3]
    run_cli(
        [
            f"checkpoint={cosine_model.checkpoint}",
            f"images=[{','.join(map(str, shots))}]",
            f"name={NEW_CARD}",
            "type=Planet",
            f"out={out}",
        ],
        cwd=cosine_model.work,
        module="balatro_train.enroll",
    )
    assert hashlib.sha256(cosine_model.checkpoint.read_bytes()).hexdigest() == before  # the input is untouched
    state = load_checkpoint(out, "checkpoint")
    assert state.class_names["identification"][-1] == NEW_CARD
    assert state.enrolled == {"identification": {NEW_CARD: 6}}  # 3 screenshots and their inverted views
    assert state.cards[NEW_CARD] == {"name": NEW_CARD, "type": "Planet"}  # as given on the command line
    others = cosine_model.new_card[3:]
    result = predict_cli(tool, f"checkpoint={out}", f"images=[{','.join(map(str, others))}]")
    assert [r["labels"]["identification"][0]["label"] for r in result.values()] == [NEW_CARD] * len(others)
    # the original checkpoint knew no Mercury: the same screenshots were some other card there
    original = predict_cli(tool, f"checkpoint={cosine_model.checkpoint}", f"images={others[0]}")
    assert NEW_CARD not in [e["label"] for e in original[others[0].name]["labels"]["identification"]]

    # the batch form: a labels.json of new cards' screenshots, as the annotation tool writes it
    labels = json.loads(cosine_model.labels_file.read_text())
    batch = tmp_path / "new_cards.json"
    batch.write_text(
        json.dumps({f: m for f, m in labels.items() if m["name"] == NEW_CARD and f.endswith(("_0.png", "_1.png"))})
    )
    batched = tool(
        enroll_main,
        f"checkpoint={cosine_model.checkpoint}",
        f"labels={batch}",
        f"root={cosine_model.root}",
        f"out={out}",
        "overwrite=true",
    )
    assert batched.returncode == 0, batched.stderr
    from_labels = load_checkpoint(out, "checkpoint")
    assert from_labels.enrolled == {"identification": {NEW_CARD: 4}}
    assert from_labels.cards[NEW_CARD]["type"] == "Planet" and from_labels.cards[NEW_CARD]["rarity"] == "Common"

    same = tool(
        enroll_main,
        f"checkpoint={cosine_model.checkpoint}",
        f"images={shots[0]}",
        f"name={NEW_CARD}",
        f"out={cosine_model.checkpoint}",
    )
    assert same.returncode == 2 and "outputs never replace inputs" in same.stderr and "Traceback" not in same.stderr
    (tmp_path / "broken.png").write_bytes(b"")
    broken = tool(
        enroll_main,
        f"checkpoint={cosine_model.checkpoint}",
        f"images={tmp_path / 'broken.png'}",
        f"name={NEW_CARD}",
        f"out={tmp_path / 'never.pt'}",
    )
    assert broken.returncode == 2 and "broken.png: not a readable image" in broken.stderr
    assert "Traceback" not in broken.stderr and not (tmp_path / "never.pt").exists()


def test_enrolment_imprints_the_mean_and_updates_with_a_running_mean():
    cfg = compose(["tasks.identification.head=cosine", "model.pretrained=false", "model.backbone=mobilenet_v3_small"])
    model = build_model(cfg.model, {"identification": ["a", "b"], "modifier": ["Base"]}, heads=head_factories(cfg))
    state = Checkpoint(
        OmegaConf.to_container(cfg, resolve=True),
        {"identification": ["a", "b"], "modifier": ["Base"]},
        model.state_dict(),
        Preprocessing(32, (0, 0, 0), {}),
    )
    embeddings = F.normalize(torch.randn(3, model.heads["identification"].weight.shape[1]), dim=1)
    first, done = enroll(state, {"identification": embeddings[:2]}, [{"name": "c"}] * 2)
    assert first.class_names["identification"] == ["a", "b", "c"] and first.class_names["modifier"] == ["Base"]
    assert torch.allclose(first.prototypes("identification")[2], embeddings[:2].mean(0), atol=1e-6)
    assert done == ["identification: enrolled 'c' as class 2 from 2 images"]
    second, _ = enroll(first, {"identification": embeddings[2:]}, [{"name": "c"}])  # one more: the mean of all three
    assert torch.allclose(second.prototypes("identification")[2], embeddings.mean(0), atol=1e-6)
    assert second.enrolled["identification"]["c"] == 3 and state.class_names["identification"] == ["a", "b"]
    trained, _ = enroll(state, {"identification": embeddings[2:]}, [{"name": "a"}])  # half its own, half the new
    a = F.normalize(state.prototypes("identification")[0], dim=0)
    assert torch.allclose(trained.prototypes("identification")[0], (a + embeddings[2]) / 2, atol=1e-6)
    assert trained.class_names["identification"] == ["a", "b"]
    with pytest.raises(UserError, match="no name= given"):
        enroll(state, {"identification": embeddings[:1]}, [{"type": "Joker"}])
    linear_cfg = compose(["model.pretrained=false", "model.backbone=mobilenet_v3_small"])
    linear = build_model(linear_cfg.model, {"identification": ["a"], "modifier": ["Base"]})
    with pytest.raises(UserError, match="none of its tasks has an embedding head"):
        enroll(
            Checkpoint(
                OmegaConf.to_container(linear_cfg, resolve=True),
                {"identification": ["a"], "modifier": ["Base"]},
                linear.state_dict(),
                Preprocessing(32, (0, 0, 0), {}),
            ),
            {},
            [{"name": "c"}],
        )


def test_enrolment_of_real_screenshots_imprints_the_mean_of_their_unit_length_embeddings(cosine_model):
    """On the trained model, not on ready-made unit vectors: the prototype is the mean of the embeddings
    that the head's own layers give (BNNeck, then L2-normalised), computed here step by step."""
    state = load_checkpoint(cosine_model.checkpoint)
    recognizer = Recognizer(state, "cpu")
    images = [recognizer.preprocessing.load(path) for path in cosine_model.new_card[:3]]
    enrolled, _ = enroll(state, recognizer.embeddings(images), [{"name": NEW_CARD}] * 3)
    model, head = recognizer.model, recognizer.model.heads["identification"]
    batch = torch.stack([torch.from_numpy(recognizer.pipeline(image=image)["image"]) for image in images])
    with torch.no_grad():
        centred = head.neck(model.backbone(model.input(batch)))
    expected = F.normalize(centred, dim=1).mean(dim=0)
    assert enrolled.class_names["identification"][-1] == NEW_CARD
    assert torch.allclose(enrolled.prototypes("identification")[-1], expected, atol=1e-5)
    assert (centred.norm(dim=1) - 1).abs().min() > 0.1  # unnormalised, they would give another prototype


def test_an_enrolled_checkpoint_exports_its_prototypes_and_threshold_to_onnx(cosine_model, tmp_path):
    import onnx
    import onnxruntime as ort

    state = load_checkpoint(cosine_model.checkpoint)
    recognizer = Recognizer(state, "cpu")
    shots = [recognizer.preprocessing.load(p) for p in cosine_model.new_card[:2]]
    enrolled, _ = enroll(state, recognizer.embeddings(shots), [{"name": NEW_CARD}] * 2)
    enrolled.save([tmp_path / "enrolled.pt"])
    out = export(tmp_path / "enrolled.pt", "onnx", tmp_path / "enrolled.onnx")
    props = {p.key: json.loads(p.value) for p in onnx.load(str(out)).metadata_props}
    assert props["class_names"]["identification"][-1] == NEW_CARD
    assert props["unknown"]["identification"] == {
        "scale": 16.0,
        "threshold": pytest.approx(state.unknown_thresholds["identification"]),
        "rule": props["unknown"]["identification"]["rule"],
    }
    images = np.stack([recognizer.preprocessing.load(p) for p in cosine_model.new_card[2:5]])
    outputs = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"images": images})
    expected = Recognizer(enrolled, "cpu").logits(list(images))
    assert outputs[0].shape == (3, 4)  # three trained cards and the enrolled one
    assert np.abs(outputs[0] - expected["identification"].numpy()).max() < 1e-4
    assert (outputs[0].argmax(1) == 3).all()  # the enrolled card, from the ONNX model alone
    with pytest.raises(UserError, match="format=original needs linear heads"):
        export(tmp_path / "enrolled.pt", "original", tmp_path / "original.pth")


def test_evaluate_reports_open_set_metrics_on_cards_the_checkpoint_does_not_know(cosine_model, tmp_path, tool):
    evaluated = tool(
        evaluate_main,
        f"checkpoint={cosine_model.checkpoint}",
        f"dataset.labels_file={cosine_model.labels_file}",
        f"dataset.root={cosine_model.root}",
        f"out_dir={tmp_path}",
    )
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads((tmp_path / "metrics.json").read_text())
    open_set = report["open_set"]["identification"]
    assert (open_set["known_images"], open_set["unknown_images"]) == (24, 8)
    recognizer = Recognizer.from_checkpoint(cosine_model.checkpoint, "cpu")
    scores = recognizer.max_cosines(
        recognizer.logits([recognizer.preprocessing.load(p) for p in cosine_model.new_card])
    )
    rejected = (scores["identification"] < recognizer.thresholds["identification"]).float().mean().item()
    assert open_set["unknown_rejected"] == pytest.approx(rejected)
    assert 0.0 <= open_set["auroc"] <= 1.0
    assert "cards the checkpoint does not know" in (tmp_path / "report.md").read_text()


def test_an_enrolled_checkpoint_starts_a_new_run_but_does_not_resume_its_old_one(cosine_model, tmp_path):
    state = load_checkpoint(cosine_model.checkpoint)
    recognizer = Recognizer(state, "cpu")
    shots = [recognizer.preprocessing.load(p) for p in cosine_model.new_card[:2]]
    enroll(state, recognizer.embeddings(shots), [{"name": NEW_CARD}] * 2)[0].save([tmp_path / "enrolled.pt"])
    with pytest.raises(UserError, match="start a new run from it with init_from="):
        load_checkpoint(tmp_path / "enrolled.pt", "resume")
    data = {"labels_file": cosine_model.labels_file, "augmented": ""}  # every card, the enrolled one included
    cfg = compose(
        [*tiny_overrides(data, cosine_model.root), *COSINE, "trainer.epochs=1", f"init_from={tmp_path / 'enrolled.pt'}"]
    )
    train(cfg, tmp_path / "run")
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt").class_names["identification"][-1] == NEW_CARD
    with pytest.raises(UserError, match="task heads"):  # a linear run cannot start from a cosine checkpoint
        train(
            compose(
                [
                    *tiny_overrides(data, cosine_model.root),
                    *[o for o in COSINE if "head=" not in o],
                    "trainer.epochs=1",
                    f"init_from={cosine_model.checkpoint}",
                ]
            ),
            tmp_path / "linear",
        )


def test_enrolment_adds_each_screenshots_colour_inversion_unless_told_not_to():
    image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    views, values = enrolment_views([image], [{"name": "c"}])
    assert len(views) == 2 and (views[0] == image).all() and (views[1] == 255 - image).all()
    assert values == [{"name": "c"}] * 2
    assert len(enrolment_views([image], [{"name": "c"}], negative_view=False)[0]) == 1


def test_margin_loss_lowers_the_true_class_logit_by_the_margin():
    logits, target = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    shifted = logits.clone()
    shifted[torch.arange(4), target] -= 1.6
    assert MarginCrossEntropyLoss(1.6)(logits, target) == pytest.approx(F.cross_entropy(shifted, target).item())
    assert unknown_threshold(torch.arange(100.0), 0.95) == pytest.approx(4.95)


def test_held_out_cards_are_left_out_of_training_and_validation(dataset):
    data, root = dataset
    cfg = compose([*tiny_overrides(data, root), "data.held_out_cards=1", "seed=3"])
    built = build_data(cfg)
    held = built.split["held_out"]
    names = {json.loads(data["labels_file"].read_text())[f]["name"] for f in held}
    assert len(names) == 1 and len(held) == 4  # a whole card: its 4 screenshots
    assert not set(held) & set(built.split["train"] + built.split["val"])
    assert not any(f.endswith(tuple(held)) for f in built.split["train"])  # nor its augmented copies
    assert names.isdisjoint(built.class_names["identification"])
    assert build_data(cfg, built.class_names, built.split).split == built.split  # a resume keeps them out
    with pytest.raises(UserError, match="data.held_out_cards=5: only 4 cards"):
        build_data(compose([*tiny_overrides(data, root), "data.held_out_cards=5"]))


def test_the_open_set_benchmark_measures_a_seed_from_its_run_folder(dataset, tmp_path):
    data, root = dataset
    cfg = compose(
        [
            *tiny_overrides(data, root),
            "tasks.identification.head=cosine",
            "data.held_out_cards=1",
            "trainer.epochs=2",
            "publish_to=null",
        ]
    )
    job = tmp_path / "0"
    train(cfg, job)
    (job / ".hydra").mkdir()
    OmegaConf.save(cfg, job / ".hydra" / "config.yaml")  # what Hydra writes for a sweep job
    assert set(load_checkpoint(job / "checkpoints" / "best.pt").unknown_thresholds) == {"identification"}
    result = seed_result(job)  # a linear head (modifier) says no "unknown"; the cosine one does
    assert result["held_out_cards"] == 1 and result["task"] == "identification"
    for key in (
        "auroc",
        "known_accepted",
        "unseen_rejected",
        "known_top1",
        "enrolled_top1_1shot",
        "enrolled_top1_3shot",
    ):
        assert 0.0 <= result[key] <= 1.0, key
    assert result["enrol_seconds_per_card"] > 0


def test_head_options_are_checked_before_any_work():
    from balatro_train.config import check_config, typed_config

    with pytest.raises(UserError, match="tasks.identification.head=arcface is not one of the heads"):
        check_config(typed_config(compose(["tasks.identification.head=arcface"])))
    with pytest.raises(UserError, match="tasks.identification.accept_known=1.5"):
        check_config(typed_config(compose(["tasks.identification.accept_known=1.5"])))
