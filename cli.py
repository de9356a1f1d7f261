"""The command line of mim.py: `python mim.py ...` hands over to main() here.

    python mim.py [flags]                     train (and test); --out DIR keeps a run folder
    python mim.py --resume DIR [--epochs N]   continue an interrupted or finished run
    python mim.py evaluate RUN_DIR ...        evaluate.py's metrics and figures of runs
    python mim.py evaluate --summary DIR      mean and std over seeds of DIR/*/
    python mim.py evaluate --summary DIR --compare loss   and runs compared point by point

mim.py is the library and knows nothing of this file; this file adds what a program needs
around it, in the order a run meets it: the run folder's format (1), the flags, generated
from the library's specs (2), the device and the process (3), the run folder itself (4),
checkpoints and --resume (5), the data (6), the model (7), training (8), the one-line
errors and signals (9), then the evaluate command (10) and summaries over seeds and
paired comparisons (11).
It needs datasets.py and evaluate.py from this repository beside it.
"""
import argparse
import contextlib
import ctypes
import dataclasses
import errno
import functools
import glob
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import field
from typing import Optional

try:
    import fcntl  # POSIX: run folders are locked; elsewhere they are not
except ImportError:
    fcntl = None

import numpy as np
import torch

import mim


def sibling(name):
    """This checkout's datasets.py or evaluate.py, loaded by its path under a private
    module name, so that a package of the same name elsewhere on sys.path (Hugging Face's
    `datasets` and `evaluate`) never stands in for it; where `import name` already gave
    this very file, that module is used."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), name + ".py")
    module = sys.modules.get(name)
    if module is not None and os.path.abspath(getattr(module, "__file__", "") or "") == path:
        return module
    key = "_mim_" + name
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[key]
            raise
    return sys.modules[key]


datasets = sibling("datasets")
evaluate = sibling("evaluate")


# ----------------------------------------------------------------------------------------
# 1. The run folder's format, owned here: the files a run holds, what its checkpoints keep
# beside the model, and which settings a summary reads as names rather than as the run's
# kind. The parts below, bench.py and run_all.sh take them from here.
# ----------------------------------------------------------------------------------------

class UsageError(Exception):
    """Bad input to the command line: reported as one line, exit status 2."""


# The files of a run folder (--out DIR). Training writes CONFIG, LOG and LAST every epoch,
# BEST when the validation loss improves and RESULTS at its end; mim.py evaluate adds
# EVALUATION, POINTS (each test point's scores, for paired comparisons) and the figures,
# --gradient-noise GRADIENT_NOISE. run_all.sh reads these names from here.
CONFIG = "config.json"
LOG = "log.csv"
LAST = "last.pt"
BEST = "best.pt"
RESULTS = "results.json"
EVALUATION = "eval.json"
POINTS = "points.csv"
GRADIENT_NOISE = "gradient_noise.json"
FIGURE_FORMATS = ("png", "pdf", "svg")    # mim.py evaluate --format
FIGURES = ("fig1", "consistency", "tsne", "reconstructions", "samples", "training")
# What a finished run adds to its folder after training: removed when --overwrite replaces
# the run (CONFIG, LOG and LAST are rewritten).
RUN_OUTPUTS = (BEST, RESULTS, EVALUATION, POINTS, GRADIENT_NOISE,
               *(f"{name}.{fmt}" for name in FIGURES for fmt in FIGURE_FORMATS))
RUN_FILES = (CONFIG, LOG, LAST, *RUN_OUTPUTS)
RUN_FILE_STEMS = {name.split(".")[0] for name in RUN_FILES}

# What a run's checkpoints keep beside the model (mim.save_checkpoint's extra): every one
# the flags and the data's identity; LAST also the training state.
CHECKPOINT_KEYS = {"config", "data"}
RESUME_KEYS = {"optimizer", "progress", "best_model", "rng"}

# Settings of CONFIG that name a run or say where and how it ran, not what it is: a
# summary does not group runs by them (a run resumed on another device belongs with its
# seeds).
NAMING_KEYS = ("seed", "out", "resume", "overwrite", "device", "deterministic",
               "environment", "tensorboard")
# How a run's metrics were measured, not metrics: seeds of one group that differ in them
# average unlike numbers (an NLL of S = 50 with one of S = 1000), which the summary marks.
MEASURED_WITH = ("metrics_from", "nll_samples", "nll_points", "test_size", "knn_train_size")


# ----------------------------------------------------------------------------------------
# 2. Arguments: a flag for every field of the library's specs, the command line's own
# flags, presets, and every value checked before anything is written
# ----------------------------------------------------------------------------------------

PCA_STD_FLOOR = 0.1      # pca_fashion_mnist: with 1e-4, MIM's decoder std sat at the floor
                         # for z ~ P(z) and its loss exploded (RESULTS.md, "Fig. 3: 20-D
                         # PCA Fashion-MNIST")
IMAGE_Z_DIM = 40         # z1 and z2 of the two-level models (Tomczak & Welling 2018)
IMAGE_WARMUP = 5         # warm-up epochs of the image architectures (RESULTS.md, "Images:
                         # making MIM and A-MIM learn informative codes")
IMAGE_WARMUP_MODE = "prior"   # ... and their warm-up (see warmup_weights)


# Every flag's help, in the order of --help. A flag named like a field of ModelSpec,
# TrainSpec or DecoderSampling sets that field and takes its default from there (or, for
# DATA_DEPENDENT ones, from data_defaults); the rest are the command line's own (OWN_FLAGS).
HELP = {
    "data": "data set (datasets.py): toy2d, toy20d, toy1d, pca_fashion_mnist, mnist, "
            "fashion_mnist or omniglot",
    "data_seed": "seed of the fixed train/validation/test samples",
    "data_dir": "folder holding the image files, the only place they are read from (see "
                "datasets.py)",
    "pca_dim": "principal components of pca_fashion_mnist (Sec. 5.1)",
    "train_size": "train on the first N training points only (quick runs; default: all)",
    "arch": "network architecture: mlp (Sec. 5.1), convhvae or pixelhvae (Sec. 5.2, two "
            "latent levels)",
    "hidden": "hidden units of each two-layer network",
    "activation": "hidden activation: tanh (Sec. 5.1) or silu (App. F.2)",
    "z_dim": f"latent dimension, per level for convhvae / pixelhvae (default: "
             f"{mim.ModelSpec.z_dim} for mlp, {IMAGE_Z_DIM} for the image architectures)",
    "prior": "latent prior p(z) (of z2 for two levels): normal (= the anchor P(z)), mog or "
             "vamp (VampPrior)",
    "prior_components": f"components K of p(z) (default: {mim.MOG_COMPONENTS} for mog, "
                        f"{mim.VAMP_COMPONENTS} for vamp)",
    "q_x": "data prior q(x): marginal (Eq. 16) or mog (explicit, low-dim x)",
    "components": "components of the mog q(x)",
    "std_floor": f"floor added to every Gaussian standard deviation (default: "
                 f"{PCA_STD_FLOOR} for pca_fashion_mnist, {mim.ModelSpec.std_floor} "
                 "otherwise)",
    "init": "initial weights of the dense layers: torch (its default) or he "
            "(N(0, 2 / fan_in), the authors' image code)",
    "prob_clamp": "keep the probabilities of Bernoulli decoders in [c, 1 - c] (the "
                  "authors' code: 1e-5; default: not clamped)",
    "pseudo_init": "start of the VampPrior's K pseudo-inputs: random (K training points "
                   "drawn at random) or authors (the first K plus N(0, "
                   f"{mim.PSEUDO_INPUT_NOISE}^2) noise, the authors' code)",
    "loss": "objective: mim (Eq. 8), amim (Eq. 12), vae (negative ELBO), ce (Eq. 7); for "
            "comparison infomax (InfoMax-VAE) or the inference critics critic-self, "
            "critic-nn, critic-hybrid",
    "alpha": "infomax: weight of the mutual-information bound (InfoMax-VAE Eq. 3; 10 in "
             "its Sec. 6.1)",
    "beta": "infomax: weight of the ELBO's KL term (InfoMax-VAE Eq. 3)",
    "mi_bound": "infomax: f (f-divergence dual with f(t) = t log t, its Eq. 6) or dv "
                "(Donsker-Varadhan, its Eq. 12)",
    "critic_weight": "critic-*: weight lambda of the InfoNCE term (critics paper, Alg. 1; "
                     "Eq. 7 has 1)",
    "latent_anchor": "where decoder samples draw z: normal (P(z) = N(0, I), the paper) or "
                     "prior (the model prior p(z), without gradients)",
    "estimator": "gradient of binary decoder samples: loo-code (several images per code, "
                 "per-code leave-one-out baseline), loo-batch (one image per code, batch "
                 "baseline) or authors (the authors' image code: reparameterized codes "
                 "from p(z), mean images, no decoder gradient); see DecoderSampling",
    "draws": "loo-code: images per code; divides --batch-size",
    "epochs": "maximum number of epochs",
    "batch_size": "data points per step (B encoder + B decoder samples)",
    "lr": "Adam learning rate",
    "critic_lr": "Adam learning rate of a critic network (InfoMax-VAE App. D)",
    "optimizer": "adam, or normgrad: Adam on per-tensor normalized gradients (Tomczak & "
                 "Welling's code)",
    "warmup": f"warm-up epochs (Sec. 5; default {mim.TrainSpec.warmup} for mlp, "
              f"{IMAGE_WARMUP} for the image architectures)",
    "warmup_mode": "paper: weight on CE(M_S, p(x,z)) rises 0 -> 1/2 (Sec. 5); prior: "
                   "weight beta on log p(z) rises 0 -> 1 (KL annealing's analogue); "
                   "authors: their code's schedule (see warmup_weights). Default: "
                   f"{mim.TrainSpec.warmup_mode} for mlp, {IMAGE_WARMUP_MODE} for the image "
                   "architectures",
    "patience": "early-stopping patience in epochs (default: --warmup, at least 1)",
    "best_in_warmup": "let the best model (best.pt) come from a warm-up epoch, as the "
                      "authors' code does",
    "amp": "run the networks in bfloat16 (autocast); log-densities, logsumexp and losses "
           "stay in float32",
    "seed": "seed of initialisation and sampling",
    "preset": "authors: the authors' image protocol (PRESETS: their decoder samples, "
              "initialisation, optimizer, clamping, warm-up and early stopping); flags "
              "given explicitly override it",
    "device": "auto, cpu or cuda",
    "deterministic": "deterministic cuDNN and torch algorithms, so that a run and its "
                     "resume repeat bit for bit on a GPU (the CPU is deterministic "
                     "without it); slower on CUDA",
    "nll_samples": "importance samples per test point for the test NLL (default: 1000; 0 "
                   "= skip, the default for images, whose NLL mim.py evaluate computes)",
    "out": "directory for config.json, log.csv, last.pt, best.pt, results.json",
    "resume": "continue the interrupted run in this directory from its last.pt, with its "
              "saved configuration",
    "tensorboard": "also log every epoch's row to TensorBoard in this directory (needs "
                   "the tensorboard package; optional)",
    "overwrite": "let --out replace the run its folder holds (once the new run has "
                 "finished its first epoch)",
}

OWN_FLAGS = {  # the command line's own settings, (type, default): no spec holds them
    "data": (str, "toy2d"), "data_seed": (int, 0), "data_dir": (Optional[str], None),
    "pca_dim": (int, 20), "train_size": (Optional[int], None), "loss": (str, "mim"),
    "alpha": (float, 10.0), "beta": (float, 1.0), "mi_bound": (str, "f"),
    "critic_weight": (float, 1.0), "seed": (int, 1), "preset": (Optional[str], None),
    "device": (str, "auto"), "deterministic": (bool, False),
    "nll_samples": (Optional[int], None), "out": (Optional[str], None),
    "resume": (Optional[str], None), "tensorboard": (Optional[str], None),
    "overwrite": (bool, False),
}
SPECS = (mim.ModelSpec, mim.DecoderSampling, mim.TrainSpec)  # their fields are flags, but
FROM_DATA = {"x_dim", "binary", "image_shape", "critic"}    # these come from the data
DATA_DEPENDENT = {"z_dim", "std_floor", "warmup", "warmup_mode", "prior_components"}


def data_defaults(cfg):
    """The defaults that depend on the data set or the architecture: the image models'
    (Tomczak & Welling's sizes, our warm-up) and pca_fashion_mnist's floor."""
    image = cfg.arch != "mlp"
    return {"z_dim": IMAGE_Z_DIM if image else mim.ModelSpec.z_dim,
            "std_floor": (PCA_STD_FLOOR if cfg.data == "pca_fashion_mnist"
                          else mim.ModelSpec.std_floor),
            "warmup": IMAGE_WARMUP if image else mim.TrainSpec.warmup,
            "warmup_mode": IMAGE_WARMUP_MODE if image else mim.TrainSpec.warmup_mode,
            "prior_components": mim.default_prior_components(cfg.prior)}


def config_fields():
    """(name, type, field) of every flag in HELP's order; DATA_DEPENDENT ones are None
    until data_defaults fills them in."""
    spec_fields = {f.name: f for spec in SPECS for f in dataclasses.fields(spec)
                   if f.name not in FROM_DATA}
    rows = []
    for name in HELP:
        if name in OWN_FLAGS:
            kind, default = OWN_FLAGS[name]
        else:
            f = spec_fields[name]
            kind, default = f.type, None if name in DATA_DEPENDENT else f.default
        rows.append((name, Optional[kind] if default is None else kind,
                     field(default=default)))
    assert {r[0] for r in rows} == set(OWN_FLAGS) | set(spec_fields), "a flag lacks help"
    return rows


def _fill_data_defaults(cfg):
    for name, value in data_defaults(cfg).items():
        if getattr(cfg, name) is None:
            setattr(cfg, name, value)


# The flags as one flat record (config.json of a run); spec_of(cls, cfg) takes a spec out.
Config = dataclasses.make_dataclass("Config", config_fields(),
                                    namespace={"__post_init__": _fill_data_defaults})


def spec_of(cls, cfg, **from_data):
    """The spec `cls` (ModelSpec, TrainSpec, DecoderSampling) that the flags in cfg set."""
    return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)
                  if f.name not in FROM_DATA}, **from_data)


LOSSES = {"mim": mim.mim_loss, "amim": mim.amim_loss, "vae": mim.vae_loss,
          "ce": mim.ce_loss, "infomax": mim.infomax_loss, "critic-self": mim.critic_loss,
          "critic-nn": mim.network_critic_loss,       # the model's critic tells the two apart
          "critic-hybrid": mim.network_critic_loss}
CRITIC_OF_LOSS = {"infomax": "joint", "critic-nn": "separable", "critic-hybrid": "hybrid"}


# --preset: the Config fields each preset sets, unless given on the command line.
# authors: the image protocol of the authors' code (seraphlabs-ca/MIM, vae-as-mim-image.py
# with its defaults, as their README runs it); --loss picks the row of their table: mim on
# convhvae is their convhvae_2level-smim, amim their -amim, vae their VAE. Their early
# stopping ends a run after 50 epochs without improvement counted from the warm-up's end
# ("e > 50"), which is patience 51 here. README and RESULTS.md, "Departures from the
# authors' code", say what differs still.
PRESETS = {"authors": {"warmup_mode": "authors", "warmup": 100, "epochs": 2000,
                       "patience": 51, "best_in_warmup": True, "lr": 5e-4,
                       "batch_size": 100, "optimizer": "normgrad", "init": "he",
                       "pseudo_init": "authors", "prob_clamp": 1e-5,
                       "latent_anchor": "prior", "estimator": "authors"}}

CHOICES = {"arch": mim.ARCHS, "activation": mim.ACTIVATIONS, "prior": mim.PRIORS,
           "q_x": mim.DATA_PRIORS, "loss": LOSSES, "mi_bound": mim.MI_BOUNDS,
           "warmup_mode": mim.WARMUP_MODES, "latent_anchor": mim.ANCHORS,
           "estimator": mim.ESTIMATORS, "optimizer": mim.OPTIMIZERS, "init": mim.INITS,
           "pseudo_init": mim.PSEUDO_INITS, "preset": PRESETS,
           "device": ("auto", "cpu", "cuda")}


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# What --resume may change: the rest is the run's saved configuration.
RESUME_OVERRIDES = frozenset({"device", "epochs", "patience", "lr", "data_dir",
                              "deterministic", "tensorboard", "nll_samples"})


def given_flags(parser, argv):
    """The fields that argv sets explicitly: argparse fills in a default only where the
    namespace it is handed lacks the attribute."""
    unset = object()
    blank = argparse.Namespace(**{f.name: unset for f in dataclasses.fields(Config)})
    return {k for k, v in vars(parser.parse_args(argv, blank)).items() if v is not unset}


def parse_args(argv=None):
    """A Config from command-line flags, one per field (--z-dim for z_dim), and the
    fields given explicitly (with --resume, those replace the saved configuration's)."""
    parser = OneLineParser(prog="mim.py", description=mim.__doc__.split("\n")[0],
                           epilog="python mim.py evaluate --help: metrics and figures of "
                                  "trained runs")
    for f in dataclasses.fields(Config):
        flag, text = "--" + f.name.replace("_", "-"), HELP[f.name]
        if f.type is bool:
            parser.add_argument(flag, action="store_true", help=text)
            continue
        kind = {Optional[int]: int, Optional[float]: float, Optional[str]: str}.get(f.type,
                                                                              f.type)
        choices = list(CHOICES[f.name]) if f.name in CHOICES else None
        parser.add_argument(flag, type=kind, default=f.default, choices=choices, help=text +
                            (f" (default: {f.default})" if f.default is not None else ""))
    args, given = vars(parser.parse_args(argv)), given_flags(parser, argv)
    if args["resume"]:
        extra = sorted(given - RESUME_OVERRIDES - {"resume"})
        if extra:
            parser.error(f"--resume continues with the run's saved configuration and "
                         f"changes only {', '.join(sorted(RESUME_OVERRIDES))}; drop "
                         f"--{extra[0].replace('_', '-')}")
    if args["preset"]:
        args.update({k: v for k, v in PRESETS[args["preset"]].items() if k not in given})
    cfg = Config(**args)
    check_values(parser, cfg)
    return cfg, given & RESUME_OVERRIDES


SEED_LIMIT = 2 ** 63     # seeds are 0 .. 2^63 - 1, which torch and numpy both take


def check_values(parser, cfg):
    """Every value in range and finite, before anything is written (one line, exit 2)."""
    def flag(name):
        return "--" + name.replace("_", "-")
    for f in dataclasses.fields(Config):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            parser.error(f"{flag(f.name)} must be a finite number, not {value}")
        if isinstance(value, str) and not value and f.name in ("out", "resume", "data_dir"):
            parser.error(f"{flag(f.name)} needs a folder name")
    for name in ("hidden", "z_dim", "components", "prior_components", "pca_dim", "epochs",
                 "batch_size", "train_size", "patience"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            parser.error(f"{flag(name)} must be at least 1")
    pixels = math.prod(datasets.IMAGE_SHAPE)
    if cfg.pca_dim is not None and cfg.pca_dim > pixels:
        parser.error(f"--pca-dim must be at most {pixels}, the pixels of an image")
    for name in ("seed", "data_seed"):
        if not 0 <= getattr(cfg, name) < SEED_LIMIT:
            parser.error(f"{flag(name)} must be between 0 and 2^63 - 1")
    if cfg.preset == "authors" and cfg.arch == "mlp":
        parser.error("--preset authors is the authors' image protocol: use it with --arch "
                     "convhvae or pixelhvae")
    if cfg.prob_clamp is not None and not 0 < cfg.prob_clamp < 0.5:
        parser.error("--prob-clamp must be between 0 and 0.5")
    if cfg.arch == "pixelhvae" and cfg.estimator == "authors" and cfg.loss in ("mim", "ce"):
        parser.error("--estimator authors draws the decoder's mean image, which the "
                     "PixelHVAE's PixelCNN has not; use --loss amim (the authors' PixelHVAE "
                     "row) or --estimator loo-code")
    if cfg.draws < 2:
        parser.error("--draws must be at least 2: the baseline of an image is the mean "
                     "of the other images of its code")
    if min(cfg.lr, cfg.critic_lr, cfg.std_floor) <= 0:
        parser.error("--lr, --critic-lr and --std-floor must be positive")
    if min(cfg.warmup, cfg.nll_samples or 0, cfg.alpha, cfg.beta, cfg.critic_weight) < 0:
        parser.error("--warmup, --nll-samples, --alpha, --beta and --critic-weight must "
                     "not be negative")


def as_flags(message):
    """A library message with the fields it names as flags: q_x='mog' -> --q-x mog."""
    def flag(m):
        name, value = m[1], m[3]
        return f"--{name.replace('_', '-')} {value}" if name in HELP else m[0]
    return re.sub(r"\b(\w+)=('?)([^\s',;)]*)\2", flag, message)


# ----------------------------------------------------------------------------------------
# 3. The device and the process, chosen once per command: the allocator, cuDNN's and
# torch's determinism, TF32, bfloat16, threads, and the machine as runs record it
# ----------------------------------------------------------------------------------------

def choose_device(name):
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA device is visible; "
                         "use --device cpu")
    return torch.device("cuda" if name != "cpu" and torch.cuda.is_available() else "cpu")


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4   # mallopt parameters, glibc <malloc.h>
C_INT_MAX = 2 ** 31 - 1


def reuse_freed_memory():
    """Keep freed CPU memory in the process, so that the next step reuses it (glibc only).

    glibc gives every large allocation (above 128 KiB, a threshold that grows to 32 MiB)
    its own mapping and returns it to the system on free, so each step's activations are
    fresh pages and every 4 KiB of them costs a page fault when first written (RESULTS.md,
    Performance, measures what that costs). Serving all allocations from the heap and
    never trimming it keeps those pages. It changes the whole process for good, so it is
    not part of speed_up: call it once, where the process is yours. Returns
    whether it took effect; without glibc (macOS, Windows, musl) it does nothing.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, C_INT_MAX))


def command_line_device(name):
    """choose_device; on the CPU, freed memory then stays in the process
    (reuse_freed_memory), as it does wherever bench.py times the speed-ups."""
    device = choose_device(name)
    if device.type == "cpu":
        reuse_freed_memory()
    return device


def deterministic_algorithms():
    """The same results on every run of the same settings on one GPU, as on the CPU:
    cuDNN's deterministic kernels, no autotuning, and torch's deterministic algorithms
    (a warning, not an error, where an operation has none). cuBLAS needs a fixed
    workspace for it, set before its first use."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


@contextlib.contextmanager
def full_precision_math():
    """Matrix products and convolutions in full float32 on CUDA inside the block: cuDNN
    runs float32 convolutions in TF32 (10 bits of mantissa) by default on Ampere and
    later GPUs, which training tolerates and an NLL of 100 nats summed over 784 pixels
    need not. The CPU computes in float32 anyway."""
    if hasattr(torch.backends.cudnn, "conv"):           # the fp32_precision API (torch 2.9+)
        knobs = [(torch.backends.cudnn.conv, "fp32_precision", "ieee"),
                 (torch.backends.cuda.matmul, "fp32_precision", "ieee")]
    else:
        knobs = [(torch.backends.cudnn, "allow_tf32", False),
                 (torch.backends.cuda.matmul, "allow_tf32", False)]
    saved = [getattr(owner, name) for owner, name, _ in knobs]
    for owner, name, value in knobs:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for (owner, name, _), value in zip(knobs, saved):
            setattr(owner, name, value)


# CPU feature flags (Linux /proc/cpuinfo) of native bfloat16 arithmetic: x86 AVX512_BF16
# and AMX, ARM's BF16. Without them torch emulates bfloat16, many times slower than float32
# (RESULTS.md, "The options in detail", --amp, gives the measurement).
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
CUDA_BF16_CAPABILITY = (8, 0)   # Ampere (A100) and later compute bfloat16 natively


def native_bf16(device, cpuinfo="/proc/cpuinfo"):
    """Does `device` compute in bfloat16 natively? Unknown counts as no."""
    if device.type == "cuda":  # is_bf16_supported() also counts emulation on older GPUs
        return torch.cuda.get_device_capability(device) >= CUDA_BF16_CAPABILITY
    try:
        with open(cpuinfo) as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def checked_amp(cfg, device):
    """cfg with --amp dropped, and one warning line, where bfloat16 would be emulated."""
    if not cfg.amp or native_bf16(device):
        return cfg
    say("mim.py: warning: --amp ignored: this CPU has no native bfloat16 (flags "
        f"{', '.join(BF16_CPU_FLAGS)}), where it runs several times slower than float32; "
        "training in float32", file=sys.stderr)
    return dataclasses.replace(cfg, amp=False)


MLP_THREADS = 1   # CPU threads of an MLP run where OMP_NUM_THREADS is not set: as fast as
                  # all cores on idle ones, far faster on busy ones (README, Performance)


@contextlib.contextmanager
def default_threads(arch, device):
    """One CPU thread for the MLP, all cores for the image models, unless the user set
    OMP_NUM_THREADS; the process's thread count is restored afterwards."""
    before = torch.get_num_threads()
    if device.type == "cpu" and arch == "mlp" and not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(MLP_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def environment(device):
    """Where a run ran, for config.json, results.json and eval.json: the versions, the
    CPU's vector capability or the GPU, the threads, the device and the code version."""
    def version(package):
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "numpy": version("numpy"), "cpu": cpu_model(),
           "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return {**env, "code_version": code_version()}


def cpu_model(cpuinfo="/proc/cpuinfo"):
    """The CPU's model name where Linux tells it, else the machine type."""
    try:
        with open(cpuinfo) as f:
            names = [line.split(":", 1)[1].strip() for line in f
                     if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.machine()


def code_version():
    """`git describe --always --dirty` of the folder cli.py is in; None outside git."""
    try:
        done = subprocess.run(["git", "describe", "--always", "--dirty"], text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)),
                              capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


# ----------------------------------------------------------------------------------------
# 4. The run folder: claimed and locked by one process, every file written whole
# ----------------------------------------------------------------------------------------

def claim_folder(out, replace=False):
    """Create `out` if needed and lock it for this process (POSIX flock on the folder,
    released when the returned descriptor closes). Refuses, in one line, a folder that
    another process holds, and one that holds a run unless `replace` (--resume or
    --overwrite). Returns (descriptor or None without flock, whether out was created)."""
    created = not os.path.isdir(out)
    if os.path.lexists(out) and created:
        kind = file_kind(out) or "a file"
        raise UsageError(f"cannot use {out} as the run folder: it is {kind}; choose another "
                         "--out")
    try:
        os.makedirs(out, exist_ok=True)
        if not os.access(out, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "not writable")
        lock = locked(out, f"another process is writing {out}; wait for it to end or "
                           "choose another --out")
    except OSError as e:
        raise UsageError(f"cannot use {out} as the run folder ({e.strerror}); choose another "
                         "--out") from None
    problem = odd_run_file(out)
    if problem is None and not replace and any(os.path.exists(os.path.join(out, name))
                                               for name in (CONFIG, LAST)):
        problem = (f"{out} already holds a run; continue it with --resume {out}, replace it "
                   "with --overwrite, or choose another --out")
    if problem is not None:
        if lock is not None:
            os.close(lock)
        raise UsageError(problem)
    for name in os.listdir(out):  # temporary files of a writer killed by SIGKILL
        if name.endswith(".tmp") and name.split(".")[0] in RUN_FILE_STEMS:
            os.remove(os.path.join(out, name))
    return lock, created


def locked(folder, busy):
    """A descriptor holding folder's POSIX flock until it is closed (None where there is
    no flock); UsageError(busy) if another process holds it."""
    if fcntl is None:
        return None
    lock = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        raise UsageError(busy) from None
    return lock


def file_kind(path):
    """What is at path when it is not a regular file or nothing: 'a folder', 'a FIFO' ..."""
    if not os.path.lexists(path) or os.path.isfile(path):
        return None
    if os.path.islink(path) and not os.path.exists(path):
        return "a broken symbolic link (or a loop of links)"
    return "a folder" if os.path.isdir(path) else "not a regular file"


def odd_run_file(folder):
    """One line naming the first file of a run that is not a regular file (a folder where
    log.csv belongs), which a run would fail on half-way; None if there is none."""
    for name in RUN_FILES:
        kind = file_kind(os.path.join(folder, name))
        if kind is not None:
            return (f"{os.path.join(folder, name)} is {kind}, not a file of the run; move it "
                    "out of the folder and run again")
    return None


@contextlib.contextmanager
def signals_held():
    """Ctrl-C and SIGTERM wait until the block ends (where POSIX signal masks exist)."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def write_together(folder, files):
    """Write {name: bytes} into folder all or none: each goes to a temporary file first,
    and only when all are written are they renamed, with Ctrl-C and SIGTERM held back."""
    temps = []
    try:
        for name, data in files.items():
            fd, tmp = mim.new_temp_file(folder, name)
            temps.append(tmp)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        with signals_held():
            for tmp, name in zip(temps, files):
                os.replace(tmp, os.path.join(folder, name))
    finally:
        for tmp in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)


def json_bytes(obj):
    return (json.dumps(obj, indent=2) + "\n").encode()


def write_json(path, obj):
    write_bytes(path, json_bytes(obj))


def write_csv(path, rows):
    keys = list(dict.fromkeys(k for row in rows for k in row))

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(",".join(keys) + "\n")
            for row in rows:
                f.write(",".join(format_value(row.get(k, "")) for k in keys) + "\n")
    mim.atomic_write(path, write)


def write_bytes(path, data):
    write_together(os.path.dirname(os.path.abspath(path)), {os.path.basename(path): data})


def format_value(v, spec=".6g"):
    return f"{v:{spec}}" if isinstance(v, float) else str(v)


# ----------------------------------------------------------------------------------------
# 5. A run's checkpoints and --resume: the saved settings win over the flags
# ----------------------------------------------------------------------------------------

def save_run_checkpoint(path, model, cfg, data_info, **training_state):
    """A checkpoint of a run: the model with its ModelSpec, and in extra the flags, the
    data's shape and identity, and the epoch of best.pt's weights or, for last.pt, the
    training state that --resume needs."""
    mim.save_checkpoint(path, model, model_spec(cfg, data_info),
                        config=dataclasses.asdict(cfg), data=data_info, **training_state)


def read_run_checkpoint(path, device="cpu", keys=CHECKPOINT_KEYS):
    """The state read_checkpoint returns, if it is a run's checkpoint with `keys` in its
    extra; else one line (UsageError) that says what is wrong."""
    try:
        with warnings.catch_warnings():     # torch's on a foreign pickle would come first
            warnings.simplefilter("ignore")
            state = mim.read_checkpoint(path, device)
    except FileNotFoundError:
        raise UsageError(f"{path} not found; train with mim.py --out first") from None
    except ValueError as e:                  # another format, or not a checkpoint at all
        raise UsageError(str(e)) from None
    except Exception as e:  # torch raises several types for truncated / foreign files
        raise UsageError(f"{path} is not a readable checkpoint ({type(e).__name__}); "
                         "train again") from None
    missing = keys - set(state["extra"])
    if missing and CHECKPOINT_KEYS <= set(state["extra"]):
        raise UsageError(f"{path} holds a trained model without the training state that "
                         "--resume needs (a copy of best.pt?); put the run's own last.pt "
                         "back, or train again")
    if missing:
        raise UsageError(f"{path} is not a checkpoint written by mim.py's command line (it "
                         f"lacks {', '.join(sorted(missing))}); train again")
    return state


def saved_config(state, path, **changes):
    """The Config of a run's checkpoint, refused in one line if another version wrote it."""
    config = state["extra"]["config"]
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise UsageError(f"{path} was written by another version of mim.py (setting "
                         f"{unknown[0]!r} is unknown here); use that version or train again")
    return Config(**{**config, **changes})


def load_weights(model, weights, path):
    try:
        model.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"{path} does not fit the network its spec describes ({first}); "
                         "train again") from None


def run_model(state, path, device="cpu"):
    """(model, cfg) of a run checkpoint's state, refused in one line where it does not fit."""
    cfg = saved_config(state, path)
    try:
        model = mim.build_model(mim.checkpoint_spec(state))
    except ValueError as e:
        raise UsageError(f"{path}: {e}") from None
    load_weights(model, state["model"], path)
    return model.to(device), cfg


def resumed_config(cfg, overrides=("device",)):
    """The saved config and training state of the run in cfg.resume (from its last.pt),
    with the fields named in `overrides` taken from cfg (--resume DIR --lr 1e-4)."""
    path = os.path.join(cfg.resume, LAST)
    problem = odd_run_file(cfg.resume) if os.path.isdir(cfg.resume) else None
    if problem is not None:             # before anything is read: nothing is touched
        raise UsageError(problem)
    state = read_run_checkpoint(path, keys=CHECKPOINT_KEYS | RESUME_KEYS)
    check_config_file(cfg.resume, state["extra"]["config"], overrides)
    saved = saved_config(state, path, resume=cfg.resume, out=cfg.resume,
                         **{k: getattr(cfg, k) for k in overrides})
    return saved, {**state["extra"], "model": state["model"]}


def check_config_file(folder, saved, overrides=()):
    """Refuse, in one line, a config.json edited by hand to settings that --resume would
    not honour: it continues with the ones last.pt saved (and the `overrides` given now)
    and rewrites config.json."""
    path = os.path.join(folder, CONFIG)
    if not os.path.exists(path):
        return
    restore = f"put the value back, or delete {path}: --resume rewrites it from last.pt"
    try:
        with open(path) as f:
            edited = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not valid JSON ({e}); {restore}") from None
    if not isinstance(edited, dict):
        raise UsageError(f"{path} holds no settings; {restore}")
    for name, value in saved.items():
        if name not in overrides and edited.get(name, value) != value:
            flag = "--" + name.replace("_", "-")
            how = (f"pass {flag} {edited[name]} with --resume instead, or "
                   if name in RESUME_OVERRIDES else "")
            raise UsageError(f"{path} sets {name} to {edited[name]!r} but the run was "
                             f"trained with {value!r}; --resume takes its settings from "
                             f"last.pt: {how}{restore}")


# ----------------------------------------------------------------------------------------
# 6. Data: the data set the flags name, --train-size applied, the run's own on --resume
# ----------------------------------------------------------------------------------------

def load_data(cfg):
    try:
        return datasets.load_dataset(cfg.data, seed=cfg.data_seed, data_dir=cfg.data_dir,
                                     pca_dim=cfg.pca_dim)
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from None


def fitting_data(data, cfg, min_train):
    """data with --train-size applied, refused in one line, naming where it was read, where
    it cannot be trained on, has fewer than min_train training points (what the 5-NN
    diagnostics need) or too few test points for the test metrics."""
    n = len(data.x_train)
    if cfg.train_size is not None and cfg.train_size > n:
        raise UsageError(f"--train-size {cfg.train_size} exceeds the {n} training points; "
                         "lower it or leave it out")
    if cfg.train_size is not None:
        data = dataclasses.replace(data, x_train=data.x_train[:cfg.train_size],
                                   y_train=data.y_train[:cfg.train_size])
        n = cfg.train_size
    if n < min_train:
        what = (f"--train-size {n}: too few training points" if cfg.train_size is not None
                else f"{cfg.data}{read_from(data)} has {n} training points")
        raise UsageError(f"{what}; the 5-NN of every epoch's diagnostics needs at least "
                         f"{min_train}; train on more")
    if n < cfg.batch_size:
        raise UsageError(f"--batch-size {cfg.batch_size} exceeds the {n} training points; "
                         "lower it")
    if len(data.x_val) == 0:
        raise UsageError(f"{cfg.data}{read_from(data)} has no validation points (its "
                         f"training split holds {len(data.x_train)}); use a larger training "
                         "file")
    check_test_size(data)
    return data


def read_from(data):
    """Where a data set was read, for messages: " (read from FOLDER)", or nothing for data
    drawn from seeds."""
    return f" (read from {data.source})" if data.source else ""


def check_test_size(data, test_size=None):
    """Refuse, in one line, a --test-size or a test split too small for the test metrics."""
    need, why = evaluate.fewest_test_points(data.binary)
    if test_size is not None and test_size < need:
        raise UsageError(f"--test-size {test_size}: {why}; use --test-size {need} or more")
    if len(data.x_test) < need:
        raise UsageError(f"{data.name}{read_from(data)} has {len(data.x_test)} test points, "
                         f"but {why}; use a larger test file")


def check_same_data(saved, identity, path):
    """Refuse, in one line, data other than the data the checkpoint `path` was trained on."""
    problem = datasets.data_mismatch(saved, identity, path)
    if problem is not None:
        raise UsageError(problem)


# ----------------------------------------------------------------------------------------
# 7. The model and its objective, sized against the device's memory first
# ----------------------------------------------------------------------------------------

def objective(cfg):
    """The loss function (model, x, w) -> (loss, stats) of --loss, with its settings."""
    if cfg.loss == "infomax":
        return functools.partial(mim.infomax_loss, alpha=cfg.alpha, beta=cfg.beta,
                                 bound=cfg.mi_bound)
    if cfg.loss.startswith("critic-"):
        return functools.partial(LOSSES[cfg.loss], weight=cfg.critic_weight)
    if cfg.loss in ("mim", "amim", "ce"):
        sampling = spec_of(mim.DecoderSampling, cfg)
        return functools.partial(LOSSES[cfg.loss], draw_dec=mim.decoder_samples_of(sampling))
    return LOSSES[cfg.loss]


def model_spec(cfg, info):
    """The ModelSpec of the flags in cfg for data described by info (x_dim, binary,
    image_shape)."""
    return spec_of(mim.ModelSpec, cfg, x_dim=info["x_dim"], binary=info["binary"],
                   image_shape=info.get("image_shape"), critic=CRITIC_OF_LOSS.get(cfg.loss))


def train_spec(cfg):
    return spec_of(mim.TrainSpec, cfg)


def built_model(cfg, info, x_init):
    """build_model for the flags in cfg, its ValueError as one line that names flags."""
    try:
        return mim.build_model(model_spec(cfg, info), x_init=x_init)
    except ValueError as e:
        raise UsageError(as_flags(str(e))) from None


COPIES_PER_PARAMETER = 5   # in training: weights, gradients, Adam's two moments, best weights
FLOAT_BYTES = 4
AIS_BYTES_PER_STEP = 48    # the schedule's inverse temperature: a float in a Python list
SIZE_FLAGS = ("hidden", "z_dim", "components", "prior_components")


def memory_bytes(device):
    """The memory of the device a run trains on: the GPU's, else the machine's RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


EVAL_MEMORY_SHARE = 0.25       # of the free GPU memory, for one evaluation pass
# bytes alive per pixel of a code's image in a decoder pass: a gated layer's 2 x CHANNELS
# float32 maps and its input, about 4 x CHANNELS maps in all
EVAL_BYTES_PER_X_VALUE = 4 * 4 * mim.CHANNELS


def eval_rows(device, x_dim):
    """Rows (points or codes) per forward pass of the evaluation: None, evaluate.py's
    CPU-sized default, on the CPU; on CUDA as many as EVAL_MEMORY_SHARE of the free
    memory holds, so that the IWAE NLL's S = 5000 codes go through in few passes."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, int(free * EVAL_MEMORY_SHARE) // (EVAL_BYTES_PER_X_VALUE * x_dim))


def check_allocations(sizes, device):
    """Refuse, in one line, the first flag whose value would need more memory at once
    than the device has. sizes: {flag as typed: (value, bytes per unit of it)}, where
    the bytes are a lower bound of what that flag allocates in one piece."""
    have = memory_bytes(device)
    for flag, (value, per_unit) in sizes.items():
        if value and value * per_unit > have:
            raise UsageError(f"{flag} {value} would hold about "
                             f"{value * per_unit / 2 ** 30:.3g} GiB at once ({per_unit} bytes "
                             f"each), more than the {have / 2 ** 30:.3g} GiB of {device.type} "
                             f"memory here; choose a smaller {flag}")


def check_fits_memory(cfg, info, device):
    """Refuse, before anything is allocated, sizes whose network and optimizer state
    alone exceed the device's memory: the network is built on the meta device to count."""
    with torch.device("meta"):
        model = built_model(cfg, info, x_init=None)
    numbers = sum(t.numel() for t in (*model.parameters(), *model.buffers()))
    need, have = numbers * COPIES_PER_PARAMETER * FLOAT_BYTES, memory_bytes(device)
    if need > have:
        typical = Config(data=cfg.data, arch=cfg.arch, prior=cfg.prior, q_x=cfg.q_x)
        flags = [f"--{n.replace('_', '-')} {getattr(cfg, n)}" for n in SIZE_FLAGS
                 if getattr(cfg, n) != getattr(typical, n)] or ["the network"]
        raise UsageError(f"{', '.join(flags)}: {numbers:.3g} parameters need about "
                         f"{need / 2 ** 30:.3g} GiB to train (weights, gradients, Adam's "
                         f"moments, best weights), more than the {have / 2 ** 30:.3g} GiB "
                         f"of {device.type} memory here; choose smaller sizes")


# ----------------------------------------------------------------------------------------
# 8. Training: python mim.py [flags]
# ----------------------------------------------------------------------------------------

def run(cfg, overrides=("device",)):
    """Train (or resume, with the fields in `overrides` taken from cfg) and evaluate as
    `cfg` says, in the folder cfg.out if given; returns the results dict."""
    device = command_line_device(cfg.device)
    if cfg.data_dir:  # recorded absolute, so that evaluating and resuming work from anywhere
        cfg = dataclasses.replace(cfg, data_dir=os.path.abspath(cfg.data_dir))
    cfg, resume = resumed_config(cfg, overrides) if cfg.resume else (cfg, None)
    if cfg.deterministic:  # after resumed_config: a resumed run keeps its own setting
        deterministic_algorithms()
    cfg = checked_amp(cfg, device)
    with default_threads(cfg.arch, device):
        if not cfg.out:
            return fit_and_test(cfg, resume, device)
        lock, created = claim_folder(cfg.out, replace=cfg.resume or cfg.overwrite)
        try:
            return fit_and_test(cfg, resume, device)
        except BaseException:
            if created and not os.listdir(cfg.out):  # stopped before its first epoch
                os.rmdir(cfg.out)
            raise
        finally:
            if lock is not None:
                os.close(lock)


def fit_and_test(cfg, resume, device):
    on_epoch = log_line if cfg.tensorboard is None else tensorboard_logger(cfg.tensorboard)
    data = fitting_data(load_data(cfg), cfg, evaluate.KNN_K).to(device)
    identity = datasets.data_identity(data)
    if resume is not None:
        check_same_data(resume["data"], identity, os.path.join(cfg.resume, LAST))
    if cfg.nll_samples is None:  # images: the IWAE NLL is the evaluate command's job
        cfg = dataclasses.replace(cfg, nll_samples=0 if data.image_shape else 1000)
    data_info = {**datasets.data_shape(data), **identity}
    components = cfg.prior_components if cfg.prior != "normal" else 0
    check_allocations({"--nll-samples": (cfg.nll_samples, FLOAT_BYTES),    # log weights
                       "--draws": (cfg.draws, cfg.batch_size * data.x_dim * FLOAT_BYTES),
                       "--prior-components": (components,  # a mixture's log p(z): (B, K, Z)
                                              cfg.batch_size * cfg.z_dim * FLOAT_BYTES)},
                      device)
    check_fits_memory(cfg, data_info, device)
    torch.manual_seed(cfg.seed)
    model = built_model(cfg, data_info, data.x_train)
    if resume is not None:  # before speed_up, whose layout must not depend on the file's
        load_weights(model, resume["model"], os.path.join(cfg.resume, LAST))
    model = mim.speed_up(model, device).to(device)
    env = environment(device)
    checkpoint = save_training_state(cfg, model, data_info, env) if cfg.out else None

    best_state, best_epoch, epochs, history = mim.train(
        model, objective(cfg), data.x_train, data.x_val, train_spec(cfg), on_epoch=on_epoch,
        binarize=data.dynamic, checkpoint=checkpoint, resume=resume,
        diagnose=evaluate.epoch_diagnostics(data), on_batch=Progress())
    model.load_state_dict(best_state)
    with full_precision_math():
        metrics = evaluate.test_metrics(model, data, cfg.nll_samples,
                                        max_batch=eval_rows(device, data.x_dim))
    results = {**metrics,
               "best_epoch": best_epoch, "epochs": epochs,
               "train_seconds": sum(row["seconds"] for row in history)}
    if cfg.out:
        save_run_checkpoint(os.path.join(cfg.out, BEST), model, cfg, data_info,
                            epoch=best_epoch)
        write_json(os.path.join(cfg.out, RESULTS), {**results, "environment": env})
    return results


def say(*values, file=None, end="\n"):
    """print for training, which outlives its console: where the reader has gone (a closed
    pipe, | head; a closed terminal) the stream goes quiet instead of ending the run, whose
    files are its record."""
    file = sys.stdout if file is None else file
    try:
        print(*values, file=file, end=end, flush=True)
    except OSError as e:
        if not isinstance(e, BrokenPipeError) and e.errno != errno.EIO:
            raise
        quiet(file)


def quiet(stream):
    """Point stream's file descriptor at /dev/null: its reader has gone, and what is still
    buffered (flushed at exit too) must not raise again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, stream.fileno())
    os.close(devnull)


@contextlib.contextmanager
def outliving_the_console():
    """Training goes on when its terminal closes: SIGHUP is ignored, as nohup does, for
    the block (where POSIX has it), and say() quiets the streams."""
    if not hasattr(signal, "SIGHUP"):
        yield
        return
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGHUP, previous)


PROGRESS_AFTER = 5.0     # seconds into an epoch before a progress line appears
PROGRESS_EVERY = 2.0     # seconds between progress lines


class Progress:
    """train's on_batch for the command line: a status line on stderr, shown once an
    epoch has taken PROGRESS_AFTER seconds."""

    def __call__(self, epoch, done, total, loss):
        now = time.perf_counter()
        if done == 1:                           # timed from the end of the first batch
            self.start = self.last = now
            self.shown = False
        elif now - self.last >= PROGRESS_EVERY and now - self.start >= PROGRESS_AFTER:
            self.last, self.shown = now, True
            left = (now - self.start) / (done - 1) * (total - done)
            end = "\r" if sys.stderr.isatty() else "\n"
            say(f"epoch {epoch}: {done}/{total} batches, loss {float(loss):.4f} nats, "
                f"{now - self.start:.0f} s, about {left:.0f} s left", end=end,
                file=sys.stderr)
        if done == total and self.shown and sys.stderr.isatty():
            say(file=sys.stderr)


def log_line(row):
    """One line per epoch: train and validation loss with their terms, and seconds."""
    def terms(prefix):
        return " ".join(f"{k[len(prefix):]} {format_value(v, '.4f')}" for k, v in row.items()
                        if k.startswith(prefix) and k != prefix + "loss")
    say(f"epoch {row['epoch']:3d} | train {row['train_loss']:.4f} nats ({terms('train_')})"
        f" | val {row['val_loss']:.4f} nats ({terms('val_')}) | {row['seconds']:.2f} s")


def tensorboard_logger(folder):
    """on_epoch for --tensorboard: log_line, and each number of the epoch's row as a
    TensorBoard scalar at step = epoch. The package is imported only here."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UsageError("--tensorboard needs the tensorboard package: pip install "
                         "tensorboard, or leave the flag out") from None
    writer = SummaryWriter(folder)

    def on_epoch(row):
        log_line(row)
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)):
                writer.add_scalar(key, value, row["epoch"])
        writer.flush()
    return on_epoch


