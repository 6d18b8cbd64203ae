"""The focal-loss family: exactness against Eq. 5 / Appendix A / B, fvcore and torchvision."""

import functools
import itertools
import math

import pytest
import torch
import torchvision
from fvcore.nn import sigmoid_focal_loss as fvcore_focal
from fvcore.nn import sigmoid_focal_loss_star as fvcore_focal_star
from torch.nn import functional as F

from retinanet_plugin.losses import (
    alpha_balanced_ce,
    fused,
    sigmoid_focal_loss,
    sigmoid_focal_loss_from_labels,
    sigmoid_focal_loss_reference,
    sigmoid_focal_loss_star,
    sigmoid_focal_loss_star_from_labels,
    sigmoid_focal_loss_star_reference,
    softmax_focal_loss,
)

TINY = torch.finfo(torch.float32).tiny
SHAPES = [(0, 5), (17, 3), (2, 9, 4)]
ALPHAS = [0.25, 0.5, 0.9, -1.0]
GAMMAS = [0.0, 0.5, 1.0, 2.0, 5.0]


def _data(shape, dtype=torch.float64, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    t = (torch.rand(shape, generator=g) < 0.3).to(dtype)
    return x, t


def _value_and_grad(fn, x, *args, **kwargs):
    x = x.detach().clone().requires_grad_()
    loss = fn(x, *args, **kwargs)
    # A non-uniform upstream gradient checks that backward scales elementwise, not just sums.
    w = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    if loss.dim() == 0:
        w = torch.ones_like(loss)
    (grad,) = torch.autograd.grad((loss * w).sum(), x, allow_unused=True)
    return loss.detach(), torch.zeros_like(x) if grad is None else grad


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_fused_equals_eq5_and_torchvision_float64(shape, reduction):
    x, t = _data(shape)
    for alpha, gamma in itertools.product(ALPHAS, GAMMAS):
        ours, g_ours = _value_and_grad(sigmoid_focal_loss, x, t, alpha, gamma, reduction)
        ref, g_ref = _value_and_grad(sigmoid_focal_loss_reference, x, t, alpha, gamma, reduction)
        tv, g_tv = _value_and_grad(torchvision.ops.sigmoid_focal_loss, x, t, alpha, gamma,
                                   reduction)
        assert ours.dtype == torch.float64
        # equal_nan: the mean of an empty input is NaN in all three.
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-14, equal_nan=True)
        torch.testing.assert_close(ours, tv, rtol=1e-12, atol=1e-14, equal_nan=True)
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(g_ours, g_tv, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_fused_equals_fvcore_float32(reduction):
    x, t = _data((64, 10), torch.float32)
    for alpha, gamma in itertools.product([0.25, -1.0], [0.0, 1.0, 2.0]):
        ours, g_ours = _value_and_grad(sigmoid_focal_loss, x, t, alpha, gamma, reduction)
        theirs, g_theirs = _value_and_grad(fvcore_focal, x, t, alpha, gamma, reduction)
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(g_ours, g_theirs, rtol=2e-5, atol=1e-6)


def test_star_equals_appendix_a_and_fvcore():
    x, t = _data((40, 6))
    for gamma, beta, alpha in [(1.0, 0.0, -1), (2.0, 1.0, -1), (4.0, 0.0, 0.25)]:
        ours, g_ours = _value_and_grad(sigmoid_focal_loss_star, x, t, gamma, beta, alpha, "sum")
        ref, g_ref = _value_and_grad(sigmoid_focal_loss_star_reference, x, t, gamma, beta, alpha,
                                     "sum")
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=0)
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-15)
    # fvcore's FL* has no beta; with beta = 0 the two agree (fvcore works in float32).
    xf, tf = x.float(), t.float()
    ours, g_ours = _value_and_grad(sigmoid_focal_loss_star, xf, tf, 2.0, 0.0, -1, "none")
    theirs, g_theirs = _value_and_grad(fvcore_focal_star, xf, tf, -1, 2.0, "none")
    torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(g_ours, g_theirs, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("gamma", [0.5, 2.0, 5.0])
def test_gradient_equals_appendix_b(gamma):
    # Appendix B (no alpha): dFL/dx = y (1 - p_t)^gamma (gamma p_t log(p_t) + p_t - 1), y = +-1.
    x, t = _data((30, 4), scale=4.0)
    _, grad = _value_and_grad(lambda z: sigmoid_focal_loss(z, t, -1, gamma, "sum"), x)
    y = 2 * t - 1
    p_t = torch.sigmoid(y * x)
    expected = y * (1 - p_t) ** gamma * (gamma * p_t * torch.log(p_t) + p_t - 1)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-15)
    # dCE/dx = y (p_t - 1) for gamma = 0.
    _, grad_ce = _value_and_grad(lambda z: sigmoid_focal_loss(z, t, -1, 0.0, "sum"), x)
    torch.testing.assert_close(grad_ce, y * (p_t - 1), rtol=1e-12, atol=1e-15)
    # FL*: dFL*/dx = y (p*_t - 1), p*_t = sigmoid(gamma x_t + beta).
    _, grad_star = _value_and_grad(lambda z: sigmoid_focal_loss_star(z, t, gamma, 1.0, -1, "sum"),
                                   x)
    p_star = torch.sigmoid(gamma * y * x + 1.0)
    torch.testing.assert_close(grad_star, y * (p_star - 1), rtol=1e-10, atol=1e-15)


