"""Speed of mim.py and evaluate.py on this machine, in one process.

    python bench.py [--quick] [--pixel-mim] [--device auto|cpu|cuda] [--out bench.json]

Prints one table per part and writes them all to bench.json. Every ratio it prints is
measured in this run, on this machine, except the one labelled as the authors' code:

    peak       the machine's limits measured here: a large fp32 and bf16 matrix product,
               and a 64-channel 3x3 convolution on 28x28 maps (the decoder's layer) in
               the default and the channels_last layout
    train      images/s of one training step at batch 128 (median over timed steps after
               warm-up steps) for convhvae and pixelhvae, vamp and normal priors, mim /
               amim / vae (pixelhvae with mim only with --pixel-mim), fp32 and --amp;
               each twice: the plain step (build_model as it is: default layout, the
               library's convolution gradients, glibc's default allocator) and the fast
               one (mim.speed_up, as the command line trains), and their ratio x_plain;
               FLOPs per step (torch.utils.flop_counter), achieved GFLOP/s, the fraction
               of the convolution peak, and memory; MIM's step time over the VAE's beside
               the ratio of their FLOPs
    scaling    step time against batch size (convhvae, vamp, vae, fast)
    nll        test images/s of the IWAE NLL at S = 5000 (convhvae, vamp), plain and fast
    threads    (CPU) one epoch of the toy MLP (toy2d, MIM, hidden 50) and one fast step of
               the convHVAE + VampPrior MIM at batch 128, each with 1 thread and with all
               cores, beside the count the command line takes where OMP_NUM_THREADS is
               unset (cli.default_threads) and that count's time over the faster one's
    ksg        ksg_mi against a per-point loop (one tree query per point, as NPEET and
               the authors' code do) on the same data, N = 1k, 10k, 100k, d = 2+2, 20+20

speed_up changes the allocator for the whole process and for good, so every plain
measurement runs before the first fast one. Memory: on CUDA the peak allocated per
measurement; on a CPU the process's peak resident size so far (ru_maxrss), which only
ever grows.
"""
import functools
import math
import os
import resource
import statistics
import time

import numpy as np
import torch
from scipy.spatial import cKDTree
from scipy.special import digamma
from torch.utils.flop_counter import FlopCounterMode

import cli
import datasets
import evaluate
import mim

BATCH = 128
IMAGE = (1, 28, 28)
X_DIM = math.prod(IMAGE)
# The authors' code (seraphlabs-ca/MIM), batch 128, convHVAE: images/s of one training
# step, measured once on another machine (a 2-core AMD EPYC, torch 2.13), not in this run; their NLL took 33 s per image there. x_authors divides by these.
AUTHORS_IMAGES_PER_S = {("vae", "vamp"): 55, ("amim", "vamp"): 55, ("mim", "vamp"): 27,
                        ("vae", "normal"): 110}