def save_training_state(cfg, model, data_info, env):
    """The per-epoch checkpoint: log.csv with every epoch so far and last.pt always,
    best.pt when validation improved. The folder changes only from the first epoch on:
    then config.json is written and a replaced run's other outputs removed."""
    started = False

    def checkpoint(state, improved):
        nonlocal started
        if not started:  # a resumed run keeps its best.pt: last.pt's best weights are it
            for name in (n for n in RUN_OUTPUTS if not (cfg.resume and n == "best.pt")):
                if os.path.exists(os.path.join(cfg.out, name)):
                    os.remove(os.path.join(cfg.out, name))
            write_json(os.path.join(cfg.out, CONFIG),
                       {**dataclasses.asdict(cfg), "environment": env})
            started = True
        write_csv(os.path.join(cfg.out, LOG), state["progress"]["history"])
        if improved:
            save_run_checkpoint(os.path.join(cfg.out, BEST), model, cfg, data_info,
                                epoch=state["progress"]["best_epoch"])
        save_run_checkpoint(os.path.join(cfg.out, LAST), model, cfg, data_info, **state)
    return checkpoint


# ----------------------------------------------------------------------------------------
# 9. Stopping and failing: each foreseeable fault ends in one line
# ----------------------------------------------------------------------------------------

class Terminated(BaseException):
    """SIGTERM, raised where the program is, so that temporary files go on the way out."""