def test_gradcheck_float64():
    x, t = _data((6, 3))
    labels = torch.tensor([0, 3, -1, 2, 1, 3])
    x = x.requires_grad_()
    assert torch.autograd.gradcheck(lambda z: sigmoid_focal_loss(z, t, 0.3, 1.5, "none"), (x,))
    assert torch.autograd.gradcheck(lambda z: sigmoid_focal_loss_star(z, t, 2.0, 1.0), (x,))
    assert torch.autograd.gradcheck(
        lambda z: sigmoid_focal_loss_from_labels(z, labels, 0.25, 2.0, "sum"), (x,)
    )
    assert torch.autograd.gradcheck(
        lambda z: softmax_focal_loss(z, labels.clamp(max=2), 0.25, 2.0, 2, "sum"), (x,)
    )


def test_golden_values_of_the_paper():
    # Sec. 3.2: with gamma = 2, p_t = 0.9 gets (1 - 0.9)^2 = 1/100 of CE's loss and p_t = 0.968
    # gets 0.032^2 = 1/976.6 (the paper's "1000x").
    for p_t, ratio in [(0.9, 0.01), (0.968, 0.032**2)]:
        x = torch.tensor([math.log(p_t / (1 - p_t))], dtype=torch.float64)
        t = torch.ones(1, dtype=torch.float64)
        fl = sigmoid_focal_loss(x, t, -1, 2.0)
        ce = sigmoid_focal_loss(x, t, -1, 0.0)
        torch.testing.assert_close(ce, torch.tensor([-math.log(p_t)], dtype=torch.float64))
        torch.testing.assert_close(fl / ce, torch.tensor([ratio], dtype=torch.float64))
    # alpha-balanced CE of a negative at p = 0.5: (1 - 0.25) * log 2.
    zero = torch.zeros(1, dtype=torch.float64)
    torch.testing.assert_close(alpha_balanced_ce(zero, zero, 0.25),
                               torch.tensor([0.75 * math.log(2)], dtype=torch.float64))


@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_from_labels_equals_dense_one_hot(gamma):
    x, _ = _data((50, 7))
    labels = torch.randint(-1, 8, (50,), generator=torch.Generator().manual_seed(1))
    valid = labels >= 0
    one_hot = F.one_hot(labels.clamp(min=0), 8)[:, :7].double()
    ours, g_ours = _value_and_grad(
        lambda z: sigmoid_focal_loss_from_labels(z, labels, 0.25, gamma, "sum"), x
    )
    dense, g_dense = _value_and_grad(
        lambda z: sigmoid_focal_loss_reference(z[valid], one_hot[valid], 0.25, gamma, "sum"), x
    )
    torch.testing.assert_close(ours, dense, rtol=1e-12, atol=0)
    torch.testing.assert_close(g_ours, g_dense, rtol=1e-10, atol=1e-15)
    assert (g_ours[~valid] == 0).all()
    # A per-class alpha vector weighs each column's positives by its own alpha.
    alphas = torch.linspace(0.1, 0.9, 7, dtype=torch.float64)
    per_class = sigmoid_focal_loss_from_labels(x, labels, gamma=gamma, reduction="none",
                                               alpha_per_class=alphas)
    expected = sigmoid_focal_loss_reference(x, one_hot, -1, gamma) * (
        one_hot * alphas + (1 - one_hot) * (1 - alphas)
    )
    torch.testing.assert_close(per_class, expected * valid.unsqueeze(1), rtol=1e-12, atol=1e-20)
    star = sigmoid_focal_loss_star_from_labels(x, labels, 2.0, 1.0)
    star_dense = sigmoid_focal_loss_star_reference(x[valid], one_hot[valid], 2.0, 1.0,
                                                   reduction="sum")
    torch.testing.assert_close(star, star_dense, rtol=1e-12, atol=0)


