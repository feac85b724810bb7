"""
The per-pixel losses (eqlosses_d2/segmentation/losses): each loss's value and gradient against a
float64 reference written here pixel by pixel (explicit loops over the valid pixels, the formulas
of each method's docstring), with ignored pixels, in several chunks per image and in one, under
the CPU and the GPU device policy (forced on the CPU), with an output gradient other than 1; an
all-ignored batch gives 0 and a zero gradient; Softmax-EQL's gradient statistics and Seesaw's
pixel counts after three steps equal the hand-computed sums, resume exactly from a state dict and
stay unchanged in eval mode; OHEM's three regimes (threshold, min_kept, the all-kept quirk) and its
three normalisers; Seesaw's two equivalent forms and which one runs; softmax against float64
F.cross_entropy at 150 classes; no host read under the GPU policy; about one logit-sized buffer of
peak memory (F.cross_entropy: three); every config node builds through build_pixel_loss; bad values
give one line.
"""
import math

import pytest
import torch

from detectron2.config import get_cfg

from eqlosses_d2 import add_eqlosses_config
from eqlosses_d2.losses import base as losses_base
from eqlosses_d2.losses import fused
from eqlosses_d2.registry import names
from eqlosses_d2.segmentation.losses import PIXEL_LOSS_REGISTRY, build_pixel_loss
from eqlosses_d2.segmentation.losses import kernels
from loss_helpers import count_host_reads

C = 5
IGNORE = 255
METHODS = ("softmax", "softmax_eql", "ohem", "seesaw", "iif", "balanced_softmax")


class Stats:
    """Stand-in for the model's SemSegClassStatsBuffers."""

    def __init__(self, image_count=(40, 12, 6, 2, 0), pixel_count=(90000, 4000, 900, 35, 0), num_images=50):
        self.image_count = torch.tensor(image_count, dtype=torch.int64)
        self.pixel_count = torch.tensor(pixel_count, dtype=torch.int64)
        self.instance_count = self.pixel_count
        self.num_images = torch.tensor(num_images)
        self.num_images_with_annotations = torch.tensor(num_images)
        self.is_set = torch.tensor(True)


def _batch(seed, num_images=2, height=3, width=4, spread=3.0, ignored=0.25):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_images, C, height, width, generator=g) * spread
    targets = torch.randint(0, C, (num_images, height, width), generator=g)
    targets[torch.rand(num_images, height, width, generator=g) < ignored] = IGNORE
    targets.view(-1)[0] = IGNORE  # at least one ignored pixel
    targets.view(-1)[1] = 3  # and a tail class
    return logits, targets


def _run(loss, logits, targets, output_grad=1.0):
    x = logits.clone().requires_grad_()
    value = loss(x, targets)["loss_sem_seg"]
    (value * output_grad).backward()
    return value.detach().double(), x.grad.double()


def _valid_pixels(targets):
    """[(n, i, j, y)] of the valid pixels, in order."""
    num_images, height, width = targets.shape
    return [(n, i, j, int(targets[n, i, j])) for n in range(num_images) for i in range(height)
            for j in range(width) if int(targets[n, i, j]) != IGNORE]


def _softmax(values):
    """softmax of a list of floats (float64, max-shifted)."""
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def _ce(values, y):
    """CE(values, y) = logsumexp(values) − values[y], in float64."""
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values)) - values[y]


def _reference(logits, targets, adjusted, weights=None, pixel_weight=None):
    """
    The float64 loss and gradient of ``Σ_p pixel_weight(p) · CE(x̃_p, y_p)`` with per-pixel adjusted
    logits ``adjusted(z_p (list), y_p, (n, i, j)) -> x̃_p`` (list) that treats its adjustments as
    constants except for per-class factors ``weights`` (x̃ = w ⊙ z + constants). The gradient is
    derived by hand: ``pixel_weight · w ⊙ (softmax(x̃) − onehot(y))``.
    """
    z = logits.double()
    grad = torch.zeros_like(z)
    loss = 0.0
    pixels = _valid_pixels(targets)
    for n, i, j, y in pixels:
        values = [float(z[n, c, i, j]) for c in range(C)]
        tilde = adjusted(values, y, (n, i, j))
        factor = pixel_weight((n, i, j)) if pixel_weight else 1.0 / len(pixels)
        loss += factor * _ce(tilde, y)
        prob = _softmax(tilde)
        for c in range(C):
            w = 1.0 if weights is None else float(weights[c])
            grad[n, c, i, j] = factor * w * (prob[c] - (1.0 if c == y else 0.0))
    return torch.tensor(loss, dtype=torch.float64), grad


