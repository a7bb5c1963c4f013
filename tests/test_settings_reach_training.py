"""Settings reach training: main.main(argv) (the CLI parser, the runner, the trainer: main.py's own code path) runs
a few optimizer steps of a narrow PEDConv ResNet-18, watched from outside, and what it did is checked against the
settings computed independently here:

- the training loss in the report equals the cross-entropy against (1 - s) one_hot + s / C targets (the labels read
  from the images' colours, mixed with the lambda and partners read from the mixed images) plus
  --infomax-weight x the info-max loss (0 included);
- every optimizer step uses the lr of its epoch (--lr, --warmup, --lr-schedule), steps once per
  --optimizer-batch-size images with the mean gradient of those images, and applies --wd to exactly the parameters
  it should (BatchNorm parameters and biases only with --bn-weight-decay);
- the EMA weights in the checkpoint equal the recurrence of --use-ema over the weights after each step.

Assumptions about the engine (everything else is observed through torch's global hooks):
- the report is a DLLogger file ("DLLL {json}" lines) somewhere under --workspace; each training iteration has one
  LOG line whose step is a list of two numbers and whose data has "train.loss" (and "train.lr"), in the order of the
  iterations, when -p 1 is given; epochs may be numbered from 0 or 1 (not read);
- the model is image_classification.models.ResNet, called once per training iteration on the (mixed) images;
- mixup is image_classification.losses.Mixup, called with (images, labels) before the forward;
- the pytorch data backend builds its training transform with dataloading.pytorch.train_transform, whose
  RandomResizedCrop gets the crop area (checked for --crop-area-min);
- optimizer steps go through torch.optim.Optimizer.step (global step hooks see them);
- the checkpoint named by --checkpoint-filename in --workspace is read by checkpoints.load_checkpoint, whose
  state_dict_ema holds the EMA weights.
"""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torchvision.transforms import RandomResizedCrop

import dataloading.pytorch
import main as cli
import pedconv
from image_classification import checkpoints, losses
from image_classification.models import ResNet
from tests.data_utils import dominant_channel, make_dataset

CLASSES = 3  # red, green, blue: the label of an image is its dominant colour channel
BATCH = 6
TRAIN_IMAGES = 12  # two iterations per epoch
BASE_LR = 0.05


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("colours"), {"a": 4, "b": 4, "c": 4}, {"a": 1, "b": 1, "c": 1},
                        size_range=(36, 44))


class Observer:
    """Records, through torch's global hooks, every training forward of the ResNet, every mixup call and every
    optimizer step."""

    def __init__(self, monkeypatch):
        self.forwards, self.mixups, self.steps = [], [], []
        self.model, self.initial_state = None, None
        self._handles = []
        original_mixup = losses.Mixup.__call__

        def observed_mixup(mixup, images, labels):
            mixed, target = original_mixup(mixup, images, labels)
            self.mixups.append((images.detach().clone(), labels.clone()))
            return mixed, target

        monkeypatch.setattr(losses.Mixup, "__call__", observed_mixup)
        self.crop_scales = []
        original_transform = dataloading.pytorch.train_transform

        def observed_transform(*args, **kwargs):
            transform = original_transform(*args, **kwargs)
            self.crop_scales += [t.scale for t in transform.transforms if isinstance(t, RandomResizedCrop)]
            return transform

        monkeypatch.setattr(dataloading.pytorch, "train_transform", observed_transform)

    def __enter__(self):
        modules = torch.nn.modules.module
        self._handles = [modules.register_module_forward_pre_hook(self._before_forward),
                         modules.register_module_forward_hook(self._after_forward),
                         register_optimizer_step_pre_hook(self._before_step),
                         register_optimizer_step_post_hook(self._after_step)]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()

    def _before_forward(self, module, args):
        if isinstance(module, ResNet) and module.training and self.initial_state is None:
            self.model = module
            self.initial_state = {k: v.detach().clone() for k, v in module.state_dict().items()}

    def _after_forward(self, module, args, output):
        if isinstance(module, ResNet) and module.training:
            self.forwards.append({"images": args[0].detach().float().clone(), "logits": output.detach().float().clone(),
                                  "infomax": pedconv.info_max_loss(module).item()})

    def _before_step(self, optimizer, args, kwargs):
        self.steps.append({
            "groups": [(group["lr"], group["weight_decay"], [id(p) for p in group["params"]])
                       for group in optimizer.param_groups],
            "grads": {id(p): p.grad.detach().clone() for g in optimizer.param_groups for p in g["params"]
                      if p.grad is not None},
            "before": {id(p): p.detach().clone() for g in optimizer.param_groups for p in g["params"]},
        })

    def _after_step(self, optimizer, args, kwargs):
        self.steps[-1]["after"] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}


