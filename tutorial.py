# %% [markdown]
# # Teaching MIM from the code
#
# A tour of the Mutual Information Machine (Livne, Swersky & Fleet, arXiv:1910.03175)
# through `mim.py`, in five parts: the paper's identities computed on a grid, Algorithm 2
# line by line, MIM against the VAE (Fig. 1), posterior collapse, and networks of your own.
# Equation numbers are the paper's. Run it as a script, `python tutorial.py [--out DIR]`
# (about a minute on two CPU cores), or open it cell by cell (the `# %%` cells of VS Code,
# Spyder or PyCharm; Jupyter through `jupytext --to notebook tutorial.py`). Every number
# with a known answer is asserted where it is printed: a change that breaks the library
# breaks the tutorial. Figures go to `--out`, $MIM_TUTORIAL_DIR or a folder under the
# system's temporary folder.

# %%
import argparse
import math
import os
import tempfile

import torch
import torch.distributions as D
import torch.nn as nn

import datasets
import evaluate
import mim

parser = argparse.ArgumentParser(description="The MIM tutorial: prints, asserts, draws")
parser.add_argument("--out", default=os.environ.get("MIM_TUTORIAL_DIR") or os.path.join(
    tempfile.gettempdir(), "mim-tutorial"), help="folder for the figures")
OUT = parser.parse_known_args()[0].out          # known: Jupyter passes its own arguments
os.makedirs(OUT, exist_ok=True)
plt = evaluate.pyplot()
torch.set_num_threads(1)    # the small MLPs here run faster on one thread (README, Threads)


def save(fig, name, caption):
    """Write a figure with its caption under it; return its path."""
    fig.text(0.5, 0.005, caption, ha="center", va="bottom", fontsize=8, wrap=True)
    path = os.path.join(OUT, name)
    with open(path, "wb") as f:
        f.write(evaluate.figure_bytes(fig))
    print(f"figure: {path}")
    return path


# %% [markdown]
# ## 1. Two anchored joints and their mixture (Sec. 3, Eq. 4-11)
#
# MIM has two *anchors*: the data distribution P(x) and a fixed latent distribution
# P(z) = N(0, 1). The encoder q(z|x) pushes data into the latent space, the decoder p(x|z)
# pushes codes into data space; each gives a joint, the **anchored encoder** q(z|x) P(x)
# and the **anchored decoder** p(x|z) P(z). MIM's sample distribution is their mixture
#
#     M_S(x, z) = 1/2 (q(z|x) P(x) + p(x|z) P(z))                                  (Eq. 4)
#
# Its entropy splits into how far apart the two joints are (their Jensen-Shannon
# divergence) and their mean joint entropy R_H (Eq. 5):
#
#     H_MS(x, z) = D_JS + R_H                                                      (Eq. 6)
#
# With 1-D x and z all of this is an integral we can take on a grid. The encoder and
# decoder below are linear Gaussian networks written here: any module that returns a
# `torch.distributions` object will do (part 5 says exactly what `mim.Model` needs).

# %%
class LinearGaussian(nn.Module):
    """v (B, 1) -> N(a v + b, s^2) over one dimension."""
    discrete = False                                     # its samples can be rsampled

    def __init__(self, a, b, s):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.tensor(a)), nn.Parameter(torch.tensor(b))
        self.log_s = nn.Parameter(torch.tensor(math.log(s)))

    def forward(self, v):
        return mim.diag_gaussian(self.a * v + self.b, self.log_s.exp().expand_as(v))


class Fixed(nn.Module):
    """A fixed distribution as a module: q(x) and p(z) are called to give theirs."""

    def __init__(self, distribution):
        super().__init__()
        self.distribution = distribution

    def forward(self, encoder=None):
        return self.distribution


P_x = D.MixtureSameFamily(D.Categorical(torch.tensor([0.4, 0.6])),
                          D.Independent(D.Normal(torch.tensor([[-1.5], [1.2]]),
                                                 torch.tensor([[0.4], [0.6]])), 1))
q_x = Fixed(mim.diag_gaussian(torch.zeros(1), torch.full((1,), 1.3)))   # the model's q(x)
model = mim.Model(q_z_given_x=LinearGaussian(0.8, 0.1, 0.5),
                  p_x_given_z=LinearGaussian(1.1, -0.2, 0.6),
                  prior=mim.StandardNormal(1), q_x=q_x, z_dim=1).double()
