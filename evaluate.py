"""Evaluation of trained MIM / VAE models: the metrics of Sec. 5 and the figures.

    ksg_mi                 mutual information I(x; z) by the KSG estimator, nats (refuses
                           high-dimensional binary x, where it counts ties)
    knn_accuracy           k-NN classification accuracy of latent codes (Sec. 5.3)
    reconstruction_rmse    root mean squared reconstruction error
    iwae_nll               importance-weighted estimate of -log p(x), nats, chunked over
                           points and samples; bits_per_dim converts nats to bits/dim
    ais_nll                a tight -log p(x) for sharp encoders: annealed importance
                           sampling with HMC (Wu et al. 2017) from the widened encoder
    informative_units      a scale-free count of used latent units (signal / noise > 1)
    active_units           latent dimensions u with Cov_x(E_q(z|x)[z_u]) > 0.01 (Burda et al.)
    posterior_kl_terms     the ELBO's KL term and the minibatch MI estimate (Hoffman &
                           Johnson 2016), at most log(batch size)
    consistency_1d         App. F.2: do the marginals of encoder and decoder match the priors?
    test_metrics           the metrics of one trained model on the test split, and the
                           per-point scores behind them
    paired_comparison      two models on the same test points: McNemar's exact test and a
                           paired bootstrap for 5-NN, the paired NLL difference

Figures (Fig. 1, 5, 7-8, 12, training curves and summaries over seeds) come back as
file contents (PNG, PDF or SVG): this file writes nothing and reads no run folder. It does
not import mim.py either: it uses a model through its interface (q_z_given_x,
p_x_given_z, p_z(), anchor_z, q_x, z_dim, latent_groups), and the command line (cli.py)
runs it on trained runs:

    python mim.py evaluate RUN_DIR [RUN_DIR ...] [--nll-samples S] [--ais-steps T] ...
    python mim.py evaluate --summary DIR [--x hidden] [--compare loss]
"""
import csv
import dataclasses
import io
import math
import statistics
import textwrap
from typing import Optional

import numpy as np
import torch
# scipy, scikit-learn and matplotlib are imported in the functions that use them: scipy's
# modules alone would add about 0.6 s to the start of every `python mim.py`, --help too


METRICS = {  # results.json / eval.json key: (label, unit)
    "test_mi_ksg": ("MI (KSG, k=5)", "nats"),
    "test_nll": ("NLL (IWAE)", "nats"),
    "test_nll_bpd": ("NLL (IWAE)", "bits/dim"),
    "test_nll_se": ("NLL's standard error over its test points", "nats"),
    "test_nll_tight": ("NLL (AIS)", "nats"),
    "test_nll_tight_se": ("its Monte Carlo standard error", "nats"),
    "test_nll_tight_bpd": ("NLL (AIS)", "bits/dim"),
    "test_nll_ais_points": ("NLL (IWAE) on the points AIS saw", "nats"),
    "test_rmse": ("reconstruction RMSE", "data units"),
    "test_knn5_acc": ("5-NN accuracy, one sampled code", "fraction"),
    "test_knn5_acc_mean": ("5-NN accuracy, encoder means", "fraction"),
    "test_kl": ("KL term of the ELBO", "nats"),
    "test_marginal_kl": ("KL(q(z) || p(z))", "nats"),
    "test_mi_batch": ("MI (minibatch)", "nats"),
    "test_mi_batch_cap": ("cap of MI (minibatch), log B", "nats"),
    "train_seconds": ("training time", "s"),
}
AU_PREFIX = "test_au_"          # test_au_<latent group>: number of active units

# Forward passes are chunked so that no tensor of x-sized values holds more than
# EVAL_MAX_VALUES floats (2 MiB): 668 images of 784 pixels, whose decoder activations
# (128 maps of 28x28 per image) take 256 MiB. Smaller passes are not slower, larger ones
# are (RESULTS.md, Performance). Low-dimensional x keeps the older caps.
EVAL_MAX_VALUES = 2 ** 19
ENCODE_BATCH = 10_000           # points per encoder pass on low-dimensional x
IWAE_MAX_CODES = 2 ** 20        # codes per decoder pass on low-dimensional x


