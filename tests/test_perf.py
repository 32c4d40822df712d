"""Exactness of the speed-ups (issue 19): every fast path against the straightforward implementation it replaced,
re-typed here, on the same inputs."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from modelfix.data import Dataset, parse_artifact, poison
from modelfix.data.poison import poisoned_chunks


# ---- poisoning ---------------------------------------------------------------------------------------------------


def _old_corner_apply(art, x, colour_labels, gen):
    """CornerPatch.apply as it was: two coin vectors, a full-size bool mask, a torch.where over the batch."""
    n, _, h, w = x.shape
    s = art.size
    if art.corners == "all":
        bottom = torch.randint(0, 2, (n,), generator=gen).bool()
        right = torch.randint(0, 2, (n,), generator=gen).bool()
    else:
        chosen = art.corners.split("+")
        pick = torch.randint(0, len(chosen), (n,), generator=gen)
        bottom = torch.tensor([c[0] == "b" for c in chosen])[pick]
        right = torch.tensor([c[1] == "r" for c in chosen])[pick]
    level = torch.full((n,), art.fixed_level) if colour_labels is None else art.levels()[colour_labels]
    row0, col0 = torch.where(bottom, h - s, 0), torch.where(right, w - s, 0)
    rows, cols = torch.arange(h), torch.arange(w)
    in_rows = (rows[None] >= row0[:, None]) & (rows[None] < row0[:, None] + s)
    in_cols = (cols[None] >= col0[:, None]) & (cols[None] < col0[:, None] + s)
    mask = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]
    return torch.where(mask, level.view(n, 1, 1, 1), x), mask.float()


def _old_poison(data, art, level, labels, seed, chunk):
    """poison() as it was: clone x and mask, paste chunk by chunk through apply, scatter back."""
    gen = torch.Generator().manual_seed(seed)
    eligible = (torch.nonzero(data.y == art.target).flatten() if labels == "correlated" and art.target is not None
                else torch.arange(len(data)))
    k = round(level * len(eligible))
    chosen = eligible[torch.randperm(len(eligible), generator=gen)[:k]].sort().values
    colours = None
    if art.label_coloured:
        colours = data.y[chosen] if labels == "correlated" else (
            torch.randint(0, data.num_classes, (k,), generator=gen) if labels == "random" else None)
    x, mask = data.x.clone(), data.mask.clone()
    for start in range(0, k, chunk):
        idx = chosen[start:start + chunk]
        part = None if colours is None else colours[start:start + chunk]
        if art.kind == "corner-patch":
            x_new, fp = _old_corner_apply(art, data.x[idx], part, gen)
        else:
            x_new, fp = art.apply(data.x[idx], part, gen)
        x[idx], mask[idx] = x_new, fp
    return chosen, x, mask


@pytest.fixture
def tag_png(tmp_path):
    rgba = np.zeros((3, 4, 4), np.uint8)
    rgba[:, :3] = (200, 50, 20, 255)
    rgba[1, 0, 3] = 128
    path = tmp_path / "tag.png"
    Image.fromarray(rgba, "RGBA").save(path)
    return str(path)


@pytest.mark.parametrize("spec", ["corner-patch", "corner-patch,corners=tl+br,size=3", "pixels:egem",
                                  "pixels:egem,target=none", "stripe@left,width=2", "IMAGE"])
@pytest.mark.parametrize("labels", ["correlated", "random", "none"])
def test_poison_equals_the_previous_implementation(spec, labels, tag_png, monkeypatch):
    # several chunks: the generator draws once per chunk
    monkeypatch.setattr(sys.modules[poisoned_chunks.__module__], "CHUNK", 7)
    art = parse_artifact(f"image:{tag_png}@bottom-right,alpha=0.6" if spec == "IMAGE" else spec)
    gen = torch.Generator().manual_seed(3)
    channels = 3 if spec == "IMAGE" else 1
    data = Dataset(x=torch.rand(40, channels, 9, 10, generator=gen), y=torch.randint(0, 10, (40,), generator=gen),
                   mask=(torch.rand(40, 1, 9, 10, generator=gen) > 0.7).float(), class_names=list("abcdefghij"))
    data.y[:6] = 8  # some items of pixels:egem's target class
    for level in (0.0, 0.3, 1.0):
        chosen, x_old, mask_old = _old_poison(data, art, level, labels, seed=5, chunk=7)
        new = poison(data, art, level, labels=labels, seed=5)
        assert torch.equal(new.x, x_old) and torch.equal(new.mask, mask_old)
        assert torch.equal(new.info["poisoned"].nonzero().flatten(), chosen)
        parts = list(poisoned_chunks(data, art, level, labels=labels, seed=5))
        hit, x_hit, footprint = (torch.cat([p[i] for p in parts]) if parts else None for i in range(3))
        if not parts:
            assert len(chosen) == 0
            continue
        assert torch.equal(hit, chosen) and torch.equal(x_hit, x_old[chosen])
        assert torch.equal(footprint.float(), mask_old[chosen])


def test_corner_patch_paste_by_hand():
    """Fixed expectations: a 2×2 patch of grey (255 − 25·y)/255 in one corner, nothing else touched."""
    art = parse_artifact("corner-patch,size=2")
    x = torch.zeros(64, 1, 5, 6)
    y = torch.arange(64) % 10
    fp = art.paste_(x, y, torch.Generator().manual_seed(0))
    corners = set()
    for i in range(64):
        rows, cols = fp[i, 0].nonzero(as_tuple=True)
        assert len(rows) == 4 and rows.max() - rows.min() == 1 and cols.max() - cols.min() == 1
        assert int(rows.min()) in (0, 3) and int(cols.min()) in (0, 4)
        corners.add((int(rows.min()), int(cols.min())))
        assert torch.all(x[i, 0][fp[i, 0]] == (255 - 25 * y[i]) / 255) and torch.all(x[i, 0][~fp[i, 0]] == 0)
    assert len(corners) == 4


# ---- max-pool interval routing ------------------------------------------------------------------------------------


def _old_maxpool_backward(pool, lower, upper, gl, gu):
    """The previous routing: unfold/fold on an (N·C, 1, h, w) view."""
    import torch.nn.functional as F
    from torch.nn.modules.utils import _pair

    n, ch, h, w = lower.shape
    k, s, p, d = (_pair(v) for v in (pool.kernel_size, pool.stride, pool.padding, pool.dilation))
    m = F.max_pool2d(lower, k, s, p, d).reshape(n * ch, 1, -1)
    padded = F.pad(upper.reshape(n * ch, 1, h, w), (p[1], p[1], p[0], p[0]), value=float("-inf"))
    cand = (F.unfold(padded, k, dilation=d, stride=s) >= m).to(gl.dtype)
    unique = cand.sum(1, keepdim=True) == 1
    gl, gu = gl.reshape(n * ch, 1, -1), gu.reshape(n * ch, 1, -1)
    lo = torch.where(unique, gl, gl.clamp(max=0)) * cand
    hi = torch.where(unique, gu, gu.clamp(min=0)) * cand
    fold = lambda t: F.fold(t, (h, w), k, dilation=d, padding=p, stride=s).reshape(n, ch, h, w)  # noqa: E731
    return fold(lo), fold(hi)


@pytest.mark.parametrize("pool", [torch.nn.MaxPool2d(2), torch.nn.MaxPool2d(3), torch.nn.MaxPool2d((2, 3)),
                                  torch.nn.MaxPool2d(3, stride=2, padding=1),
                                  torch.nn.MaxPool2d(3, stride=1, padding=1), torch.nn.MaxPool2d((2, 3), dilation=2)])
def test_maxpool_routing_equals_the_previous_routing(pool, monkeypatch):
    """Whole Cert-R4 bounds and their parameter gradients through a conv net with this pool, new routing vs old."""
    from torch import nn

    from modelfix.repair import intervals

    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), nn.ReLU(), pool, nn.Conv2d(5, 4, 3), nn.ReLU(), nn.Flatten())
    x = torch.rand(6, 2, 11, 12, generator=gen)
    net.append(nn.Linear(net(x).shape[1], 3))
    # float64: the two routings sum in different orders (layouts, threads); in float32 that rounding, not the
    # routing, decided the last digits
    net, x = net.double(), x.double()
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    mask = (torch.rand(6, 1, 11, 12, generator=gen) > 0.6).double()

    def bounds_and_grads():
        net.zero_grad()
        gl, gu = intervals.input_gradient_bounds(net, x, y, mask, 0.3)
        (gl.abs() + gu.abs()).sum().backward()
        return gl.detach(), gu.detach(), [p.grad.clone() for p in net.parameters()]

    new = bounds_and_grads()
    monkeypatch.setattr(intervals, "_maxpool_backward", _old_maxpool_backward)
    old = bounds_and_grads()
    assert (old[0] != 0).any() and (old[1] - old[0]).abs().max() > 0  # a non-trivial case
    torch.testing.assert_close(new[0], old[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(new[1], old[1], rtol=1e-6, atol=1e-7)
    for a, b in zip(new[2], old[2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_non_torchvision_nets_never_import_torchvision():
    code = """