def raise_terminated(signum, frame):
    raise Terminated


def stopped_message(how, folder):
    """The one line printed when Ctrl-C or SIGTERM stops a run in `folder` (None: no --out)."""
    if folder and os.path.exists(os.path.join(folder, LAST)):
        return (f"mim.py: stopped by {how}; {folder}/last.pt holds the last finished epoch: "
                f"continue with python mim.py --resume {folder}")
    return f"mim.py: stopped by {how} before an epoch was saved; start the run again"


def nan_advice(folder):
    """What to do after the loss became NaN: go on from a saved epoch where there is one."""
    if folder and os.path.exists(os.path.join(folder, LAST)):
        return ("go on from the last finished epoch with a lower rate (mim.py --resume "
                f"{folder} --lr LR), or train again with a higher --std-floor")
    return "train again with a lower --lr or a higher --std-floor"


BROKEN_PIPE_STATUS = 128 + 13   # as a shell reports a process ended by SIGPIPE


@contextlib.contextmanager
def error_boundary(prog, stopped, after_os_error, folder=None, usage=(UsageError,)):
    """A command's foreseeable faults, each as one line on stderr: bad input (`usage`
    types), failed files and a GPU out of memory exit 2, Ctrl-C 130, SIGTERM 143, with
    stopped(how) as the line; a reader of stdout that went away (| head) ends it quietly,
    as Unix tools do. Anything else is a bug of ours and keeps its traceback."""
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    if hasattr(sys.stdout, "reconfigure"):      # an ASCII terminal shows "±" as "?"
        sys.stdout.reconfigure(errors="replace")
    def fail(message, status=2):
        print(message, file=sys.stderr)
        sys.exit(status)
    try:
        yield
    except BrokenPipeError:
        quiet(sys.stdout)
        sys.exit(BROKEN_PIPE_STATUS)
    except usage as e:
        fail(f"{prog}: error: {e}")
    except FloatingPointError as e:
        fail(f"{prog}: error: {e}; {nan_advice(folder)}")
    except torch.cuda.OutOfMemoryError as e:  # sizes that the checks up front cannot foresee
        what = ". ".join(str(e).split(". ")[:2])       # "CUDA out of memory. Tried to ..."
        fail(f"{prog}: error: {what}; choose a smaller --batch-size or "
             "smaller sizes, or run on the CPU (--device cpu)")
    except OSError as e:  # the file system failed (a full disk, a lost mount)
        fail(f"{prog}: error: {e}; {after_os_error}")
    except KeyboardInterrupt:
        fail(stopped("Ctrl-C"), 128 + signal.SIGINT)
    except Terminated:
        fail(stopped("SIGTERM"), 128 + signal.SIGTERM)
    finally:  # main may be called in-process (tests): leave SIGTERM as it was
        signal.signal(signal.SIGTERM, previous)


