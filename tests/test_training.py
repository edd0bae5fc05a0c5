"""The training pieces without Ray: losses, class balance, one epoch, validation metrics, early stopping, phases."""

import json
import math

import numpy as np
import pytest
import torch

from lesion.config import TrainConfig
from lesion.data import synthetic
from lesion.labels import DX_CLASSES
from lesion.models import create_model
from lesion.training import (
    EarlyStopping,
    LoopSettings,
    apply_phase,
    array_batches,
    balanced_batches,
    build_loss,
    build_optimizer,
    build_scheduler,
    class_weights,
    evaluate_epoch,
    mix_batch,
    phase_of,
    plot_learning_curve,
    sampling_rates,
    seed_everything,
    train_epoch,
    validation_metrics,
)

SIZE = 32
TINY = {"conv_widths": [8, 16, 16, 16], "fc_widths": [32, 16], "dropout": [0.0, 0.0]}


@pytest.fixture(scope="module")
def images():
    rows = list(synthetic.generate(48, SIZE, seed=1))
    return (np.stack([r["image"] for r in rows]),
            np.array([DX_CLASSES.index(r["dx"]) for r in rows], dtype=np.int64))


def settings(task="multiclass", num_classes=7):
    return LoopSettings(task=task, num_classes=num_classes, mean=(0.5,) * 3, std=(0.5,) * 3, input_size=SIZE,
                        device=torch.device("cpu"))


def tiny_model(seed=0):
    seed_everything(seed)
    return create_model("custom_cnn", 7, input_size=SIZE, **TINY)


def train(images, labels, epochs, seed=0, augment=1.0):
    cfg = TrainConfig(lr=3e-3, optimizer="adam", seed=seed)
    model = tiny_model(seed)
    optimizer = build_optimizer(model, cfg)
    loss_fn = build_loss("multiclass", cfg, np.bincount(labels, minlength=7))
    results = []
    for epoch in range(epochs):
        generator = torch.Generator().manual_seed(seed * 100 + epoch)
        batches = array_batches(images, labels, 16, seed=seed * 100 + epoch)
        results.append(train_epoch(model, batches, optimizer, loss_fn, settings(), augment_strength=augment,
                                   generator=generator, grad_clip=1.0))
    return model, results


@pytest.mark.timeout(120)
def test_loss_goes_down_on_a_tiny_batch(images):
    x, y = images[0][:16], images[1][:16]
    _, results = train(x, y, epochs=25, augment=0.0)
    assert results[-1]["train_loss"] < 0.5 * results[0]["train_loss"]
    assert results[-1]["train_accuracy"] > 0.8
    assert results[0]["images"] == 16 and sum(results[0]["seen"]) == 16


@pytest.mark.timeout(120)
def test_one_process_training_is_deterministic(images):
    model_a, results_a = train(*images, epochs=2, seed=3)
    model_b, results_b = train(*images, epochs=2, seed=3)
    model_c, _ = train(*images, epochs=2, seed=4)
    assert [r["train_loss"] for r in results_a] == [r["train_loss"] for r in results_b]
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name
    assert not all(torch.equal(a, c) for a, c in zip(model_a.state_dict().values(), model_c.state_dict().values()))


def test_class_weights_are_inverse_frequency():
    weights = class_weights([10, 30, 0])
    assert torch.allclose(weights, torch.tensor([2.0, 2 / 3, 0.0]))
    assert torch.allclose(class_weights([5, 5, 5]), torch.ones(3))
    # weighted mean over the training samples is 1
    assert math.isclose(float((weights[:2] * torch.tensor([10.0, 30.0])).sum() / 40), 1.0, rel_tol=1e-6)


