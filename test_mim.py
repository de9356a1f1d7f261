"""Tests for mim.py, datasets.py, evaluate.py and bench.py, in the paper's order and then
by module; each section's header says what it pins down. The command line (cli.py,
run_all.sh) is test_cli.py's.

    Sec. 3-4     the paper's identities (Eq. 6-15) by quadrature on a grid, numpy only
    Sec. 3       the distributions are normalized
    Sec. 4       each objective (Eq. 7, 8, 12; Algorithms 1-2) against its integral
    App. D.2     the score-function gradient: bias against exact gradients, variance
    Sec. 5       warm-up and the optimizer
    Sec. 5.2     the image networks and the VampPrior (App. D.1)
    comparison   InfoMax-VAE and the inference critics
    mim.py       as a library: alone, imports one way, changes nothing in its process,
                 --amp, the speed-ups, checkpoints
    evaluate.py  every metric against a known answer, figures
    datasets.py  parsers, splits, binarization, PCA, search and download

`python -m pytest -q -m "not slow"` runs what says whether the paper holds in under a
minute on two cores; `python -m pytest -q` all of it, test_cli.py included.
"""
import ast
import copy
import dataclasses
import gzip
import hashlib
import io
import itertools
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import types
import urllib.request

import numpy as np
import pytest
import scipy.io
import scipy.stats
import torch
from scipy.special import expit, logsumexp
from scipy.stats import multivariate_normal, norm
from sklearn.decomposition import PCA

import datasets
import evaluate
import mim

HERE = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------------------
# Sec. 3-4, the paper's identities, by quadrature on a grid: a 1-D world (x along
# axis 0, z along axis 1) with mixture anchors and nonlinear Gaussian conditionals,
# numpy and scipy only, no mim.py. Pins down Eq. 6, 7-10, 11, 12-14 and 15.
# ----------------------------------------------------------------------------------------

GRID = np.linspace(-12.0, 12.0, 1201)


STEP = GRID[1] - GRID[0]


def expect(log_density, values, axes=(0, 1)):
    """Integral of density * values over the grid (a Riemann sum; spectrally accurate for
    smooth, fast-decaying integrands)."""
    weights = np.exp(log_density) * STEP ** len(axes)
    return float(np.sum(np.where(weights > 0, weights * values, 0.0)))


def cross_entropy(log_a, log_b):
    return -expect(log_a, log_b)


def entropy(log_a):
    return cross_entropy(log_a, log_a)


def kl(log_a, log_b):
    return expect(log_a, log_a - log_b)


def kl_1d(log_a, log_b):
    return expect(log_a, log_a - log_b, axes=(0,))


def mixture(log_a, log_b):
    """log of 1/2 (a + b)."""
    return np.logaddexp(log_a, log_b) - math.log(2.0)


def gmm_logpdf(v, weights, means, stds):
    return logsumexp(np.log(weights) + norm.logpdf(v[..., None], means, stds), axis=-1)


@pytest.fixture(scope="module")
def world():
    """Anchors, conditionals and model priors, as log-densities on the (x, z) grid."""
    x, z = np.meshgrid(GRID, GRID, indexing="ij")
    w = {
        "P_x": gmm_logpdf(GRID, [0.4, 0.6], [-1.0, 1.5], [0.5, 0.7]),
        "P_z": gmm_logpdf(GRID, [0.5, 0.5], [-0.5, 1.0], [0.6, 0.8]),
        "q_x": gmm_logpdf(GRID, [0.3, 0.3, 0.4], [-1.2, 0.2, 1.4], [0.6, 0.5, 0.8]),
        "p_z": gmm_logpdf(GRID, [0.6, 0.4], [-0.3, 0.9], [0.9, 0.7]),
        "q_z_given_x": norm.logpdf(z, 0.8 * np.tanh(x) + 0.3 * x, 0.3 + 0.3 * expit(x)),
        "p_x_given_z": norm.logpdf(x, 1.2 * np.sin(z) + 0.5 * z, 0.4 + 0.2 * expit(-z)),
    }
    w["enc"] = w["q_z_given_x"] + w["P_x"][:, None]          # q(z|x) P(x)
    w["dec"] = w["p_x_given_z"] + w["P_z"][None, :]          # p(x|z) P(z)
    w["q"] = w["q_z_given_x"] + w["q_x"][:, None]            # q(x, z)
    w["p"] = w["p_x_given_z"] + w["p_z"][None, :]            # p(x, z)
    w["M_S"] = mixture(w["enc"], w["dec"])
    w["M_theta"] = mixture(w["q"], w["p"])
    return w


def test_grid_densities_are_normalized(world):
    for name in ("enc", "dec", "q", "p", "M_S", "M_theta"):
        assert expect(world[name], 1.0) == pytest.approx(1.0, abs=1e-9), name


def test_eq6_jsd_plus_joint_entropy_is_mixture_entropy(world):
    enc, dec, m_s = world["enc"], world["dec"], world["M_S"]
    jsd = 0.5 * (kl(dec, m_s) + kl(enc, m_s))                          # Eq. 3
    r_h = 0.5 * (entropy(enc) + entropy(dec))                          # Eq. 5
    assert jsd > 0.05
    assert jsd + r_h == pytest.approx(entropy(m_s), abs=1e-7)


def test_eq7_to_10_mim_is_ce_plus_nonnegative_regularizer(world):
    m_s, q, p = world["M_S"], world["q"], world["p"]
    l_ce = cross_entropy(m_s, world["M_theta"])                        # Eq. 7
    l_mim = 0.5 * (cross_entropy(m_s, q) + cross_entropy(m_s, p))      # Eq. 8
    r_mim = 0.5 * (kl(m_s, p) + kl(m_s, q)) - kl(m_s, world["M_theta"])  # Eq. 10
    assert l_ce == pytest.approx(kl(m_s, world["M_theta"]) + entropy(m_s), abs=1e-7)
    assert l_ce > entropy(m_s)
    assert r_mim > 1e-3                                                # q(x,z) != p(x,z)
    assert l_mim == pytest.approx(l_ce + r_mim, abs=1e-7)              # Eq. 9


def test_eq11_decomposition_of_mim(world):
    w = world
    r_h = 0.5 * (entropy(w["enc"]) + entropy(w["dec"]))
    prior_fit = kl_1d(w["P_z"], w["p_z"]) + kl_1d(w["P_x"], w["q_x"])
    consistency = kl(w["enc"], w["p"]) + kl(w["dec"], w["q"])
    l_mim = 0.5 * (cross_entropy(w["M_S"], w["q"]) + cross_entropy(w["M_S"], w["p"]))
    assert l_mim == pytest.approx(r_h + 0.25 * prior_fit + 0.25 * consistency, abs=1e-7)


def test_eq12_to_14_amim_bounds(world):
    """Eq. 12 defines L_A-MIM; Eq. 14 bounds it. Eq. 13 as printed has 1/2 H_q(x,z), but
    Eq. 12 expands to H_q(x,z) + 1/2 KL(P(x)||q(x)) + 1/2 KL(q(z|x)P(x)||p(x,z)); with
    1/2 H_q, Eq. 14 would fail for consistent models. The code follows Eq. 12."""
    w = world
    enc = w["enc"]
    l_amim = 0.5 * (cross_entropy(enc, w["q"]) + cross_entropy(enc, w["p"]))
    h_q = entropy(enc)
    expanded = h_q + 0.5 * kl_1d(w["P_x"], w["q_x"]) + 0.5 * kl(enc, w["p"])
    assert l_amim == pytest.approx(expanded, abs=1e-7)
    ce = cross_entropy(enc, w["M_theta"])
    assert l_amim > ce + 1e-3 and ce > h_q + 1e-3                      # Eq. 14


def test_eq15_vae_as_cross_entropies(world):
    """Eq. 15's right side is half the KL of Eq. 2, which is the negative ELBO averaged
    over P(x) less the constant H(P(x)) (App. E: equal up to a factor 1/2 and a constant)."""
    w = world
    enc, dec = w["enc"], w["dec"]
    rhs = 0.5 * (cross_entropy(enc, enc) + cross_entropy(enc, dec)) - entropy(enc)
    vae_kl = kl(enc, dec)                                              # Eq. 2
    neg_elbo = expect(enc, -(w["p_x_given_z"] + w["P_z"][None, :] - w["q_z_given_x"]))
    h_p_x = -expect(w["P_x"], w["P_x"], axes=(0,))
    assert rhs == pytest.approx(0.5 * vae_kl, abs=1e-7)
    assert vae_kl == pytest.approx(neg_elbo - h_p_x, abs=1e-7)


# ----------------------------------------------------------------------------------------
# Sec. 3, the model's distributions: normalized log-densities in nats, against
# scipy, quadrature and enumeration.
# ----------------------------------------------------------------------------------------

def test_diag_gaussian_matches_scipy():
    loc, scale = torch.tensor([0.3, -1.0, 2.0]), torch.tensor([0.5, 1.5, 0.1])
    v = torch.tensor([[0.0, 0.0, 2.05], [1.0, -2.0, 1.9]])
    expected = multivariate_normal(loc.numpy(), np.diag(scale.numpy() ** 2)).logpdf(v.numpy())
    assert mim.diag_gaussian(loc, scale).log_prob(v).numpy() == pytest.approx(expected, abs=1e-5)


def test_conditionals_and_mixture_integrate_to_one():
    torch.manual_seed(0)
    v = torch.tensor(GRID)[:, None]
    gauss = mim.GaussianMLP(3, 1, 8).double()(torch.randn(5, 3, dtype=torch.float64))
    log_dens = gauss.base_dist.log_prob(v[:, None, :]).squeeze(-1)      # (G, 5)
    assert np.exp(log_dens.detach().numpy()).sum(0) * STEP == pytest.approx(np.ones(5), abs=1e-9)
    mog = mim.MixtureOfGaussians(2, 4).double()()
    xx, yy = np.meshgrid(GRID, GRID, indexing="ij")
    pts = torch.tensor(np.stack([xx.ravel(), yy.ravel()], 1))
    with torch.no_grad():
        assert float(mog.log_prob(pts).exp().sum()) * STEP ** 2 == pytest.approx(1.0, abs=1e-8)


def test_bernoulli_sums_to_one_over_all_binary_vectors():
    torch.manual_seed(0)
    dist = mim.BernoulliMLP(2, 4, 8)(torch.randn(3, 2))                 # 3 points, 4 bits
    bits = torch.tensor([[(i >> k) & 1 for k in range(4)] for i in range(16)]).float()
    log_probs = dist.log_prob(bits[:, None, :])                         # (16, 3)
    assert torch.logsumexp(log_probs, 0).detach().numpy() == pytest.approx(np.zeros(3), abs=1e-6)


def test_standard_normal_anchor_has_its_constant():
    value = mim.StandardNormal(2)().log_prob(torch.zeros(2)).item()
    assert value == pytest.approx(-math.log(2 * math.pi), abs=1e-6)


# ----------------------------------------------------------------------------------------
# Sec. 4, Eq. 7, 8, 12 and Algorithms 1-2: each objective of mim.py is a Monte Carlo
# estimate of its integral on the grid, with finite gradients, and Algorithm 2's
# bound of log q(x) puts its loss above Eq. 8.
# ----------------------------------------------------------------------------------------

ANCHOR_1D = datasets.GaussianMixture(np.array([[-1.0], [1.5]]), 0.6)


def model_1d(q_x="mog", seed=0):
    torch.manual_seed(seed)
    spec = mim.ModelSpec(x_dim=1, z_dim=1, hidden=8, prior="mog", q_x=q_x, components=3)
    x_init = ANCHOR_1D.sample(1000, np.random.default_rng(seed))[0]
    return mim.build_model(spec, x_init=x_init).double()


@torch.no_grad()
def model_grid(model):
    """The model's log-densities on the grid, as numpy arrays ((x, z) axes as above)."""
    v = torch.tensor(GRID)[:, None]                                     # (G, 1)
    q = model.q_z_given_x(v).base_dist                                  # loc, scale (G, 1)
    p = model.p_x_given_z(v).base_dist
    g = {
        "q_z_given_x": torch.distributions.Normal(q.loc, q.scale).log_prob(v.T),
        "p_x_given_z": torch.distributions.Normal(p.loc.T, p.scale.T).log_prob(v),
        "P_x": ANCHOR_1D.log_prob(v), "P_z": model.anchor_z().log_prob(v),
        "p_z": model.log_p_z(v),
    }
    if model.q_x is not None:
        g["q_x"] = model.q_x().log_prob(v)
    g = {k: t.numpy() for k, t in g.items()}
    g["enc"] = g["q_z_given_x"] + g["P_x"][:, None]
    g["dec"] = g["p_x_given_z"] + g["P_z"][None, :]
    g["log_p"] = g["p_x_given_z"] + g["p_z"][None, :]
    # log q(x) where the model has none: the marginal of Eq. 16, and its ELBO bound
    g["marginal"] = logsumexp(g["log_p"], axis=1) + math.log(STEP)
    g["elbo"] = np.sum(np.exp(g["q_z_given_x"]) * (g["log_p"] - g["q_z_given_x"]), 1) * STEP
    g["log_q"] = g["q_z_given_x"] + g.get("q_x", g["marginal"])[:, None]
    return g


def over_m_s(g, f_enc, f_dec=None):
    """E_M_S[f] = 1/2 E_enc[f_enc] + 1/2 E_dec[f_dec]."""
    return 0.5 * expect(g["enc"], f_enc) + 0.5 * expect(g["dec"], f_enc if f_dec is None
                                                       else f_dec)


OBJECTIVES = {"mim": mim.mim_loss, "amim": mim.amim_loss, "vae": mim.vae_loss,
              "ce": mim.ce_loss}
INTEGRALS = {  # (loss, q_x): the objective's expectation, from the grid
    ("mim", "mog"): lambda g: over_m_s(g, -0.5 * (g["log_q"] + g["log_p"])),      # Eq. 8
    ("mim", "marginal"): lambda g: over_m_s(                                     # Alg. 2
        g, -g["log_p"],
        -0.5 * (g["q_z_given_x"] + g["elbo"][:, None]) - 0.5 * g["log_p"]),
    ("amim", "mog"): lambda g: expect(g["enc"], -0.5 * (g["log_q"] + g["log_p"])),  # Eq. 12
    ("amim", "marginal"): lambda g: expect(g["enc"], -g["log_p"]),
    ("vae", "mog"): lambda g: expect(g["enc"], g["q_z_given_x"] - g["log_p"]),
    ("ce", "mog"): lambda g: over_m_s(g, -mixture(g["log_q"], g["log_p"])),       # Eq. 7
}


