"""Bad user input has one base type (errors.UserError) that every specific error derives from, so each entry point
catches one type; the operator library stays independent of it."""
import subprocess
import sys

import pytest

import errors
import launch
import main
import multiproc
from dataloading import DataError
from image_classification.checkpoints import CheckpointError
from image_classification.tools import ToolError, tool_main


@pytest.mark.parametrize("error_type", [DataError, CheckpointError, ToolError, main.UsageError, launch.RecipeError,
                                        multiproc.LaunchError])
def test_every_specific_error_is_a_user_error(error_type):
    assert issubclass(error_type, errors.UserError)
    assert issubclass(error_type, ValueError)  # code that caught them as ValueErrors still does


def test_library_checks_raise_user_errors():
    from image_classification import distributed, models, optim

    for call in (lambda: models.build_model("resnet17"), lambda: models.get_config("nope"),
                 lambda: distributed.select_device("tpu", 0), lambda: optim.lr_schedule("nope", 0.1, 0, 1)):
        with pytest.raises(errors.UserError):
            call()


def test_a_tool_reports_a_data_error_as_one_line_without_dataloading_peeking(capsys):
    @tool_main
    def tool(argv):
        raise DataError("train/ holds no class folder")

    assert tool([]) == errors.EXIT_BAD_INPUT
    assert capsys.readouterr().err == "error: train/ holds no class folder\n"


def test_a_tool_keeps_the_traceback_of_a_plain_value_error():
    @tool_main
    def tool(argv):
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        tool([])


def test_pedconv_does_not_import_the_error_module():
    code = "import sys, pedconv; pedconv.PEDConv2d(8, 8, 3); print('errors' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
