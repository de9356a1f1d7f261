"""The Mutual Information Machine (MIM): a reference implementation in one file.

Livne, Swersky & Fleet, "MIM: Mutual Information Machine", arXiv:1910.03175. Equation,
algorithm, section and appendix numbers (App.) refer to that paper. The file follows its
order in numbered parts: the distributions, the model, the samples of Algorithms 1 and 2,
the objectives, the variants of the decoder samples, warm-up and training; then the
networks, the other remedies for posterior collapse, models from specs, the CPU speed-ups
(opt-in) and checkpoints. It imports only the standard library and torch, does nothing
on import and changes nothing in the process: copied alone, it is the whole library.

Paper to code
-------------
    paper                                   code
    Sec. 3    x, z                          x (B, D) data, z (B, Z) latent codes
              P(x), P(z) = N(0, I)          the training set; Model.anchor_z (the
                                            latent anchor P(z))
              q(z|x), p(x|z)                Model.q_z_given_x, Model.p_x_given_z
              p(z)                          Model.p_z(), log_p_z; PRIORS: normal, mog,
                                            vamp (VampPrior, App. D.1)
              q(x)                          Model.q_x: None (the marginal of Eq. 16) or a
                                            mixture (q_x="mog")
              q(x,z), p(x,z)                log_q_xz = log q(z|x) q(x),
                                            log_p_xz = log p(x|z) p(z)
              z = (z1, z2), two levels      TwoLevel: q(z2|x) q(z1|x,z2), p(z2) p(z1|z2)
    Eq. 2     L_VAE, the negative ELBO      vae_loss
    Eq. 4     M_S = 1/2 (D_enc + D_dec)     encoder_samples, decoder_samples (Part 3)
    Eq. 7     L_CE = CE(M_S, M_theta)       ce_loss
    Eq. 8     L_MIM                         mim_loss
    Eq. 12    L_A-MIM                       amim_loss
    Eq. 16    q(x) = E_p(z)[p(x|z)]         log_q_x: its one-sample bound (Sec. 4.2,
                                            App. D.1)
    Alg. 1    MIM with an explicit q(x)     mim_loss on a model with q_x="mog"
    Alg. 2    MIM with the marginal q(x)    mim_loss, line by line (lines 2-5 and 7;
                                            `train` runs the loop)
    App. D.1  VampPrior p(z)                VampPrior (Part 9)
    App. D.2  gradient of binary decoder    score_function_surrogate (Part 3); the
              samples (score function)      variants, DecoderSampling, and their
                                            measured noise, gradient_noise (Part 5)
    Sec. 5    warm-up                       warmup_weights -> TermWeights on the terms
              Adam, early stopping          train(model, loss_fn, x_train, x_val, TrainSpec)
    Sec. 5.1  MLP encoder and decoder       Part 8: GaussianMLP, BernoulliMLP
    Sec. 5.2  convHVAE, PixelHVAE           Part 9: TwoLevelEncoder, ConvDecoder,
                                            PixelDecoder with PixelCNNBernoulli; VampPrior
    -         InfoMax-VAE, inference        Part 10: infomax_loss, critic_loss
              critics (for comparison)
    -         a model from a spec           Part 11: build_model(ModelSpec)
    -         CPU speed-ups, opt-in         Part 12: speed_up(model)
    -         checkpoints                   Part 13: save_checkpoint, load_checkpoint
    -         the command line              cli.py (python mim.py hands over to it)

Every log-density is normalized and in nats. Every objective is a pure function
`(model, x, weights) -> (loss, stats)`. The library needs only this file and torch:

    spec = ModelSpec(x_dim=2, z_dim=2, hidden=50)
    model = build_model(spec)
    best_state, best_epoch, epochs, history = train(model, mim_loss, x_train, x_val,
                                                    TrainSpec(epochs=50))
    save_checkpoint("model.pt", model, spec)        # load_checkpoint -> (model, extra)

The command line is cli.py, which needs datasets.py and evaluate.py from this repository
beside it; `python mim.py ...` hands over to it:

    python mim.py --data toy2d --loss mim --hidden 50 --out runs/mim
    python mim.py --data mnist --arch convhvae --prior vamp --loss mim --out runs/mnist
    python mim.py evaluate runs/mnist --nll-samples 5000
"""
import dataclasses
import functools
import math
import os
import secrets
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributions as D
import torch.nn as nn
import torch.nn.functional as F

# Scales are softplus(raw) + STD_FLOOR. MIM drives the encoder towards a deterministic map,
# and without a floor log q(z|x) grows without bound. The authors' code uses
# exp(raw) + 1e-6 (--min-logvar 6); 1e-4 keeps float32 sampling well resolved and is far
# below the nearest-neighbour spacing that KSG can see in 10,000 points.
STD_FLOOR = 1e-4
MEAN_SAMPLES = 64        # samples of z2 behind E[z1|x] and Var[z1|x] of two levels
VAMP_COMPONENTS = 500    # pseudo-inputs K of the VampPrior (Tomczak & Welling 2018)
MOG_COMPONENTS = 10      # components of a mixture p(z) or q(x) unless a spec says otherwise


# ----------------------------------------------------------------------------------------
# 1. Distributions: normalized log-densities in nats, reparameterized where possible
# ----------------------------------------------------------------------------------------

LOW_PRECISION = (torch.bfloat16, torch.float16)


def full_precision(t):
    """Network outputs are bf16 under autocast; every density is evaluated in float32 (or
    in the float64 of a model made .double())."""
    return t.float() if t.dtype in LOW_PRECISION else t


def diag_gaussian(loc, scale):
    """N(loc, diag(scale^2)) over the last dimension: rsample and log_prob (sums over dims)."""
    return D.Independent(D.Normal(full_precision(loc), full_precision(scale),
                                  validate_args=False), 1)


def bernoulli(logits, bound=None):
    """Independent Bernoulli variables over the last dimension, parameterized by logits,
    clipped to [-bound, bound] if a bound is given: still a normalized distribution, whose
    probabilities stay in [sigmoid(-bound), sigmoid(bound)] (the authors' code clamps them
    to [1e-5, 1 - 1e-5]; see ModelSpec.prob_clamp)."""
    logits = full_precision(logits)
    logits = logits if bound is None else logits.clamp(-bound, bound)
    return D.Independent(D.Bernoulli(logits=logits, validate_args=False), 1)


def positive_scale(raw, floor):
    return F.softplus(raw) + floor


def pairwise_log_prob(q_z_given_x, z):
    """log q(z_i | x_j) for every pair: an encoder distribution of batch (B_x,) and codes
    z (B_z, Z) give (B_x, B_z). The codes broadcast against the batch, so each x is encoded
    once (the inference critics' self-critic and the minibatch MI estimate)."""
    return q_z_given_x.log_prob(z.unsqueeze(-2)).T                     # (B_z, B_x) -> (B_x, B_z)