def monte_carlo(loss_fn, model, reps=40, n=20_000, seed=0):
    """Mean and standard error of the loss over `reps` batches of n points from P(x)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        values = [loss_fn(model, ANCHOR_1D.sample(n, rng)[0].double())[0].item()
                  for _ in range(reps)]
    return float(np.mean(values)), float(np.std(values, ddof=1) / math.sqrt(reps))


@pytest.mark.parametrize("loss,q_x", sorted(INTEGRALS))
def test_objective_matches_its_integral(loss, q_x):
    model = model_1d(q_x)
    g = model_grid(model)
    assert expect(g["enc"], 1.0) == pytest.approx(1.0, abs=1e-7)  # the grid holds the mass
    assert expect(g["dec"], 1.0) == pytest.approx(1.0, abs=1e-7)
    mean, se = monte_carlo(OBJECTIVES[loss], model)
    assert abs(mean - INTEGRALS[loss, q_x](g)) < 4 * se + 1e-4, (mean, se)


def test_algorithm2_upper_bounds_eq8_with_the_marginal():
    g = model_grid(model_1d("marginal"))
    exact = over_m_s(g, -0.5 * (g["log_q"] + g["log_p"]))   # Eq. 8, q(x) = marginal
    assert INTEGRALS["mim", "marginal"](g) > exact + 1e-3


@pytest.mark.parametrize("loss,q_x", sorted(INTEGRALS))
def test_objective_gradient_is_finite(loss, q_x):
    model = model_1d(q_x)
    x = ANCHOR_1D.sample(256, np.random.default_rng(1))[0].double()
    OBJECTIVES[loss](model, x)[0].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(gr).all() for gr in grads)
    assert sum(float(gr.abs().sum()) for gr in grads) > 0


# ----------------------------------------------------------------------------------------
# App. D.2, the score-function gradient of binary decoder samples: unbiased against
# exact gradients (enumeration, Gauss-Hermite), and the variance its baselines save.
# ----------------------------------------------------------------------------------------

def gradient(scalar, params):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(scalar, params)])


def test_score_function_is_unbiased_and_its_baseline_reduces_variance():
    """x ~ Bernoulli(sigmoid(theta)) in {0,1}^3 and a loss f_theta(x) that depends on theta
    too: the exact gradient of E[f] by enumerating the 8 values of x."""
    torch.manual_seed(0)
    theta = torch.tensor([0.3, -0.8, 1.2], dtype=torch.float64, requires_grad=True)
    weight = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)

    def f(x):
        return (x @ weight - 0.7) ** 2 + torch.sin(theta).sum() * x.sum(-1)

    dist = lambda: mim.bernoulli(theta)
    bits = torch.tensor([[(i >> k) & 1 for k in range(3)] for i in range(8)], dtype=torch.float64)
    exact = gradient((dist().log_prob(bits).exp() * f(bits)).sum(), [theta])

    def estimates(surrogate):
        out = []
        for _ in range(3000):
            x = dist().sample((16,))
            out.append(gradient(surrogate(f(x), dist().log_prob(x)).mean(), [theta]))
        return torch.stack(out)

    with_baseline = estimates(mim.score_function_surrogate)
    no_baseline = estimates(lambda fx, lp: fx + fx.detach() * (lp - lp.detach()))
    se = with_baseline.std(0) / math.sqrt(len(with_baseline))
    assert torch.all((with_baseline.mean(0) - exact).abs() < 4 * se), (with_baseline.mean(0), exact)
    assert torch.all(with_baseline.var(0) < 0.5 * no_baseline.var(0))


GH_NODES, GH_WEIGHTS = (torch.tensor(a) for a in np.polynomial.hermite.hermgauss(40))


def gauss_hermite(loc, scale, fn):
    """E_{z ~ N(loc, scale^2)}[fn(z)] for 1-D z; loc, scale (n, 1); fn maps (n, K, 1) to (n, K)."""
    z = loc[:, None, :] + math.sqrt(2.0) * scale[:, None, :] * GH_NODES[None, :, None]
    return (fn(z) * GH_WEIGHTS).sum(-1) / math.sqrt(math.pi)


def exact_mim_loss_binary(model, x):
    """E[mim_loss(model, x)] for binary x (B, 3), 1-D z, q(x) = marginal, by Gauss-Hermite
    quadrature over z ~ q(z|x), z ~ P(z), z' ~ q(z|x) and enumeration of x ~ p(x|z)."""
    def log_p_xz(xs, z):                                   # xs (n, D), z (n, K, 1) -> (n, K)
        return model.p_x_given_z(z).log_prob(xs[:, None, :]) + model.log_p_z(z)

    q = model.q_z_given_x(x).base_dist
    enc = gauss_hermite(q.loc, q.scale, lambda z: -log_p_xz(x, z)).mean()

    bits = torch.tensor([[(i >> k) & 1 for k in range(3)] for i in range(8)], dtype=x.dtype)
    qb = model.q_z_given_x(bits).base_dist                             # q(z|x) for each x
    elbo = gauss_hermite(qb.loc, qb.scale, lambda z: log_p_xz(bits, z)
                         - mim.diag_gaussian(qb.loc[:, None], qb.scale[:, None]).log_prob(z))

    def f_dec(z):                                          # z (1, K, 1) -> (1, K)
        zz = z[0]                                          # (K, 1)
        log_p_x = model.p_x_given_z(zz[:, None, :]).log_prob(bits[None])       # (K, 8)
        log_q_z = model.q_z_given_x(bits).log_prob(zz[:, None, :])              # (K, 8)
        log_p = log_p_x + model.log_p_z(zz)[:, None]
        f = -(0.5 * (log_q_z + elbo[None]) + 0.5 * log_p)
        return (log_p_x.exp() * f).sum(-1)[None]

    one = torch.ones(1, 1, dtype=x.dtype)
    dec = gauss_hermite(0 * one, one, f_dec)[0]
    return 0.5 * enc + 0.5 * dec


BINARY_X = [[1, 0, 1], [0, 0, 1], [1, 1, 0], [0, 1, 1]] * 8


def binary_toy_model():
    torch.manual_seed(0)
    encoder = mim.GaussianMLP(3, 1, 4)
    model = mim.Model(encoder, mim.BernoulliMLP(1, 3, 4), mim.StandardNormal(1), None, 1)
    return model.double()


def mim_gradient_draws(model, x, sampling, n):
    params = list(model.parameters())
    return torch.stack([gradient(mim.mim_loss(model, x, draw_dec=mim.decoder_samples_of(sampling))[0],
                                    params)
                        for _ in range(n)])


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["loo-code", "loo-batch"])
def test_mim_gradient_on_binary_x_is_unbiased(estimator):
    model = binary_toy_model()
    x = torch.tensor(BINARY_X, dtype=torch.float64)
    exact = gradient(exact_mim_loss_binary(model, x), list(model.parameters()))
    draws = mim_gradient_draws(model, x, mim.DecoderSampling(estimator=estimator), 4000)
    se = draws.std(0) / math.sqrt(len(draws))
    z_scores = (draws.mean(0) - exact) / (se + 1e-12)
    assert z_scores.abs().max() < 4.5, z_scores


@pytest.mark.slow
def test_per_code_baseline_lowers_the_variance_of_the_decoder_gradient():
    """The same toy, the gradient of the decoder-sample half alone: 4 images per code with
    the per-code baseline against one image per code with the batch baseline. Measured
    here: the total variance falls by a factor of about 4; the test asks for 2."""
    model = binary_toy_model()

    def variance(sampling):
        torch.manual_seed(1)
        return mim.decoder_sample_gradients(model, 32, sampling, 2000).var(0).sum()

    ratio = variance(mim.DecoderSampling(estimator="loo-batch")) / variance(
        mim.DecoderSampling(estimator="loo-code", draws=4))
    assert ratio > 2, ratio


def test_authors_decoder_samples_give_the_decoder_no_gradient():
    """Their mean image x = E[x|z] makes d log p(x|z) / d logits = x - sigmoid(logits) = 0."""
    model = tiny_model("convhvae", "vamp", z_dim=2)
    draw_dec = mim.decoder_samples_of(mim.DecoderSampling(estimator="authors"))
    dec = draw_dec(model, 8, model.p_z(), mim.FULL)
    loss = mim.decoder_sample_loss(lambda lq, lp: -0.5 * (lq + lp), dec)
    grads = torch.autograd.grad(loss, list(model.p_x_given_z.parameters()), allow_unused=True)
    assert all(g is None or g.abs().max() < 1e-12 for g in grads)
    assert dec[2] is None                                              # no score term


def test_gradient_noise_of_a_pixelhvae_leaves_out_the_mean_image_estimator():
    """The PixelCNN has no mean image, so the authors' estimator has nothing to draw;
    the score-function estimators still run (they crashed with it before)."""
    model = tiny_model("pixelhvae", "vamp", z_dim=2)
    rows = mim.gradient_noise(model, "normal", 8, repeats=3)
    assert [r["estimator"] for r in rows] == [k for k in mim.ESTIMATOR_SETTINGS
                                              if k != "authors"]
    assert all(math.isfinite(r["noise"]) and r["noise"] > 0 for r in rows)


def test_prior_anchor_draws_codes_from_the_model_prior():
    """With anchor "prior" the decoder samples' codes come from p(z), with "normal" from
    P(z) = N(0, I): a mixture prior far from the origin tells them apart by log p(z)."""
    torch.manual_seed(0)
    model = mim.build_model(mim.ModelSpec(x_dim=2, prior="mog", prior_components=3))
    with torch.no_grad():
        model.prior.loc.fill_(6.0)
        model.prior.raw_scale.fill_(-3.0)
    p_z = model.p_z()

    def mean_log_prior(anchor):
        draw_dec = mim.decoder_samples_of(mim.DecoderSampling(latent_anchor=anchor))
        with torch.no_grad():
            log_q_xz, log_p_xz, _ = draw_dec(model, 4000, p_z)
        return float(log_p_xz.mean())
    assert mean_log_prior("prior") > mean_log_prior("normal") + 100


# ----------------------------------------------------------------------------------------
# Sec. 5, warm-up and the optimizer: the schedules, beta on log p(z), the authors'
# image objective, Algorithm 2 at full weights, normalized gradients.
# ----------------------------------------------------------------------------------------

def draws_of_two_level_terms(model, x, seed):
    """log p(x|z), log p(z1|z2), log p(z2) at z ~ q(z|x), drawn as encoder_samples does."""
    torch.manual_seed(seed)
    p_z = model.p_z()
    z = model.q_z_given_x(x).rsample()
    z1, z2 = z[:, :model.z_dim], z[:, model.z_dim:]
    return (model.p_x_given_z(z).log_prob(x), model.p_z1_given_z2(z2).log_prob(z1),
            p_z.top.log_prob(z2))


@pytest.mark.parametrize("progress", [0.0, 2.5, 40.0])
def test_authors_image_objective_equals_its_formula(progress):
    """Their A-MIM per encoder sample: -(1 + beta)/2 [log p(x|z) + log p(z1|z2)
    + beta log p(z2)], beta = min(1, epoch / warmup)."""
    model = tiny_model("convhvae", "vamp", z_dim=2)
    x = torch.bernoulli(torch.rand(6, 16, generator=torch.Generator().manual_seed(0))).double()
    w = mim.warmup_weights("authors", progress, 10)
    beta = min(1.0, (math.floor(progress) + 1) / 10)
    torch.manual_seed(3)
    loss, _ = mim.amim_loss(model, x, w)
    rec, cond, top = draws_of_two_level_terms(model, x.double(), 3)
    formula = (-(1 + beta) / 2 * (rec + cond + beta * top)).mean()
    assert torch.allclose(loss, formula, rtol=1e-10), (loss, formula)


def test_prior_warmup_weighs_log_p_z2_and_keeps_log_p_z1_given_z2():
    model = tiny_model("convhvae", "vamp", z_dim=2)
    x = torch.bernoulli(torch.rand(6, 16, generator=torch.Generator().manual_seed(0))).double()
    w = mim.TermWeights(prior=0.3)
    torch.manual_seed(3)
    loss, _ = mim.amim_loss(model, x, w)
    rec, cond, top = draws_of_two_level_terms(model, x.double(), 3)
    assert torch.allclose(loss, -(rec + cond + 0.3 * top).mean(), rtol=1e-10)


def test_full_weights_are_algorithm_2_exactly():
    """At beta = 1 (the end of every warm-up) L_MIM is Algorithm 2, lines 3 and 5,
    computed here from the same draws: 1/2 (L_enc + L_dec)."""
    for mode in mim.WARMUP_MODES:
        assert mim.warmup_weights(mode, 10.0, 4) == mim.FULL
    torch.manual_seed(0)
    model = mim.build_model(mim.ModelSpec(x_dim=2, hidden=8)).double()
    x = torch.randn(16, 2, dtype=torch.float64)
    torch.manual_seed(5)
    loss, _ = mim.mim_loss(model, x)
    torch.manual_seed(5)
    log_p_z = model.anchor_z().log_prob
    q = model.q_z_given_x(x)
    z = q.rsample()
    l_enc = -(model.p_x_given_z(z).log_prob(x) + log_p_z(z)).mean()
    z = model.anchor_z().sample((16,))
    x_dec = model.p_x_given_z(z).rsample()
    q_dec = model.q_z_given_x(x_dec)
    z_prime = q_dec.rsample()
    l_dec = -0.5 * (q_dec.log_prob(z) + model.p_x_given_z(z).log_prob(x_dec) + log_p_z(z)
                    + model.p_x_given_z(z_prime).log_prob(x_dec) + log_p_z(z_prime)
                    - q_dec.log_prob(z_prime)).mean()
    assert torch.allclose(loss, 0.5 * (l_enc + l_dec), rtol=1e-12), (loss, l_enc, l_dec)


def test_normalized_gradients_have_unit_norm_and_keep_their_direction():
    torch.manual_seed(0)
    model = mim.build_model(mim.ModelSpec(x_dim=2, hidden=8))
    mim.mim_loss(model, torch.randn(32, 2))[0].backward()
    before = [p.grad.clone() for p in model.parameters()]
    mim.normalize_gradients(model)
    for g0, p in zip(before, model.parameters()):
        assert abs(p.grad.norm().item() - 1) < 1e-5
        assert torch.nn.functional.cosine_similarity(g0.reshape(-1), p.grad.reshape(-1),
                                                     dim=0) > 1 - 1e-6


def test_normalized_gradients_treat_the_halves_of_a_gated_layer_as_two_layers():
    """Tomczak & Welling's gated layers are two layers h and g, each normalized on its own
    by their AdamNormGrad; a fused Gated layer holds both."""
    model = tiny_model("convhvae", "vamp", z_dim=2)
    x = torch.bernoulli(torch.rand(6, 16, generator=torch.Generator().manual_seed(0))).double()
    mim.amim_loss(model, x)[0].backward()
    gated = model.p_x_given_z.from_z1.layer
    before = [h.clone() for h in gated.weight.grad.chunk(2)]
    fused = torch.cat(before).norm()
    mim.normalize_gradients(model)
    for g0, g in zip(before, gated.weight.grad.chunk(2)):
        assert torch.allclose(g, g0 / (g0.norm() + mim.NORMGRAD_EPS), rtol=1e-12)
        assert not torch.allclose(g, g0 / (fused + mim.NORMGRAD_EPS), rtol=1e-3)
    plain = model.q_z_given_x.z2_mean.weight.grad
    assert plain.norm().item() == pytest.approx(1, abs=1e-3)


def adam_norm_grad_reference(params, grads_per_step, lr, eps=1e-8, b1=0.9, b2=0.999):
    """AdamNormGrad of Tomczak & Welling's code, written out: eps on sqrt(v) before the
    bias correction, which sits in the step size."""
    params = [p.clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t, grads in enumerate(grads_per_step, start=1):
        for p, g, m_, v_ in zip(params, grads, m, v):
            m_.mul_(b1).add_((1 - b1) * g)
            v_.mul_(b2).add_((1 - b2) * g * g)
            p.sub_(lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) * m_ / (v_.sqrt() + eps))
    return params


def test_normgrad_steps_as_the_authors_adam_with_eps_before_the_bias_correction():
    """Gradients spread over eight orders of magnitude, as normalized gradients of large
    tensors are: the elements below about 3e-7 tell the two eps placements apart."""
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(50, 40, generator=gen, dtype=torch.float64) for _ in range(2)]
    steps = [[torch.randn(50, 40, generator=gen, dtype=torch.float64)
              * 10.0 ** -torch.randint(2, 10, (50, 40), generator=gen) for _ in start]
             for _ in range(20)]
    expected = adam_norm_grad_reference(start, steps, lr=5e-4)

    def run(make):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        opt = make([{"params": params, "lr": 5e-4}])
        for grads in steps:
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
        return [p.detach() for p in params]
    moved = max((e - s).abs().max() for e, s in zip(expected, start))
    for got, want in zip(run(mim.EpsFirstAdam), expected):
        assert (got - want).abs().max() < 1e-9 * moved
    torch_adam = run(torch.optim.Adam)
    assert max((g - e).abs().max() for g, e in zip(torch_adam, expected)) > 0.1 * moved
    spec = mim.TrainSpec(optimizer="normgrad")
    assert type(mim.optimizer(mim.build_model(mim.ModelSpec(x_dim=2)), spec)) is \
        mim.EpsFirstAdam


def test_pseudo_inputs_start_on_training_points_as_chosen():
    """random: K distinct training points as they are; authors: the first K plus
    N(0, 0.01^2) noise (their --use_training_data_init)."""
    x_init = torch.rand(400, 784, generator=torch.Generator().manual_seed(0))
    spec = dict(x_dim=784, binary=True, image_shape=(1, 28, 28), arch="convhvae",
                prior="vamp", prior_components=50)
    torch.manual_seed(0)
    u = mim.build_model(mim.ModelSpec(**spec), x_init).prior.pseudo_inputs.detach()
    rows = [int(torch.nonzero((x_init == r).all(1))[0]) for r in u]           # exact copies
    assert len(set(rows)) == 50 and rows != list(range(50))
    torch.manual_seed(0)
    u = mim.build_model(mim.ModelSpec(**spec, pseudo_init="authors"),
                        x_init).prior.pseudo_inputs.detach()
    noise = u - x_init[:50]                                                  # (K, D)
    assert noise.std().item() == pytest.approx(mim.PSEUDO_INPUT_NOISE, rel=0.02)
    assert abs(noise.mean().item()) < 3e-4                       # 6 standard errors


