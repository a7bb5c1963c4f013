"""The training engine's typed interface: what a run is told (:class:`RunConfig`) and what it gives back
(:class:`RunResult`). ``image_classification.run(config)`` (:func:`image_classification.runner.run`) runs it.

A RunConfig holds main.py's settings, one field per flag (the flag's ``dest``: ``--batch-size`` is
``batch_size``), with main.py's meaning; main.py's parser is where the flags, their defaults and their valid values
live, so a RunConfig is made from parsed arguments: :meth:`RunConfig.from_args` (main.py's and launch.py's), or
``main.run_config(argv, **settings)`` in code (main.py's defaults, ``settings`` over them, ``argv``'s flags over
both). Torch-free, so that main.py builds one without importing the engine.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Optional


@dataclass
class RunConfig:
    """main.py's settings for one run; see ``python main.py --help`` for each (field = the flag's dest)."""

    # data
    data: Optional[str]
    data_backend: str
    workers: int
    prefetch: int
    image_size: Optional[int]  # None: the checkpoint's (evaluating or resuming), else the architecture's (224; b4 380)
    interpolation: Optional[str]  # None: the checkpoint's (evaluating or resuming), else bilinear
    augmentation: Optional[str]
    crop_area_min: float
    verify_data: bool
    num_classes: Optional[int]  # None: the data's class folders (1000 for synthetic data)
    # model
    arch: str
    dynamic: bool
    model_config: Optional[str]
    wmul: float
    zero_init_last_bn: bool
    pedconv_method: str
    pretrained_weights: Optional[str]
    memory_format: str
    conv_init: Optional[str]
    pretrained: bool
    trt: Optional[str]
    fused_se: Optional[str]
    # optimization
    epochs: int
    run_epochs: int
    batch_size: int
    optimizer_batch_size: int
    optimizer: str
    lr: float
    lr_schedule: str
    end_lr: float
    warmup: int
    momentum: float
    weight_decay: float
    bn_weight_decay: bool
    nesterov: bool
    rmsprop_alpha: float
    rmsprop_eps: float
    label_smoothing: float
    mixup: float
    infomax_weight: float
    use_ema: Optional[float]
    # run
    amp: bool
    static_loss_scale: float
    dynamic_loss_scale: bool
    tf32: bool
    optimizer_impl: str
    device: str
    seed: Optional[int]
    deterministic: bool
    prof: int
    evaluate: bool
    training_only: bool
    resume: Optional[str]
    workspace: str
    overwrite: bool
    raport_file: Optional[str]  # the report's name in the workspace; empty or None: no report
    checkpoint_filename: str
    save_checkpoints: bool
    gather_checkpoints: int
    print_freq: int
    topk: int
    early_stopping_patience: int
    gpu_affinity: str
    jit: str
    compile: bool
    local_rank: Optional[int]
    # set by main.py / launch.py, not flags
    demo: bool = False  # the CPU demo (main.py without a data folder): the data are made first
    replace_demo: bool = False  # the demo's own workspace: a re-run replaces the previous demo
    recipe: Optional[str] = None  # launch.py's recipe, named in the report

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "RunConfig":
        """The config of parsed arguments (main.py's ``parse_args``, launch.py's ``build_args``); a TypeError names
        an attribute that is not a field, or a field the arguments lack."""
        return cls(**vars(args))

    def parameters(self) -> dict:
        """The settings as the report's PARAMETER line records them (``recipe`` only for launch.py's runs)."""
        values = dataclasses.asdict(self)
        if values["recipe"] is None:
            del values["recipe"]
        return values


@dataclass(frozen=True)
class RunResult:
    """What a run gives back. ``epochs`` and ``summary`` are the report's epoch lines and run summary, as written to
    it (NaN and infinities as None), also when there is no report (``raport_file`` empty, or a rank but the first)."""

    status: int  # the exit status: 0 finished (or evaluated); 128 + the signal for a run stopped by one
    best_top1: Optional[float]  # best validation top-1 (%) so far, a resumed checkpoint's included; the evaluation's
    epochs: Dict[int, dict]  # epoch index -> that epoch's metrics (train.*, val.*, val_ema.*), this run's epochs
    summary: dict  # the run summary (step []): best top-1, lowest losses, mean throughput...; {} for a stopped run
    throughput: Optional[float]  # images/s: the summary's mean train.total_ips (val.total_ips for --evaluate)
    report: Optional[str]  # the DLLogger JSON report (None: none written)
    checkpoints: List[str]  # the run's checkpoints in its workspace (rank 0; [] without checkpoints)
    workspace: str
    config: RunConfig  # the settings as run: the checkpoint's architecture, the chosen image size, the cores...
