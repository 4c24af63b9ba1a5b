"""pyseg.models: output shapes, anchors and box decoding, model sizes, partial loading, channels_last, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from pyseg.models import DFL, SegModel, build_model, decode_boxes, make_anchors, model_info


@pytest.fixture(scope="module")
def models() -> dict[str, SegModel]:
    torch.manual_seed(0)
    return {scale: build_model(f"pyseg-{scale}", nc=6).eval() for scale in "nsm"}


@pytest.mark.parametrize("scale", ["n", "s", "m"])
@pytest.mark.parametrize("size", [(320, 320), (256, 384)])
def test_output_shapes(models, scale, size):
    height, width = size
    with torch.no_grad():
        out = models[scale](torch.randn(2, 3, height, width))
    expected_levels = [(height // s, width // s) for s in (8, 16, 32)]
    anchors = sum(h * w for h, w in expected_levels)
    assert out.feature_shapes == expected_levels
    assert out.box_distribution.shape == (2, anchors, 4 * 16)
    assert out.class_logits.shape == (2, anchors, 6)
    assert out.mask_coeffs.shape == (2, anchors, 32)
    assert out.protos.shape == (2, 32, height // 4, width // 4)


def test_any_class_count_and_input_check():
    model = SegModel(nc=1, reg_max=8, num_protos=16).eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 32, 64))
    assert out.box_distribution.shape == (1, 4 * 8 + 2 * 4 + 1 * 2, 4 * 8)
    assert out.class_logits.shape == (1, 42, 1) and out.protos.shape == (1, 16, 8, 16)
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.zeros(1, 3, 48, 64))
    with pytest.raises(ValueError, match="nc"):
        SegModel(nc=0)


def test_bias_initialisation():
    model = SegModel(nc=6)
    for stride, box_branch, class_branch in zip(
        model.strides, model.head.box_branches, model.head.class_branches, strict=True
    ):
        assert torch.all(box_branch[-1].bias == 1.0)
        expected = math.log(5 / 6 / (640 / stride) ** 2)
        torch.testing.assert_close(class_branch[-1].bias, torch.full((6,), expected))


def test_make_anchors_hand_case():
    points, strides = make_anchors([(2, 3), (1, 1)], (8, 16), "cpu", torch.float32)
    expected_points = torch.tensor(
        [[0.5, 0.5], [1.5, 0.5], [2.5, 0.5], [0.5, 1.5], [1.5, 1.5], [2.5, 1.5], [0.5, 0.5]]
    )  # row-major: index y * w + x
    torch.testing.assert_close(points, expected_points)
    torch.testing.assert_close(strides, torch.tensor([[8.0]] * 6 + [[16.0]]))
    pixel_centres = points * strides
    torch.testing.assert_close(pixel_centres[4], torch.tensor([12.0, 12.0]))
    torch.testing.assert_close(pixel_centres[6], torch.tensor([8.0, 8.0]))


def test_decode_boxes_hand_case():
    reg_max = 16
    points = torch.tensor([[3.5, 4.5], [0.5, 0.5]])
    distribution = torch.zeros(1, 2, 4, reg_max)
    distribution[0, 0, :, 2] = 50.0  # anchor 0: all mass on bin 2 for every side
    for side, bins in enumerate([[0, 2], [3], [1], [15]]):  # anchor 1: l = mean(0, 2) = 1, t = 3, r = 1, b = 15
        distribution[0, 1, side, bins] = 50.0
    boxes = decode_boxes(distribution.flatten(2), points, reg_max)
    assert boxes.shape == (1, 2, 4)
    torch.testing.assert_close(boxes[0, 0], torch.tensor([1.5, 2.5, 5.5, 6.5]))
    torch.testing.assert_close(boxes[0, 1], torch.tensor([0.5 - 1.0, 0.5 - 3.0, 0.5 + 1.0, 0.5 + 15.0]))
    torch.testing.assert_close(DFL(reg_max)(distribution.flatten(2))[0, 0], torch.full((4,), 2.0))
    uniform = decode_boxes(torch.zeros(1, 1, 4 * reg_max), torch.tensor([[0.0, 0.0]]), reg_max)
    torch.testing.assert_close(uniform[0, 0], torch.tensor([-7.5, -7.5, 7.5, 7.5]))  # mean of 0..15


def test_model_sizes(models):
    info_n = model_info(models["n"], 640)
    info_n_320 = model_info(models["n"], 320)
    print(f"pyseg-n: {info_n['parameters'] / 1e6:.2f} M parameters, {info_n['gflops']:.2f} GFLOPs at 640")
    assert 2e6 < info_n["parameters"] < 4.5e6
    assert 8 < info_n["gflops"] < 16
    assert info_n["gflops"] == pytest.approx(4 * info_n_320["gflops"], rel=0.01)  # FLOPs scale with pixels
    sizes = [sum(p.numel() for p in models[s].parameters()) for s in "nsm"]
    assert sizes[0] < sizes[1] < sizes[2]


def test_model_info_restores_training_mode():
    model = SegModel(nc=2).train()
    model_info(model, 64)
    assert model.training


def test_build_model_names():
    assert build_model("n", 3).scale == "n"
    assert build_model("PYSEG-S", 3).scale == "s"
    with pytest.raises(ValueError, match=r"pyseg-n, pyseg-s, pyseg-m"):
        build_model("pyseg-x", 3)


def test_partial_load_changes_only_class_layers():
    torch.manual_seed(0)
    source = build_model("pyseg-n", 80)
    target = build_model("pyseg-n", 6)
    skipped = target.load_state_dict_partial(source.state_dict())
    expected = {f"head.class_branches.{level}.2.{kind}" for level in range(3) for kind in ("weight", "bias")}
    assert set(skipped) == expected and len(skipped) == len(expected)
    source_state, target_state = source.state_dict(), target.state_dict()
    for key, value in target_state.items():
        if key not in expected:
            assert torch.equal(value, source_state[key]), key
    # wrapper prefixes (DDP, torch.compile) are ignored
    wrapped = {f"_orig_mod.{key}": value for key, value in source.state_dict().items()}
    assert set(SegModel(nc=6).load_state_dict_partial(wrapped)) == {f"_orig_mod.{key}" for key in expected}


def test_channels_last_matches_default(models):
    model = models["n"]
    images = torch.randn(2, 3, 128, 160)
    with torch.no_grad():
        reference = model(images)
        model_cl = model.to(memory_format=torch.channels_last)
        out = model_cl(images.contiguous(memory_format=torch.channels_last))
        model.to(memory_format=torch.contiguous_format)
    for name in ("box_distribution", "class_logits", "mask_coeffs", "protos"):
        torch.testing.assert_close(getattr(out, name), getattr(reference, name), rtol=1e-4, atol=1e-4)
    assert out.feature_shapes == reference.feature_shapes


def test_backward_gives_finite_gradients():
    torch.manual_seed(0)
    model = build_model("pyseg-n", 6).train()
    out = model(torch.randn(2, 3, 64, 96))
    loss = out.box_distribution.sum() + out.class_logits.sum() + out.mask_coeffs.sum() + out.protos.sum()
    loss.backward()
    for name, param in model.named_parameters():
        assert param.requires_grad
        assert param.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(param.grad).all(), name
    assert any(param.grad.abs().sum() > 0 for param in model.parameters())


def test_traces_without_graph_breaks():
    torch._dynamo.reset()
    model = SegModel(nc=3).eval()
    images = torch.randn(1, 3, 64, 64)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        out, reference = compiled(images), model(images)
    torch.testing.assert_close(out.class_logits, reference.class_logits)
    assert out.feature_shapes == [(8, 8), (4, 4), (2, 2)]


def test_every_model_name_builds_and_is_selectable_in_configs_and_search_spaces(tmp_path):
    from pyseg.config import MODEL_NAMES, make_config
    from pyseg.distributed.search_space import SearchSpaceError, load_search_space
    from pyseg.errors import ConfigError

    assert len(MODEL_NAMES) == 13 and {"yolo11x-seg", "yolov8m-seg", "pyseg-s"} <= set(MODEL_NAMES)
    assert type(build_model("yolo11n-seg.yaml", 2)).__name__ == "YoloSegModel"  # Ultralytics users' spelling
    assert make_config({"model": "YOLOv8s-seg"}).model == "yolov8s-seg"  # recorded by its canonical name
    with pytest.raises(ConfigError, match="yolo11"):
        make_config({"model": "yolo12n-seg"})
    space = tmp_path / "space.yaml"
    space.write_text("model: {choice: [pyseg-n, yolo11n-seg, yolov8n-seg]}\n")
    assert load_search_space(space)["model"] == ("choice", ["pyseg-n", "yolo11n-seg", "yolov8n-seg"])
    space.write_text("model: {choice: [pyseg-n, yolo11q-seg]}\n")
    with pytest.raises(SearchSpaceError, match="yolo11q-seg"):
        load_search_space(space)


@pytest.mark.parametrize("name", ["yolo11n-seg", "yolov8n-seg"])
def test_yolo_models_give_seg_outputs_with_gradients(name):
    """The YOLO families give the same SegOutputs as pyseg-n, so pyseg's loss, NMS and masks apply (a training run
    from an imported checkpoint: test_seed_recipe.py)."""
    torch.manual_seed(0)
    model = build_model(name, 3)
    out = model(torch.rand(2, 3, 64, 96))
    assert out.box_distribution.shape == (2, 8 * 12 + 4 * 6 + 2 * 3, 64)
    assert out.class_logits.shape[-1] == 3 and out.mask_coeffs.shape[-1] == 32
    assert out.protos.shape == (2, 32, 16, 24)
    assert model.strides == (8, 16, 32) and model.reg_max == 16
    out.class_logits.sum().backward()
    assert all(p.grad is not None for p in model.head.class_branches.parameters())