def scripted_validation(losses):
    """A loss function whose validation value at epoch t (model in eval mode) is
    losses[t - 1], and a tiny model to train with it."""
    torch.manual_seed(0)
    model = mim.build_model(mim.ModelSpec(x_dim=1, hidden=2))
    calls = iter(losses)

    def loss_fn(model, x, w=mim.FULL):
        loss = model.q_z_given_x(x).mean.square().mean()
        return loss, {"loss": next(calls) if not model.training else loss.item()}
    return model, loss_fn


def authors_early_stopping(losses, warmup, early_stopping_epochs):
    """Their experiment_vae loop, transcribed: (epoch of the saved model, epochs run)."""
    best, e, saved = math.inf, 0, 0
    for epoch, loss in enumerate(losses, start=1):
        if loss < best:
            e, best, saved = 0, loss, epoch
        else:
            e += 1
            if epoch < warmup:
                e = 0
            if e > early_stopping_epochs:
                break
    return saved, epoch


@pytest.mark.parametrize("seed", range(6))
def test_best_in_warmup_with_patience_plus_one_is_the_authors_early_stopping(seed):
    rng = np.random.default_rng(seed)
    losses = list(rng.permutation(40).astype(float) + np.linspace(10, 0, 40))
    warmup, theirs = int(rng.integers(1, 8)), int(rng.integers(1, 5))
    model, loss_fn = scripted_validation(losses)
    spec = mim.TrainSpec(epochs=40, batch_size=4, warmup=warmup, warmup_mode="authors",
                         patience=theirs + 1, best_in_warmup=True)
    _, best_epoch, epochs, _ = mim.train(model, loss_fn, torch.randn(8, 1), torch.randn(4, 1),
                                         spec)
    assert (best_epoch, epochs) == authors_early_stopping(losses, warmup, theirs)


def test_authors_codes_come_from_the_first_pseudo_inputs_with_gradients():
    """Their generate_x: z2 ~ q(z2|u_k) for the first n pseudo-inputs u_k by
    reparameterization, z1 ~ p(z1|z2); gradients reach u, q(z2|x) and p(z1|z2)."""
    model = tiny_model("convhvae", "vamp", z_dim=2)             # K = 3 pseudo-inputs
    with torch.no_grad():
        model.q_z_given_x.z2_logvar.weight.zero_()
        model.q_z_given_x.z2_logvar.bias.fill_(mim.LOGVAR_BOUNDS[0])  # std e^-3 = 0.05
    p_z = model.p_z()
    torch.manual_seed(1)
    z = mim.authors_codes(model, 5, p_z)                        # cycles: u_0 u_1 u_2 u_0 u_1
    loc = p_z.top.component_distribution.base_dist.loc[[0, 1, 2, 0, 1]]
    assert (z[:, 2:] - loc).abs().max() < 6 * math.exp(-3)
    assert not torch.allclose(z[0, 2:], z[3, 2:])              # fresh noise for each code
    z[:2].sum().backward()                                      # codes of u_0 and u_1
    grad_u = model.prior.pseudo_inputs.grad.abs().sum(1)
    assert grad_u[0] > 0 and grad_u[1] > 0 and grad_u[2] == 0
    assert model.p_z1_given_z2.mean.weight.grad.abs().sum() > 0


def test_prob_clamp_is_the_authors_clamped_bernoulli_and_stays_normalized():
    torch.manual_seed(0)
    spec = mim.ModelSpec(x_dim=12, binary=True, image_shape=(1, 3, 4), arch="convhvae",
                         z_dim=2, prob_clamp=1e-5)
    model = mim.build_model(spec).double()
    with torch.no_grad():
        model.p_x_given_z.convs[-1].bias.fill_(30.0)          # probabilities near 1
    z = torch.randn(3, 4, dtype=torch.float64)
    images = all_binary_images(12)
    p = model.p_x_given_z(z)
    probs = torch.sigmoid(model.p_x_given_z.convs(
        model.p_x_given_z.to_image(torch.cat([model.p_x_given_z.from_z1(z[:, :2]),
                                              model.p_x_given_z.from_z2(z[:, 2:])], -1)
                                   ).view(-1, 1, 3, 4)).flatten(1)).clamp(1e-5, 1 - 1e-5)
    x = images[[0, 4095]]
    authors = (x[:, None] * probs.log() + (1 - x[:, None]) * (1 - probs).log()).sum(-1).T
    assert torch.allclose(p.log_prob(x[:, None]).T, authors, rtol=1e-9)
    total = torch.logsumexp(p.log_prob(images[:, None]), dim=0)        # (3,)
    assert torch.allclose(total, torch.zeros(3, dtype=torch.float64), atol=1e-9)


def test_he_init_draws_dense_weights_with_variance_two_over_fan_in():
    torch.manual_seed(0)
    model = mim.build_model(mim.ModelSpec(x_dim=400, hidden=500, init="he"))
    first = model.q_z_given_x.net[0].weight                                 # (500, 400)
    assert first.std().item() == pytest.approx(math.sqrt(2 / 400), rel=0.01)
    assert abs(first.mean().item()) < 0.001
    torch.manual_seed(0)
    default = mim.build_model(mim.ModelSpec(x_dim=400, hidden=500)).q_z_given_x.net[0].weight
    assert default.std().item() == pytest.approx(1 / math.sqrt(3 * 400), rel=0.01)


def test_rng_state_follows_the_tensors_cuda_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert mim.cuda_devices(torch.device("cuda", 1)) == [1]
    assert mim.cuda_devices(torch.device("cuda")) == [0]
    assert mim.cuda_devices(torch.device("cpu")) == []


def test_speed_up_changes_the_layout_only_on_the_cpu():
    model = mim.speed_up(tiny_model("convhvae"), torch.device("cuda"))
    assert model.p_x_given_z.convs[1].layer.weight.is_contiguous()
    model = mim.speed_up(tiny_model("convhvae"), torch.device("cpu"))
    assert model.p_x_given_z.convs[1].layer.weight.is_contiguous(
        memory_format=torch.channels_last)


def test_warmup_schedules():
    assert mim.warmup_weights("paper", 0.0, 3) == mim.TermWeights(p=0.0, kl=0.0)
    assert mim.warmup_weights("paper", 1.5, 3) == mim.TermWeights(p=0.25, kl=0.5)
    assert mim.warmup_weights("paper", 7.0, 3) == mim.FULL
    early = mim.warmup_weights("authors", 0.5, 3)            # epoch 1 of 3
    assert early.q == pytest.approx(0.5 / 3) and not early.decoder_samples
    assert mim.warmup_weights("authors", 2.5, 3) == mim.FULL   # epoch 3: full, with D_dec
    assert mim.warmup_weights("paper", 0.0, 0) == mim.FULL
    delay = mim.PRIOR_DELAY * 4
    assert mim.warmup_weights("prior", delay, 4) == mim.TermWeights(prior=0.0,
                                                                    kl=delay / 4)
    halfway = mim.warmup_weights("prior", delay + (4 - delay) / 2, 4)
    assert halfway.prior == pytest.approx(0.5)
    assert halfway.kl == pytest.approx((delay + (4 - delay) / 2) / 4)
    assert halfway.decoder_samples and halfway.q == halfway.p == 0.5
    assert early.top_prior == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------------------
# Sec. 5.2 and App. D.1, the image networks (convHVAE, PixelHVAE, VampPrior): shapes,
# normalization over all binary images, causality, bounds, finite gradients.
# ----------------------------------------------------------------------------------------

TINY = (1, 4, 4)  # 16 pixels: small enough to sum over all 2^16 binary images


def tiny_model(arch, prior="normal", z_dim=1, seed=0):
    torch.manual_seed(seed)
    spec = mim.ModelSpec(x_dim=math.prod(TINY), binary=True, image_shape=TINY, arch=arch,
                         prior=prior, z_dim=z_dim, prior_components=3)
    return mim.build_model(spec, x_init=torch.rand(10, math.prod(TINY))).double()


def all_binary_images(dim):
    return torch.tensor(list(itertools.product([0.0, 1.0], repeat=dim)), dtype=torch.float64)


@pytest.mark.parametrize("decoder", [mim.ConvDecoder, mim.PixelDecoder])
def test_image_decoders_are_normalized_over_all_binary_images(decoder):
    torch.manual_seed(0)
    shape = (1, 3, 4)                                # 12 pixels: 4096 binary images
    p_x_given_z = decoder(shape, 2).double()
    x = all_binary_images(12)                                           # (4096, 12)
    with torch.no_grad():
        for z in torch.randn(3, 4, dtype=torch.float64):
            log_p = p_x_given_z(z.expand(len(x), 4)).log_prob(x)        # (4096,)
            assert log_p.shape == (len(x),)
            assert torch.logsumexp(log_p, 0).item() == pytest.approx(0.0, abs=1e-9)


def grid_2d(limit=9.0, n=401):
    v = torch.linspace(-limit, limit, n, dtype=torch.float64)
    g1, g2 = torch.meshgrid(v, v, indexing="ij")
    return torch.stack([g1, g2], -1).view(-1, 2), (v[1] - v[0]).item() ** 2


@pytest.mark.parametrize("prior", ["normal", "vamp"])
def test_two_level_posterior_and_prior_integrate_to_one(prior):
    """z = (z1, z2) with one dimension per level: quadrature on a grid."""
    model = tiny_model("convhvae", prior)
    z, cell = grid_2d()
    x = torch.bernoulli(torch.full((1, math.prod(TINY)), 0.5, dtype=torch.float64))
    with torch.no_grad():
        log_q = model.q_z_given_x(x).log_prob(z[:, None, :])             # (N, 1)
        assert log_q.shape == (len(z), 1)
        assert (log_q.exp().sum() * cell).item() == pytest.approx(1.0, abs=1e-6)
        p_z = model.p_z()
        assert (p_z.log_prob(z).exp().sum() * cell).item() == pytest.approx(1.0, abs=1e-6)


def test_two_level_samples_have_the_shapes_of_the_latent_groups():
    model = tiny_model("convhvae", "vamp", z_dim=3)
    x = torch.bernoulli(torch.rand(5, 16, dtype=torch.float64))
    q = model.q_z_given_x(x)
    assert model.latent_groups == {"z1": (0, 3), "z2": (3, 6)}
    assert q.rsample().shape == (5, 6) and q.sample((7,)).shape == (7, 5, 6)
    assert q.log_prob(q.sample((7,))).shape == (7, 5) and q.mean.shape == (5, 6)
    assert model.p_z().sample((4,)).shape == (4, 6)
    assert model.p_x_given_z(q.sample()).log_prob(x).shape == (5,)


def test_two_level_mean_is_the_mean_of_samples():
    model = tiny_model("convhvae", z_dim=2)
    x = torch.bernoulli(torch.rand(3, 16, dtype=torch.float64))
    q = model.q_z_given_x(x)
    torch.manual_seed(1)
    samples = q.sample((20000,))                                        # (S, 3, 4)
    se = samples.std(0) / math.sqrt(len(samples))
    mean_se = se * math.sqrt(1 + len(samples) / mim.MEAN_SAMPLES)       # both are noisy
    assert ((q.mean - samples.mean(0)).abs() < 4.5 * mean_se).all()


def test_vamp_prior_is_the_mixture_of_encoded_pseudo_inputs():
    model = tiny_model("convhvae", "vamp", z_dim=2)
    z2 = torch.randn(6, 2, dtype=torch.float64)
    u = model.prior.pseudo_inputs.clamp(0, 1)                           # (K, D)
    q = model.q_z_given_x.q_z2_given_x(u)
    mean, std = q.base_dist.loc, q.base_dist.scale                      # (K, 2)
    log_n = (-0.5 * ((z2[:, None] - mean) / std) ** 2 - torch.log(std)
             - 0.5 * math.log(2 * math.pi)).sum(-1)                     # (6, K)
    explicit = torch.logsumexp(log_n, 1) - math.log(len(u))
    assert torch.allclose(model.prior(model.q_top).log_prob(z2), explicit, atol=1e-10)
    z = torch.cat([torch.randn(6, 2, dtype=torch.float64), z2], -1)
    expected = explicit + model.p_z1_given_z2(z2).log_prob(z[:, :2])
    assert torch.allclose(model.log_p_z(z), expected, atol=1e-10)


def test_encoder_log_variances_are_bounded():
    model = tiny_model("convhvae", z_dim=2)
    for p in model.parameters():
        p.data.mul_(1e3)                                                # push to the limits
    q = model.q_z_given_x(torch.bernoulli(torch.rand(4, 16, dtype=torch.float64)))
    for scale in (q.top.base_dist.scale, q.conditional(q.top.sample()).base_dist.scale):
        logvar = 2 * scale.log()
        assert (logvar >= mim.LOGVAR_BOUNDS[0] - 1e-9).all()
        assert (logvar <= mim.LOGVAR_BOUNDS[1] + 1e-9).all()


def test_pixelcnn_is_causal():
    """d logits[i] / d x[j] is zero for every j >= i (raster order) and not for all j < i."""
    torch.manual_seed(0)
    net = mim.PixelCNN(1, 2).double()
    h, w = 5, 5
    x = torch.bernoulli(torch.full((1, 1, h, w), 0.5, dtype=torch.float64)).requires_grad_()
    cond = torch.randn(1, 2, h, w, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: net(v, cond).flatten(), x)
    jac = jac.reshape(h * w, h * w)                                     # (output, input)
    upper = torch.triu(torch.ones(h * w, h * w, dtype=torch.bool))      # j >= i
    assert (jac[upper] == 0).all()
    assert (jac[~upper].abs() > 0).float().mean() > 0.5                 # the past does matter


def test_pixelcnn_sampling_window_sees_the_whole_receptive_field():
    torch.manual_seed(0)
    net = mim.PixelCNN(1, 2).double()
    x = torch.bernoulli(torch.full((2, 1, 14, 6), 0.5, dtype=torch.float64))
    cond = torch.randn(2, 2, 14, 6, dtype=torch.float64)
    full = net(x, cond)
    for row in range(14):
        top = max(0, row - net.receptive_rows)
        crop = net(x[:, :, top:row + 1], cond[:, :, top:row + 1])
        assert torch.allclose(crop[:, :, row - top], full[:, :, row], atol=1e-12)


def test_pixelcnn_samples_follow_its_log_prob():
    """Frequencies of 4,000 autoregressive samples of a 2x2 image against exp(log_prob)."""
    torch.manual_seed(0)
    net = mim.PixelCNN(1, 2)
    cond = torch.randn(1, 2, 2, 2).expand(4000, -1, -1, -1)
    dist = mim.PixelCNNBernoulli(net, cond, (1, 2, 2))
    samples = dist.sample()                                             # (4000, 4)
    images = all_binary_images(4).float()
    probs = mim.PixelCNNBernoulli(net, cond[:16], (1, 2, 2)).log_prob(images).exp()
    counts = (samples[:, None, :] == images[None]).all(-1).sum(0).float()
    expected = probs.detach() * len(samples)
    chi2 = (((counts - expected) ** 2) / expected).sum().item()
    assert abs(probs.sum().item() - 1) < 1e-5
    assert chi2 < 37.7          # chi-square, 15 degrees of freedom, p = 0.001


@pytest.mark.parametrize("arch,loss", [("convhvae", "mim"), ("convhvae", "amim"),
                                       ("convhvae", "vae"), ("pixelhvae", "mim"),
                                       ("pixelhvae", "amim")])
def test_image_objectives_have_finite_gradients(arch, loss):
    model = tiny_model(arch, "vamp", z_dim=2).float()
    x = torch.bernoulli(torch.rand(6, 16))
    value, stats = OBJECTIVES[loss](model, x)
    value.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert math.isfinite(value.item()) and all(torch.isfinite(g).all() for g in grads)
    assert model.prior.pseudo_inputs.grad is not None                    # the prior learns


# ----------------------------------------------------------------------------------------
# For comparison, InfoMax-VAE and the inference critics: their bounds against closed
# forms, the shuffled pairs, the minibatch MI estimate, the critics' parameters.
# ----------------------------------------------------------------------------------------

