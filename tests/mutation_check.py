"""Mutation check of the test suite: plant single-line bugs one at a time and see whether the tests catch them.

    python tests/mutation_check.py                 # every mutant, in sequence
    python tests/mutation_check.py --list          # the mutants and the tests each one runs
    python tests/mutation_check.py -k noise -k ema # the mutants whose id contains one of these
    python tests/mutation_check.py --no-baseline   # skip the first run of the tests on the unchanged code

Each mutant replaces one line's text in one file of a temporary copy of the repository (the working tree as it
is, uncommitted changes included; .git, virtual environments, logs and caches left out), runs the test files (and
``-k`` selections) listed for it with ``python -m pytest -x -q`` in that copy, and restores the file. A mutant is
caught when the tests fail. It prints one line per mutant and ``caught N/M`` at the end; the exit status is 0 only
when every mutant is caught. A mutant whose original text is not found exactly once in its file is reported as
stale (the list must follow the code) and counts as not caught.

Not part of CI: on 2 shared cores the whole list takes 11-20 minutes. Run it before resolving an issue that
touches the operator, the data loading, the engine or the tools, and add a mutant for each bug class a change could
bring. The tests run with OMP_NUM_THREADS=1 unless the environment sets it.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
IGNORED = shutil.ignore_patterns(".git", ".venv", "venv", "logs", "__pycache__", ".pytest_cache", "*.pyc", "*.egg-info",
                                 "build", "dist")


@dataclass(frozen=True)
class Mutant:
    id: str
    path: str  # relative to the repository root
    original: str  # text that occurs exactly once in the file, within one line
    mutated: str
    tests: Tuple[str, ...]  # pytest arguments: files, node ids, "-k" expressions
    why: str = ""


def tests(*args: str) -> Tuple[str, ...]:
    return tuple(args)


REFERENCE = tests("tests/test_release_reference.py")
CLOSED_FORM = "tests/test_closed_form.py"
SETTINGS = "tests/test_settings_reach_training.py"

MUTANTS: List[Mutant] = [
    # ---- operator: gates, noise, info-max
    Mutant("gates-swapped", "pedconv/conv.py",
           "logit_in, logit_out, logit_tap = torch.split(", "logit_out, logit_in, logit_tap = torch.split(",
           REFERENCE, "input and output gates swapped in the gate generator"),
    Mutant("noise-twice-as-large", "pedconv/conv.py",
           "logits = logits + noise_std * standard_normal_like(logits)",
           "logits = logits + 2 * noise_std * standard_normal_like(logits)",
           tests(*REFERENCE, CLOSED_FORM), "training noise of the wrong size"),
    Mutant("noise-default-std", "pedconv/conv.py",
           "noise_std: float = 0.1,", "noise_std: float = 0.01,",
           tests(*REFERENCE, CLOSED_FORM), "default noise std not the release's 0.1"),
    Mutant("noise-in-eval", "pedconv/conv.py",
           "x, self.noise_std if self.training else 0.0, self.training and self.info_max,",
           "x, self.noise_std, self.training and self.info_max,",
           REFERENCE, "noise also in eval mode"),
    Mutant("info-max-target-not-detached", "pedconv/conv.py",
           "F.mse_loss(reconstructed.float(), pooled.detach().float())",
           "F.mse_loss(reconstructed.float(), pooled.float())",
           REFERENCE, "the info-max loss trains the pooled input"),
    Mutant("info-max-summed-not-averaged", "pedconv/conv.py",
           "F.mse_loss(reconstructed.float(), pooled.detach().float())",
           "F.mse_loss(reconstructed.float(), pooled.detach().float(), reduction='sum')",
           REFERENCE, "info-max loss not the mean over (B, Cin)"),
    Mutant("info-max-mean-over-layers", "pedconv/regularizer.py",
           "return torch.stack([loss.float() for loss in losses]).sum()",
           "return torch.stack([loss.float() for loss in losses]).mean()",
           tests(*REFERENCE, SETTINGS), "info-max loss averaged instead of summed over the layers"),
    # ---- operator: every forward path
    Mutant("reference-kernel-transposed", "pedconv/paths/reference.py",
           'return torch.einsum("bro,bri,brp->boip", gate_out, gate_in, gate_tap)',
           'return torch.einsum("bro,bri,brp->biop", gate_out, gate_in, gate_tap)',
           REFERENCE, "reference/grouped path: per-sample kernel with output and input axes swapped"),
    Mutant("grouped-weight-grad-unmodulated", "pedconv/paths/grouped.py",
           "grad_weight = grad_kernels.mul_(mod).sum(0)", "grad_weight = grad_kernels.sum(0)",
           REFERENCE, "grouped path: weight gradient without the modulation"),
    Mutant("per-sample-input-grad-first-kernel", "pedconv/paths/grouped.py",
           "grad_out[sample : sample + 1], kernels[sample], None,", "grad_out[sample : sample + 1], kernels[0], None,",
           tests("tests/test_pedconv.py", "-k", "per-sample-input-grad"),
           "grouped:per-sample-input-grad: every sample's input gradient through the first sample's kernel"),
    Mutant("unfold-output-gate-dropped", "pedconv/paths/unfold.py",
           "torch.mul(raw_nchw, gate_out.view(batch, out_channels, 1, 1), out=out)",
           "out.copy_(raw_nchw)",
           REFERENCE, "unfold path: output gate forgotten"),
    Mutant("unfold-input-gate-grad-without-taps", "pedconv/paths/unfold.py",
           "grad_gate_in = (grad_scale * gate_tap.view(batch, kh, kw, 1)).sum((1, 2))",
           "grad_gate_in = grad_scale.sum((1, 2))",
           REFERENCE, "unfold path: input-gate gradient misses the tap gates"),
    Mutant("taps-transposed", "pedconv/paths/taps.py",
           "term = term * gate_tap[:, r, row * kw + col, None, None, None]",
           "term = term * gate_tap[:, r, col * kh + row, None, None, None]",
           REFERENCE, "taps path: tap gates applied transposed"),
    Mutant("pointwise-tap-gate-dropped", "pedconv/functional.py",
           "out_scale = gate_out * gate_tap", "out_scale = gate_out",
           REFERENCE, "1x1 paths: the scalar tap gate forgotten"),
    Mutant("default-image-size-always-224", "image_classification/models.py",
           "return efficientnet.VARIANTS[arch].image_size", "return 224",
           tests("tests/test_efficientnet.py", "-k", "default_image_size"),
           "a run without --image-size ignores the architecture's crop size (efficientnet-b4: 380)"),
    # ---- data: sharding, labels, crops
    Mutant("shards-overlap", "dataloading/common.py",
           "return range(num_samples * rank // world_size, num_samples * (rank + 1) // world_size)",
           "return range(num_samples * rank // world_size, "
           "min(num_samples, num_samples * (rank + 1) // world_size + 1))",
           tests("tests/test_dataloading_common.py", "tests/test_dataloading_contract.py", "-k", "rank or plan"),
           "neighbouring ranks' validation shards overlap by one image"),
    Mutant("train-sampler-rank-ignored", "dataloading/pytorch.py",
           "self.sampler = DistributedSampler(self.dataset, num_replicas=world_size, rank=rank,",
           "self.sampler = DistributedSampler(self.dataset, num_replicas=world_size, rank=0,",
           tests("tests/test_dataloading_contract.py", "-k", "two_ranks and pytorch"),
           "every rank trains on rank 0's shard"),
    Mutant("labels-reversed", "dataloading/common.py",
           "for class_index, name in enumerate(classes):",
           "for class_index, name in enumerate(sorted(classes, reverse=True)):",
           tests("tests/test_dataloading_contract.py", "tests/test_dataloading_common.py", "-k", "labels or listing"),
           "labels not in ImageFolder's (sorted) class order"),
    Mutant("val-resize-without-padding", "dataloading/pytorch.py",
           "transforms.Resize(image_size + CROP_PADDING, interpolation=PIL_INTERPOLATION[interpolation]),",
           "transforms.Resize(image_size, interpolation=PIL_INTERPOLATION[interpolation]),",
           tests("tests/test_dataloading_contract.py", "tests/test_dataloading_dali.py", "-k", "validation"),
           "validation resize to the crop size (no +32 margin)"),
    Mutant("train-crop-area-ignored", "dataloading/pytorch.py",
           "transforms.RandomResizedCrop(image_size, scale=crop_area, ratio=RANDOM_ASPECT_RATIO,",
           "transforms.RandomResizedCrop(image_size, scale=RANDOM_AREA, ratio=RANDOM_ASPECT_RATIO,",
           tests("tests/test_dataloading_common.py", "-k", "crop_area"), "--crop-area-min not reaching the crop"),
    Mutant("crop-area-min-not-reaching-training", "image_classification/runner.py",
           "interpolation=args.interpolation, augmentation=args.augmentation, crop_area=(args.crop_area_min, 1.0),",
           "interpolation=args.interpolation, augmentation=args.augmentation, crop_area=(0.08, 1.0),",
           tests(SETTINGS), "--crop-area-min ignored by main.py"),
    Mutant("dali-centre-crop-rounding", "dataloading/dali.py",
           "start = half + (margin & 1) * (half & 1)", "start = half",
           tests("tests/test_dataloading_dali.py", "-k", "validation_images_agree"),
           "DALI's validation crop a pixel off torchvision's for odd margins"),
    Mutant("uneven-shards-step-counts", "dataloading/common.py",
           "return math.ceil(num_samples / world_size) // batch_size",
           "return num_samples // world_size // batch_size",
           tests("tests/test_dataloading_contract.py", CLOSED_FORM,
                 "-k", "rank or drops or shards"), "training batches per rank counted from the short shard"),
    # ---- engine: loss terms
    Mutant("smoothing-over-wrong-classes", "image_classification/losses.py",
           "target = torch.full((labels.shape[0], num_classes), smoothing / num_classes, device=labels.device)",
           "target = torch.full((labels.shape[0], num_classes), smoothing / (num_classes - 1), device=labels.device)",
           tests(CLOSED_FORM, SETTINGS), "label smoothing spread over the other classes only (mixup targets)"),
    Mutant("smoothing-loss-sum", "image_classification/losses.py",
           "return ((1.0 - self.smoothing) * nll - self.smoothing * log_probs.mean(dim=-1)).mean()",
           "return ((1.0 - self.smoothing) * nll - self.smoothing * log_probs.sum(dim=-1)).mean()",
           tests(CLOSED_FORM, SETTINGS), "smoothing term summed over classes instead of averaged"),
    Mutant("label-smoothing-not-reaching-training", "image_classification/runner.py",
           "trainer = Trainer(wrapped, SoftTargetCrossEntropy(args.label_smoothing), optimizer,",
           "trainer = Trainer(wrapped, SoftTargetCrossEntropy(0.0), optimizer,",
           tests(SETTINGS), "--label-smoothing ignored"),
    Mutant("mixup-target-lambda-flipped", "image_classification/losses.py",
           "return mixed, torch.lerp(target[perm], target, lam)",
           "return mixed, torch.lerp(target, target[perm], lam)",
           tests(CLOSED_FORM, SETTINGS), "mixed targets weighted the wrong way round"),
    Mutant("infomax-weight-ignored", "image_classification/runner.py",
           "accumulation=accumulation, infomax_weight=args.infomax_weight if args.dynamic else 0.0,",
           "accumulation=accumulation, infomax_weight=0.001 if args.dynamic else 0.0,",
           tests(SETTINGS), "--infomax-weight ignored"),
    Mutant("mixup-beta-asymmetric", "image_classification/losses.py",
           "lam = torch.distributions.Beta(concentration, concentration, validate_args=False).sample()",
           "lam = torch.distributions.Beta(concentration, torch.ones_like(concentration), validate_args=False).sample()",
           tests(CLOSED_FORM), "mixup lambda not from Beta(alpha, alpha)"),
    # ---- engine: schedules, optimizer, accumulation, EMA
    Mutant("lr-scaled-by-accumulation", "image_classification/training.py",
           "set_lr(self.optimizer, lr)", "set_lr(self.optimizer, lr * self.accumulation)",
           tests(SETTINGS), "--lr taken per process batch and scaled up for the optimizer batch"),
    Mutant("warmup-not-reaching-training", "image_classification/runner.py",
           "schedule = lr_schedule(args.lr_schedule, args.lr, args.warmup, args.epochs, args.end_lr)",
           "schedule = lr_schedule(args.lr_schedule, args.lr, 0, args.epochs, args.end_lr)",
           tests(SETTINGS, "tests/test_engine.py", "-k", "settings or short_run"), "--warmup ignored"),
    Mutant("warmup-off-by-one", "image_classification/optim.py",
           "return base_lr * (epoch + 1) / warmup", "return base_lr * epoch / warmup",
           tests(CLOSED_FORM), "warmup starts from lr 0"),
    Mutant("cosine-ignores-warmup", "image_classification/optim.py",
           "progress = (epoch - warmup) / max(epochs - warmup, 1)", "progress = epoch / max(epochs, 1)",
           tests(CLOSED_FORM), "cosine/linear decay over all epochs, not after the warmup"),
    Mutant("step-milestones-shifted", "image_classification/optim.py",
           "return base_lr * 0.1 ** sum(epoch >= milestone for milestone in (30, 60, 80))",
           "return base_lr * 0.1 ** sum(epoch > milestone for milestone in (30, 60, 80))",
           tests(CLOSED_FORM), "step schedule decays an epoch late"),
    Mutant("biases-decay", "image_classification/optim.py",
           'if (is_norm or name == "bias" or param.dim() <= 1) and not bn_weight_decay:',
           "if is_norm and not bn_weight_decay:",
           tests(SETTINGS), "weight decay on biases"),
    Mutant("bn-weight-decay-ignored", "image_classification/runner.py",
           "args.bn_weight_decay, args.rmsprop_alpha, args.rmsprop_eps,",
           "False, args.rmsprop_alpha, args.rmsprop_eps,",
           tests(SETTINGS), "--bn-weight-decay ignored"),
    Mutant("accumulated-gradient-not-averaged", "image_classification/training.py",
           "self.precision.scaler.scale(loss / self.accumulation).backward()",
           "self.precision.scaler.scale(loss).backward()",
           tests(SETTINGS), "accumulated gradients summed, not averaged (lr effectively x accumulation)"),
    Mutant("step-every-iteration", "image_classification/training.py",
           "last_of_group = iteration % self.accumulation == 0 or iteration == steps",
           "last_of_group = True",
           tests(SETTINGS), "--optimizer-batch-size: the optimizer steps every iteration"),
    Mutant("ema-without-warmup", "image_classification/ema.py",
           "decay = min(self.decay, (1.0 + self.step) / (10.0 + self.step))", "decay = self.decay",
           tests(CLOSED_FORM, SETTINGS), "EMA decay without its warmup"),
    Mutant("ema-weights-swapped", "image_classification/ema.py",
           "torch._foreach_lerp_(averages, values, 1.0 - decay)",
           "torch._foreach_lerp_(averages, values, decay)",
           tests(CLOSED_FORM, SETTINGS), "EMA keeps 1 - decay of the average"),
    # ---- engine: checkpoint contents
    Mutant("checkpoint-ema-is-the-model", "image_classification/checkpoints.py",
           '"state_dict_ema": strip_prefixes(unwrap(ema_model).state_dict()) if ema_model is not None else None,',
           '"state_dict_ema": strip_prefixes(inner.state_dict()) if ema_model is not None else None,',
           tests(SETTINGS), "the checkpoint stores the model's weights as the EMA's"),
    Mutant("checkpoint-epoch-off-by-one", "image_classification/runner.py",
           "_save(session, epoch + 1, is_best)",
           "_save(session, epoch, is_best)",
           tests("tests/test_engine.py", "-k", "short_run or resume_after"), "checkpoint names the epoch before"),
    Mutant("checkpoint-without-rng", "image_classification/checkpoints.py",
           '"rng": rng,', '"rng": None,',
           tests("tests/test_engine.py", "-k", "resume_after"), "a resumed run draws other mixup lambdas and noise"),
    Mutant("ema-step-not-restored", "image_classification/runner.py",
           "ema.step = start_epoch * max(len(loaders.train) // accumulation, 1) if loaders.train else 0",
           "ema.step = 0",
           tests("tests/test_engine.py", "-k", "resume_after"), "a resumed EMA restarts its warmup"),
    # ---- evaluation and tools
    Mutant("val-loss-mean-of-batch-means", "image_classification/training.py",
           'cross_entropy = nn.functional.cross_entropy(logits.float(), labels, reduction="sum")',
           'cross_entropy = nn.functional.cross_entropy(logits.float(), labels, reduction="mean")',
           tests("tests/test_engine.py", "-k", "release_format"), "validation loss not averaged per image"),
    Mutant("top5-is-top1", "image_classification/training.py",
           "return [hits[:, : min(k, maxk)].any(dim=1).sum() for k in topk]",
           "return [hits[:, :1].any(dim=1).sum() for k in topk]",
           tests("tests/test_engine.py", "-k", "release_format"), "top-5 counts only the first guess"),
    Mutant("export-ema-gives-the-model", "image_classification/checkpoints.py",
           "        state = checkpoint.state_dict_ema", "        state = checkpoint.state_dict",
           tests("tests/test_tools.py", "-k", "checkpoint2model"), "checkpoint2model --ema exports the plain weights"),
    Mutant("classify-softmax-over-the-batch", "classify.py",
           "probabilities = torch.softmax(logits.float(), dim=1)",
           "probabilities = torch.softmax(logits.float(), dim=0)",
           tests("tests/test_tools.py", "-k", "classify_top5"), "classify.py normalizes over the batch"),
    Mutant("compiled-info-max-gradient-halved", "pedconv/conv.py",
           "grad_rec = (grad_loss * 2 / reconstructed.numel())", "grad_rec = (grad_loss / reconstructed.numel())",
           tests("tests/test_autotune.py", "-k", "compiled_model_equals"),
           "compiled gate generator: the info-max loss's gradient is half the true one"),
    Mutant("compiled-gates-without-sigmoid-derivative", "pedconv/conv.py",
           "grad_logits = grad_gates * sigmoids * (1 - sigmoids)", "grad_logits = grad_gates * sigmoids",
           tests("tests/test_autotune.py", "-k", "compiled_model_equals"),
           "compiled gate generator: the gates' gradient misses the sigmoid's derivative"),
    Mutant("compile-keeps-layout-optimization", "pedconv/compiling.py",
           '        return {"layout_optimization": False}', "        return {}",
           tests("tests/test_autotune.py::test_inductor_options_turn_layout_optimization_off_for_pedconv_models_only",
                 "tests/test_dle.py::test_compile_wraps_the_training_model"),
           "PEDConv models compile with Inductor's layout optimization (a conversion around every layer)"),
    # ---- measured path choice
    Mutant("autotune-prunes-close-candidates", "pedconv/autotune.py",
           "                if elapsed > limit:", "                if elapsed > limit / SECOND_ROUND_FACTOR:",
           tests("tests/test_autotune.py", "-k", "hopeless"), "a candidate close to the best stops after its forward"),
    Mutant("autotune-large-per-sample-matrices", "pedconv/functional.py",
           "in_channels <= out_pixels", "in_channels >= out_pixels",
           tests("tests/test_autotune.py", "-k", "candidate_sets"),
           "training measures per-sample 1x1 matrices that would take the model past static memory"),
    Mutant("onednn-candidate-any-dtype", "pedconv/functional.py",
           "if onednn_matmul_available(device_type, dtype):",
           "if onednn_matmul_available(device_type, torch.float32):",
           tests("tests/test_autotune.py", "-k", "candidate_sets"),
           "oneDNN's matrix product measured for dtypes it cannot take (float64)"),
    Mutant("onednn-forward-product-not-written", "pedconv/paths/unfold.py",
           "return out.copy_(_onednn_matmul(rows, weight))", "return _onednn_matmul(rows, weight)",
           tests("tests/test_pedconv.py", "-k", "onednn"),
           "unfold:onednn-matmul: the forward product computed but not written into the output rows"),
    Mutant("autotune-keeps-the-slowest", "pedconv/autotune.py",
           "return Decision(min(times, key=times.get)", "return Decision(max(times, key=times.get)",
           tests("tests/test_autotune.py", "-k", "once_per_key"), "the slowest candidate is kept"),
]


@dataclass
class Outcome:
    mutant: Mutant
    status: str  # caught, survived, stale, timeout
    seconds: float
    detail: str = ""


def apply(copy_root: Path, mutant: Mutant) -> Optional[str]:
    """Mutate the copy's file in place; returns its original text, or None when the mutant is stale."""
    path = copy_root / mutant.path
    if not path.is_file():
        return None
    text = path.read_text()
    if text.count(mutant.original) != 1 or "\n" in mutant.original or "\n" in mutant.mutated:
        return None
    path.write_text(text.replace(mutant.original, mutant.mutated))
    return text


