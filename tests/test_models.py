import pytest
import torch

from cifar_ray.models import ModelError, build_model, check_device, list_models, model_spec
from cifar_ray.models.stats import count_parameters

CASES = [(name, stem) for name in list_models() for stem in model_spec(name).stems]


def test_registry_lists_the_models():
    assert list_models() == ["net1", "net2", "net3", "base", "netconv", "vgg16", "vgg19", "inception",
                             "resnet18", "resnet34", "whitened_cnn"]


@pytest.mark.parametrize("name,stem", CASES)
def test_forward_shape_and_backward(name, stem):
    torch.manual_seed(0)
    model = build_model(name, stem=stem)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    logits = model(x)
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()
    model.train()
    out = model(x)
    main = out[0] if isinstance(out, tuple) else out
    loss = main.logsumexp(1).mean() if not isinstance(out, tuple) else sum(o.logsumexp(1).mean() for o in out)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", list_models())
def test_the_registry_says_which_models_have_convolution_filters(name):
    # train.optimizer muon steps trained 4-D parameters; cifar_ray.config.check_new refuses it where there are none
    model = build_model(name)
    assert model_spec(name).convolutions == any(p.ndim == 4 and p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("name,expected", [("resnet18", 11_173_962), ("vgg16", 14_728_266), ("vgg19", 20_040_522)])
def test_pinned_parameter_counts_cifar_stem(name, expected):
    # The same counts as kuangliu/pytorch-cifar's ResNet18, VGG('VGG16') and VGG('VGG19').
    assert count_parameters(build_model(name)) == expected


@pytest.mark.parametrize("name,reference", [("resnet18", "resnet18"), ("resnet34", "resnet34"), ("vgg16", "vgg16_bn"),
                                            ("vgg19", "vgg19_bn")])
def test_imagenet_stem_matches_torchvision(name, reference):
    import torchvision

    ref = getattr(torchvision.models, reference)(num_classes=10)
    assert count_parameters(build_model(name, stem="imagenet")) == count_parameters(ref)


def test_whitened_cnn_shape_and_parameters():
    model = build_model("whitened_cnn")
    # whitening 3*24*2*2 (+24 bias); convs 24*64*9, 64*64*9, 64*256*9, 3 x 256*256*9; BN 2 x (2*64 + 4*256);
    # linear 256*10, no bias
    assert count_parameters(model) == 312 + 13_824 + 36_864 + 147_456 + 3 * 589_824 + 2 * 1_152 + 2_560 == 1_972_792
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen[0] == "0.weight" and len(frozen) == 1 + 6  # the whitening filters and the six BN scales
    shapes = []
    hooks = [m.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape))) for m in model[:5]]
    model.eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    for h in hooks:
        h.remove()
    assert shapes == [(2, 24, 31, 31), (2, 24, 31, 31), (2, 64, 15, 15), (2, 256, 7, 7), (2, 256, 3, 3)]
    # the conv blocks start as identities on their first channels (an implicit residual)
    conv = model[3][0].weight
    assert torch.equal(conv[:64, :, 1, 1], torch.eye(64)) and conv[:64, :, 0, 0].abs().sum() == 0
    half = build_model("whitened_cnn", width=0.5)
    convs = [m.out_channels for m in half.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs == [24, 32, 32, 128, 128, 128, 128]


def test_inception_aux_heads_only_in_training():
    model = build_model("inception", width=0.25)
    model.train()
    out = model(torch.randn(2, 3, 32, 32))
    assert isinstance(out, tuple) and len(out) == 3 and all(o.shape == (2, 10) for o in out)
    model.eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_options_change_the_model():
    assert count_parameters(build_model("netconv", width=2.0)) > count_parameters(build_model("netconv"))
    acts = {type(m).__name__ for m in build_model("resnet18", activation="gelu").modules()}
    assert "GELU" in acts and "ReLU" not in acts
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in build_model("netconv", batch_norm=False).modules())
    drops = [m.p for m in build_model("net2", dropout=0.1).modules() if isinstance(m, torch.nn.Dropout)]
    assert drops == [0.1] * 5


def test_bad_names_and_options_are_clear():
    with pytest.raises(ModelError, match="allowed: net1"):
        build_model("resnet19")
    with pytest.raises(ModelError, match="no option 'dropout'"):
        build_model("resnet18", dropout=0.5)
    with pytest.raises(ModelError, match="no 'imagenet' stem"):
        build_model("netconv", stem="imagenet")


def test_inception_refuses_mps():
    with pytest.raises(ModelError, match="cannot run on mps"):
        check_device("inception", "mps")
    check_device("resnet18", "mps")


def test_models_cli_lists_every_model(capsys):
    from cifar_ray.models.__main__ import main

    assert main() == 0
    out = capsys.readouterr().out
    for name in list_models():
        assert f"\n{name} " in out
    assert "11,173,962" in out
