"""Evaluation of trained MIM / VAE models: the metrics of Sec. 5 and the figures.

    ksg_mi                 mutual information I(x; z) by the KSG estimator, nats
    knn_accuracy           k-NN classification accuracy of latent codes (Sec. 5.3)
    reconstruction_rmse    root mean squared reconstruction error
    iwae_nll               importance-weighted estimate of -log p(x), nats
    consistency_1d         App. F.2: do the marginals of encoder and decoder match the priors?

Command line:

    python evaluate.py RUN_DIR [RUN_DIR ...]      plots of trained runs (2-D: Fig. 1,
                                                  1-D: Fig. 12) next to their best.pt
    python evaluate.py --summary DIR [--x hidden] mean and std over seeds of every
                                                  DIR/*/results.json: summary.md, .png
"""
import argparse
import glob
import json
import math
import os
import sys

import numpy as np
import torch
from scipy.spatial import cKDTree
from scipy.special import digamma
from scipy.stats import kstest, norm

import mim

METRICS = {  # results.json key: (label, unit)
    "test_mi_ksg": ("MI (KSG, k=5)", "nats"),
    "test_nll": ("NLL (IWAE)", "nats"),
    "test_rmse": ("reconstruction RMSE", "data units"),
    "test_knn5_acc": ("5-NN accuracy", "fraction"),
    "train_seconds": ("training time", "s"),
}


# ----------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------

def ksg_mi(x, z, k=5):
    """I(x; z) in nats by the first KSG estimator (Kraskov, Stoegbauer & Grassberger 2004,
    Eq. 8) with the max-norm:

        I = psi(k) + psi(N) - mean_i [psi(n_x(i) + 1) + psi(n_z(i) + 1)],

    where eps_i is the max-norm distance from (x_i, z_i) to its k-th nearest neighbour in
    the joint space and n_x(i) counts the points j != i with |x_j - x_i|_max < eps_i.
    One k-d tree query answers all points at once. x (N, Dx), z (N, Dz).
    """
    x, z = (np.asarray(a, dtype=np.float64).reshape(len(a), -1) for a in (x, z))
    if len(x) != len(z) or len(x) <= k:
        raise ValueError(f"ksg_mi needs paired samples, more than k={k}: got {len(x)}, {len(z)}")
    joint = np.hstack([x, z])
    eps = cKDTree(joint).query(joint, k=k + 1, p=np.inf, workers=-1)[0][:, k]
    radius = np.nextafter(eps, 0)  # strictly inside eps; the count includes the point itself
    n_x1 = cKDTree(x).query_ball_point(x, radius, p=np.inf, return_length=True, workers=-1)
    n_z1 = cKDTree(z).query_ball_point(z, radius, p=np.inf, return_length=True, workers=-1)
    return float(digamma(k) + digamma(len(x)) - np.mean(digamma(n_x1) + digamma(n_z1)))


def knn_accuracy(z_train, y_train, z_test, y_test, k=5):
    """Accuracy of a k-nearest-neighbour classifier (Euclidean) fitted on training codes."""
    from sklearn.neighbors import KNeighborsClassifier
    clf = KNeighborsClassifier(n_neighbors=k).fit(np.asarray(z_train), np.asarray(y_train))
    return float(clf.score(np.asarray(z_test), np.asarray(y_test)))


@torch.no_grad()
def encode(model, x, batch_size=10_000):
    """One code z ~ q(z|x) per row of x: the stochastic codes whose MI the paper reports."""
    return torch.cat([model.q_z_given_x(xb).sample() for xb in x.split(batch_size)])


@torch.no_grad()
def reconstruction_rmse(model, x):
    """sqrt(mean_i |x_i - xhat_i|^2), Euclidean over the dimensions of x, where xhat_i is the
    mean of p(x | z_i) for one code z_i ~ q(z|x_i).

    (The authors' code reports mean_i |x_i - x~_i| with x~_i a sample of p(x|z_i).)
    """
    xhat = model.p_x_given_z(encode(model, x)).mean
    return float(((x - xhat) ** 2).sum(-1).mean().sqrt())