def test_large_logits_float32_match_float64():
    # |x| up to 1e4: every combination of confidently right / wrong positive / negative.
    x64 = torch.tensor([-1e4, -300.0, -30.0, -10.0, 0.0, 10.0, 30.0, 300.0, 1e4],
                       dtype=torch.float64).repeat(2, 1)
    t64 = torch.zeros_like(x64)
    t64[1] = 1
    truth = sigmoid_focal_loss_reference(x64, t64, 0.25, 2.0)
    for fn in (sigmoid_focal_loss, sigmoid_focal_loss_star):
        args = (0.25, 2.0) if fn is sigmoid_focal_loss else (2.0, 0.0, 0.25)
        loss, grad = _value_and_grad(fn, x64.float(), t64.float(), *args)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        if fn is sigmoid_focal_loss:
            torch.testing.assert_close(loss.double(), truth, rtol=1e-5, atol=1e-30)
    # A confidently wrong negative (x = 1e4, t = 0) costs (1 - alpha) * 1e4, not a clamped value.
    assert loss is not None
    wrong = sigmoid_focal_loss(torch.tensor([1e4]), torch.tensor([0.0]), 0.25, 2.0)
    torch.testing.assert_close(wrong, torch.tensor([0.75 * 1e4]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_computed_in_float32(dtype):
    # A background logit of -30 in fp16 (exp(-30) underflows fp16) and confident wrong answers.
    x = torch.tensor([[-30.0, 30.0, -8.0, 0.5], [15.0, -15.0, 3.0, -0.25]], dtype=dtype)
    t = torch.tensor([[0.0, 0.0, 1.0, 0.0], [1.0, 1.0, 0.0, 1.0]], dtype=dtype)
    loss, grad = _value_and_grad(sigmoid_focal_loss, x, t, 0.25, 2.0)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    truth = sigmoid_focal_loss_reference(x.double(), t.double(), 0.25, 2.0)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), truth, rtol=1e-5, atol=1e-12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = torch.nn.Linear(4, 4)(x.float())
        assert logits.dtype == torch.bfloat16
        auto = sigmoid_focal_loss(logits, t.float(), reduction="sum")
    assert auto.dtype == torch.float32 and torch.isfinite(auto)


def test_inputs_not_modified_in_place():
    x, t = _data((20, 5), torch.float32)
    labels = torch.randint(-1, 6, (20,))
    snapshots = [z.clone() for z in (x, t, labels)]
    x = x.requires_grad_()
    versions = (x._version, t._version, labels._version)
    (sigmoid_focal_loss(x, t, reduction="sum") + sigmoid_focal_loss_star(x, t).sum()
     + sigmoid_focal_loss_from_labels(x, labels)).backward()
    for now, before in zip((x.detach(), t, labels), snapshots):
        assert torch.equal(now, before)
    assert (x._version, t._version, labels._version) == versions


def test_tiny_gradients_are_flushed_not_subnormal():
    # Extreme negatives give d loss / dx ~ exp(-3x) that is subnormal in float32 before scaling.
    x = torch.linspace(10, 40, 2000).reshape(200, 10)
    labels = torch.full((200,), 10)
    x = x.neg().requires_grad_()
    (sigmoid_focal_loss_from_labels(x, labels) / 1e6).backward()
    g = x.grad.abs()
    assert (g > 0).any()
    assert ((g == 0) | (g >= TINY)).all()


def test_softmax_focal_loss_golden_values():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 0.0, 0.0], [1.0, 2.0, 3.0]],
                          dtype=torch.float64)
    labels = torch.tensor([0, 2, -1])
    # gamma = 0 and no alpha is plain softmax cross-entropy over the non-ignored rows.
    ce = F.cross_entropy(logits[:2], labels[:2], reduction="sum")
    torch.testing.assert_close(softmax_focal_loss(logits, labels, -1, 0.0, reduction="sum"), ce)
    # Row 1: uniform over 3 classes, p_t = 1/3, background (index 2) weighted 1 - alpha:
    # 0.75 * (2/3)^2 * log 3.
    loss = softmax_focal_loss(logits, labels, 0.25, 2.0, background_index=2)
    torch.testing.assert_close(loss[1], torch.tensor(0.75 * (2 / 3) ** 2 * math.log(3),
                                                     dtype=torch.float64))
    assert loss[2] == 0


