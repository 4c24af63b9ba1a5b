"""pyseg.engine.optim: parameter groups, the automatic optimizer rule, the warmup + decay schedule, the EMA."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pyseg.config import TrainConfig
from pyseg.engine.optim import (
    AUTO_ADAMW_LR,
    AUTO_SGD_MIN_STEPS,
    ModelEMA,
    apply_schedule,
    build_optimizer,
    resolve_optimizer,
    unwrap_model,
)

# ------------------------------------------------------------------ parameter groups


class EveryKindOfLayer(nn.Module):
    """Conv without bias + BatchNorm, Linear with bias, GroupNorm, LayerNorm, a bare parameter, a frozen layer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.conv_bias = nn.Conv2d(4, 4, 1, bias=True)
        self.gn = nn.GroupNorm(2, 4)
        self.linear = nn.Linear(4, 5)
        self.ln = nn.LayerNorm(5)
        self.scale = nn.Parameter(torch.ones(5))  # a parameter of a plain module: decayed like a weight
        self.frozen = nn.Linear(5, 5)
        self.frozen.requires_grad_(False)


def parameter_ids(params) -> list[int]:
    return sorted(id(p) for p in params)


def test_groups_are_decayed_weights_then_norm_weights_then_biases():
    model = EveryKindOfLayer()
    optimizer = build_optimizer(model, "sgd", lr=0.01, momentum=0.9, weight_decay=5e-4)
    groups = optimizer.param_groups
    assert len(groups) == 3
    assert parameter_ids(groups[0]["params"]) == parameter_ids(
        [model.conv.weight, model.conv_bias.weight, model.linear.weight, model.scale]
    )
    assert parameter_ids(groups[1]["params"]) == parameter_ids([model.bn.weight, model.gn.weight, model.ln.weight])
    assert parameter_ids(groups[2]["params"]) == parameter_ids(
        [model.bn.bias, model.conv_bias.bias, model.gn.bias, model.linear.bias, model.ln.bias]
    )
    assert [g["weight_decay"] for g in groups] == [5e-4, 0.0, 0.0]


def test_every_trainable_parameter_is_in_exactly_one_group():
    from pyseg.models import build_model

    model = EveryKindOfLayer()
    for name in ("sgd", "adamw"):
        grouped = [id(p) for g in build_optimizer(model, name, 0.01, 0.9, 5e-4).param_groups for p in g["params"]]
        trainable = [id(p) for p in model.parameters() if p.requires_grad]
        assert sorted(grouped) == sorted(trainable)  # no duplicate, none missing
        assert id(model.frozen.weight) not in grouped and id(model.frozen.bias) not in grouped
    seg = build_model("pyseg-n", 3)
    groups = build_optimizer(seg, "sgd", 0.01, 0.9, 5e-4).param_groups
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in seg.parameters())
    norms = [m for m in seg.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and parameter_ids(groups[1]["params"]) == parameter_ids(m.weight for m in norms)
    assert all(p.dim() > 1 for p in groups[0]["params"])  # conv kernels only: every 1-d tensor is a norm or bias


def test_a_parameter_shared_by_two_layers_is_stepped_once():
    # Tied weights (one Parameter held by two modules): model.parameters() lists it once, and so must the groups,
    # or SGD applies its update twice per step.
    model = nn.Sequential(nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False))
    model[1].weight = model[0].weight
    grouped = [id(p) for g in build_optimizer(model, "sgd", 0.1, 0.9, 0.0).param_groups for p in g["params"]]
    assert grouped == [id(model[0].weight)]


def test_sgd_is_nesterov_with_the_given_momentum_and_adamw_uses_it_as_beta1():
    model = EveryKindOfLayer()
    sgd = build_optimizer(model, "sgd", lr=0.02, momentum=0.937, weight_decay=5e-4)
    assert type(sgd) is torch.optim.SGD
    for group in sgd.param_groups:
        assert group["nesterov"] is True and group["momentum"] == 0.937 and group["lr"] == 0.02
    adamw = build_optimizer(model, "adamw", lr=0.002, momentum=0.85, weight_decay=5e-4)
    assert type(adamw) is torch.optim.AdamW
    for group in adamw.param_groups:
        assert group["betas"] == (0.85, 0.999) and group["lr"] == 0.002
    assert [g["weight_decay"] for g in adamw.param_groups] == [5e-4, 0.0, 0.0]  # not AdamW's default 0.01