@torch.no_grad()
def iwae_nll(model, x, num_samples, max_batch=2 ** 20):
    """-log p(x) for each row of x (N, D), in nats, by importance sampling (Burda et al. 2016):

        -log (1/S) sum_s p(x|z_s) p(z_s) / q(z_s|x),   z_s ~ q(z|x), S = num_samples.

    S = 1 gives the negative ELBO; the estimate approaches -log p(x) from above as S grows.
    Batched over points and samples: each chunk decodes at most max_batch codes.
    """
    S, out = num_samples, []
    for xb in x.split(max(1, max_batch // S)):
        q_z_given_x = model.q_z_given_x(xb)
        z = q_z_given_x.sample((S,))                                    # (S, b, Z)
        flat = z.flatten(0, 1)                                          # (S*b, Z)
        x_rep = xb.expand(S, *xb.shape).flatten(0, 1)                   # (S*b, D)
        log_w = (model.p_x_given_z(flat).log_prob(x_rep) + model.log_p_z(flat)
                 ).view(S, -1) - q_z_given_x.log_prob(z)                # (S, b)
        out.append(math.log(S) - torch.logsumexp(log_w, dim=0))
    return torch.cat(out)


def test_metrics(model, data, nll_samples):
    """The metrics of Fig. 2 on the test split, and those of App. F.2 for 1-D models."""
    model.eval()
    z_train, z_test = encode(model, data.x_train), encode(model, data.x_test)
    results = {
        "test_mi_ksg": ksg_mi(data.x_test.cpu(), z_test.cpu()),
        "test_nll": float(iwae_nll(model, data.x_test, nll_samples).mean()),
        "test_rmse": reconstruction_rmse(model, data.x_test),
        "test_knn5_acc": knn_accuracy(z_train.cpu(), data.y_train.cpu(),
                                      z_test.cpu(), data.y_test.cpu()),
        "nll_samples": nll_samples,
    }
    if data.x_dim == 1 and z_test.shape[1] == 1 and data.anchor is not None:
        results.update(consistency_1d(model, data.anchor))
    return results


def format_results(results):
    lines = []
    for key, value in results.items():
        label, unit = METRICS.get(key, (None, ""))
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"{key:<16} {text:>10}  {unit:<10}  {label or ''}".rstrip())
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# App. F.2: consistency of the marginals in 1-D, by Kolmogorov-Smirnov distances
# ----------------------------------------------------------------------------------------

def cdf_1d(dist):
    """The CDF of a 1-D StandardNormal / MixtureOfGaussians distribution, as a numpy function."""
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
    device = next(model.parameters()).device
    rng = np.random.default_rng(0)
    P_x = anchor.sample(n, rng)[0].to(device)
    P_x_cdf = lambda v: norm.cdf((np.asarray(v)[:, None] - anchor.means[:, 0]) / anchor.std
                                 ).mean(1)

    def ks(samples, cdf):
        return float(kstest(samples.cpu().numpy().ravel(), cdf).statistic)

    out = {
        "ks_anchor_x": ks(model.p_x_given_z(model.P_z().sample((n,))).sample(), P_x_cdf),
        "ks_anchor_z": ks(model.q_z_given_x(P_x).sample(), cdf_1d(model.P_z())),
    }
    if model.q_x is not None:
        out["ks_prior_x"] = ks(model.p_x_given_z(model.p_z().sample((n,))).sample(),
                               cdf_1d(model.q_x()))
        out["ks_prior_z"] = ks(model.q_z_given_x(model.q_x().sample((n,))).sample(),
                               cdf_1d(model.p_z()))
    return out


# ----------------------------------------------------------------------------------------
# Summaries over runs: mean and std over seeds
# ----------------------------------------------------------------------------------------

def load_runs(folder):
    runs = []
    for path in sorted(glob.glob(os.path.join(folder, "*", "results.json"))):
        run_dir = os.path.dirname(path)
        with open(os.path.join(run_dir, "config.json")) as f:
            cfg = json.load(f)
        with open(path) as f:
            runs.append((cfg, json.load(f)))
    if not runs:
        raise ValueError(f"no */results.json under {folder}; train runs with mim.py --out first")
    return runs


def summarize(runs):
    """Group runs by the config values that differ between them (seed and out aside).
    Returns (group keys, {group: {metric: (mean, std, n)}})."""
    varying = [k for k in runs[0][0] if k not in ("seed", "out")
               and len({json.dumps(c.get(k)) for c, _ in runs}) > 1]
    groups = {}
    for cfg, res in runs:
        groups.setdefault(tuple(cfg[k] for k in varying), []).append(res)
    table = {}
    def order(item):  # numbers by value, then everything else by name
        return [(0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v)) for v in item[0]]

    for key, results in sorted(groups.items(), key=order):
        metrics = [m for m in results[0] if isinstance(results[0][m], (int, float))]
        table[key] = {m: (float(np.mean([r[m] for r in results])),
                          float(np.std([r[m] for r in results])), len(results))
                      for m in metrics}
    return varying, table