class StandardNormal(nn.Module):
    """The anchor P(z) = N(0, I); with prior="normal" also the model prior p(z) = P(z)."""

    def __init__(self, dim):
        super().__init__()
        self.register_buffer("loc", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    def forward(self, encoder=None):                        # priors may use the encoder
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

    def forward(self, encoder=None):
        components = diag_gaussian(self.loc, positive_scale(self.raw_scale, self.floor))
        weights = D.Categorical(logits=self.logits, validate_args=False)
        return D.MixtureSameFamily(weights, components, validate_args=False)


class TwoLevel(D.Distribution):
    """A distribution over z = (z1, z2) (..., Z1 + Z2) that factorizes as r(z2) r(z1|z2):
    the posterior q(z2|x) q(z1|x, z2) and the prior p(z2) p(z1|z2) of the two-level models.
    `top` is r(z2); `conditional(z2)` returns r(z1|z2) for z2 of any leading shape."""
    arg_constraints = {}

    def __init__(self, top, conditional, z1_dim):
        self.top, self.conditional, self.z1_dim = top, conditional, z1_dim
        event = torch.Size([z1_dim + top.event_shape[0]])
        super().__init__(top.batch_shape, event, validate_args=False)

    @property
    def has_rsample(self):
        return self.top.has_rsample

    def rsample(self, sample_shape=torch.Size()):
        z2 = self.top.rsample(sample_shape)                             # (..., B, Z2)
        return torch.cat([self.conditional(z2).rsample(), z2], dim=-1)  # (..., B, Z1 + Z2)

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            z2 = self.top.sample(sample_shape)
            return torch.cat([self.conditional(z2).sample(), z2], dim=-1)

    def log_prob(self, z):
        z1, z2 = z[..., :self.z1_dim], z[..., self.z1_dim:]
        return self.top.log_prob(z2) + self.conditional(z2).log_prob(z1)

    @property
    def mean(self):
        """E[z]: exact for z2; for z1 the conditional mean averaged over samples of z2."""
        with torch.no_grad():
            z2 = self.top.sample((MEAN_SAMPLES,))                       # (S, B, Z2)
            z1_mean = self.conditional(z2).mean.mean(0)                  # (B, Z1)
        return torch.cat([z1_mean, self.top.mean], dim=-1)

    @property
    def variance(self):
        """Var[z] by the law of total variance: exact for z2; for z1,
        E_z2[Var(z1|z2)] + Var_z2(E[z1|z2]) over samples of z2."""
        with torch.no_grad():
            z2 = self.top.sample((MEAN_SAMPLES,))                       # (S, B, Z2)
            z1 = self.conditional(z2)
            z1_variance = z1.variance.mean(0) + z1.mean.var(0, correction=0)  # (B, Z1)
        return torch.cat([z1_variance, self.top.variance], dim=-1)


# ----------------------------------------------------------------------------------------
# 2. The model (Sec. 3): encoder, decoder, priors and the latent anchor
# ----------------------------------------------------------------------------------------

def check_output(name, network, inputs, output):
    """A forward hook on Model's networks: their output keeps Model's contract."""
    if not isinstance(output, D.Distribution):
        problem = f"returned {type(output).__name__}, not a torch.distributions object"
    elif len(output.event_shape) != 1:
        problem = (f"returned event shape {tuple(output.event_shape)}, not one dimension "
                   "(wrap it in D.Independent(..., 1))")
    elif not output.has_rsample and not getattr(network, "discrete", False):
        problem = ("returned a distribution without rsample; for discrete x set the "
                   "decoder's attribute discrete = True")
    else:
        return
    raise TypeError(f"{name} {problem}; see mim.Model's docstring for what a network must "
                    "return")


class Model(nn.Module):
    """q(z|x), p(x|z), p(z), q(x) (None for the marginal of Eq. 16), the anchor P(z) and,
    for the objectives that train one, a critic network. `build_model` (Part 11)
    assembles one from a ModelSpec; any networks that keep this contract will do:

    - q_z_given_x: a module, x (B, D) -> a torch.distributions object over z (B, Z) with
      rsample() (reparameterized), sample() and log_prob(z) -> (B,); one event dimension
      (wrap elementwise ones in D.Independent(..., 1)).
    - p_x_given_z: a module, z (B, Z) -> the same over x (B, D); and an attribute
      `discrete`: False if its samples can be reparameterized (rsample), True for
      discrete x (Bernoulli), whose decoder samples use the score function (App. D.2).
    - prior: a module called with the encoder of the top latent (model.q_top, which a
      VampPrior uses and others ignore) -> p(z) with sample() and log_prob; or p(z2) of a
      two-level model (one with `p_z1_given_z2`), whose z = (z1, z2) has p(z) = p(z2)
      p(z1|z2) and the anchor P(z) = N(0, I) over both levels.
    - q_x: None, or a module called without arguments -> an explicit q(x).
    The networks' outputs are checked as they are made: a TypeError says what is wrong.
    """

    def __init__(self, q_z_given_x, p_x_given_z, prior, q_x, z_dim, p_z1_given_z2=None,
                 critic=None):
        super().__init__()
        if p_x_given_z is not None and not isinstance(getattr(p_x_given_z, "discrete", None),
                                                      bool):
            raise TypeError("p_x_given_z needs an attribute discrete = True (discrete x) or "
                            "False (reparameterized x); see mim.Model's docstring")
        for name, network in (("q_z_given_x", q_z_given_x), ("p_x_given_z", p_x_given_z)):
            if network is not None:                 # an encoder alone serves some measures
                network.register_forward_hook(functools.partial(check_output, name))
        self.q_z_given_x = q_z_given_x
        self.p_x_given_z = p_x_given_z
        self.prior = prior
        self.q_x = q_x
        self.p_z1_given_z2 = p_z1_given_z2
        self.critic = critic                                # infomax / critic-nn / -hybrid
        self.z_dim = z_dim
        if p_z1_given_z2 is None:
            self.latent_groups = {"z": (0, z_dim)}
        else:
            self.latent_groups = {"z1": (0, z_dim), "z2": (z_dim, 2 * z_dim)}
        self.anchor_z = StandardNormal(z_dim * len(self.latent_groups))

    def q_top(self, x):
        """The encoder of the top latent, q(z|x) or q(z2|x): what a VampPrior mixes."""
        if self.p_z1_given_z2 is None:
            return self.q_z_given_x(x)
        return self.q_z_given_x.q_z2_given_x(x)

    def p_z(self):
        top = self.prior(self.q_top)
        return top if self.p_z1_given_z2 is None else TwoLevel(top, self.p_z1_given_z2,
                                                                self.z_dim)

    def log_p_z(self, z):                                   # (B, Z) -> (B,)
        return self.p_z().log_prob(z)


@dataclass
class ModelSpec:
    """What `build_model` makes: the shape of x and the model's parts and sizes."""
    x_dim: int                              # dimensions of x (C * H * W for images)
    binary: bool = False                    # x in {0, 1}^D: Bernoulli decoders
    image_shape: Optional[tuple] = None     # (C, H, W): needed by convhvae and pixelhvae
    arch: str = "mlp"                       # ARCHS: mlp (Sec. 5.1), convhvae, pixelhvae
    z_dim: int = 2                          # latent units (of each level for two levels)
    hidden: int = 50                        # mlp: hidden units of each two-layer network
    activation: str = "tanh"                # mlp: ACTIVATIONS, tanh (Sec. 5.1) or silu
    prior: str = "normal"                   # PRIORS: p(z), or p(z2) of two levels
    prior_components: Optional[int] = None  # K of p(z): MOG_COMPONENTS, VAMP_COMPONENTS
    q_x: str = "marginal"                   # DATA_PRIORS: marginal (Eq. 16) or mog
    components: int = MOG_COMPONENTS        # of the mog q(x)
    std_floor: float = STD_FLOOR            # added to every Gaussian std of the MLPs
    critic: Optional[str] = None            # CRITICS: joint (InfoMax-VAE), separable,
                                            # hybrid (inference critics)
    init: str = "torch"                     # INITS: of the dense layers' weights
    prob_clamp: Optional[float] = None      # Bernoulli decoders: probabilities kept in
                                            # [c, 1 - c] (the authors' code: 1e-5)
    pseudo_init: str = "random"             # PSEUDO_INITS: start of a VampPrior's
                                            # pseudo-inputs on the training points

    def __post_init__(self):
        if self.image_shape is not None:
            self.image_shape = tuple(self.image_shape)     # JSON gives lists
        if self.prior_components is None:
            self.prior_components = default_prior_components(self.prior)


def default_prior_components(prior):
    """K of p(z) when not given: the VampPrior's 500 pseudo-inputs (Tomczak & Welling), or
    the mixture's components."""
    return VAMP_COMPONENTS if prior == "vamp" else MOG_COMPONENTS


# ----------------------------------------------------------------------------------------
# 3. Samples from M_S and the model log-densities on them (Sec. 4, Algorithms 1 and 2)
# ----------------------------------------------------------------------------------------

DRAWS_PER_CODE = 4       # images per code of discrete x (RESULTS.md, "Images: making
                         # MIM and A-MIM learn ...", measures 2, 4 and 8)


@dataclass(frozen=True)
class TermWeights:
    """Weights on the terms of the objectives; FULL gives them as the paper writes them.
    The warm-up schedules (`warmup_weights`) move them towards FULL."""
    q: float = 0.5                 # on log q(x,z): the first CE term of Eq. 8
    p: float = 0.5                 # on log p(x,z): the second (decoder) CE term of Eq. 8
    decoder_samples: bool = True   # include D_dec, the decoder half of M_S
    kl: float = 1.0                # VAE: on log q(z|x) - log p(z)
    prior: float = 1.0             # beta on log p(z) wherever it appears: p(z) of one
                                   # level, p(z2) of two (p(z1|z2) keeps weight 1)
    top_prior: float = 1.0         # beta on log p(z2) of two-level models only (authors)


FULL = TermWeights()


def log_prior(p_z, z, w=FULL):
    """The warm-up's weighted log p(z), (B,): w.prior times log p(z) of one level; of a
    two-level prior p(z2) p(z1|z2), w.prior * w.top_prior times log p(z2) and log p(z1|z2)
    at full weight. Keeping log p(z1|z2) is what makes z2 carry information early on: with
    it weighted too, z2 stayed unused and z1 collapsed (RESULTS.md, "Images: making MIM
    and A-MIM learn informative codes")."""
    if not isinstance(p_z, TwoLevel):
        return w.prior * p_z.log_prob(z)
    z1, z2 = z[..., :p_z.z1_dim], z[..., p_z.z1_dim:]
    return w.prior * w.top_prior * p_z.top.log_prob(z2) + p_z.conditional(z2).log_prob(z1)


def log_q_x(model, x, z_is, q_z_given_x, p_z, w=FULL):
    """log q(x) at x (B, D), given the encoder q(z|x), a sample z_is ~ q(z|x) and p(z).

    An explicit q(x) is evaluated exactly. For the marginal q(x) = E_p(z)[p(x|z)] (Eq. 16)
    this is the one-sample importance-sampling bound of Sec. 4.2 and App. D.1,
        log q(x) >= log p(x|z_is) + log p(z_is) - log q(z_is|x),
    so the objectives that use it are upper bounds of the ones they estimate. The
    warm-up weight on log p(z) applies inside it too.
    """
    if model.q_x is not None:
        return model.q_x().log_prob(x)
    return (model.p_x_given_z(z_is).log_prob(x) + log_prior(p_z, z_is, w)
            - q_z_given_x.log_prob(z_is))


def encoder_samples(model, x, p_z, w=FULL):
    """D_enc: z ~ q(z|x) for data x ~ P(x). Returns log q(x,z), log p(x,z), each (B,).

    With the marginal q(x), the importance sample is z itself (Algorithm 2, line 3), so
    log q(x,z) = log q(z|x) + log p(x,z) - log q(z|x) = log p(x,z): the encoder's entropy
    term cancels exactly, and the decoder runs once.
    """
    q_z_given_x = model.q_z_given_x(x)
    z = q_z_given_x.rsample()                                           # (B, Z)
    log_p_xz = model.p_x_given_z(z).log_prob(x) + log_prior(p_z, z, w)
    if model.q_x is None:
        return log_p_xz, log_p_xz
    return q_z_given_x.log_prob(z) + model.q_x().log_prob(x), log_p_xz


def decoder_samples(model, n, p_z, w=FULL, draws=DRAWS_PER_CODE, anchor=None):
    """D_dec: x ~ p(x|z) for z ~ P(z), n of them (Algorithm 2, line 4).

    Returns log q(x,z), log p(x,z) and, when x is discrete and so cannot be
    reparameterized, (log p(x|z), draws) for the score-function estimator (else None).
    The marginal q(x) uses a fresh importance sample z' ~ q(z|x). For discrete x, n //
    draws codes give `draws` images each, ordered (draws, codes) as
    `score_function_surrogate` expects. The codes carry no gradient path; `anchor`, a
    distribution to draw them from instead of P(z), serves the variants of Part 5.
    """
    discrete = model.p_x_given_z.discrete
    draws = draws if discrete else 1
    codes = max(1, n // draws)             # the remainder of n that draws leaves is dropped
    anchor = model.anchor_z() if anchor is None else anchor
    z = anchor.sample((codes,)).repeat(draws, 1)                        # (n, Z)
    p_x_given_z = model.p_x_given_z(z)
    x = p_x_given_z.sample() if discrete else p_x_given_z.rsample()     # (n, D)
    q_z_given_x = model.q_z_given_x(x)
    z_prime = q_z_given_x.rsample()                                     # (n, Z)
    log_q_xz = q_z_given_x.log_prob(z) + log_q_x(model, x, z_prime, q_z_given_x, p_z, w)
    log_p_x_given_z = p_x_given_z.log_prob(x)
    log_p_xz = log_p_x_given_z + log_prior(p_z, z, w)
    score = (log_p_x_given_z, draws) if discrete else None
    return log_q_xz, log_p_xz, score


def score_function_surrogate(f, log_prob, draws=1):
    """Per-sample losses f (n,) of samples x ~ p(x|z) that carry no gradient path.

    Returns a surrogate with the value of f whose gradient is the score-function
    (REINFORCE) estimate of App. D.2 with a baseline b,
        grad f + (f - b) grad log p(x|z).
    b of a sample is a mean of other samples' f (leave one out): it does not depend on
    that sample's x, so the estimate stays unbiased. draws = 1: one image per code, b is
    the mean over the rest of the batch, which removes the bulk of f. draws > 1: the n
    samples are ordered (draws, n // draws), each column one code, and b is the mean of
    the other images of the same code; this also removes the part of f that varies with
    z, by far the largest part once the encoder is sharp.
    """
    columns = f.view(draws, -1) if draws > 1 else f.view(-1, 1)         # (draws, codes)
    m = columns.shape[0]
    baseline = (columns.sum(0) - columns) / (m - 1) if m > 1 else torch.zeros_like(columns)
    return f + (f - baseline.reshape(-1)).detach() * (log_prob - log_prob.detach())


def sample_m_s(model, x, w=FULL, draw_dec=decoder_samples):
    """Samples of M_S for a batch x (B, D): `encoder_samples` and, if w asks for them, as
    many decoder samples from draw_dec (`decoder_samples`, or a variant of Part 5):
    ((log q(x,z), log p(x,z)), (log q(x,z), log p(x,z), score) or None). p(z) is built
    once: a VampPrior encodes its pseudo-inputs once per step."""
    p_z = model.p_z()
    return (encoder_samples(model, x, p_z, w),
            draw_dec(model, len(x), p_z, w) if w.decoder_samples else None)


def average_over_m_s(f, enc, dec):
    """Mean over M_S = 1/2 (D_enc + D_dec) of the per-sample losses f(log q(x,z),
    log p(x,z)): each half averaged on its own, so the halves weigh 1/2 each whatever
    their sizes. Discrete decoder samples get the score-function term, so the gradient
    stays unbiased."""
    f_enc = f(*enc).mean()
    return f_enc if dec is None else 0.5 * (f_enc + decoder_sample_loss(f, dec))


def decoder_sample_loss(f, dec):
    """Mean of f over D_dec, with the score-function term for discrete samples."""
    log_q_xz, log_p_xz, score = dec
    f_dec = f(log_q_xz, log_p_xz)
    return (f_dec if score is None else score_function_surrogate(f_dec, *score)).mean()


def cross_entropy_stats(enc, dec):
    """Monitoring values over the samples: CE(M, q(x,z)), CE(M, p(x,z)) and their mean,
    which is Eq. 8 at full weights. Like every objective's stats, 0-dim tensors with no
    gradient: reading one (float) waits for the device, which `train` does once an epoch."""
    halves = [enc] if dec is None else [enc, dec[:2]]
    ce_q = -sum(h[0].detach().mean() for h in halves) / len(halves)
    ce_p = -sum(h[1].detach().mean() for h in halves) / len(halves)
    return {"loss": 0.5 * (ce_q + ce_p), "ce_q": ce_q, "ce_p": ce_p}


# ----------------------------------------------------------------------------------------
# 4. Objectives: (model, x, weights) -> (loss, stats). Losses in nats per sample.
# ----------------------------------------------------------------------------------------

def mim_loss(model, x, w=FULL, draw_dec=decoder_samples):
    """L_MIM of Eq. 8, 1/2 (CE(M_S, q(x,z)) + CE(M_S, p(x,z))), by Algorithm 2 line by
    line (Algorithm 1 where q(x) is explicit); `train` runs its loop and steps.

    A batch of B data points gives B encoder and B decoder samples, and each half is
    averaged on its own. With the marginal q(x), log q(x) is the importance-sampling
    bound of `log_q_x`, so log q(x,z) = log p(x,z) on encoder samples. Warm-up weights
    w scale the two CE terms (w = FULL: 1/2 each). draw_dec: `decoder_samples`, or a
    variant of Part 5.
    """
    def ce(log_q_xz, log_p_xz):                                         # (B,)
        return -(w.q * log_q_xz + w.p * log_p_xz)

    # 1: while not converged do -- `train` calls this once per batch
    p_z = model.p_z()                   # a VampPrior encodes its pseudo-inputs once a step
    # 2: D_enc <- {x_i, z_i ~ q(z|x) P(x)}
    enc = encoder_samples(model, x, p_z, w)
    # 3: L_enc <- -1/N sum_i (log p(x_i|z_i) + log p(z_i))   [ce at w = FULL, since
    #    log q(x,z) = log p(x,z) on encoder samples]
    loss_enc = ce(*enc).mean()
    if not w.decoder_samples:           # A-MIM (Eq. 12), or a warm-up without D_dec
        return loss_enc, cross_entropy_stats(enc, None)
    # 4: D_dec <- {x_i, z_i, z'_i ~ p(x|z) P(z) q(z'|x)}
    dec = draw_dec(model, len(x), p_z, w)
    # 5: L_dec <- -1/2N sum_i (log q(z_i|x_i) + log p(x_i|z_i) + log p(z_i)
    #                          + log p(x_i|z'_i) + log p(z'_i) - log q(z'_i|x_i))
    loss_dec = decoder_sample_loss(ce, dec)
    # 6-7: minimize: delta theta ~ -grad_theta 1/2 (L_enc + L_dec) -- `train` steps on it
    return 0.5 * (loss_enc + loss_dec), cross_entropy_stats(enc, dec)


def amim_loss(model, x, w=FULL, draw_dec=decoder_samples):
    """L_A-MIM of Eq. 12: Eq. 8 with encoder samples only, M_S^q = q(z|x)P(x).

    Eq. 13 shows why q(x) should be the marginal of Eq. 16: an explicit q(x) would be
    fitted independently of the encoder and decoder. (Eq. 13 as printed has 1/2 H_q(x,z);
    Eq. 12 expands to H_q(x,z) + 1/2 KL(P(x)||q(x)) + 1/2 KL(q(z|x)P(x)||p(x,z)), which
    test_mim.py checks.)
    """
    return mim_loss(model, x, dataclasses.replace(w, decoder_samples=False), draw_dec)


def mixture_cross_entropy(log_q, log_p, w_q=0.5, w_p=0.5):
    """-log(w_q q(x,z) + w_p p(x,z)) per sample, by logsumexp."""
    log_w = torch.log(torch.tensor([w_q, w_p], dtype=log_q.dtype, device=log_q.device))
    return -torch.logsumexp(torch.stack([log_q, log_p], dim=-1) + log_w, dim=-1)


def ce_loss(model, x, w=FULL, draw_dec=decoder_samples):
    """L_CE of Eq. 7, CE(M_S, M_theta) = -E_M_S[log 1/2 (q(x,z) + p(x,z))] (App. F.2).

    Warm-up weights act as the mixture weights of M_theta (w.q = w.p = 1/2 is Eq. 7).
    """
    enc, dec = sample_m_s(model, x, w, draw_dec)
    loss = average_over_m_s(lambda lq, lp: mixture_cross_entropy(lq, lp, w.q, w.p), enc, dec)
    with torch.no_grad():
        value = average_over_m_s(mixture_cross_entropy, enc, dec)
    return loss, {**cross_entropy_stats(enc, dec), "loss": value}


def elbo_terms(model, x):
    """z ~ q(z|x) (B, Z) and the two terms of the negative ELBO, -log p(x|z) and the
    one-sample KL estimate log q(z|x) - log p(z), each (B,); also q(z|x) itself."""
    q_z_given_x = model.q_z_given_x(x)
    z = q_z_given_x.rsample()                                           # (B, Z)
    rec = -model.p_x_given_z(z).log_prob(x)                             # (B,)
    kl = q_z_given_x.log_prob(z) - model.log_p_z(z)                     # (B,)
    return q_z_given_x, z, rec, kl


def elbo_stats(rec, kl):
    rec, kl = rec.detach().mean(), kl.detach().mean()
    return {"loss": rec + kl, "rec": rec, "kl": kl}


def vae_loss(model, x, w=FULL):
    """L_VAE: the negative ELBO, E_q(z|x)[-log p(x|z) + w.kl (log q(z|x) - log p(z))].

    With w.kl = 1 its expectation over P(x) is D_KL(q(z|x)P(x) || p(x|z)p(z)) + H(P(x)),
    Eq. 2 up to a constant; Eq. 15 writes the same loss (times 1/2) as cross-entropies.
    The KL term is a one-sample Monte Carlo estimate, valid for any prior p(z).
    """
    _, _, rec, kl = elbo_terms(model, x)
    return (rec + w.kl * kl).mean(), elbo_stats(rec, kl)


# ----------------------------------------------------------------------------------------
# 5. Variants of the decoder samples and their gradient noise (App. D.2)
# ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DecoderSampling:
    """How D_dec is drawn and, for discrete x, how its gradient is estimated; the paper's
    way (`decoder_samples`) is the default, PAPER_SAMPLING.

    latent_anchor:
               "normal": z ~ P(z) = N(0, I), the paper's fixed latent anchor;
               "prior": z ~ p(z), the model prior (VampPrior, then p(z1|z2)) with its
               parameters held fixed for the draw (the "authors" estimator draws its
               own codes, see authors_codes).
    estimator: for x that cannot be reparameterized (binary images), see
               `score_function_surrogate`:
               "loo-code": `draws` images x per code z, each with the mean of the other
               images of its code as baseline (the default, chosen by measurement:
               RESULTS.md, "Images: making MIM and A-MIM learn informative codes");
               "loo-batch": one image per code, baseline the mean over the batch;
               "authors": the authors' image code: codes from p(z) by
               reparameterization (authors_codes, whatever the anchor), the decoder's
               mean image instead of a sample, log q(x) = log p(x|z) (App. D.1 for
               z ~ p(z)), no score term. Its log p(x|z) has zero gradient at the mean
               image, so D_dec gives the decoder no gradient at all; the encoder and
               the prior get theirs through log q(z|x) and log p(z) at the codes.
    """
    latent_anchor: str = "normal"
    estimator: str = "loo-code"
    draws: int = DRAWS_PER_CODE


ANCHORS = ("normal", "prior")
ESTIMATORS = ("loo-code", "loo-batch", "authors")
PAPER_SAMPLING = DecoderSampling()


def decoder_samples_of(sampling):
    """The function (model, n, p_z, w) -> D_dec that `sampling` describes, for the
    objectives' draw_dec. The "authors" estimator applies to discrete x only."""
    draws = sampling.draws if sampling.estimator == "loo-code" else 1

    def draw_dec(model, n, p_z, w=FULL):
        if sampling.estimator == "authors" and model.p_x_given_z.discrete:
            return authors_decoder_samples(model, n, p_z, w)
        anchor = p_z if sampling.latent_anchor == "prior" else None
        return decoder_samples(model, n, p_z, w, draws, anchor)
    return draw_dec


def authors_decoder_samples(model, n, p_z, w=FULL):
    """D_dec as the authors' image code draws it: z ~ p(z) (authors_codes), x the
    decoder's mean image (detached), and log q(x) = log p(x|z), the App. D.1 estimate for
    z drawn from p(z). For discrete x only: a PixelCNN decoder has no mean image."""
    z = authors_codes(model, n, p_z)                                    # (n, Z)
    p_x_given_z = model.p_x_given_z(z)
    x = p_x_given_z.mean.detach()                                       # (n, D) in [0, 1]
    log_p_x_given_z = p_x_given_z.log_prob(x)
    log_q_xz = model.q_z_given_x(x).log_prob(z) + log_p_x_given_z
    return log_q_xz, log_p_x_given_z + log_prior(p_z, z, w), None


def authors_codes(model, n, p_z):
    """n codes z ~ p(z) (n, Z) as the authors' image code draws them, reparameterized, so
    that gradients reach what p(z) is made of: a VampPrior's top level from q(z|u_k) of
    its first n pseudo-inputs u_k, one code each (cycling through them when n > K);
    other priors by rsample where they have one; then z1 ~ p(z1|z2) for two levels."""
    top = p_z.top if isinstance(p_z, TwoLevel) else p_z
    if isinstance(model.prior, VampPrior):
        q_of_u = top.component_distribution.base_dist                  # batch (K, Z)
        k = torch.arange(n, device=q_of_u.loc.device) % len(q_of_u.loc)
        z_top = diag_gaussian(q_of_u.loc[k], q_of_u.scale[k]).rsample()
    else:
        z_top = top.rsample((n,)) if top.has_rsample else top.sample((n,))
    if not isinstance(p_z, TwoLevel):
        return z_top
    return torch.cat([p_z.conditional(z_top).rsample(), z_top], dim=-1)


# The gradient noise of each estimator, measured on a model (RESULTS.md, "Images: making
# MIM and A-MIM learn informative codes")

GRADIENT_REPEATS = 30           # independent gradient estimates per estimator
GRADIENT_SEED = 0
ESTIMATOR_SETTINGS = {          # label: (estimator, draws: images per code of loo-code)
    "loo-batch": ("loo-batch", DRAWS_PER_CODE), "loo-code, 2 per code": ("loo-code", 2),
    "loo-code, 4 per code": ("loo-code", 4), "loo-code, 8 per code": ("loo-code", 8),
    "authors": ("authors", DRAWS_PER_CODE)}


def decoder_sample_gradients(model, n, sampling, repeats):
    """Independent estimates (repeats, P) of the gradient of the decoder-sample half of
    L_MIM (Eq. 8 over D_dec, n samples) for the decoder's parameters, in float64."""
    params = list(model.p_x_given_z.parameters())
    rows = []
    for _ in range(repeats):
        dec = decoder_samples_of(sampling)(model, n, model.p_z(), FULL)
        loss = decoder_sample_loss(lambda lq, lp: -0.5 * (lq + lp), dec)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        rows.append(torch.cat([torch.zeros(p.numel(), device=p.device) if g is None
                               else g.reshape(-1) for p, g in zip(params, grads)]))
    return torch.stack(rows).double()


def signal_and_noise(grads):
    """|E g| and sqrt(E |g - E g|^2) from R estimates g (R, P); |E g|^2 is estimated
    without the noise^2 / R that the mean of R noisy estimates adds to it."""
    noise2 = float(grads.var(0, correction=1).sum())
    signal2 = float(grads.mean(0).square().sum()) - noise2 / len(grads)
    return math.sqrt(max(signal2, 0.0)), math.sqrt(noise2)


def gradient_noise(model, anchor, n, repeats=GRADIENT_REPEATS, seed=GRADIENT_SEED):
    """Signal and noise of every estimator in ESTIMATOR_SETTINGS on `model`, drawing
    decoder samples from `anchor` (DecoderSampling.latent_anchor), n per estimate:
    [{estimator, signal, noise, noise_over_signal}]."""
    model.train()
    rows = []
    for label, (estimator, draws) in ESTIMATOR_SETTINGS.items():
        if estimator == "authors" and isinstance(model.p_x_given_z, PixelDecoder):
            continue                    # it needs a mean image, which a PixelCNN has not
        torch.manual_seed(seed)
        sampling = DecoderSampling(anchor, estimator, draws)
        signal, noise = signal_and_noise(decoder_sample_gradients(model, n, sampling,
                                                                  repeats))
        rows.append({"estimator": label, "signal": signal, "noise": noise,
                     "noise_over_signal": noise / signal if signal > 0 else math.inf})
    return rows


# ----------------------------------------------------------------------------------------
# 6. Warm-up (Sec. 5)
# ----------------------------------------------------------------------------------------

PRIOR_DELAY = 0.5        # warm-up mode prior: fraction of the warm-up with beta = 0


def warmup_weights(mode, progress, warmup):
    """The term weights `progress` epochs into training (2.5: halfway through epoch 3).

    paper:   Sec. 5 -- the weight on the second (decoder) CE term of Eq. 8 rises
             linearly from 0 to 1/2 over `warmup` epochs; the VAE's KL weight from 0 to 1.
    prior:   the weight beta on log p(z) (of the top level: p(z2) of two levels) rises
             from 0 to 1, wherever it appears (both CE terms and the estimate of
             log q(x)): the analogue of KL annealing. beta stays 0 for the first
             PRIOR_DELAY of the warm-up, then rises linearly. With the marginal q(x)
             this is the only warm-up that changes the direction of the encoder-sample
             gradient; `paper` rescales it, which Adam ignores. The VAE's KL weight
             rises linearly from 0 over the whole warm-up, as in Tomczak & Welling:
             with the delay, the unweighted KL grew to 10^4 nats and z2 collapsed
             when the weight arrived (RESULTS.md, "Images: making MIM and A-MIM
             learn informative codes").
    authors: the authors' code -- the weight on log q(z|x) + log q(x) steps up per epoch
             as beta = min(1, epoch / warmup) (here scaled to 1/2, as in Eq. 8), decoder
             samples join only once it is full, and in their image code (two-level
             models) beta also weighs log p(z2): per encoder sample the loss is
             -(1 + beta) / 2 [log p(x|z) + log p(z1|z2) + beta log p(z2)].
    """
    if warmup <= 0:
        return FULL
    if mode == "paper":
        ramp = min(1.0, progress / warmup)
        return TermWeights(p=0.5 * ramp, kl=ramp)
    if mode == "prior":
        beta = min(1.0, max(0.0, progress / warmup - PRIOR_DELAY) / (1 - PRIOR_DELAY))
        return TermWeights(kl=min(1.0, progress / warmup), prior=beta)
    beta = min(1.0, (math.floor(progress) + 1) / warmup)
    return TermWeights(q=0.5 * beta, decoder_samples=beta >= 1.0, kl=beta,
                       top_prior=beta)


WARMUP_MODES = ("paper", "prior", "authors")


# ----------------------------------------------------------------------------------------
# 7. Training (Sec. 5): Adam, warm-up, early stopping on the validation loss
# ----------------------------------------------------------------------------------------

VALIDATION_SEED = 12345  # fixed noise for validation losses, so epochs compare fairly
NORMGRAD_EPS = 1e-7      # optimizer normgrad: g / (|g| + eps), as Tomczak & Welling's code
ADAM_EPS = 1e-8          # torch's default, and AdamNormGrad's


@dataclass(frozen=True)
class TrainSpec:
    """How `train` fits a model; the defaults are the paper's Sec. 5.1 settings."""
    epochs: int = 200                 # at most
    batch_size: int = 128             # B data points: B encoder and B decoder samples
    lr: float = 1e-3                  # Adam
    critic_lr: float = 1e-4           # Adam, for a critic network (InfoMax-VAE App. D)
    optimizer: str = "adam"           # OPTIMIZERS: adam or normgrad
    warmup: int = 3                   # warm-up epochs
    warmup_mode: str = "paper"        # WARMUP_MODES, see warmup_weights
    patience: Optional[int] = None    # early stopping; default: warmup, at least 1
    best_in_warmup: bool = False      # may the best model come from the warm-up? (authors)
    amp: bool = False                 # networks in bfloat16 (autocast), densities in fp32


def optimizer(model, spec):
    """Adam; a critic network's parameters form their own group with spec.critic_lr,
    which for Adam is the same as the separate optimizer of InfoMax-VAE's Algorithm 1."""
    critic = set(model.critic.parameters()) if model.critic is not None else set()
    groups = [{"params": [p for p in model.parameters() if p not in critic], "lr": spec.lr}]
    if critic:
        groups.append({"params": list(model.critic.parameters()), "lr": spec.critic_lr})
    return (EpsFirstAdam if spec.optimizer == "normgrad" else torch.optim.Adam)(groups)


class EpsFirstAdam(torch.optim.Adam):
    """Adam as the AdamNormGrad of Tomczak & Welling's code steps (optimizer normgrad):
    eps is added to sqrt(v) before the bias correction, lr sqrt(1 - b2^t) / (1 - b1^t) *
    m / (sqrt(v) + eps), which is torch's Adam with eps / sqrt(1 - b2^t) in place of eps.
    With normalized gradients this damps the step of elements whose gradient is below
    about eps / sqrt(1 - b2^t) (3e-7 at t = 1), which torch's Adam moves at full rate."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            t = 1 + max((int(self.state[p]["step"]) for p in group["params"]
                         if p in self.state), default=0)
            group["eps"] = ADAM_EPS / math.sqrt(1 - group["betas"][1] ** t)
        return super().step(closure)


@torch.no_grad()
def normalize_gradients(model):
    """Optimizer normgrad: each weight or bias tensor's gradient divided by its L2 norm
    before the Adam step, as in the AdamNormGrad of Tomczak & Welling's code, so that every
    tensor takes a step of the same scale whatever the size of its gradient. A gated
    layer's two halves are two layers (h and g) there, so each half counts on its own."""
    for grad in gradient_blocks(model):
        grad.div_(grad.norm() + NORMGRAD_EPS)


def gradient_blocks(model):
    """The gradient tensors that normgrad normalizes one by one: each parameter's, with a
    Gated layer's fused weight and bias split (views) into the halves of h and g."""
    gated = {id(p) for m in model.modules() if isinstance(m, Gated)
             for p in m.layer.parameters()}
    for p in model.parameters():
        if p.grad is not None:
            yield from p.grad.chunk(2, dim=0) if id(p) in gated else (p.grad,)


OPTIMIZERS = ("adam", "normgrad")


def autocast(device, enabled):
    """bfloat16 autocast of matrix products and convolutions (spec.amp); the distributions
    cast network outputs back to float32 (full_precision)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def train_epoch(model, loss_fn, opt, x_train, spec, epoch, binarize=False, on_batch=None):
    """One pass over x_train (N, D) in shuffled batches; returns the mean stats and
    loss_max, the largest batch loss, which shows a spike that the mean hides.
    binarize: draw a fresh binary image from the grey levels at every use (dynamic
    binarization, Sec. 5.2). The stats stay on the device until the epoch ends: the one
    wait for the device in a step is the check that the loss is finite, which must come
    before a NaN reaches the weights."""
    model.train()
    n_batches = len(x_train) // spec.batch_size          # drop the last partial batch
    order = torch.randperm(len(x_train), device=x_train.device)
    totals, batch_losses = {}, []
    for i in range(n_batches):
        x = x_train[order[i * spec.batch_size:(i + 1) * spec.batch_size]]
        x = torch.bernoulli(x) if binarize else x
        w = warmup_weights(spec.warmup_mode, epoch - 1 + i / n_batches, spec.warmup)
        with autocast(x.device, spec.amp):
            loss, stats = loss_fn(model, x, w)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the loss became {loss.item()} in epoch {epoch}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if spec.optimizer == "normgrad":
            normalize_gradients(model)
        opt.step()
        for k, v in stats.items():
            totals[k] = totals.get(k, 0.0) + v / n_batches
        batch_losses.append(torch.as_tensor(stats["loss"]))  # a float from a custom loss too
        if on_batch is not None:
            on_batch(epoch, i + 1, n_batches, stats["loss"])
    return {**{k: float(v) for k, v in totals.items()},
            "loss_max": float(torch.stack(batch_losses).max())}


@torch.no_grad()
def validate(model, loss_fn, x_val, spec):
    """Mean stats over x_val at the full (end-of-warm-up) weights, with fixed noise."""
    model.eval()
    totals = {}
    with torch.random.fork_rng(devices=cuda_devices(x_val.device)):
        torch.manual_seed(VALIDATION_SEED)
        for x in x_val.split(spec.batch_size):
            with autocast(x.device, spec.amp):
                _, stats = loss_fn(model, x, FULL)
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v * len(x) / len(x_val)
    return {k: float(v) for k, v in totals.items()}


def train(model, loss_fn, x_train, x_val, spec=TrainSpec(), on_epoch=None, binarize=False,
          checkpoint=None, resume=None, diagnose=None, on_batch=None):
    """Fit `model` with loss_fn (model, x, weights) -> (loss, stats) on x_train (N, D),
    stopping early on x_val; returns (best state_dict, best epoch, epochs run, history).

    Early stopping: once warm-up is over, stop when the validation loss at full weights
    has not improved for `patience` epochs, and return the best weights (of an epoch after
    the warm-up, or of any epoch with spec.best_in_warmup). A loss that is not finite
    raises FloatingPointError.
    on_epoch(row) receives each epoch's row of the history,
    on_batch(epoch, batches done, batches, loss) each step's progress (a 0-dim tensor
    loss: reading it waits for the device).
    diagnose(model) -> dict, if given, adds its values to each row with the prefix val_
    (evaluate.epoch_diagnostics gives active units, MI, posterior scales, 5-NN), so
    that collapse shows while it happens.
    After every epoch, checkpoint(state, improved) receives everything needed to go on:
    the optimizer, the counters, the history, the best weights and the random-number
    state. train(..., resume=state) continues from such a state (with model already
    holding its weights) exactly as the uninterrupted run would have.
    """
    patience = max(1, spec.warmup) if spec.patience is None else spec.patience
    opt = optimizer(model, spec)
    progress = {"epoch": 0, "best_loss": math.inf, "best_epoch": 0, "history": [],
                "finished": False}
    best_state = None
    if resume is not None:
        progress, best_state = resumed_training(resume, opt, model, spec, patience,
                                                x_train.device)
    while not progress["finished"]:
        epoch, start = progress["epoch"] + 1, time.perf_counter()
        train_stats = train_epoch(model, loss_fn, opt, x_train, spec, epoch, binarize,
                                  on_batch)
        val_stats = validate(model, loss_fn, x_val, spec)
        if not math.isfinite(val_stats["loss"]):
            raise FloatingPointError(f"the validation loss became {val_stats['loss']} in "
                                     f"epoch {epoch}")
        seconds = time.perf_counter() - start
        if diagnose is not None:
            val_stats.update(diagnose(model))
        row = {"epoch": epoch, **prefixed("train_", train_stats),
               **prefixed("val_", val_stats), "lr": opt.param_groups[0]["lr"],
               "seconds": seconds}
        if on_epoch is not None:
            on_epoch(row)
        counts = epoch >= spec.warmup or spec.best_in_warmup
        improved = counts and val_stats["loss"] < progress["best_loss"]
        if improved:
            progress.update(best_loss=val_stats["loss"], best_epoch=epoch)
            best_state = snapshot(model)
        progress.update(epoch=epoch, history=progress["history"] + [row])
        progress.update(finished=run_is_over(progress, spec, patience))
        if checkpoint is not None:
            checkpoint({"optimizer": opt.state_dict(), "progress": progress,
                        "best_model": best_state, "rng": rng_state(x_train.device)}, improved)
    if best_state is None:                    # warm-up never ended: keep the last weights
        progress["best_epoch"], best_state = progress["epoch"], snapshot(model)
    return best_state, progress["best_epoch"], progress["epoch"], progress["history"]


def resumed_training(resume, opt, model, spec, patience, device):
    """(progress, best state) of a training state that train's checkpoint received, with
    the optimizer and the random state restored; the learning rate stays spec's, since a
    resumed run may change it."""
    opt.load_state_dict(resume["optimizer"])
    for group, fresh in zip(opt.param_groups, optimizer(model, spec).param_groups):
        group["lr"] = fresh["lr"]
    progress = {**resume["progress"],
                "finished": run_is_over(resume["progress"], spec, patience)}
    set_rng_state(resume["rng"], device)
    return progress, resume["best_model"]


def run_is_over(progress, spec, patience):
    """All epochs run, or no improvement for `patience` epochs after the warm-up (a best
    epoch inside the warm-up counts as its last). Checked again on resume, where more
    epochs or patience may give a finished run more room."""
    epoch, since = progress["epoch"], max(progress["best_epoch"], spec.warmup - 1)
    return epoch >= spec.epochs or (epoch >= spec.warmup and epoch - since >= patience)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def prefixed(prefix, stats):
    return {prefix + k: v for k, v in stats.items()}


def cuda_devices(device):
    """The CUDA device whose random state fork_rng must save: `device`'s own (cuda:1 on a
    process whose current device is cuda:0), none on the CPU."""
    if device.type != "cuda":
        return []
    return [torch.cuda.current_device() if device.index is None else device.index]


def rng_state(device):
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ----------------------------------------------------------------------------------------
# 8. Networks of Sec. 5.1: two fully connected layers returning a distribution
# ----------------------------------------------------------------------------------------

ACTIVATIONS = {"tanh": nn.Tanh, "silu": nn.SiLU}


def two_layer_mlp(in_dim, out_dim, hidden, activation):
    return nn.Sequential(nn.Linear(in_dim, hidden), ACTIVATIONS[activation](),
                         nn.Linear(hidden, out_dim))


class GaussianMLP(nn.Module):
    """v -> N(mean(v), diag(std(v)^2)), used for q(z|x) and for p(x|z) on continuous x."""
    discrete = False                                        # as a decoder: x has rsample

    def __init__(self, in_dim, out_dim, hidden, activation="tanh", floor=STD_FLOOR):
        super().__init__()
        self.net = two_layer_mlp(in_dim, 2 * out_dim, hidden, activation)
        self.floor, self.feature_dim = floor, hidden

    def features(self, v):                                  # (B, in_dim) -> (B, hidden)
        """The first layer: what the hybrid inference critic shares."""
        return self.net[:2](v)

    def forward(self, v):                                   # (B, in_dim)
        loc, raw = full_precision(self.net(v)).chunk(2, dim=-1)  # (B, out_dim) each
        return diag_gaussian(loc, positive_scale(raw, self.floor))


class BernoulliMLP(nn.Module):
    """z -> independent Bernoulli(logits(z)), the decoder p(x|z) on binary x."""
    discrete = True                                         # x has no rsample
    logit_bound = None                                      # see bernoulli; set by build_model

    def __init__(self, in_dim, out_dim, hidden, activation="tanh", floor=STD_FLOOR):
        super().__init__()
        self.net = two_layer_mlp(in_dim, out_dim, hidden, activation)

    def forward(self, z):                                   # (B, Z)
        return bernoulli(self.net(z), self.logit_bound)     # over (B, D)


DECODERS = {False: GaussianMLP, True: BernoulliMLP}        # keyed by "is x binary"


# ----------------------------------------------------------------------------------------
# 9. Networks of Sec. 5.2: the two-level convHVAE and PixelHVAE of Tomczak & Welling
# (2018), with the layer sizes of their code, and the VampPrior (App. D.1). x stays
# flattened (B, D) outside the networks.
# ----------------------------------------------------------------------------------------

LOGVAR_BOUNDS = (-6.0, 2.0)  # the VampPrior code clips log-variances (Hardtanh). The lower
                             # bound matters: A-MIM has no encoder entropy term, so without
                             # it the posterior variances collapse towards zero.
HIDDEN = 300                 # units of the dense layers in the VampPrior code
CHANNELS = 64                # channels of the decoder convolutions
PIXELCNN_LAYERS = 8          # masked convolutions: one of type A, then type B


def bounded_gaussian(h, mean_layer, logvar_layer):
    logvar = full_precision(logvar_layer(h)).clamp(*LOGVAR_BOUNDS)
    return diag_gaussian(mean_layer(h), torch.exp(0.5 * logvar))


class Gated(nn.Module):
    """h(v) * sigmoid(g(v)) (Dauphin et al. 2017), one layer computing both halves."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer                                  # returns 2x the output units

    def forward(self, v):
        h, g = self.layer(v).chunk(2, dim=1 if v.dim() == 4 else -1)
        return h * torch.sigmoid(g)


