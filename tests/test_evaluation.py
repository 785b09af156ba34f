"""Deletion / insertion curves and the model-randomization sanity check."""
import h5py
import torch

from pipeline.evaluation import SanityCheck, deletion_insertion, parameter_layers, spearman
from pipeline.runner import run
from pipeline.targets import TargetSpec
from pipeline.techniques import get_technique
from tests.conftest import tiny_overrides
from tests.test_techniques import RegionNet
from tests.tinymodels import tiny_net


def test_spearman_is_one_for_the_same_order_and_minus_one_reversed():
    a = torch.rand(2, 3, 5, 5)
    assert torch.allclose(spearman(a, a * 3 + 1), torch.ones(2, 3), atol=1e-6)
    assert torch.allclose(spearman(a, -a), -torch.ones(2, 3), atol=1e-6)


def test_deletion_and_insertion_reward_the_map_that_points_at_the_evidence():
    model = RegionNet().eval()
    x = torch.zeros(3, 3, 32, 32)
    x[..., 8:16, 20:28] = 0.15 + 0.05 * torch.rand(3, 3, 8, 8)  # evidence in the box, moderate logits
    targets = torch.zeros(3, 1, dtype=torch.long)
    cam = get_technique("gradcam")().attribute(model, x, ["relu2"], TargetSpec.parse("0")).maps["relu2", "cam"]
    good = deletion_insertion(model, x, cam, targets, steps=8, max_batch=16)
    bad = deletion_insertion(model, x, -cam, targets, steps=8, max_batch=16)
    assert good["deletion"].shape == (3, 1, 9) and good["deletion_auc"].shape == (3, 1)
    assert (good["deletion_auc"] < bad["deletion_auc"]).all()
    assert (good["insertion_auc"] > bad["insertion_auc"]).all()
    # all pixels removed / inserted: both orders end at the same image
    torch.testing.assert_close(good["deletion"][..., -1], bad["deletion"][..., -1])
    chunked = deletion_insertion(model, x, cam, targets, steps=8, max_batch=5)
    torch.testing.assert_close(chunked["deletion"], good["deletion"])


def test_sanity_check_drops_the_correlation_of_a_gradient_method_and_leaves_the_model_alone():
    model = tiny_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(4, 3, 16, 16)
    target = TargetSpec.parse("pred")
    saliency = get_technique("saliency")()
    original = saliency.attribute(model, x, [], target)
    check = SanityCheck(model, steps=3, seed=0)
    assert check.groups[-1] == parameter_layers(model)[::-1]  # the last group is every layer
    corr = check.correlations(x, [], target, {"saliency": saliency},
                              {("saliency", "input", "maxabs"): original.maps["input", "maxabs"]},
                              original.targets, 16, seed=0)
    values = corr["saliency", "input", "maxabs"]
    assert values.shape == (4, 1, 3)
    assert values[..., -1].mean() < 0.5  # fully randomized: the map no longer follows the model
    for key, value in model.state_dict().items():
        assert torch.equal(before[key], value), key


def test_run_with_evaluation_writes_columns_and_plots(make_cfg, image_folder, tiny_checkpoint, tmp_path):
    cfg = make_cfg(*tiny_overrides(tiny_checkpoint, image_folder, "technique=[gradcam,saliency]", "layers=[relu2]",
                                   "evaluate.deletion=true", "evaluate.insertion=true", "evaluate.sanity=true",
                                   "evaluate.steps=4", "evaluate.sanity_steps=2", "render.png=false"))
    run(cfg, tmp_path)
    with h5py.File(tmp_path / "maps.h5", "r") as f:
        assert f["gradcam/relu2/cam.deletion"].shape == (7, 1, 5)
        assert f["saliency/input/maxabs.insertion_auc"].shape == (7, 1)
        assert f["gradcam/relu2/cam.sanity"].shape == (7, 1, 2)
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["deletion.png", "insertion.png", "sanity.png"]
