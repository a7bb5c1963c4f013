"""The recipe's pieces against their formulas, written out here: label-smoothed and mixed targets, the size of the
gate-logit noise, the EMA recurrence, and the learning rate of every epoch under each schedule with warmup."""
import math

import pytest
import torch
import torch.nn as nn

from dataloading import LoaderOptions, get_loaders
from dataloading.common import train_batches_per_rank
from image_classification.ema import EMA
from image_classification.losses import Mixup, SoftTargetCrossEntropy
from image_classification.optim import lr_schedule
from pedconv import PEDConv2d
from tests.data_utils import make_dataset


def smoothed(labels, classes, smoothing):
    """(1 - s) one_hot + s / C, element by element."""
    target = torch.empty(len(labels), classes)
    for row, label in enumerate(labels.tolist()):
        for column in range(classes):
            target[row, column] = (1.0 - smoothing) * (column == label) + smoothing / classes
    return target


def soft_cross_entropy(logits, target):
    return -(target * logits.log_softmax(dim=1)).sum(dim=1).mean()


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_label_smoothing_loss_is_cross_entropy_with_the_smoothed_target(smoothing):
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 7) * 3, torch.tensor([0, 6, 2, 2, 5, 1])
    expected = soft_cross_entropy(logits, smoothed(labels, 7, smoothing))
    torch.testing.assert_close(SoftTargetCrossEntropy(smoothing)(logits, labels), expected, rtol=1e-6, atol=0)
    # soft targets are taken as they are (no second smoothing)
    target = torch.softmax(torch.randn(6, 7), dim=1)
    torch.testing.assert_close(SoftTargetCrossEntropy(smoothing)(logits, target), soft_cross_entropy(logits, target),
                               rtol=1e-6, atol=0)


def recover_mixing(images, mixed):
    """lambda and the permutation from images that are distinct basis vectors: mixed[i] = lam e_i + (1-lam) e_p(i)."""
    flat = mixed.flatten(1)
    lam, partner = None, []
    for i in range(flat.shape[0]):
        others = [j for j in range(flat.shape[0]) if j != i and flat[i, j] > 0]
        partner.append(others[0] if others else i)
        if others:
            lam = flat[i, i].item()
    return lam, partner


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_mixup_target_is_the_drawn_lambdas_mix_of_smoothed_targets(smoothing):
    batch, classes = 6, 5
    images = torch.eye(batch).view(batch, 1, 1, batch)  # image i is the i-th basis vector: the mix is readable
    labels = torch.tensor([0, 4, 1, 1, 3, 2])
    torch.manual_seed(3)
    mixed, target = Mixup(0.4, classes, smoothing)(images.clone(), labels)
    lam, partner = recover_mixing(images, mixed)
    assert lam is not None and 0.0 < lam < 1.0
    flat = mixed.flatten(1)
    for i, j in enumerate(partner):  # the images are lam x_i + (1 - lam) x_p(i), nothing else
        expected = lam * images[i].flatten() + (1 - lam) * images[j].flatten() if j != i else images[i].flatten()
        torch.testing.assert_close(flat[i], expected, rtol=0, atol=1e-6)
    base = smoothed(labels, classes, smoothing)
    expected = torch.stack([lam * base[i] + (1 - lam) * base[j] for i, j in enumerate(partner)])
    torch.testing.assert_close(target, expected, rtol=0, atol=1e-6)


def test_mixup_lambda_follows_beta_alpha_alpha():
    """Over many batches lambda has Beta(a, a)'s mean 1/2 and variance 1 / (4 (2a + 1)) (tolerance: 5 standard
    errors of the estimates, fixed seed)."""
    alpha, draws = 0.4, 3000
    images = torch.eye(2).view(2, 1, 1, 2)
    torch.manual_seed(0)
    lambdas = []
    for _ in range(draws):
        mixed, _ = Mixup(alpha, 2)(images.clone(), torch.tensor([0, 1]))
        lambdas.append(mixed[0, 0, 0, 0].item())  # with 2 samples the partner of 0 is 0 (lam irrelevant) or 1
    values = torch.tensor(lambdas, dtype=torch.float64)
    values = values[values < 1.0]  # batches where sample 0 was paired with itself show 1.0 whatever lambda was
    variance = 1.0 / (4 * (2 * alpha + 1))
    assert abs(values.mean().item() - 0.5) < 5 * math.sqrt(variance / len(values))
    # the standard error of a sample variance: sqrt((E[(x - m)^4] - variance^2) / n), from the measured 4th moment
    fourth = ((values - 0.5) ** 4).mean().item()
    assert abs(values.var().item() - variance) < 5 * math.sqrt((fourth - variance**2) / len(values))


def gate_logits(layer, x):
    """The logits the gate generator hands on (noise included), captured at its output."""
    captured = []
    handle = layer.attn.register_forward_hook(lambda module, args, output: captured.append(output.detach()))
    try:
        with torch.no_grad():
            layer(x)
    finally:
        handle.remove()
    return captured[-1]