def number(v):
    return f"{v:.3f}" if abs(v) < 1e4 else f"{v:.3g}"


def summary_markdown(varying, table, metrics):
    head = varying + [f"{METRICS[m][0]} ({METRICS[m][1]})" if m in METRICS else m
                      for m in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for key, row in table.items():
        cells = [str(v) for v in key] + [
            f"{number(row[m][0])} ± {number(row[m][1])}" if m in row else "" for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    n = sorted({row[m][2] for row in table.values() for m in row})
    lines.append(f"\nmean ± std (ddof = 0) over {', '.join(map(str, n))} seeds")
    return "\n".join(lines) + "\n"


def plot_summary(varying, table, metrics, x_key, path):
    """One panel per metric against x_key, one line per remaining group (Fig. 2 layout)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xi = varying.index(x_key)
    series = {}
    for key, row in table.items():
        name = ", ".join(str(v) for i, v in enumerate(key) if i != xi)
        series.setdefault(name, []).append((key[xi], row))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.2))
    for ax, m in zip(np.atleast_1d(axes), metrics):
        for name, points in series.items():
            points.sort(key=lambda p: p[0])
            ax.errorbar([p[0] for p in points], [p[1][m][0] for p in points],
                        yerr=[p[1][m][1] for p in points], marker="o", capsize=3, label=name)
        label, unit = METRICS.get(m, (m, ""))
        ax.set(title=label, xlabel=x_key, ylabel=unit)
    np.atleast_1d(axes)[0].legend()
    fig.tight_layout()
    mim.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def write_text(path, text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    mim.atomic_write(path, write)


def write_summary(folder, x_key=None):
    runs = load_runs(folder)
    varying, table = summarize(runs)
    metrics = [m for m in METRICS if m in runs[0][1]] + sorted(
        m for m in runs[0][1] if m.startswith("ks_"))
    text = summary_markdown(varying, table, metrics)
    write_text(os.path.join(folder, "summary.md"), text)
    if x_key in varying:
        plot_summary(varying, table, metrics, x_key, os.path.join(folder, "summary.png"))
    return text


# ----------------------------------------------------------------------------------------
# Figures of single runs
# ----------------------------------------------------------------------------------------

@torch.no_grad()
def plot_toy2d(model, data, title, path, n_points=300):
    """Fig. 1: top, level sets of P(x) and reconstructed test points; bottom, one-std
    ellipses of q(z|x) for test points and the unit circle of P(z)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Ellipse

    x = data.x_test[:n_points]
    q_z_given_x = model.q_z_given_x(x)
    xhat = model.p_x_given_z(q_z_given_x.sample()).mean.cpu()
    grid = torch.linspace(-2, 2, 200)
    gx, gy = torch.meshgrid(grid, grid, indexing="xy")
    density = data.anchor.log_prob(torch.stack([gx, gy], -1).view(-1, 2)).exp().view(200, 200)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(3.2, 6.4))
    top.contour(gx, gy, density, levels=6, colors="k", linewidths=0.6)
    top.scatter(xhat[:, 0], xhat[:, 1], s=3, c="r")
    top.set(title=title, xlim=(-2, 2), ylim=(-2, 2), aspect="equal")
    loc, scale = (t.cpu() for t in (q_z_given_x.mean, q_z_given_x.stddev))
    for (mx, my), (sx, sy) in zip(loc.tolist(), scale.tolist()):
        bottom.add_patch(Ellipse((mx, my), 2 * sx, 2 * sy, fill=False, color="g", lw=0.5))
    bottom.add_patch(plt.Circle((0, 0), 1, fill=False, ls="--", color="k"))
    lim = max(3.0, float(loc.abs().max()) + 0.5)
    bottom.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal")
    fig.tight_layout()
    mim.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=150))
    plt.close(fig)