def infonce_by_hand(scores):
    """log B + mean_i log(exp s_ii / sum_j exp s_ji), in float64 numpy."""
    s = scores.double().numpy()
    return math.log(len(s)) + np.mean(np.diag(s) - logsumexp(s, axis=0))


def test_infonce_is_at_most_log_batch_size_and_reaches_it_for_a_perfect_critic():
    torch.manual_seed(0)
    for b in (2, 16, 128):
        scores = 3 * torch.randn(b, b, dtype=torch.float64)
        value = mim.infonce(scores).item()
        assert value == pytest.approx(infonce_by_hand(scores), abs=1e-12)
        assert value <= math.log(b)
        perfect = 1e3 * torch.eye(b, dtype=torch.float64)      # always picks its own x
        assert mim.infonce(perfect).item() == pytest.approx(math.log(b), abs=1e-12)
        uninformed = torch.zeros(b, b, dtype=torch.float64)    # independent x and z
        assert mim.infonce(uninformed).item() == pytest.approx(0.0, abs=1e-12)


GAUSS_P, GAUSS_Q = (0.5, 0.8), (-0.3, 1.3)                  # (mean, std) of P and Q


def gaussian_kl(p, q):
    (m1, s1), (m2, s2) = p, q
    return math.log(s2 / s1) + (s1 ** 2 + (m1 - m2) ** 2) / (2 * s2 ** 2) - 0.5


def log_ratio(v):                                           # log dP/dQ
    return norm.logpdf(v, *GAUSS_P) - norm.logpdf(v, *GAUSS_Q)


@pytest.mark.parametrize("bound,shift", [("f", 1.0), ("dv", 0.0), ("dv", 3.0)])
def test_kl_dual_is_a_lower_bound_tight_at_the_optimal_critic(bound, shift):
    """KL(N(0.5, 0.8^2) || N(-0.3, 1.3^2)) in closed form against the duals on 400,000
    samples: the optimal critic (1 + log ratio for f, log ratio + any constant for DV)
    reaches it within Monte Carlo error; scaled, shifted or shrunk critics stay below."""
    rng = np.random.default_rng(0)
    on_p = rng.normal(*GAUSS_P, size=400_000)
    on_q = rng.normal(*GAUSS_Q, size=400_000)
    exact = gaussian_kl(GAUSS_P, GAUSS_Q)

    def dual(critic):
        t = [torch.as_tensor(critic(v)) for v in (on_p, on_q)]
        return mim.kl_dual(*t, bound).item()

    assert dual(lambda v: log_ratio(v) + shift) == pytest.approx(exact, abs=0.01)
    worse = [lambda v: 0.5 * log_ratio(v) + shift, lambda v: 1.5 * log_ratio(v) + shift,
             lambda v: 0 * v + shift]
    if bound == "f":                                        # DV ignores a constant shift
        worse.append(lambda v: log_ratio(v) + shift - 0.5)
    for critic in worse:
        assert dual(critic) < exact - 0.02
    for critic in worse:                                    # -log u >= 1 - u
        t = [torch.as_tensor(critic(v)) for v in (on_p, on_q)]
        assert mim.kl_dual(*t, "dv") >= mim.kl_dual(t[0] + 1, t[1] + 1, "f")


def test_shuffled_pairs_are_a_derangement_and_samples_of_the_product_of_marginals():
    """x ~ N(0, 1) with z = x + 0.3 noise: correlation 0.96 in the matched pairs. After
    shuffling, x and z are independent: the correlation is within 4 standard errors of
    zero and a chi-square test on the quadrant counts does not reject; z keeps its
    marginal (the same values)."""
    torch.manual_seed(0)
    xs, zs = [], []
    for _ in range(200):
        x = torch.randn(128, 1, dtype=torch.float64)
        z = x + 0.3 * torch.randn_like(x)
        shuffled = mim.shuffled_pairs(z)
        assert torch.equal(shuffled.sort(0).values, z.sort(0).values)
        xs.append(x)
        zs.append(shuffled)
    x, z = torch.cat(xs).squeeze(1).numpy(), torch.cat(zs).squeeze(1).numpy()
    assert abs(np.corrcoef(x, z)[0, 1]) < 4 / math.sqrt(len(x))
    counts = np.histogram2d(x, z, bins=[[-np.inf, 0, np.inf]] * 2)[0]
    assert scipy.stats.chi2_contingency(counts).pvalue > 1e-3
    index = torch.arange(50.0).unsqueeze(1)
    for _ in range(100):                                    # no pair stays matched
        assert not (mim.shuffled_pairs(index) == index).any()


# loss: (critic network of the model, objective), as --loss chooses them
COMPARISON_LOSSES = {"vae": (None, mim.vae_loss), "infomax": ("joint", mim.infomax_loss),
                     "critic-self": (None, mim.critic_loss),
                     "critic-nn": ("separable", mim.network_critic_loss),
                     "critic-hybrid": ("hybrid", mim.network_critic_loss),
                     "mim": (None, mim.mim_loss)}


def critic_model(loss, arch="mlp"):
    """(model, its objective) of `loss` on 5-D x (mlp) or tiny binary images."""
    torch.manual_seed(0)
    critic, loss_fn = COMPARISON_LOSSES[loss]
    if arch == "mlp":
        spec = mim.ModelSpec(x_dim=5, z_dim=3, hidden=8, critic=critic)
    else:
        spec = mim.ModelSpec(x_dim=16, binary=True, image_shape=TINY, arch=arch, z_dim=2,
                             critic=critic)
    return mim.build_model(spec), loss_fn


def n_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("arch", ["mlp", "convhvae"])
def test_self_critic_adds_no_parameters_and_the_network_critics_do(arch):
    vae = n_params(critic_model("vae", arch)[0])
    assert n_params(critic_model("critic-self", arch)[0]) == vae
    assert critic_model("critic-self", arch)[0].critic is None
    for loss in ("critic-nn", "critic-hybrid", "infomax"):
        model, _ = critic_model(loss, arch)
        assert n_params(model) == vae + n_params(model.critic) > vae
    hybrid, nn_critic = critic_model("critic-hybrid", arch)[0], critic_model("critic-nn",
                                                                            arch)[0]
    assert hybrid.critic.trunk is None and nn_critic.critic.trunk is not None
    assert n_params(nn_critic.critic) > n_params(hybrid.critic)


def test_hybrid_critic_reads_the_encoders_first_layers_and_nn_critic_does_not():
    """The InfoNCE term alone: its gradient reaches the encoder's first layer through
    the shared features (hybrid) or only through z (neural); the decoder gets none."""
    for loss, shares in (("critic-hybrid", True), ("critic-nn", False)):
        model, _ = critic_model(loss)
        x = torch.randn(32, 5)
        q_z_given_x = model.q_z_given_x(x)
        z = q_z_given_x.rsample().detach()                  # no path through z
        mim.infonce(mim.network_critic_scores(model, x, q_z_given_x, z)).backward()
        first = model.q_z_given_x.net[0].weight.grad
        assert (first is not None and first.abs().sum() > 0) == shares
        assert all(p.grad is None for p in model.p_x_given_z.parameters())


@pytest.mark.parametrize("arch", ["mlp", "convhvae"])
def test_pairwise_log_prob_equals_one_encoding_per_pair(arch):
    model, _ = critic_model("critic-self", arch)
    x = torch.randn(6, 5) if arch == "mlp" else torch.bernoulli(torch.full((6, 16), 0.5))
    with torch.no_grad():
        q_z_given_x = model.q_z_given_x(x)
        z = q_z_given_x.sample()[:4]
        pairs = mim.pairwise_log_prob(q_z_given_x, z)
        by_pair = torch.tensor([[model.q_z_given_x(x[j:j + 1]).log_prob(z[i:i + 1]).item()
                                 for i in range(4)] for j in range(6)])
    assert pairs.shape == (6, 4)
    assert torch.allclose(pairs, by_pair, atol=1e-4)


class LinearGaussianEncoder(torch.nn.Module):
    """q(z|x) = N(A x, s^2 I)."""

    def __init__(self, a, s):
        super().__init__()
        self.a, self.s = a, s

    def forward(self, x):
        loc = x @ self.a.T
        return mim.diag_gaussian(loc, torch.full_like(loc, self.s))


def test_minibatch_mi_and_kl_match_the_closed_form_on_a_linear_gaussian_encoder():
    """x ~ N(0, I_2), q(z|x) = N(A x, s^2 I), p(z) = N(0, I). Then I(x; z) =
    1/2 log det(I + A A^T / s^2) and E_x KL(q(z|x) || p(z)) = 1/2 sum_k (s^2 + A_kk^2 - 1
    - log s^2) for diagonal A. With B = 1000 the MI estimate is within 0.03 nats (1.96
    nats; over seeds 0-3 it fell within 0.021), the KL within 4 standard errors."""
    a, s = torch.diag(torch.tensor([2.0, 0.7], dtype=torch.float64)), 0.5
    model = mim.Model(LinearGaussianEncoder(a, s), None, mim.StandardNormal(2), None, 2)
    model.double()
    torch.manual_seed(0)
    x = torch.randn(20_000, 2, dtype=torch.float64)
    terms = evaluate.posterior_kl_terms(model, x, batch=1000)
    mi = 0.5 * np.linalg.slogdet(np.eye(2) + (a @ a.T).numpy() / s ** 2)[1]
    kl = 0.5 * sum(s ** 2 + a_kk ** 2 - 1 - math.log(s ** 2) for a_kk in (2.0, 0.7))
    assert terms["test_mi_batch"] == pytest.approx(mi, abs=0.03)
    sd = 3.13                                   # of one KL sample, measured on 200,000
    assert terms["test_kl"] == pytest.approx(kl, abs=4 * sd / math.sqrt(len(x)))
    assert terms["test_mi_batch_cap"] == pytest.approx(math.log(1000))
    assert terms["test_kl"] - terms["test_marginal_kl"] == pytest.approx(terms["test_mi_batch"])


def test_minibatch_mi_is_the_self_critics_infonce_and_at_most_log_b():
    model, _ = critic_model("critic-self")
    torch.manual_seed(1)
    x = 3 * torch.randn(64, 5)
    torch.manual_seed(2)
    terms = evaluate.posterior_kl_terms(model, x, batch=64)
    torch.manual_seed(2)
    with torch.no_grad():
        q_z_given_x = model.q_z_given_x(x)
        nce = mim.infonce(mim.self_critic_scores(model, x, q_z_given_x, q_z_given_x.sample()))
    assert terms["test_mi_batch"] == pytest.approx(nce.item(), abs=1e-5)
    assert terms["test_mi_batch"] <= math.log(64)


def test_critic_network_gets_its_own_learning_rate():
    model, _ = critic_model("infomax")
    spec = mim.TrainSpec()
    groups = mim.optimizer(model, spec).param_groups
    assert [g["lr"] for g in groups] == [spec.lr, spec.critic_lr]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.critic.parameters()}
    assert len(mim.optimizer(critic_model("critic-self")[0], spec).param_groups) == 1


@pytest.mark.parametrize("loss", ["infomax", "critic-self", "critic-nn", "critic-hybrid"])
@pytest.mark.parametrize("arch", ["mlp", "convhvae"])
def test_comparison_objectives_have_finite_gradients_and_report_the_elbo(loss, arch):
    model, loss_fn = critic_model(loss, arch)
    x = torch.randn(16, 5) if arch == "mlp" else torch.bernoulli(torch.full((16, 16), 0.5))
    value, stats = loss_fn(model, x, mim.FULL)
    value.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert float(stats["loss"]) == pytest.approx(float(stats["rec"] + stats["kl"]), rel=1e-5)
    bound = stats.get("mi_dual", stats.get("infonce"))
    assert math.isfinite(bound) and (loss == "infomax" or bound <= math.log(16) + 1e-6)


def test_infomax_dv_bound_and_weights_reach_the_objective():
    model, _ = critic_model("infomax")
    x = torch.randn(32, 5)
    values = {}
    for alpha in (0.0, 2.0):
        torch.manual_seed(3)
        values[alpha] = mim.infomax_loss(model, x, mim.FULL, alpha=alpha, bound="dv")
    (l0, s0), (l2, s2) = values[0.0], values[2.0]
    assert l0.item() == pytest.approx(float(s0["rec"] + s0["kl"]), rel=1e-5)
    assert l2.item() == pytest.approx(l0.item() - 2.0 * float(s2["mi_dual"]), rel=1e-5)


# ----------------------------------------------------------------------------------------
# mim.py as a library: copied alone it needs only torch; no import circle; --amp
# keeps the densities in float32; the CPU speed-ups change no result.
# ----------------------------------------------------------------------------------------

LIBRARY_ALONE = """
import sys, torch, mim
local = {"datasets", "evaluate", "scipy", "sklearn", "matplotlib"} & set(sys.modules)
torch.manual_seed(0)
x = torch.cat([0.1 * torch.randn(600, 2) + 1, 0.1 * torch.randn(600, 2) - 1])
x = x[torch.randperm(len(x))]
spec = mim.ModelSpec(x_dim=2, z_dim=2, hidden=16)
model = mim.build_model(spec)
best, best_epoch, epochs, history = mim.train(model, mim.mim_loss, x[:1000], x[1000:],
                                              mim.TrainSpec(epochs=4, warmup=1))
model.load_state_dict(best)
mim.save_checkpoint("toy.pt", model, spec, note="alone")
loaded, extra = mim.load_checkpoint("toy.pt")
v = torch.randn(5, 2)
same = all(torch.equal(f(model)(v).mean, f(loaded)(v).mean)
           for f in (lambda m: m.q_z_given_x, lambda m: m.p_x_given_z))
print(sorted(local), same, extra["note"], epochs, history[0]["val_loss"],
      history[-1]["val_loss"])
"""


@pytest.mark.slow
def test_mim_py_copied_alone_imports_nothing_else_and_trains_a_toy_model(tmp_path):
    """The library needs only mim.py and torch: copied into an empty folder, it imports
    none of the repository's other files (nor scipy, sklearn, matplotlib), trains a model
    from a ModelSpec, and saves it; the loaded checkpoint gives the same outputs. No
    progress lines: stderr stays empty. `python mim.py` there says in one line that the
    command line needs the repository's other files."""
    shutil.copy(os.path.join(HERE, "mim.py"), tmp_path)
    proc = subprocess.run([sys.executable, "-E", "-s", "-c", LIBRARY_ALONE], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    local, same, note, epochs, first, last = proc.stdout.split()
    assert local == "[]" and same == "True" and note == "alone"
    assert int(epochs) == 4 and float(last) < float(first)
    assert sorted(os.listdir(tmp_path)) in (["mim.py", "toy.pt"],
                                            ["__pycache__", "mim.py", "toy.pt"])
    assert proc.stderr == ""
    proc = subprocess.run([sys.executable, "mim.py", "--data", "toy2d"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("mim.py: error: the command line needs cli.py, datasets.py "
                                  "and evaluate.py from the repository")
    assert proc.stderr.rstrip().endswith("the library works alone: import mim")


def local_imports(path, names, leave_out=()):
    """The names in `names` (all, for None) that the file imports anywhere, inside
    functions too (but those named in leave_out), by an import statement or by
    cli.sibling("name")."""
    found, tree = set(), ast.parse(open(path).read())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in leave_out:
            tree.body.remove(node)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "sibling"
                and isinstance(node.args[0], ast.Constant)):
            found.add(node.args[0].value)
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module.split(".")[0])
    return found if names is None else found & names


def test_imports_go_one_way_from_the_command_line_to_the_library():
    """cli.py uses mim.py, datasets.py and evaluate.py; none of them imports it or each
    other. mim.py names cli.py only in command_line, which runs when mim.py is the
    program (python mim.py), never on import."""
    modules = {"mim", "cli", "datasets", "evaluate", "bench"}
    graph = {m: local_imports(os.path.join(HERE, m + ".py"), modules - {m},
                              leave_out={"command_line"} if m == "mim" else ())
             for m in modules}
    assert graph["cli"] == {"mim", "datasets", "evaluate"}
    assert graph["mim"] == graph["datasets"] == graph["evaluate"] == set()
    assert local_imports(os.path.join(HERE, "mim.py"), modules) == {"cli"}

    def reaches(start, target, seen=()):
        return any(n == target or (n not in seen and reaches(n, target, (*seen, n)))
                   for n in graph[start])
    assert not [m for m in modules if reaches(m, m)]


class OwnGaussian(torch.nn.Module):
    """A network written outside mim.py: in (B, I) -> N(mu, sigma^2) over out dimensions,
    ELU hidden layer; keeps mim.Model's contract."""
    discrete = False

    def __init__(self, n_in, n_out, hidden=16):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(n_in, hidden), torch.nn.ELU(),
                                       torch.nn.Linear(hidden, 2 * n_out))

    def forward(self, v):
        mean, raw = self.net(v).chunk(2, dim=-1)
        return mim.diag_gaussian(mean, torch.nn.functional.softplus(raw) + 1e-3)


