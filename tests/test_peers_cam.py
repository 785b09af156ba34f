"""Grad-CAM on token and channels-last layers against pytorch-grad-cam itself (issue 15, point 4).

pytorch-grad-cam (the `grad-cam` package, a dev dependency) needs a reshape_transform written for
each architecture; ours reads the layout from the model. Random-init timm models, two inputs, the
predicted class; both maps upsampled to the input and min-max scaled as pytorch-grad-cam does.
"""
import numpy as np
import pytest
import timm
import torch

from pipeline.maps import unit_maps
from pipeline.targets import TargetSpec
from pipeline.techniques import get_technique
from pipeline.techniques.base import Pass

grad_cam = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402


def vit_tokens(t):  # [N, 1 + 14 * 14, C] -> [N, C, 14, 14]: pytorch-grad-cam's ViT recipe
    return t[:, 1:].reshape(t.shape[0], 14, 14, t.shape[2]).permute(0, 3, 1, 2)


def nhwc(t):  # [N, h, w, C] -> [N, C, h, w]
    return t.permute(0, 3, 1, 2)


def swin_tokens(t):  # [N, 7 * 7, C] -> [N, C, 7, 7]
    return t.reshape(t.shape[0], 7, 7, t.shape[2]).permute(0, 3, 1, 2)


CASES = [  # model, layer, our layout, their reshape_transform
    ("vit_tiny_patch16_224", "blocks.11.norm1", "auto", vit_tokens),
    ("vit_tiny_patch16_224", "blocks.5", "auto", vit_tokens),
    ("swin_tiny_patch4_window7_224", "layers.3.blocks.1.norm1", "auto", nhwc),
    ("swin_tiny_patch4_window7_224", "norm", "auto", nhwc),
    ("swin_tiny_patch4_window7_224", "layers.3.blocks.1.norm2", "tokens", swin_tokens),
    ("convnext_atto", "stages.3.blocks.1.norm", "auto", nhwc),  # conv_mlp=False: the norm runs on NHWC
]
KWARGS = {"convnext_atto": {"conv_mlp": False}}


@pytest.mark.parametrize("name,layer,layout,reshape", CASES, ids=[f"{c[0]}:{c[1]}" for c in CASES])
def test_gradcam_equals_pytorch_grad_cam_with_its_reshape_transform(name, layer, layout, reshape):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **KWARGS.get(name, {})).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    p = Pass(model, x, [layer], TargetSpec.parse("pred"), needs=get_technique("gradcam").needs, layout=layout)
    ours = get_technique("gradcam")().attribute(model, x, [layer], p.target, shared=p)
    mine = unit_maps(ours.maps[layer, "cam"], (224, 224))[:, 0].numpy()  # [N, H, W]
    targets = [ClassifierOutputTarget(int(c)) for c in ours.targets[:, 0]]
    with grad_cam.GradCAM(model=model, target_layers=[model.get_submodule(layer)],
                          reshape_transform=reshape) as cam:
        theirs = cam(input_tensor=x, targets=targets)  # [N, H, W], min-max scaled
    for n in range(2):
        assert mine[n].std() > 0 and theirs[n].std() > 0, "a degenerate map would compare nothing"
        r = np.corrcoef(mine[n].ravel(), theirs[n].ravel())[0, 1]
        assert r >= 0.999, (name, layer, n, r)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_ablationcam_on_the_tail_equals_pytorch_grad_cam():
    """Ablation-CAM at a ResNet-18 stage (after a ReLU, so both zero a channel; layer3, 256 channels,
    to keep the peer's whole forwards short): our tail forwards against pytorch-grad-cam's
    AblationCAM (whole forwards with its AblationLayer in place of the stage)."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    ours = get_technique("ablationcam")().attribute(model, x, ["layer3"], TargetSpec.parse("pred"), max_batch=64)
    mine = unit_maps(ours.maps["layer3", "cam"], (64, 64))[:, 0].numpy()
    targets = [ClassifierOutputTarget(int(c)) for c in ours.targets[:, 0]]
    with grad_cam.AblationCAM(model=model, target_layers=[model.layer3]) as cam:
        theirs = cam(input_tensor=x, targets=targets)
    assert mine[0].std() > 0 and theirs[0].std() > 0
    assert np.corrcoef(mine[0].ravel(), theirs[0].ravel())[0, 1] >= 0.999