P_z = model.anchor_z()

# %% [markdown]
# On a 1201 x 1201 grid over [-7, 7]^2, the log-densities of every joint, from the
# model's own distributions (`log_prob` is normalized and in nats):

# %%
grid = torch.linspace(-7, 7, 1201, dtype=torch.float64)
cell = float(grid[1] - grid[0]) ** 2
x, z = (v.reshape(-1, 1) for v in torch.meshgrid(grid, grid, indexing="ij"))
with torch.no_grad():
    log_enc = model.q_z_given_x(x).log_prob(z) + P_x.log_prob(x.float()).double()
    log_dec = model.p_x_given_z(z).log_prob(x) + P_z.log_prob(z.float()).double()
    log_q_theta = model.q_z_given_x(x).log_prob(z) + model.q_x().log_prob(x)
    log_p_theta = model.p_x_given_z(z).log_prob(x) + model.log_p_z(z)
log_M_S = torch.logaddexp(log_enc, log_dec) - math.log(2)                      # Eq. 4
log_M_theta = torch.logaddexp(log_q_theta, log_p_theta) - math.log(2)


def E(log_density, f):
    """The integral of density * f over the grid."""
    return float((log_density.exp() * f).sum() * cell)


def H(log_a):
    return E(log_a, -log_a)


def CE(log_a, log_b):
    return E(log_a, -log_b)


def KL(log_a, log_b):
    return E(log_a, log_a - log_b)


assert abs(E(log_M_S, 1.0) - 1) < 1e-6 and abs(E(log_M_theta, 1.0) - 1) < 1e-6
D_JS = 0.5 * (KL(log_enc, log_M_S) + KL(log_dec, log_M_S))
R_H = 0.5 * (H(log_enc) + H(log_dec))                                          # Eq. 5
H_M_S = H(log_M_S)
print(f"D_JS = {D_JS:.4f}, R_H = {R_H:.4f} nats: D_JS + R_H = {D_JS + R_H:.6f}, "
      f"H_MS = {H_M_S:.6f} nats (Eq. 6)")
assert abs(D_JS + R_H - H_M_S) < 1e-6

# %% [markdown]
# H_MS needs P(x), which we never have. MIM bounds it with the **model joints**
# q_theta(x, z) = q(z|x) q(x) and p_theta(x, z) = p(x|z) p(z), whose priors q(x) and p(z)
# it can evaluate. Their mixture M_theta gives the cross-entropy bound (Eq. 7), and
# Jensen's inequality the MIM loss (Eq. 8), an average of two cross-entropies:
#
#     L_CE  = CE(M_S, M_theta) = D_KL(M_S || M_theta) + H_MS >= H_MS               (Eq. 7)
#     L_MIM = 1/2 (CE(M_S, q_theta(x, z)) + CE(M_S, p_theta(x, z)))                (Eq. 8)
#     L_MIM = L_CE + R_MIM,                                                        (Eq. 9)
#     R_MIM = 1/2 (D_KL(M_S || p_theta) + D_KL(M_S || q_theta)) - D_KL(M_S || M_theta) >= 0
#                                                                                  (Eq. 10)
#     L_MIM = R_H + 1/4 (D_KL(P(z) || p(z)) + D_KL(P(x) || q(x)))
#               + 1/4 (D_KL(q(z|x) P(x) || p_theta) + D_KL(p(x|z) P(z) || q_theta)) (Eq. 11)

# %%
L_CE = CE(log_M_S, log_M_theta)
L_MIM = 0.5 * (CE(log_M_S, log_q_theta) + CE(log_M_S, log_p_theta))
R_MIM = (0.5 * (KL(log_M_S, log_p_theta) + KL(log_M_S, log_q_theta))
         - KL(log_M_S, log_M_theta))
xs = grid.reshape(-1, 1)
step = float(grid[1] - grid[0])
kl_1d = [float(((a.exp()) * (a - b)).sum() * step) for a, b in (
    (P_z.log_prob(xs.float()).double(), model.log_p_z(xs)),
    (P_x.log_prob(xs.float()).double(), model.q_x().log_prob(xs)))]