def run_tests(copy_root: Path, args, timeout: float) -> Tuple[Optional[int], str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.pop("PYTHONPATH", None)
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *args]
    try:
        result = subprocess.run(command, cwd=copy_root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, "timeout"
    lines = (result.stdout + result.stderr).strip().splitlines()
    return result.returncode, lines[-1] if lines else ""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", dest="select", action="append", default=[], help="mutants whose id contains this")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--no-baseline", action="store_true", help="do not first run the tests on the unchanged copy")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per test run (a timeout counts as caught)")
    args = parser.parse_args(argv)
    mutants = [m for m in MUTANTS if not args.select or any(s in m.id for s in args.select)]
    if args.list:
        for m in mutants:
            print(f"{m.id:40s} {m.path}: {m.why}\n{'':40s} pytest {' '.join(m.tests)}")
        print(f"{len(mutants)} mutants")
        return 0
    if not mutants:
        print("no mutant selected", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="pedconv-mutants-") as temporary:
        copy_root = Path(temporary) / "repo"
        shutil.copytree(ROOT, copy_root, ignore=IGNORED, symlinks=True)
        if not args.no_baseline:
            for test_args in sorted({m.tests for m in mutants}):
                code, last = run_tests(copy_root, test_args, args.timeout)
                if code != 0:
                    print(f"baseline: the unchanged code fails `pytest {' '.join(test_args)}`: {last}", file=sys.stderr)
                    return 2
            print(f"baseline: the {len({m.tests for m in mutants})} test selections pass on the unchanged code")
        outcomes = []
        for mutant in mutants:
            start = time.monotonic()
            original = apply(copy_root, mutant)
            if original is None:
                outcome = Outcome(mutant, "stale", 0.0, "original text not found exactly once")
            else:
                try:
                    code, last = run_tests(copy_root, mutant.tests, args.timeout)
                finally:
                    (copy_root / mutant.path).write_text(original)
                if code is None:
                    outcome = Outcome(mutant, "timeout", time.monotonic() - start, last)
                elif code in (1, 2, 3):  # test failures, collection errors or internal errors: the bug shows
                    outcome = Outcome(mutant, "caught", time.monotonic() - start, last)
                else:  # 0: passed; 5: nothing selected
                    outcome = Outcome(mutant, "survived", time.monotonic() - start, last)
            outcomes.append(outcome)
            print(f"{outcome.status:8s} {mutant.id:40s} {outcome.seconds:6.1f} s  {outcome.detail}", flush=True)
    caught = sum(o.status in ("caught", "timeout") for o in outcomes)
    print(f"caught {caught}/{len(outcomes)}")
    for outcome in outcomes:
        if outcome.status not in ("caught", "timeout"):
            print(f"  {outcome.status}: {outcome.mutant.id} ({outcome.mutant.path}: {outcome.mutant.why})")
    return 0 if caught == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