def _assert_close(value, grad, ref_value, ref_grad, rtol=2e-6, atol_grad=1e-7):
    torch.testing.assert_close(value, ref_value, rtol=rtol, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=atol_grad)


@pytest.fixture(params=["one_chunk", "small_chunks", "gpu_policy"])
def regime(request, monkeypatch):
    """The losses in one chunk per image, in chunks of 5 pixels (an image of 12 pixels spans 3, the
    last one partial), and under the GPU policy (no host reads; its own code paths) forced on the CPU."""
    if request.param == "small_chunks":
        monkeypatch.setattr(fused, "CHUNK_ELEMENTS", 5 * C)
    if request.param == "gpu_policy":
        monkeypatch.setattr(losses_base, "DEVICE_POLICY", "gpu")
    return request.param


def _loss(name, stats=None, **hparams):
    return PIXEL_LOSS_REGISTRY.get(name)(C, class_stats=stats if stats is not None else Stats(), **hparams).train()


# -- softmax, Balanced Softmax, IIF: per-class adjustments -------------------------------------------


@pytest.mark.parametrize("output_grad", [1.0, 2.5])
def test_softmax_ce(regime, output_grad):
    logits, targets = _batch(0)
    value, grad = _run(_loss("softmax"), logits, targets, output_grad)
    ref_value, ref_grad = _reference(logits, targets, lambda z, y, p: z)
    _assert_close(value, grad, ref_value, ref_grad * output_grad)


@pytest.mark.parametrize("tau, prior", [(1.0, "pixel"), (0.5, "image"), (2.0, "pixel")])
def test_balanced_softmax(regime, tau, prior):
    stats = Stats()
    if prior == "pixel":
        counts = [90000, 4000, 900, 35, 0]
        prior_values = [n / sum(counts) for n in counts]
    else:  # images containing the class / all training images, normalised over the classes
        frequency = [n / 50 for n in (40, 12, 6, 2, 0)]
        prior_values = [f / sum(frequency) for f in frequency]
    shift = [math.log(p ** tau + 1e-12) for p in prior_values]
    logits, targets = _batch(1)
    value, grad = _run(_loss("balanced_softmax", stats, tau=tau, prior=prior), logits, targets, 1.5)
    ref_value, ref_grad = _reference(logits, targets, lambda z, y, p: [z[c] + shift[c] for c in range(C)])
    _assert_close(value, grad, ref_value, ref_grad * 1.5)
    # inference: the raw logits
    assert torch.equal(_loss("balanced_softmax", stats).predict(logits), logits)


def _iif_weight(n, total, variant):
    if variant == "smooth":
        return math.log((total + 1) / (n + 1)) + 1
    n = min(max(n, 1), total)
    return {"raw": math.log(total / n), "base2": math.log2(total / n)}[variant]


