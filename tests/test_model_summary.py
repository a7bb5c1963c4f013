"""The model summary against the spec's table (parameters, without decoders, multiply-adds at 224x224)."""
import pytest

from image_classification import model_summary
from image_classification.models import build_model


@pytest.mark.parametrize("arch, dynamic, params, inference, gmacs", [
    ("resnet18", True, 12_140_744, 11_917_120, 1.8143),
    ("resnet18", False, 11_689_512, 11_689_512, 1.8141),
    ("resnet50", True, 31_568_328, 28_574_096, 4.0922),
    ("resnet50", False, 25_557_032, 25_557_032, 4.0892),
])
def test_summary_matches_the_specs_table(arch, dynamic, params, inference, gmacs):
    model = build_model(arch, dynamic=dynamic)
    model.train()
    result = model_summary.summarize(model)
    assert (result.params, result.params_without_decoders) == (params, inference)
    assert round(result.macs / 1e9, 4) == gmacs
    assert result.dynamic_layers == {"resnet18": 16, "resnet50": 48}[arch] * dynamic
    assert model.training  # the eval forward leaves the mode as it found it


def test_summary_command(capsys):
    model_summary.main(["--arch", "resnet18", "--dynamic", "--image-size", "224"])
    text = capsys.readouterr().out
    assert "PEDConv-resnet18: 16 PEDConv layers" in text
    assert "12,140,744" in text and "11,917,120" in text and "1.8143 G" in text