eq11 = (R_H + 0.25 * sum(kl_1d)
        + 0.25 * (KL(log_enc, log_p_theta) + KL(log_dec, log_q_theta)))
print(f"H_MS = {H_M_S:.4f} <= L_CE = {L_CE:.4f} (Eq. 7) <= L_MIM = {L_MIM:.4f} nats")
print(f"L_CE + R_MIM = {L_CE + R_MIM:.6f} (Eq. 9), R_MIM = {R_MIM:.4f} >= 0 (Eq. 10); "
      f"Eq. 11 gives {eq11:.6f}")
assert H_M_S <= L_CE <= L_MIM and R_MIM >= 0
assert abs(L_CE - (KL(log_M_S, log_M_theta) + H_M_S)) < 1e-6
assert abs(L_MIM - (L_CE + R_MIM)) < 1e-6 and abs(L_MIM - eq11) < 1e-4

# %% [markdown]
# The library never sees the grid: `mim.mim_loss` estimates Eq. 8 by Monte Carlo from a
# batch of data, sampling both halves of M_S (with this explicit q(x), that is
# Algorithm 1). Averaged over batches it lands on the integral, within its standard error:

# %%
torch.manual_seed(0)
with torch.no_grad():
    estimates = torch.tensor([float(mim.mim_loss(model, P_x.sample((4000,)).double())[0])
                              for _ in range(50)])
mean, se = float(estimates.mean()), float(estimates.std() / math.sqrt(len(estimates)))
print(f"mim.mim_loss: {mean:.4f} +- {se:.4f} nats; by quadrature {L_MIM:.4f} nats")
assert abs(mean - L_MIM) < 4 * se, (mean, se, L_MIM)

with torch.no_grad():
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.8), dpi=evaluate.FIGURE_DPI)
    for ax, (log_p, name) in zip(axes, ((log_enc, "anchored encoder q(z|x) P(x)"),
                                        (log_dec, "anchored decoder p(x|z) P(z)"),
                                        (log_M_S, "their mixture M_S (Eq. 4)"))):
        image = ax.imshow(log_p.exp().reshape(1201, 1201).T, origin="lower",
                          extent=(-7, 7, -7, 7), cmap="viridis", aspect="auto")
        ax.set(title=name, xlabel="x", ylabel="z", xlim=(-4, 4), ylim=(-4, 4))
        fig.colorbar(image, ax=ax, label="density")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    save(fig, "1-anchored-joints.png", "Part 1: the two anchored joints of a 1-D mixture "
         "P(x) with linear Gaussian encoder and decoder, and their mixture M_S; H_MS = "
         f"D_JS + R_H = {H_M_S:.3f} nats.")

# %% [markdown]
# ## 2. Algorithm 2, line by line
#
# In practice q(x) is not explicit: it is the decoder's marginal q(x) = E_p(z)[p(x|z)]
# (Eq. 16), and log q(x) is bounded with one importance sample. Algorithm 2 is then what
# `mim.mim_loss` runs on a batch; here it is in pieces, on the MLPs of Sec. 5.1 and the
# 2-D mixture of Sec. 5.1 (`datasets.load_dataset("toy2d")`).

# %%
data = datasets.load_dataset("toy2d")
torch.manual_seed(1)
net = mim.build_model(mim.ModelSpec(x_dim=2, z_dim=2, hidden=50), x_init=data.x_train)
x = data.x_train[:128]
torch.manual_seed(0)                       # the draws of mim.mim_loss below, in its order
p_z = net.p_z()
# line 2: D_enc = {x_i, z_i ~ q(z|x) P(x)}: log q(x,z) and log p(x,z) of encoder samples
log_q_enc, log_p_enc = mim.encoder_samples(net, x, p_z)
# line 3: L_enc = -1/N sum(log p(x_i|z_i) + log p(z_i)): the marginal q(x)'s bound makes
# log q(x,z) = log p(x,z) on encoder samples, so both CE terms are the same here
L_enc = -(0.5 * log_q_enc + 0.5 * log_p_enc).mean()
assert torch.allclose(log_q_enc, log_p_enc)
# line 4: D_dec = {x_i, z_i, z'_i ~ p(x|z) P(z) q(z'|x)}
log_q_dec, log_p_dec, score = mim.decoder_samples(net, len(x), p_z)
# line 5: L_dec, the same two CE terms on decoder samples (x is continuous: no score term)
L_dec = -(0.5 * log_q_dec + 0.5 * log_p_dec).mean()
# lines 6-7: the loss is their mean, and a gradient step minimises it
by_hand = 0.5 * (L_enc + L_dec)
torch.manual_seed(0)
reference = mim.mim_loss(net, x)[0]
print(f"Algorithm 2 by hand: {by_hand.item():.6f} nats; mim.mim_loss on the same draws: "
      f"{reference.item():.6f} nats")