def test_weight_decay_reaches_only_the_first_group():
    # One SGD step with zero gradients: only decay moves a parameter. Its gradient is g = wd * value = 0.2; the
    # first step's momentum buffer is g, and Nesterov steps by lr * (g + momentum * g) = 0.5 * 1.9 * 0.2 = 0.19.
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    for param in model.parameters():
        nn.init.constant_(param, 2.0)
        param.grad = torch.zeros_like(param)
    build_optimizer(model, "sgd", lr=0.5, momentum=0.9, weight_decay=0.1).step()
    assert torch.allclose(model[0].weight, torch.full((2, 2), 1.81), rtol=0, atol=1e-6)
    for untouched in (model[0].bias, model[1].weight, model[1].bias):
        assert torch.equal(untouched, torch.full((2,), 2.0))


def test_every_momentum_the_config_accepts_builds_an_sgd_optimizer():
    # The config takes momentum in [0, 1); whatever it accepts, the trainer's build_optimizer must build with
    # (or the config must refuse it as a user error), not fail with torch's traceback.
    from pyseg.config import make_config
    from pyseg.errors import ConfigError

    for momentum in (0.0, 0.5, 0.937, 0.999):  # the config's range is [0, 1): each of these is accepted
        cfg = make_config({"optimizer": "sgd", "momentum": momentum})
        optimizer = build_optimizer(EveryKindOfLayer(), "sgd", cfg.lr0, cfg.momentum, cfg.weight_decay)
        assert all(g["momentum"] == momentum for g in optimizer.param_groups)
    for momentum in (-0.1, 1.0, float("nan")):  # and these are refused as a user error, naming the flag
        with pytest.raises(ConfigError, match="--momentum"):
            make_config({"optimizer": "sgd", "momentum": momentum})


@pytest.mark.parametrize("name", ["auto", "adam", "SGD"])
def test_unknown_optimizer_names_raise(name):
    # "auto" must be resolved (resolve_optimizer) before the optimizer is built.
    with pytest.raises(ValueError, match="sgd, adamw or auto"):
        build_optimizer(EveryKindOfLayer(), name, 0.01, 0.9, 0.0)


# ------------------------------------------------------------------ the automatic optimizer rule


def test_auto_picks_sgd_with_lr0_for_long_runs_and_adamw_at_a_fixed_lr_for_short_ones():
    assert AUTO_SGD_MIN_STEPS == 10_000 and AUTO_ADAMW_LR == 0.002  # the documented rule
    assert resolve_optimizer("auto", 0.03, 10_000) == ("sgd", 0.03)
    assert resolve_optimizer("auto", 0.03, 250_000) == ("sgd", 0.03)
    assert resolve_optimizer("auto", 0.03, 9_999) == ("adamw", 0.002)
    assert resolve_optimizer("auto", 0.03, 0) == ("adamw", 0.002)


def test_explicit_optimizers_keep_their_learning_rate_whatever_the_run_length():
    for steps in (1, 9_999, 10_000, 10**6):
        assert resolve_optimizer("sgd", 0.05, steps) == ("sgd", 0.05)
        assert resolve_optimizer("adamw", 0.0007, steps) == ("adamw", 0.0007)


# ------------------------------------------------------------------ schedule


def schedule_at(iteration: int, iterations_per_epoch: int, name: str = "sgd", **cfg_values):
    """(lr of groups 0, 1, 2, momentum of group 0 or None) after apply_schedule at iteration."""
    values = {
        "lr0": 0.01,
        "lrf": 0.1,
        "epochs": 10,
        "warmup_epochs": 1.0,
        "momentum": 0.9,
        "warmup_momentum": 0.8,
        "warmup_bias_lr": 0.1,
        "cos_lr": False,
    }
    values.update(cfg_values)
    cfg = TrainConfig(**values)
    optimizer = build_optimizer(EveryKindOfLayer(), name, cfg.lr0, cfg.momentum, 5e-4)
    apply_schedule(optimizer, cfg, iteration, iterations_per_epoch)
    groups = optimizer.param_groups
    return [g["lr"] for g in groups], groups[0].get("momentum"), optimizer


