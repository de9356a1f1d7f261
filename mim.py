"""The Mutual Information Machine (MIM): a reference implementation in one file.

Livne, Swersky & Fleet, "MIM: Mutual Information Machine", arXiv:1910.03175.
Equation, algorithm and section numbers below refer to that paper.

Notation
--------
    paper               code                          shape / meaning
    x, z                x, z                          (B, D) data, (B, Z) latent codes
    P(x)                the training set              data anchor, known only through samples
    P(z)                model.P_z()                   latent anchor N(0, I)
    q(z|x)              model.q_z_given_x(x)          encoder
    p(x|z)              model.p_x_given_z(z)          decoder
    p(z)                model.p_z()                   latent prior (--prior: normal = P(z), mog)
    q(x)                model.q_x()                   data prior (--q-x: marginal, Eq. 16; mog)
    q(x,z)              log_q_xz = log q(z|x)q(x)     model encoding distribution
    p(x,z)              log_p_xz = log p(x|z)p(z)     model decoding distribution
    M_S                 D_enc + D_dec                 1/2 (q(z|x)P(x) + p(x|z)P(z)), Eq. 4
    M_theta             -                             1/2 (q(x,z) + p(x,z))
    L_MIM               mim_loss                      1/2 (CE(M_S, q(x,z)) + CE(M_S, p(x,z))), Eq. 8
    L_CE                ce_loss                       CE(M_S, M_theta), Eq. 7
    L_A-MIM             amim_loss                     Eq. 8 with M_S^q = q(z|x)P(x) only, Eq. 12
    L_VAE               vae_loss                      negative ELBO, Eq. 2 / 26

All log-densities are normalized and in nats. Each objective is a pure function
`(model, x, weights) -> (loss, stats)`; `train` fits a model with Adam, warm-up and
early stopping; `main` is the command line:

    python mim.py --data toy2d --loss mim --hidden 50 --out runs/mim

The file imports only the standard library and torch, so it can be copied alone; `main`
also uses datasets.py and evaluate.py from this repository.
"""
import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributions as D
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------

# Scales are softplus(raw) + STD_FLOOR. MIM drives the encoder towards a deterministic map,
# and without a floor log q(z|x) grows without bound. The authors' code uses
# exp(raw) + 1e-6 (--min-logvar 6); 1e-4 keeps float32 sampling well resolved and is far
# below the nearest-neighbour spacing that KSG can see in 10,000 points.
STD_FLOOR = 1e-4
VALIDATION_SEED = 12345  # fixed noise for validation losses, so epochs compare fairly