@pytest.mark.parametrize("variant, count", [("smooth", "image"), ("raw", "image"), ("base2", "pixel")])
def test_iif(regime, variant, count):
    stats = Stats()
    if count == "image":  # n_c: training images containing c, M: all training images
        counts, total = (40, 12, 6, 2, 0), 50
    else:  # n_c: labelled pixels of c, M: all labelled pixels
        counts, total = (90000, 4000, 900, 35, 0), 94935
    weights = [_iif_weight(n, total, variant) for n in counts]
    logits, targets = _batch(2)
    loss = _loss("iif", stats, variant=variant, count=count)
    value, grad = _run(loss, logits, targets)
    ref_value, ref_grad = _reference(logits, targets, lambda z, y, p: [weights[c] * z[c] for c in range(C)],
                                     weights=weights)
    _assert_close(value, grad, ref_value, ref_grad)
    expected = logits.double() * torch.tensor(weights, dtype=torch.float64)[None, :, None, None]
    torch.testing.assert_close(loss.predict(logits).double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("spread", [1.0, 10.0, 40.0])
def test_softmax_matches_cross_entropy_at_150_classes(spread):
    """The fused kernel (exp2, chunked, float32) against float64 ``F.cross_entropy`` at an ADE20K class
    count, with logits far apart (label probabilities that underflow in float32 at spread 40)."""
    g = torch.Generator().manual_seed(int(spread))
    logits = torch.randn(2, 150, 24, 20, generator=g) * spread
    targets = torch.randint(0, 150, (2, 24, 20), generator=g)
    targets[:, :3] = IGNORE
    value, grad = _run(PIXEL_LOSS_REGISTRY.get("softmax")(150), logits, targets)
    x = logits.double().requires_grad_()
    expected = torch.nn.functional.cross_entropy(x, targets, ignore_index=IGNORE)
    expected.backward()
    torch.testing.assert_close(value, expected.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, x.grad, rtol=1e-4, atol=1e-9)


def test_losses_needing_statistics_say_so():
    logits, targets = _batch(0)
    for name in ("iif", "balanced_softmax"):
        with pytest.raises(RuntimeError, match=f"pixel loss '{name}' needs the training set's per-class"):
            PIXEL_LOSS_REGISTRY.get(name)(C)(logits, targets)
        unset = Stats()
        unset.is_set = torch.tensor(False)
        with pytest.raises(RuntimeError, match="needs the training set"):
            PIXEL_LOSS_REGISTRY.get(name)(C, class_stats=unset)(logits, targets)


# -- Softmax-EQL -------------------------------------------------------------------------------------


class EQLReference:
    """Softmax-EQL's state and steps by hand (float64): margins from the statistics before the step,
    then pos/neg of |gradient| = loss_weight / V · |softmax(z') − onehot| over the valid pixels."""

    def __init__(self, tau=1.0, eps=1e-4, indicator="pos", loss_weight=1.0):
        self.tau, self.eps, self.indicator, self.loss_weight = tau, eps, indicator, loss_weight
        self.pos = [0.0] * C
        self.neg = [0.0] * C
        self.pos_neg = [1.0] * C

    def indicator_values(self):
        if self.indicator == "pos":
            return self.pos
        if self.indicator == "neg":
            return self.neg
        return [r + n for r, n in zip(self.pos_neg, self.neg)]

    def contributions(self, logits, targets):
        """(value, gradient, pos, neg) of one batch with the present statistics, which stay as they are."""
        G = self.indicator_values()
        log_g = [math.log(max(g, self.eps)) for g in G]

        def adjusted(z, y, pixel):
            return [z[c] + (self.tau * (log_g[c] - log_g[y]) if c != y else 0.0) for c in range(C)]

        pixels = _valid_pixels(targets)
        factor = self.loss_weight / max(len(pixels), 1)
        value, grad = _reference(logits, targets, adjusted, pixel_weight=lambda p: factor)
        pos, neg = [0.0] * C, [0.0] * C
        for n, i, j, y in pixels:
            for c in range(C):
                g = abs(float(grad[n, c, i, j]))
                if c == y:
                    pos[c] += g
                else:
                    neg[c] += g
        return value, grad, pos, neg

    def add(self, pos, neg):
        self.pos = [a + b for a, b in zip(self.pos, pos)]
        self.neg = [a + b for a, b in zip(self.neg, neg)]
        self.pos_neg = [p / (n + 1e-10) for p, n in zip(self.pos, self.neg)]

    def step(self, logits, targets):
        value, grad, pos, neg = self.contributions(logits, targets)
        self.add(pos, neg)
        return value, grad


@pytest.mark.parametrize("indicator, tau, loss_weight",
                         [("pos", 1.0, 1.0), ("neg", 0.5, 2.0), ("pos_and_neg", 1.0, 1.0)])
def test_softmax_eql_three_steps(regime, indicator, tau, loss_weight):
    loss = _loss("softmax_eql", tau=tau, indicator=indicator, loss_weight=loss_weight)
    reference = EQLReference(tau=tau, indicator=indicator, loss_weight=loss_weight)
    for step in range(3):
        logits, targets = _batch(10 + step, spread=2.0 + step)
        value, grad = _run(loss, logits, targets)
        ref_value, ref_grad = reference.step(logits, targets)
        _assert_close(value, grad, ref_value, ref_grad)
        expected_state = {"pos_grad": reference.pos, "neg_grad": reference.neg, "pos_neg": reference.pos_neg}
        for name, expected in expected_state.items():
            torch.testing.assert_close(getattr(loss, name), torch.tensor(expected, dtype=torch.float64),
                                       rtol=1e-5, atol=1e-9, msg=name)
    assert loss.pos_grad.dtype == torch.float64 and float(loss.pos_grad[3]) > 0  # the tail class was seen


def test_softmax_eql_statistics_count_valid_pixels_only():
    """A batch whose ignored pixels have extreme logits gives the statistics of the same batch with
    those pixels cut out (images of the valid pixels only)."""
    logits, targets = _batch(3, num_images=1, height=2, width=6, ignored=0.0)
    targets[0, :, 3:] = IGNORE
    wild = logits.clone()
    wild[0, :, :, 3:] = torch.randn(C, 2, 3) * 50
    a, b = _loss("softmax_eql"), _loss("softmax_eql")
    _run(a, wild, targets)
    _run(b, logits[:, :, :, :3].contiguous(), targets[:, :, :3].contiguous())
    torch.testing.assert_close(a.pos_grad, b.pos_grad, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(a.neg_grad, b.neg_grad, rtol=1e-6, atol=1e-12)


# -- Seesaw ------------------------------------------------------------------------------------------


class SeesawReference:
    """Seesaw by hand: N += this batch's valid-pixel counts (before the loss); per pixel
    z̃_j = z_j + log(M_yj · C_yj) for j ≠ y, with σ = softmax(z) of the pixel."""

    def __init__(self, p=0.8, q=2.0, eps=1e-2, loss_weight=1.0, counts=None):
        self.p, self.q, self.eps, self.loss_weight = p, q, eps, loss_weight
        self.counts = list(counts) if counts is not None else [0.0] * C

    def count(self, targets):
        for _, _, _, y in _valid_pixels(targets):
            self.counts[y] += 1

    def loss(self, logits, targets):
        """(value, gradient) with the present counts."""
        N = [max(n, 1.0) for n in self.counts]

        def adjusted(z, y, pixel):
            sigma = _softmax(z)
            out = []
            for j in range(C):
                if j == y:
                    out.append(z[j])
                    continue
                mitigation = (N[j] / N[y]) ** self.p if N[j] < N[y] else 1.0
                ratio = sigma[j] / max(sigma[y], self.eps)
                compensation = ratio ** self.q if ratio > 1 else 1.0
                out.append(z[j] + math.log(mitigation * compensation))
            return out

        factor = self.loss_weight / max(len(_valid_pixels(targets)), 1)
        return _reference(logits, targets, adjusted, pixel_weight=lambda p: factor)

    def step(self, logits, targets):
        self.count(targets)
        return self.loss(logits, targets)


# counts spread e^25: p = 3 puts (N_j / N_max)^p beyond e^60, where the CPU policy leaves the probability domain
SPREAD_COUNTS = [math.exp(25.0), 5000.0, 300.0, 2.0, 0.0]


@pytest.mark.parametrize("p, q, counts", [
    (0.8, 2.0, [200000.0, 9000.0, 700.0, 3.0, 0.0]),  # defaults; CPU: probability domain
    (0.8, 1.0, [50.0, 50.0, 3.0, 0.0, 1e6]),
    (0.0, 2.0, None),
    (0.8, 0.0, [1000.0, 10.0, 10.0, 1.0, 0.0]),
    (0.8, 1.5, [1000.0, 10.0, 10.0, 1.0, 0.0]),  # a general q: logit domain
    (3.0, 2.0, SPREAD_COUNTS),  # beyond the probability domain's range: logit domain
])
def test_seesaw_three_steps(regime, p, q, counts):
    loss = _loss("seesaw", p=p, q=q, loss_weight=1.5)
    if counts is not None:
        loss.cumulative_count.copy_(torch.tensor(counts, dtype=torch.float64))
    reference = SeesawReference(p=p, q=q, loss_weight=1.5, counts=counts)
    for step in range(3):
        # large spreads: labels far below the top logit (compensation active, tiny label probabilities)
        logits, targets = _batch(20 + step, spread=4.0 * (step + 1))
        value, grad = _run(loss, logits, targets)
        ref_value, ref_grad = reference.step(logits, targets)
        _assert_close(value, grad, ref_value, ref_grad, rtol=1e-5)
        assert torch.equal(loss.cumulative_count, torch.tensor(reference.counts, dtype=torch.float64))


@pytest.mark.parametrize("policy", ["auto", "gpu"])
def test_seesaw_domain_choice(policy, monkeypatch):
    """Which of the two equivalent forms runs (both checked against the reference above): the
    probability domain for q in {0, 1, 2} with count factors within e^-60 (CPU: read from the counts;
    GPU policy: p <= 1.63, no host read), the logit domain otherwise."""
    from eqlosses_d2.segmentation.losses.seesaw import _probability_domain_factors

    monkeypatch.setattr(losses_base, "DEVICE_POLICY", policy)
    logits = torch.zeros(1, C, 1, 1)
    spread = torch.tensor(SPREAD_COUNTS, dtype=torch.float64).clamp(min=1).log()  # log-count spread 25
    small = torch.tensor([1000.0, 10.0, 10.0, 1.0, 1.0], dtype=torch.float64).log()
    assert _probability_domain_factors(logits, small, 0.8, 2.0)[0]
    assert _probability_domain_factors(logits, spread, 0.8, 1.0)[0]  # 0.8 x 25 = 20 <= 60
    assert not _probability_domain_factors(logits, small, 0.8, 1.5)[0]
    assert _probability_domain_factors(logits, spread, 0.0, 0.0) == (True, None)
    assert not _probability_domain_factors(logits, spread, 3.0, 2.0)[0]  # 3 x 25 = 75 > 60
    # p = 2: within range for these counts; the GPU policy cannot tell without reading them
    assert _probability_domain_factors(logits, small, 2.0, 2.0)[0] == (policy == "auto")
    applies, factor = _probability_domain_factors(logits, small, 0.8, 2.0)
    torch.testing.assert_close(factor.double(), torch.tensor([1000.0, 10.0, 10.0, 1.0, 1.0]).div(1000.0).pow(0.8)
                               .double(), rtol=1e-6, atol=0)


def test_seesaw_counts_are_the_valid_pixels_of_each_class():
    loss = _loss("seesaw")
    expected = torch.zeros(C, dtype=torch.float64)
    for step in range(3):
        logits, targets = _batch(30 + step)
        _run(loss, logits, targets)
        valid = targets[targets != IGNORE]
        expected += torch.tensor([float((valid == c).sum()) for c in range(C)], dtype=torch.float64)
    assert torch.equal(loss.cumulative_count, expected)
    assert float(expected.sum()) < 3 * targets.numel()  # ignored pixels were in the batches


# -- OHEM --------------------------------------------------------------------------------------------


def _ohem_reference(logits, targets, thresh, min_kept, normalizer="valid", loss_weight=1.0):
    """mmsegmentation's OHEMPixelSampler + CE, by hand: k = min(min_kept · N, V − 1), t = max(p_(k),
    thresh), kept: p_y < t; loss = loss_weight · Σ_kept CE / D."""
    pixels = _valid_pixels(targets)
    z = logits.double()
    prob_y = {}
    for n, i, j, y in pixels:
        prob_y[(n, i, j)] = _softmax([float(z[n, c, i, j]) for c in range(C)])[y]
    ranked = sorted(prob_y.values())
    probabilities = sorted(set(ranked))
    gaps = [b - a for a, b in zip(probabilities, probabilities[1:])] + [abs(p - thresh) for p in probabilities]
    assert min(gaps) > 1e-5  # no tie within float32 rounding: the float32 selection is the same
    batch_kept = min_kept * targets.shape[0]
    k = min(batch_kept, len(ranked) - 1)
    threshold = max(ranked[k], thresh)
    kept = {pixel for pixel, p in prob_y.items() if p < threshold}
    denominator = {"valid": len(pixels), "all": targets.numel(), "kept": max(len(kept), 1)}[normalizer]
    value, grad = _reference(logits, targets, lambda z, y, p: z,
                             pixel_weight=lambda p: loss_weight / denominator if p in kept else 0.0)
    return value, grad, len(kept)


@pytest.mark.parametrize("thresh, min_kept, expected_kept", [
    (0.7, 2, None),  # the threshold decides: every pixel with p_y < 0.7 (more than 2 x 2)
    (0.005, 4, 8),  # min_kept decides: the 4 x 2 hardest (1 pixel has p_y < 0.005)
    (0.7, 1000, None),  # at most min_kept x N valid pixels: t = the largest p_y (the easiest dropped)
])
@pytest.mark.parametrize("normalizer", ["valid", "all", "kept"])
def test_ohem(regime, thresh, min_kept, expected_kept, normalizer):
    logits, targets = _batch(40, height=4, width=5, spread=2.0)
    loss = _loss("ohem", thresh=thresh, min_kept=min_kept, normalizer=normalizer, loss_weight=2.0)
    value, grad = _run(loss, logits, targets, output_grad=0.5)
    ref_value, ref_grad, num_kept = _ohem_reference(logits, targets, thresh, min_kept, normalizer, 2.0)
    _assert_close(value, grad, ref_value, ref_grad * 0.5)
    assert int(loss.last_num_kept) == num_kept
    num_valid = int((targets != IGNORE).sum())
    if expected_kept is not None:
        assert num_kept == expected_kept
    elif min_kept == 2:
        assert 2 * 2 < num_kept < num_valid
    else:
        assert num_kept == num_valid - 1  # the quirk: the easiest pixel is above 0.7 and dropped


def test_ohem_keeping_every_pixel_is_plain_ce():
    logits, targets = _batch(41, spread=0.1)  # every p_y near 1/5 < 0.7
    value, grad = _run(_loss("ohem", min_kept=1), logits, targets)
    ref_value, ref_grad = _reference(logits, targets, lambda z, y, p: z)
    _assert_close(value, grad, ref_value, ref_grad)


# -- every loss: empty batches, ignored pixels, state, config ----------------------------------------


@pytest.mark.parametrize("name", METHODS)
def test_all_ignored_batch_gives_zero_and_no_gradient(regime, name):
    loss = _loss(name)
    before = {k: v.clone() for k, v in loss.state_dict().items()}
    logits, _ = _batch(50)
    targets = torch.full((2, 3, 4), IGNORE, dtype=torch.int64)
    value, grad = _run(loss, logits * 100, targets)
    assert float(value) == 0.0 and torch.count_nonzero(grad) == 0
    for key, tensor in loss.state_dict().items():  # nothing counted
        if key == "pos_neg":  # the ratio, recomputed after every step (their collect_grad): 1 -> 0 / 1e-10
            assert torch.equal(tensor, before["pos_grad"] / (before["neg_grad"] + 1e-10))
        else:
            assert torch.equal(tensor, before[key]), key


@pytest.mark.parametrize("name", METHODS)
def test_ignored_pixels_change_nothing(name):
    """The ignored pixels' logits do not matter: any values there give the same loss and gradient,
    and their gradient is zero."""
    logits, targets = _batch(51)
    other = logits.clone()
    ignored = (targets == IGNORE)[:, None].expand_as(logits)
    other[ignored] = torch.randn(int(ignored.sum())) * 30
    value, grad = _run(_loss(name), logits, targets)
    value2, grad2 = _run(_loss(name), other, targets)
    torch.testing.assert_close(value, value2, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, grad2, rtol=1e-6, atol=1e-9)
    assert torch.count_nonzero(grad[ignored]) == 0


@pytest.mark.parametrize("name", ["softmax_eql", "seesaw"])
def test_state_dict_round_trip_resumes_exactly(name):
    """Three steps in one go equal two steps, a state dict, a fresh loss loading it, and the third."""
    batches = [_batch(60 + step) for step in range(3)]
    straight = _loss(name)
    for logits, targets in batches[:2]:
        _run(straight, logits, targets)
    saved = {k: v.clone() for k, v in straight.state_dict().items()}
    assert saved and all(v.dtype == torch.float64 for v in saved.values())
    resumed = _loss(name)
    resumed.load_state_dict(saved)
    third = _run(straight, *batches[2])
    again = _run(resumed, *batches[2])
    assert torch.equal(third[0], again[0]) and torch.equal(third[1], again[1])
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


@pytest.mark.parametrize("name", ["softmax_eql", "seesaw"])
def test_eval_mode_leaves_the_state(name):
    loss = _loss(name)
    _run(loss, *_batch(70))
    before = {k: v.clone() for k, v in loss.state_dict().items()}
    loss.eval()
    _run(loss, *_batch(71))
    for key, value in loss.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_predict_is_the_raw_logits_but_for_iif():
    logits, _ = _batch(0)
    for name in METHODS:
        if name != "iif":
            assert torch.equal(_loss(name).predict(logits), logits), name


def _sem_seg_node(name, **keys):
    cfg = get_cfg()
    add_eqlosses_config(cfg)
    node = cfg.MODEL.EQLOSSES.SEM_SEG
    node.LOSS = name
    for key, value in keys.items():
        section, leaf = key.split(".")
        node[section][leaf] = value
    return node


def test_every_registered_loss_builds_from_its_config_node():
    assert set(METHODS) <= set(names(PIXEL_LOSS_REGISTRY))
    stats = Stats()
    for name in names(PIXEL_LOSS_REGISTRY):
        loss = build_pixel_loss(_sem_seg_node(name), C, class_stats=stats, ignore_value=254)
        assert loss.name == name and loss.num_classes == C and loss.ignore_value == 254
    node = _sem_seg_node("softmax_eql", **{"SOFTMAX_EQL.TAU": 0.5, "SOFTMAX_EQL.INDICATOR": "neg"})
    built = build_pixel_loss(node, C)
    assert (built.tau, built.indicator, built.eps) == (0.5, "neg", 1e-4)
    built = build_pixel_loss(_sem_seg_node("ohem", **{"OHEM.MIN_KEPT": 7, "OHEM.NORMALIZER": "all"}), C)
    assert (built.thresh, built.min_kept, built.normalizer) == (0.7, 7, "all")
    built = build_pixel_loss(_sem_seg_node("seesaw"), C)
    assert (built.p, built.q, built.eps, built.loss_weight) == (0.8, 2.0, 0.01, 1.0)
    built = build_pixel_loss(_sem_seg_node("iif", **{"IIF.COUNT": "pixel"}), C, class_stats=stats)
    assert (built.variant, built.count) == ("smooth", "pixel")
    node = _sem_seg_node("balanced_softmax", **{"BALANCED_SOFTMAX.PRIOR": "image"})
    built = build_pixel_loss(node, C, class_stats=stats)
    assert (built.tau, built.prior) == (1.0, "image")


def test_an_ignore_value_of_the_head_is_honoured():
    logits, targets = _batch(80)
    moved = targets.clone()
    moved[targets == IGNORE] = -1
    for name in METHODS:
        loss = PIXEL_LOSS_REGISTRY.get(name)(C, class_stats=Stats(), ignore_value=-1)
        value, grad = _run(loss, logits, moved)
        ref_value, ref_grad = _run(_loss(name), logits, targets)
        torch.testing.assert_close(value, ref_value, rtol=1e-6, atol=0)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name, hparams, match", [
    ("softmax_eql", {"indicator": "both"}, "SEM_SEG.SOFTMAX_EQL.INDICATOR must be one of"),
    ("softmax_eql", {"eps": 0.0}, "SEM_SEG.SOFTMAX_EQL.EPS must be > 0"),
    ("ohem", {"thresh": 1.5}, r"SEM_SEG.OHEM.THRESH must be in \(0, 1\]"),
    ("ohem", {"min_kept": 0}, "SEM_SEG.OHEM.MIN_KEPT must be an integer >= 1"),
    ("ohem", {"normalizer": "mean"}, "SEM_SEG.OHEM.NORMALIZER must be one of"),
    ("seesaw", {"p": -1.0}, "SEM_SEG.SEESAW.P must be >= 0"),
    ("seesaw", {"eps": 0.0}, r"SEM_SEG.SEESAW.EPS must be in \(0, 1\]"),
    ("iif", {"variant": "idf"}, "SEM_SEG.IIF.VARIANT must be one of"),
    ("iif", {"count": "instance"}, "SEM_SEG.IIF.COUNT must be one of"),
    ("balanced_softmax", {"prior": "uniform"}, "SEM_SEG.BALANCED_SOFTMAX.PRIOR must be one of"),
])
def test_bad_hyper_parameters_are_one_line(name, hparams, match):
    with pytest.raises(ValueError, match=match) as info:
        PIXEL_LOSS_REGISTRY.get(name)(C, **hparams)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", METHODS)