class OwnElementwise(OwnGaussian):
    def forward(self, v):                            # log_prob would be (B, D), not (B,)
        return super().forward(v).base_dist


class OwnTensor(OwnGaussian):
    def forward(self, v):
        return super().forward(v).mean


class OwnBernoulli(torch.nn.Module):                # discrete x without the attribute
    def forward(self, z):
        return mim.bernoulli(z)


@pytest.mark.parametrize("loss", [mim.mim_loss, mim.amim_loss])
def test_networks_written_outside_mim_py_train_with_its_objectives(loss):
    """A Model of networks defined here lowers its validation loss in a few epochs."""
    torch.manual_seed(0)
    x = torch.cat([0.2 * torch.randn(400, 3) + 1, 0.2 * torch.randn(400, 3) - 1])
    x = x[torch.randperm(len(x))]
    model = mim.Model(OwnGaussian(3, 2), OwnGaussian(2, 3), mim.StandardNormal(2), None, 2)
    _, _, epochs, history = mim.train(model, loss, x[:600], x[600:],
                                      mim.TrainSpec(epochs=5, warmup=1, patience=5))
    assert epochs == 5 and history[-1]["val_loss"] < history[0]["val_loss"] - 0.1


@pytest.mark.parametrize("decoder,problem", [
    (OwnTensor(2, 3), "p_x_given_z returned Tensor, not a torch.distributions object"),
    (OwnElementwise(2, 3), "p_x_given_z returned event shape (), not one dimension"),
])
def test_a_network_that_breaks_the_contract_gets_a_clear_error(decoder, problem):
    model = mim.Model(OwnGaussian(3, 2), decoder, mim.StandardNormal(2), None, 2)
    with pytest.raises(TypeError, match=re.escape(problem)):
        mim.mim_loss(model, torch.randn(8, 3))
    with pytest.raises(TypeError, match="needs an attribute discrete"):
        mim.Model(OwnGaussian(3, 2), OwnBernoulli(), mim.StandardNormal(2), None, 2)
    encoder = OwnGaussian(3, 2)
    encoder.forward = mim.bernoulli                   # an encoder must rsample
    with pytest.raises(TypeError, match="q_z_given_x returned a distribution without rsample"):
        mim.mim_loss(mim.Model(encoder, OwnGaussian(2, 3), mim.StandardNormal(2), None, 2),
                     torch.rand(8, 2).round())


@pytest.mark.slow
def test_the_tutorial_runs_and_its_checks_hold(tmp_path):
    """python tutorial.py end to end: every assertion in it holds and it draws its
    figures (a wrong sign in one term of Eq. 8 fails it: the closing note of issue 42)."""
    proc = subprocess.run([sys.executable, os.path.join(HERE, "tutorial.py"), "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=600,
                          cwd=HERE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "The tutorial's numbers hold" in proc.stdout
    assert sorted(os.listdir(tmp_path)) == ["1-anchored-joints.png", "3-fig1-mim-vae.png",
                                            "4-posterior-widths.png"]


# What changes a whole process: modules that set its signals, allocator or file locks, and
# the calls and settings of its umask, environment, threads and numerics. A library leaves
# them to the program that uses it.
PROCESS_MODULES = {"signal", "ctypes", "fcntl", "resource"}
PROCESS_CALLS = {"umask", "environ", "putenv", "set_num_threads", "set_num_interop_threads",
                 "use_deterministic_algorithms", "allow_tf32", "fp32_precision",
                 "set_flush_denormal", "set_default_dtype", "set_default_device"}


def test_mim_py_changes_nothing_in_its_process():
    """mim.py imports none of PROCESS_MODULES, names none of PROCESS_CALLS and assigns
    nothing of torch.backends (cuDNN's and TF32's switches)."""
    tree = ast.parse(open(os.path.join(HERE, "mim.py")).read())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                for a in n.names}
    attributes = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assigned = {ast.unparse(t) for n in ast.walk(tree) if isinstance(n, ast.Assign)
                for t in n.targets}
    assert not imported & PROCESS_MODULES and not attributes & PROCESS_CALLS
    assert not [t for t in assigned if t.startswith("torch.backends")]


def test_checkpoints_follow_the_umask_without_reading_it(tmp_path, monkeypatch):
    """A checkpoint's file gets mode 0666 less the umask, as open() would give it, and
    its temporary file is made without reading the umask (os.umask here fails)."""
    model = mim.build_model(mim.ModelSpec(x_dim=2, z_dim=1, hidden=4))
    before = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", lambda mask: pytest.fail("os.umask was called"))
        mim.save_checkpoint(tmp_path / "model.pt", model, mim.ModelSpec(x_dim=2, z_dim=1,
                                                                        hidden=4))
    finally:
        monkeypatch.undo()
        os.umask(before)
    assert (tmp_path / "model.pt").stat().st_mode & 0o777 == 0o640
    assert os.listdir(tmp_path) == ["model.pt"]


DISTRIBUTION_OF_MODULE = {"sklearn": "scikit-learn"}      # where the two names differ


def test_requirements_list_every_module_the_project_imports():
    """Every module imported anywhere in the project's .py files (inside functions too)
    that is neither the standard library's nor the project's own is in requirements.txt."""
    own = {os.path.splitext(f)[0] for f in os.listdir(HERE) if f.endswith(".py")}
    wanted = set()
    for name in own:
        wanted |= local_imports(os.path.join(HERE, name + ".py"), None)
    wanted = {DISTRIBUTION_OF_MODULE.get(m, m) for m in wanted - own
              if m not in sys.stdlib_module_names}
    with open(os.path.join(HERE, "requirements.txt")) as f:
        listed = {re.split(r"[<>=!~ \[;]", line.strip())[0].lower() for line in f
                  if line.strip() and not line.startswith("#")}
    assert "torch" in wanted and not wanted - listed, sorted(wanted - listed)


@pytest.mark.parametrize("loss", ["vae", "mim", "critic-hybrid"])
def test_amp_runs_networks_in_bf16_and_densities_in_float32(loss):
    torch.manual_seed(0)
    critic, loss_fn = COMPARISON_LOSSES[loss]
    spec = mim.ModelSpec(x_dim=784, binary=True, image_shape=(1, 28, 28), arch="convhvae",
                         z_dim=4, prior="vamp", prior_components=5, critic=critic)
    model = mim.build_model(spec, x_init=torch.rand(20, 784))
    x = torch.bernoulli(torch.full((8, 784), 0.3))
    with mim.autocast(x.device, True):
        assert model.q_z_given_x.z2_features(x.view(-1, 1, 28, 28)).dtype == torch.bfloat16
        q_z_given_x = model.q_z_given_x(x)
        z = q_z_given_x.rsample()
        assert q_z_given_x.top.base_dist.loc.dtype == torch.float32
        assert model.p_x_given_z(z).base_dist.logits.dtype == torch.float32
        assert model.log_p_z(z).dtype == torch.float32
        torch.manual_seed(1)
        low, _ = loss_fn(model, x, mim.FULL)
    torch.manual_seed(1)
    full, _ = loss_fn(model, x, mim.FULL)
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(full.item(), rel=0.02)   # bf16 keeps 8 bits


@pytest.mark.parametrize("kernel", [3, 7])
def test_image_gradient_passes_gradcheck(kernel):
    torch.manual_seed(0)
    conv = mim.OneChannelConv(1, 6, kernel, padding=kernel // 2).double()
    conv = conv.to(memory_format=torch.channels_last)
    v = torch.rand(3, 1, 9, 9, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda v, w, b: mim.ImageGradient.apply(v, w, b, conv.padding), (v, conv.weight, conv.bias))


def test_one_channel_conv_has_the_gradients_of_nn_conv2d():
    torch.manual_seed(0)
    ours = mim.speed_up(mim.gated_conv(1, 32, 7)).layer
    assert isinstance(ours, mim.OneChannelConv)
    ref = torch.nn.Conv2d(1, 64, 7, padding=3)
    ref.load_state_dict(ours.state_dict())
    v = torch.rand(16, 1, 28, 28, requires_grad=True)
    g = torch.randn(16, 64, 28, 28)
    got = torch.autograd.grad(ours(v), [v, ours.weight, ours.bias], g)
    want = torch.autograd.grad(ref(v), [v, ref.weight, ref.bias], g)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_speed_up_changes_layers_and_layout_not_parameters_or_results():
    """speed_up gives the first convolution of each network its own input gradient and
    the channels_last layout: the parameters and their names stay, and the loss and its
    gradient stay those of the plain model up to rounding."""
    torch.manual_seed(0)
    spec = mim.ModelSpec(x_dim=784, binary=True, image_shape=(1, 28, 28), arch="convhvae",
                         prior="vamp", prior_components=5, z_dim=4)
    plain = mim.build_model(spec, x_init=torch.rand(20, 784))
    fast = mim.speed_up(copy.deepcopy(plain))
    assert [n for n, _ in fast.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert sum(isinstance(m, mim.OneChannelConv) for m in fast.modules()) == 3
    assert fast.p_x_given_z.to_image.layer.weight.is_contiguous()            # dense: as it was
    assert fast.q_z_given_x.z2_features[1].layer.weight.is_contiguous(
        memory_format=torch.channels_last)
    x = torch.bernoulli(torch.full((8, 784), 0.3))
    results = []
    for model in (plain, fast):
        torch.manual_seed(1)
        loss, _ = mim.mim_loss(model, x)
        results.append((loss, torch.autograd.grad(loss, list(model.parameters()))))
    (loss_plain, grads_plain), (loss_fast, grads_fast) = results
    assert torch.allclose(loss_plain, loss_fast, rtol=1e-5)
    for a, b in zip(grads_plain, grads_fast):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-4 * (b.abs().max().item() + 1e-12))


def test_one_channel_conv_input_gradient_under_bf16_autocast():
    torch.manual_seed(0)
    conv = mim.OneChannelConv(1, 64, 7, padding=3).to(memory_format=torch.channels_last)
    v = torch.rand(8, 1, 28, 28, requires_grad=True)
    g = torch.randn(8, 64, 28, 28)
    full = torch.autograd.grad(conv(v), v, g)[0]
    with torch.autocast("cpu", torch.bfloat16):
        out = conv(v)
    low = torch.autograd.grad(out, v, g.to(out.dtype))[0]
    assert out.dtype == torch.bfloat16 and low.dtype == torch.float32
    assert (low - full).norm() < 0.02 * full.norm()      # bf16 keeps 8 bits


# ----------------------------------------------------------------------------------------
# evaluate.py: KSG, 5-NN, the IWAE and AIS NLL, RMSE, active and informative units,
# the minibatch MI, figures and summaries, each against a known answer.
# ----------------------------------------------------------------------------------------

def ksg_by_definition(x, z, k):
    """KSG estimator 1 by brute force: all pairwise max-norm distances, no trees."""
    dx = np.abs(x[:, None, :] - x[None, :, :]).max(-1)
    dz = np.abs(z[:, None, :] - z[None, :, :]).max(-1)
    joint = np.maximum(dx, dz)
    np.fill_diagonal(joint, np.inf)
    eps = np.sort(joint, axis=1)[:, k - 1]
    np.fill_diagonal(dx, np.inf)
    np.fill_diagonal(dz, np.inf)
    n_x = (dx < eps[:, None]).sum(1)
    n_z = (dz < eps[:, None]).sum(1)
    from scipy.special import digamma
    return digamma(k) + digamma(len(x)) - np.mean(digamma(n_x + 1) + digamma(n_z + 1))


@pytest.mark.parametrize("dims", [(2, 3), (12, 12)])         # k-d trees; brute force
def test_ksg_equals_its_definition(dims):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, dims[0]))
    z = x @ rng.standard_normal(dims) + 0.5 * rng.standard_normal((400, dims[1]))
    assert (sum(dims) <= evaluate.KDTREE_MAX_DIM) == (dims == (2, 3))
    assert evaluate.ksg_mi(x, z) == pytest.approx(ksg_by_definition(x, z, 5), abs=1e-9)


@pytest.mark.parametrize("dims", [(2, 2), (20, 20)])
def test_ksg_tree_and_brute_force_counts_agree_also_with_ties(dims):
    """Rounded values put many points at exactly eps: both must count strictly inside."""
    rng = np.random.default_rng(1)
    x = np.round(rng.standard_normal((1500, dims[0])), 1)
    z = np.round(x[:, :1] + rng.standard_normal((1500, dims[1])), 1)
    tree, brute = (f(x, z, 5) for f in (evaluate.ksg_counts_tree, evaluate.ksg_counts_brute))
    assert all(np.array_equal(a, b) for a, b in zip(tree, brute))