assert torch.allclose(by_hand, reference) and score is None
opt = torch.optim.Adam(net.parameters(), lr=1e-3)
opt.zero_grad()
reference.backward()
opt.step()                                   # `mim.train` repeats this, with warm-up

# %% [markdown]
# ## 3. MIM against the VAE on the 2-D mixture (Sec. 5.1, Fig. 1-2)
#
# The same MLPs (50 hidden units, tanh), trained with Adam by `mim.train` (warm-up 3,
# early stopping) with MIM's loss and with the VAE's, the negative ELBO (Eq. 2). MIM's
# codes carry far more information about x: a higher mutual information (KSG) and a better
# 5-NN classification of the five components from the codes.

# %%
EPOCHS = 20            # enough to see the difference in a minute; the paper trains longer


def trained(loss, z_dim=2, seed=1):
    torch.manual_seed(seed)
    model = mim.build_model(mim.ModelSpec(x_dim=2, z_dim=z_dim, hidden=50),
                            x_init=data.x_train)
    best, best_epoch, epochs, _ = mim.train(model, loss, data.x_train, data.x_val,
                                            mim.TrainSpec(epochs=EPOCHS))
    model.load_state_dict(best)
    return model.eval()


models = {"MIM": trained(mim.mim_loss), "VAE": trained(mim.vae_loss)}
metrics = {name: evaluate.test_metrics(m, data, nll_samples=0, with_posterior_stats=True)
           for name, m in models.items()}
for name, m in metrics.items():
    print(f"{name}: MI (KSG) {m['test_mi_ksg']:.3f} nats, 5-NN {m['test_knn5_acc']:.3f}, "
          f"RMSE {m['test_rmse']:.3f}")
assert metrics["MIM"]["test_mi_ksg"] > metrics["VAE"]["test_mi_ksg"] + 1
assert metrics["MIM"]["test_knn5_acc"] > metrics["VAE"]["test_knn5_acc"]

with torch.no_grad():
    fig, axes = plt.subplots(2, 2, figsize=(8.4, 8.6), dpi=evaluate.FIGURE_DPI)
    for column, (name, m) in enumerate(models.items()):
        evaluate.plot_toy2d(m, data, f"{name}, seed 1", axes=axes[:, column])
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    save(fig, "3-fig1-mim-vae.png", f"Part 3 (Fig. 1): MIM (left) and the VAE (right) on "
         f"the 2-D mixture, MLP with 50 hidden units, {EPOCHS} epochs at most.")

# %% [markdown]
# ## 4. Posterior collapse, seen and measured
#
# A VAE's loss contains a term that rewards joint entropy (Eq. 15): its encoder can keep
# q(z|x) wide, near the prior, and the codes then say little about x. That is posterior
# collapse, partial here. Three measures of it, on the test points: the posterior's
# standard deviation (near 1, the prior's, when collapsed), the minibatch MI and the
# active units (latent dimensions whose mean code varies with x). A-MIM (Eq. 12) keeps
# only the encoder half of M_S: cheaper, and its codes are as informative.

# %%
models["A-MIM"] = trained(mim.amim_loss)
with torch.no_grad():
    for name, m in models.items():
        stats = evaluate.posterior_kl_terms(m, data.x_test)
        au = evaluate.active_units(m, data.x_test)[0]["test_au_z"]
        std = math.exp(evaluate.mean_log_std(m, data.x_test)["log_std_z"])  # geometric mean
        metrics[name] = {**metrics.get(name, {}), **stats, "std": std, "au": au}
        print(f"{name}: posterior std {std:.2g}, minibatch MI {stats['test_mi_batch']:.3f} "
              f"nats (at most log B = {stats['test_mi_batch_cap']:.3f}), active units {au}")