# ----------------------------------------------------------------------------------------
# 10. Evaluation: python mim.py evaluate RUN_DIR [RUN_DIR ...], evaluate.py's metrics and
# figures of trained runs
# ----------------------------------------------------------------------------------------

EVAL_SEED = 0                  # of mim.py evaluate's importance samples and codes


def first_test_points(data, n):
    """data with its test split cut to the first n points (all if n is None)."""
    return dataclasses.replace(data, x_test=data.x_test[:n], y_test=data.y_test[:n])


def run_title(cfg, epochs=None):
    """The figures' title: objective, data, network, seed and, where known, epochs run."""
    arch = f"MLP, {cfg.hidden} hidden" if cfg.arch == "mlp" else cfg.arch
    trained = "" if epochs is None else f", {epochs} epochs"
    return f"{cfg.loss.upper()}, {cfg.data}, {arch}, seed {cfg.seed}{trained}"


def logged_epochs(log_csv):
    """The epochs a run's log.csv records (None where there is no log)."""
    try:
        with open(log_csv) as f:
            return max(sum(1 for _ in f) - 1, 0)
    except FileNotFoundError:
        return None


def load_run(run_dir, device, data_dir=None):
    """(model, cfg, data) of RUN_DIR/best.pt: the model with the speed-ups, its settings
    and its data, whose test split must be the run's own. data_dir replaces the folder
    the run recorded."""
    path = os.path.join(run_dir, BEST)
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise UsageError(f"{run_dir} is a file, not a run folder (the --out of a training)")
    if not os.path.exists(path):
        raise UsageError(f"{path} not found; " + (
            f"finish the run with mim.py --resume {run_dir}"
            if os.path.exists(os.path.join(run_dir, LAST)) else
            f"train with mim.py --out {run_dir} --overwrite" if os.path.isdir(run_dir) else
            f"train with mim.py --out {run_dir} first"))
    state = read_run_checkpoint(path, device)
    model, cfg = run_model(state, path, device)
    if data_dir is not None:
        cfg = dataclasses.replace(cfg, data_dir=data_dir)
    data = load_data(cfg)
    check_same_data(state["extra"]["data"], datasets.data_identity(data), path)
    return mim.speed_up(model, device), cfg, data


