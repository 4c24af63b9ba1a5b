"""Optimizer with parameter groups, learning-rate schedule with warmup, and the EMA of weights."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

# optimizer "auto": SGD for long runs, AdamW at a fixed learning rate for short ones, where SGD's lr0 with warmup
# has too few steps to settle. The one place this rule lives.
AUTO_SGD_MIN_STEPS = 10_000  # optimizer steps (after gradient accumulation) from which auto picks SGD
AUTO_ADAMW_LR = 0.002  # AdamW's learning rate when auto picks it
MIN_WARMUP_ITERATIONS = 100  # a warmup shorter than this is too abrupt on tiny datasets with few batches per epoch
ADAM_BETA2 = 0.999  # AdamW's second-moment decay (PyTorch's default); beta1 is cfg.momentum
EMA_RAMP_UPDATES = 2000.0  # EMA decay reaches 63% of its final value after this many updates (tau)


def resolve_optimizer(name: str, lr0: float, optimizer_steps: int) -> tuple[str, float]:
    """(optimizer, initial learning rate) that a run of optimizer_steps steps trains with."""
    if name != "auto":
        return name, lr0
    if optimizer_steps >= AUTO_SGD_MIN_STEPS:
        return "sgd", lr0
    return "adamw", AUTO_ADAMW_LR


def build_optimizer(
    model: nn.Module, name: str, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    """SGD or AdamW with three groups: weights (decayed), norm weights and biases (not decayed).

    Group order: 0 = weights with decay, 1 = norm weights, 2 = biases (the warmup treats biases specially).
    """
    decay, norms, biases = [], [], []
    seen: set[int] = set()  # a parameter shared by several modules (tied weights) joins one group, once
    for module in model.modules():
        for name_, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            if name_ == "bias":
                biases.append(param)
            elif isinstance(module, nn.modules.batchnorm._BatchNorm | nn.GroupNorm | nn.LayerNorm):
                norms.append(param)
            else:
                decay.append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": norms, "weight_decay": 0.0},
        {"params": biases, "weight_decay": 0.0},
    ]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)  # Nesterov needs momentum
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(momentum, ADAM_BETA2))
    raise ValueError(f"optimizer must be sgd, adamw or auto, got {name!r}")


def lr_factor(epoch_progress: float, epochs: int, lrf: float, cosine: bool) -> float:
    """Multiplier of lr0 at a (fractional) epoch: linear or cosine from 1 to lrf over the run."""
    x = min(max(epoch_progress / max(epochs, 1), 0.0), 1.0)
    if cosine:
        return lrf + (1 - lrf) * (1 + math.cos(math.pi * x)) / 2
    return (1 - x) * (1 - lrf) + lrf


def apply_schedule(optimizer: torch.optim.Optimizer, cfg, iteration: int, iterations_per_epoch: int) -> None:
    """Sets each group's lr (and momentum) for this iteration: warmup first, then the epoch schedule."""
    epoch = iteration // max(iterations_per_epoch, 1)
    target = cfg.lr0 * lr_factor(epoch, cfg.epochs, cfg.lrf, cfg.cos_lr)
    warmup_iterations = 0
    if cfg.warmup_epochs > 0:
        warmup_iterations = max(round(cfg.warmup_epochs * iterations_per_epoch), MIN_WARMUP_ITERATIONS)
    warmup_iterations = min(warmup_iterations, cfg.epochs * iterations_per_epoch // 2)
    for index, group in enumerate(optimizer.param_groups):
        if iteration < warmup_iterations:
            start = cfg.warmup_bias_lr if index == 2 else 0.0
            t = iteration / warmup_iterations
            group["lr"] = start + (target - start) * t
            if "momentum" in group:
                group["momentum"] = cfg.warmup_momentum + (cfg.momentum - cfg.warmup_momentum) * t
        else:
            group["lr"] = target
            if "momentum" in group:
                group["momentum"] = cfg.momentum


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model inside DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


class ModelEMA:
    """Exponential moving average of a model's weights and buffers; decay ramps up over the first updates."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = EMA_RAMP_UPDATES, updates: int = 0):
        self.module = copy.deepcopy(model).eval()
        for param in self.module.parameters():
            param.requires_grad_(False)
        self.decay, self.tau, self.updates = decay, tau, updates

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.tau))
        source = unwrap_model(model).state_dict()
        for key, value in self.module.state_dict().items():
            if value.dtype.is_floating_point:
                value.mul_(d).add_(source[key].detach(), alpha=1 - d)
            else:
                value.copy_(source[key])