def test_training_noise_of_the_gate_logits_has_std_noise_std():
    """noise = training logits - eval logits of the same input: mean 0 and standard deviation 0.1 (the release's,
    PEDConv2d's default) for each of the three heads; tolerance 5 standard errors of the estimates."""
    torch.manual_seed(0)
    layer = PEDConv2d(32, 48, 3, padding=1)
    x = torch.randn(1000, 32, 3, 3)
    clean = gate_logits(layer.eval(), x)
    noise = gate_logits(layer.train(), x) - clean
    heads = {"input": noise[:, :32], "output": noise[:, 32:80], "tap": noise[:, 80:]}
    assert noise.shape[1] == 32 + 48 + 9
    for name, values in heads.items():
        n = values.numel()
        std = values.std().item()
        assert abs(values.mean().item()) < 5 * 0.1 / math.sqrt(n), name
        assert abs(std - 0.1) < 5 * 0.1 / math.sqrt(2 * (n - 1)), f"{name} noise std {std:.5f}, expected 0.1"
    # another noise_std scales it; eval mode adds nothing
    layer.noise_std = 0.25
    assert abs((gate_logits(layer.train(), x) - clean).std().item() - 0.25) < 0.25 * 5 / math.sqrt(2 * noise.numel())
    assert torch.equal(gate_logits(layer.eval(), x), clean)


def test_ema_after_k_updates_equals_its_recurrence_by_hand():
    """average_0 = w_0; after update t (from 0): decay_t = min(mu, (1 + t) / (10 + t)),
    average = decay_t average + (1 - decay_t) w_t, for parameters and floating buffers alike."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    mu = 0.3  # above the warmup's 1/10, 2/11, 3/12 at the first steps, below it from step 4 on
    ema = EMA(model, mu)
    expected = {name: value.clone() for name, value in model.state_dict().items()}
    for t in range(6):
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param))
        model.train()(torch.randn(4, 3))  # moves the BatchNorm's running statistics
        ema.update(model)
        decay = min(mu, (1.0 + t) / (10.0 + t))
        for name, value in model.state_dict().items():
            if value.dtype.is_floating_point:
                expected[name] = decay * expected[name] + (1.0 - decay) * value
            else:
                expected[name] = value.clone()
    for name, value in ema.module.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=1e-6, atol=1e-7, msg=name)


def warmup_then(after):
    """lr of epoch e: base (e + 1) / w during warmup, then ``after(e)``."""
    def at(base, warmup, epoch):
        return base * (epoch + 1) / warmup if epoch < warmup else after(base, warmup, epoch)
    return at


SCHEDULE_FORMULAS = {
    "step": lambda epochs, end: warmup_then(lambda b, w, e: b * 0.1 ** ((e >= 30) + (e >= 60) + (e >= 80))),
    "linear": lambda epochs, end: warmup_then(lambda b, w, e: end + (b - end) * (1 - (e - w) / (epochs - w))),
    "cosine": lambda epochs, end: warmup_then(
        lambda b, w, e: end + (b - end) * (1 + math.cos(math.pi * (e - w) / (epochs - w))) / 2),
}


@pytest.mark.parametrize("end_lr", [0.0, 0.01])
@pytest.mark.parametrize("name", list(SCHEDULE_FORMULAS))
def test_lr_at_every_epoch_with_two_warmup_epochs_equals_the_formula(name, end_lr):
    epochs = 90 if name == "step" else 12
    if name == "step":
        end_lr = 0.0  # the step schedule has no end lr
    schedule = lr_schedule(name, 0.4, warmup=2, epochs=epochs, end_lr=end_lr)
    formula = SCHEDULE_FORMULAS[name](epochs, end_lr)
    for epoch in range(epochs):
        assert schedule(epoch) == pytest.approx(formula(0.4, 2, epoch), rel=1e-12, abs=1e-15), epoch
    # the warmup is really there: half the lr at the first epoch, the full lr at the second
    assert schedule(0) == pytest.approx(0.2) and schedule(1) == pytest.approx(0.4)


def test_training_batches_per_rank_follow_the_padded_shards(tmp_path):
    """Full batches per rank = those of a shard padded to ceil(N / world), as torch's DistributedSampler pads it; with
    15 images on 2 ranks (shards of 8 and 7) and batch 4 every rank runs 2 full batches."""
    from torch.utils.data import DistributedSampler

    for samples in range(1, 41):
        for world in range(1, 5):
            padded = len(DistributedSampler(range(samples), num_replicas=world, rank=0, shuffle=False))
            for batch in range(1, 6):
                assert train_batches_per_rank(samples, batch, world) == padded // batch, (samples, batch, world)
    make_dataset(tmp_path, {"a": 8, "b": 7}, {"a": 1, "b": 1}, size_range=(36, 40))
    for rank in range(2):
        train = get_loaders(LoaderOptions("pytorch", str(tmp_path), 4, workers=0, image_size=32, device="cpu",
                                          rank=rank, world_size=2, val=False)).train
        assert len(train) == 2 and [len(labels) for _, labels in train] == [4, 4]