@contextlib.contextmanager
def evaluating(run_dir):
    """Hold RUN_DIR's lock while evaluating it, as training holds it (claim_folder): an
    evaluation never measures a checkpoint that training is still replacing."""
    if not os.path.isdir(run_dir):      # load_run says what is wrong with it
        yield
        return
    lock = locked(run_dir, f"another process is training or evaluating {run_dir}; "
                           "evaluate it once that process has ended")
    try:
        problem = odd_run_file(run_dir)
        if problem is not None:
            raise UsageError(problem)
        yield
    finally:
        if lock is not None:
            os.close(lock)


def checkpoint_record(run_dir):
    """eval.json's record of the checkpoint it measured: file, epoch and SHA-256."""
    with open(os.path.join(run_dir, BEST), "rb") as f:
        contents = f.read()                                # read once for both
    epoch = torch.load(io.BytesIO(contents), weights_only=True)["extra"].get("epoch")
    return {"file": BEST, "epoch": epoch, "sha256": hashlib.sha256(contents).hexdigest()}


def evaluate_run(run_dir, device, args):
    """The metrics of RUN_DIR/best.pt on its test split into RUN_DIR/eval.json, and its
    figures; returns the metrics. The tight NLL runs only when --ais-steps asks for it:
    it costs steps x leapfrog passes of the decoder with gradients per chain."""
    model, cfg, data = load_run(run_dir, device, args.data_dir)
    check_test_size(data, args.test_size)
    check_allocations({"--nll-samples": (args.nll_samples, FLOAT_BYTES),
                       "--ais-steps": (args.ais_steps, AIS_BYTES_PER_STEP),
                       "--ais-chains": (args.ais_chains, data.x_dim * FLOAT_BYTES)}, device)
    with default_threads(cfg.arch, device):
        data = first_test_points(data, args.test_size).to(device)
        ais = evaluate.AIS(args.ais_steps, args.ais_chains, args.ais_leapfrog,
                           args.ais_points, args.ais_inflate)
        max_batch = args.max_batch or eval_rows(device, data.x_dim)
        torch.manual_seed(EVAL_SEED)       # the same draws for the same run and flags
        with contextlib.nullcontext() if args.tf32 else full_precision_math():
            results, points = evaluate.test_metrics(
                model, data, args.nll_samples, args.knn_train, max_batch,
                with_posterior_stats=True, ais=ais, nll_points=args.nll_points,
                return_points=True)
        results.update(test_size=len(data.x_test),
                       knn_train_size=len(data.x_train[:args.knn_train]))
        if "nll" in points:   # the NLL's own subset and its Monte Carlo standard error
            results.update(nll_points=len(points["nll"]),
                           test_nll_se=evaluate.standard_error(points["nll"]))
        env = environment(device)                  # with the threads it ran with
        log = os.path.join(run_dir, LOG)
        title = run_title(cfg, logged_epochs(log))
        figures = evaluate.run_figures(model, data, title, args.format)
        if os.path.exists(log):
            figures[f"training.{args.format}"] = evaluate.training_figure(log, title,
                                                                          args.format)
    figures = {name: contents for name, contents in figures.items() if contents is not None}
    record = {**results, "checkpoint": checkpoint_record(run_dir),
              "scored_points_sha256": datasets.data_identity(data)["test_sha256"],
              "figures": sorted(figures), "environment": env}
    write_together(run_dir, {**figures, EVALUATION: json_bytes(record),
                             POINTS: points_csv(points)})
    print(f"{run_dir}:\n{evaluate.format_results(results)}", flush=True)
    return results