AUTHORS_NLL_S_PER_IMAGE = 33.0
NLL_S = 5000
KSG_REPEATS = 5     # timed calls of ksg_mi up to N = 10k (the median); larger N is timed once


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, device, warmup, repeats):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def count_flops(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def reset_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def memory_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10    # KiB on Linux


# ----------------------------------------------------------------------------------------
# The machine's peak
# ----------------------------------------------------------------------------------------

def peak(device, repeats):
    rows = []
    n = 2048
    for dtype in (torch.float32, torch.bfloat16):
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        s = median_seconds(lambda: a @ b, device, 1, repeats)
        rows.append({"what": f"matmul {n}x{n} {str(dtype)[6:]}", "gflop_s": 2 * n ** 3 / s / 1e9})
    conv = torch.nn.Conv2d(64, 64, 3, padding=1).to(device)
    x = torch.randn(BATCH, 64, 28, 28, device=device)
    flops = 2 * BATCH * 64 * 64 * 9 * 28 * 28
    for layout in (torch.contiguous_format, torch.channels_last):
        for dtype in (torch.float32, torch.bfloat16):
            c = conv.to(memory_format=layout)
            v = x.contiguous(memory_format=layout)
            with torch.no_grad(), torch.autocast(device.type, torch.bfloat16,
                                                 enabled=dtype == torch.bfloat16):
                s = median_seconds(lambda: c(v), device, 1, repeats)
            name = "channels_last" if layout == torch.channels_last else "default"
            rows.append({"what": f"conv 64->64 3x3 28x28 {name} {str(dtype)[6:]}",
                         "gflop_s": flops / s / 1e9})
    return rows


def conv_peak(rows, amp):
    return max(r["gflop_s"] for r in rows if r["what"].startswith("conv")
               and r["what"].endswith("bfloat16" if amp else "float32"))


# ----------------------------------------------------------------------------------------
# Training steps and the NLL
# ----------------------------------------------------------------------------------------

OBJECTIVES = {"vae": mim.vae_loss, "amim": mim.amim_loss, "mim": mim.mim_loss}


def image_model(arch, prior, device, fast=True):
    """The image model as the command line builds it (40 + 40 latent units, the paper's
    decoder samples); fast: with the speed-ups, as the command line trains."""
    torch.manual_seed(0)
    x_init = torch.bernoulli(torch.full((1000, X_DIM), 0.3))
    spec = mim.ModelSpec(x_dim=X_DIM, binary=True, image_shape=IMAGE, arch=arch,
                         z_dim=cli.IMAGE_Z_DIM, prior=prior)
    model = mim.build_model(spec, x_init)
    if fast and device.type == "cpu":
        cli.reuse_freed_memory()          # for the rest of the process: it cannot be undone
    return (mim.speed_up(model, device) if fast else model).to(device)


def step_function(model, loss, amp, x):
    loss_fn, opt = OBJECTIVES[loss], mim.optimizer(model, mim.TrainSpec(amp=amp))

    def step():
        with mim.autocast(x.device, amp):
            loss, _ = loss_fn(model, x, mim.FULL)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def timed_step(arch, prior, loss, amp, device, warmup, repeats, batch, fast):
    """(seconds per step, the step) of one training step; memory counts from its start."""
    model = image_model(arch, prior, device, fast)
    x = torch.bernoulli(torch.full((batch, X_DIM), 0.3, device=device))
    step = step_function(model, loss, amp, x)
    reset_memory(device)
    return median_seconds(step, device, warmup, repeats), step


def train_row(arch, prior, loss, amp, device, peaks, warmup, repeats, batch=BATCH,
              plain_s=None):
    """The fast step's row; with plain_s (the plain step's seconds) also their ratio."""
    seconds, step = timed_step(arch, prior, loss, amp, device, warmup, repeats, batch,
                               fast=True)
    flops, memory = count_flops(step), memory_mib(device)
    row = {"arch": arch, "prior": prior, "loss": loss, "amp": amp, "batch": batch,
           "step_s": seconds, "images_s": batch / seconds, "gflop_step": flops / 1e9,
           "gflop_s": flops / seconds / 1e9, "memory_mib": memory}
    row["of_conv_peak"] = row["gflop_s"] / conv_peak(peaks, amp)
    if plain_s is not None:
        row.update(plain_step_s=plain_s, x_plain=plain_s / seconds)
    authors = AUTHORS_IMAGES_PER_S.get((loss, prior)) if arch == "convhvae" else None
    if authors and batch == BATCH and device.type == "cpu":
        row["x_authors"] = row["images_s"] / authors
    return row


def timed_nll(device, images, fast):
    """(seconds, the NLL's call) of the IWAE NLL of `images` test images."""
    model = image_model("convhvae", "vamp", device, fast=fast)
    model.eval()
    x = torch.bernoulli(torch.full((images, X_DIM), 0.3, device=device))
    nll = functools.partial(evaluate.iwae_nll, model, x, NLL_S)
    reset_memory(device)
    return median_seconds(nll, device, 0, 1), nll


def nll_row(device, peaks, images, plain_s):
    seconds, nll = timed_nll(device, images, fast=True)
    flops, memory = count_flops(nll), memory_mib(device)
    row = {"S": NLL_S, "images": images, "s_per_image": seconds / images,
           "images_s": images / seconds, "gflop_image": flops / images / 1e9,
           "gflop_s": flops / seconds / 1e9, "memory_mib": memory,
           "plain_s_per_image": plain_s / images, "x_plain": plain_s / seconds}
    row["limit_s_per_image"] = row["gflop_image"] / conv_peak(peaks, amp=False)
    row["x_limit"] = row["s_per_image"] / row["limit_s_per_image"]
    if device.type == "cpu":
        row["x_authors"] = AUTHORS_NLL_S_PER_IMAGE / row["s_per_image"]
    return row


def all_cores():
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def seconds_with_threads(fn, threads, warmup, repeats):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return median_seconds(fn, torch.device("cpu"), warmup, repeats)
    finally:
        torch.set_num_threads(before)


def toy_epoch():
    """One epoch of `python mim.py`'s model and objective on toy2d, as a callable."""
    data = datasets.load_dataset("toy2d")
    torch.manual_seed(0)
    model = mim.build_model(mim.ModelSpec(x_dim=data.x_dim), x_init=data.x_train)
    spec = mim.TrainSpec()
    opt = mim.optimizer(model, spec)
    return functools.partial(mim.train_epoch, model, mim.mim_loss, opt, data.x_train, spec,
                             epoch=spec.warmup + 1)


def thread_rows(warmup, repeats):
    """1 thread against all cores for the MLP and an image model, and the default's cost:
    the rule in cli.default_threads should pick the faster count (or one within noise)."""
    cores = all_cores()
    x = torch.bernoulli(torch.full((BATCH, X_DIM), 0.3))
    image_step = step_function(image_model("convhvae", "vamp", torch.device("cpu")), "mim",
                               False, x)
    rows = []
    for arch, what, fn in (("mlp", "toy2d MIM epoch, hidden 50", toy_epoch()),
                           ("convhvae", "convHVAE + VampPrior MIM step, batch 128",
                            image_step)):
        one = seconds_with_threads(fn, 1, warmup, repeats)
        full = seconds_with_threads(fn, cores, warmup, repeats)
        with cli.default_threads(arch, torch.device("cpu")):
            default = torch.get_num_threads()
        chosen = one if default == 1 else full if default == cores else float("nan")
        rows.append({"what": what, "s_1_thread": one, f"s_{cores}_threads": full,
                     "speed_up_all": one / full, "default_threads": default,
                     "default_over_best": chosen / min(one, full)})
    return rows


def mim_vs_vae(rows):
    """Per setting: MIM's step time over the VAE's, beside the ratio of their FLOPs; equal
    ratios mean MIM's extra work runs as efficiently as the VAE's."""
    by_key = {(r["arch"], r["prior"], r["amp"], r["loss"]): r for r in rows}
    out = []
    for (arch, prior, amp, loss), r in by_key.items():
        vae = by_key.get((arch, prior, amp, "vae"))
        if loss == "mim" and vae:
            time_ratio = r["step_s"] / vae["step_s"]
            flop_ratio = r["gflop_step"] / vae["gflop_step"]
            out.append({"arch": arch, "prior": prior, "amp": amp, "time_ratio": time_ratio,
                        "flop_ratio": flop_ratio, "time_over_flops": time_ratio / flop_ratio})
    return out


# ----------------------------------------------------------------------------------------
# KSG against the per-point loop
# ----------------------------------------------------------------------------------------

def ksg_loop(x, z, k, points=None):
    """KSG with one tree query per point, the way NPEET and the authors' code do it;
    `points` limits the loop to the first ones (for timing only)."""
    joint = np.hstack([x, z])
    trees = [cKDTree(a) for a in (joint, x, z)]
    total = 0.0
    for i in range(len(x) if points is None else points):
        eps = trees[0].query(joint[i], k=k + 1, p=np.inf)[0][k]
        radius = np.nextafter(eps, 0)
        n_x1 = len(trees[1].query_ball_point(x[i], radius, p=np.inf))
        n_z1 = len(trees[2].query_ball_point(z[i], radius, p=np.inf))
        total += digamma(n_x1) + digamma(n_z1)
    return digamma(k) + digamma(len(x)) - total / len(x)


def ksg_row(n, d, loop_points):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d))
    z = 0.8 * x + 0.6 * rng.standard_normal((n, d))
    value = evaluate.ksg_mi(x, z, evaluate.KSG_K)                       # also the warm-up
    fast = median_seconds(lambda: evaluate.ksg_mi(x, z, evaluate.KSG_K), torch.device("cpu"),
                          0, KSG_REPEATS if n <= 10_000 else 1)
    points = min(n, loop_points)
    start = time.perf_counter()
    loop_value = ksg_loop(x, z, evaluate.KSG_K, points)
    loop = (time.perf_counter() - start) * n / points
    row = {"N": n, "d": f"{d}+{d}", "ksg_s": fast, "loop_s": loop,
           "loop_timed_on": points, "speedup": loop / fast, "mi_nats": value}
    if points == n:
        row["abs_difference"] = abs(value - loop_value)
    return row


