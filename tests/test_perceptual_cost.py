"""The perceptual step computes only what its loss needs: no gradients for the frozen loss networks' weights, the
same loss values and LoRA gradients as with their heads left trainable (lpips' default)."""
from __future__ import annotations

import pytest
import torch

from customgen.train import build_run
from customgen.train import loop
from tests.test_train import data, recipe_cfg  # noqa: F401 - the shared tiny training data fixture


def lora_grads(run) -> list[torch.Tensor]:
    return [p.grad.clone() for n, p in run.comps.unet.named_parameters() if "lora_" in n and p.grad is not None]


@pytest.mark.parametrize("lpips_net", ["vgg", "alex"])
def test_loss_networks_get_no_weight_gradients_and_nothing_else_changes(data, tmp_path, lpips_net):  # noqa: F811
    cfg = recipe_cfg("lora_style", data, "loss.lpips=1", "loss.gram=1", f"loss.lpips_net={lpips_net}")
    run = build_run(cfg, tmp_path / "frozen")
    nets = [run.perceptual.lpips, run.perceptual.vgg]
    assert not any(p.requires_grad for net in nets for p in net.parameters())
    losses = loop.step_losses(run, 0)
    losses["loss"].backward()
    assert all(p.grad is None for net in nets for p in net.parameters())
    frozen = {k: float(v) for k, v in losses.items()}, lora_grads(run)

    run.comps.unet.zero_grad(set_to_none=True)
    run.perceptual.lpips.lins.requires_grad_(True)  # what lpips.LPIPS builds: trainable linear heads
    losses = loop.step_losses(run, 0)
    losses["loss"].backward()
    assert any(p.grad is not None for p in run.perceptual.lpips.lins.parameters())  # the work the step skips
    assert {k: float(v) for k, v in losses.items()} == frozen[0]
    assert all(torch.equal(a, b) for a, b in zip(lora_grads(run), frozen[1])) and frozen[1]