POINTS_COLUMNS = ("test_point", "label", "knn5_correct", "knn5_mean_correct", "nll_nats")


def points_csv(points):
    """POINTS' contents: one row per test point with its label, whether each 5-NN
    classifies it correctly (1 or 0) and its NLL in nats (empty past the NLL's subset)."""
    nll = points.get("nll", ())
    rows = [",".join(POINTS_COLUMNS)] + [
        f"{i},{int(label)},{int(points['knn5_correct'][i])},"
        f"{int(points['knn5_mean_correct'][i])},{repr(float(nll[i])) if i < len(nll) else ''}"
        for i, label in enumerate(points["label"])]
    return ("\n".join(rows) + "\n").encode()


def gradient_noise_run(run_dir, device, repeats):
    """gradient_noise on RUN_DIR/best.pt and on a fresh initialisation of its settings,
    at the run's batch size; writes RUN_DIR/gradient_noise.json and prints a table."""
    model, cfg, data = load_run(run_dir, device)
    torch.manual_seed(cfg.seed)
    fresh = mim.speed_up(built_model(cfg, datasets.data_shape(data), data.x_train), device)
    fresh = fresh.to(device)
    table = {name: mim.gradient_noise(m, cfg.latent_anchor, cfg.batch_size, repeats)
             for name, m in (("initialisation", fresh), ("trained", model))}
    write_json(os.path.join(run_dir, GRADIENT_NOISE), table)
    print(f"{run_dir}: gradient of the decoder-sample half of L_MIM for the decoder's "
          f"parameters, {repeats} estimates of batch {cfg.batch_size} each")
    print("| model | estimator | signal | noise | noise / signal |\n| --- | --- | --- | --- | --- |")
    for name, rows in table.items():
        for r in rows:
            print(f"| {name} | {r['estimator']} | {r['signal']:.4g} | {r['noise']:.4g} | "
                  f"{r['noise_over_signal']:.3g} |")
    return table


def evaluate_parser():
    parser = OneLineParser(prog="mim.py evaluate",
                           description="Metrics and figures of trained runs (evaluate.py)")
    parser.add_argument("runs", nargs="*", help="run directories (mim.py --out) to evaluate")
    parser.add_argument("--nll-samples", type=int, default=evaluate.NLL_SAMPLES,
                        help="importance samples per test point for the NLL; 0 skips it "
                             "(default: %(default)s, as the authors' code)")
    parser.add_argument("--ais-steps", type=int, default=0,
                        help=f"temperatures of the tight NLL by annealed importance "
                             f"sampling, for example {evaluate.AIS_STEPS}; 0 skips it "
                             "(default)")
    parser.add_argument("--ais-chains", type=int, default=evaluate.AIS_CHAINS,
                        help="AIS chains per test point (default: %(default)s)")
    parser.add_argument("--ais-leapfrog", type=int, default=evaluate.AIS_LEAPFROG,
                        help="leapfrog steps per HMC transition of AIS (default: %(default)s)")
    parser.add_argument("--ais-inflate", type=float, default=evaluate.AIS_INFLATE,
                        help="AIS starts from the encoder with its std times this "
                             "(default: %(default)s; 1 suits calibrated encoders in many "
                             "dimensions: RESULTS.md, \"A tight NLL for sharp encoders\")")
    parser.add_argument("--ais-points", type=int, default=None,
                        help="run AIS on the first N test points only (default: all)")
    parser.add_argument("--test-size", type=int, default=None,
                        help="evaluate on the first N test points (default: all)")
    parser.add_argument("--nll-points", type=int, default=None,
                        help="estimate the NLL on the first N of those only, reported with "
                             "its standard error over them (default: all)")
    parser.add_argument("--knn-train", type=int, default=None,
                        help="fit the 5-NN classifier on the first N training codes "
                             "(default: all)")
    parser.add_argument("--max-batch", type=int, default=None,
                        help=f"rows (points or codes) per forward pass (default: at most "
                             f"{evaluate.EVAL_MAX_VALUES} values of x)")
    parser.add_argument("--data-dir", default=None,
                        help="folder of the data files, where the run's own has moved "
                             "(default: the folder the run recorded)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--tf32", action="store_true",
                        help="let CUDA run float32 convolutions and matrix products in TF32 "
                             "(default: full float32, see full_precision_math)")
    parser.add_argument("--summary", metavar="DIR",
                        help="write DIR/summary.md (and .png) over DIR/*/results.json")
    parser.add_argument("--x", default="hidden", help="x-axis of the summary plot")
    parser.add_argument("--compare", metavar="SETTING",
                        help="with --summary: compare the runs that differ in SETTING (a "
                             "flag's name, for example loss) point by point, seed by seed")
    parser.add_argument("--format", choices=FIGURE_FORMATS, default=FIGURE_FORMATS[0],
                        help="file format of every figure (default: %(default)s)")
    parser.add_argument("--gradient-noise", action="store_true",
                        help="instead of the metrics: signal and noise of each estimator of "
                             "the binary decoder samples' gradient, on each run's best.pt "
                             "and on a fresh initialisation (gradient_noise.json)")
    parser.add_argument("--repeats", type=int, default=mim.GRADIENT_REPEATS,
                        help="gradient estimates per estimator for --gradient-noise")
    return parser


