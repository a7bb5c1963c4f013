"""The lists of valid values a user can name, each defined here once and checked at the edge (argparse ``choices``).

Torch-free on purpose: main.py, launch.py and the tools build their parsers from these lists without importing
torch, so ``--help`` and a usage error stay instant. The libraries use the same objects: ``dataloading`` (backends,
their aliases, memory formats, interpolations), ``image_classification.models`` (architectures) and
``image_classification.distributed.select_device`` (devices).

The operator library (``pedconv``) is independent of this project and keeps its own ``pedconv.METHODS`` and
``pedconv.PATHS``; :data:`PEDCONV_METHODS` spells them out for the parsers (importing ``pedconv`` imports torch),
and ``tests/test_choices.py`` asserts that the two agree.
"""

ARCHITECTURES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet50d", "resnext101-32x4d",
                 "se-resnext101-32x4d", "mobilenet_v2", "efficientnet-b0", "efficientnet-b4")

DATA_BACKENDS = ("pytorch", "dali-cpu", "dali-gpu", "synthetic")
# Spellings accepted for compatibility with older DLE command lines.
DATA_BACKEND_ALIASES = {"syntetic": "synthetic"}
SYNTHETIC_BACKENDS = ("synthetic", "syntetic")  # the backends that need no data folder

MEMORY_FORMATS = ("nchw", "nhwc")  # nhwc: channels_last
INTERPOLATIONS = ("bilinear", "bicubic", "triangular")
DEVICES = ("auto", "cpu", "cuda")  # auto: CUDA when present, else the CPU
LR_SCHEDULES = ("step", "linear", "cosine")

# pedconv.METHODS + the paths of pedconv.PATHS that are not methods, in that order.
PEDCONV_METHODS = ("auto", "grouped", "unfold", "taps", "reference", "triton", "grouped:chunks",
                   "grouped:per-sample-input-grad", "unfold:conv", "unfold:matmul", "unfold:onednn-matmul",
                   "unfold:plain", "pointwise:per-sample", "pointwise:shared")
