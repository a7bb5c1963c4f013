"""PEDConv: parameter-efficient dynamic convolution (Hou & Kung, BMVC 2021) for PyTorch.

    from pedconv import PEDConv2d, info_max_loss, convert
"""
from .autotune import autotune_report, is_autotune_enabled, set_autotune, share_choices
from .compiling import inductor_options
from .conv import GateGenerator, PEDConv2d
from .convert import convert
from .functional import METHODS, PATHS, choose_method, pedconv2d, pedconv2d_reference
from .regularizer import info_max_loss

__all__ = [
    "GateGenerator",
    "METHODS",
    "PATHS",
    "PEDConv2d",
    "autotune_report",
    "choose_method",
    "convert",
    "inductor_options",
    "info_max_loss",
    "is_autotune_enabled",
    "pedconv2d",
    "pedconv2d_reference",
    "set_autotune",
    "share_choices",
]
__version__ = "0.1.0"