def check_evaluate_args(parser, args):
    if args.compare is not None and not args.summary:
        parser.error(f"--compare {args.compare} compares the runs of a summary; add "
                     "--summary DIR")
    if not args.runs and not args.summary:
        parser.error("give run directories to evaluate, or --summary DIR")
    if args.nll_samples < 0 or args.ais_steps < 0:
        parser.error("--nll-samples and --ais-steps must be at least 0")
    if args.ais_chains < 1 or args.ais_leapfrog < 1:
        parser.error("--ais-chains and --ais-leapfrog must be at least 1")
    if not 0 < args.ais_inflate < math.inf:
        parser.error("--ais-inflate must be a finite number above 0")
    if args.nll_points is not None and args.nll_points < 2:
        parser.error(f"--nll-points {args.nll_points}: the NLL's standard error needs at "
                     "least 2 points; use --nll-points 2 or more")
    for flag in ("ais_points", "max_batch", "repeats"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    images, continuous = (evaluate.fewest_test_points(binary)[0] for binary in (True, False))
    if args.test_size is not None and args.test_size < images:    # check_test_size: per run
        parser.error(f"--test-size {args.test_size}: the metrics need at least {images} test "
                     f"points, KSG's on continuous x more than {continuous - 1}; use "
                     f"--test-size {continuous} or more ({images} or more on binary images)")
    k = evaluate.KNN_K
    if args.knn_train is not None and args.knn_train < k:
        parser.error(f"--knn-train {args.knn_train}: the {k}-NN classifier needs at least "
                     f"{k} training codes; use --knn-train {k} or more")


def evaluate_main(argv):
    parser = evaluate_parser()
    args = parser.parse_args(argv)
    check_evaluate_args(parser, args)
    def stopped(how):
        return (f"mim.py evaluate: stopped by {how}; each run keeps the evaluation it had "
                "before this command (or none): run the command again")
    with error_boundary("mim.py evaluate", stopped, "free space or fix the path, then run "
                        "the command again", usage=(UsageError, ValueError)):
        device = command_line_device(args.device) if args.runs else None
        for run_dir in args.runs:
            with evaluating(run_dir):
                if args.gradient_noise:
                    gradient_noise_run(run_dir, device, args.repeats)
                else:
                    evaluate_run(run_dir, device, args)
        if args.summary:
            print(write_summary(args.summary, args.x, args.format, args.compare))


# ----------------------------------------------------------------------------------------
# 11. Summaries: python mim.py evaluate --summary DIR, mean and std over seeds
# ----------------------------------------------------------------------------------------

def file_digest(path):
    """The SHA-256 of a file, in hex: which checkpoint an evaluation measured."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def is_stale(run_dir, evaluation):
    """Whether eval.json measured another best.pt than the run's present one: by the
    digest it records, or where it records none (older runs), by modification time."""
    best, record = os.path.join(run_dir, BEST), evaluation.get("checkpoint")
    if not os.path.exists(best):
        return False
    if isinstance(record, dict) and "sha256" in record:
        return record["sha256"] != file_digest(best)
    return os.path.getmtime(best) > os.path.getmtime(os.path.join(run_dir, EVALUATION))


def read_object(path, fix):
    """The JSON object in path, else ValueError naming the file and `fix`."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path} not found; {fix}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); {fix}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a JSON {type(obj).__name__}, not an object; {fix}")
    for key, value in obj.items():
        if key in evaluate.METRICS or key.startswith("test_"):
            if value is not None and (isinstance(value, bool)
                                      or not isinstance(value, (int, float))):
                raise ValueError(f"{path}: {key} is {value!r}, not a number; {fix}")
    return obj


def load_runs(folder):
    """(config, metrics) of every DIR/*/results.json, updated by the run's eval.json
    unless that is stale (is_stale); metrics_from says where the metrics came from. A
    file that cannot be read is refused, naming it."""
    runs, configs = [], {}
    for path in sorted(glob.glob(os.path.join(folder, "*", RESULTS))):
        run_dir = os.path.dirname(path)
        fix = (f"test the run again with mim.py --resume {run_dir}, or move {run_dir} out "
               f"of {folder}")
        cfg = read_object(os.path.join(run_dir, CONFIG), fix)
        results = {**read_object(path, fix), "metrics_from": RESULTS, "run": run_dir}
        if os.path.exists(os.path.join(run_dir, EVALUATION)):  # evaluate.py's metrics win
            evaluation = read_object(os.path.join(run_dir, EVALUATION),
                                     f"evaluate it again with mim.py evaluate {run_dir}")
            if is_stale(run_dir, evaluation):
                results["metrics_from"] = "results.json (eval.json stale: of an older best.pt)"
            else:
                results.update(evaluation, metrics_from="eval.json, else results.json")
        runs.append((cfg, results))
        configs[os.path.join(run_dir, CONFIG)] = cfg
    if not runs:
        raise ValueError(f"no */results.json under {folder}; train runs with mim.py --out first")
    check_comparable(configs)
    return runs


def check_comparable(configs):
    """Refuse a setting that one config.json lacks and another has, or writes as a number
    in one and as text in another ({path: config}): the summary would group such runs
    apart or fail to order them."""
    seen, first = {}, next(iter(configs))
    for path, cfg in configs.items():
        for a, b in ((path, first), (first, path)):
            lacking = sorted(set(configs[b]) - set(configs[a]) - set(NAMING_KEYS))
            if lacking:
                raise ValueError(f"{a} lacks {lacking[0]}, which {b} sets; write it as mim.py "
                                 f"would, or move {os.path.dirname(a)} out of the summary")
        for key, value in cfg.items():
            if value is None or key in NAMING_KEYS:
                continue
            kind = "number" if isinstance(value, (int, float)) and not isinstance(
                value, bool) else type(value).__name__
            earlier = seen.setdefault(key, (kind, value, path))
            if earlier[0] != kind:
                raise ValueError(f"{key} is {value!r} in {path} but {earlier[1]!r} in "
                                 f"{earlier[2]}; write it the same way in both (as mim.py "
                                 "wrote it)")


def varying_keys(runs):
    """The settings whose values differ between runs (NAMING_KEYS aside)."""
    return [k for k in runs[0][0] if k not in NAMING_KEYS
            and len({json.dumps(c.get(k)) for c, _ in runs}) > 1]


def in_order(values):
    """Settings' values sorted: numbers by value, then everything else by name."""
    return [(0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v)) for v in values]


def summarize(runs):
    """Group runs by the config values that differ between them (NAMING_KEYS aside).
    Returns (group keys, {group: {metric: (mean, std, n)}})."""
    varying = varying_keys(runs)
    groups = {}
    for cfg, res in runs:
        groups.setdefault(tuple(cfg[k] for k in varying), []).append(res)
    table = {}
    for key, results in sorted(groups.items(), key=lambda item: in_order(item[0])):
        metrics = dict.fromkeys(m for r in results for m in r
                                if isinstance(r[m], (int, float)) and m not in MEASURED_WITH)
        table[key] = {}
        for m in metrics:  # over the runs that have m (AIS may have run on some only)
            values = [r[m] for r in results if m in r]
            table[key][m] = (float(np.mean(values)), float(np.std(values)), len(values))
    return varying, table


def number(v):
    return f"{v:.3f}" if abs(v) < 1e4 else f"{v:.3g}"


def measured_with(runs, varying):
    """{group: text} saying how each group's metrics were measured (MEASURED_WITH), with
    MIXED where its seeds differ."""
    seen = {}
    for cfg, res in runs:
        group = seen.setdefault(tuple(cfg[k] for k in varying), {})
        for k in MEASURED_WITH:
            group.setdefault(k, set()).add(json.dumps(res.get(k)))
    def text(name, values):
        values = sorted(json.loads(v) for v in values if v != "null")
        if len(values) > 1:
            return f"{name} MIXED " + " / ".join(map(str, values))
        return f"{name} {values[0]}" if values else None
    return {key: "; ".join(filter(None, (text(k, v) for k, v in how.items())))
            for key, how in seen.items()}


def summary_markdown(varying, table, metrics, how):
    def label(m):
        name, unit = evaluate.describe(m)
        return f"{name} ({unit})" if name else m
    head = varying + ["seeds"] + [label(m) for m in metrics] + ["measured with"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for key, row in table.items():
        seeds = max((row[m][2] for m in row), default=0)
        def cell(m):  # a metric that fewer seeds have says over how many
            mean, std, n = row[m]
            return f"{number(mean)} ± {number(std)}" + (f" ({n} seeds)" if n < seeds else "")
        cells = [str(v) for v in key] + [str(seeds)] + [
            cell(m) if m in row else "" for m in metrics]
        lines.append("| " + " | ".join(cells + [how[key]]) + " |")
    lines.append("\nmean ± std (ddof = 0) over the seeds of each row")
    if any("MIXED" in text for text in how.values()):
        lines.append("MIXED: the seeds of that group were measured differently, so its "
                     "means mix estimators; evaluate them alike (mim.py evaluate RUN ... "
                     "with the same flags for every seed)")
    return "\n".join(lines) + "\n"


def summary(runs, x_key=None, fmt="png"):
    """The markdown table of mean and std over seeds of runs (load_runs) and, where x_key
    varies between them, a figure (file contents of format fmt) of every metric against
    it (else None)."""
    varying, table = summarize(runs)
    metrics = [m for m in evaluate.METRICS if m in runs[0][1]] + sorted(
        m for m in runs[0][1] if m.startswith(("ks_", evaluate.AU_PREFIX)))
    text = summary_markdown(varying, table, metrics, measured_with(runs, varying))
    if x_key is None:
        return text, None
    if x_key not in varying:
        varies = ", ".join(varying) or "nothing but the seed"
        return text + (f"no plot: {x_key} does not vary between these groups (what varies: "
                       f"{varies}; seeds are averaged within a group)\n"), None
    plotted = [m for m in metrics if m != "test_mi_batch_cap"]   # a constant, log B
    same = {k: v for k, v in runs[0][0].items() if k in ("data", "arch", "loss")
            and k not in varying}
    title = ", ".join(str(v) for v in same.values()) + (": " if same else "")
    seeds = sorted({row[m][2] for row in table.values() for m in row})
    n_seeds = str(seeds[0]) if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}"
    with evaluate.pyplot().rc_context({"font.size": evaluate.FIGURE_FONT}):
        figure = evaluate.figure_bytes(evaluate.plot_summary(
            varying, table, plotted, x_key, title=title, n_seeds=n_seeds), fmt)
    return text, figure