# ----------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------

def cell(v):
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def print_table(title, rows):
    keys = list(dict.fromkeys(k for r in rows for k in r))
    print(f"\n{title}\n| " + " | ".join(keys) + " |\n|" + " --- |" * len(keys))
    for r in rows:
        print("| " + " | ".join(cell(r.get(k, "")) for k in keys) + " |", flush=True)


def machine(device):
    """What the timings ran on, printed too: without native bf16 the --amp rows are skipped."""
    report = {**cli.environment(device), "cpus": os.cpu_count(),
              "native_bf16": cli.native_bf16(device)}
    print(f"CPU capability {report['cpu_capability']}, native bfloat16: "
          f"{report['native_bf16']}" + ("" if report["native_bf16"] else
                                        " (--amp rows skipped: emulated bf16 is no speed-up)"))
    return report


def train_rows(args, device, peaks, native, warmup, repeats, nll_images):
    """The train table, every plain step (and the plain NLL's seconds) timed before the
    first fast one: speed_up's allocator setting cannot be undone."""
    archs = ("convhvae",) if args.quick else ("convhvae", "pixelhvae")
    settings = [(arch, prior, loss, amp) for arch in archs for prior in ("vamp", "normal")
                for loss in ("vae", "amim", "mim")
                if not (arch == "pixelhvae" and loss == "mim" and not args.pixel_mim)
                for amp in ((False, True) if native else (False,))]
    plain = {}
    for setting in settings:
        plain[setting] = timed_step(*setting, device, warmup, repeats, BATCH, fast=False)[0]
        print(f"plain step {setting}: {plain[setting]:.3f} s", flush=True)
    plain_nll = timed_nll(device, nll_images, fast=False)[0]
    rows = []
    for setting in settings:
        rows.append(train_row(*setting, device, peaks, warmup, repeats,
                              plain_s=plain[setting]))
        print_table("train", rows[-1:])
    return rows, plain_nll