def batch_limit(x_dim, cap):
    """Rows per forward pass for x of x_dim dimensions: at most cap, and x-sized tensors
    of at most EVAL_MAX_VALUES values."""
    return max(1, min(cap, EVAL_MAX_VALUES // x_dim))


# ----------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------

KSG_K = 5                       # neighbours of the KSG estimator (Fig. 2: "KSG, k=5")
KDTREE_MAX_DIM = 20             # joint dimensions up to which KSG uses k-d trees; above,
                                # they degrade towards N^2 and a brute-force pass wins
KSG_CHUNK_VALUES = 2 ** 22      # pairwise distances per chunk of the brute-force pass
KSG_COUNT_LEAF = 64             # points per leaf of the trees that count marginal
                                # neighbours: their balls hold many points, and whole
                                # leaves count faster than deeper trees (scipy's default
                                # is 16; RESULTS.md, Performance)


def ksg_counts_ties(x, k):
    """True if x (N, D) is binary with too many dimensions for KSG: 2^D possible values
    but fewer than k points per value on average. Distinct binary points are all exactly
    1 apart in the max-norm, so unless the k nearest joint neighbours can share x exactly,
    eps_i >= 1 and n_x(i) counts either the copies of x_i or every point: ties, not
    information. (The bound is log2(N / k) dimensions: 10 for N = 10,000 and k = 5.)"""
    binary = bool(np.isin(x, (0.0, 1.0)).all())
    return binary and x.shape[1] > math.log2(max(len(x) / k, 1.0))


def ksg_mi(x, z, k=5):
    """I(x; z) in nats by the first KSG estimator (Kraskov, Stoegbauer & Grassberger 2004,
    Eq. 8) with the max-norm:

        I = psi(k) + psi(N) - mean_i [psi(n_x(i) + 1) + psi(n_z(i) + 1)],

    where eps_i is the max-norm distance from (x_i, z_i) to its k-th nearest neighbour in
    the joint space and n_x(i) counts the points j != i with |x_j - x_i|_max < eps_i.
    One k-d tree query answers all points at once. x (N, Dx), z (N, Dz).
    Raises ValueError on high-dimensional binary x (see ksg_counts_ties).
    """
    x, z = (np.asarray(a, dtype=np.float64).reshape(len(a), -1) for a in (x, z))
    if len(x) != len(z) or len(x) <= k:
        raise ValueError(f"ksg_mi needs paired samples, more than k={k}: got {len(x)}, {len(z)}")
    if ksg_counts_ties(x, k):
        raise ValueError(f"ksg_mi: x is binary in {x.shape[1]} dimensions, where all distinct "
                         f"points are max-norm distance 1 apart and KSG counts ties, not "
                         f"information; use continuous x (--data pca_fashion_mnist) or "
                         f"binary x of at most log2(N/k) dimensions")
    from scipy.special import digamma
    counts = ksg_counts_tree if x.shape[1] + z.shape[1] <= KDTREE_MAX_DIM else ksg_counts_brute
    n_x1, n_z1 = counts(x, z, k)
    return float(digamma(k) + digamma(len(x)) - np.mean(digamma(n_x1) + digamma(n_z1)))


def ksg_counts_tree(x, z, k):
    """n_x(i) + 1 and n_z(i) + 1 (each point counts itself) by k-d trees, one query for
    all points: fast in low dimension, about N log N."""
    from scipy.spatial import cKDTree
    joint = np.hstack([x, z])
    eps = cKDTree(joint).query(joint, k=k + 1, p=np.inf, workers=-1)[0][:, k]
    radius = np.nextafter(eps, 0)  # strictly inside eps; the count includes the point itself
    return [cKDTree(a, leafsize=KSG_COUNT_LEAF).query_ball_point(
        a, radius, p=np.inf, return_length=True, workers=-1) for a in (x, z)]


def ksg_counts_brute(x, z, k):
    """The same counts from all pairwise max-norm distances, in chunks of rows: N^2 work,
    but without the k-d trees' collapse in high dimension. The joint max-norm distance is
    the larger of the two marginal ones, so two distance passes suffice; float64 and
    exact (a max of absolute differences), so the counts equal the trees'."""
    x, z = torch.from_numpy(x), torch.from_numpy(z)
    n_x1, n_z1 = [], []
    for rows in torch.arange(len(x)).split(max(1, KSG_CHUNK_VALUES // len(x))):
        d_x = torch.cdist(x[rows], x, p=math.inf)                       # (chunk, N)
        d_z = torch.cdist(z[rows], z, p=math.inf)
        eps = torch.maximum(d_x, d_z).kthvalue(k + 1, dim=1, keepdim=True).values
        n_x1.append((d_x < eps).sum(1))                                   # self: 0 < eps
        n_z1.append((d_z < eps).sum(1))
    return torch.cat(n_x1).numpy(), torch.cat(n_z1).numpy()


KNN_K = 5                       # Sec. 5.3: 5-NN
KNN_BINARIZATION_SEED = 0       # the one binarization of grey-level training images for 5-NN


def knn_correct(z_train, y_train, z_test, y_test, k=5):
    """Which test codes a k-nearest-neighbour classifier (Euclidean) fitted on training
    codes labels correctly: a bool array, one entry per test point."""
    from sklearn.neighbors import KNeighborsClassifier
    clf = KNeighborsClassifier(n_neighbors=k).fit(np.asarray(z_train), np.asarray(y_train))
    return clf.predict(np.asarray(z_test)) == np.asarray(y_test)


def knn_accuracy(z_train, y_train, z_test, y_test, k=5):
    """Accuracy of a k-nearest-neighbour classifier (Euclidean) fitted on training codes."""
    return float(knn_correct(z_train, y_train, z_test, y_test, k).mean())


@torch.no_grad()
def encode(model, x, batch_size=None):
    """One code z ~ q(z|x) per row of x: the stochastic codes whose MI the paper reports,
    and those the authors' code feeds to 5-NN and t-SNE (Sec. 5.3)."""
    batch_size = batch_size or batch_limit(x.shape[1], ENCODE_BATCH)
    return torch.cat([model.q_z_given_x(xb).sample() for xb in x.split(batch_size)])


@torch.no_grad()
def encoder_means(model, x, batch_size=None):
    """E_q(z|x)[z] per row of x (N, Z)."""
    batch_size = batch_size or batch_limit(x.shape[1], ENCODE_BATCH)
    return torch.cat([model.q_z_given_x(xb).mean for xb in x.split(batch_size)])


AU_THRESHOLD = 0.01             # Burda et al. (2016): active if Cov_x(E_q[z_u]) > 0.01
AU_DDOF = 1                     # the covariance over data points is the unbiased (N - 1) one


def active_units(model, x, threshold=AU_THRESHOLD, batch_size=None):
    """Active units (Burda, Grosse & Salakhutdinov 2016, Sec. 5.2): dimension u of z is
    active if A_u = Cov_x(E_q(z|x)[z_u]) > threshold, the covariance taken over the rows
    of x with ddof = AU_DDOF (1). Returns ({AU_PREFIX + group: count}, A (Z,) in z units^2)."""
    return active_units_of_means(encoder_means(model, x, batch_size), model.latent_groups,
                                 threshold)


def active_units_of_means(means, latent_groups, threshold=AU_THRESHOLD):
    """active_units from encoder means (N, Z) already computed."""
    variance = means.double().var(dim=0, correction=AU_DDOF)
    return counts_per_group(AU_PREFIX, variance > threshold, latent_groups), variance


def counts_per_group(prefix, selected, latent_groups):
    """{prefix + group: number of selected units (a (Z,) bool tensor) in that group}."""
    return {prefix + name: int(selected[start:stop].sum())
            for name, (start, stop) in latent_groups.items()}


MI_BATCH = 1000                 # points per batch of the minibatch MI estimate: at most
                                # log(1000) = 6.91 nats
PAIRS_PER_PASS = 2 ** 14        # (x, z) pairs per encoder pass in that estimate


@torch.no_grad()
def log_aggregate_posterior(q_z_given_x, z):
    """log q_B(z_i) = log 1/B sum_j q(z_i|x_j), the aggregate posterior of the batch
    behind q_z_given_x (batch B) at codes z (N, Z), in chunks of codes. (N,)"""
    chunk = max(1, PAIRS_PER_PASS // q_z_given_x.batch_shape[0])
    log_q = [q_z_given_x.log_prob(zc.unsqueeze(-2)).logsumexp(-1)      # (chunk,)
             for zc in z.split(chunk)]
    return torch.cat(log_q) - math.log(q_z_given_x.batch_shape[0])


@torch.no_grad()
def posterior_kl_terms(model, x, batch=MI_BATCH):
    """The ELBO's KL term and the minibatch estimate of I_q(x; z) that the critics paper
    reports (its Sec. 4.2), after Hoffman & Johnson (2016). With z_i ~ q(z|x_i) and the
    aggregate posterior q(z) estimated on a batch of B points by log_aggregate_posterior,
        test_kl           E[log q(z|x) - log p(z)]     = E_x KL(q(z|x) || p(z))
        test_marginal_kl  E[log q_B(z) - log p(z)]     ~ KL(q(z) || p(z))
        test_mi_batch     their difference, E[log q(z_i|x_i) - log q_B(z_i)], which is at
                          most test_mi_batch_cap = log B (every term is) and converges to
                          I_q(x; z) from below as B grows.
    The rows of x go in batches of B = min(batch, N); a last partial batch is dropped.
    """
    size = min(batch, len(x))
    p_z, terms = model.p_z(), []
    for xb in x[:len(x) // size * size].split(size):
        q_z_given_x = model.q_z_given_x(xb)
        z = q_z_given_x.sample()                                          # (B, Z)
        log_q, log_p = q_z_given_x.log_prob(z), p_z.log_prob(z)
        terms.append(torch.stack([log_q - log_p, log_aggregate_posterior(q_z_given_x, z)
                                  - log_p]))
    kl, marginal_kl = torch.cat(terms, dim=1).double().mean(1).tolist()
    return {"test_kl": kl, "test_marginal_kl": marginal_kl, "test_mi_batch": kl - marginal_kl,
            "test_mi_batch_cap": math.log(size)}


@torch.no_grad()
def mean_log_std(model, x, batch_size=None):
    """Mean over the rows of x and the units of each latent group of log std q(z_u|x),
    z1's at a sampled z2 for two levels: {"log_std_" + group: value}. It sits at
    log(std floor) when an encoder has collapsed to a deterministic map."""
    batch_size = batch_size or batch_limit(x.shape[1], ENCODE_BATCH)
    log_std = torch.cat([posterior_log_std(model.q_z_given_x(xb)) for xb in
                         x.split(batch_size)]).double().mean(0)                  # (Z,)
    return {"log_std_" + name: float(log_std[start:stop].mean())
            for name, (start, stop) in model.latent_groups.items()}


@torch.no_grad()
def posterior_variances(model, x, batch_size=None):
    """Var_q(z|x)[z_u] per row of x and unit (N, Z). For two levels, z1's variance is
    total: E[Var(z1|x, z2)] + Var(E[z1|x, z2]) over MEAN_SAMPLES draws of z2."""
    batch_size = batch_size or batch_limit(x.shape[1], ENCODE_BATCH)
    return torch.cat([model.q_z_given_x(xb).variance for xb in x.split(batch_size)])


SNR_THRESHOLD = 1.0             # informative_units: signal variance above noise variance
SNR_PREFIX = "test_informative_"  # test_informative_<latent group>: their number


def informative_units(means, variances, latent_groups, threshold=SNR_THRESHOLD):
    """A scale-free count of used units: u counts if its signal-to-noise ratio
    Cov_x(E[z_u|x]) / E_x Var(z_u|x) exceeds threshold. Unlike Burda's A_u > 0.01 it
    does not change when z_u is rescaled, as a learned prior or a log-variance clip
    allows. With Gaussian noise, the unit can carry at most 1/2 log(1 + ratio) nats (the
    capacity of a Gaussian channel), so ratio > 1 means up to 1/2 log 2 = 0.35 nats.
    means, variances (N, Z). Returns ({SNR_PREFIX + group: count}, ratio (Z,))."""
    ratio = (means.double().var(dim=0, correction=AU_DDOF)
             / variances.double().mean(dim=0))
    return counts_per_group(SNR_PREFIX, ratio > threshold, latent_groups), ratio


def posterior_log_std(q_z_given_x):
    """log std of each unit (B, Z) of a diagonal Gaussian or a two-level posterior."""
    if hasattr(q_z_given_x, "conditional"):   # mim.TwoLevel, by duck type (no import of mim.py)
        z2 = q_z_given_x.top.sample()
        return torch.cat([posterior_log_std(q_z_given_x.conditional(z2)),
                          posterior_log_std(q_z_given_x.top)], dim=-1)
    return q_z_given_x.base_dist.scale.log()


DIAGNOSTIC_POINTS = 1000        # validation points (and training points for 5-NN) of the
                                # per-epoch diagnostics


def epoch_diagnostics(data, n=DIAGNOSTIC_POINTS):
    """The per-epoch diagnostics of mim.train on fixed points: the first n validation
    points and, for 5-NN, the first n training points (binarized once). Returns
    model -> {active units per level, minibatch MI, mean log std per level, 5-NN accuracy
    of encoder means}, the signs of posterior collapse, or the lack of them."""
    x_val, y_val = data.x_val[:n], data.y_val[:n]
    x_knn, y_knn = knn_train_inputs(data, n), data.y_train[:n]

    @torch.no_grad()
    def diagnose(model):
        model.eval()
        means = encoder_means(model, x_val)
        counts = active_units_of_means(means, model.latent_groups)[0]
        stats = {k[len("test_"):]: v for k, v in counts.items()}
        terms = posterior_kl_terms(model, x_val)
        stats.update(mi_batch=terms["test_mi_batch"], **mean_log_std(model, x_val))
        stats["knn5_mean"] = knn_accuracy(encoder_means(model, x_knn).cpu(), y_knn.cpu(),
                                          means.cpu(), y_val.cpu())
        return stats
    return diagnose


@torch.no_grad()
def reconstruction_rmse(model, x):
    """sqrt(mean_i |x_i - xhat_i|^2), Euclidean over the dimensions of x, where xhat_i is the
    mean of p(x | z_i) for one code z_i ~ q(z|x_i).

    (The authors' code reports mean_i |x_i - x~_i| with x~_i a sample of p(x|z_i).)
    """
    xhat = model.p_x_given_z(encode(model, x)).mean
    return float(((x - xhat) ** 2).sum(-1).mean().sqrt())


NLL_SAMPLES = 5000              # importance samples per test point for the NLL of Table 4:
                                # the authors' code (experiment.py --S), as Tomczak & Welling


def log_joint(model, log_p_z, x, z):
    """log p(x|z) + log p(z) for codes z (n, B, Z) of the rows of x (B, D): (n, B), in
    one decoder pass over the n*B codes."""
    n = z.shape[0]
    flat = z.flatten(0, 1)                                              # (n*B, Z)
    x_rep = x.expand(n, *x.shape).flatten(0, 1)                         # (n*B, D)
    return (model.p_x_given_z(flat).log_prob(x_rep) + log_p_z(flat)).view(n, -1)


def iwae_log_weights(model, x, q_z_given_x, log_p_z, n):
    """log p(x|z_s) + log p(z_s) - log q(z_s|x) for n codes z_s ~ q(z|x) per row: (n, B)."""
    z = q_z_given_x.sample((n,))                                        # (n, B, Z)
    return log_joint(model, log_p_z, x, z) - q_z_given_x.log_prob(z)


@torch.no_grad()
def iwae_nll(model, x, num_samples, max_batch=None):
    """-log p(x) for each row of x (N, D), in nats, by importance sampling (Burda et al. 2016):

        -log (1/S) sum_s p(x|z_s) p(z_s) / q(z_s|x),   z_s ~ q(z|x), S = num_samples.

    S = 1 gives the negative ELBO; the estimate approaches -log p(x) from above as S grows.
    Each decoder pass sees at most max_batch codes (default: batch_limit): chunks of points,
    and where one point's S codes exceed max_batch, chunks of its samples too, whose log
    weights are joined before the logsumexp.
    """
    S = num_samples
    max_batch = max_batch or batch_limit(x.shape[1], IWAE_MAX_CODES)
    per_pass = min(S, max_batch)
    log_p_z = model.p_z().log_prob   # once: a VampPrior encodes its pseudo-inputs per call
    out = []
    for xb in x.split(max(1, max_batch // S)):
        q_z_given_x = model.q_z_given_x(xb)
        log_w = torch.cat([iwae_log_weights(model, xb, q_z_given_x, log_p_z, n)
                           for n in sample_chunks(S, per_pass)])        # (S, b)
        out.append(math.log(S) - torch.logsumexp(log_w, dim=0))
    return torch.cat(out)


# ----------------------------------------------------------------------------------------
# A tight NLL for sharp encoders: annealed importance sampling from the widened encoder
# ----------------------------------------------------------------------------------------

AIS_STEPS = 1000                # intermediate distributions of the tight NLL (ais_nll):
                                # the value RESULTS.md's numbers use; --ais-steps asks
AIS_CHAINS = 16                 # independent chains per test point (as Wu et al. 2017)
AIS_LEAPFROG = 10               # leapfrog steps per HMC transition (as Wu et al. 2017)
AIS_STEP_SIZE = 0.05            # initial leapfrog step size, adapted per chain ...
AIS_ACCEPT = 0.65               # ... towards this acceptance rate (Neal 2011, Sec. 5.4.4)
AIS_ADAPT_RATE = 0.05           # change of log(step size) per transition, times
                                # (accepted - AIS_ACCEPT): equilibrium at AIS_ACCEPT
AIS_INFLATE = 3.0               # the start r(z|x): the encoder with its std times this
AIS_SCHEDULE_WIDTH = 4.0        # the sigmoid schedule's range, sigmoid(-4) .. sigmoid(4)


def sigmoid_schedule(steps, width=AIS_SCHEDULE_WIDTH):
    """Inverse temperatures 0 = beta_0 < ... < beta_T = 1, denser at both ends (the
    sigmoid schedule of Grosse, Ghahramani & Adams 2015, used by Wu et al. 2017)."""
    s = torch.sigmoid(torch.linspace(-width, width, steps + 1, dtype=torch.float64))
    return ((s - s[0]) / (s[-1] - s[0])).tolist()


class Annealed:
    """The chains' codes z (K, B, Z) with log r(z|x) of the start, log p(x, z) of the
    target (K, B) and their gradients with respect to z: everything an HMC step on
    r(z|x)^(1 - beta) p(x, z)^beta needs."""

    def __init__(self, model, p_z, start, x, z):
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            log_target = log_joint(model, p_z.log_prob, x, z)           # (K, B)
            log_start = start.log_prob(z)                               # (K, B)
            self.grad_start, = torch.autograd.grad(log_start.sum(), z, retain_graph=True)
            self.grad_target, = torch.autograd.grad(log_target.sum(), z)
        self.z = z.detach()
        self.log_start, self.log_target = log_start.detach(), log_target.detach()

    def energy(self, beta):                                             # (K, B)
        return -((1 - beta) * self.log_start + beta * self.log_target)

    def grad_energy(self, beta):                                        # (K, B, Z)
        return -((1 - beta) * self.grad_start + beta * self.grad_target)


def ais_start(model, x, inflate=AIS_INFLATE):
    """r(z|x) = N(E_q[z|x], inflate^2 Var_q(z|x)), diagonal: the encoder widened, so that
    it covers the posterior where a sharp encoder does not (any normalized r keeps AIS
    unbiased; it only changes how many steps it needs)."""
    q_z_given_x = model.q_z_given_x(x)
    scale = inflate * q_z_given_x.variance.sqrt()
    normal = torch.distributions.Normal(q_z_given_x.mean, scale, validate_args=False)
    return torch.distributions.Independent(normal, 1)


def hmc_step(model, p_z, start, x, state, beta, step_size, leapfrog):
    """One Hamiltonian Monte Carlo transition (Neal 2011) that leaves the density
    proportional to r(z|x)^(1 - beta) p(x, z)^beta invariant, for every chain at once: `leapfrog`
    steps of size step_size (K, B, 1), then a Metropolis test. Returns the new state and
    which chains accepted (K, B)."""
    momentum = torch.randn_like(state.z)
    p = momentum - 0.5 * step_size * state.grad_energy(beta)
    proposal = state
    for i in range(leapfrog):
        proposal = Annealed(model, p_z, start, x, proposal.z + step_size * p)
        if i < leapfrog - 1:
            p = p - step_size * proposal.grad_energy(beta)
    p = p - 0.5 * step_size * proposal.grad_energy(beta)
    log_ratio = (state.energy(beta) + 0.5 * momentum.pow(2).sum(-1)
                 - proposal.energy(beta) - 0.5 * p.pow(2).sum(-1))
    accept = torch.rand_like(log_ratio).log() < log_ratio               # NaN: rejected
    keep = accept[..., None]
    for name in ("z", "log_start", "log_target", "grad_start", "grad_target"):
        new, old = getattr(proposal, name), getattr(state, name)
        setattr(proposal, name, torch.where(keep if new.dim() == 3 else accept, new, old))
    return proposal, accept


def ais_log_weights(model, x, chains, steps, leapfrog, inflate=AIS_INFLATE):
    """log w (chains, B) of annealed importance sampling (Neal 2001) from r(z|x)
    (`ais_start`) to the posterior p(z|x), through r^(1 - beta_t) p(x, z)^beta_t on the
    sigmoid schedule, one HMC transition per temperature: E[w] = p(x) exactly, for any
    number of steps.

    The step size of each chain adapts towards an acceptance rate of AIS_ACCEPT (as in
    Wu et al. 2017): up after an accepted move, down after a rejected one, from that
    chain's past only, so each transition still leaves its distribution invariant.
    """
    p_z, start = model.p_z(), ais_start(model, x, inflate)
    state = Annealed(model, p_z, start, x, start.sample((chains,)))     # (K, B, Z)
    step_size = torch.full((chains, len(x), 1), AIS_STEP_SIZE, dtype=state.z.dtype,
                           device=x.device)
    log_w = torch.zeros_like(state.log_target)
    betas = sigmoid_schedule(steps)
    for beta_prev, beta in zip(betas[:-1], betas[1:]):
        log_w += (beta - beta_prev) * (state.log_target - state.log_start)
        state, accept = hmc_step(model, p_z, start, x, state, beta, step_size, leapfrog)
        step_size *= torch.exp(AIS_ADAPT_RATE * (accept.to(step_size.dtype)[..., None]
                                                 - AIS_ACCEPT))
    return log_w


@torch.no_grad()
def ais_nll(model, x, chains=AIS_CHAINS, steps=AIS_STEPS, leapfrog=AIS_LEAPFROG,
            max_batch=None, inflate=AIS_INFLATE):
    """-log p(x) for each row of x (N, D), in nats, by annealed importance sampling, and
    the Monte Carlo standard error of each value (N,), (N,).

    Unlike the IWAE estimate, it does not rely on the encoder covering the posterior:
    a sharp (too narrow) q(z|x) only makes the start, and the chains move from there. -log of the mean of the chains' weights is an upper bound
    of -log p(x) in expectation, tight as the steps grow. The standard error is the
    delta-method one of the log of a mean of `chains` weights.
    """
    max_batch = max_batch or batch_limit(x.shape[1], IWAE_MAX_CODES)
    nll, se = [], []
    for xb in x.split(max(1, max_batch // chains)):
        log_w = ais_log_weights(model, xb, chains, steps, leapfrog, inflate)  # (K, b)
        nll.append(math.log(chains) - torch.logsumexp(log_w, dim=0))
        ratio = torch.exp(log_w - log_w.max(0).values)
        ratio = ratio / ratio.mean(0)
        se.append(ratio.std(0) / math.sqrt(chains))
    return torch.cat(nll), torch.cat(se)


def sample_chunks(total, size):
    """Sizes of consecutive chunks of at most `size` that add up to `total`."""
    return [min(size, total - start) for start in range(0, total, size)]


def bits_per_dim(nats, x_dim):
    """A negative log-likelihood of x_dim-dimensional x in nats as bits per dimension."""
    return nats / (x_dim * math.log(2))


def knn_train_inputs(data, n=None):
    """The first n training points, as binary images where the training set holds grey
    levels for dynamic binarization: one fixed draw (the authors' code draws one too)."""
    x = data.x_train[:n]
    if not data.dynamic:
        return x
    generator = torch.Generator(device=x.device).manual_seed(KNN_BINARIZATION_SEED)
    return torch.bernoulli(x, generator=generator)


@dataclasses.dataclass(frozen=True)
class AIS:
    """Settings of the tight NLL (ais_nll); steps = 0 skips it. points: run it on the
    first `points` test points only (default: all), since on images it costs far more
    than the IWAE estimate."""
    steps: int = AIS_STEPS
    chains: int = AIS_CHAINS
    leapfrog: int = AIS_LEAPFROG
    points: Optional[int] = None
    inflate: float = AIS_INFLATE


NO_AIS = AIS(steps=0)


def tight_nll(model, x, ais, max_batch=None):
    """test_nll_tight (mean of ais_nll over the first ais.points rows of x, nats), its
    standard error and the settings."""
    x = x[:ais.points]
    nll, se = ais_nll(model, x, ais.chains, ais.steps, ais.leapfrog, max_batch, ais.inflate)
    return {"test_nll_tight": float(nll.mean()),
            "test_nll_tight_se": float(se.pow(2).sum().sqrt()) / len(x),
            "ais_steps": ais.steps, "ais_chains": ais.chains, "ais_leapfrog": ais.leapfrog,
            "ais_points": len(x), "ais_inflate": ais.inflate}


def fewest_test_points(binary):
    """(n, why): the fewest test points that test_metrics and the figures can use, and
    what needs them. KSG runs on continuous x and needs more than KSG_K; on binary images
    t-SNE's perplexity and the covariance over points behind the active units need two."""
    if binary:
        return 2, "t-SNE and the active units need at least 2 test points"
    return KSG_K + 1, f"the KSG estimate of the MI needs more than k = {KSG_K} test points"


def test_metrics(model, data, nll_samples, knn_train_size=None, max_batch=None,
                 with_posterior_stats=None, ais=NO_AIS, nll_points=None,
                 return_points=False):
    """The metrics of Fig. 2-3 on the test split (those of App. F.2 too for 1-D models).

    Binary (image) data, Sec. 5.2-5.3 and Table 4-6: no KSG (it counts ties there, see
    ksg_counts_ties) and no RMSE (the paper reports none for images, and the PixelCNN
    decoder has no mean); the NLL also in bits/dim. Active units, the ELBO's KL term and
    the minibatch MI estimate are added when with_posterior_stats is true (default: for
    binary data, so that the toy results keep their keys). nll_samples = 0 skips the NLL;
    nll_points restricts it to the first nll_points test points (default: all);
    `ais` with steps > 0 adds the tight NLL by annealed importance sampling.
    The 5-NN classifier is fitted on the codes of the first knn_train_size training
    points (default: all). return_points=True returns (results, points), the per-point
    scores behind the means, for paired comparisons (numpy arrays): label, knn5_correct
    and knn5_mean_correct (bool, one per test point) and nll (nats, one per NLL point).
    """
    model.eval()
    x_test, binary = data.x_test, data.binary
    x_knn = knn_train_inputs(data, knn_train_size)
    z_test, z_train = encode(model, x_test, max_batch), encode(model, x_knn, max_batch)
    means_test = encoder_means(model, x_test, max_batch)
    y_train, y_test = data.y_train[:knn_train_size].cpu(), data.y_test.cpu()
    results, points = {}, {"label": y_test.numpy()}
    if not ksg_counts_ties(x_test.cpu().numpy(), KSG_K):
        results["test_mi_ksg"] = ksg_mi(x_test.cpu(), z_test.cpu(), k=KSG_K)
    if nll_samples > 0:
        nll = iwae_nll(model, x_test[:nll_points], nll_samples, max_batch)    # (N,)
        results["test_nll"] = float(nll.mean())
        points["nll"] = nll.cpu().double().numpy()
    if nll_samples > 0 and binary:
        results["test_nll_bpd"] = bits_per_dim(results["test_nll"], data.x_dim)
    if ais.steps > 0:
        results.update(tight_nll(model, x_test, ais, max_batch))
    if ais.steps > 0 and nll_samples > 0:  # the two estimators on the same points
        results["test_nll_ais_points"] = float(nll[:ais.points].mean())
    if ais.steps > 0 and binary:
        results["test_nll_tight_bpd"] = bits_per_dim(results["test_nll_tight"], data.x_dim)
    if not binary:
        results["test_rmse"] = reconstruction_rmse(model, x_test)
    points["knn5_correct"] = knn_correct(z_train.cpu(), y_train, z_test.cpu(), y_test,
                                         k=KNN_K)
    points["knn5_mean_correct"] = knn_correct(
        encoder_means(model, x_knn, max_batch).cpu(), y_train, means_test.cpu(), y_test,
        k=KNN_K)
    results["test_knn5_acc"] = float(points["knn5_correct"].mean())
    results["test_knn5_acc_mean"] = float(points["knn5_mean_correct"].mean())
    results["nll_samples"] = nll_samples
    if binary if with_posterior_stats is None else with_posterior_stats:
        results.update(active_units_of_means(means_test, model.latent_groups)[0])
        results.update(informative_units(means_test, posterior_variances(model, x_test),
                                         model.latent_groups)[0])
        results.update(posterior_kl_terms(model, x_test))
    if data.x_dim == 1 and z_test.shape[1] == 1 and data.anchor is not None:
        results.update(consistency_1d(model, data.anchor))
    return (results, points) if return_points else results


def describe(key):
    """(label, unit) of a results key; (None, "") for keys that are not metrics."""
    if key.startswith(SNR_PREFIX):
        return (f"informative units of {key[len(SNR_PREFIX):]} (Cov_x E[z_u|x] / "
                f"E_x Var(z_u|x) > {SNR_THRESHOLD})", "count")
    if key.startswith(AU_PREFIX):
        return f"active units of {key[len(AU_PREFIX):]} (A_u > {AU_THRESHOLD})", "count"
    return METRICS.get(key, (None, ""))


def format_results(results):
    lines = []
    for key, value in results.items():
        label, unit = describe(key)
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"{key:<18} {text:>10}  {unit:<10}  {label or ''}".rstrip())
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# Paired comparisons: two models scored on the same test points. Each point is scored by
# both, so which points the test split happens to hold cancels in the difference; set
# side by side instead, two accuracies on 1,000 digits each carry a binomial standard
# error of about 0.01, as large as the differences of Fig. 6.
# ----------------------------------------------------------------------------------------

CONFIDENCE = 0.95               # of every interval of a comparison
BOOTSTRAP_RESAMPLES = 10_000    # of the paired bootstrap: its percentiles then move by
                                # about 1% of the interval's width from one seed to another
BOOTSTRAP_SEED = 0
PAIRED_MEASURES = {             # points key (test_metrics): label, unit
    "knn5_correct": ("5-NN, one sampled code", "fraction"),
    "knn5_mean_correct": ("5-NN, encoder means", "fraction"),
    "nll": ("NLL, IWAE", "nats"),
}


def mcnemar_p(only_a, only_b):
    """McNemar's exact two-sided p-value for two classifiers of the same points, from the
    points that only A classifies correctly (only_a) and only B (only_b). If both are
    equally accurate, each such point is A's with probability 1/2, so only_a ~
    Binomial(n, 1/2) with n = only_a + only_b, and

        p = min(1, 2 P(X <= min(only_a, only_b))),   X ~ Binomial(n, 1/2),

    computed in exact integers (1 where no point is discordant)."""
    n, k = only_a + only_b, min(only_a, only_b)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def paired_bootstrap_interval(correct_a, correct_b, confidence=CONFIDENCE,
                              resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED):
    """The percentile bootstrap interval of accuracy(A) - accuracy(B): test points are
    resampled with replacement, each with both models' scores (the pairing). A point's
    difference is 1, 0 or -1, so a resample is summed up by how many of each it drew, a
    multinomial draw: the same distribution as drawing indices, at a fraction of the cost."""
    d = np.asarray(correct_a, int) - np.asarray(correct_b, int)             # (N,)
    n = len(d)
    counts = np.random.default_rng(seed).multinomial(
        n, np.bincount(d + 1, minlength=3) / n, size=resamples)            # (R, 3): -1, 0, 1
    diffs = (counts[:, 2] - counts[:, 0]) / n
    tail = (1 - confidence) / 2
    return tuple(float(q) for q in np.quantile(diffs, [tail, 1 - tail]))


def standard_error(values):
    """The standard error of the mean of values: std (ddof = 1) / sqrt(N)."""
    v = np.asarray(values, float)
    return float(v.std(ddof=1) / math.sqrt(len(v)))


def paired_difference(a, b):
    """mean(a - b) over per-point scores of the same points and its standard error."""
    d = np.asarray(a, float) - np.asarray(b, float)
    return float(d.mean()), standard_error(d)


def mean_interval(values, confidence=CONFIDENCE):
    """(mean, interval) of one number per seed: Student's t interval with n - 1 degrees
    of freedom, None for fewer than two values (one seed says nothing of the spread)."""
    from scipy.stats import t
    v = np.asarray(values, float)
    if len(v) < 2:
        return float(v.mean()), None
    half = t.ppf((1 + confidence) / 2, len(v) - 1) * standard_error(v)
    return float(v.mean()), (float(v.mean() - half), float(v.mean() + half))


def paired_comparison(points_a, points_b, confidence=CONFIDENCE):
    """Model A against model B on the same test points (test_metrics' points of each):
    {measure: {a, b, diff (A - B), interval}} for each PAIRED_MEASURES key that both
    have; the 5-NN measures add only_a, only_b (points only that model gets right) and
    McNemar's p, with the paired bootstrap interval; the NLL its standard error and the
    normal interval diff +- z se."""
    if not np.array_equal(points_a["label"], points_b["label"]):
        raise ValueError("the two models were scored on different test points")
    rows = {}
    for key in ("knn5_correct", "knn5_mean_correct"):
        a, b = np.asarray(points_a[key], bool), np.asarray(points_b[key], bool)
        only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
        rows[key] = {"a": float(a.mean()), "b": float(b.mean()),
                     "diff": float(a.mean() - b.mean()),
                     "interval": paired_bootstrap_interval(a, b, confidence),
                     "only_a": only_a, "only_b": only_b, "p": mcnemar_p(only_a, only_b)}
    if "nll" in points_a and "nll" in points_b:
        if len(points_a["nll"]) != len(points_b["nll"]):
            raise ValueError("the two NLLs were estimated on different test points")
        diff, se = paired_difference(points_a["nll"], points_b["nll"])
        z = statistics.NormalDist().inv_cdf((1 + confidence) / 2)
        rows["nll"] = {"a": float(np.mean(points_a["nll"])),
                       "b": float(np.mean(points_b["nll"])), "diff": diff, "se": se,
                       "interval": (diff - z * se, diff + z * se)}
    return rows


# ----------------------------------------------------------------------------------------
# App. F.2: consistency of the marginals in 1-D, by Kolmogorov-Smirnov distances
# ----------------------------------------------------------------------------------------

def cdf_1d(dist):
    """The CDF of a 1-D StandardNormal / MixtureOfGaussians distribution, as a numpy function."""
    from scipy.stats import norm
    if isinstance(dist, torch.distributions.MixtureSameFamily):
        probs = dist.mixture_distribution.probs.detach().cpu().numpy()          # (K,)
        base = dist.component_distribution.base_dist
        loc, scale = (t.detach().cpu().numpy()[:, 0] for t in (base.loc, base.scale))
        return lambda v: norm.cdf((np.asarray(v)[:, None] - loc) / scale) @ probs
    base = dist.base_dist
    return lambda v: norm.cdf(np.asarray(v), base.loc.item(), base.scale.item())


@torch.no_grad()
def consistency_1d(model, anchor, n=100_000):
    """Kolmogorov-Smirnov distances (sup |F - G|, in [0, 1]) between four pairs (Fig. 12):

      anchor consistency   x of z ~ P(z), x ~ p(x|z)   vs P(x)
                           z of x ~ P(x), z ~ q(z|x)   vs P(z)
      prior consistency    x of z ~ p(z), x ~ p(x|z)   vs q(x)   (explicit q(x) only)
                           z of x ~ q(x), z ~ q(z|x)   vs p(z)   (explicit q(x) only)
    """
    from scipy.stats import kstest, norm
    device = next(model.parameters()).device
    rng = np.random.default_rng(0)
    P_x = anchor.sample(n, rng)[0].to(device)
    P_x_cdf = lambda v: norm.cdf((np.asarray(v)[:, None] - anchor.means[:, 0]) / anchor.std
                                 ).mean(1)

    def ks(samples, cdf):
        return float(kstest(samples.cpu().numpy().ravel(), cdf).statistic)

    out = {
        "ks_anchor_x": ks(model.p_x_given_z(model.anchor_z().sample((n,))).sample(), P_x_cdf),
        "ks_anchor_z": ks(model.q_z_given_x(P_x).sample(), cdf_1d(model.anchor_z())),
    }
    if model.q_x is not None:
        out["ks_prior_x"] = ks(model.p_x_given_z(model.p_z().sample((n,))).sample(),
                               cdf_1d(model.q_x()))
        out["ks_prior_z"] = ks(model.q_z_given_x(model.q_x().sample((n,))).sample(),
                               cdf_1d(model.p_z()))
    return out


# ----------------------------------------------------------------------------------------
# Figures: the contents of PNG, PDF or SVG files, never files
# ----------------------------------------------------------------------------------------

def pyplot():
    """matplotlib.pyplot with the file-only Agg backend, imported when a figure is drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


FIGURE_DPI = 120       # pixels per inch of a PNG; image grids and Fig. 1 use MOSAIC_DPI
MOSAIC_DPI = 150


def figure_bytes(fig, fmt="png"):
    """The figure as the contents of a file of format fmt (png, pdf, svg: any that
    matplotlib writes), at the figure's own dpi; the figure is closed."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt)
    pyplot().close(fig)
    return buffer.getvalue()


FIGURE_FONT = 11       # points: readable when a panel fills a third of a slide
CHAR_WIDTH = 0.6       # a character's average width in ems, to wrap titles to a figure


def fit_title(text, inches, points=FIGURE_FONT + 1):
    """text broken into lines that fit a figure `inches` wide at a font of `points`."""
    return textwrap.fill(text, max(int(inches * 72 / (CHAR_WIDTH * points)), 20),
                         break_on_hyphens=False)


LOG_AXIS_RATIO = 10     # numbers on x spanning this factor or more get a log axis


def plot_summary(varying, table, metrics, x_key, columns=4, title="", n_seeds=""):
    """The summary over seeds that cli.py computes, as a figure: one panel per metric
    against x_key, one line per remaining group (Fig. 2 layout);
    categories on x (such as --x loss) get points with error bars and no lines; numbers
    spanning a decade or more a log axis."""
    plt = pyplot()
    xi = varying.index(x_key)
    series = {}
    for key, row in table.items():
        name = ", ".join(str(v) for i, v in enumerate(key) if i != xi)
        series.setdefault(name, []).append((key[xi], row))
    xs = [key[xi] for key in table]
    log_x = (all(isinstance(v, (int, float)) and v > 0 for v in xs)
             and max(xs) >= LOG_AXIS_RATIO * min(xs))
    ticks = sorted(set(xs)) if log_x else None
    rows = math.ceil(len(metrics) / columns)
    fig, axes = plt.subplots(rows, min(columns, len(metrics)), squeeze=False, dpi=FIGURE_DPI,
                             figsize=(4 * min(columns, len(metrics)), 3.4 * rows))
    for ax, m in zip(axes.flat, metrics):
        for name, points in series.items():
            points.sort(key=lambda p: p[0])
            categories = isinstance(points[0][0], str)
            ax.errorbar([p[0] for p in points], [p[1][m][0] for p in points],
                        yerr=[p[1][m][1] for p in points], marker="o", capsize=3, label=name,
                        linestyle="none" if categories else "-")
            if categories:
                ax.tick_params(axis="x", labelrotation=60)
        if log_x:   # ticks at the values run: matplotlib's minor labels overlap
            ax.set_xscale("log")                # on spans of one or two decades
            ax.set_xticks(ticks, [f"{v:g}" for v in ticks])
            ax.xaxis.set_minor_formatter(plt.NullFormatter())
        label, unit = describe(m)
        ax.set(title=label or m, xlabel=x_key, ylabel=unit)
    for ax in axes.flat[len(metrics):]:
        ax.set_visible(False)
    if len(series) > 1:
        axes.flat[0].legend(title=", ".join(k for k in varying if k != x_key), fontsize=9)
    fig.suptitle(f"{title}mean ± std over {n_seeds} seeds per point")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------
# Figures of single runs
# ----------------------------------------------------------------------------------------

@torch.no_grad()
def plot_toy2d(model, data, title, n_points=300, axes=None):
    """Fig. 1: top, level sets of P(x) and reconstructed test points; bottom, one-std
    ellipses of q(z|x) for test points and the unit circle of P(z). axes: (top, bottom)
    of a figure to draw into (default: a figure of their own)."""
    plt = pyplot()
    from matplotlib.patches import Ellipse

    x = data.x_test[:n_points]
    q_z_given_x = model.q_z_given_x(x)
    xhat = model.p_x_given_z(q_z_given_x.sample()).mean.cpu()
    grid = torch.linspace(-2, 2, 200)
    gx, gy = torch.meshgrid(grid, grid, indexing="xy")
    density = data.anchor.log_prob(torch.stack([gx, gy], -1).view(-1, 2)).exp().view(200, 200)
    if axes is None:
        axes = plt.subplots(2, 1, figsize=(4.2, 8.4), dpi=MOSAIC_DPI)[1]
    (top, bottom), fig = axes, axes[0].figure
    top.contour(gx, gy, density, levels=6, colors="k", linewidths=0.6)
    top.plot([], [], "k", lw=0.6, label="level sets of P(x)")
    top.scatter(xhat[:, 0], xhat[:, 1], s=3, c="r",
                label=f"reconstructions of {len(x)} test points")
    top.set(title=fit_title(f"{title}: data space", 4.2), xlim=(-2, 2), ylim=(-2, 2),
            aspect="equal", xlabel="$x_1$", ylabel="$x_2$")
    top.legend(loc="upper left", fontsize=8)
    loc, scale = (t.cpu() for t in (q_z_given_x.mean, q_z_given_x.stddev))
    for (mx, my), (sx, sy) in zip(loc.tolist(), scale.tolist()):
        bottom.add_patch(Ellipse((mx, my), 2 * sx, 2 * sy, fill=False, color="g", lw=0.5))
    bottom.plot([], [], "g", lw=0.5, label="q(z|x): one-std ellipses")
    bottom.add_patch(plt.Circle((0, 0), 1, fill=False, ls="--", color="k"))
    bottom.plot([], [], "k--", label="P(z) = N(0, I): unit circle")
    lim = max(3.0, float(loc.abs().max()) + 0.5)
    bottom.set(title="latent space", xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal",
               xlabel="$z_1$", ylabel="$z_2$")
    bottom.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


@torch.no_grad()
def plot_consistency_1d(model, data, title, n=50_000):
    """Fig. 12 (c-f): marginals of anchored and prior-driven encoder and decoder against
    the anchors P(x), P(z) (black) and the priors q(x) (red), p(z) (blue)."""
    plt = pyplot()

    v = torch.linspace(-6, 6, 600)[:, None]
    x_anchor = data.x_train[:n]
    rows = [("anchored", model.p_x_given_z(model.anchor_z().sample((n,))).sample(),
             model.q_z_given_x(x_anchor).sample(), data.anchor.log_prob(v).exp(),
             model.anchor_z().log_prob(v).exp(), "k")]
    if model.q_x is not None:
        rows.append(("priors", model.p_x_given_z(model.p_z().sample((n,))).sample(),
                     model.q_z_given_x(model.q_x().sample((n,))).sample(),
                     model.q_x().log_prob(v).exp(), model.p_z().log_prob(v).exp(), "rb"))
    fig, axes = plt.subplots(2, len(rows), figsize=(4.6 * len(rows), 6.4), squeeze=False,
                             dpi=FIGURE_DPI)
    names = {("anchored", "x"): ("decoder marginal of z ~ P(z)", "anchor P(x)"),
             ("anchored", "z"): ("encoder marginal of x ~ P(x)", "anchor P(z)"),
             ("priors", "x"): ("decoder marginal of z ~ p(z)", "prior q(x)"),
             ("priors", "z"): ("encoder marginal of x ~ q(x)", "prior p(z)")}
    for j, (name, xs, zs, dx, dz, colours) in enumerate(rows):
        for i, (s, d, var) in enumerate([(xs, dx, "x"), (zs, dz, "z")]):
            ax = axes[i, j]
            sampled, exact = names[(name, var)]
            ax.hist(s.cpu().numpy().ravel(), bins=120, range=(-6, 6), density=True,
                    color="g" if var == "x" else "y", alpha=0.6, label=sampled)
            ax.plot(v.numpy().ravel(), d.numpy().ravel(), colours[min(i, len(colours) - 1)],
                    label=exact)
            ax.set(title=f"{name}: {var}", xlim=(-6, 6), xlabel=var, ylabel="density")
            ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(fit_title(f"{title}: marginals, {n:,} samples each", 4.6 * len(rows)))
    fig.tight_layout()
    return fig


TSNE_POINTS = 2000      # test codes in tsne.png: t-SNE costs O(N log N) and 2,000 points
                        # show the class structure of Fig. 7-8
TSNE_SEED = 0
TSNE_PERPLEXITY = 30.0  # sklearn's default; lowered for fewer than 91 points
RECON_COLUMNS = 10      # reconstructions.png: 10 test images over their reconstructions
SAMPLE_GRID = (2, 8)    # samples.png: 16 images, since PixelCNN sampling is autoregressive
INCHES_PER_PIXEL = 0.03  # image grids: 28-pixel images about 0.85 inch wide
TITLE_INCHES = 0.5


def plot_tsne(z, y, title, n_points=TSNE_POINTS, seed=TSNE_SEED):
    """Fig. 7-8: a 2-D t-SNE embedding of the first n_points codes z (N, Z), coloured by
    their labels y (N,)."""
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits
    plt = pyplot()
    z, y = np.asarray(z[:n_points], dtype=np.float64), np.asarray(y[:n_points])
    perplexity = min(TSNE_PERPLEXITY, (len(z) - 1) / 3)
    # One OpenMP thread: with cores shared by other work, the threads of the Barnes-Hut
    # gradient busy-wait on each other (60 points: 12-29 s instead of 0.2 s on 2 cores).
    with threadpool_limits(limits=1, user_api="openmp"):
        xy = TSNE(n_components=2, perplexity=perplexity, init="pca",
                  random_state=seed).fit_transform(z)
    fig, ax = plt.subplots(figsize=(5, 5), dpi=FIGURE_DPI)
    for label in np.unique(y):
        ax.scatter(*xy[y == label].T, s=2, color=plt.cm.tab10(int(label) % 10), label=str(label))
    ax.legend(markerscale=4, fontsize=7, loc="best")
    ax.set(title=fit_title(f"{title}: t-SNE of {len(z):,} test codes", 5), xticks=[],
           yticks=[])
    return fig


def image_mosaic(rows, image_shape, pad=1):
    """rows: list of (n, C*H*W) tensors -> one (R*(H+pad), n*(W+pad)[, C]) array in which
    row r, column i shows image i of rows[r]; pad pixels of 1 (white) separate images."""
    channels, height, width = image_shape
    grid = np.ones((len(rows) * (height + pad), len(rows[0]) * (width + pad), channels))
    for r, images in enumerate(rows):
        images = images.detach().cpu().numpy().reshape(-1, channels, height, width)
        for i, image in enumerate(images):
            top, left = r * (height + pad), i * (width + pad)
            grid[top:top + height, left:left + width] = image.transpose(1, 2, 0)
    return grid[..., 0] if channels == 1 else grid


def plot_mosaic(rows, image_shape, title):
    plt = pyplot()
    grid = image_mosaic(rows, image_shape)
    height, width = grid.shape[:2]
    fig, ax = plt.subplots(figsize=(INCHES_PER_PIXEL * width,
                                    INCHES_PER_PIXEL * height + TITLE_INCHES), dpi=MOSAIC_DPI)
    ax.imshow(np.clip(grid, 0, 1), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set(title=fit_title(title, INCHES_PER_PIXEL * width), xticks=[], yticks=[])
    fig.tight_layout()
    return fig


def decoded_images(p_x_given_z):
    """The decoder's mean (pixel probabilities, as in Fig. 5), or a sample where the decoder
    has no mean in closed form (autoregressive PixelCNN)."""
    try:
        return p_x_given_z.mean
    except NotImplementedError:
        return p_x_given_z.sample()


@torch.no_grad()
def plot_reconstructions(model, x, image_shape, title):
    """Fig. 5: images x (n, D) on top; below, the decoder's image of one z ~ q(z|x)."""
    xhat = decoded_images(model.p_x_given_z(model.q_z_given_x(x).sample()))
    return plot_mosaic([x, xhat], image_shape, f"{title}: test images (top), reconstructions")


@torch.no_grad()
def plot_samples(model, image_shape, title, grid=SAMPLE_GRID):
    """The decoder's images of z ~ p(z), in a rows x columns grid."""
    rows, columns = grid
    images = decoded_images(model.p_x_given_z(model.p_z().sample((rows * columns,))))
    return plot_mosaic(list(images.split(columns)), image_shape, f"{title}: z ~ p(z)")


# The panels of training.png: (title, unit, {log.csv column: its label}); a column
# ending in "_" stands for every column that starts with it (one per latent group).
TRAINING_PANELS = (
    ("loss", "nats", {"train_loss": "train (warm-up weights)",
                      "val_loss": "validation (full weights)"}),
    ("MI (minibatch), validation", "nats", {"val_mi_batch": "estimate"}),
    ("active units, validation", "units", {"val_au_": ""}),
    ("5-NN accuracy, encoder means", "fraction", {"val_knn5_mean": "validation"}),
)
PANEL_LIMITS = {"units": {"bottom": 0}, "fraction": {"bottom": 0, "top": 1}}   # by unit


def training_figure(log_csv, title, fmt="png"):
    """training.png (or .pdf, .svg: fmt) from a run's log.csv, as file contents (None if
    it has no rows): each panel of TRAINING_PANELS that the log has, against the epoch."""
    with open(log_csv) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    panels = []
    for name, unit, columns in TRAINING_PANELS:
        lines = {k: label or k[len(c):] for c, label in columns.items() for k in rows[0]
                 if k == c or (c.endswith("_") and k.startswith(c))}
        if lines:
            panels.append((name, unit, lines))
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator
    epochs = [int(r["epoch"]) for r in rows]
    with plt.rc_context({"font.size": FIGURE_FONT}):
        fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.8),
                                 squeeze=False, dpi=FIGURE_DPI)
        for ax, (name, unit, lines) in zip(axes.flat, panels):
            for key, label in lines.items():
                ax.plot(epochs, [float(r[key]) if r[key] else np.nan for r in rows],
                        marker=".", label=label)
            ax.set(title=name, xlabel="epoch", ylabel=unit)
            ax.set_ylim(**PANEL_LIMITS.get(unit, {}))
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if unit == "units":
                ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.legend(fontsize=9)
        fig.suptitle(f"{title}: training curves")
        fig.tight_layout()
        return figure_bytes(fig, fmt)


def run_figures(model, data, title, fmt="png"):
    """The figures of one trained model, {file name: contents of format fmt}: Fig. 1 for
    2-D toy models, Fig. 12 for 1-D ones, otherwise a t-SNE of the test codes (Fig. 7-8)
    and, for images, grids of reconstructions (Fig. 5) and samples."""
    model.eval()
    one_level = len(model.latent_groups) == 1
    if data.x_dim == 2 and one_level and model.z_dim == 2:
        figures = {"fig1": plot_toy2d(model.cpu(), data.to("cpu"), title)}
    elif data.x_dim == 1 and one_level and model.z_dim == 1:
        figures = {"consistency": plot_consistency_1d(model.cpu(), data.to("cpu"), title)}
    else:
        x = data.x_test[:TSNE_POINTS]
        figures = {"tsne": plot_tsne(encode(model, x).cpu(), data.y_test[:TSNE_POINTS].cpu(),
                                     title)}
        if data.image_shape is not None:
            figures["reconstructions"] = plot_reconstructions(model, x[:RECON_COLUMNS],
                                                              data.image_shape, title)
            figures["samples"] = plot_samples(model, data.image_shape, title)
    return {f"{name}.{fmt}": figure_bytes(fig, fmt) for name, fig in figures.items()}