# lr0 0.01, lrf 0.1, 10 epochs of 20 iterations, warmup_epochs 1:
#   warmup iterations = min(max(round(1 * 20), 100), 10 * 20 // 2) = min(100, 100) = 100 (5 epochs: the 100 minimum)
#   target(epoch e) = 0.01 * ((1 - e / 10) * (1 - 0.1) + 0.1)            (linear decay, whole epochs)
#   in warmup, t = iteration / 100: bias lr = 0.1 + (target - 0.1) * t, other lrs = target * t,
#   momentum = 0.8 + (0.9 - 0.8) * t
LINEAR_CASES = [
    # iteration, (weights lr, norms lr, bias lr), momentum
    (0, (0.0, 0.0, 0.1), 0.8),  # epoch 0, target 0.01, t = 0
    (50, (0.0041, 0.0041, 0.0541), 0.85),  # epoch 2, target 0.0082, t = 0.5
    (99, (0.006336, 0.006336, 0.007336), 0.899),  # epoch 4, target 0.0064, t = 0.99
    (100, (0.0055, 0.0055, 0.0055), 0.9),  # epoch 5, warmup over: target 0.01 * (0.5 * 0.9 + 0.1)
    (199, (0.0019, 0.0019, 0.0019), 0.9),  # epoch 9: 0.01 * (0.1 * 0.9 + 0.1)
    (200, (0.001, 0.001, 0.001), 0.9),  # epoch 10 (past the end): lr0 * lrf
    (10_000, (0.001, 0.001, 0.001), 0.9),  # far past the end: stays at lr0 * lrf
]


@pytest.mark.parametrize("iteration, lrs, momentum", LINEAR_CASES)
def test_warmup_then_linear_decay_by_hand(iteration, lrs, momentum):
    got_lrs, got_momentum, _ = schedule_at(iteration, 20)
    assert got_lrs == pytest.approx(lrs, abs=1e-12)
    assert got_momentum == pytest.approx(momentum, abs=1e-12)


def test_warmup_is_capped_at_half_the_run():
    # 2 epochs of 20 iterations, warmup_epochs 3: min(max(60, 100), 2 * 20 // 2) = 20 warmup iterations.
    lrs, momentum, _ = schedule_at(10, 20, epochs=2, warmup_epochs=3.0)  # epoch 0, target 0.01, t = 0.5
    assert lrs == pytest.approx([0.005, 0.005, 0.055], abs=1e-12) and momentum == pytest.approx(0.85)
    lrs, momentum, _ = schedule_at(20, 20, epochs=2, warmup_epochs=3.0)  # epoch 1 of 2: 0.01 * (0.5 * 0.9 + 0.1)
    assert lrs == pytest.approx([0.0055] * 3, abs=1e-12) and momentum == 0.9


def test_warmup_longer_than_100_iterations_follows_warmup_epochs():
    # 50 iterations per epoch, warmup_epochs 3: min(max(150, 100), 10 * 50 // 2) = 150 warmup iterations.
    lrs, momentum, _ = schedule_at(75, 50, warmup_epochs=3.0)  # epoch 1, target 0.01 * 0.91 = 0.0091, t = 0.5
    assert lrs == pytest.approx([0.00455, 0.00455, 0.1 + (0.0091 - 0.1) * 0.5], abs=1e-12)
    assert momentum == pytest.approx(0.85)
    lrs, _, _ = schedule_at(149, 50, warmup_epochs=3.0)  # epoch 2, target 0.0082, t = 149 / 150
    assert lrs[0] == pytest.approx(0.0082 * 149 / 150, abs=1e-12)
    lrs, momentum, _ = schedule_at(150, 50, warmup_epochs=3.0)  # epoch 3: 0.01 * (0.7 * 0.9 + 0.1) = 0.0073
    assert lrs == pytest.approx([0.0073] * 3, abs=1e-12) and momentum == 0.9


def test_no_warmup_starts_at_lr0_and_the_final_momentum():
    lrs, momentum, _ = schedule_at(0, 20, warmup_epochs=0.0)
    assert lrs == [0.01, 0.01, 0.01] and momentum == 0.9


@pytest.mark.parametrize(
    "iteration, factor",
    [
        (100, 0.55),  # x = 0.5: 0.1 + 0.9 * (1 + cos(pi / 2)) / 2 = 0.1 + 0.45
        (140, 0.2854966365),  # x = 0.7: cos(0.7 pi) = -0.5877852523 -> 0.1 + 0.9 * 0.2061073739
        (160, 0.1859423525),  # x = 0.8: cos(0.8 pi) = -0.8090169944 -> 0.1 + 0.9 * 0.0954915028
        (200, 0.1),  # x = 1: lrf
    ],
)
def test_cosine_decay_by_hand(iteration, factor):
    lrs, momentum, _ = schedule_at(iteration, 20, cos_lr=True)
    assert lrs == pytest.approx([0.01 * factor] * 3, abs=1e-10) and momentum == 0.9
    linear, _, _ = schedule_at(iteration, 20, cos_lr=False)
    if iteration in (140, 160):  # below the linear schedule in the second half
        assert lrs[0] < linear[0]