@pytest.mark.parametrize("rho", [0.0, 0.6, 0.9])
def test_ksg_matches_gaussian_mutual_information(rho):
    """Two independent pairs of unit Gaussians with correlation rho: I = -log(1 - rho^2).
    At N = 20,000 the estimate's spread is about 0.008 nats."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((20_000, 2))
    z = rho * x + math.sqrt(1 - rho ** 2) * rng.standard_normal((20_000, 2))
    assert evaluate.ksg_mi(x, z) == pytest.approx(-math.log(1 - rho ** 2), abs=0.04)


def test_knn_accuracy_matches_a_majority_vote():
    rng = np.random.default_rng(0)
    z_train, z_test = rng.standard_normal((300, 2)), rng.standard_normal((100, 2))
    y_train = (z_train[:, 0] + 0.8 * rng.standard_normal(300) > 0).astype(int)
    y_test = (z_test[:, 0] > 0).astype(int)
    dist = ((z_test[:, None] - z_train[None]) ** 2).sum(-1)
    votes = y_train[np.argsort(dist, axis=1)[:, :5]].mean(1) > 0.5       # two classes, k odd
    expected = float(np.mean(votes.astype(int) == y_test))
    assert evaluate.knn_accuracy(z_train, y_train, z_test, y_test, k=5) == pytest.approx(expected)
    assert 0.6 < expected < 1.0


def constant_encoder_model(std):
    """The 1-D model with q(z|x) = N(0, std^2) for every x, four points x on the grid, and
    its log-densities on the grid (model_grid): -log p(x) there by quadrature."""
    model = model_1d("marginal", seed=3)
    last = model.q_z_given_x.net[2]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.0, math.log(math.expm1(std - mim.STD_FLOOR))]))
    idx = [int(np.argmin(np.abs(GRID - v))) for v in (-2.0, -0.5, 0.4, 1.7)]
    g = {k: v[idx] for k, v in model_grid(model).items() if k in ("marginal", "elbo")}
    return model, torch.tensor(GRID[idx])[:, None], g


@torch.no_grad()
def test_iwae_nll_matches_quadrature():
    """With the proposal q(z|x) = N(0, 2^2) for every x, which covers the posterior, the
    estimate at S = 100,000 spreads by about 0.003 nats around -log p(x)."""
    model, x, g = constant_encoder_model(2.0)
    exact = -g["marginal"]                                   # -log p(x), quadrature
    torch.manual_seed(0)
    assert evaluate.iwae_nll(model, x, 100_000).numpy() == pytest.approx(exact, abs=0.015)
    single = torch.stack([evaluate.iwae_nll(model, x, 1) for _ in range(4000)]).numpy()
    se = single.std(0) / math.sqrt(len(single))
    assert np.all(np.abs(single.mean(0) - (-g["elbo"])) < 4 * se)        # S = 1: -ELBO
    assert np.all(-g["elbo"] > exact + 1e-3)                 # ... the looser bound


def narrow_encoder_model(std=0.1):
    """constant_encoder_model with q(z|x) far too narrow for its posteriors, as the
    encoders MIM learns can be: the model, the points x and -log p(x) there."""
    model, x, g = constant_encoder_model(std)
    return model, x, -g["marginal"]


def test_ais_nll_matches_quadrature_where_a_narrow_encoder_misleads_iwae():
    model, x, exact = narrow_encoder_model()
    torch.manual_seed(0)
    assert np.all(evaluate.iwae_nll(model, x, 1000).numpy() > exact + 1.5)
    nll, se = evaluate.ais_nll(model, x, chains=64, steps=500, leapfrog=5)
    assert np.all(se.numpy() < 0.05)
    assert nll.numpy() == pytest.approx(exact, abs=0.1)


def test_ais_nll_does_not_undercut_the_true_value_on_average():
    """E[p_hat] = p(x), so E[-log p_hat] >= -log p(x) (Jensen), even on a schedule far
    too short to be tight: 30 repetitions of 3 temperatures stay above the truth within
    3 standard errors of their mean, and on average above it."""
    model, x, exact = narrow_encoder_model()
    torch.manual_seed(1)
    nll = np.stack([evaluate.ais_nll(model, x, chains=4, steps=3, leapfrog=2)[0].numpy()
                    for _ in range(30)])                                # (30, 4)
    mean, se = nll.mean(0), nll.std(0, ddof=1) / math.sqrt(len(nll))
    assert np.all(mean > exact - 3 * se)
    assert np.mean(mean - exact) > 0


class LinearGaussian:
    """z ~ N(0, I_2), x | z ~ N(A z, s^2 I_2): p(x) = N(0, A A^T + s^2 I), and the exact
    posterior q(z|x) = N(V A^T x / s^2, V), V = (I + A^T A / s^2)^-1: a calibrated encoder."""
    A = torch.tensor([[1.5, 0.3], [-0.4, 2.0]], dtype=torch.float64)
    s = 0.5
    V = torch.linalg.inv(torch.eye(2, dtype=torch.float64) + A.T @ A / s ** 2)

    def p_z(self):
        return torch.distributions.MultivariateNormal(torch.zeros(2, dtype=torch.float64),
                                                      torch.eye(2, dtype=torch.float64))

    def p_x_given_z(self, z):
        return mim.diag_gaussian(z @ self.A.T, self.s * torch.ones_like(z))

    def q_z_given_x(self, x):
        return torch.distributions.MultivariateNormal(x @ self.A @ self.V.T / self.s ** 2,
                                                      self.V)

    def log_p_x(self, x):
        cov = self.A @ self.A.T + self.s ** 2 * torch.eye(2, dtype=torch.float64)
        return multivariate_normal(np.zeros(2), cov.numpy()).logpdf(x.numpy())


def test_ais_nll_agrees_with_iwae_for_a_calibrated_encoder():
    model = LinearGaussian()
    torch.manual_seed(2)
    x = torch.randn(6, 2, dtype=torch.float64) * 2
    exact = -model.log_p_x(x)
    iwae = evaluate.iwae_nll(model, x, 10).numpy()       # the exact posterior: no variance
    assert iwae == pytest.approx(exact, abs=1e-9)
    for inflate in (evaluate.AIS_INFLATE, 1.0):
        nll, se = evaluate.ais_nll(model, x, chains=32, steps=200, leapfrog=5, inflate=inflate)
        assert nll.numpy() == pytest.approx(iwae, abs=max(0.02, 4 * float(se.max())))


def test_tight_nll_on_the_first_points_is_ais_on_those_points():
    model, x, _ = constant_encoder_model(1.0)
    torch.manual_seed(0)
    first = evaluate.tight_nll(model, x, evaluate.AIS(steps=5, chains=3, leapfrog=2, points=2,
                                                      inflate=1.5))
    torch.manual_seed(0)
    nll, se = evaluate.ais_nll(model, x[:2], chains=3, steps=5, leapfrog=2, inflate=1.5)
    assert first["ais_points"] == 2 and len(x) > 2 and first["ais_inflate"] == 1.5
    assert first["test_nll_tight"] == pytest.approx(float(nll.mean()), abs=1e-12)
    assert first["test_nll_tight_se"] == pytest.approx(float(se.pow(2).sum().sqrt()) / 2)


def test_ais_nll_chunked_over_points_equals_one_pass():
    model, x, _ = narrow_encoder_model()
    torch.manual_seed(3)
    one_pass = evaluate.ais_nll(model, x[:1], chains=4, steps=10, leapfrog=2)[0]
    torch.manual_seed(3)
    chunked = evaluate.ais_nll(model, x, chains=4, steps=10, leapfrog=2, max_batch=4)[0]
    assert chunked[0].item() == pytest.approx(one_pass.item(), abs=1e-12)


class LinearStub:
    """z ~ N(x, 0.01^2), x | z ~ N(3 z, 1): the decoder mean misses x by 2 x."""
    q_z_given_x = staticmethod(lambda x: mim.diag_gaussian(x, 0.01 * torch.ones_like(x)))
    p_x_given_z = staticmethod(lambda z: mim.diag_gaussian(3 * z, torch.ones_like(z)))


def test_reconstruction_rmse_is_root_mean_squared_euclidean_error():
    torch.manual_seed(0)
    x = torch.randn(20_000, 2, dtype=torch.float64)
    expected = math.sqrt(4 * (x ** 2).sum(1).mean() + 2 * 9 * 0.01 ** 2)
    assert evaluate.reconstruction_rmse(LinearStub, x) == pytest.approx(expected, rel=1e-3)


def test_summary_plot_labels_its_log_axis_at_the_values_run():
    """Widths 5 and 50 get a log axis labelled 5 and 50 only: matplotlib's own minor
    labels (2x10^1, 3x10^1, 4x10^1) were drawn over each other."""
    table = {(h,): {"test_mi_ksg": (1.0, 0.1, 2)} for h in (5, 50)}
    fig = evaluate.plot_summary(["hidden"], table, ["test_mi_ksg"], "hidden")
    fig.canvas.draw()
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["5", "50"]
    assert [t.get_text() for t in ax.get_xticklabels(minor=True) if t.get_text()] == []


def tiny_binary_model(z_dim=4, x_dim=16, seed=0):
    torch.manual_seed(seed)
    return mim.build_model(mim.ModelSpec(x_dim=x_dim, binary=True, z_dim=z_dim,
                                          hidden=20)).eval()


def binary_data(n, x_dim, seed=0):
    return torch.bernoulli(torch.full((n, x_dim), 0.5),
                           generator=torch.Generator().manual_seed(seed))


def encoder_means_by_hand(encoder, x):
    """The first half of the encoder's output, by numpy: tanh MLP, loc = out[:, :Z]."""
    (w1, b1), (w2, b2) = [(layer.weight.detach().double().numpy(),
                           layer.bias.detach().double().numpy())
                          for layer in (encoder.net[0], encoder.net[2])]
    out = np.tanh(x.double().numpy() @ w1.T + b1) @ w2.T + b2
    return out[:, :out.shape[1] // 2]


def test_active_units_match_a_numpy_covariance():
    model, x = tiny_binary_model(), binary_data(12, 16)
    counts, variance = evaluate.active_units(model, x)
    expected = np.diag(np.cov(encoder_means_by_hand(model.q_z_given_x, x).T))   # ddof = 1
    assert variance.numpy() == pytest.approx(expected, rel=1e-5)
    biased = np.var(encoder_means_by_hand(model.q_z_given_x, x), axis=0)         # ddof = 0
    assert not np.allclose(variance.numpy(), biased, rtol=1e-3)    # 12/11 apart: ddof shows
    assert counts == {"test_au_z": int((expected > 0.01).sum())}


@torch.no_grad()
def test_active_units_find_the_dimensions_that_depend_on_x():
    """Mean outputs 1 and 3 ignore x (zero weights, constant bias): inactive; outputs 0
    and 2 get large weights: Cov_x far above 0.01."""
    model, x = tiny_binary_model(), binary_data(500, 16)
    last = model.q_z_given_x.net[2]                  # rows 0-3: loc, rows 4-7: raw scale
    last.weight[[1, 3]] = 0.0
    last.bias[[1, 3]] = 0.7
    last.weight[[0, 2]] *= 20
    counts, variance = evaluate.active_units(model, x)
    assert counts == {"test_au_z": 2}
    assert variance[[1, 3]].abs().max() < 1e-12 and variance[[0, 2]].min() > 0.1
    model.latent_groups = {"z1": (0, 1), "z2": (1, 4)}       # a two-level split of z
    assert evaluate.active_units(model, x)[0] == {"test_au_z1": 1, "test_au_z2": 1}
    assert evaluate.active_units(model, x, threshold=1e6)[0] == {"test_au_z1": 0,
                                                                 "test_au_z2": 0}


def test_epoch_diagnostics_match_their_definitions():
    """Each per-epoch diagnostic against a direct computation on the same points."""
    model, data = tiny_binary_model(z_dim=4, x_dim=784), fake_image_data()
    stats = evaluate.epoch_diagnostics(data, n=40)(model)
    x, y = data.x_val[:40], data.y_val[:40]
    assert stats["au_z"] == evaluate.active_units(model, x)[0]["test_au_z"]
    scale = model.q_z_given_x(x).base_dist.scale
    assert stats["log_std_z"] == pytest.approx(scale.log().mean().item(), rel=1e-6)
    x_knn = evaluate.knn_train_inputs(data, 40)
    assert stats["knn5_mean"] == evaluate.knn_accuracy(
        evaluate.encoder_means(model, x_knn), data.y_train[:40],
        evaluate.encoder_means(model, x), y)
    assert 0 <= stats["mi_batch"] <= math.log(40) + 1e-9


def test_log_std_of_a_two_level_posterior_has_one_value_per_level():
    model = tiny_model("convhvae", "vamp", z_dim=2)
    x = torch.bernoulli(torch.rand(5, 16, generator=torch.Generator().manual_seed(0))).double()
    stats = evaluate.mean_log_std(model, x)
    top = model.q_z_given_x(x).top.base_dist.scale.log().mean().item()
    assert set(stats) == {"log_std_z1", "log_std_z2"}
    assert stats["log_std_z2"] == pytest.approx(top, rel=1e-9)
    low, high = (0.5 * v for v in mim.LOGVAR_BOUNDS)                   # the clip, as log std
    assert low - 1e-9 <= stats["log_std_z1"] <= high + 1e-9


def test_informative_units_are_a_signal_to_noise_ratio_blind_to_scale():
    """Unit u gets means a_u x (x ~ N(0, 1)) and noise std s_u: ratio a_u^2 / s_u^2 by
    construction, 4, 0.25, 1e-4 and 1.44 here, so two units exceed 1 whatever common
    factor rescales z; Burda's count at 0.01 changes with that factor."""
    torch.manual_seed(0)
    x = torch.randn(200_000, 1, dtype=torch.float64)
    a = torch.tensor([2.0, 0.5, 0.01, 1.2], dtype=torch.float64)
    s = torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    groups = {"z1": (0, 2), "z2": (2, 4)}
    for factor in (1.0, 0.01):
        means, variances = factor * x * a, (factor * s).expand(len(x), 4) ** 2
        counts, ratio = evaluate.informative_units(means, variances, groups)
        assert ratio.numpy() == pytest.approx((a / s).pow(2).numpy(), rel=0.01, abs=1e-5)
        assert counts == {"test_informative_z1": 1, "test_informative_z2": 1}
    assert evaluate.active_units_of_means(0.01 * x * a, groups)[0] == {"test_au_z1": 0,
                                                                      "test_au_z2": 0}


@torch.no_grad()
@pytest.mark.slow
def test_two_level_posterior_variance_is_the_total_variance():
    """z1's variance given x adds the spread of E[z1|x, z2] over z2 to the mean
    conditional variance: against the variance of 200,000 samples of q(z|x)."""
    model = tiny_model("convhvae", "vamp", z_dim=2)
    x = torch.bernoulli(torch.rand(3, 16, generator=torch.Generator().manual_seed(0))).double()
    torch.manual_seed(1)
    samples = model.q_z_given_x(x).sample((200_000,))                   # (S, 3, 4)
    torch.manual_seed(2)
    variance = torch.stack([evaluate.posterior_variances(model, x) for _ in range(200)])
    assert variance.mean(0).numpy() == pytest.approx(samples.var(0).numpy(), rel=0.03)


@torch.no_grad()
def test_nll_of_fair_coin_pixels_is_one_bit_per_dimension():
    """Decoder logits 0 make p(x|z) = 2^-D for every z, and an encoder q(z|x) = N(0, I) =
    p(z) makes every importance weight exactly p(x): NLL = D ln 2 nats = 1 bit/dim."""
    D = 784
    model = mim.build_model(mim.ModelSpec(x_dim=D, binary=True, z_dim=3, hidden=8))
    decoder_out, encoder_out = model.p_x_given_z.net[2], model.q_z_given_x.net[2]
    for layer in (decoder_out, encoder_out):
        layer.weight.zero_()
        layer.bias.zero_()
    encoder_out.bias[3:] = math.log(math.expm1(1.0 - mim.STD_FLOOR))   # scale exactly 1
    x = binary_data(7, D)
    nll = evaluate.iwae_nll(model, x, 50)
    assert nll.numpy() == pytest.approx(D * math.log(2), rel=1e-5)
    assert evaluate.bits_per_dim(float(nll.mean()), D) == pytest.approx(1.0, rel=1e-5)
    assert evaluate.bits_per_dim(100.0, 10) == pytest.approx(100 / (10 * math.log(2)))


class FixedNoise:
    """q(z|x) whose samples come, in order, from a fixed table of standard-normal noise."""

    def __init__(self, q, eps):
        self.q, self.eps, self.used = q, eps, 0

    def sample(self, shape):
        n = shape[0]
        eps = self.eps[self.used:self.used + n]
        self.used += n
        return self.q.base_dist.loc + self.q.base_dist.scale * eps

    def log_prob(self, z):
        return self.q.log_prob(z)


class FixedNoiseModel:
    """A model whose encoder draws point i's samples from eps[:, i] in every chunking."""

    def __init__(self, model, eps):
        self.model, self.eps, self.point = model, eps, 0
        self.p_x_given_z, self.p_z = model.p_x_given_z, model.p_z

    def q_z_given_x(self, x):
        eps = self.eps[:, self.point:self.point + len(x)]
        self.point += len(x)
        return FixedNoise(self.model.q_z_given_x(x), eps)


@torch.no_grad()
def test_iwae_chunked_over_samples_equals_one_pass():
    model, x = tiny_binary_model(), binary_data(5, 16)
    S = 300
    eps = torch.randn(S, len(x), 4, generator=torch.Generator().manual_seed(1))
    q = model.q_z_given_x(x)
    z = q.base_dist.loc + q.base_dist.scale * eps                              # (S, N, Z)
    log_w = (model.p_x_given_z(z).log_prob(x.expand(S, -1, -1)) + model.p_z().log_prob(z)
             - q.log_prob(z))
    direct = (math.log(S) - torch.logsumexp(log_w, 0)).numpy()
    one_pass = evaluate.iwae_nll(FixedNoiseModel(model, eps), x, S, max_batch=10 ** 6)
    chunked = evaluate.iwae_nll(FixedNoiseModel(model, eps), x, S, max_batch=64)
    assert one_pass.numpy() == pytest.approx(direct, abs=1e-5)
    assert chunked.numpy() == pytest.approx(direct, abs=1e-5)
    assert evaluate.sample_chunks(300, 64) == [64, 64, 64, 64, 44]


def test_ksg_refuses_high_dimensional_binary_x():
    x = binary_data(500, 784).numpy()
    z = np.random.default_rng(0).standard_normal((500, 2))
    with pytest.raises(ValueError, match="binary.*pca_fashion_mnist"):
        evaluate.ksg_mi(x, z)
    assert evaluate.ksg_counts_ties(x, 5)
    assert evaluate.ksg_counts_ties(binary_data(10_000, 11).numpy(), 5)   # log2(2000) < 11


def test_ksg_accepts_continuous_features_and_low_dimensional_binary_x():
    """20 continuous features (as PCA data) are accepted. Binary x of 2 dimensions equal to
    the signs of z ~ N(0, I): I(x; z) = H(x) = 2 ln 2 exactly."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 20))
    assert not evaluate.ksg_counts_ties(x, 5)
    assert evaluate.ksg_mi(x, x[:, :2] + 0.1 * rng.standard_normal((2000, 2))) > 0.3
    z = rng.standard_normal((4000, 2))
    signs = (z > 0).astype(float)
    assert not evaluate.ksg_counts_ties(signs, 5)
    assert evaluate.ksg_mi(signs, z) == pytest.approx(2 * math.log(2), abs=0.05)


def fake_image_data(n=120, seed=0):
    """A stand-in for a binarized-image data set: 784-D binary x, 3 classes."""
    x = binary_data(3 * n, 784, seed)
    y = torch.arange(3 * n) % 3
    return types.SimpleNamespace(
        x_train=x[:n], y_train=y[:n], x_val=x[n:2 * n], y_val=y[n:2 * n], x_test=x[2 * n:],
        y_test=y[2 * n:], binary=True, dynamic=False, anchor=None, x_dim=784,
        image_shape=(1, 28, 28))


def test_metrics_on_binary_images_skip_ksg_and_rmse():
    model, data = tiny_binary_model(z_dim=4, x_dim=784), fake_image_data()
    torch.manual_seed(0)
    results = evaluate.test_metrics(model, data, 20, knn_train_size=50)
    assert set(results) == {"test_nll", "test_nll_bpd", "test_knn5_acc", "nll_samples",
                            "test_au_z", "test_informative_z", "test_kl", "test_marginal_kl", "test_mi_batch",
                            "test_mi_batch_cap", "test_knn5_acc_mean"}
    assert results["test_nll_bpd"] == pytest.approx(results["test_nll"] / (784 * math.log(2)))
    means = [evaluate.encoder_means(model, x) for x in
             (evaluate.knn_train_inputs(data, 50), data.x_test)]
    assert results["test_knn5_acc_mean"] == evaluate.knn_accuracy(
        means[0], data.y_train[:50], means[1], data.y_test)
    assert 0 <= results["test_knn5_acc"] <= 1 and 0 <= results["test_au_z"] <= 4
    skipped = evaluate.test_metrics(model, data, 0)
    assert "test_nll" not in skipped and skipped["nll_samples"] == 0
    text = evaluate.format_results(results)
    assert "bits/dim" in text and "nats" in text and "active units of z" in text


def test_per_point_scores_are_the_metrics_point_by_point():
    """test_metrics' points: 5-NN correctness per test point whose means are the two
    accuracies, and the NLL of the first nll_points points whose mean is test_nll."""
    model, data = tiny_binary_model(z_dim=4, x_dim=784), fake_image_data()
    torch.manual_seed(0)
    results, points = evaluate.test_metrics(model, data, 20, knn_train_size=50,
                                            nll_points=7, return_points=True)
    n = len(data.x_test)
    assert np.array_equal(points["label"], data.y_test.numpy())
    assert points["knn5_correct"].shape == points["knn5_mean_correct"].shape == (n,)
    assert points["knn5_correct"].mean() == results["test_knn5_acc"]
    assert points["knn5_mean_correct"].mean() == results["test_knn5_acc_mean"]
    assert points["nll"].shape == (7,) and points["nll"].mean() == pytest.approx(
        results["test_nll"], rel=1e-6)
    everywhere = evaluate.test_metrics(model, data, 20, knn_train_size=50)
    assert everywhere["test_knn5_acc_mean"] == results["test_knn5_acc_mean"]


# Paired comparisons (evaluate.paired_comparison): against exact answers and by coverage.

def test_mcnemar_exact_p_is_twice_the_binomial_tail_of_the_discordant_points():
    assert evaluate.mcnemar_p(8, 2) == 112 / 1024       # 2 (1 + 10 + 45) / 2^10
    assert evaluate.mcnemar_p(2, 8) == 112 / 1024
    assert evaluate.mcnemar_p(0, 0) == 1.0 and evaluate.mcnemar_p(5, 5) == 1.0
    for only_a, only_b in [(0, 6), (30, 12), (677, 610), (2950, 3000)]:
        expected = scipy.stats.binomtest(only_a, only_a + only_b, 0.5).pvalue
        assert evaluate.mcnemar_p(only_a, only_b) == pytest.approx(expected, rel=1e-9)


# Two classifiers that agree on most points: both right 0.90, only A 0.04, only B 0.01,
# both wrong 0.05, so accuracy(A) - accuracy(B) = 0.03. Their scores are correlated: the
# paired interval is 0.6 times as wide as one that ignores the pairing.
PLANTED = {"both": 0.90, "only_a": 0.04, "only_b": 0.01, "neither": 0.05}


def planted_scores(rng, n):
    kind = rng.choice(4, size=n, p=list(PLANTED.values()))
    return np.isin(kind, [0, 1]), np.isin(kind, [0, 2])      # A right, B right


def test_paired_bootstrap_interval_covers_a_planted_difference_at_its_nominal_rate():
    """400 test sets of 1,000 points: the 95% interval holds the true difference 0.03 in
    about 95% of them (binomial sd 1.1%). Resampling A's and B's points apart (no pairing)
    would cover 99.9%; A and B swapped, none."""
    rng, truth = np.random.default_rng(0), PLANTED["only_a"] - PLANTED["only_b"]
    covered, widths = 0, []
    for _ in range(400):
        a, b = planted_scores(rng, 1000)
        low, high = evaluate.paired_bootstrap_interval(a, b, resamples=2000,
                                                       seed=int(rng.integers(1 << 31)))
        covered += low <= truth <= high
        widths.append(high - low)
    assert 0.92 <= covered / 400 <= 0.98
    sd = math.sqrt(PLANTED["only_a"] + PLANTED["only_b"] - truth ** 2) / math.sqrt(1000)
    assert np.mean(widths) == pytest.approx(2 * 1.96 * sd, rel=0.05)


def test_paired_comparison_counts_each_point_with_its_partner():
    """Known scores on 100 points: A alone right on 8, B alone on 2 (p = 112/1024), both
    on 80; the NLL difference of 10 points against its hand-computed mean and error. A
    comparison of different points is refused."""
    label = np.arange(100) % 10
    a = np.r_[np.ones(80), np.ones(8), np.zeros(2), np.zeros(10)].astype(bool)
    b = np.r_[np.ones(80), np.zeros(8), np.ones(2), np.zeros(10)].astype(bool)
    nll_a, nll_b = np.arange(10.0) + 90, np.arange(10.0) ** 1.5 + 88
    points_a = {"label": label, "knn5_correct": a, "knn5_mean_correct": b, "nll": nll_a}
    points_b = {"label": label, "knn5_correct": b, "knn5_mean_correct": a, "nll": nll_b}
    rows = evaluate.paired_comparison(points_a, points_b)
    sampled, means, nll = rows["knn5_correct"], rows["knn5_mean_correct"], rows["nll"]
    assert (sampled["only_a"], sampled["only_b"], sampled["p"]) == (8, 2, 112 / 1024)
    assert sampled["diff"] == pytest.approx(0.06) and sampled["a"] == pytest.approx(0.88)
    assert means["diff"] == pytest.approx(-0.06) and (means["only_a"], means["only_b"]) == (2, 8)
    low, high = sampled["interval"]
    assert low < 0.06 < high and low == pytest.approx(0.06 - 1.96 * math.sqrt(
        (0.1 - 0.06 ** 2) / 100), abs=0.015)
    d = nll_a - nll_b
    assert nll["diff"] == pytest.approx(d.mean())
    assert nll["se"] == pytest.approx(np.std(d, ddof=1) / math.sqrt(10))
    assert nll["interval"] == pytest.approx((d.mean() - 1.959964 * nll["se"],
                                             d.mean() + 1.959964 * nll["se"]))
    with pytest.raises(ValueError, match="different test points"):
        evaluate.paired_comparison(points_a, {**points_b, "label": label[::-1]})


def test_the_interval_over_seeds_is_students_t_and_needs_two_seeds():
    mean, interval = evaluate.mean_interval([0.01, 0.03, 0.02])
    expected = scipy.stats.t.interval(0.95, 2, loc=0.02, scale=0.01 / math.sqrt(3))
    assert mean == pytest.approx(0.02) and interval == pytest.approx(expected)
    assert interval[1] - 0.02 == pytest.approx(4.302653 * 0.01 / math.sqrt(3), rel=1e-6)
    assert evaluate.mean_interval([0.02]) == (0.02, None)


def test_knn_training_images_are_binarized_once_when_dynamic():
    grey = types.SimpleNamespace(x_train=torch.full((400, 784), 0.3), dynamic=True)
    bits = evaluate.knn_train_inputs(grey, 300)
    assert bits.shape == (300, 784) and set(bits.unique().tolist()) == {0.0, 1.0}
    assert bits.mean().item() == pytest.approx(0.3, abs=0.01)
    assert torch.equal(bits, evaluate.knn_train_inputs(grey, 300))          # one fixed draw
    fixed = types.SimpleNamespace(x_train=grey.x_train, dynamic=False)
    assert torch.equal(evaluate.knn_train_inputs(fixed), grey.x_train)


class NoMeanDecoder:
    """A decoder like the PixelCNN one: .mean raises, .sample works."""
    @property
    def mean(self):
        raise NotImplementedError

    def sample(self):
        return torch.ones(2, 4)


def test_decoded_images_fall_back_to_samples_and_mosaic_places_images():
    assert torch.equal(evaluate.decoded_images(NoMeanDecoder()), torch.ones(2, 4))
    top, bottom = torch.zeros(3, 4), torch.arange(12.0).view(3, 4) / 12
    grid = evaluate.image_mosaic([top, bottom], (1, 2, 2))
    assert grid.shape == (6, 9)
    assert grid[3:5, 3:5] == pytest.approx((bottom[1].view(2, 2)).numpy())    # row 1, image 1
    assert grid[:2, :2] == pytest.approx(np.zeros((2, 2))) and grid[2].min() == 1.0


def test_run_figures_draw_the_image_figures(monkeypatch):
    model, data = tiny_binary_model(z_dim=4, x_dim=784), fake_image_data(n=60)
    figures = evaluate.run_figures(model, data, "MIM h=20")
    assert sorted(figures) == ["reconstructions.png", "samples.png", "tsne.png"]
    for png in figures.values():
        assert png[:4] == b"\x89PNG"
    monkeypatch.setattr(evaluate, "plot_tsne",            # t-SNE costs seconds
                        lambda *args: evaluate.pyplot().figure())
    no_images = types.SimpleNamespace(**{**vars(data), "image_shape": None})   # as PCA data
    assert list(evaluate.run_figures(model, no_images, "MIM h=20")) == ["tsne.png"]


@pytest.mark.parametrize("fmt,magic", [("pdf", b"%PDF"), ("svg", b"<?xml")])
def test_figures_come_in_the_format_asked_for(fmt, magic, tmp_path):
    """--format: every figure kind as a PDF or SVG file, named with its extension."""
    model, data = tiny_binary_model(z_dim=4, x_dim=784), fake_image_data(n=60)
    figures = evaluate.run_figures(model, data, "MIM", fmt)
    log = tmp_path / "log.csv"
    log.write_text("epoch,train_loss,val_loss\n1,5.0,4.0\n2,4.0,3.5\n")
    figures[f"training.{fmt}"] = evaluate.training_figure(log, "MIM", fmt)
    assert sorted(figures) == [f"{n}.{fmt}" for n in ("reconstructions", "samples", "training",
                                                       "tsne")]
    assert all(contents.startswith(magic) for contents in figures.values())


# ----------------------------------------------------------------------------------------
# datasets.py: the toy data, the IDX and .mat parsers, splits, binarization, PCA,
# the search for files and checked downloads.
# ----------------------------------------------------------------------------------------

def test_toy2d_data_is_fixed_by_its_seed_and_labelled():
    a, b = datasets.load_dataset("toy2d", seed=0), datasets.load_dataset("toy2d", seed=0)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_train, datasets.load_dataset("toy2d", seed=1).x_train)
    assert not torch.equal(a.x_train[:100], a.x_test[:100])
    means = torch.tensor(datasets.pentagon_means(), dtype=torch.float32)
    assert means[3].tolist() == pytest.approx([math.cos(math.radians(144)),
                                               math.sin(math.radians(144))])
    offsets = a.x_train - means[a.y_train]
    assert offsets.std().item() == pytest.approx(0.25, rel=0.02)
    pdfs = [multivariate_normal(m, 0.25 ** 2 * np.eye(2)).pdf(a.x_test[:50].numpy())
            for m in means.numpy()]
    expected = np.log(np.mean(pdfs, axis=0))
    assert a.anchor.log_prob(a.x_test[:50]).numpy() == pytest.approx(expected, abs=1e-6)


MNIST_SUBSET = os.path.join(HERE, "..", "shared", "data", "mnist-subset")


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No real data reachable: HOME, MIM_DATA_DIR and Debian's folder point into tmp."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MIM_DATA_DIR", raising=False)
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST_DIR", str(tmp_path / "debian"))
    return tmp_path


def idx_bytes(array):
    array = np.asarray(array, dtype=np.uint8)
    header = struct.pack(f">BBBB{array.ndim}i", 0, 0, 0x08, array.ndim, *array.shape)
    return header + array.tobytes()


def write_idx(path, array, compress):
    raw = idx_bytes(array)
    path.write_bytes(gzip.compress(raw) if compress else raw)


def write_idx_set(folder, n_train=60, n_test=12, label_offset=0, compress=True):
    """Four IDX files; image i is constant at grey level i (train) or 128 (test)."""
    folder.mkdir(parents=True, exist_ok=True)
    train = np.repeat(np.arange(n_train, dtype=np.uint8), 784).reshape(n_train, 28, 28)
    test = np.full((n_test, 28, 28), 128, np.uint8)
    files = {"train-images-idx3-ubyte": train,
             "train-labels-idx1-ubyte": (np.arange(n_train) + label_offset) % 10,
             "t10k-images-idx3-ubyte": test,
             "t10k-labels-idx1-ubyte": np.arange(n_test) % 10}
    for stem, array in files.items():
        write_idx(folder / (stem + (".gz" if compress else "")), array, compress)
    return train, test


# ---------------------------------------------------------------- parsers


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trip_by_magic_not_name(tmp_path, compress):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "images.bin"               # the name says nothing about gzip
    write_idx(path, images, compress)
    out = datasets.read_idx(path)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 4)
    assert out[1, 2, 3] == 23 and out[0, 1, 0] == 4      # C order: row, then column
    labels = tmp_path / "labels.gz"
    write_idx(labels, [7, 0, 255], compress)
    assert datasets.read_idx(labels).tolist() == [7, 0, 255]


@pytest.mark.parametrize("corrupt, problem", [
    (lambda raw: raw[:-5], "header says"),                      # truncated payload
    (lambda raw: raw + b"\0", "header says"),                   # trailing bytes
    (lambda raw: raw[:2] + b"\x0d" + raw[3:], "not an IDX"),    # float type code
    (lambda raw: b"\x00\x01" + raw[2:], "not an IDX"),          # bad magic
    (lambda raw: raw[:6], "header truncated"),
    (lambda raw: gzip.compress(raw)[:-20], "corrupt gzip"),     # truncated gzip
])
def test_read_idx_rejects_a_bad_file_in_one_line_naming_it(tmp_path, corrupt, problem):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(corrupt(idx_bytes(np.zeros((2, 28, 28)))))
    with pytest.raises(ValueError, match=problem) as err:
        datasets.read_idx(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def upright_test_image():
    """An asymmetric glyph: a full top row and a short left column (an upside-down L
    mirrored), so a transpose or a flip changes it."""
    image = np.zeros((28, 28), np.float32)
    image[2, 3:25] = 1.0
    image[2:12, 3] = 0.5
    return image


def write_chardata(path, n_train=60, n_test=7, labels=("target", "targetchar")):
    """A chardata.mat laid out as Burda et al.'s: images as MATLAB columns (column-major),
    (784, N); image i of the training set has the asymmetric glyph scaled by (i+1)/n."""
    glyph = upright_test_image()
    train = np.stack([glyph * (i + 1) / n_train for i in range(n_train)])
    test = np.stack([glyph] * n_test)
    alphabet = np.arange(n_train) % 50
    mat = {"data": train.reshape(n_train, -1, order="F").T,      # MATLAB's image(:)
           "testdata": test.reshape(n_test, -1, order="F").T}
    if "target" in labels:
        mat["target"] = np.eye(50)[alphabet].T                   # one-hot (50, N)
        mat["testtarget"] = np.eye(50)[np.arange(n_test)].T
    if "targetchar" in labels:
        mat["targetchar"] = (np.arange(n_train) % 20 + 1)[None]  # 1-based, (1, N)
        mat["testtargetchar"] = (np.arange(n_test) + 1)[None]
    scipy.io.savemat(path, mat)
    return train, alphabet


def test_chardata_images_come_out_upright_as_in_the_authors_loader(tmp_path):
    write_chardata(tmp_path / "chardata.mat")
    x, y, x_test, y_test = datasets.read_chardata(tmp_path / "chardata.mat")
    assert x.shape == (60, 784) and x.dtype == np.float32
    assert np.array_equal(x_test[0].reshape(28, 28), upright_test_image())
    raw = scipy.io.loadmat(tmp_path / "chardata.mat")["data"]
    authors = raw.T.reshape((-1, 28, 28)).reshape((-1, 28 * 28), order="F")
    assert np.array_equal(x, authors.astype(np.float32))
    assert y.tolist() == (np.arange(60) % 50).tolist() and y_test.tolist() == list(range(7))


def test_chardata_falls_back_to_character_labels_and_rejects_wrong_layout(tmp_path):
    write_chardata(tmp_path / "chars.mat", labels=("targetchar",))
    _, y, _, y_test = datasets.read_chardata(tmp_path / "chars.mat")
    assert y[:22].tolist() == [*range(20), 0, 1] and y_test.tolist() == list(range(7))
    write_chardata(tmp_path / "none.mat", labels=())
    with pytest.raises(ValueError, match="no labels"):
        datasets.read_chardata(tmp_path / "none.mat")
    scipy.io.savemat(tmp_path / "bad.mat", {"data": np.zeros((10, 3)),
                                           "testdata": np.zeros((784, 3))})
    with pytest.raises(ValueError, match="784, N"):
        datasets.read_chardata(tmp_path / "bad.mat")
    (tmp_path / "junk.mat").write_bytes(b"MATLAB 5.0 MAT-file" + b"\0" * 30)
    with pytest.raises(ValueError, match="not a readable .mat") as err:
        datasets.read_chardata(tmp_path / "junk.mat")
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- splits, binarization


def test_idx_data_set_splits_grey_levels_and_binarizes_evaluation_once(isolated):
    train, _ = write_idx_set(isolated / "data" / "mnist", n_train=60, n_test=12)
    data = datasets.load_dataset("mnist", data_dir=isolated / "data")
    assert (len(data.x_train), len(data.x_val), len(data.x_test)) == (50, 10, 12)
    assert data.binary and data.dynamic and data.image_shape == (1, 28, 28)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    assert data.x_train[:, 0].tolist() == pytest.approx([i / 255 for i in range(50)])
    assert data.y_val.tolist() == [i % 10 for i in range(50, 60)]   # the LAST ten
    grey_val = torch.arange(50, 60) / 255                           # 784 bits each
    assert torch.allclose(data.x_val.mean(1), grey_val, atol=4 * 0.5 / 28)
    assert torch.equal(data.x_val.unique(), torch.tensor([0.0, 1.0]))
    # test images are all grey 128/255: their bits have that mean (9,408 draws)
    assert data.x_test.mean().item() == pytest.approx(128 / 255, abs=4 * 0.5 / 97)
    again = datasets.load_dataset("mnist", data_dir=isolated / "data")
    other = datasets.load_dataset("mnist", seed=1, data_dir=isolated / "data")
    assert torch.equal(data.x_test, again.x_test) and torch.equal(data.x_val, again.x_val)
    assert not torch.equal(data.x_test, other.x_test)
    moved = data.to("cpu")
    assert moved.dynamic and moved.image_shape == (1, 28, 28)


def test_images_and_labels_of_different_lengths_are_refused(isolated):
    write_idx_set(isolated / "data")
    write_idx(isolated / "data" / "train-labels-idx1-ubyte.gz", np.zeros(59), True)
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz and its labels"):
        datasets.load_dataset("mnist", data_dir=isolated / "data")


def test_validation_size_rule():
    assert datasets.validation_size(60_000) == 10_000     # the paper's 50,000 / 10,000
    assert datasets.validation_size(8_000) == 1_333       # the offline subset
    assert datasets.validation_size(24_345, datasets.OMNIGLOT_VALIDATION) == 1_345


def test_omniglot_shuffles_images_with_their_labels_before_the_cut(isolated):
    folder = isolated / "data" / "omniglot"
    folder.mkdir(parents=True)
    train, alphabet = write_chardata(folder / "chardata.mat", n_train=60)
    data = datasets.load_dataset("omniglot", seed=3, data_dir=isolated / "data")
    assert (len(data.x_train), len(data.x_val), len(data.x_test)) == (50, 10, 7)
    assert data.dynamic and data.image_shape == (1, 28, 28)
    index = np.rint(data.x_train[:, 2 * 28 + 10].numpy() * 60).astype(int) - 1
    assert sorted(index.tolist()) != index.tolist()                  # shuffled
    assert data.y_train.tolist() == alphabet[index].tolist()         # labels follow
    assert np.allclose(data.x_train.numpy(), train[index].reshape(50, 784))
    assert set(data.x_val.unique().tolist()) <= {0.0, 1.0}


# ---------------------------------------------------------------- principal components


def test_principal_components_match_sklearn_up_to_sign():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 6)) @ rng.standard_normal((6, 6)) + 3.0
    ours = datasets.principal_components(x, 3)
    theirs = PCA(n_components=3, svd_solver="full").fit(x)
    signs = np.sign(np.sum(ours.components * theirs.components_, axis=1))
    assert np.allclose(np.abs(signs), 1)
    assert np.allclose(ours.components, signs[:, None] * theirs.components_, atol=1e-5)
    assert np.allclose(ours.project(x), signs * theirs.transform(x), atol=1e-4)
    assert ours.explained_variance_ratio == pytest.approx(
        theirs.explained_variance_ratio_.sum(), rel=1e-6)


def test_pca_fashion_mnist_uses_the_training_basis_for_every_split(isolated):
    folder = isolated / "data" / "fashion_mnist"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    train = rng.integers(0, 256, (60, 28, 28))
    test = rng.integers(0, 256, (12, 28, 28))
    for stem, array in {"train-images-idx3-ubyte": train,
                        "train-labels-idx1-ubyte": np.arange(60) % 10,
                        "t10k-images-idx3-ubyte": test,
                        "t10k-labels-idx1-ubyte": np.arange(12) % 10}.items():
        write_idx(folder / stem, array, compress=False)
    data = datasets.load_dataset("pca_fashion_mnist", data_dir=isolated / "data", pca_dim=5)
    assert data.x_train.shape == (50, 5) and data.x_test.shape == (12, 5)
    assert not data.binary and not data.dynamic and data.image_shape is None
    pca = PCA(n_components=5, svd_solver="full").fit(train[:50].reshape(50, -1) / 255)
    expected = pca.transform(test.reshape(12, -1) / 255)
    signs = np.sign(np.sum(data.x_test.numpy() * expected, axis=0))
    assert np.allclose(data.x_test.numpy(), signs * expected, atol=1e-4)
    assert data.x_train.mean(0).abs().max() < 1e-4               # centred, not scaled
    assert data.y_val.tolist() == [i % 10 for i in range(50, 60)]
    with pytest.raises(ValueError, match="pca_dim"):
        datasets.load_dataset("pca_fashion_mnist", data_dir=isolated / "data", pca_dim=0)


# ---------------------------------------------------------------- finding, downloading


def test_search_order_environment_then_cache_and_a_data_dir_alone(isolated, monkeypatch):
    write_idx_set(isolated / "given", label_offset=1)
    write_idx_set(isolated / "env" / "mnist", label_offset=2, compress=False)
    write_idx_set(isolated / "home" / ".cache" / "mim", label_offset=3)
    monkeypatch.setenv("MIM_DATA_DIR", str(isolated / "env"))

    def first_label(**kwargs):
        return datasets.load_dataset("mnist", **kwargs).y_train[0].item()
    assert first_label(data_dir=isolated / "given") == 1
    assert first_label() == 2
    monkeypatch.delenv("MIM_DATA_DIR")
    assert first_label() == 3
    assert datasets.load_dataset("mnist").source == str(isolated / "home" / ".cache" / "mim")


def test_a_data_dir_given_is_the_only_place_files_come_from(isolated):
    """Fashion-MNIST with one of its four files missing from the folder named: refused,
    naming the file, that folder and the folder that holds it (Debian's here), never read
    from there; leaving out data_dir, as the message says, reads it there."""
    write_idx_set(isolated / "debian")
    write_idx_set(isolated / "given")
    (isolated / "given" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(OSError) as err:
        datasets.load_dataset("fashion_mnist", data_dir=isolated / "given")
    message = str(err.value)
    assert "\n" not in message and message.startswith(
        f"t10k-labels-idx1-ubyte.gz not found in {isolated / 'given'} (nor in "
        f"{isolated / 'given' / 'fashion_mnist'}), the --data-dir given; put them there "
        f"(they are in {isolated / 'debian'}), or leave out --data-dir")
    assert datasets.load_dataset("fashion_mnist").source == str(isolated / "debian")


def test_debian_folder_is_searched_for_fashion_mnist_only(isolated):
    write_idx_set(isolated / "debian")
    assert len(datasets.load_dataset("fashion_mnist").x_train) == 50
    with pytest.raises(OSError, match="mnist files not found"):
        datasets.load_dataset("mnist")


def test_missing_data_with_failing_download_names_every_folder(isolated, monkeypatch):
    """... and leaves no folder that the failed download made. With a data_dir, nothing is
    downloaded: the message says where to get the files."""
    def offline(url, path, checksum):
        os.makedirs(os.path.dirname(path), exist_ok=True)       # as download() does
        raise OSError(f"{url}: <urlopen error [Errno -3] no network>")
    monkeypatch.setattr(datasets, "download", offline)
    monkeypatch.setenv("MIM_DATA_DIR", str(isolated / "env"))
    with pytest.raises(OSError) as err:
        datasets.load_dataset("fashion_mnist")
    message = str(err.value)
    assert "\n" not in message and "no network" in message
    for folder in ["env", "env/fashion_mnist", "home/.cache/mim",
                   "home/.cache/mim/fashion_mnist", "debian"]:
        assert str(isolated / folder) in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "fashion-mnist.s3-website.eu-central-1.amazonaws.com/t10k" in message
    assert "--data-dir" in message
    assert not (isolated / "env").exists()
    with pytest.raises(OSError) as err:
        datasets.load_dataset("fashion_mnist", data_dir=isolated / "given")
    message = str(err.value)
    assert "\n" not in message and str(isolated / "given") in message
    assert str(isolated / "env") not in message and "no network" not in message
    assert "fashion-mnist.s3-website.eu-central-1.amazonaws.com/t10k" in message
    assert "apt-get install dataset-fashion-mnist" in message


def test_download_goes_to_the_cache_and_tries_each_mirror(isolated, monkeypatch):
    calls = []

    def fake_download(url, path, checksum):
        calls.append(url)
        if "ossci" in url:
            raise OSError("mirror down")
        assert checksum == datasets.SOURCES["mnist"].checksums[os.path.basename(path)]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:                 # stands in for a verified download
            f.write(gzip.compress(idx_bytes(np.zeros((12, 28, 28)) if "images" in url
                                            else np.zeros(12))))
    monkeypatch.setattr(datasets, "download", fake_download)
    data = datasets.load_dataset("mnist")
    assert len(calls) == 8 and "cvdf-datasets" in calls[1]
    assert len(data.x_train) == 10 and len(data.x_val) == 2
    cached = isolated / "home" / ".cache" / "mim" / "mnist"
    assert sorted(os.listdir(cached)) == sorted(datasets.IDX_FILES)


def test_download_verifies_the_checksum_and_leaves_nothing_half_written(tmp_path,
                                                                        monkeypatch):
    good = b"the right bytes"
    checksum = "sha256:" + hashlib.sha256(good).hexdigest()
    served = {"bytes": b"the wrong bytes"}
    monkeypatch.setattr(urllib.request, "urlopen",
                        lambda url, timeout: io.BytesIO(served["bytes"]))
    target = tmp_path / "cache" / "file.gz"
    with pytest.raises(OSError, match="checksum mismatch"):
        datasets.download("https://example.org/file.gz", str(target), checksum)
    assert os.listdir(tmp_path / "cache") == []
    served["bytes"] = good
    datasets.download("https://example.org/file.gz", str(target), checksum)
    assert target.read_bytes() == good and os.listdir(tmp_path / "cache") == ["file.gz"]


def test_git_blob_digest_matches_git_hash_object(tmp_path):
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "hello").write_bytes(b"hello\n")
    # `git hash-object` of an empty file and of "hello\n"
    assert datasets.file_digest(tmp_path / "empty", "git-blob-sha1") == \
        "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"
    assert datasets.file_digest(tmp_path / "hello", "git-blob-sha1") == \
        "ce013625030ba8dba906f756967f9e9ca394464a"


def test_unknown_name_lists_every_data_set():
    with pytest.raises(ValueError) as err:
        datasets.load_dataset("cifar10")
    for name in ["toy2d", "toy20d", "toy1d", "mnist", "fashion_mnist", "omniglot",
                 "pca_fashion_mnist"]:
        assert name in str(err.value)


# ---------------------------------------------------------------- real files


@pytest.mark.skipif(not os.path.isdir(MNIST_SUBSET), reason="MNIST subset absent")
def test_real_mnist_subset():
    data = datasets.load_dataset("mnist", data_dir=MNIST_SUBSET)
    assert (len(data.x_train), len(data.x_val), len(data.x_test)) == (6_667, 1_333, 2_000)
    assert data.x_train.shape[1] == 784
    assert 0 <= data.x_train.min() and data.x_train.max() <= 1
    assert len(data.x_train.unique()) > 100                        # grey levels
    for x in (data.x_val, data.x_test):
        assert torch.equal(x.unique(), torch.tensor([0.0, 1.0]))
    labels = torch.cat([data.y_train, data.y_val, data.y_test])
    assert labels.min() == 0 and labels.max() == 9 and len(labels.unique()) == 10
    again = datasets.load_dataset("mnist", data_dir=MNIST_SUBSET)
    assert torch.equal(data.x_val, again.x_val)
    # binarization keeps the ink: bits and grey levels of the same images agree
    grey = datasets.grey_splits("mnist", MNIST_SUBSET)[0][1][0]        # validation images
    assert data.x_val.mean().item() == pytest.approx(grey.mean(), abs=0.003)


def fashion_mnist_present():
    return all(datasets.locate(datasets.DEBIAN_FASHION_MNIST_DIR, f)
               for f in datasets.IDX_FILES)


@pytest.mark.skipif(not fashion_mnist_present(), reason="apt-get install "
                    "dataset-fashion-mnist to run this test")
def test_real_fashion_mnist_and_its_principal_components():
    data = datasets.load_dataset("fashion_mnist")
    sizes = (len(data.x_train), len(data.x_val), len(data.x_test))
    assert sizes == (50_000, 10_000, 10_000)
    # known answers: the first labels of the official files (ankle boot, T-shirt, ...)
    assert data.y_train[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert data.y_test[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    assert torch.bincount(data.y_test).tolist() == [1_000] * 10
    train = datasets.grey_splits("fashion_mnist")[0][0][0]              # training images
    pca = datasets.principal_components(train, datasets.PCA_DIM)
    assert pca.explained_variance_ratio == pytest.approx(0.785, abs=0.002)  # Sec. 5.1


def test_checkpoint_round_trip(tmp_path):
    spec = mim.ModelSpec(x_dim=2, q_x="mog", prior="mog")
    torch.manual_seed(0)
    model = mim.build_model(spec, x_init=torch.randn(100, 2))
    mim.save_checkpoint(tmp_path / "best.pt", model, spec, note="round trip", step=3)
    loaded, extra = mim.load_checkpoint(tmp_path / "best.pt")
    assert extra == {"note": "round trip", "step": 3}
    assert mim.read_checkpoint(tmp_path / "best.pt")["spec"] == dataclasses.asdict(spec)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_checkpoints_of_the_earlier_format_are_refused_in_one_line(tmp_path):
    """Format 1 (the command line's flags, no ModelSpec) is named, not misread."""
    model = mim.build_model(mim.ModelSpec(x_dim=2))
    torch.save({"config": {}, "data": {}, "model": model.state_dict()}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="earlier mim.py .checkpoint format 1"):
        mim.load_checkpoint(tmp_path / "old.pt")