def _help(text, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass
class Config:
    data: str = _help("data set: toy2d, toy20d, toy1d (datasets.py)", default="toy2d")
    data_seed: int = _help("seed of the fixed train/validation/test samples", default=0)
    arch: str = _help("network architecture: mlp (Sec. 5.1)", default="mlp")
    hidden: int = _help("hidden units of each two-layer network", default=50)
    activation: str = _help("hidden activation: tanh (Sec. 5.1) or silu (App. F.2)",
                            default="tanh")
    z_dim: int = _help("latent dimension", default=2)
    prior: str = _help("latent prior p(z): normal (= the anchor P(z)) or mog", default="normal")
    q_x: str = _help("data prior q(x): marginal (Eq. 16) or mog (explicit, low-dim x)",
                     default="marginal")
    components: int = _help("components of each mog prior", default=10)
    std_floor: float = _help("floor added to every Gaussian standard deviation",
                             default=STD_FLOOR)
    loss: str = _help("objective: mim (Eq. 8), amim (Eq. 12), vae (negative ELBO) or ce "
                      "(Eq. 7)", default="mim")
    warmup: int = _help("warm-up epochs (Sec. 5)", default=3)
    warmup_mode: str = _help("paper: weight on CE(M_S, p(x,z)) rises 0 -> 1/2 (Sec. 5); "
                             "authors: their code's schedule (see warmup_weights)",
                             default="paper")
    patience: Optional[int] = _help("early-stopping patience in epochs (default: --warmup, "
                                    "at least 1)", default=None)
    epochs: int = _help("maximum number of epochs", default=200)
    batch_size: int = _help("data points per step (B encoder + B decoder samples)",
                            default=128)
    lr: float = _help("Adam learning rate", default=1e-3)
    seed: int = _help("seed of initialisation and sampling", default=1)
    device: str = _help("auto, cpu or cuda", default="auto")
    nll_samples: int = _help("importance samples per test point for the test NLL",
                             default=1000)
    out: Optional[str] = _help("directory for config.json, log.csv, best.pt, results.json",
                               default=None)


class UsageError(Exception):
    """Bad input: reported as one line, exit status 2."""


# ----------------------------------------------------------------------------------------
# Distributions: normalized log-densities in nats, reparameterized where possible
# ----------------------------------------------------------------------------------------

def diag_gaussian(loc, scale):
    """N(loc, diag(scale^2)) over the last dimension: rsample and log_prob (sums over dims)."""
    return D.Independent(D.Normal(loc, scale, validate_args=False), 1)


def bernoulli(logits):
    """Independent Bernoulli variables over the last dimension, parameterized by logits."""
    return D.Independent(D.Bernoulli(logits=logits, validate_args=False), 1)


def positive_scale(raw, floor):
    return F.softplus(raw) + floor


class StandardNormal(nn.Module):
    """The anchor P(z) = N(0, I); with --prior normal also the model prior p(z) = P(z)."""

    def __init__(self, dim):
        super().__init__()
        self.register_buffer("loc", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    def forward(self):
        return diag_gaussian(self.loc, self.scale)


class MixtureOfGaussians(nn.Module):
    """A learnable mixture of K diagonal Gaussians, log-density by logsumexp.

    Used for p(z) and for an explicit q(x) on low-dimensional x. Its samples are not
    reparameterized (the component draw is discrete); no objective needs them to be,
    since samples come from the anchors and the conditionals.
    """

    def __init__(self, dim, components, init_loc=None, init_scale=1.0, floor=STD_FLOOR):
        super().__init__()
        loc = torch.randn(components, dim) if init_loc is None else init_loc.clone()
        raw = torch.log(torch.expm1(torch.as_tensor(init_scale) - floor))  # softplus^-1
        self.logits = nn.Parameter(torch.zeros(components))              # (K,)
        self.loc = nn.Parameter(loc.float())                              # (K, dim)
        self.raw_scale = nn.Parameter(raw.float().expand(components, dim).clone())
        self.floor = floor

    def forward(self):
        components = diag_gaussian(self.loc, positive_scale(self.raw_scale, self.floor))
        weights = D.Categorical(logits=self.logits, validate_args=False)
        return D.MixtureSameFamily(weights, components, validate_args=False)


# ----------------------------------------------------------------------------------------
# Networks (Sec. 5.1): two fully connected layers returning a distribution
# ----------------------------------------------------------------------------------------

ACTIVATIONS = {"tanh": nn.Tanh, "silu": nn.SiLU}


def two_layer_mlp(in_dim, out_dim, hidden, activation):
    return nn.Sequential(nn.Linear(in_dim, hidden), ACTIVATIONS[activation](),
                         nn.Linear(hidden, out_dim))


class GaussianMLP(nn.Module):
    """v -> N(mean(v), diag(std(v)^2)), used for q(z|x) and for p(x|z) on continuous x."""

    def __init__(self, in_dim, out_dim, hidden, activation="tanh", floor=STD_FLOOR):
        super().__init__()
        self.net = two_layer_mlp(in_dim, 2 * out_dim, hidden, activation)
        self.floor = floor

    def forward(self, v):                                   # (B, in_dim)
        loc, raw = self.net(v).chunk(2, dim=-1)             # (B, out_dim) each
        return diag_gaussian(loc, positive_scale(raw, self.floor))


class BernoulliMLP(nn.Module):
    """z -> independent Bernoulli(logits(z)), the decoder p(x|z) on binary x."""

    def __init__(self, in_dim, out_dim, hidden, activation="tanh", floor=STD_FLOOR):
        super().__init__()
        self.net = two_layer_mlp(in_dim, out_dim, hidden, activation)

    def forward(self, z):                                   # (B, Z)
        return bernoulli(self.net(z))                       # over (B, D)


DECODERS = {False: GaussianMLP, True: BernoulliMLP}        # keyed by "is x binary"


# ----------------------------------------------------------------------------------------
# The model: encoder, decoder, priors and the latent anchor
# ----------------------------------------------------------------------------------------

class Model(nn.Module):
    """q(z|x), p(x|z), p(z), q(x) (None for the marginal of Eq. 16) and the anchor P(z)."""

    def __init__(self, q_z_given_x, p_x_given_z, p_z, q_x, z_dim):
        super().__init__()
        self.q_z_given_x = q_z_given_x
        self.p_x_given_z = p_x_given_z
        self.p_z = p_z
        self.q_x = q_x
        self.P_z = StandardNormal(z_dim)

    def log_p_z(self, z):                                   # (B, Z) -> (B,)
        return self.p_z().log_prob(z)


def data_mixture(cfg, x_dim, x_init):
    """An explicit q(x); its components start on random points of x_init (N, D), if given,
    with the data's spread."""
    if x_init is None:
        return MixtureOfGaussians(x_dim, cfg.components, floor=cfg.std_floor)
    pick = torch.randperm(len(x_init))[:cfg.components]
    return MixtureOfGaussians(x_dim, cfg.components, init_loc=x_init[pick].cpu(),
                              init_scale=x_init.std(0).cpu(), floor=cfg.std_floor)


PRIORS = {
    "normal": lambda cfg: StandardNormal(cfg.z_dim),
    "mog": lambda cfg: MixtureOfGaussians(cfg.z_dim, cfg.components, floor=cfg.std_floor),
}

DATA_PRIORS = {
    "marginal": lambda cfg, x_dim, x_init: None,
    "mog": data_mixture,
}


def build_mlp(cfg, x_dim, binary):
    encoder = GaussianMLP(x_dim, cfg.z_dim, cfg.hidden, cfg.activation, cfg.std_floor)
    decoder = DECODERS[binary](cfg.z_dim, x_dim, cfg.hidden, cfg.activation, cfg.std_floor)
    return encoder, decoder


ARCHS = {"mlp": build_mlp}


def build_model(cfg, x_dim, binary=False, x_init=None):
    """The model that `cfg` names, for x of x_dim dimensions (binary or continuous)."""
    if cfg.q_x == "mog" and binary:
        raise UsageError("--q-x mog is a density on continuous x; use --q-x marginal "
                         "for binary data")
    encoder, decoder = ARCHS[cfg.arch](cfg, x_dim, binary)
    return Model(encoder, decoder, PRIORS[cfg.prior](cfg),
                 DATA_PRIORS[cfg.q_x](cfg, x_dim, x_init), cfg.z_dim)


# ----------------------------------------------------------------------------------------
# Samples from M_S and the model log-densities on them (Sec. 4, Algorithms 1 and 2)
# ----------------------------------------------------------------------------------------

def log_q_x(model, x, z_is, q_z_given_x):
    """log q(x) at x (B, D), given the encoder q(z|x) and a sample z_is ~ q(z|x).

    An explicit q(x) is evaluated exactly. For the marginal q(x) = E_p(z)[p(x|z)] (Eq. 16)
    this is the one-sample importance-sampling bound of Sec. 4.2 and App. D.1,
        log q(x) >= log p(x|z_is) + log p(z_is) - log q(z_is|x),
    so the objectives that use it are upper bounds of the ones they estimate.
    """
    if model.q_x is not None:
        return model.q_x().log_prob(x)
    return (model.p_x_given_z(z_is).log_prob(x) + model.log_p_z(z_is)
            - q_z_given_x.log_prob(z_is))


def encoder_samples(model, x):
    """D_enc: z ~ q(z|x) for data x ~ P(x). Returns log q(x,z), log p(x,z), each (B,).

    With the marginal q(x), the importance sample is z itself (Algorithm 2, line 3), so
    log q(x,z) becomes log p(x,z) and the encoder's entropy term cancels exactly.
    """
    q_z_given_x = model.q_z_given_x(x)
    z = q_z_given_x.rsample()                                           # (B, Z)
    log_q_xz = q_z_given_x.log_prob(z) + log_q_x(model, x, z, q_z_given_x)
    log_p_xz = model.p_x_given_z(z).log_prob(x) + model.log_p_z(z)
    return log_q_xz, log_p_xz


def decoder_samples(model, n):
    """D_dec: x ~ p(x|z) for z ~ P(z), n of them (Algorithm 2, line 4).

    Returns log q(x,z), log p(x,z) and, when x is discrete and so cannot be
    reparameterized, log p(x|z) for the score-function estimator (else None).
    The marginal q(x) uses a fresh importance sample z' ~ q(z|x).
    """
    z = model.P_z().sample((n,))                                        # (n, Z)
    p_x_given_z = model.p_x_given_z(z)
    discrete = not p_x_given_z.has_rsample
    x = p_x_given_z.sample() if discrete else p_x_given_z.rsample()     # (n, D)
    q_z_given_x = model.q_z_given_x(x)
    z_prime = q_z_given_x.rsample()                                     # (n, Z)
    log_q_xz = q_z_given_x.log_prob(z) + log_q_x(model, x, z_prime, q_z_given_x)
    log_p_x_given_z = p_x_given_z.log_prob(x)
    log_p_xz = log_p_x_given_z + model.log_p_z(z)
    return log_q_xz, log_p_xz, (log_p_x_given_z if discrete else None)


def score_function_surrogate(f, log_prob):
    """Per-sample losses f (n,) of samples x ~ p(x) that carry no gradient path.

    Returns a surrogate with the value of f whose gradient is the score-function
    (REINFORCE) estimate of App. D.2 with a baseline b,
        grad f + (f - b) grad log p(x).
    b_i is the mean of the other samples' f_j (leave one out): it does not depend on x_i,
    so the estimate stays unbiased, and it removes the bulk of f from the noisy term.
    """
    n = f.shape[0]
    baseline = (f.sum() - f) / (n - 1) if n > 1 else torch.zeros_like(f)
    return f + (f - baseline).detach() * (log_prob - log_prob.detach())


def sample_m_s(model, x, with_decoder=True):
    """Samples of M_S for a batch x (B, D): `encoder_samples` and, if asked, as many
    `decoder_samples`: ((log q(x,z), log p(x,z)), (log q(x,z), log p(x,z), score) or None)."""
    return encoder_samples(model, x), decoder_samples(model, len(x)) if with_decoder else None


def average_over_m_s(f, enc, dec):
    """Mean over D = D_enc + D_dec of the per-sample losses f(log q(x,z), log p(x,z)).
    Discrete decoder samples get the score-function term, so the gradient stays unbiased."""
    losses = [f(*enc)]
    if dec is not None:
        log_q_xz, log_p_xz, score = dec
        f_dec = f(log_q_xz, log_p_xz)
        losses.append(f_dec if score is None else score_function_surrogate(f_dec, score))
    return torch.cat(losses).mean()


def cross_entropy_stats(enc, dec):
    """Monitoring values over the samples: CE(M, q(x,z)), CE(M, p(x,z)) and their mean,
    which is Eq. 8 at full weights."""
    halves = [enc] if dec is None else [enc, dec[:2]]
    ce_q = -torch.cat([h[0] for h in halves]).mean().item()
    ce_p = -torch.cat([h[1] for h in halves]).mean().item()
    return {"loss": 0.5 * (ce_q + ce_p), "ce_q": ce_q, "ce_p": ce_p}


# ----------------------------------------------------------------------------------------
# Objectives: (model, x, weights) -> (loss, stats). Losses in nats per sample.
# ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Weights:
    """Weights on the terms of the objectives; FULL gives them as the paper writes them."""
    q: float = 0.5                 # on log q(x,z): the first CE term of Eq. 8
    p: float = 0.5                 # on log p(x,z): the second (decoder) CE term of Eq. 8
    decoder_samples: bool = True   # include D_dec, the decoder half of M_S
    kl: float = 1.0                # VAE: on log q(z|x) - log p(z)


FULL = Weights()


def mim_loss(model, x, w=FULL):
    """L_MIM of Eq. 8, 1/2 (CE(M_S, q(x,z)) + CE(M_S, p(x,z))), by Monte Carlo.

    A batch of B data points gives B encoder samples and B decoder samples: Algorithm 1
    with N = 2B, averaging -(log q(x,z) + log p(x,z)) / 2 over the N samples. With an
    explicit q(x) this is Algorithm 1; with the marginal q(x) it is Algorithm 2 (the
    importance-sampling bound of log q(x) in `log_q_x`).
    """
    enc, dec = sample_m_s(model, x, w.decoder_samples)
    loss = average_over_m_s(lambda log_q, log_p: -(w.q * log_q + w.p * log_p), enc, dec)
    return loss, cross_entropy_stats(enc, dec)


def amim_loss(model, x, w=FULL):
    """L_A-MIM of Eq. 12: Eq. 8 with encoder samples only, M_S^q = q(z|x)P(x).

    Eq. 13 shows why q(x) should be the marginal of Eq. 16: an explicit q(x) would be
    fitted independently of the encoder and decoder. (Eq. 13 as printed has 1/2 H_q(x,z);
    Eq. 12 expands to H_q(x,z) + 1/2 KL(P(x)||q(x)) + 1/2 KL(q(z|x)P(x)||p(x,z)), which
    test_mim.py checks.)
    """
    return mim_loss(model, x, dataclasses.replace(w, decoder_samples=False))


def mixture_cross_entropy(log_q, log_p, w_q=0.5, w_p=0.5):
    """-log(w_q q(x,z) + w_p p(x,z)) per sample, by logsumexp."""
    log_w = torch.log(torch.tensor([w_q, w_p], dtype=log_q.dtype, device=log_q.device))
    return -torch.logsumexp(torch.stack([log_q, log_p], dim=-1) + log_w, dim=-1)


def ce_loss(model, x, w=FULL):
    """L_CE of Eq. 7, CE(M_S, M_theta) = -E_M_S[log 1/2 (q(x,z) + p(x,z))] (App. F.2).

    Warm-up weights act as the mixture weights of M_theta (w.q = w.p = 1/2 is Eq. 7).
    """
    enc, dec = sample_m_s(model, x, w.decoder_samples)
    loss = average_over_m_s(lambda lq, lp: mixture_cross_entropy(lq, lp, w.q, w.p), enc, dec)
    with torch.no_grad():
        value = average_over_m_s(mixture_cross_entropy, enc, dec).item()
    return loss, {**cross_entropy_stats(enc, dec), "loss": value}


def vae_loss(model, x, w=FULL):
    """L_VAE: the negative ELBO, E_q(z|x)[-log p(x|z) + w.kl (log q(z|x) - log p(z))].

    With w.kl = 1 its expectation over P(x) is D_KL(q(z|x)P(x) || p(x|z)p(z)) + H(P(x)),
    Eq. 2 up to a constant; Eq. 15 writes the same loss (times 1/2) as cross-entropies.
    The KL term is a one-sample Monte Carlo estimate, valid for any prior p(z).
    """
    q_z_given_x = model.q_z_given_x(x)
    z = q_z_given_x.rsample()                                           # (B, Z)
    rec = -model.p_x_given_z(z).log_prob(x)                             # (B,)
    kl = q_z_given_x.log_prob(z) - model.log_p_z(z)                     # (B,)
    stats = {"loss": (rec + kl).mean().item(), "rec": rec.mean().item(), "kl": kl.mean().item()}
    return (rec + w.kl * kl).mean(), stats


LOSSES = {"mim": mim_loss, "amim": amim_loss, "vae": vae_loss, "ce": ce_loss}


# ----------------------------------------------------------------------------------------
# Warm-up (Sec. 5)
# ----------------------------------------------------------------------------------------

def warmup_weights(mode, progress, warmup):
    """Weights `progress` epochs into training (a float: 2.5 is halfway through epoch 3).

    paper:   Sec. 5 -- the weight on the second (decoder) CE term of Eq. 8 rises
             linearly from 0 to 1/2 over `warmup` epochs; the VAE's KL weight from 0 to 1.
    authors: the authors' code -- the weight on log q(z|x) + log q(x) steps up per epoch
             as min(1, epoch / warmup) (here scaled to 1/2, as in Eq. 8), and decoder
             samples join only once it reaches its full value.
    """
    if warmup <= 0:
        return FULL
    if mode == "paper":
        ramp = min(1.0, progress / warmup)
        return Weights(p=0.5 * ramp, kl=ramp)
    ramp = min(1.0, (math.floor(progress) + 1) / warmup)
    return Weights(q=0.5 * ramp, decoder_samples=ramp >= 1.0, kl=ramp)


WARMUP_MODES = ("paper", "authors")


# ----------------------------------------------------------------------------------------
# Training: Adam, warm-up, early stopping on the validation loss (Sec. 5)
# ----------------------------------------------------------------------------------------

def train_epoch(model, loss_fn, opt, x_train, cfg, epoch):
    """One pass over x_train (N, D) in shuffled batches; returns the mean stats."""
    model.train()
    n_batches = len(x_train) // cfg.batch_size           # drop the last partial batch
    order = torch.randperm(len(x_train), device=x_train.device)
    totals = {}
    for i in range(n_batches):
        x = x_train[order[i * cfg.batch_size:(i + 1) * cfg.batch_size]]
        w = warmup_weights(cfg.warmup_mode, epoch - 1 + i / n_batches, cfg.warmup)
        loss, stats = loss_fn(model, x, w)
        if not torch.isfinite(loss):
            raise UsageError(f"the loss became {loss.item()} in epoch {epoch}; "
                             "lower --lr or raise --std-floor")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for k, v in stats.items():
            totals[k] = totals.get(k, 0.0) + v / n_batches
    return totals


@torch.no_grad()
def validate(model, loss_fn, x_val, cfg):
    """Mean stats over x_val at the full (end-of-warm-up) weights, with fixed noise."""
    model.eval()
    devices = [torch.cuda.current_device()] if x_val.device.type == "cuda" else []
    totals = {}
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(VALIDATION_SEED)
        for x in x_val.split(cfg.batch_size):
            _, stats = loss_fn(model, x, FULL)
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v * len(x) / len(x_val)
    return totals


def log_line(row):
    """One line per epoch: train and validation loss with their terms, and seconds."""
    def terms(prefix):
        return " ".join(f"{k[len(prefix):]} {v:.4f}" for k, v in row.items()
                        if k.startswith(prefix) and k != prefix + "loss")
    print(f"epoch {row['epoch']:3d} | train {row['train_loss']:.4f} nats ({terms('train_')})"
          f" | val {row['val_loss']:.4f} nats ({terms('val_')}) | {row['seconds']:.2f} s",
          flush=True)


def train(model, cfg, x_train, x_val, on_epoch=log_line):
    """Fit `model`; returns (best state_dict, best epoch, epochs run, history).

    Early stopping: once warm-up is over, stop when the validation loss at full weights
    has not improved for `patience` epochs, and return the best weights.
    """
    loss_fn, patience = LOSSES[cfg.loss], cfg.patience
    patience = max(1, cfg.warmup) if patience is None else patience
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    best_loss, best_epoch, best_state, history = math.inf, 0, None, []
    for epoch in range(1, cfg.epochs + 1):
        start = time.perf_counter()
        train_stats = train_epoch(model, loss_fn, opt, x_train, cfg, epoch)
        val_stats = validate(model, loss_fn, x_val, cfg)
        if not math.isfinite(val_stats["loss"]):
            raise UsageError(f"the validation loss became {val_stats['loss']} in epoch "
                             f"{epoch}; lower --lr or raise --std-floor")
        row = {"epoch": epoch, **prefixed("train_", train_stats),
               **prefixed("val_", val_stats), "seconds": time.perf_counter() - start}
        history.append(row)
        on_epoch(row)
        if epoch >= cfg.warmup and val_stats["loss"] < best_loss:
            best_loss, best_epoch, best_state = val_stats["loss"], epoch, snapshot(model)
        elif epoch >= cfg.warmup and epoch - best_epoch >= patience:
            break
    if best_state is None:                    # warm-up never ended: keep the last weights
        best_epoch, best_state = epoch, snapshot(model)
    return best_state, best_epoch, epoch, history


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def prefixed(prefix, stats):
    return {prefix + k: v for k, v in stats.items()}


# ----------------------------------------------------------------------------------------
# Files: every write goes to a temporary file that is then renamed
# ----------------------------------------------------------------------------------------

def atomic_write(path, write):
    """Call write(file_path) on a temporary file next to `path`, then rename it."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
    atomic_write(path, write)


def write_csv(path, rows):
    keys = list(dict.fromkeys(k for row in rows for k in row))

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(",".join(keys) + "\n")
            for row in rows:
                f.write(",".join(format_value(row.get(k, "")) for k in keys) + "\n")
    atomic_write(path, write)


def format_value(v):
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def save_checkpoint(path, model, cfg, data_info):
    """state_dict + config + data shape: all that `load_checkpoint` needs."""
    state = {"config": dataclasses.asdict(cfg), "data": data_info,
             "model": {k: v.cpu() for k, v in model.state_dict().items()}}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path, device="cpu"):
    """(model, cfg) from a checkpoint written by `save_checkpoint`."""
    state = torch.load(path, map_location=device, weights_only=True)
    cfg = Config(**state["config"])
    model = build_model(cfg, state["data"]["x_dim"], state["data"]["binary"])
    model.load_state_dict(state["model"])
    return model.to(device), cfg


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------

CHOICES = {"arch": ARCHS, "activation": ACTIVATIONS, "prior": PRIORS, "q_x": DATA_PRIORS,
           "loss": LOSSES, "warmup_mode": WARMUP_MODES, "device": ("auto", "cpu", "cuda")}


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv=None):
    """A Config from command-line flags, one per field (--z-dim for z_dim)."""
    parser = OneLineParser(prog="mim.py", description=__doc__.split("\n")[0])
    for f in dataclasses.fields(Config):
        kind = {Optional[int]: int, Optional[str]: str}.get(f.type, f.type)
        choices = list(CHOICES[f.name]) if f.name in CHOICES else None
        parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default,
                            choices=choices, help=f.metadata["help"] +
                            (f" (default: {f.default})" if f.default is not None else ""))
    cfg = Config(**vars(parser.parse_args(argv)))
    for name in ("hidden", "z_dim", "components", "epochs", "batch_size", "nll_samples"):
        if getattr(cfg, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if cfg.lr <= 0 or cfg.std_floor <= 0 or cfg.warmup < 0:
        parser.error("--lr and --std-floor must be positive and --warmup not negative")
    return cfg


def choose_device(name):
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA device is visible; "
                         "use --device cpu")
    return torch.device("cuda" if name != "cpu" and torch.cuda.is_available() else "cpu")


def run(cfg):
    """Train and evaluate as `cfg` says; returns the results dict."""
    import datasets
    import evaluate

    device = choose_device(cfg.device)
    try:
        data = datasets.load_dataset(cfg.data, seed=cfg.data_seed)
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from None
    torch.manual_seed(cfg.seed)
    data = data.to(device)
    model = build_model(cfg, data.x_dim, data.binary, x_init=data.x_train).to(device)
    if cfg.out:
        os.makedirs(cfg.out, exist_ok=True)
        write_json(os.path.join(cfg.out, "config.json"), dataclasses.asdict(cfg))

    start = time.perf_counter()
    best_state, best_epoch, epochs, history = train(model, cfg, data.x_train, data.x_val)
    seconds = time.perf_counter() - start
    model.load_state_dict(best_state)
    results = {**evaluate.test_metrics(model, data, cfg.nll_samples),
               "best_epoch": best_epoch, "epochs": epochs, "train_seconds": seconds}
    if cfg.out:
        data_info = {"x_dim": data.x_dim, "binary": data.binary}
        save_checkpoint(os.path.join(cfg.out, "best.pt"), model, cfg, data_info)
        write_csv(os.path.join(cfg.out, "log.csv"), history)
        write_json(os.path.join(cfg.out, "results.json"), results)
    return results


def main(argv=None):
    cfg = parse_args(argv)
    try:
        results = run(cfg)
    except UsageError as e:
        print(f"mim.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    import evaluate
    print(evaluate.format_results(results))


if __name__ == "__main__":
    main()