def test_adamw_warms_its_learning_rate_and_leaves_its_betas():
    lrs, momentum, optimizer = schedule_at(50, 20, name="adamw")
    assert lrs == pytest.approx([0.0041, 0.0041, 0.0541], abs=1e-12)
    assert momentum is None  # AdamW groups have no momentum key, and the schedule adds none
    assert all(g["betas"] == (0.9, 0.999) for g in optimizer.param_groups)


# ------------------------------------------------------------------ EMA


def filled(model: nn.Module, value: float) -> nn.Module:
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.dtype.is_floating_point:
                tensor.fill_(value)
    return model


def ema_model() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))


def test_ema_blends_with_the_ramped_decay():
    model = filled(ema_model(), 1.0)
    ema = ModelEMA(model, decay=0.9, tau=2.0)
    filled(model, 3.0)
    model[1].num_batches_tracked.fill_(7)
    ema.update(model)
    d1 = 0.9 * (1 - math.exp(-1 / 2.0))  # 0.35412241
    expected = d1 * 1.0 + (1 - d1) * 3.0  # 2.29175518
    state = ema.module.state_dict()
    for key in ("0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"):
        assert torch.allclose(state[key], torch.full_like(state[key], expected), rtol=0, atol=1e-6), key
    assert state["1.num_batches_tracked"].dtype == torch.int64 and int(state["1.num_batches_tracked"]) == 7  # copied

    filled(model, -1.0)
    ema.update(model)
    d2 = 0.9 * (1 - math.exp(-2 / 2.0))  # 0.56890850
    second = d2 * expected + (1 - d2) * -1.0
    assert ema.updates == 2
    assert torch.allclose(ema.module[0].weight, torch.full((3, 2), second), rtol=0, atol=1e-6)


def test_ema_decay_ramps_towards_its_nominal_value():
    # After n updates from 0 to a constant change, the ema keeps prod(d_i) of its start: measure d_n one step at a time.
    for start_updates, decay, tau in [(0, 0.9999, 2000.0), (4000, 0.9999, 2000.0), (0, 0.5, 1.0)]:
        model = filled(ema_model(), 0.0)
        ema = ModelEMA(model, decay=decay, tau=tau, updates=start_updates)
        filled(ema.module, 1.0)  # ema at 1, model at 0: after one update the ema equals d
        ema.update(model)
        d = decay * (1 - math.exp(-(start_updates + 1) / tau))
        assert float(ema.module[0].weight[0, 0]) == pytest.approx(d, rel=1e-6)
    assert 0.9999 * (1 - math.exp(-1 / 2000)) < 1e-3  # the first updates follow the model almost exactly


def test_ema_is_a_frozen_eval_copy_independent_of_the_model():
    model = filled(ema_model(), 1.0).train()
    ema = ModelEMA(model)
    assert not ema.module.training
    assert all(not p.requires_grad for p in ema.module.parameters())
    filled(model, 5.0)  # changing the model without update leaves the ema alone
    assert torch.equal(ema.module[0].weight, torch.ones(3, 2))


def test_unwrap_model_goes_through_compile_wrappers():
    model = ema_model()
    compiled = torch.compile(model)  # OptimizedModule: the model in _orig_mod (nothing compiles until called)
    assert compiled is not model and unwrap_model(compiled) is model
    assert unwrap_model(model) is model

    class Wrapper(nn.Module):  # a wrapper that keeps the model in _orig_mod, wrapped twice
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    assert unwrap_model(Wrapper(Wrapper(model))) is model
    # ModelEMA.update reads the plain model's keys, not "_orig_mod.0.weight"
    ema = ModelEMA(filled(ema_model(), 0.0), decay=0.5, tau=1.0)
    ema.update(torch.compile(filled(model, 2.0)))
    d = 0.5 * (1 - math.exp(-1.0))
    assert torch.allclose(ema.module[0].weight, torch.full((3, 2), (1 - d) * 2.0), atol=1e-6)


@pytest.fixture
def single_process_group(tmp_path):
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_unwrap_model_goes_through_distributed_data_parallel(single_process_group):
    model = ema_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    assert unwrap_model(ddp) is model
    assert unwrap_model(torch.compile(ddp)) is model  # compile around DDP, as the trainer may do
    ema = ModelEMA(filled(ema_model(), 0.0), decay=0.5, tau=1.0)
    filled(model, 4.0)
    ema.update(ddp)  # DDP's own keys are "module.0.weight": the EMA must read the inner model's
    d = 0.5 * (1 - math.exp(-1.0))
    assert torch.allclose(ema.module[1].running_mean, torch.full((3,), (1 - d) * 4.0), atol=1e-6)