def test_bad_inputs_are_one_line(name):
    logits, targets = _batch(90)
    bad = targets.clone()
    bad[0, 1, 1] = C
    message = rf"pixel loss '{name}': label {C} is neither in \[0, {C}\) nor the ignore value"
    with pytest.raises(ValueError, match=message):
        _loss(name)(logits, bad)
    with pytest.raises(ValueError, match=rf"pixel loss '{name}' expects logits of shape \(N, {C}, H, W\)"):
        _loss(name)(logits[:, :3], targets)
    nan = logits.clone()
    nan[1, 2, 2, 2] = float("nan")
    with pytest.raises(FloatingPointError, match=f"pixel loss '{name}': the loss is nan"):
        _loss(name)(nan, targets)


def test_softmax_eql_skips_a_non_finite_batch_under_the_gpu_policy(monkeypatch):
    """No host read under the GPU policy: the loss is NaN (Detectron2's trainer stops) and the
    statistics keep their values."""
    monkeypatch.setattr(losses_base, "DEVICE_POLICY", "gpu")
    loss = _loss("softmax_eql")
    _run(loss, *_batch(91))
    before = {k: v.clone() for k, v in loss.state_dict().items()}
    logits, targets = _batch(92)
    logits[0, 0, 0, 1] = float("inf")
    value = loss(logits, targets)["loss_sem_seg"]
    assert math.isnan(float(value))
    for key, tensor in loss.state_dict().items():
        assert torch.equal(tensor, before[key]), key