def test_weighted_losses_favour_the_rare_class():
    logits = torch.zeros(2, 3)
    labels = torch.tensor([0, 1])
    counts = [10, 30, 5]
    plain = build_loss("multiclass", TrainConfig(balance="none"), counts)
    weighted = build_loss("multiclass", TrainConfig(balance="weights"), counts)
    assert torch.allclose(plain(logits, labels), torch.tensor(math.log(3)))
    # one image of the rarer class 0 and one of class 1, each wrong in turn: missing the rare one costs more
    rare_missed = weighted(torch.tensor([[0.0, 5.0, 0.0], [0.0, 5.0, 0.0]]), labels)
    common_missed = weighted(torch.tensor([[5.0, 0.0, 0.0], [5.0, 0.0, 0.0]]), labels)
    assert rare_missed > common_missed
    assert plain(torch.tensor([[0.0, 5.0, 0.0], [0.0, 5.0, 0.0]]), labels) == pytest.approx(
        plain(torch.tensor([[5.0, 0.0, 0.0], [5.0, 0.0, 0.0]]), labels).item())

    binary = build_loss("binary", TrainConfig(balance="weights", label_smoothing=0.0), [90, 10])
    assert float(binary.pos_weight) == pytest.approx(9.0)
    missed_positive = binary(torch.tensor([[-2.0]]), torch.tensor([1]))
    missed_negative = binary(torch.tensor([[2.0]]), torch.tensor([0]))
    assert missed_positive == pytest.approx(9 * missed_negative.item(), rel=1e-5)


def test_label_smoothing_keeps_a_floor_on_the_loss():
    logits = torch.tensor([[20.0, -20.0, -20.0]])
    smooth = build_loss("multiclass", TrainConfig(label_smoothing=0.1), [1, 1, 1])
    sharp = build_loss("multiclass", TrainConfig(label_smoothing=0.0), [1, 1, 1])
    assert sharp(logits, torch.tensor([0])) < 1e-6 < 0.5 < smooth(logits, torch.tensor([0]))


def test_balanced_batches_draw_classes_equally_and_keep_batch_sizes():
    rng = np.random.default_rng(0)
    labels = rng.choice(3, size=4000, p=[0.8, 0.15, 0.05])
    counts = np.bincount(labels, minlength=3)
    stream = [(torch.zeros(100, 2, 2, 3, dtype=torch.uint8), torch.as_tensor(labels[i:i + 100]))
              for i in range(0, 4000, 100)]
    out = list(balanced_batches(stream, sampling_rates(counts), torch.Generator().manual_seed(0)))
    assert [len(b[1]) for b in out] == [100] * 40
    seen = np.bincount(torch.cat([b[1] for b in out]).numpy(), minlength=3) / 4000
    assert np.all(np.abs(seen - 1 / 3) < 0.05), seen


def test_validation_metrics_handle_absent_classes():
    labels = np.array([0, 0, 1, 1, 1])
    logits = np.full((5, 7), -5.0)
    logits[[0, 1, 2], [0, 0, 1]] = 5.0  # right
    logits[[3, 4], [2, 0]] = 5.0  # wrong: a class absent from the labels, and class 0
    m = validation_metrics(logits, labels, "multiclass", 7)
    assert m["val_accuracy"] == pytest.approx(3 / 5)
    assert m["val_balanced_accuracy"] == pytest.approx((1.0 + 1 / 3) / 2)  # only classes 0 and 1 count
    assert 0 <= m["val_roc_auc"] <= 1 and math.isfinite(m["val_loss"])
    one_class = validation_metrics(logits[:2], labels[:2], "multiclass", 7)
    assert math.isnan(one_class["val_roc_auc"]) and one_class["val_accuracy"] == 1.0
    binary = validation_metrics(np.array([[-3.0], [2.0], [1.0]]), np.array([0, 1, 0]), "binary", 2)
    assert binary["val_roc_auc"] == pytest.approx(1.0) and binary["val_accuracy"] == pytest.approx(2 / 3)


