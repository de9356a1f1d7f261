"""Tests for mim.py, datasets.py and evaluate.py.

1. The paper's identities (Eq. 6-15), by numerical integration on a grid in a world with
   1-D x and 1-D z, GMM anchors and Gaussian conditionals (numpy and scipy only).
2. The code against the maths: the Monte Carlo value of each objective in mim.py equals
   its integral within a few standard errors, and its gradient is finite.
3. The score-function estimator, against exact gradients on small discrete problems.
4. The evaluation tools against known answers; the command line end to end.

Run with `pytest -q` (a few minutes on two CPU cores).
"""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.special import expit, logsumexp
from scipy.stats import multivariate_normal, norm

import datasets
import evaluate
import mim

HERE = os.path.dirname(os.path.abspath(__file__))

# ----------------------------------------------------------------------------------------
# A 1-D world on a grid: x along axis 0, z along axis 1
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
# The objectives of mim.py against their integrals
# ----------------------------------------------------------------------------------------

ANCHOR_1D = datasets.GaussianMixture(np.array([[-1.0], [1.5]]), 0.6)


def model_1d(q_x="mog", seed=0):
    torch.manual_seed(seed)
    cfg = mim.Config(z_dim=1, hidden=8, prior="mog", q_x=q_x, components=3)
    x_init = ANCHOR_1D.sample(1000, np.random.default_rng(seed))[0]
    return mim.build_model(cfg, 1, x_init=x_init).double()


@torch.no_grad()
def model_grid(model):
    """The model's log-densities on the grid, as numpy arrays ((x, z) axes as above)."""
    v = torch.tensor(GRID)[:, None]                                     # (G, 1)
    q = model.q_z_given_x(v).base_dist                                  # loc, scale (G, 1)
    p = model.p_x_given_z(v).base_dist
    g = {
        "q_z_given_x": torch.distributions.Normal(q.loc, q.scale).log_prob(v.T),
        "p_x_given_z": torch.distributions.Normal(p.loc.T, p.scale.T).log_prob(v),
        "P_x": ANCHOR_1D.log_prob(v), "P_z": model.P_z().log_prob(v),
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
    mean, se = monte_carlo(mim.LOSSES[loss], model)
    assert abs(mean - INTEGRALS[loss, q_x](g)) < 4 * se + 1e-4, (mean, se)


def test_algorithm2_upper_bounds_eq8_with_the_marginal():
    g = model_grid(model_1d("marginal"))
    exact = over_m_s(g, -0.5 * (g["log_q"] + g["log_p"]))   # Eq. 8, q(x) = marginal
    assert INTEGRALS["mim", "marginal"](g) > exact + 1e-3


@pytest.mark.parametrize("loss,q_x", sorted(INTEGRALS))
def test_objective_gradient_is_finite(loss, q_x):
    model = model_1d(q_x)
    x = ANCHOR_1D.sample(256, np.random.default_rng(1))[0].double()
    mim.LOSSES[loss](model, x)[0].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(gr).all() for gr in grads)
    assert sum(float(gr.abs().sum()) for gr in grads) > 0


# ----------------------------------------------------------------------------------------
# Distributions are normalized
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
# The score-function estimator (App. D.2)
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


def test_mim_gradient_on_binary_x_is_unbiased():
    torch.manual_seed(0)
    encoder = mim.GaussianMLP(3, 1, 4)
    model = mim.Model(encoder, mim.BernoulliMLP(1, 3, 4), mim.StandardNormal(1), None, 1)
    model = model.double()
    params = list(model.parameters())
    x = torch.tensor([[1, 0, 1], [0, 0, 1], [1, 1, 0], [0, 1, 1]] * 8, dtype=torch.float64)
    exact = gradient(exact_mim_loss_binary(model, x), params)
    draws = torch.stack([gradient(mim.mim_loss(model, x)[0], params) for _ in range(4000)])
    se = draws.std(0) / math.sqrt(len(draws))
    z_scores = (draws.mean(0) - exact) / (se + 1e-12)
    assert z_scores.abs().max() < 4.5, z_scores


# ----------------------------------------------------------------------------------------
# Evaluation tools against known answers
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


def test_ksg_equals_its_definition():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 2))
    z = x @ rng.standard_normal((2, 3)) + 0.5 * rng.standard_normal((400, 3))
    assert evaluate.ksg_mi(x, z) == pytest.approx(ksg_by_definition(x, z, 5), abs=1e-9)


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


@torch.no_grad()
def test_iwae_nll_matches_quadrature():
    """With the proposal q(z|x) = N(0, 2^2) for every x, which covers the posterior, the
    estimate at S = 100,000 spreads by about 0.003 nats around -log p(x)."""
    model = model_1d("marginal", seed=3)
    last = model.q_z_given_x.net[2]
    last.weight.zero_()
    last.bias.copy_(torch.tensor([0.0, math.log(math.expm1(2.0 - mim.STD_FLOOR))]))
    g = model_grid(model)
    x = torch.tensor([[-2.0], [-0.5], [0.4], [1.7]], dtype=torch.float64)
    idx = [int(np.argmin(np.abs(GRID - v))) for v in x[:, 0].tolist()]
    x = torch.tensor(GRID[idx])[:, None]                     # on grid points exactly
    exact = -g["marginal"][idx]                              # -log p(x), quadrature
    torch.manual_seed(0)
    assert evaluate.iwae_nll(model, x, 100_000).numpy() == pytest.approx(exact, abs=0.015)
    single = torch.stack([evaluate.iwae_nll(model, x, 1) for _ in range(4000)]).numpy()
    se = single.std(0) / math.sqrt(len(single))
    assert np.all(np.abs(single.mean(0) - (-g["elbo"][idx])) < 4 * se)   # S = 1: -ELBO
    assert np.all(-g["elbo"][idx] > exact + 1e-3)            # ... the looser bound