def iteration_entries(workspace: Path) -> list:
    """The report's per-iteration training lines, in file order."""
    entries = []
    for path in sorted(workspace.rglob("*")):
        if not path.is_file() or path.suffix in (".tar", ".pth"):
            continue
        for line in path.read_text(errors="replace").splitlines():
            if not line.startswith("DLLL "):
                continue
            try:
                entry = json.loads(line[len("DLLL "):])
            except ValueError:
                continue
            step, data = entry.get("step"), entry.get("data")
            if (entry.get("type") == "LOG" and isinstance(step, list) and len(step) == 2 and isinstance(data, dict)
                    and "train.loss" in data):
                entries.append(data)
    return entries


def smoothed_targets(labels, smoothing):
    target = torch.full((len(labels), CLASSES), smoothing / CLASSES)
    target[torch.arange(len(labels)), labels] += 1.0 - smoothing
    return target


def recover_mixing(originals, mixed):
    """(lambda, partner of each sample) such that mixed[i] = lam originals[i] + (1 - lam) originals[partner[i]]."""
    flat_x, flat_m = originals.flatten(1).double(), mixed.flatten(1).double()
    lams, partners = [], []
    for i in range(len(flat_x)):
        if torch.allclose(flat_m[i], flat_x[i], atol=1e-5):
            partners.append(i)
            continue
        best = None
        for j in range(len(flat_x)):
            if j == i:
                continue
            direction = flat_x[i] - flat_x[j]
            lam = torch.dot(flat_m[i] - flat_x[j], direction) / torch.dot(direction, direction)
            residual = (flat_m[i] - flat_x[j] - lam * direction).abs().max().item()
            if best is None or residual < best[0]:
                best = (residual, j, lam.item())
        assert best[0] < 1e-4, f"sample {i} is no mix of two images (residual {best[0]:.3g})"
        partners.append(best[1])
        lams.append(best[2])
    assert lams, "mixup mixed nothing"
    assert max(lams) - min(lams) < 1e-5, f"one lambda per batch expected, got {lams}"
    return lams[0], partners


def expected_loss_and_bias_gradient(observer, index, smoothing, mixup, infomax_weight):
    """The criterion of forward ``index`` computed here, and its gradient with respect to fc.bias."""
    forward = observer.forwards[index]
    if mixup:
        originals, _ = observer.mixups[index]
        labels = dominant_channel(originals)
        lam, partners = recover_mixing(originals, forward["images"])
        base = smoothed_targets(labels, smoothing)
        target = lam * base + (1 - lam) * base[partners]
    else:
        target = smoothed_targets(dominant_channel(forward["images"]), smoothing)
    log_probs = forward["logits"].double().log_softmax(dim=1)
    cross_entropy = -(target.double() * log_probs).sum(dim=1).mean().item()
    bias_gradient = (log_probs.exp() - target.double()).mean(dim=0).float()
    return cross_entropy + infomax_weight * forward["infomax"], bias_gradient


def lr_formula(schedule, epoch, epochs, warmup):
    if epoch < warmup:
        return BASE_LR * (epoch + 1) / warmup
    progress = (epoch - warmup) / (epochs - warmup)
    return {"step": BASE_LR * 0.1 ** sum(epoch >= m for m in (30, 60, 80)),
            "linear": BASE_LR * (1 - progress),
            "cosine": BASE_LR * (1 + math.cos(math.pi * progress)) / 2}[schedule]


def decays(model: nn.Module, name: str, bn_weight_decay: bool) -> bool:
    """The weight-decay rule, by module type: BatchNorm parameters and biases only with --bn-weight-decay."""
    owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    return bn_weight_decay or not (isinstance(owner, nn.modules.batchnorm._BatchNorm) or name.endswith("bias"))