def test_validation_metrics_are_the_test_metrics():
    """Early stopping picks epochs by the numbers evaluation reports: lesion.metrics' definitions, including a class
    predicted but absent from the labels (an F1 of 0 in the macro mean)."""
    from lesion import metrics

    labels = np.array([0, 0, 1, 1, 1, 3])
    logits = np.random.default_rng(0).normal(size=(6, 7))
    logits[4, 2] = 9.0  # class 2 predicted, absent from the labels
    probs = torch.softmax(torch.as_tensor(logits, dtype=torch.float32), dim=1).numpy()
    m = validation_metrics(logits, labels, "multiclass", 7)
    assert m["val_accuracy"] == metrics.accuracy(labels, probs)
    assert m["val_balanced_accuracy"] == metrics.balanced_accuracy(labels, probs)
    assert m["val_macro_f1"] == metrics.precision_recall_f1(labels, probs)["macro"]["f1"]
    assert m["val_roc_auc"] == metrics.roc_auc(labels, probs)["macro"]
    logits = np.array([[-3.0], [2.0], [1.0], [0.5]])
    binary = validation_metrics(logits, np.array([0, 1, 0, 1]), "binary", 2)
    p = torch.sigmoid(torch.as_tensor(logits[:, 0])).numpy()
    assert binary["val_roc_auc"] == metrics.binary_auc(np.array([0, 1, 0, 1]) == 1, p)
    with pytest.raises(ValueError, match="7 classes got logits of shape"):
        validation_metrics(logits, np.array([0, 1, 0, 1]), "multiclass", 7)


@pytest.mark.timeout(60)
def test_evaluate_epoch_scores_every_image_once(images):
    model = tiny_model()
    m = evaluate_epoch(model, array_batches(*images, 20), settings())
    assert set(m) == {"val_loss", "val_accuracy", "val_balanced_accuracy", "val_macro_f1", "val_roc_auc"}
    logits = model(torch.zeros(1, 3, SIZE, SIZE))
    assert logits.shape == (1, 7)


def test_early_stopping_stops_after_patience_and_restores_the_best_weights():
    model = torch.nn.Linear(2, 1)
    stopper = EarlyStopping("val_loss", patience=2)
    for epoch, loss in enumerate([1.0, 0.5, 0.7, 0.6]):
        with torch.no_grad():
            model.weight.fill_(epoch)
        stopper.step(epoch, {"val_loss": loss}, model)
        if stopper.should_stop:
            break
    assert epoch == 3 and stopper.best_epoch == 1 and stopper.best == 0.5
    stopper.restore(model)
    assert torch.all(model.weight == 1.0)
    clone = EarlyStopping("val_loss", patience=2)
    clone.load_state_dict(stopper.state_dict())
    assert clone.best_epoch == 1 and clone.should_stop
    rising = EarlyStopping("val_balanced_accuracy", patience=1)
    assert rising.mode == "max" and rising.step(0, {"val_balanced_accuracy": 0.2}, model)
    assert rising.step(1, {"val_balanced_accuracy": 0.3}, model) and not rising.step(2, {"val_balanced_accuracy": 0.1}, model)
    assert not rising.step(3, {"val_balanced_accuracy": float("nan")}, model)


def test_transfer_phases_freeze_then_unfreeze_the_last_layers():
    cfg = TrainConfig(freeze_epochs=2, epochs=5, unfreeze_fraction=0.25, lr=1e-3, finetune_lr_factor=0.1)
    model = tiny_model()
    assert phase_of(0, model, cfg) == "full"  # from scratch: one phase
    model.pretrained_origin = "imagenet:test"
    assert [phase_of(e, model, cfg) for e in range(5)] == ["frozen"] * 2 + ["finetune"] * 3
    assert apply_phase(model, "frozen", cfg) == 1e-3
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    assert apply_phase(model, "finetune", cfg) == pytest.approx(1e-4)
    trainable = [p.requires_grad for p in model.backbone.parameters()]
    assert any(trainable) and not all(trainable) and trainable[-1]
    assert len(build_optimizer(model, cfg).param_groups[0]["params"]) == sum(
        p.requires_grad for p in model.parameters())