# Paired comparisons, --summary DIR --compare KEY: the runs of two values of KEY that
# agree in every other setting, seed by seed, scored on the same test points (POINTS).
# How an evaluation was made, and on which points: runs compared point by point must
# agree in all of it.
SCORED_WITH = ("scored_points_sha256", *(k for k in MEASURED_WITH if k != "metrics_from"))


def read_points(run, test_size, nll_points):
    """The per-point scores of a run's present evaluation (test_metrics' points), read
    from POINTS and checked against the counts eval.json gives (test_size, nll_points);
    ValueError naming the file."""
    fix = f"evaluate it again with mim.py evaluate {run}"
    path = os.path.join(run, POINTS)
    try:
        with open(path) as f:
            header, *rows = [line.rstrip("\n").split(",") for line in f]
        if tuple(header) != POINTS_COLUMNS:
            raise ValueError(f"its columns are not {','.join(POINTS_COLUMNS)}")
        label, sampled, means = (np.array([int(r[j]) for r in rows]) for j in (1, 2, 3))
        nll = np.array([float(r[4]) for r in rows if r[4]])
    except FileNotFoundError:
        raise ValueError(f"{path} not found (an evaluation before per-point scores were "
                         f"kept?); {fix}") from None
    except (ValueError, IndexError) as e:
        raise ValueError(f"{path} is not a table of per-point scores ({e}); {fix}") from None
    if (len(label), len(nll)) != (test_size, nll_points):
        raise ValueError(f"{path} holds {len(label)} points and {len(nll)} NLLs, not the "
                         f"{test_size} and {nll_points} of {EVALUATION}; {fix}")
    return {"label": label, "knn5_correct": sampled == 1, "knn5_mean_correct": means == 1,
            **({"nll": nll} if len(nll) else {})}


def runs_to_compare(runs, key):
    """{other settings: {value of key: {seed: results}}}: the runs that differ only in
    key and their seed, as pairs to compare; refuses runs without a present evaluation
    and two runs of one seed, naming them."""
    varying = varying_keys(runs)
    if key not in varying:
        raise ValueError(f"--compare {key}: {key} does not vary between these runs (what "
                         f"varies: {', '.join(varying) or 'nothing but the seed'})")
    groups = {}
    for cfg, res in runs:
        if not res["metrics_from"].startswith(EVALUATION):
            raise ValueError(f"{res['run']} has no {EVALUATION} of its present {BEST}; "
                             f"evaluate it with mim.py evaluate {res['run']}")
        others = tuple((k, cfg[k]) for k in varying if k != key)
        seeds = groups.setdefault(others, {}).setdefault(cfg[key], {})
        if cfg["seed"] in seeds:
            raise ValueError(f"{seeds[cfg['seed']]['run']} and {res['run']} are both seed "
                             f"{cfg['seed']} of one kind; move one of them out of the folder")
        seeds[cfg["seed"]] = res
    return groups


def check_scored_alike(compared):
    """Refuse runs of one comparison that were scored differently (SCORED_WITH), naming
    two of them and the difference."""
    first = compared[0]
    for res in compared[1:]:
        for k in SCORED_WITH:
            if res.get(k) != first.get(k):
                what = ("were scored on different test points (other data, or another "
                        "--test-size)" if k == "scored_points_sha256" else
                        f"were evaluated differently: {k} {first.get(k)} and {res.get(k)}")
                raise ValueError(f"{first['run']} and {res['run']} {what}; evaluate both "
                                 "alike (mim.py evaluate RUN ... with the same flags and data)")


def signed(v, digits):
    return f"{v:+.{digits}f}"


def p_value(p):
    """A p-value to 3 digits; one below the smallest float (exact, but not representable)
    as an upper bound."""
    return f"{p:.3g}" if p > 0 else "< 1e-300"


def comparison_rows(per_seed, measure):
    """The markdown rows of one measure: one per seed, then the mean over seeds with its
    t interval, or a note where there is only one seed a side."""
    label, unit = evaluate.PAIRED_MEASURES[measure]
    digits = 2 if unit == "nats" else 4
    lines, diffs = [], []
    for seed, rows in per_seed.items():
        r = rows[measure]
        diffs.append(r["diff"])
        low, high = r["interval"]
        cells = [f"{label} ({unit})", str(seed), f"{r['a']:.{digits}f}", f"{r['b']:.{digits}f}",
                 signed(r["diff"], digits) + (f" ± {r['se']:.{digits}f}" if "se" in r else ""),
                 f"{signed(low, digits)} to {signed(high, digits)}",
                 f"{r['only_a']} / {r['only_b']}" if "p" in r else "",
                 p_value(r["p"]) if "p" in r else ""]
        lines.append("| " + " | ".join(cells) + " |")
    mean, interval = evaluate.mean_interval(diffs)
    a, b = (np.mean([rows[measure][side] for rows in per_seed.values()]) for side in "ab")
    spread = ("one seed a side: no interval over seeds" if interval is None else
              f"{signed(interval[0], digits)} to {signed(interval[1], digits)}")
    lines.append(f"| {label} ({unit}) | mean, {len(diffs)} seed{'s' * (len(diffs) > 1)} | "
                 f"{a:.{digits}f} | {b:.{digits}f} | {signed(mean, digits)} | {spread} | | |")
    return lines


def comparison_markdown(runs, key):
    """The paired comparison of the runs (load_runs) by `key`, as markdown."""
    lines = []
    for others, by_value in runs_to_compare(runs, key).items():
        where = ", ".join(f"{k} {v}" for k, v in others)
        values = sorted(by_value, key=lambda v: in_order([v]))
        if len(values) < 2:
            lines.append(f"\n{where}: only {key} {values[0]}, nothing to compare\n")
            continue
        for i, value_a in enumerate(values):
            for value_b in values[i + 1:]:
                lines += comparison_table(key, value_a, value_b, by_value, where)
    return "\n".join(lines) + "\n"


def comparison_table(key, value_a, value_b, by_value, where):
    """The lines of one comparison, value_a (A) against value_b (B), seed by seed."""
    a_runs, b_runs = by_value[value_a], by_value[value_b]
    seeds = sorted(set(a_runs) & set(b_runs))
    alone = sorted(set(a_runs) ^ set(b_runs))
    head = f"## Paired comparison: {key} {value_a} (A) against {value_b} (B)" + (
        f", {where}" if where else "")
    if not seeds:
        return ["", head, "", "no seed has runs of both; nothing to compare"]
    check_scored_alike([r for s in seeds for r in (a_runs[s], b_runs[s])])
    def points(res):
        return read_points(res["run"], res.get("test_size"), res.get("nll_points", 0))
    per_seed = {s: evaluate.paired_comparison(points(a_runs[s]), points(b_runs[s]))
                for s in seeds}
    first = a_runs[seeds[0]]
    nll = (f"; NLL by IWAE with S = {first['nll_samples']} on the first "
           f"{first['nll_points']}" if "nll" in per_seed[seeds[0]] else "")
    lines = ["", head, "",
             f"Seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))}, each pair "
             f"scored on the same "
             f"{first['test_size']} test points (5-NN fitted on {first['knn_train_size']} "
             f"training codes{nll}). A - B per seed with a 95% interval: the paired "
             f"bootstrap over test points ({evaluate.BOOTSTRAP_RESAMPLES:,} resamples) "
             "for 5-NN, with McNemar's exact p from the points only one model gets right; "
             "± its standard error and ±1.96 of them for the NLL. Over seeds: the mean "
             "difference with Student's t interval.", "",
             "| measure | seed | A | B | A - B | 95% interval | only A right / only B right "
             "| McNemar p |", "|" + " --- |" * 8]
    for measure in evaluate.PAIRED_MEASURES:
        if measure in per_seed[seeds[0]]:
            lines += comparison_rows(per_seed, measure)
    if alone:
        lines += ["", f"left out, without a partner of the other {key}: seed "
                      f"{', '.join(map(str, alone))}"]
    return lines


def write_summary(folder, x_key, fmt="png", compare=None):
    """DIR/summary.md (and summary.png, .pdf or .svg when x_key varies) over
    DIR/*/results.json; with compare, the paired comparison by that setting too."""
    runs = load_runs(folder)
    text, figure = summary(runs, x_key, fmt)
    if compare is not None:
        text += comparison_markdown(runs, compare)
    unfinished = sorted(os.path.basename(os.path.dirname(p))
                        for p in glob.glob(os.path.join(folder, "*", CONFIG))
                        if not os.path.exists(os.path.join(os.path.dirname(p), RESULTS)))
    if unfinished:
        text += (f"left out, without results.json (training still running or stopped): "
                 f"{', '.join(unfinished)}; mim.py --resume {folder}/NAME finishes a stopped "
                 "one\n")
    write_together(folder, {"summary.md": text.encode("utf-8"),   # "±" whatever the locale
                            **({f"summary.{fmt}": figure} if figure is not None else {})})
    return text


# ----------------------------------------------------------------------------------------
# 12. python mim.py ...: one entry for both commands
# ----------------------------------------------------------------------------------------

def main(argv=None):
    """python mim.py [flags]: train and test; python mim.py evaluate ...: evaluate runs."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["evaluate"]:
        return evaluate_main(argv[1:])
    cfg, overrides = parse_args(argv)
    folder = cfg.resume or cfg.out
    with error_boundary("mim.py", functools.partial(stopped_message, folder=folder),
                        "free space or fix the path, then --resume the run if an epoch "
                        "was saved", folder), outliving_the_console():
        results = run(cfg, overrides | {"device"})
        say(evaluate.format_results(results))


if __name__ == "__main__":
    main()