SETTINGS = {
    # name: (label smoothing, mixup, info-max weight, schedule, epochs, optimizer batch, wd, bn wd, EMA decay)
    "smoothing-mixup-infomax-cosine-accumulation-ema": (0.1, 0.4, 0.01, "cosine", 4, 12, 0.05, False, 0.15),
    "no-infomax-linear-bn-weight-decay": (0.0, 0.0, 0.0, "linear", 4, -1, 0.05, True, None),
    "smoothing-step-ema": (0.25, 0.0, 0.001, "step", 3, 6, 0.02, False, 0.5),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_settings_reach_the_loss_the_optimizer_and_the_ema(name, data_root, tmp_path, monkeypatch):
    smoothing, mixup, infomax_weight, schedule, epochs, optimizer_batch, wd, bn_wd, ema_decay = SETTINGS[name]
    workspace = tmp_path / "ws"
    argv = [str(data_root), "--data-backend", "pytorch", "--arch", "resnet18", "--dynamic", "--wmul", "0.125",
            "--image-size", "32", "-b", str(BATCH), "--lr", str(BASE_LR), "--mom", "0.9", "--device", "cpu", "-j", "0",
            "--seed", "5", "--workspace", str(workspace), "--raport-file", "raport.json", "-p", "1",
            "--training-only", "--checkpoint-filename", "checkpoint.pth.tar", "--epochs", str(epochs), "--warmup", "2",
            "--lr-schedule", schedule, "--label-smoothing", str(smoothing), "--mixup", str(mixup),
            "--infomax-weight", str(infomax_weight), "--wd", str(wd), "--optimizer-batch-size", str(optimizer_batch),
            "--crop-area-min", "0.35"]
    argv += ["--bn-weight-decay"] if bn_wd else []
    argv += ["--use-ema", str(ema_decay)] if ema_decay else []
    with Observer(monkeypatch) as observer:
        assert cli.main(argv) == 0
    assert observer.crop_scales == [(0.35, 1.0)]  # --crop-area-min reaches the training crops
    iterations = TRAIN_IMAGES // BATCH
    accumulation = max(optimizer_batch, BATCH) // BATCH
    assert len(observer.forwards) == epochs * iterations
    assert len(observer.mixups) == (len(observer.forwards) if mixup else 0)

    # the logged loss is the criterion, computed here
    logged = iteration_entries(workspace)
    assert len(logged) == len(observer.forwards)
    bias_gradients = []
    for index, entry in enumerate(logged):
        loss, bias_gradient = expected_loss_and_bias_gradient(observer, index, smoothing, mixup, infomax_weight)
        if infomax_weight:
            assert observer.forwards[index]["infomax"] > 1e-3  # so that the weight makes a difference
        else:
            assert observer.forwards[index]["infomax"] == 0.0  # a weight of 0 turns the info-max branch off
        assert entry["train.loss"] == pytest.approx(loss, rel=1e-5), f"iteration {index}"
        assert entry["train.lr"] == pytest.approx(lr_formula(schedule, index // iterations, epochs, 2), rel=1e-9)
        bias_gradients.append(bias_gradient)

    # one optimizer step per optimizer batch, with its mean gradient, at the lr of its epoch
    model = observer.model
    names = {id(p): name for name, p in model.named_parameters()}
    fc_bias = next(key for key, name in names.items() if name == "fc.bias")
    assert len(observer.steps) == len(observer.forwards) // accumulation
    for index, step in enumerate(observer.steps):
        epoch = index * accumulation // iterations
        assert [group[0] for group in step["groups"]] == pytest.approx(
            [lr_formula(schedule, epoch, epochs, 2)] * len(step["groups"]), rel=1e-9), f"lr at step {index}"
        expected = torch.stack(bias_gradients[index * accumulation:(index + 1) * accumulation]).mean(dim=0)
        torch.testing.assert_close(step["grads"][fc_bias], expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item(),
                                   msg=f"fc.bias gradient at step {index}")

    # weight decay lands on the right parameters, and the first step applies it: w - lr (g + wd w)
    first = observer.steps[0]
    decay_of = {pid: group_wd for _, group_wd, ids in first["groups"] for pid in ids}
    assert set(decay_of) == set(names)
    for pid, name in names.items():
        assert decay_of[pid] == (wd if decays(model, name, bn_wd) else 0.0), name
    lr = lr_formula(schedule, 0, epochs, 2)
    for name in ("fc.weight", "layer1.0.conv1.weight", "layer1.0.bn1.weight", "layer1.0.conv1.attn.fc_oup.bias"):
        pid = next(key for key, value in names.items() if value == name)
        before, grad = first["before"][pid], first["grads"][pid]
        expected_step = -lr * (grad + decay_of[pid] * before)
        torch.testing.assert_close(first["after"][name] - before, expected_step, rtol=1e-3,
                                   atol=1e-4 * expected_step.abs().max().item(), msg=name)

    # the EMA in the checkpoint is the recurrence over the weights after each step
    saved = checkpoints.load_checkpoint(workspace / "checkpoint.pth.tar")
    if ema_decay is None:
        assert not saved.state_dict_ema
        return
    average = {k: v.double() if v.is_floating_point() else v for k, v in observer.initial_state.items()}
    for t, step in enumerate(observer.steps):
        decay = min(ema_decay, (1 + t) / (10 + t))
        for key, value in step["after"].items():
            average[key] = decay * average[key] + (1 - decay) * value.double() if value.is_floating_point() else value
    for key, value in saved.state_dict_ema.items():
        torch.testing.assert_close(value.double(), average[key].double() if average[key].is_floating_point()
                                   else average[key].double(), rtol=1e-5, atol=1e-6, msg=key)
