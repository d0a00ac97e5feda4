"""``train_one_iteration`` on its own: one SGD update of a hand-made model under a method's
criterion, checked against an update derived here (plain autograd and ``p - lr * grad``)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from ucdseg.engine.loop import LoopOptions
from ucdseg.engine.loop import Criterion, NonFiniteLossError, Trainee, train_one_iteration
from ucdseg.engine.process_group import Dist
from ucdseg.methods import get_method
from ucdseg.models.deeplab import SegOutput

LR = 0.1


class PixelModel(torch.nn.Module):
    """A 1x1 convolution from 3 channels to ``classes`` logits, as a SegOutput."""

    def __init__(self, classes: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, classes, 1)

    def forward(self, x):
        logits = self.conv(x)
        return SegOutput(logits, logits, logits, [], [])


def trainee_of(model: torch.nn.Module) -> Trainee:
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 0.5 ** it)
    return Trainee(model, model, None, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False))


def options(accumulate: int = 1) -> LoopOptions:
    return LoopOptions(batch_size=4, accumulate=accumulate, amp_dtype=None, log_every=1, checkpoint_every=0,
                       compile=False, channels_last=False, bn="local", sampler_seed=0)


def batch():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 5, 5, generator=g)
    labels = torch.randint(0, 3, (4, 5, 5), generator=g)
    labels[0, 0, :2] = 255  # void pixels count as 0 in the mean (the releases' CE)
    return images, labels


CPU = Dist(0, 1, 0, torch.device("cpu"))


def test_one_iteration_is_one_sgd_update_of_the_methods_loss():
    model = PixelModel()
    reference = copy.deepcopy(model)
    images, labels = batch()
    criterion = Criterion(get_method("ft"), {"ce": 1.0}, {}, step=0, num_old=0, num_new=3)
    logged = train_one_iteration(trainee_of(model), criterion, images, labels, options(), CPU)

    loss = F.cross_entropy(reference.conv(images), labels, ignore_index=255, reduction="none").sum() / labels.numel()
    grads = torch.autograd.grad(loss, list(reference.parameters()))
    for p, ref, g in zip(model.parameters(), reference.parameters(), grads):
        torch.testing.assert_close(p.detach(), ref.detach() - LR * g, rtol=0, atol=1e-6)
    assert set(logged) == {"loss", "ce"}
    assert not logged["loss"].requires_grad
    torch.testing.assert_close(logged["loss"], loss.detach(), rtol=0, atol=1e-6)


def test_the_schedule_steps_once_per_iteration():
    model = PixelModel()
    trainee = trainee_of(model)
    criterion = Criterion(get_method("ft"), {"ce": 1.0}, {}, step=0, num_old=0, num_new=3)
    images, labels = batch()
    for expected in (LR, LR / 2, LR / 4):
        assert trainee.optimizer.param_groups[0]["lr"] == pytest.approx(expected)
        train_one_iteration(trainee, criterion, images, labels, options(), CPU)


def test_two_micro_batches_give_the_update_of_the_whole_batch():
    """``train.accumulate=2``: each half's loss divided by 2, the gradients summed; with equal halves
    and a per-pixel mean, that is the whole batch's gradient."""
    images, labels = batch()
    criterion = Criterion(get_method("ft"), {"ce": 1.0}, {}, step=0, num_old=0, num_new=3)
    whole, halves = PixelModel(), PixelModel()
    logged_whole = train_one_iteration(trainee_of(whole), criterion, images, labels, options(1), CPU)
    logged_halves = train_one_iteration(trainee_of(halves), criterion, images, labels, options(2), CPU)
    for a, b in zip(whole.parameters(), halves.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.testing.assert_close(logged_whole["loss"], logged_halves["loss"], rtol=0, atol=1e-6)


def test_a_non_finite_loss_stops_before_the_update_and_says_where():
    model = PixelModel()
    before = copy.deepcopy(model.state_dict())
    images, labels = batch()
    images[1, 0, 3, 3] = float("nan")  # a labelled pixel (a void one counts as 0 whatever its logits)
    criterion = Criterion(get_method("ft"), {"ce": 1.0}, {}, step=0, num_old=0, num_new=3)
    with pytest.raises(NonFiniteLossError, match="at step 0, iteration 7 .*ce=nan"):
        train_one_iteration(trainee_of(model), criterion, images, labels, options(), CPU, where="at step 0, iteration 7 ")
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