@torch.no_grad()
def plot_consistency_1d(model, data, title, path, n=50_000):
    """Fig. 12 (c-f): marginals of anchored and prior-driven encoder and decoder against
    the anchors P(x), P(z) (black) and the priors q(x) (red), p(z) (blue)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    v = torch.linspace(-6, 6, 600)[:, None]
    x_anchor = data.x_train[:n]
    rows = [("anchored", model.p_x_given_z(model.P_z().sample((n,))).sample(),
             model.q_z_given_x(x_anchor).sample(), data.anchor.log_prob(v).exp(),
             model.P_z().log_prob(v).exp(), "k")]
    if model.q_x is not None:
        rows.append(("priors", model.p_x_given_z(model.p_z().sample((n,))).sample(),
                     model.q_z_given_x(model.q_x().sample((n,))).sample(),
                     model.q_x().log_prob(v).exp(), model.p_z().log_prob(v).exp(), "rb"))
    fig, axes = plt.subplots(2, len(rows), figsize=(3.6 * len(rows), 5), squeeze=False)
    for j, (name, xs, zs, dx, dz, colours) in enumerate(rows):
        for i, (s, d, var) in enumerate([(xs, dx, "x"), (zs, dz, "z")]):
            ax = axes[i, j]
            ax.hist(s.cpu().numpy().ravel(), bins=120, range=(-6, 6), density=True,
                    color="g" if var == "x" else "y", alpha=0.6)
            ax.plot(v.numpy().ravel(), d.numpy().ravel(), colours[min(i, len(colours) - 1)])
            ax.set(title=f"{title}: {name}, {var}", xlim=(-6, 6))
    fig.tight_layout()
    mim.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def plot_run(run_dir):
    """The figure for one trained run, written next to its best.pt."""
    import datasets
    model, cfg = mim.load_checkpoint(os.path.join(run_dir, "best.pt"))
    data = datasets.load_dataset(cfg.data, seed=cfg.data_seed)
    title = f"{cfg.loss.upper()} h={cfg.hidden}"
    if data.x_dim == 2 and cfg.z_dim == 2:
        plot_toy2d(model.eval(), data, title, os.path.join(run_dir, "fig1.png"))
    elif data.x_dim == 1 and cfg.z_dim == 1:
        plot_consistency_1d(model.eval(), data, title, os.path.join(run_dir, "consistency.png"))
    else:
        raise ValueError(f"{run_dir}: no plot for {data.x_dim}-D x and {cfg.z_dim}-D z")


def main(argv=None):
    parser = mim.OneLineParser(prog="evaluate.py", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="*", help="run directories (mim.py --out) to plot")
    parser.add_argument("--summary", metavar="DIR",
                        help="write DIR/summary.md (and .png) over DIR/*/results.json")
    parser.add_argument("--x", default="hidden", help="x-axis of the summary plot")
    args = parser.parse_args(argv)
    if not args.runs and not args.summary:
        parser.error("give run directories to plot, or --summary DIR")
    try:
        for run_dir in args.runs:
            if not os.path.exists(os.path.join(run_dir, "best.pt")):
                raise ValueError(f"{run_dir}/best.pt not found; train with mim.py --out "
                                 f"{run_dir} first")
            plot_run(run_dir)
        if args.summary:
            print(write_summary(args.summary, args.x))
    except (ValueError, OSError, KeyError) as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