def gated_dense(n_in, n_out):
    return Gated(nn.Linear(n_in, 2 * n_out))


def gated_conv(c_in, c_out, kernel, stride=1):
    return Gated(nn.Conv2d(c_in, 2 * c_out, kernel, stride, padding=kernel // 2))


def conv_features(c_in, first_kernel, third_kernel):
    """The encoders' gated convolutions: (B, C, H, W) -> (B, conv_feature_dim)."""
    return nn.Sequential(gated_conv(c_in, 32, first_kernel), gated_conv(32, 32, 3, 2),
                         gated_conv(32, 64, third_kernel), gated_conv(64, 64, 3, 2),
                         gated_conv(64, 6, 3), nn.Flatten())


def conv_feature_dim(image_shape):
    """Output size of conv_features: 6 maps after two stride-2 layers."""
    return 6 * (image_shape[1] // 4) * (image_shape[2] // 4)


class TwoLevelEncoder(nn.Module):
    """q(z|x) = q(z2|x) q(z1|x, z2), over z = (z1, z2)."""

    def __init__(self, image_shape, z_dim):
        super().__init__()
        c, features = image_shape[0], conv_feature_dim(image_shape)
        self.image_shape, self.z_dim, self.feature_dim = image_shape, z_dim, features
        self.z2_features = conv_features(c, 7, 5)
        self.z2_mean, self.z2_logvar = nn.Linear(features, z_dim), nn.Linear(features, z_dim)
        self.z1_features = conv_features(c, 3, 3)
        self.z1_from_z2 = gated_dense(z_dim, features)
        self.z1_joint = gated_dense(2 * features, HIDDEN)
        self.z1_mean, self.z1_logvar = nn.Linear(HIDDEN, z_dim), nn.Linear(HIDDEN, z_dim)

    def features(self, x):                                  # (B, D) -> (B, F)
        """The convolutions of q(z2|x): what the hybrid inference critic shares."""
        return self.z2_features(x.view(-1, *self.image_shape))

    def q_z2_given_x(self, x):                              # (B, D) -> over (B, Z)
        return bounded_gaussian(self.features(x), self.z2_mean, self.z2_logvar)

    def q_z1_given_x_z2(self, h_x, z2):                     # (B, F), (..., B or 1, Z)
        h_z2 = self.z1_from_z2(z2)                          # (..., B or 1, F)
        h = self.z1_joint(torch.cat(torch.broadcast_tensors(h_x, h_z2), dim=-1))
        return bounded_gaussian(h, self.z1_mean, self.z1_logvar)

    def forward(self, x):
        h_x = self.z1_features(x.view(-1, *self.image_shape))           # (B, F)
        return TwoLevel(self.q_z2_given_x(x),
                        lambda z2: self.q_z1_given_x_z2(h_x, z2), self.z_dim)


class ConditionalPrior(nn.Module):
    """p(z1|z2): two gated dense layers."""

    def __init__(self, z_dim):
        super().__init__()
        self.net = nn.Sequential(gated_dense(z_dim, HIDDEN), gated_dense(HIDDEN, HIDDEN))
        self.mean, self.logvar = nn.Linear(HIDDEN, z_dim), nn.Linear(HIDDEN, z_dim)

    def forward(self, z2):                                  # (..., Z) -> over (..., Z)
        return bounded_gaussian(self.net(z2), self.mean, self.logvar)


def split_levels(z):
    """(..., 2Z) -> z1 (N, Z), z2 (N, Z), with the leading dimensions flattened."""
    z1, z2 = z.reshape(-1, z.shape[-1]).chunk(2, dim=-1)
    return z1, z2


class ConvDecoder(nn.Module):
    """convHVAE p(x|z1, z2): gated dense layers to an image, gated convolutions, logits."""
    discrete = True
    logit_bound = None

    def __init__(self, image_shape, z_dim):
        super().__init__()
        self.image_shape = image_shape
        self.from_z1, self.from_z2 = gated_dense(z_dim, HIDDEN), gated_dense(z_dim, HIDDEN)
        self.to_image = gated_dense(2 * HIDDEN, math.prod(image_shape))
        self.convs = nn.Sequential(gated_conv(image_shape[0], CHANNELS, 3),
                                   *[gated_conv(CHANNELS, CHANNELS, 3) for _ in range(3)],
                                   nn.Conv2d(CHANNELS, image_shape[0], 1))

    def forward(self, z):                                   # (..., 2Z) -> over (..., D)
        z1, z2 = split_levels(z)
        h = self.to_image(torch.cat([self.from_z1(z1), self.from_z2(z2)], dim=-1))
        logits = self.convs(h.view(-1, *self.image_shape)).flatten(1)   # (N, D)
        return bernoulli(logits.view(*z.shape[:-1], -1), self.logit_bound)


class MaskedConv(nn.Conv2d):
    """A 3x3 convolution that sees only pixels before the centre in raster order (type A)
    or also the centre (type B), in every input channel (van den Oord et al. 2016)."""

    def __init__(self, kind, c_in, c_out):
        super().__init__(c_in, c_out, 3, padding=1)
        mask = torch.ones_like(self.weight)
        mask[:, :, 1, 1 + (kind == "B"):] = 0
        mask[:, :, 2:] = 0
        self.register_buffer("mask", mask)

    def forward(self, v):
        return F.conv2d(v, self.weight * self.mask, self.bias, padding=1)


class PixelCNN(nn.Module):
    """Causal logits (B, 1, H, W) from x (B, 1, H, W) and conditioning maps (B, c, H, W).

    The VampPrior code puts a BatchNorm after each masked convolution; it is left out here
    because batch statistics would make log p(x|z) of one image depend on the others in
    its batch (and on train / eval mode), which the objectives and the NLL must not.
    """

    def __init__(self, c_x, c_cond):
        super().__init__()
        layers = [MaskedConv("A", c_x + c_cond, CHANNELS), nn.ReLU()]
        for _ in range(PIXELCNN_LAYERS - 1):
            layers += [MaskedConv("B", CHANNELS, CHANNELS), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Conv2d(CHANNELS, c_x, 1))
        self.receptive_rows = PIXELCNN_LAYERS  # each masked layer reaches one row up

    def forward(self, x, cond):
        return self.net(torch.cat([x, cond], dim=1))


class PixelDecoder(nn.Module):
    """PixelHVAE p(x|z1, z2): z1 and z2 each mapped to an image-sized map, then a PixelCNN."""
    discrete = True
    logit_bound = None

    def __init__(self, image_shape, z_dim):
        super().__init__()
        self.image_shape = image_shape
        self.from_z1 = gated_dense(z_dim, math.prod(image_shape))
        self.from_z2 = gated_dense(z_dim, math.prod(image_shape))
        self.pixelcnn = PixelCNN(image_shape[0], 2 * image_shape[0])

    def forward(self, z):                                   # (N, 2Z) -> over (N, D)
        if z.dim() != 2:
            raise ValueError("PixelDecoder takes z of shape (N, 2Z)")
        z1, z2 = split_levels(z)
        maps = torch.cat([self.from_z1(z1), self.from_z2(z2)], dim=-1)
        cond = maps.view(len(z), -1, *self.image_shape[1:])            # (N, 2C, H, W)
        return PixelCNNBernoulli(self.pixelcnn, cond, self.image_shape, self.logit_bound)


class PixelCNNBernoulli(D.Distribution):
    """p(x|z) = prod_i Bernoulli(x_i | x_<i, z) over the pixels in raster order, from a
    causal PixelCNN `net(x_images, cond)` that returns logits (B, 1, H, W). log_prob is
    one pass (teacher forcing); sample draws one pixel at a time. No mean: it would need
    a sum over all 2^D images."""
    arg_constraints = {}
    has_rsample = False

    def __init__(self, net, cond, image_shape, logit_bound=None):
        self.net, self.cond, self.image_shape = net, cond, image_shape  # cond (B, c, H, W)
        self.logit_bound = logit_bound
        dim = math.prod(image_shape)
        super().__init__(cond.shape[:1], torch.Size([dim]), validate_args=False)

    def log_prob(self, x):                                              # (B, D) -> (B,)
        logits = self.net(x.view(-1, *self.image_shape), self.cond)
        return bernoulli(logits.flatten(1), self.logit_bound).log_prob(x)

    def sample(self, sample_shape=torch.Size()):
        if len(sample_shape):
            raise ValueError("PixelCNNBernoulli draws one image per z; repeat z instead")
        with torch.no_grad():
            x = torch.zeros(len(self.cond), *self.image_shape, device=self.cond.device,
                            dtype=self.cond.dtype)
            depth = self.net.receptive_rows           # rows above a pixel that reach it
            for row in range(self.image_shape[1]):
                top = max(0, row - depth)            # only these rows can reach this row
                crop_x, crop_c = x[:, :, top:row + 1], self.cond[:, :, top:row + 1]
                for col in range(self.image_shape[2]):
                    logits = self.net(crop_x, crop_c)[:, :, row - top, col]
                    x[:, :, row, col] = bernoulli(logits, self.logit_bound).sample()
            return x.flatten(1)


class VampPrior(nn.Module):
    """p(z) = 1/K sum_k q(z|u_k) with K learnable pseudo-inputs u_k (Tomczak & Welling 2018;
    the paper's App. D.1). The mixture is built from the current encoder at every call, so
    one call per step encodes the K pseudo-inputs once."""

    def __init__(self, components, x_dim, x_init=None, unit_range=False):
        super().__init__()
        init = torch.rand(components, x_dim) if x_init is None else x_init.clone()
        self.pseudo_inputs = nn.Parameter(init.float())                  # (K, D)
        self.unit_range = unit_range  # images: keep u_k in [0, 1], as the VampPrior code does

    def forward(self, encoder):
        u = self.pseudo_inputs.clamp(0, 1) if self.unit_range else self.pseudo_inputs
        components = encoder(u)                                          # batch (K,)
        weights = D.Categorical(logits=torch.zeros_like(u[:, 0]), validate_args=False)
        return D.MixtureSameFamily(weights, components, validate_args=False)


# ----------------------------------------------------------------------------------------
# 10. Two other remedies for posterior collapse, for comparison: the ELBO plus a bound of
# I_q(x; z) from a critic (InfoMax-VAE; the inference critics of "Forget-me-not"). Neither
# paper gives a critic for our architectures: x goes through a fresh copy of the
# encoder's first layers (see x_trunk), z through an MLP. Their "loss" stat is the
# negative ELBO, the quantity the critics paper (its Sec. 4) and early stopping track.
# ----------------------------------------------------------------------------------------

CRITIC_DIM = 64              # embedding size of g(x) and h(z) in a separable critic


def x_trunk(spec):
    """A new network with the design of the encoder's first layers, and its output size:
    one dense layer for the MLPs, the gated convolutions of q(z2|x) for two levels."""
    if spec.arch == "mlp":
        return (nn.Sequential(nn.Linear(spec.x_dim, spec.hidden),
                              ACTIVATIONS[spec.activation]()), spec.hidden)
    shape = spec.image_shape
    return (nn.Sequential(nn.Unflatten(1, shape), conv_features(shape[0], 7, 5)),
            conv_feature_dim(shape))


class JointCritic(nn.Module):
    """InfoMax-VAE's t(x, z) (its Eq. 5-6 and Fig. 1): an MLP on x's features and z."""

    def __init__(self, trunk, feature_dim, z_dim, hidden, activation):
        super().__init__()
        self.trunk = trunk
        self.net = two_layer_mlp(feature_dim + z_dim, 1, hidden, activation)

    def forward(self, x, z):                                # (B, D), (B, Z) -> (B,)
        return self.net(torch.cat([self.trunk(x), z], dim=-1)).squeeze(-1)


class SeparableCritic(nn.Module):
    """An inference critic scoring every pair at once, score(x_j, z_i) = g(x_j) . h(z_i),
    with one pass per x and one per z (the critics paper, Sec. 4.5). The neural critic has
    its own trunk for x; the hybrid one (trunk None) reads the encoder's first layers,
    which it runs again on x: a second pass of those layers only, kept for simplicity."""

    def __init__(self, trunk, feature_dim, z_dim, hidden, activation):
        super().__init__()
        self.trunk = trunk
        self.g = nn.Linear(feature_dim, CRITIC_DIM)
        self.h = two_layer_mlp(z_dim, CRITIC_DIM, hidden, activation)

    def forward(self, x, z, encoder):                       # (B_x, D), (B_z, Z)
        h_x = encoder.features(x) if self.trunk is None else self.trunk(x)
        return self.g(h_x) @ self.h(z).T                    # (B_x, B_z)


def build_critic(spec, encoder):
    """The critic network that spec.critic names (CRITICS), or None: the self-critic
    scores pairs with the encoder itself and adds no parameters."""
    flat = spec.arch == "mlp"
    hidden, z_dim = (spec.hidden, spec.z_dim) if flat else (HIDDEN, 2 * spec.z_dim)
    if spec.critic == "hybrid":
        return SeparableCritic(None, encoder.feature_dim, z_dim, hidden, spec.activation)
    if spec.critic in ("joint", "separable"):
        network = JointCritic if spec.critic == "joint" else SeparableCritic
        trunk, feature_dim = x_trunk(spec)
        return network(trunk, feature_dim, z_dim, hidden, spec.activation)
    return None


CRITICS = (None, "joint", "separable", "hybrid")


def shuffled_pairs(z):
    """z (B, Z) reordered by a random cyclic derangement sigma, so that (x_i, z_sigma(i)),
    sigma(i) != i, are samples of q(x) q(z) for an i.i.d. batch: the permutation of Alg. 1,
    line 5 of InfoMax-VAE (a plain permutation would leave one pair matched on average)."""
    order = torch.randperm(len(z), device=z.device)
    sigma = torch.empty_like(order)
    sigma[order] = order.roll(-1)                           # order[k] -> order[k + 1]
    return z[sigma]


def kl_dual(t_joint, t_marginal, bound="f"):
    """A variational lower bound of KL(P || Q) from critic values on samples of P and Q.

    f:  the f-divergence dual with f(t) = t log t, E_P[t] - E_Q[exp(t - 1)] (InfoMax-VAE
        Eq. 6); tight at t = 1 + log dP/dQ.
    dv: Donsker-Varadhan, E_P[t] - log E_Q[exp t] (its App. C, Eq. 12); tight at
        t = log dP/dQ + any constant, and never below the f bound of the same t + 1.
    """
    t_joint, t_marginal = full_precision(t_joint), full_precision(t_marginal)
    if bound == "f":
        return t_joint.mean() - torch.exp(t_marginal - 1).mean()
    return t_joint.mean() - (torch.logsumexp(t_marginal, 0) - math.log(len(t_marginal)))


MI_BOUNDS = ("f", "dv")


def infomax_loss(model, x, w=FULL, alpha=10.0, beta=1.0, bound="f"):
    """InfoMax-VAE (Rezaabad & Vishwanath), its Eq. 3-6 and Algorithm 1: the negative ELBO
    with weight beta on the KL, minus alpha times a dual bound of I_q(x; z) =
    KL(q(x, z) || q(x) q(z)) from the critic t(x, z) on matched and shuffled pairs.

    One loss serves both of Algorithm 1's updates: the critic's parameters (their own
    Adam group, TrainSpec.critic_lr) get alpha times its line-7 gradient, which Adam's scale
    invariance makes the same step. Defaults: alpha = 10, beta = 1 (its Sec. 6.1).
    """
    _, z, rec, kl = elbo_terms(model, x)
    mi = kl_dual(model.critic(x, z), model.critic(x, shuffled_pairs(z)), bound)
    loss = (rec + w.kl * beta * kl).mean() - alpha * mi
    return loss, {**elbo_stats(rec, kl), "mi_dual": mi.detach()}


def infonce(scores):
    """The InfoNCE bound of I(x; z) from scores (B, B) with scores[j, i] = f(x_j, z_i):
    log B plus the critics paper's Eq. 6, the mean over z_i of the log-probability of
    picking its own x_i. At most log B; log B for a critic that always picks right."""
    picks = torch.log_softmax(full_precision(scores), dim=0).diagonal()  # (B,)
    return picks.mean() + math.log(len(picks))


def self_critic_scores(model, x, q_z_given_x, z):
    """The self-critic f(x, z) = log q(z|x) (the critics paper, Sec. 3.3): no parameters."""
    return pairwise_log_prob(q_z_given_x, z)


def network_critic_scores(model, x, q_z_given_x, z):
    return model.critic(x, z, model.q_z_given_x)


def critic_loss(model, x, w=FULL, weight=1.0, scores=self_critic_scores):
    """Forget-me-not regularization (Menon, Blei & Vondrick), Eq. 7 and Algorithm 1: the
    negative ELBO minus weight (lambda) times the InfoNCE objective of Eq. 6 on the batch's
    pairs (Eq. 5: matched pairs from q(x, z), the others from q(x) q(z)). We add log B to
    Eq. 6, a constant, so that the reported value is the MI bound of its Eq. 15."""
    q_z_given_x, z, rec, kl = elbo_terms(model, x)
    mi = infonce(scores(model, x, q_z_given_x, z))
    loss = (rec + w.kl * kl).mean() - weight * mi
    return loss, {**elbo_stats(rec, kl), "infonce": mi.detach()}


network_critic_loss = functools.partial(critic_loss, scores=network_critic_scores)


# ----------------------------------------------------------------------------------------
# 11. A model from a ModelSpec
# ----------------------------------------------------------------------------------------

def data_mixture(spec, x_init):
    """An explicit q(x); its components start on random points of x_init (N, D), if given,
    with the data's spread."""
    if x_init is None:
        return MixtureOfGaussians(spec.x_dim, spec.components, floor=spec.std_floor)
    if len(x_init) < spec.components:
        raise ValueError(f"components={spec.components} exceeds the {len(x_init)} training "
                         "points (x_init) that start the mixture q(x); lower it")
    pick = torch.randperm(len(x_init))[:spec.components]
    return MixtureOfGaussians(spec.x_dim, spec.components, init_loc=x_init[pick].cpu(),
                              init_scale=x_init.std(0).cpu(), floor=spec.std_floor)


PSEUDO_INPUT_NOISE = 0.01   # std of the noise on the authors' pseudo-input start


def vamp_prior(spec, x_init):
    """Pseudo-inputs start on K points of x_init (grey levels for binary images), chosen
    by spec.pseudo_init (PSEUDO_INITS)."""
    if x_init is not None:
        if len(x_init) < spec.prior_components:
            raise ValueError(f"prior_components={spec.prior_components} exceeds the "
                             f"{len(x_init)} training points (x_init) that start the "
                             "pseudo-inputs; lower it")
        x_init = PSEUDO_INITS[spec.pseudo_init](x_init.cpu(), spec.prior_components)
    return VampPrior(spec.prior_components, spec.x_dim, x_init, unit_range=spec.binary)


# (x_init (N, D), K) -> the K pseudo-inputs' start (K, D). "authors": their
# --use_training_data_init. The noise also moves pixels off 0 and 1, where their Hardtanh
# passes no gradient and clamp does.
PSEUDO_INITS = {
    "random": lambda x, k: x[torch.randperm(len(x))[:k]],
    "authors": lambda x, k: x[:k] + PSEUDO_INPUT_NOISE * torch.randn(k, x.shape[1]),
}


PRIORS = {  # (spec, x_init) -> p(z), or p(z2) for two levels
    "normal": lambda spec, x_init: StandardNormal(spec.z_dim),
    "mog": lambda spec, x_init: MixtureOfGaussians(spec.z_dim, spec.prior_components,
                                                   floor=spec.std_floor),
    "vamp": vamp_prior,
}

DATA_PRIORS = {  # (spec, x_init) -> q(x), None for the marginal of Eq. 16
    "marginal": lambda spec, x_init: None,
    "mog": data_mixture,
}


def build_mlp(spec):
    encoder = GaussianMLP(spec.x_dim, spec.z_dim, spec.hidden, spec.activation,
                          spec.std_floor)
    decoder = DECODERS[spec.binary](spec.z_dim, spec.x_dim, spec.hidden, spec.activation,
                                    spec.std_floor)
    return encoder, decoder, None


def build_two_level(decoder_class):
    def build(spec):
        if spec.image_shape is None or not spec.binary:
            raise ValueError(f"arch={spec.arch!r} models binary images (binary=True, "
                             "image_shape=(C, H, W)) such as MNIST; use arch='mlp' for "
                             "other data")
        return (TwoLevelEncoder(spec.image_shape, spec.z_dim),
                decoder_class(spec.image_shape, spec.z_dim), ConditionalPrior(spec.z_dim))
    return build


ARCHS = {"mlp": build_mlp, "convhvae": build_two_level(ConvDecoder),
         "pixelhvae": build_two_level(PixelDecoder)}


@torch.no_grad()
def he_init(model):
    """Every dense layer's weights drawn from N(0, 2 / fan_in) (He et al. 2015), as the
    authors' image code (after Tomczak & Welling's) initialises theirs; biases and
    convolutions keep torch's default."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.weight.normal_(0.0, math.sqrt(2.0 / m.in_features))
    return model


INITS = {"torch": lambda model: model, "he": he_init}   # model -> the model, initialised


def build_model(spec, x_init=None):
    """The model that `spec` (a ModelSpec) describes; x_init (N, D), if given, are
    training points to start mixture components and pseudo-inputs on."""
    for name, table in (("arch", ARCHS), ("activation", ACTIVATIONS), ("prior", PRIORS),
                        ("q_x", DATA_PRIORS), ("critic", CRITICS), ("init", INITS),
                        ("pseudo_init", PSEUDO_INITS)):
        if getattr(spec, name) not in table:
            raise ValueError(f"{name}={getattr(spec, name)!r} is not one of "
                             f"{', '.join(map(repr, table))}")
    if spec.q_x == "mog" and spec.binary:
        raise ValueError("q_x='mog' is a density on continuous x; use q_x='marginal' for "
                         "binary data")
    if spec.prob_clamp is not None and not (spec.binary and 0 < spec.prob_clamp < 0.5):
        raise ValueError(f"prob_clamp={spec.prob_clamp} bounds a Bernoulli decoder's "
                         "probabilities, so it needs binary x and a value between 0 and "
                         "0.5; leave it out for continuous x")
    encoder, decoder, p_z1_given_z2 = ARCHS[spec.arch](spec)
    model = INITS[spec.init](Model(encoder, decoder, PRIORS[spec.prior](spec, x_init),
                                   DATA_PRIORS[spec.q_x](spec, x_init), spec.z_dim,
                                   p_z1_given_z2, build_critic(spec, encoder)))
    if spec.prob_clamp is not None:
        decoder.logit_bound = math.log((1 - spec.prob_clamp) / spec.prob_clamp)
    return model


# ----------------------------------------------------------------------------------------
# 12. CPU speed-ups, opt-in: speed_up(model). Nothing above needs them; each leaves every
# result the same up to floating-point rounding (bench.py times them).
# ----------------------------------------------------------------------------------------

class ImageGradient(torch.autograd.Function):
    """conv2d(v, weight, bias) of one-channel images v, stride 1, whose gradient for v is
    computed as a matrix product and a fold: on our CPUs, faster than oneDNN's kernel for
    one input channel (RESULTS.md, Performance). The weight and bias gradients are the
    library's."""

    @staticmethod
    def forward(ctx, v, weight, bias, padding):
        ctx.save_for_backward(v, weight)
        ctx.padding = padding
        return F.conv2d(v, weight, bias, padding=padding)

    @staticmethod
    def backward(ctx, grad):                                # (B, C, H, W), maybe bf16
        v, weight = (t.to(grad) for t in ctx.saved_tensors)  # bf16 under autocast
        (b, c, h, w), k = grad.shape, weight.shape[-1]
        grad_v = None
        if ctx.needs_input_grad[0]:  # each pixel gathers grad * weight over its k x k window
            w_t = weight.reshape(c, -1).t().expand(b, -1, -1)                 # (B, k*k, C)
            taps = torch.bmm(w_t, grad.flatten(2))                            # (B, k*k, HW)
            grad_v = F.fold(full_precision(taps), (h, w), k, padding=ctx.padding)
        # arguments: bias size, stride, padding, dilation, transposed, output padding,
        # groups, and which of the (input, weight, bias) gradients to compute
        _, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad, v, weight, [c], [1, 1], list(ctx.padding), [1, 1], False, [0, 0], 1,
            [False, *ctx.needs_input_grad[1:3]])
        return grad_v, grad_weight, grad_bias, None


class OneChannelConv(nn.Conv2d):
    """nn.Conv2d of one-channel images, stride 1: the first layer of each network. Where
    the image needs a gradient (the VampPrior's pseudo-inputs, the decoder's first map),
    ImageGradient computes it; CUDA and images without gradients keep the library's path.
    """

    def forward(self, v):
        if v.is_cuda or not v.requires_grad:
            return super().forward(v)
        return ImageGradient.apply(v, self.weight, self.bias, self.padding)


def speed_up(model, device=torch.device("cpu")):
    """Two CPU speed-ups for a model from build_model that will run on `device`; returns
    it, changing nothing but the model. Call it before making the optimizer (the first
    one changes layers, not parameters).

    - The first convolution of one-channel images (stride 1) computes its input
      gradient as a matrix product (OneChannelConv; CPU tensors only).
    - On the CPU, convolution weights in the channels_last (NHWC) layout: every feature
      map then stays NHWC, for which oneDNN's kernels are faster (bench.py). On CUDA the
      layout stays as it is until a GPU measurement says otherwise.
    """
    for module in model.modules():
        if type(module) is nn.Conv2d and module.in_channels == 1 and module.stride == (1, 1):
            module.__class__ = OneChannelConv           # same parameters, its own backward
    if device.type != "cpu":
        return model
    if any(isinstance(module, nn.Conv2d) for module in model.modules()):
        model = model.to(memory_format=torch.channels_last)
    return model


# ----------------------------------------------------------------------------------------
# 13. Checkpoints: a state_dict with the ModelSpec that rebuilds its network
# ----------------------------------------------------------------------------------------

CHECKPOINT_FORMAT = 2   # 1, of earlier versions: a run's settings in place of a ModelSpec


def new_temp_file(folder, name):
    """(descriptor, path) of a new file for `name` in `folder`, made with mode 0666 less the
    umask as open() makes files: mkstemp's 0600 would ignore the umask, and reading the
    umask means changing it for a moment, which a library must not do to its process."""
    while True:
        path = os.path.join(folder, f"{name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), path
        except FileExistsError:
            continue


def atomic_write(path, write):
    """Call write(file_path) on a temporary file next to `path`, then rename it."""
    fd, tmp = new_temp_file(*os.path.split(os.path.abspath(path)))
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def to_cpu(tree):
    """A copy of nested dicts / lists with every tensor moved to the CPU."""
    if torch.is_tensor(tree):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {k: to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_cpu(v) for v in tree)
    return tree


def save_checkpoint(path, model, spec, **extra):
    """Write model's state_dict, the ModelSpec `spec` that rebuilds it and `extra`
    (tensors, numbers, strings, and lists or dicts of them) to `path`, atomically: the
    file is whole or not there."""
    state = {"format": CHECKPOINT_FORMAT, "spec": dataclasses.asdict(spec),
             "model": model.state_dict(), "extra": extra}
    def write(tmp):  # through a Python file, so that a full disk raises OSError, as a
        with open(tmp, "wb") as f:              # path would raise torch's RuntimeError
            torch.save(to_cpu(state), f)
    atomic_write(path, write)


def read_checkpoint(path, device="cpu"):
    """The dict that save_checkpoint wrote: format, spec, model, extra. Read with
    weights_only=True; ValueError for a file of another format or program."""
    state = torch.load(path, map_location=device, weights_only=True)
    if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
        return state
    if isinstance(state, dict) and {"config", "data", "model"} <= state.keys():
        raise ValueError(f"{path} was written by an earlier mim.py (checkpoint format 1, "
                         "without a ModelSpec); load it with that version or train again")
    raise ValueError(f"{path} is not a checkpoint written by mim.py; train again")


def checkpoint_spec(state):
    """The ModelSpec of a checkpoint; ValueError if it has fields this mim.py lacks."""
    unknown = sorted(set(state["spec"]) - {f.name for f in dataclasses.fields(ModelSpec)})
    if unknown:
        raise ValueError(f"its ModelSpec has the field {unknown[0]!r}, unknown to this "
                         "mim.py; use the version that wrote it")
    return ModelSpec(**state["spec"])


def load_checkpoint(path, device="cpu"):
    """(model, extra) from a file of `save_checkpoint`."""
    state = read_checkpoint(path, device)
    model = build_model(checkpoint_spec(state))
    model.load_state_dict(state["model"])
    return model.to(device), state["extra"]


# ----------------------------------------------------------------------------------------
# python mim.py ...: the command line is cli.py, beside this file in the repository
# ----------------------------------------------------------------------------------------

def command_line():
    """Hand `python mim.py ...` over to cli.py; where this copy of mim.py has no command
    line beside it, say so in one line, exit status 2."""
    here = os.path.dirname(os.path.abspath(__file__))
    missing = [name for name in ("cli.py", "datasets.py", "evaluate.py")
               if not os.path.isfile(os.path.join(here, name))]
    if missing:
        print(f"mim.py: error: the command line needs cli.py, datasets.py and evaluate.py "
              f"from the repository beside mim.py ({', '.join(missing)} not in {here}); "
              "the library works alone: import mim", file=sys.stderr)
        sys.exit(2)
    import cli     # here, not above: cli.py imports this file as the module mim
    cli.main()


if __name__ == "__main__":
    command_line()