def test_bad_arguments_are_named():
    x, t = _data((4, 3))
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        sigmoid_focal_loss(x, t, gamma=-1.0)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        sigmoid_focal_loss(x, t, alpha=1.5)
    with pytest.raises(ValueError, match="targets must have the logits' shape"):
        sigmoid_focal_loss(x, t[:2])
    with pytest.raises(ValueError, match="reduction"):
        sigmoid_focal_loss(x, t, reduction="avg")
    with pytest.raises(ValueError, match="gamma must be > 0 for FL"):
        sigmoid_focal_loss_star(x, t, gamma=0.0)
    with pytest.raises(TypeError, match="integer tensor of class indices"):
        sigmoid_focal_loss_from_labels(x, t[:, 0])


def test_fused_kernels_are_compiled_here():
    # The benchmark's speed comes from the compiled kernels: they must not have fallen back.
    x, t = _data((8, 3), torch.float32)
    sigmoid_focal_loss(x, t)
    assert fused.dense_focal.backend == ("inductor" if fused._compile_enabled() else "eager")


def test_kernel_variants_do_not_share_dynamos_recompile_limit(monkeypatch):
    # One code object for every variant (alpha or not, each gamma mode, sum or not) used to hit
    # Dynamo's recompile limit in a long process, after which new variants ran eagerly without
    # a word. With the limit at 1, three variants must still give three compiled graphs.
    import torch._dynamo
    from torch._dynamo.utils import counters

    limit_name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") \
        else "cache_size_limit"
    # Dynamo's tracing and guards without Inductor's code generation (seconds per variant).
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    monkeypatch.setattr(fused, "_compile_enabled", lambda: True)
    kernel = fused._Kernel(fused._label_focal)
    x = torch.randn(6, 3)
    labels = torch.tensor([0, 1, 2, 3, -1, 1]).unsqueeze(-1)
    variants = [(True, 2), (False, 2), (True, 0)]
    target = F.one_hot(labels[:, 0].clamp(min=0), 4)[:, :3].double()
    valid = labels[:, 0] >= 0
    expected = [sigmoid_focal_loss_reference(x.double()[valid], target[valid],
                                             0.25 if use_alpha else -1.0, float(mode), "sum")
                for use_alpha, mode in variants]
    before = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch({limit_name: 1}):
        for (use_alpha, mode), want in zip(variants, expected):
            alpha, gamma = torch.tensor(0.25), torch.tensor(float(mode))
            loss, _ = kernel(x, labels, alpha, gamma, use_alpha, mode, None, -1, True)
            torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] - before == 3
    assert len(kernel._variants) == 3


def test_unit_upstream_gradient_skips_the_rescale_pass(monkeypatch):
    # loss.backward() on a summed loss hands the kept gradient over without a rescale pass;
    # any other upstream gradient is still applied.
    calls = []
    real = fused.scale_grad_
    monkeypatch.setattr(fused, "scale_grad_", lambda g, s: calls.append(1) or real(g, s))
    x, t = _data((6, 3), torch.float64)
    (g_ref,) = torch.autograd.grad(sigmoid_focal_loss_reference(x.requires_grad_(), t, 0.25, 2.0,
                                                                "sum"), x)
    leaf = x.detach().clone().requires_grad_()
    sigmoid_focal_loss(leaf, t, reduction="sum").backward()
    assert calls == []
    torch.testing.assert_close(leaf.grad, g_ref)
    leaf.grad = None
    (3 * sigmoid_focal_loss(leaf, t, reduction="sum")).backward()
    assert calls == [1]
    torch.testing.assert_close(leaf.grad, 3 * g_ref)


def test_repeated_backward_with_retain_graph_gives_the_same_gradient():
    # The first backward rescales the kept gradient in place; later ones must still be right.
    x, t = _data((5, 3), torch.float32)
    x.requires_grad_()
    loss = sigmoid_focal_loss(x, t, reduction="sum")
    (g1,) = torch.autograd.grad(loss * 3, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss * 0.5, x)
    _, expected = _value_and_grad(sigmoid_focal_loss_reference, x, t, 0.25, 2.0, "sum")
    torch.testing.assert_close(g1, 3 * expected)
    torch.testing.assert_close(g2, 0.5 * expected)


