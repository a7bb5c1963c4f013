"""PEDConv: parameter-efficient dynamic convolution (Hou & Kung, BMVC 2021) for PyTorch.

    from pedconv import PEDConv2d, info_max_loss, convert
"""
from .conv import GateGenerator, PEDConv2d
from .convert import convert
from .functional import METHODS, choose_method, pedconv2d, pedconv2d_reference
from .regularizer import info_max_loss

__all__ = [
    "GateGenerator",
    "METHODS",
    "PEDConv2d",
    "choose_method",
    "convert",
    "info_max_loss",
    "pedconv2d",
    "pedconv2d_reference",
]
__version__ = "0.1.0"