def main(argv=None):
    parser = cli.OneLineParser(prog="bench.py", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer timed steps, convhvae only, KSG up to N = 10k")
    parser.add_argument("--pixel-mim", action="store_true",
                        help="also time pixelhvae with mim, whose decoder samples are drawn "
                             "pixel by pixel: about 15 TFLOP per step of 128")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--out", default="bench.json", help="where the results go")
    args = parser.parse_args(argv)
    folder = os.path.dirname(os.path.abspath(args.out))   # checked before minutes of timing
    if os.path.isdir(args.out) or not (os.path.isdir(folder) and os.access(folder, os.W_OK)):
        parser.error(f"--out {args.out}: cannot write a file there; pass another path")
    def stopped(how):
        return f"bench.py: stopped by {how}; {args.out} was not written: run it again"
    with cli.error_boundary("bench.py", stopped, "pass another --out"):
        bench(args, cli.choose_device(args.device))


def bench(args, device):
    """Every table, printed as it is measured, then all of them in args.out."""
    warmup, repeats = (2, 3) if args.quick else (2, 5)   # the heap settles over 2 steps
    report = machine(device)
    native = report["native_bf16"]
    report["peak"] = peak(device, repeats)
    print_table("peak (GFLOP/s)", report["peak"])

    nll_images = 2 if args.quick else 4
    rows, plain_nll = train_rows(args, device, report["peak"], native, warmup, repeats,
                                 nll_images)
    report["train"] = rows
    print_table("train (x_plain: the plain step's time over the fast one's, this run; "
                "x_authors: against the authors' code, measured elsewhere)", rows)
    report["mim_vs_vae"] = mim_vs_vae(rows)
    print_table("MIM step against the VAE step (Algorithm 2 does more work per step)",
                report["mim_vs_vae"])

    report["scaling"] = [train_row("convhvae", "vamp", "vae", False, device, report["peak"],
                                   warmup, repeats, batch=b) for b in (32, 64, 128, 256)]
    print_table("scaling", report["scaling"])
    report["nll"] = [nll_row(device, report["peak"], nll_images, plain_nll)]
    print_table("nll", report["nll"])
    if device.type == "cpu" and all_cores() > 1:
        report["threads"] = thread_rows(warmup, repeats)
        print_table("threads (seconds; default_threads: what mim.py takes where "
                    "OMP_NUM_THREADS is unset)", report["threads"])
    sizes = (1_000, 10_000) if args.quick else (1_000, 10_000, 100_000)
    report["ksg"] = [ksg_row(n, d, loop_points=10_000) for d in (2, 20) for n in sizes]
    print_table("ksg (seconds)", report["ksg"])
    cli.write_json(args.out, report)


if __name__ == "__main__":
    main()