class LinearStub:
    """z ~ N(x, 0.01^2), x | z ~ N(3 z, 1): the decoder mean misses x by 2 x."""
    q_z_given_x = staticmethod(lambda x: mim.diag_gaussian(x, 0.01 * torch.ones_like(x)))
    p_x_given_z = staticmethod(lambda z: mim.diag_gaussian(3 * z, torch.ones_like(z)))


def test_reconstruction_rmse_is_root_mean_squared_euclidean_error():
    torch.manual_seed(0)
    x = torch.randn(20_000, 2, dtype=torch.float64)
    expected = math.sqrt(4 * (x ** 2).sum(1).mean() + 2 * 9 * 0.01 ** 2)
    assert evaluate.reconstruction_rmse(LinearStub, x) == pytest.approx(expected, rel=1e-3)


# ----------------------------------------------------------------------------------------
# Warm-up, data, checkpoints and the command line
# ----------------------------------------------------------------------------------------

def test_warmup_schedules():
    assert mim.warmup_weights("paper", 0.0, 3) == mim.Weights(p=0.0, kl=0.0)
    assert mim.warmup_weights("paper", 1.5, 3) == mim.Weights(p=0.25, kl=0.5)
    assert mim.warmup_weights("paper", 7.0, 3) == mim.FULL
    early = mim.warmup_weights("authors", 0.5, 3)            # epoch 1 of 3
    assert early.q == pytest.approx(0.5 / 3) and not early.decoder_samples
    assert mim.warmup_weights("authors", 2.5, 3) == mim.FULL   # epoch 3: full, with D_dec
    assert mim.warmup_weights("paper", 0.0, 0) == mim.FULL


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


def test_checkpoint_round_trip(tmp_path):
    cfg = mim.Config(q_x="mog", prior="mog")
    torch.manual_seed(0)
    model = mim.build_model(cfg, 2, x_init=torch.randn(100, 2))
    mim.save_checkpoint(tmp_path / "best.pt", model, cfg, {"x_dim": 2, "binary": False})
    loaded, cfg2 = mim.load_checkpoint(tmp_path / "best.pt")
    assert cfg2 == cfg
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def run_cli(*args, cwd=HERE):
    return subprocess.run([sys.executable, os.path.join(HERE, "mim.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    proc = run_cli("--epochs", "3", "--warmup", "1", "--nll-samples", "10", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout


def test_cli_trains_and_writes_its_files(trained_run):
    out, stdout = trained_run
    assert "test_mi_ksg" in stdout and "nats" in stdout
    results = json.loads((out / "results.json").read_text())
    for key in ("test_mi_ksg", "test_nll", "test_rmse", "test_knn5_acc", "best_epoch",
                "epochs", "train_seconds"):
        assert math.isfinite(results[key]), key
    assert json.loads((out / "config.json").read_text())["loss"] == "mim"
    rows = (out / "log.csv").read_text().strip().splitlines()
    assert rows[0].startswith("epoch,") and len(rows) == 1 + results["epochs"]
    model, cfg = mim.load_checkpoint(out / "best.pt")
    assert cfg.epochs == 3 and isinstance(model, mim.Model)
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


def test_evaluate_cli_plots_a_trained_run(trained_run):
    out, _ = trained_run
    proc = subprocess.run([sys.executable, os.path.join(HERE, "evaluate.py"), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (out / "fig1.png").read_bytes()[:4] == b"\x89PNG"


def test_summary_is_mean_and_std_over_seeds(tmp_path):
    for seed, mi in [(1, 6.0), (2, 7.0), (3, 8.0)]:
        for loss, shift in [("mim", 0.0), ("vae", -5.0)]:
            run = tmp_path / f"{loss}-s{seed}"
            run.mkdir()
            cfg = {**vars(mim.Config(loss=loss, seed=seed)), "out": str(run)}
            (run / "config.json").write_text(json.dumps(cfg))
            (run / "results.json").write_text(json.dumps({"test_mi_ksg": mi + shift}))
    varying, table = evaluate.summarize(evaluate.load_runs(tmp_path))
    assert varying == ["loss"]
    assert table[("mim",)]["test_mi_ksg"] == pytest.approx((7.0, math.sqrt(2 / 3), 3))
    assert table[("vae",)]["test_mi_ksg"][0] == pytest.approx(2.0)


@pytest.mark.parametrize("args,needle", [
    (["--loss", "elbo"], "--loss"),
    (["--data", "nope"], "unknown data set"),
    (["--batch-size", "0"], "--batch-size"),
    (["--lr", "abc"], "--lr"),
])
def test_cli_rejects_bad_input_in_one_line(tmp_path, args, needle):
    proc = run_cli(*args, "--out", str(tmp_path / "bad"))
    assert proc.returncode == 2
    assert needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "bad" / "results.json").exists()