def test_schedulers_follow_the_config():
    model = torch.nn.Linear(2, 1)
    optimizer = build_optimizer(model, TrainConfig(optimizer="sgd", lr=0.1))
    assert build_scheduler(optimizer, TrainConfig(scheduler="none"), 5) is None
    cosine = build_scheduler(optimizer, TrainConfig(scheduler="cosine"), 4)
    for _ in range(4):
        optimizer.step()
        cosine.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="train.optimizer"):
        build_optimizer(model, TrainConfig(optimizer="lamb"))


def test_warm_up_raises_the_rate_then_the_cosine_runs_over_the_epochs_left():
    model = torch.nn.Linear(2, 1)
    optimizer = build_optimizer(model, TrainConfig(optimizer="sgd", lr=0.1))
    scheduler = build_scheduler(optimizer, TrainConfig(scheduler="cosine", warmup_epochs=2), 6)
    rates = []
    for _ in range(6):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[:3] == pytest.approx([0.1 / 3, 0.2 / 3, 0.1])  # up to the full rate, then down
    assert rates[3] > rates[4] > rates[5] > 0
    with pytest.raises(ValueError, match="warmup_epochs needs"):
        build_scheduler(optimizer, TrainConfig(scheduler="plateau", warmup_epochs=1), 6)


def test_mixup_and_cutmix_keep_the_share_they_report():
    x = torch.arange(8, dtype=torch.float32).view(8, 1, 1, 1).expand(8, 3, 10, 10).contiguous()
    kinds = set()
    for seed in range(20):
        mixed, partner, lam = mix_batch(x, 0.4, torch.Generator().manual_seed(seed))
        assert mixed.shape == x.shape and 0 <= lam <= 1 and sorted(partner.tolist()) == list(range(8))
        own = (mixed == x).float().mean(dim=(1, 2, 3))
        if torch.allclose(mixed, lam * x + (1 - lam) * x[partner]):
            kinds.add("mixup")
        else:  # cutmix: exactly ``lam`` of each image that has a different partner is its own
            moved = partner != torch.arange(8)
            assert torch.allclose(own[moved], torch.full_like(own[moved], lam))
            kinds.add("cutmix")
    assert kinds == {"mixup", "cutmix"}


@pytest.mark.timeout(120)
def test_an_epoch_with_mixup_and_the_dermoscopy_policy_trains(images):
    cfg = TrainConfig(lr=3e-3, optimizer="adam")
    model = tiny_model()
    optimizer = build_optimizer(model, cfg)
    loss_fn = build_loss("multiclass", cfg, np.bincount(images[1], minlength=7))
    before = [p.detach().clone() for p in model.parameters()]
    result = train_epoch(model, array_batches(*images, 16, seed=0), optimizer, loss_fn, settings(),
                         augment_policy="dermoscopy", mixup=0.4, generator=torch.Generator().manual_seed(0))
    assert math.isfinite(result["train_loss"]) and result["images"] == len(images[1])
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_learning_curve_plot_is_written(tmp_path):
    history = [{"epoch": e, "train_loss": 1 / (e + 1), "val_loss": 1.2 / (e + 1), "train_balanced_accuracy": 0.1 * e,
                "val_balanced_accuracy": 0.08 * e, "best": True} for e in range(3)]
    path = plot_learning_curve(history, tmp_path / "curve.png", title="x")
    assert path.stat().st_size > 5000


def test_history_is_written_as_csv_json_and_tensorboard_events(tmp_path):
    from lesion.training import write_history

    history = [{"epoch": e, "attempt": 0, "train_loss": 1.0 / (e + 1), "val_loss": 2.0, "best": e == 1, "phase": "all"}
               for e in range(2)]
    write_history(history, tmp_path, tensorboard=True)
    assert (tmp_path / "history.csv").read_text().splitlines()[0].startswith("epoch,attempt,train_loss")
    assert json.loads((tmp_path / "history.json").read_text()) == history
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    write_history(history, tmp_path / "tb" / "..", tensorboard=False)  # no second event file without tensorboard
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 1