def test_negative_or_above_one_per_class_alpha_is_refused():
    # Issue 11.1: taken literally, alpha_k = -1 weighs a negative by 1 - (-1) = 2 and a positive
    # by -1, a negative loss; the scalar's "disabled" meaning does not apply to a vector.
    x, _ = _data((4, 2))
    labels = torch.tensor([0, 1, 2, -1])
    for bad in ([-1.0, 0.25], [0.25, 1.5]):
        with pytest.raises(ValueError, match=r"alpha_per_class\[\d\] = .* must be in \[0, 1\]"):
            sigmoid_focal_loss_from_labels(x, labels, alpha_per_class=torch.tensor(bad))
        with pytest.raises(ValueError, match=r"alpha_per_class\[\d\] = .* must be in \[0, 1\]"):
            sigmoid_focal_loss_star_from_labels(x, labels, alpha_per_class=torch.tensor(bad))


@pytest.mark.parametrize("gamma", [0.2, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softmax_focal_loss_gradient_is_finite_when_p_t_rounds_to_one(gamma, dtype):
    # Issue 11.3: (1 - p_t)^gamma has an infinite derivative at p_t = 1 for gamma < 1; rows whose
    # p_t rounds to 1 (and ignored rows, through 0 * inf) gave NaN gradients.
    logits = torch.tensor([[30.0, -30.0, 0.0], [-30.0, 30.0, -30.0], [0.5, -0.5, 30.0],
                           [30.0, -30.0, -30.0], [1.0, 2.0, -1.0]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, -1, 0])  # confident right answers, one ignored row
    w = torch.tensor([1.0, 2.0, 0.5, 1.5, 3.0], dtype=torch.float64)
    x = logits.to(dtype).clone().requires_grad_()
    loss = softmax_focal_loss(x, labels, 0.25, gamma, background_index=2)
    (loss.double() * w).sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all()
    # The float64 reference, term by term with autograd: NaN where p_t rounds to 1.
    ref_x = logits.clone().requires_grad_()
    log_p_t = F.log_softmax(ref_x, -1).gather(-1, labels.clamp(min=0)[:, None]).squeeze(-1)
    alpha_t = torch.where(labels == 2, 0.75, 0.25).double() * (labels >= 0)
    ref = -alpha_t * (1 - log_p_t.exp()) ** gamma * log_p_t
    (ref * w).sum().backward()
    finite = torch.isfinite(ref_x.grad).all(-1)
    assert not finite.all() and finite[4]  # the reference does fail here, and not everywhere
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(loss.double(), ref.detach(), **tol)
    torch.testing.assert_close(x.grad.double()[finite], ref_x.grad[finite], **tol)
    # Where p_t rounds to 1 the limit is 0 (q^gamma -> 0, its factor stays finite); the ignored
    # row has no gradient at all.
    assert (x.grad[~finite] == 0).all()
    # Analytic gradient against finite differences at moderate logits, small gamma included.
    z = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert torch.autograd.gradcheck(
        lambda v: softmax_focal_loss(v, labels, 0.25, gamma, 2, "none"), (z.requires_grad_(),)
    )


def test_backward_with_retain_graph_on_a_leaf_accumulates_exactly():
    # Issue 11.4: the first backward handed autograd a view of the kept gradient, which
    # AccumulateGrad adopted as x.grad: later backwards accumulated into the kept buffer (4g
    # after three backwards) and zeroing x.grad zeroed it.
    x, t = _data((6, 4), torch.float32)
    _, g = _value_and_grad(sigmoid_focal_loss_reference, x, t, 0.25, 2.0, "sum")
    for fn in (lambda z: sigmoid_focal_loss(z, t, reduction="sum"),
               lambda z: sigmoid_focal_loss(z, t, reduction="none").sum()):
        leaf = x.clone().requires_grad_()
        loss = fn(leaf)
        for _ in range(3):
            loss.backward(retain_graph=True)
        torch.testing.assert_close(leaf.grad, 3 * g)
        leaf = x.clone().requires_grad_()
        loss = fn(leaf)
        for _ in range(3):
            loss.backward(retain_graph=True)
            torch.testing.assert_close(leaf.grad, g)
            leaf.grad.zero_()


@pytest.fixture
def compiled_kernel():
    """The dense kernel, compiled, with its state restored afterwards."""
    if not fused._compile_enabled():
        pytest.skip("RETINANET_PLUGIN_COMPILE=0: the eager path has no compiled call to fail")
    kernel = fused.dense_focal
    x, t = _data((8, 3), torch.float32)
    sigmoid_focal_loss(x, t)
    assert kernel.backend == "inductor" and not kernel._failed
    yield kernel, x, t
    kernel._failed = False


def test_error_inside_a_compiled_call_is_raised_and_not_sticky(compiled_kernel, monkeypatch):
    # Issue 11.5: any exception (an OOM, a wrong device) used to switch the kernel to eager for
    # the rest of the process.
    kernel, x, t = compiled_kernel
    compiled = kernel.compiled(fused._kernel_args(x, [x, t, 0.25, 2.0, True, 2, False]))
    calls = []

    def failing(*args):
        calls.append(1)
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(kernel, "compiled", lambda args: failing)
    with pytest.raises(torch.OutOfMemoryError, match="simulated"):
        sigmoid_focal_loss(x, t)
    assert not kernel._failed and calls == [1]

    def counting(*args):
        calls.append(2)
        return compiled(*args)

    monkeypatch.setattr(kernel, "compiled", lambda args: counting)
    expected = sigmoid_focal_loss_reference(x, t)
    torch.testing.assert_close(sigmoid_focal_loss(x, t), expected)
    assert calls == [1, 2]  # the next call ran compiled again


def test_compilation_failure_falls_back_to_eager_with_a_log_line(compiled_kernel, caplog,
                                                                monkeypatch):
    kernel, x, t = compiled_kernel
    import torch._inductor.exc as inductor_exc

    def failing(*args):
        raise inductor_exc.InvalidCxxCompiler()

    monkeypatch.setattr(kernel, "compiled", lambda args: failing)
    with caplog.at_level("WARNING", logger=fused.__name__):
        loss = sigmoid_focal_loss(x, t)
    torch.testing.assert_close(loss, sigmoid_focal_loss_reference(x, t))
    assert kernel._failed
    assert "torch.compile of _dense_focal failed (InvalidCxxCompiler" in caplog.text
    assert "using eager kernels" in caplog.text


@pytest.mark.parametrize("compile_flag", ["1", "0"])
def test_target_dtypes_are_checked_alike_on_compiled_and_eager_paths(compile_flag, monkeypatch):
    # Issue 11.8: bool targets passed through the compiled kernel and failed in the eager one.
    monkeypatch.setenv("RETINANET_PLUGIN_COMPILE", compile_flag)
    x, t = _data((6, 3), torch.float32)
    labels = torch.tensor([0, 3, -1, 2, 1, 3])
    for fn in (sigmoid_focal_loss, sigmoid_focal_loss_star):
        with pytest.raises(TypeError, match="targets must be a floating-point tensor.*torch.bool"):
            fn(x, t.bool())
        with pytest.raises(TypeError, match="targets must be a floating-point tensor.*torch.int64"):
            fn(x, t.long())
    for fn in (sigmoid_focal_loss_from_labels, sigmoid_focal_loss_star_from_labels):
        with pytest.raises(TypeError, match="labels must be an integer tensor.*torch.bool"):
            fn(x, labels >= 1)
        with pytest.raises(TypeError, match="logits must be a floating-point tensor"):
            fn(x.long(), labels)
    with pytest.raises(TypeError, match="labels must be an integer tensor.*torch.bool"):
        softmax_focal_loss(x, labels >= 1)
    # What is accepted gives the same numbers on both paths (int32 labels, float targets).
    torch.testing.assert_close(sigmoid_focal_loss_from_labels(x, labels.int()),
                               sigmoid_focal_loss_from_labels(x, labels))
    torch.testing.assert_close(sigmoid_focal_loss(x, t), sigmoid_focal_loss_reference(x, t))


# ---------------------------------------------------------------------------------------------
# The head-layout path (issue 10): loss and gradient per level, in (N, A*K, Hi, Wi)
# ---------------------------------------------------------------------------------------------
LEVELS = [(4, 5), (2, 3), (1, 2)]  # (Hi, Wi); R = (20 + 6 + 2) * A


def _levels(num_images=2, a=3, k=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    levels = [(torch.randn(num_images, a * k, h, w, generator=g, dtype=torch.float64) * 4)
              .to(dtype) for h, w in LEVELS]
    r = a * sum(h * w for h, w in LEVELS)
    labels = torch.randint(-1, k + 1, (num_images, r), generator=g)  # ignored and background too
    return levels, labels


def _concat(levels, k):
    from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K

    return torch.cat([permute_to_N_HWA_K(x, k) for x in levels], dim=1)


def _levels_value_and_grads(fn, levels, *args, **kwargs):
    xs = [x.detach().clone().requires_grad_() for x in levels]
    loss = fn(xs, *args, **kwargs)
    loss.backward()
    return loss.detach(), [x.grad for x in xs]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_per_level_loss_equals_concatenated_loss_and_eq5(dtype, monkeypatch):
    from retinanet_plugin.losses import sigmoid_focal_loss_per_level

    # Eager kernels: the same code as the compiled ones (the detector's compiled variant is
    # tested below and by test_parity), without a compilation per dtype / alpha variant.
    monkeypatch.setenv("RETINANET_PLUGIN_COMPILE", "0")
    k = 4
    levels, labels = _levels(dtype=dtype)
    alphas = torch.tensor([0.1, 0.4, 0.6, 0.9])
    for alpha_per_class in (None, alphas):
        ours, g_ours = _levels_value_and_grads(sigmoid_focal_loss_per_level, levels, labels,
                                               0.25, 2.0, alpha_per_class=alpha_per_class)
        # The same loss on detectron2's (N, R, K) concatenation, by the flat fused kernel ...
        flat, g_flat = _levels_value_and_grads(
            lambda xs: sigmoid_focal_loss_from_labels(_concat(xs, k), labels, 0.25, 2.0,
                                                      alpha_per_class=alpha_per_class), levels)
        assert ours.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert all(g.dtype == dtype and g.shape == x.shape for g, x in zip(g_ours, levels))
        torch.testing.assert_close(ours, flat, rtol=1e-12 if dtype == torch.float64 else 1e-6,
                                   atol=0)
        for a, b in zip(g_ours, g_flat):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=0)  # elementwise, same arithmetic
        # ... and by Eq. 5 term by term (float64, autograd) over the non-ignored anchors.
        valid = labels >= 0
        one_hot = F.one_hot(labels.clamp(min=0), k + 1)[..., :k].double()
        a_t = 1.0 if alpha_per_class is None else (
            one_hot * alphas.double() + (1 - one_hot) * (1 - alphas.double()))
        ref, g_ref = _levels_value_and_grads(
            lambda xs: ((sigmoid_focal_loss_reference(_concat(xs, k), one_hot,
                                                      0.25 if alpha_per_class is None else -1,
                                                      2.0) * a_t)[valid]).sum(),
            [x.double() for x in levels])
        tol = dict(rtol=1e-12, atol=1e-15) if dtype == torch.float64 else dict(rtol=2e-3,
                                                                               atol=1e-5)
        torch.testing.assert_close(ours.double(), ref, **tol)
        for a, b in zip(g_ours, g_ref):
            torch.testing.assert_close(a.double(), b, **tol)
        # Ignored anchors get no gradient, in the head's layout: anchor r of a level is
        # (h, w, a) with r = (h * Wi + w) * A + a, channels a * K .. a * K + K - 1.
        n, r = torch.nonzero(~valid)[0].tolist()
        assert r < 3 * 20  # in the first level (4 x 5 locations, A = 3)
        hw, a_idx = divmod(r, 3)
        assert (g_ours[0][n, a_idx * k:(a_idx + 1) * k, hw // 5, hw % 5] == 0).all()


def test_per_level_star_and_gamma_zero_equal_concatenated(monkeypatch):
    from retinanet_plugin.losses import (
        sigmoid_focal_loss_per_level,
        sigmoid_focal_loss_star_per_level,
    )

    monkeypatch.setenv("RETINANET_PLUGIN_COMPILE", "0")  # as above
    levels, labels = _levels()
    for fn, flat_fn, args in [
        (sigmoid_focal_loss_star_per_level, sigmoid_focal_loss_star_from_labels, (2.0, 1.0, 0.25)),
        (sigmoid_focal_loss_per_level, sigmoid_focal_loss_from_labels, (0.75, 0.0)),
    ]:
        ours, g_ours = _levels_value_and_grads(fn, levels, labels, *args)
        flat, g_flat = _levels_value_and_grads(
            lambda xs: flat_fn(_concat(xs, 4), labels, *args), levels)
        torch.testing.assert_close(ours, flat, rtol=1e-12, atol=0)
        for a, b in zip(g_ours, g_flat):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def test_per_level_compiled_kernel_equals_eq5():
    # The detector's variant (float32, alpha 0.25, gamma 2) through the compiled kernel.
    from retinanet_plugin.losses import sigmoid_focal_loss_per_level

    levels, labels = _levels(dtype=torch.float32)
    ours, g_ours = _levels_value_and_grads(sigmoid_focal_loss_per_level, levels, labels)
    assert fused.label_focal.backend == ("inductor" if fused._compile_enabled() else "eager")
    valid = labels >= 0
    one_hot = F.one_hot(labels.clamp(min=0), 5)[..., :4].double()
    ref, g_ref = _levels_value_and_grads(
        lambda xs: sigmoid_focal_loss_reference(_concat(xs, 4), one_hot, 0.25, 2.0)[valid].sum(),
        [x.double() for x in levels])
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=0)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-7)


def test_per_level_empty_batch_and_bad_shapes():
    from retinanet_plugin.losses import sigmoid_focal_loss_per_level

    levels, labels = _levels(num_images=0)
    loss, grads = _levels_value_and_grads(sigmoid_focal_loss_per_level, levels, labels)
    assert loss.item() == 0 and all(g.shape == x.shape for g, x in zip(grads, levels))
    levels, labels = _levels()
    with pytest.raises(ValueError, match="anchors do not fit the levels' shapes"):
        sigmoid_focal_loss_per_level(levels, labels[:, :-1])
    with pytest.raises(ValueError, match="anchors do not fit the levels' shapes"):
        sigmoid_focal_loss_per_level([levels[0][:, :-1]] + levels[1:], labels)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        sigmoid_focal_loss_per_level(levels, labels >= 0)
    with pytest.raises(ValueError, match=r"alpha_per_class\[0\] = -1.0 must be in \[0, 1\]"):
        sigmoid_focal_loss_per_level(levels, labels, alpha_per_class=torch.tensor([-1.0, 0, 0, 0]))


def test_detector_losses_skip_the_concatenation_only_when_the_loss_can(monkeypatch):
    # FocalRetinaNet.losses takes the head's per-level logits; a loss with forward_levels gets
    # them as they are (no permute + cat), others get the (N, R, K) concatenation; both give the
    # values and head gradients of the concatenated call.
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    import retinanet_plugin.meta_arch as meta_arch
    from retinanet_plugin.losses import SoftmaxFocalLoss

    from small_config import small_retinanet_cfg

    cfg = small_retinanet_cfg(num_convs=1)
    cfg.MODEL.META_ARCHITECTURE = "FocalRetinaNet"
    cfg.MODEL.RETINANET.NUM_CLASSES = 4
    model = build_model(cfg)
    levels, labels = _levels(a=9, dtype=torch.float32)
    labels[labels == 4] = model.num_classes  # background
    r = labels.shape[1]
    anchors = torch.rand(r, 2) * 50
    anchors = torch.cat([anchors, anchors + 20], dim=1)
    deltas = torch.zeros(2, r, 4)
    boxes = anchors.expand(2, r, 4).clone()
    for cls_loss, concatenates in [(model.cls_loss, False), (SoftmaxFocalLoss(), True)]:
        model.cls_loss = cls_loss
        with EventStorage():
            model.loss_normalizer = meta_arch.LossNormalizer("batch")
            ref, g_ref = _levels_value_and_grads(
                lambda xs: model.losses(anchors, _concat(xs, 4), labels, deltas, boxes)["loss_cls"],
                levels)
            calls = []
            real = meta_arch.permute_to_N_HWA_K
            monkeypatch.setattr(meta_arch, "permute_to_N_HWA_K",
                                lambda *a: calls.append(1) or real(*a))
            ours, g_ours = _levels_value_and_grads(
                lambda xs: model.losses(anchors, xs, labels, deltas, boxes)["loss_cls"], levels)
            monkeypatch.setattr(meta_arch, "permute_to_N_HWA_K", real)
        assert bool(calls) == concatenates
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
        for a, b in zip(g_ours, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)
