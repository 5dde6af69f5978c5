"""Model registry and loaders: built-ins adapt to the data, user factories, one-line errors."""

import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from bnprobe.errors import ModelError
from bnprobe.models import build_model, list_models


@pytest.mark.parametrize("name", list_models())
def test_builtins_adapt_to_input_and_classes(name: str) -> None:
    shape = {"dln": (10,), "video_cnn": (3, 4, 16, 16)}.get(name, (3, 32, 32))
    model = build_model(name, 7, shape)
    assert model(torch.randn(2, *shape)).shape == (2, 7)


def test_vgg_has_the_vgg11_layout() -> None:
    model = build_model("vgg", 10, (3, 32, 32))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 256, 512, 512, 512, 512]
    assert isinstance(model.classifier, nn.Linear) and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_dln_and_mlp_shapes() -> None:
    dln = build_model("dln", 10, (10,))
    linears = [m for m in dln if isinstance(m, nn.Linear)]
    assert len(linears) == 25 and all(lay.bias is None and lay.weight.shape == (10, 10) for lay in linears)
    mlp = build_model("mlp", 10, (1, 28, 28))
    assert [m.out_features for m in mlp if isinstance(m, nn.Linear)] == [100, 100, 100, 10]
    assert sum(isinstance(m, nn.Sigmoid) for m in mlp) == 3


def test_torchvision_model_uses_num_classes() -> None:
    model = build_model("torchvision:resnet18", 5, (3, 32, 32))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)


@pytest.mark.parametrize("spec", ["torchvision:raft_small", "torchvision.models.optical_flow:raft_large"])
def test_a_model_without_num_classes_says_what_it_is_and_what_works(spec: str) -> None:
    with pytest.raises(ModelError) as raised:
        build_model(spec, 10, (3, 32, 32))
    assert str(raised.value) == (
        f"{spec} is an optical-flow model (no num_classes): bnprobe's commands train classifiers, segmentation and video models; "
        'use the Python API with a module that wraps it and returns a scalar loss (docs/api.md, "Other models")'
    )


def test_a_factory_that_passes_num_classes_on_to_a_model_without_it_is_named(tmp_path: Path) -> None:
    (tmp_path / "m.py").write_text("import torch.nn as nn\n\ndef make(**kwargs):\n    return nn.ReLU(**kwargs)\n")
    with pytest.raises(ModelError, match=r"m.py:make builds a model that takes no num_classes: bnprobe's commands train classifiers"):
        build_model(f"{tmp_path / 'm.py'}:make", 10, (3, 32, 32))
    with pytest.raises(ModelError, match=r"^torchvision:resnet18: ResNet.__init__\(\) got an unexpected keyword argument 'depth'$"):
        build_model("torchvision:resnet18", 10, (3, 32, 32), depth=3)  # any other TypeError is said as it was


@pytest.mark.parametrize(
    ("spec", "message"),
    [("vgx", "did you mean 'vgg'"), ("torchvision:resnet1", "did you mean 'resnet18'"), ("nope/missing.py:make", "does not exist")],
)
def test_unknown_models(spec: str, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        build_model(spec, 10, (3, 32, 32))


def test_unknown_model_without_a_close_name_lists_the_built_ins() -> None:
    with pytest.raises(
        ModelError, match=r"^unknown model 'qqqq'; available: " + ", ".join(list_models()[:12]) + r" \(or use torchvision:NAME"
    ):
        build_model("qqqq", 10, (3, 32, 32))


def test_unknown_option_names_the_closest() -> None:
    with pytest.raises(ModelError, match="no option 'widht'; did you mean 'width'"):
        build_model("vgg", 10, (3, 32, 32), widht=0.5)


def test_user_model_file(tmp_path: Path) -> None:
    f = tmp_path / "mine.py"
    f.write_text(
        "import torch.nn as nn\n"
        "def make(num_classes, input_shape):\n    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], num_classes))\n"
        "def plain():\n    return nn.Linear(4, 2)\n"
        "def not_a_model():\n    return 42\n"
    )
    assert build_model(f"{f}:make", 3, (4,))(torch.randn(2, 4)).shape == (2, 3)
    assert isinstance(build_model(f"{f}:plain", 3, (4,)), nn.Linear)
    with pytest.raises(ModelError, match=r"not a torch\.nn\.Module"):
        build_model(f"{f}:not_a_model", 3, (4,))
    with pytest.raises(ModelError, match="has no factory 'mak'; did you mean 'make'"):
        build_model(f"{f}:mak", 3, (4,))


def test_user_model_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    f = tmp_path / "broken.py"
    f.write_text("import torch\n\ndef make(:\n    pass\n")
    with pytest.raises(ModelError, match=r"syntax error in .*broken.py, line 3"):
        build_model(f"{f}:make", 3, (4,))


def test_package_module_factory() -> None:
    model = build_model("torchvision.models:resnet18", 4, (3, 32, 32))
    assert model.fc.out_features == 4


def test_timm_spec_builds_a_randomly_initialised_timm_model() -> None:
    pytest.importorskip("timm")
    model = build_model("timm:resnet18", 4, (1, 32, 32))  # other than 3 channels: in_chans from the data
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 4)
    with pytest.raises(ModelError, match="unknown timm model 'resnet1'; did you mean 'resnet18'"):
        build_model("timm:resnet1", 4, (3, 32, 32))


def test_timm_spec_without_timm_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(ModelError, match=r"^timm:resnet18 needs timm, which is not installed \(pip install timm\)$"):
        build_model("timm:resnet18", 4, (3, 32, 32))


def test_torchvision_segmentation_backbone_is_randomly_initialised_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """A builder's default ``weights_backbone`` would download ImageNet weights (offline: a bare URLError)."""

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("tried to fetch weights")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", no_download)
    model = build_model("torchvision:lraspp_mobilenet_v3_large", 3, (3, 32, 32))
    assert model(torch.randn(2, 3, 32, 32))["out"].shape == (2, 3, 32, 32)


@pytest.mark.slow
def test_the_documented_detection_route_plans_and_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The example of docs/api.md, "Detection models", runs as written."""
    text = (Path(__file__).parents[1] / "docs" / "api.md").read_text()
    code = text.split("## Detection models", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/api.md", "exec"), {"__name__": "example"})
    assert (tmp_path / "detector.h5").is_file()