def test_chunks_cover_each_image(monkeypatch):
    monkeypatch.setattr(fused, "CHUNK_ELEMENTS", 5 * C)
    chunks = kernels.pixel_chunks(torch.empty(2, C, 3, 4))
    assert chunks == [(0, 0, 5), (0, 5, 10), (0, 10, 12), (1, 0, 5), (1, 5, 10), (1, 10, 12)]
    monkeypatch.setattr(losses_base, "DEVICE_POLICY", "gpu")
    assert kernels.pixel_chunks(torch.empty(2, C, 3, 4)) == [(0, 0, 12), (1, 0, 12)]
    assert kernels.pixel_chunks(torch.empty(2, C, 3, 4), buffers=2) == [(0, 0, 6), (0, 6, 12), (1, 0, 6), (1, 6, 12)]


@pytest.mark.parametrize("name", METHODS)
def test_no_host_read_under_the_gpu_policy(name, monkeypatch):
    """A training step (forward and backward, after a warm-up step that checks the class statistics
    once) reads no tensor value on the host under the GPU policy: the counts of ``.item()``,
    ``bool()``, ``float()``, ... on any tensor are zero."""
    monkeypatch.setattr(losses_base, "DEVICE_POLICY", "gpu")
    loss = _loss(name)
    _run(loss, *_batch(95))
    reads = count_host_reads(monkeypatch)
    reads.on = True
    logits, targets = _batch(96)
    x = logits.clone().requires_grad_()
    value = loss(x, targets)["loss_sem_seg"]
    value.backward()
    monkeypatch.undo()
    assert dict(reads) == {}, reads
    assert x.grad is not None and torch.isfinite(value)


def _peak_extra_memory(names_, shape):
    """{name: peak resident bytes of one forward+backward above the inputs}, in a fresh process with
    glibc's default allocator (benchmarks/bench_seg_losses.py --measure-memory)."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "bench_seg_losses.py"), "--measure-memory",
                          ",".join(names_), "--memory-shape", ",".join(map(str, shape))],
                         env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_one_logit_sized_buffer_per_loss():
    """The fused losses hold the gradient and chunk-sized buffers only: their peak extra memory is
    about one copy of the logits (F.cross_entropy: three: its log-softmax, the NLL gradient, the
    input gradient), measured as the resident-set peak of a first call in a fresh process."""
    shape = (4, 150, 128, 128)
    copy = 4 * 4 * 150 * 128 * 128
    extra = _peak_extra_memory(["seesaw", "softmax_eql", "ohem", "F.cross_entropy"], shape)
    assert extra["F.cross_entropy"] > 2.5 * copy  # the measurement sees the copies
    for name in ("seesaw", "softmax_eql", "ohem"):
        assert extra[name] < 1.4 * copy, (name, extra[name] / copy)
