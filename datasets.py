"""Data sets for the MIM experiments.

Synthetic Gaussian mixtures with fixed train / validation / test samples drawn from a
seed, labelled by the component that drew each point:

    toy2d   Sec. 5.1, Fig. 1-2: five isotropic components (std 0.25) in 2-D, one at the
            origin and four on the unit circle at 0, 72, 144 and 216 degrees.
    toy20d  App. F.5, Fig. 15: the same five components lifted to 20-D.
    toy1d   App. F.2, Fig. 12: a three-component mixture in 1-D.

The authors' code draws fresh samples every epoch and early-stops on a test set that is
also redrawn every epoch; here the three splits are fixed and disjoint, and early stopping
uses the validation split only.
"""
import math
from dataclasses import dataclass, replace

import numpy as np
import torch

SPLIT_SIZES = (10_000, 10_000, 10_000)  # train, validation, test; Sec. 5.1 uses 10,000
                                         # samples per epoch
TOY_STD = 0.25                           # component std of Sec. 5.1


@dataclass
class Dataset:
    """Three labelled splits; x (N, D) float32 and y (N,) int64 tensors."""
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    binary: bool = False
    anchor: "GaussianMixture | None" = None   # P(x) where it is known in closed form

    @property
    def x_dim(self):
        return self.x_train.shape[1]

    def to(self, device):
        moved = {k: v.to(device) for k, v in vars(self).items() if torch.is_tensor(v)}
        return replace(self, **moved)


@dataclass
class GaussianMixture:
    """An equally weighted mixture of isotropic Gaussians: means (K, D), one std."""
    means: np.ndarray
    std: float

    def sample(self, n, rng):
        labels = rng.integers(len(self.means), size=n)
        x = self.means[labels] + self.std * rng.standard_normal((n, self.means.shape[1]))
        return torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(labels)

    def log_prob(self, x):
        """log P(x) in nats for x (N, D), by logsumexp over components."""
        x = torch.as_tensor(x, dtype=torch.float64)
        means = torch.as_tensor(self.means, dtype=torch.float64)
        d = means.shape[1]
        sq = ((x[:, None, :] - means[None]) ** 2).sum(-1) / self.std ** 2    # (N, K)
        log_norm = d * math.log(self.std * math.sqrt(2 * math.pi)) + math.log(len(means))
        return torch.logsumexp(-0.5 * sq, dim=1) - log_norm


def pentagon_means():
    """The origin and four points on the unit circle at 0, 72, 144 and 216 degrees."""
    angles = np.deg2rad([0.0, 72.0, 144.0, 216.0])
    return np.vstack([[0.0, 0.0], np.stack([np.cos(angles), np.sin(angles)], axis=1)])


def toy2d():
    return GaussianMixture(pentagon_means(), TOY_STD)


def toy20d():
    """toy2d's means in the first two coordinates; the other 18 drawn once from N(0, 1).

    The authors' code fills those 18 coordinates with a linspace from -50 to 50, which puts
    the inputs far outside the range of a tanh network; unit-scale means keep the five
    components separable in 20-D at the scale of the 2-D problem.
    """
    lift = np.random.default_rng(20).standard_normal((5, 18))
    return GaussianMixture(np.hstack([pentagon_means(), lift]), TOY_STD)


def toy1d():
    return GaussianMixture(np.array([[-2.0], [0.0], [2.0]]), 0.4)


DATASETS = {"toy2d": toy2d, "toy20d": toy20d, "toy1d": toy1d}


def load_dataset(name, seed=0, sizes=SPLIT_SIZES):
    """The data set `name` with train / validation / test splits of `sizes` from `seed`."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose from {', '.join(DATASETS)}")
    anchor = DATASETS[name]()
    rng = np.random.default_rng(seed)
    splits = [anchor.sample(n, rng) for n in sizes]
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = splits
    return Dataset(name, x_train, y_train, x_val, y_val, x_test, y_test, anchor=anchor)