import sys, torch
from modelfix.card import ModelCard
from modelfix.zoo import build_model, default_input_spec
from modelfix.repair.points import find_points
from modelfix.repair.guidance.tap import default_tap_layers
from modelfix.repair.intervals import input_gradient_bounds
from modelfix.explain.gradcam import default_cam_layer
for arch in ("mlp", "tap-cnn"):
    spec = default_input_spec(arch)
    m = build_model(ModelCard(arch=arch, num_classes=10, input=spec))
    x = torch.rand(2, spec.channels, spec.height, spec.width)
    find_points(m)
    default_cam_layer(m.net)
    if arch != "mlp":
        default_tap_layers(m.net)
    input_gradient_bounds(m, x, torch.tensor([0, 1]), torch.ones(2, 1, spec.height, spec.width), 0.1)
assert "torchvision" not in sys.modules
"""
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- refinement split ---------------------------------------------------------------------------------------------


class _CountingOracle(torch.nn.Module):
    """Predicts the class written in pixel (0, 0) and counts the images it sees."""

    def __init__(self, k):
        super().__init__()
        self.k, self.seen = k, 0
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        self.seen += len(x)
        return torch.nn.functional.one_hot(x[:, 0, 0, 0].round().long().clamp(0, self.k - 1), self.k).float()


def _full_prediction_split(model, data, n, seed, approved=None):
    """The split from a prediction of the whole pool: the same seeded order, the first n correct items per class,
    ceil-20 % of them to validation, then the multiplicities drawn in class order."""
    def _multiplicities(n_unique, total, gen):  # every item total // n times, the rest drawn without replacement
        counts = torch.full((n_unique,), total // n_unique, dtype=torch.long)
        counts[torch.randperm(n_unique, generator=gen)[: total % n_unique]] += 1
        return counts

    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=gen)
    with torch.no_grad():
        correct = model(data.x).argmax(1) == data.y
    keep = correct if approved is None else correct & approved
    order = order[keep[order]]
    fit, val, fit_c, val_c = [], [], [], []
    n_val_total = math.ceil(0.2 * n)
    for k in range(data.num_classes):
        members = order[data.y[order] == k][:n]
        if len(members) == 0:
            continue
        n_val = math.ceil(0.2 * len(members))
        val.append(members[:n_val])
        fit.append(members[n_val:])
        val_c.append(_multiplicities(n_val, n_val_total, gen))
        fit_c.append(_multiplicities(len(members) - n_val, n - n_val_total, gen))
    return torch.cat(fit), torch.cat(fit_c), torch.cat(val), torch.cat(val_c)


@pytest.mark.parametrize("with_approved", [False, True])
def test_refinement_split_predicts_part_of_the_pool_and_equals_the_full_prediction(with_approved):
    from modelfix.card import InputSpec
    from modelfix.repair.refinement import refinement_split
    from modelfix.zoo import Classifier

    gen = torch.Generator().manual_seed(0)
    counts = [600, 25, 900, 400]  # class 1 has fewer than N usable items: the walk must see all of it
    y = torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])[torch.randperm(sum(counts), generator=gen)]
    x = torch.zeros(len(y), 1, 2, 2)
    x[:, 0, 0, 0] = y.float()
    x[:, 0, 1, 1] = torch.arange(len(y)).float()  # an item id
    wrong = torch.rand(len(y), generator=gen) < 0.2
    x[wrong, 0, 0, 0] = ((y[wrong] + 1) % 4).float()
    data = Dataset(x=x, y=y, class_names=list("abcd"))
    approved = torch.rand(len(y), generator=gen) < 0.9 if with_approved else None
    oracle = _CountingOracle(4)
    model = Classifier(oracle, InputSpec(1, 2, 2, (0.0,), (1.0,))).eval()
    for seed in (0, 3):
        oracle.seen = 0
        split = refinement_split(model, data, samples_per_class=40, seed=seed, approved=approved, batch_size=32)
        assert oracle.seen == split.summary["predicted"] < len(data)  # stopped early (class 1 sets the pace)
        # items of a class with 40 usable already are skipped: about 40/0.8 per class plus class 1's 25, where the
        # walk used to predict nearly the whole pool while it looked for class 1
        assert split.summary["predicted"] <= 3 * 40 / 0.7 + 25 + 32, split.summary["predicted"]
        fit, fit_c, val, val_c = _full_prediction_split(model, data, 40, seed, approved)
        ids = lambda d: d.x[:, 0, 1, 1].long()  # noqa: E731
        assert torch.equal(ids(split.fit), fit) and torch.equal(ids(split.val), val)
        assert torch.equal(split.fit_counts, fit_c) and torch.equal(split.val_counts, val_c)


# ---- inference ------------------------------------------------------------------------------------------------------


def test_predict_in_channels_last_equals_the_plain_loop_and_leaves_the_model_trainable():
    from modelfix.card import ModelCard
    from modelfix.evaluate import predict
    from modelfix.zoo import build_model, default_input_spec

    torch.manual_seed(0)
    model = build_model(ModelCard(arch="tap-cnn", num_classes=10, input=default_input_spec("tap-cnn"))).train()
    x = torch.rand(70, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.eval()
        logits = model(x)
        model.train()
    top2 = logits.topk(2, 1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-4  # no near-ties, so float rounding cannot flip an arg-max
    assert torch.equal(predict(model, x, batch_size=32), logits.argmax(1))
    with torch.inference_mode():  # a caller in inference mode (weighted_accuracy) must not spoil the weights
        assert torch.equal(predict(model, x, batch_size=32), logits.argmax(1))
    assert model.training and all(p.is_contiguous() for p in model.parameters())
    torch.nn.functional.cross_entropy(model(x[:4]), torch.zeros(4, dtype=torch.long)).backward()  # still trainable


# ---- runtime --------------------------------------------------------------------------------------------------------


def test_runtime_configure_and_opt_out(monkeypatch):
    from modelfix import runtime

    before = torch.get_num_threads()
    try:
        assert runtime.set_threads(1) == 1 and torch.get_num_threads() == 1
        assert runtime.set_threads(0) == (__import__("os").cpu_count() or 1)
        with pytest.raises(ValueError):
            runtime.set_threads(-1)
        monkeypatch.setenv("MODELFIX_NO_MALLOPT", "1")
        assert runtime.configure(threads=1) == {"mallopt": False, "threads": 1}
        monkeypatch.delenv("MODELFIX_NO_MALLOPT")
        glibc = sys.platform.startswith("linux") and __import__("platform").libc_ver()[0] == "glibc"
        assert runtime.configure_allocator() is glibc
    finally:
        torch.set_num_threads(before)


def _reference_gradient_bounds(net, x, y, mask, eps):
    """Cert-R4's input-gradient bounds written out plainly for Sequential(conv, relu, pool, …, flatten, linear):
    centre/radius forward, extremal-softmax CE bounds, then per layer the textbook pull-back (affine: adjoint of
    the centre ± adjoint-with-|W| of the radius; ReLU: min/max of the four end products; max-pool: the previous
    unfold routing)."""
    import torch.nn.functional as F
    from torch import nn

    lower, upper = x - eps * mask, x + eps * mask
    saved = []
    for m in net:
        saved.append((lower, upper))
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            c, r = (lower + upper) / 2, (upper - lower) / 2
            c = m(c)
            r = F.conv2d(r, m.weight.abs(), None, m.stride, m.padding) if isinstance(m, nn.Conv2d) \
                else F.linear(r, m.weight.abs())
            lower, upper = c - r, c + r
        else:
            lower, upper = m(lower), m(upper)
    k = lower.shape[1]
    p_l = torch.stack([F.softmax(torch.where(torch.arange(k) == j, lower, upper), 1)[:, j] for j in range(k)], 1)
    p_u = torch.stack([F.softmax(torch.where(torch.arange(k) == j, upper, lower), 1)[:, j] for j in range(k)], 1)
    onehot = F.one_hot(y, k).float()
    gl, gu = p_l - onehot, p_u - onehot
    for m, (lo, up) in reversed(list(zip(net, saved))):
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            def adjoint(weight, g, m=m, lo=lo):
                probe = torch.zeros_like(lo, requires_grad=True)
                out = F.conv2d(probe, weight, None, m.stride, m.padding) if isinstance(m, nn.Conv2d) \
                    else F.linear(probe, weight)
                return torch.autograd.grad(out, probe, g, create_graph=True)[0]
            c, r = adjoint(m.weight, (gl + gu) / 2), adjoint(m.weight.abs(), (gu - gl) / 2)
            gl, gu = c - r, c + r
        elif isinstance(m, nn.ReLU):
            dl, du = (lo > 0).float(), (up > 0).float()
            ends = torch.stack([gl * dl, gl * du, gu * dl, gu * du])
            gl, gu = ends.min(0).values, ends.max(0).values
        elif isinstance(m, nn.MaxPool2d):
            gl, gu = _old_maxpool_backward(m, lo, up, gl, gu)
        elif isinstance(m, nn.Flatten):
            gl, gu = gl.reshape(lo.shape), gu.reshape(lo.shape)
    return gl, gu


@pytest.mark.parametrize("pool", [torch.nn.MaxPool2d(2), torch.nn.MaxPool2d(3, stride=2, padding=1)])
def test_conv_gradient_bounds_and_their_parameter_gradients_equal_the_plain_reference(pool):
    from torch import nn

    from modelfix.repair.intervals import input_gradient_bounds

    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), pool, nn.Conv2d(6, 5, 3), nn.ReLU(), nn.Flatten())
    x = torch.rand(5, 2, 12, 12, generator=gen)
    net.append(nn.Linear(net(x).shape[1], 4))
    y = torch.tensor([0, 1, 2, 3, 0])
    mask = (torch.rand(5, 1, 12, 12, generator=gen) > 0.5).float()
    results = []
    for fn in (input_gradient_bounds, None):
        net.zero_grad()
        gl, gu = fn(net, x, y, mask, 0.2) if fn else _reference_gradient_bounds(net, x, y, mask, 0.2)
        (gl.abs() + gu.abs()).sum().backward()
        results.append((gl.detach(), gu.detach(), [p.grad.clone() for p in net.parameters()]))
    (nl, nu, ng), (rl, ru, rg) = results
    assert (ru - rl).abs().max() > 0 and (rl != 0).float().mean() > 0.2
    torch.testing.assert_close(nl, rl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(nu, ru, rtol=1e-5, atol=1e-6)
    for a, b in zip(ng, rg):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ---- checksum once -------------------------------------------------------------------------------------------------


def test_checksum_is_hashed_once_and_follows_every_change(monkeypatch):
    import hashlib

    import modelfix.data.dataset as dataset_module

    real = hashlib.sha256

    def by_hand(d):
        digest = real()
        for t in (d.x, d.y, d.mask):
            digest.update(np.ascontiguousarray(t.numpy()).data)
        return digest.hexdigest()[:16]

    g = torch.Generator().manual_seed(0)
    data = Dataset(torch.rand(6, 1, 4, 4, generator=g), torch.tensor([0, 1, 0, 1, 0, 1]))
    calls = []
    monkeypatch.setattr(dataset_module.hashlib, "sha256", lambda: calls.append(1) or real())
    first = data.checksum()
    assert first == by_hand(data) and data.checksum() == first and len(calls) == 1  # the second call is remembered
    data.x[0, 0, 0, 0] += 1  # in place: the version moves, the checksum is computed again
    assert data.checksum() == by_hand(data) != first and len(calls) == 2
    data.mask = torch.ones_like(data.mask)  # a new tensor object
    assert data.checksum() == by_hand(data) and len(calls) == 3
    copy = data.subset([0, 1, 2])
    assert copy.checksum() == by_hand(copy) and len(calls) == 4


# ---- channels-last training ----------------------------------------------------------------------------------------


def test_training_in_channels_last_equals_the_standard_layout(monkeypatch):
    """A conv net without BatchNorm trains in channels-last (`training_layout`): the weights after two epochs equal those of the
    standard layout to float rounding, and the model is handed back in the standard layout."""
    from torch import nn

    from modelfix import training
    from modelfix.card import InputSpec
    from modelfix.zoo import Classifier

    assert training.training_layout(nn.Sequential(nn.Flatten(), nn.Linear(4, 2))) == torch.contiguous_format
    assert training.training_layout(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))) == torch.contiguous_format
    g = torch.Generator().manual_seed(0)
    data = Dataset(torch.rand(48, 2, 8, 8, generator=g), torch.randint(0, 3, (48,), generator=g))

    def fit(layout_of):
        monkeypatch.setattr(training, "training_layout", layout_of)
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(2, 6, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 5, 3, padding=1), nn.ReLU(),
                            nn.Flatten(), nn.Linear(45, 3))
        model = Classifier(net, InputSpec(2, 8, 8, (0.5, 0.5), (0.25, 0.25)))
        config = training.TrainConfig(optimizer="adam", lr=1e-2, batch_size=16, epochs=2, seed=0)
        seen = []  # the layout each training step's second conv saw
        net[3].register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
        training.train(model, data, config, progress=False)
        return model, set(seen)

    real = training.training_layout
    (fast, fast_seen), (plain, plain_seen) = fit(real), fit(lambda m: torch.contiguous_format)
    assert real(fast) == torch.channels_last and fast_seen == {False} and plain_seen == {True}
    torch.manual_seed(0)
    start = nn.Conv2d(2, 6, 3).weight  # the first layer's initial weights: training moved them
    assert not torch.allclose(plain.net[0].weight, start, atol=1e-3)
    for (name, a), b in zip(fast.named_parameters(), plain.parameters()):
        assert a.is_contiguous(), name
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), name


# ---- a post-hoc command end to end ---------------------------------------------------------------------------------


def test_posthoc_cost_times_the_whole_command_against_one_forward_pass(tmp_path):
    import dataclasses
    from pathlib import Path

    from modelfix.bench.posthoc_cost import run
    from modelfix.card import ModelCard
    from modelfix.checkpoint import write_checkpoint
    from modelfix.zoo import build_model, default_input_spec

    spec = dataclasses.replace(default_input_spec("egem-cnn"), height=16, width=16)
    card = ModelCard(arch="egem-cnn", num_classes=2, input=spec)
    torch.manual_seed(0)
    write_checkpoint(build_model(card), card, tmp_path / "m.safetensors", tmp_path / "m.card.json")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "clean.npz", x=rng.integers(0, 256, (40, 1, 16, 16), dtype=np.uint8), y=np.repeat([0, 1], 20))
    result = run(tmp_path / "m.safetensors", str(tmp_path / "clean.npz"), samples_per_class=10, keep_incorrect=True,
                 repeats=1, extra=("--layers", "relu3"))
    assert result["items"] == 2 * 10  # the oversampled refinement set: 8 fit + 2 validation items per class
    assert len(result["command_s"]) == 2 and len(result["forward_s"]) == 2  # one untimed first run, then repeats
    forward = sum(result["forward_s"]) / 2  # the median of two
    assert result["ratio"] == pytest.approx(result["command_s"][1] / forward)
    assert not list(Path(tmp_path).glob("out*"))  # the command wrote into a temporary folder