assert metrics["VAE"]["std"] > 3 * metrics["MIM"]["std"]
assert metrics["MIM"]["test_mi_batch"] > metrics["VAE"]["test_mi_batch"]

# %% [markdown]
# Warm-up (Sec. 5) eases the start: the weight on the decoder CE term of Eq. 8 rises from
# 0 to 1/2 over the warm-up epochs (the VAE's KL weight from 0 to 1), so that the encoder
# learns from data before the decoder's samples weigh in:

# %%
for progress in (0.0, 1.0, 2.0, 3.0):
    w = mim.warmup_weights("paper", progress, 3)
    print(f"epoch {progress:.0f} of 3: decoder CE weight {w.p:.3f}, VAE KL weight "
          f"{w.kl:.3f}")
assert mim.warmup_weights("paper", 3.0, 3) == mim.FULL

with torch.no_grad():
    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=evaluate.FIGURE_DPI)
    for name, m in models.items():
        std = m.q_z_given_x(data.x_test).stddev.mean(1)
        ax.hist(std.log10().numpy(), bins=60, histtype="step", label=name)
    ax.set(xlabel="log10 of the posterior's std (prior: 0)", ylabel="test points",
           title="How wide is q(z|x)?")
    ax.legend()
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    save(fig, "4-posterior-widths.png", "Part 4: the mean std of q(z|x) per test point "
         "on the 2-D mixture; the VAE's stay wide (about 0.4, against the prior's 1: "
         "partial collapse), MIM's and A-MIM's are sharp.")

# %% [markdown]
# ## 5. Bring your own networks
#
# `mim.Model` takes any encoder and decoder that keep the contract in its docstring: each
# is a module returning a `torch.distributions` object with one event dimension,
# `rsample` and `log_prob`; the decoder says whether its x are `discrete`; the prior is
# a module called with the encoder of the top latent. Here, a pair with GELU and a skip
# connection, trained with `mim_loss` and then `amim_loss`:

# %%
class GeluGaussian(nn.Module):
    """in (B, I) -> N(mu, sigma^2) over out dimensions, by a GELU MLP with a skip."""
    discrete = False

    def __init__(self, n_in, n_out, hidden=32):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(n_in, hidden), nn.GELU(),
                                  nn.Linear(hidden, 2 * n_out))
        self.skip = nn.Linear(n_in, n_out)

    def forward(self, v):
        mean, raw_std = self.body(v).chunk(2, dim=-1)
        std = nn.functional.softplus(raw_std) + 1e-4         # a floor, as mim.STD_FLOOR
        return mim.diag_gaussian(mean + self.skip(v), std)


torch.manual_seed(3)
own = mim.Model(GeluGaussian(2, 2), GeluGaussian(2, 2), mim.StandardNormal(2), None, 2)
for loss in (mim.mim_loss, mim.amim_loss):
    _, _, _, history = mim.train(own, loss, data.x_train[:4000], data.x_val[:1000],
                                 mim.TrainSpec(epochs=4, warmup=1, patience=4))
    first, last = history[0]["val_loss"], history[-1]["val_loss"]
    print(f"{loss.__name__}: validation loss {first:.3f} -> {last:.3f} nats in "
          f"{len(history)} epochs")
    assert last < first

# %% [markdown]
# A network that breaks the contract is stopped at its first output, with what is wrong:

# %%
class ReturnsATensor(GeluGaussian):
    def forward(self, v):
        return super().forward(v).mean                       # a tensor, not a distribution


broken = mim.Model(GeluGaussian(2, 2), ReturnsATensor(2, 2), mim.StandardNormal(2), None, 2)
try:
    mim.mim_loss(broken, data.x_train[:8])
    raise AssertionError("the broken decoder was not caught")
except TypeError as error:
    print(f"TypeError: {error}")
    assert "p_x_given_z returned Tensor, not a torch.distributions object" in str(error)

print(f"\nThe tutorial's numbers hold; figures in {OUT}")
