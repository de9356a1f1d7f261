"""Tests for the command line: cli.py behind `python mim.py`, run_all.sh, and bench.py's
flags. The paper and the library are test_mim.py's; this file checks what a user of the
command line meets.

    flags        every flag's default is its spec's; presets; devices (CUDA mocked)
    run folders  training runs and their files, checkpoints, --resume, the evaluate
                 command, summaries, the environment record, TensorBoard
    run_all.sh   the job list, GPU slots, a real one-node SLURM cluster
    bad input    one line, exit status 2, nothing half-written; full disks, signals,
                 umasks, closed pipes

Tests marked slow train or evaluate runs (seconds each), start a server or mount a file
system: `python -m pytest -q -m "not slow"` leaves them out.
"""
import contextlib
import csv
import dataclasses
import errno
import gzip
import hashlib
import io
import json
import math
import os
import pickle
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
import warnings

import numpy as np
import pytest
import scipy.io
import scipy.stats
import torch

import bench
import cli
import mim
from cli import evaluate       # the evaluate.py that the command line loads (cli.sibling)
from test_mim import COMPARISON_LOSSES, HERE, write_chardata, write_idx, write_idx_set


def test_preset_authors_sets_its_fields_and_explicit_flags_win():
    cfg, _ = cli.parse_args(["--data", "mnist", "--arch", "convhvae", "--preset", "authors",
                             "--epochs", "5"])
    for name, value in cli.PRESETS["authors"].items():
        assert getattr(cfg, name) == (5 if name == "epochs" else value), name
    plain, _ = cli.parse_args(["--data", "mnist", "--arch", "convhvae"])
    assert (plain.optimizer, plain.estimator, plain.init) == ("adam", "loo-code", "torch")


# Device logic, checked on the CPU with torch.cuda's answers mocked.

def test_native_bf16_on_cuda_needs_compute_capability_8(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # emulation
    for capability, native in (((7, 5), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capability)
        assert cli.native_bf16(torch.device("cuda")) is native


def test_evaluation_passes_are_sized_by_free_gpu_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (8 * 2 ** 30, 16 * 2 ** 30))
    rows = cli.eval_rows(torch.device("cuda"), 784)
    assert rows == int(8 * 2 ** 30 * cli.EVAL_MEMORY_SHARE) // (cli.EVAL_BYTES_PER_X_VALUE * 784)
    assert cli.eval_rows(torch.device("cpu"), 784) is None


def test_full_precision_math_turns_tf32_off_inside_and_restores_it():
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    with cli.full_precision_math():
        assert (conv.fp32_precision, matmul.fp32_precision) == ("ieee", "ieee")
    assert (conv.fp32_precision, matmul.fp32_precision) == before


def test_deterministic_flag_sets_cudnn_and_torch_to_deterministic(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    calls = []
    monkeypatch.setattr(torch, "use_deterministic_algorithms",
                        lambda mode, warn_only=False: calls.append((mode, warn_only)))
    cli.deterministic_algorithms()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert calls == [(True, True)] and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


@pytest.mark.slow
def test_a_resumed_run_keeps_its_deterministic_setting(tmp_path, monkeypatch):
    """--deterministic is a setting of the run: resuming without the flag turns the
    deterministic algorithms on again before the first step. (On an H200 the resumed
    epochs differed from the uninterrupted run's while it did not.)"""
    calls = []
    monkeypatch.setattr(cli, "deterministic_algorithms", lambda: calls.append(1))
    run = str(tmp_path / "run")
    cli.main(["--hidden", "8", "--epochs", "1", "--warmup", "1", "--nll-samples", "0",
              "--device", "cpu", "--deterministic", "--out", run])
    cli.main(["--resume", run, "--epochs", "2"])
    assert len(calls) == 2


@pytest.mark.slow
def test_a_resumed_model_has_the_layout_of_the_uninterrupted_one(tmp_path, monkeypatch):
    """The speed-ups choose the weights' layout after a resumed run's weights are loaded,
    however load_state_dict stores them: the layout picks oneDNN's kernels and so their
    rounding. On an H200 machine's CPU (torch 2.11) the first convolution's weight came
    back from a resume in another layout and the resumed epoch differed from the
    uninterrupted one (how that torch changed the layout was not found). Here the file
    holds NCHW weights and loading takes the file's tensors as they are (assign=True)."""
    strides, real_train = [], mim.train
    def recording_train(model, *args, **kwargs):
        strides.append({n: p.stride() for n, p in model.named_parameters()})
        return real_train(model, *args, **kwargs)
    monkeypatch.setattr(mim, "train", recording_train)
    run = tmp_path / "run"
    cli.main(["--data", "mnist", "--data-dir", str(image_folder(tmp_path, 150)), "--arch",
              "convhvae", "--prior", "vamp", "--prior-components", "10", "--batch-size",
              "32", "--warmup", "1", "--epochs", "1", "--device", "cpu", "--out", str(run)])
    state = torch.load(run / "last.pt", weights_only=True)
    state["model"] = {k: v.clone(memory_format=torch.contiguous_format)
                      for k, v in state["model"].items()}
    torch.save(state, run / "last.pt")
    load = torch.nn.Module.load_state_dict
    monkeypatch.setattr(torch.nn.Module, "load_state_dict",
                        lambda module, weights, **kw: load(module, weights, assign=True))
    cli.main(["--resume", str(run), "--epochs", "2"])
    assert len(strides) == 2 and strides[1] == strides[0]


def test_a_gpu_out_of_memory_ends_in_one_line(capsys):
    """Sizes that no check up front foresees end in one line that names the fixes, not a
    traceback; the message is the start of the one an H200 gave."""
    with pytest.raises(SystemExit) as stop:
        with cli.error_boundary("mim.py", str, "unused"):
            raise torch.cuda.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 953.68 GiB. GPU 0 has a total capacity "
                "of 139.80 GiB of which 77.22 GiB is free. Process 625 has 3.08 GiB memory "
                "in use.\nSee the documentation")
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1
    assert err.startswith("mim.py: error: CUDA out of memory. Tried to allocate 953.68 GiB; ")
    assert "--batch-size" in err and "--device cpu" in err


def test_the_command_line_gives_each_comparison_loss_its_critic_and_objective():
    def function_and_scores(f):            # a functools.partial is unwrapped
        return getattr(f, "func", f), getattr(f, "keywords", {}).get("scores")

    for loss, (critic, loss_fn) in COMPARISON_LOSSES.items():
        cfg = cli.Config(loss=loss)
        assert cli.model_spec(cfg, {"x_dim": 5, "binary": False}).critic == critic
        assert function_and_scores(cli.objective(cfg)) == function_and_scores(loss_fn)


@pytest.mark.slow
def test_runs_record_their_environment(tmp_path, monkeypatch):
    """config.json, results.json and eval.json say where the run ran: versions, CPU,
    threads (one for the MLP without OMP_NUM_THREADS; the process's count comes back
    afterwards), device and the checkout's code version (git describe, as git prints it)."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads = torch.get_num_threads()
    run = str(tmp_path / "run")
    cli.main(["--hidden", "8", "--epochs", "2", "--nll-samples", "8", "--device", "cpu",
              "--out", run])
    cli.main(["evaluate", run, "--nll-samples", "4", "--test-size", "20", "--device", "cpu"])
    try:
        described = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=HERE,
                                   capture_output=True, text=True)
    except OSError:                                        # no git on this machine
        described = subprocess.CompletedProcess([], 1, "", "")
    for name in ("config.json", "results.json", "eval.json"):
        with open(os.path.join(run, name)) as f:
            env = json.load(f)["environment"]
        assert env["torch"] == torch.__version__ and env["numpy"] == np.__version__
        assert env["python"] == platform.python_version() and env["device"] == "cpu"
        assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
        assert env["threads"] == cli.MLP_THREADS and env["cpu"]
        expected = described.stdout.strip() if described.returncode == 0 else None
        assert env["code_version"] == expected
    assert torch.get_num_threads() == threads
    monkeypatch.setenv("OMP_NUM_THREADS", str(threads))         # the user's choice stands
    cli.main(["--hidden", "8", "--epochs", "1", "--nll-samples", "8", "--device", "cpu",
              "--out", run, "--overwrite"])
    with open(os.path.join(run, "config.json")) as f:
        assert json.load(f)["environment"]["threads"] == threads


class FakeSummaryWriter:
    """Stands in for torch.utils.tensorboard.SummaryWriter: records the scalars."""
    scalars = []

    def __init__(self, folder):
        self.folder = folder

    def add_scalar(self, key, value, step):
        self.scalars.append((self.folder, key, value, step))

    def flush(self):
        pass


def test_tensorboard_logs_every_number_of_each_epoch_or_refuses_in_one_line(
        tmp_path, monkeypatch, capsys):
    run, board = str(tmp_path / "run"), str(tmp_path / "board")
    flags = ["--hidden", "8", "--epochs", "2", "--nll-samples", "8", "--tensorboard", board]
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard",
                        types.SimpleNamespace(SummaryWriter=FakeSummaryWriter))
    cli.main(flags + ["--out", run])
    with open(os.path.join(run, "log.csv")) as f:
        rows = list(csv.DictReader(f))
    logged = {(key, step): value for folder, key, value, step in FakeSummaryWriter.scalars}
    assert {folder for folder, *_ in FakeSummaryWriter.scalars} == {board}
    assert len(logged) == sum(len(row) - 1 for row in rows) and len(rows) == 2
    for row in rows:
        for key in ("train_loss", "val_loss", "seconds"):
            assert logged[(key, int(row["epoch"]))] == pytest.approx(float(row[key]), rel=1e-5)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)    # not installed
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        cli.main(flags + ["--out", str(tmp_path / "other")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1
    assert "--tensorboard needs the tensorboard package: pip install tensorboard" in err
    assert not os.path.exists(tmp_path / "other")


SHADOWED = """
import os, sys
sys.path.insert(0, os.path.abspath("standins"))
import datasets, evaluate                # the stand-ins, as a notebook may have imported
sys.path.append(sys.argv[1])
import cli
try:
    cli.main(["--hidden", "8", "--epochs", "2", "--nll-samples", "8", "--out", "run"])
    cli.main(["evaluate", "run", "--nll-samples", "4", "--test-size", "50"])
except SystemExit as e:
    sys.exit(e.code)
print(datasets.NAME, evaluate.NAME, sorted(k for k in sys.modules if k.startswith("_mim_")))
"""


@pytest.mark.slow
def test_packages_named_datasets_or_evaluate_do_not_shadow_the_repositorys(tmp_path):
    """Stand-ins for Hugging Face's `datasets` and `evaluate`, first on sys.path and
    imported before mim: training and `mim.py evaluate` still use this checkout's files."""
    for name in ("datasets", "evaluate"):
        (tmp_path / "standins" / name).mkdir(parents=True)
        (tmp_path / "standins" / name / "__init__.py").write_text("NAME = 'stand-in'\n")
    proc = subprocess.run([sys.executable, "-c", SHADOWED, HERE], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[-2] == "stand-in stand-in ['_mim_datasets', '_mim_evaluate']"
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["test_size"] == 50


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_reuse_freed_memory_removes_the_page_faults_of_repeated_allocations():
    pages = 2 ** 26 // 4096
    faults = {}
    for mode in ("default", "reuse"):
        out = subprocess.run([sys.executable, "-c", PAGE_FAULT_PROBE, mode], check=True,
                             capture_output=True, text=True, cwd=HERE).stdout.split()
        faults[mode] = int(out[1])
    assert out[0] == "True"
    assert faults["default"] >= 0.9 * pages        # a fresh mapping: a fault per page
    assert faults["reuse"] < 0.05 * pages


def test_summary_is_mean_and_std_over_seeds(tmp_path):
    for seed, mi in [(1, 6.0), (2, 7.0), (3, 8.0)]:
        for loss, shift in [("mim", 0.0), ("vae", -5.0)]:
            run = tmp_path / f"{loss}-s{seed}"
            run.mkdir()
            cfg = {**vars(cli.Config(loss=loss, seed=seed)), "out": str(run)}
            if seed == 2:  # resumed on another device: still one of the seeds
                cfg.update(resume=str(run), device="cpu", overwrite=True)
            (run / "config.json").write_text(json.dumps(cfg))
            (run / "results.json").write_text(json.dumps({"test_mi_ksg": mi + shift}))
            if seed == 1:  # a metric that only some runs have, like AIS on seed 1
                (run / "eval.json").write_text(json.dumps({"test_nll_tight": 80.0 + shift}))
    varying, table = cli.summarize(cli.load_runs(tmp_path))
    assert varying == ["loss"]
    assert table[("mim",)]["test_mi_ksg"] == pytest.approx((7.0, math.sqrt(2 / 3), 3))
    assert table[("vae",)]["test_mi_ksg"][0] == pytest.approx(2.0)
    assert table[("vae",)]["test_nll_tight"] == pytest.approx((75.0, 0.0, 1))


def test_summary_names_where_metrics_came_from_and_marks_mixed_estimators(tmp_path):
    """Seed 1's NLL from eval.json at S = 50, seed 2's from results.json at S = 1000: the
    group is marked MIXED with both sample counts; --x seed explains why nothing is drawn."""
    for seed, nll, samples in [(1, 2.216, 50), (2, 2.141, 1000)]:
        run = tmp_path / f"s{seed}"
        run.mkdir()
        (run / "config.json").write_text(json.dumps(vars(cli.Config(seed=seed))))
        (run / "results.json").write_text(json.dumps({"test_nll": 2.141, "nll_samples": 1000}))
        if seed == 1:
            (run / "eval.json").write_text(json.dumps({"test_nll": nll, "nll_samples": samples}))
    runs = cli.load_runs(tmp_path)
    text, png = cli.summary(runs, "seed")
    assert png is None and "nll_samples MIXED 50 / 1000" in text
    assert "metrics_from MIXED eval.json, else results.json / results.json" in text
    assert "MIXED: the seeds of that group were measured differently" in text
    assert text.splitlines()[-1].startswith("no plot: seed does not vary between these "
                                            "groups (what varies: nothing but the seed")
    assert cli.summarize(runs)[1][()]["test_nll"][0] == pytest.approx((2.216 + 2.141) / 2)
    (tmp_path / "s1" / "eval.json").unlink()
    text, _ = cli.summary(cli.load_runs(tmp_path))
    assert "MIXED" not in text and "nll_samples 1000" in text


def scored_run(folder, loss, seed, sampled, means, nll, **evaluation):
    """A run folder as mim.py evaluate leaves it (config.json, results.json, eval.json,
    points.csv), with the given per-point scores of one sampled code, of the encoder
    means and the NLL (nats), and eval.json's settings changed by `evaluation`."""
    folder.mkdir(parents=True)
    label = np.arange(len(sampled)) % 10
    points = {"label": label, "knn5_correct": np.asarray(sampled, bool),
              "knn5_mean_correct": np.asarray(means, bool), "nll": np.asarray(nll, float)}
    record = {"test_knn5_acc": float(np.mean(sampled)), "test_knn5_acc_mean": float(
        np.mean(means)), "test_nll": float(np.mean(nll)), "test_size": len(label),
        "knn_train_size": 500, "nll_samples": 100, "nll_points": len(nll),
        "scored_points_sha256": "same points", **evaluation}
    cfg = {**vars(cli.Config(loss=loss, seed=seed)), "out": str(folder)}
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "results.json").write_text(json.dumps({"test_knn5_acc": 0.5}))
    (folder / "eval.json").write_text(json.dumps(record))
    (folder / "points.csv").write_bytes(cli.points_csv(points))


def planted_pair(folder, seed, only_mim, only_vae, shift=2.0, **eval_vae):
    """Seed `seed` of a MIM run and a VAE run on the same 60 points: only MIM's sampled
    code right on only_mim of them, only the VAE's on only_vae, both on 50 - only_mim -
    only_vae; the means the other way round; the VAE's NLL of each of the first 20 points
    `shift` nats below MIM's, plus noise."""
    both = 50 - only_mim - only_vae
    mim_right = [1] * both + [1] * only_mim + [0] * only_vae + [0] * 10
    vae_right = [1] * both + [0] * only_mim + [1] * only_vae + [0] * 10
    nll = 90 + np.sin(np.arange(20.0) * seed)
    scored_run(folder / f"mim-s{seed}", "mim", seed, mim_right, vae_right, nll + shift)
    scored_run(folder / f"vae-s{seed}", "vae", seed, vae_right, mim_right,
               nll + np.cos(np.arange(20.0)) / 10, **eval_vae)


def comparison_lines(text):
    """{(measure, seed): cells} of the rows of a comparison's table."""
    return {(cells[0], cells[1]): cells[2:] for cells in (
        [c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines()
        if line.startswith("| ") and " | " in line) if len(cells) == 8}


def test_compare_sets_two_losses_side_by_side_point_by_point_and_seed_by_seed(tmp_path):
    """Three seeds with planted discordant points: each seed's counts, McNemar's exact p,
    the sign of A - B (A = mim, the first in order), the NLL difference with its standard
    error, and the mean over seeds with Student's t interval. One seed a side: no
    interval over seeds. Seed 4 without a partner is named."""
    planted = {1: (8, 2), 2: (12, 3), 3: (9, 4)}
    for seed, (only_mim, only_vae) in planted.items():
        planted_pair(tmp_path / "three", seed, only_mim, only_vae)
    scored_run(tmp_path / "three" / "mim-s4", "mim", 4, [1, 0] * 25, [1, 0] * 25, [90.0] * 20)
    proc = run_main("evaluate", "--summary", str(tmp_path / "three"), "--compare", "loss")
    assert proc.returncode == 0, proc.stderr
    assert "## Paired comparison: loss mim (A) against vae (B)" in proc.stdout
    rows = comparison_lines(proc.stdout)
    sampled, means, nll = ("5-NN, one sampled code (fraction)",
                           "5-NN, encoder means (fraction)", "NLL, IWAE (nats)")
    diffs = []
    for seed, (only_mim, only_vae) in planted.items():
        a, b, diff, interval, counts, p = rows[(sampled, str(seed))]
        diffs.append((only_mim - only_vae) / 60)
        assert counts == f"{only_mim} / {only_vae}" and float(diff) == pytest.approx(
            diffs[-1], abs=5e-5)
        assert float(p) == pytest.approx(scipy.stats.binomtest(
            only_mim, only_mim + only_vae).pvalue, rel=5e-3)     # printed to 3 digits
        low, high = map(float, interval.split(" to "))
        assert low <= diffs[-1] <= high
        assert rows[(means, str(seed))][4] == f"{only_vae} / {only_mim}"
        assert float(rows[(means, str(seed))][2]) == pytest.approx(-diffs[-1], abs=5e-5)
        d = 2.0 - np.cos(np.arange(20.0)) / 10                  # MIM's NLL - the VAE's
        mean, se = rows[(nll, str(seed))][2].split(" ± ")
        assert float(mean) == pytest.approx(d.mean(), abs=0.005)
        assert float(se) == pytest.approx(np.std(d, ddof=1) / math.sqrt(20), abs=0.005)
    low, high = map(float, rows[(sampled, "mean, 3 seeds")][3].split(" to "))
    expected = scipy.stats.t.interval(0.95, 2, loc=np.mean(diffs),
                                      scale=np.std(diffs, ddof=1) / math.sqrt(3))
    assert (low, high) == pytest.approx(expected, abs=5e-5)
    assert "without a partner of the other loss: seed 4" in proc.stdout
    assert cli.p_value(evaluate.mcnemar_p(0, 2000)) == "< 1e-300"     # 2^-1999 underflows
    planted_pair(tmp_path / "one", 1, 8, 2)
    proc = run_main("evaluate", "--summary", str(tmp_path / "one"), "--compare", "loss")
    assert proc.returncode == 0, proc.stderr
    assert rows[(sampled, "1")] == comparison_lines(proc.stdout)[(sampled, "1")]
    assert comparison_lines(proc.stdout)[(sampled, "mean, 1 seed")][3] == (
        "one seed a side: no interval over seeds")


def test_evaluate_keeps_each_test_points_scores(tmp_path):
    """points.csv: one row per test point, its label, both 5-NN verdicts and the NLL of
    the first --nll-points; eval.json's metrics are their means, with the NLL's standard
    error over its points."""
    out = toy2d_run(tmp_path / "run")
    proc = run_main("evaluate", str(out), "--nll-samples", "10", "--test-size", "300",
                    "--nll-points", "40")
    assert proc.returncode == 0, proc.stderr
    record = json.loads((out / "eval.json").read_text())
    points = cli.read_points(str(out), record["test_size"], record["nll_points"])
    data = cli.load_data(cli.Config(data="toy2d"))
    assert np.array_equal(points["label"], data.y_test[:300].numpy())
    assert points["knn5_correct"].mean() == record["test_knn5_acc"]
    assert points["knn5_mean_correct"].mean() == record["test_knn5_acc_mean"]
    assert record["nll_points"] == len(points["nll"]) == 40 and record["test_size"] == 300
    assert points["nll"].mean() == pytest.approx(record["test_nll"], rel=1e-6)  # float32
    assert record["test_nll_se"] == pytest.approx(np.std(points["nll"], ddof=1) / math.sqrt(40))
    assert record["scored_points_sha256"] == cli.datasets.data_identity(
        cli.first_test_points(data, 300))["test_sha256"]


def test_figure_titles_name_objective_data_seed_and_epochs(tmp_path):
    cfg = cli.Config(loss="vae", data="toy2d", hidden=20, seed=3)
    log = tmp_path / "log.csv"
    log.write_text("epoch,train_loss\n1,5.0\n2,4.0\n3,3.0\n")
    assert cli.logged_epochs(log) == 3 and cli.logged_epochs(tmp_path / "none.csv") is None
    assert cli.run_title(cfg, 3) == "VAE, toy2d, MLP, 20 hidden, seed 3, 3 epochs"
    assert cli.run_title(cfg) == "VAE, toy2d, MLP, 20 hidden, seed 3"


# ----------------------------------------------------------------------------------------
# The command line: training runs and their files, checkpoints, --resume
# (bit-identical after kill -9), the evaluate command, image runs end to end.
# ----------------------------------------------------------------------------------------

def test_every_flag_default_is_its_spec_fields_default():
    """A flag that sets a ModelSpec, TrainSpec or DecoderSampling field takes its default
    from there: equal where the flag has one, and for the data-dependent ones (None in
    Config) what Config resolves on toy2d with the MLP."""
    specs = (mim.ModelSpec, mim.TrainSpec, mim.DecoderSampling)
    resolved = cli.Config()
    checked = 0
    for f in dataclasses.fields(cli.Config):
        name = f.name
        for spec in specs:
            field = {g.name: g for g in dataclasses.fields(spec)}.get(name)
            if field is None or field.default is dataclasses.MISSING:
                continue
            value = f.default if f.default is not None else getattr(resolved, f.name)
            if field.default is not None or f.default is not None:
                assert value == field.default, (f.name, value, spec.__name__, field.default)
            checked += 1
    assert checked >= 25


def test_std_floor_defaults_by_data_set_and_yields_to_the_flag():
    assert cli.parse_args(["--data", "pca_fashion_mnist"])[0].std_floor == cli.PCA_STD_FLOOR
    assert cli.parse_args([])[0].std_floor == mim.STD_FLOOR
    assert cli.parse_args(["--data", "pca_fashion_mnist", "--std-floor", "0.5"])[0].std_floor == 0.5


def run_cli(*args, cwd=HERE):
    """`python mim.py ARGS` as a program of its own: through mim.py's hand-over to cli.py."""
    return subprocess.run([sys.executable, os.path.join(HERE, "mim.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def run_main(*args, script="mim.py"):
    """`python SCRIPT ARGS` in this process, through cli.main (bench.main for bench.py):
    its exit status, stdout and stderr (warnings first), without starting Python and torch
    again. A traceback would end the test with it."""
    main = {"mim.py": cli.main, "bench.py": bench.main}[script]
    out, err = io.StringIO(), io.StringIO()
    with (contextlib.redirect_stdout(out), contextlib.redirect_stderr(err),
          warnings.catch_warnings(record=True) as caught):
        warnings.simplefilter("default")          # Python's filters, but for its ignored
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning,
                         ResourceWarning):        # categories: what a process would print
            warnings.simplefilter("ignore", category)
        try:
            main(list(args))
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
    shown = "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno)
                    for w in caught)
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(),
                                       shown + err.getvalue())


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    proc = run_cli("--epochs", "3", "--warmup", "1", "--nll-samples", "10", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout


@pytest.mark.slow
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
    for column in ("train_loss_max", "val_au_z", "val_mi_batch", "val_log_std_z",
                   "val_knn5_mean"):
        assert column in rows[0].split(",")
    assert "test_knn5_acc_mean" in results
    model, extra = mim.load_checkpoint(out / "best.pt")
    assert extra["config"]["epochs"] == 3 and isinstance(model, mim.Model)
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


@pytest.mark.slow
def test_evaluate_cli_plots_a_trained_run(trained_run):
    """fig1.png, and training.png from its log.csv (a run made by toy2d_run has none)."""
    out, _ = trained_run
    proc = run_main("evaluate", str(out), "--nll-samples", "10")
    assert proc.returncode == 0, proc.stderr
    for png in ("fig1.png", "training.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    proc = run_main("evaluate", str(out), "--nll-samples", "10", "--format", "svg")
    assert proc.returncode == 0, proc.stderr
    for svg in ("fig1.svg", "training.svg"):
        assert (out / svg).read_bytes().startswith(b"<?xml")


def test_training_figure_draws_a_panel_per_logged_quantity(tmp_path, monkeypatch):
    """Loss (2 lines), MI, active units (one line per latent group) and 5-NN; no
    figure for a log without rows."""
    log = tmp_path / "log.csv"
    log.write_text("epoch,train_loss,val_loss,val_mi_batch,val_au_z1,val_au_z2,val_knn5_mean\n"
                   "1,5.0,4.0,0.1,3,0,0.5\n2,4.0,3.5,0.2,4,1,0.6\n")
    drawn = []
    monkeypatch.setattr(evaluate, "figure_bytes", lambda fig, fmt: drawn.append(
        [(ax.get_title(), ax.get_ylabel(), [l.get_label() for l in ax.get_lines()])
         for ax in fig.axes]) or b"png")
    assert evaluate.training_figure(log, "MIM") == b"png"
    assert drawn[0] == [
        ("loss", "nats", ["train (warm-up weights)", "validation (full weights)"]),
        ("MI (minibatch), validation", "nats", ["estimate"]),
        ("active units, validation", "units", ["z1", "z2"]),
        ("5-NN accuracy, encoder means", "fraction", ["validation"])]
    log.write_text("epoch,train_loss\n")
    assert evaluate.training_figure(log, "MIM") is None


@pytest.mark.parametrize("flags,native", [
    ("fpu sse2 avx2 fma", False),                       # AVX2 only: bf16 is emulated
    ("fpu avx2 avx512f avx512_bf16", True),
    ("fpu avx2 avx512f amx_bf16 amx_tile", True),
    ("fp asimd sve bf16 i8mm", True),                    # ARM Neoverse V1
])
def test_native_bf16_reads_the_cpu_flags(tmp_path, flags, native):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert cli.native_bf16(torch.device("cpu"), str(cpuinfo)) is native
    assert cli.native_bf16(torch.device("cpu"), str(tmp_path / "missing")) is False


def test_amp_falls_back_to_float32_with_one_warning_without_native_bf16(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "native_bf16", lambda device: False)
    out = tmp_path / "run"
    cli.main(["--epochs", "1", "--warmup", "1", "--nll-samples", "0", "--amp",
              "--out", str(out)])
    warning = [l for l in capsys.readouterr().err.splitlines() if "warning" in l]
    assert len(warning) == 1 and "--amp ignored" in warning[0]
    assert json.loads((out / "config.json").read_text())["amp"] is False
    monkeypatch.setattr(cli, "native_bf16", lambda device: True)
    assert cli.checked_amp(cli.Config(amp=True), torch.device("cpu")).amp is True


@pytest.mark.parametrize("args,needle", [
    (["--loss", "elbo"], "--loss"),
    (["--data", "nope"], "unknown data set"),
    (["--batch-size", "0"], "--batch-size"),
    (["--lr", "abc"], "--lr"),
])
def test_cli_rejects_bad_input_in_one_line(tmp_path, args, needle):
    proc = run_main(*args, "--out", str(tmp_path / "bad"))
    assert proc.returncode == 2
    assert needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "bad" / "results.json").exists()


def gpu_check(tmp_path, **env):
    settings = {"DATA_DIR": str(tmp_path / "data"), "GPU_CHECK_OUT": str(tmp_path / "out"),
                "GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_EPOCHS": "1", "GPU_CHECK_WARMUP": "1",
                "GPU_CHECK_SEEDS": "1 2", "GPU_CHECK_NLL": "5", "GPU_CHECK_NLL_POINTS": "4",
                "GPU_CHECK_TESTS": "0",
                "GPU_CHECK_FLAGS": "--prior-components 10 --batch-size 10 --z-dim 2", **env}
    return subprocess.run(["bash", os.path.join(HERE, "run_all.sh"), "--gpu-check"], cwd=HERE,
                          env={**os.environ, **settings}, capture_output=True, text=True,
                          timeout=900)


@pytest.mark.slow
def test_gpu_check_runs_on_the_cpu_with_a_tiny_budget(tmp_path):
    """The dry run of run_all.sh --gpu-check: convHVAE MIM and VAE at seeds 1-2 and the
    PixelHVAE A-MIM and VAE at seed 1 side by side, each evaluated (5-NN on every test
    digit, the NLL on the first 4) and the losses compared per network and seed."""
    write_idx_set(tmp_path / "data")
    proc = gpu_check(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (tmp_path / "out" / "gpu_check.md").read_text()
    assert text == proc.stdout
    runs = sorted(os.listdir(tmp_path / "out" / "runs"))
    assert runs == ["convhvae-mim-s1", "convhvae-mim-s2", "convhvae-vae-s1", "convhvae-vae-s2",
                    "pixelhvae-amim-s1", "pixelhvae-vae-s1", "summary.md"]
    for run in runs[:-1]:
        record = json.loads((tmp_path / "out" / "runs" / run / "eval.json").read_text())
        assert (record["test_size"], record["nll_points"], record["nll_samples"]) == (12, 4, 5)
        assert f"| {run} | 1 |" in text
    assert "## Paired comparison: loss mim (A) against vae (B), arch convhvae" in text
    assert "## Paired comparison: loss amim (A) against vae (B), arch pixelhvae" in text
    rows = comparison_lines(text)
    assert rows[("5-NN, one sampled code (fraction)", "mean, 2 seeds")][3] != (
        "one seed a side: no interval over seeds")
    assert ("NLL, IWAE (nats)", "2") in rows
    assert "one seed a side: no interval over seeds" in text       # the PixelHVAE's


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_check_without_a_gpu_refuses_in_one_line_before_anything_starts(tmp_path):
    proc = gpu_check(tmp_path, GPU_CHECK_DEVICE="cuda")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "no CUDA device" in proc.stderr and not (tmp_path / "out").exists()


# run_all.sh as a job list: for any runner (xargs, a scheduler), each job idempotent.
# The tiny protocol: --quick with RUN_ALL_TINY (seconds per job) and only App. F.2's runs.
TINY_F2 = {"RUN_ALL_TINY": "1", "ONLY": "results/f2/"}


def project_copy(tmp_path):
    """The project's files in a folder of their own, so that results/ lands there."""
    for name in ("mim.py", "cli.py", "datasets.py", "evaluate.py", "run_all.sh"):
        shutil.copy(os.path.join(HERE, name), tmp_path / name)
    return tmp_path


def run_all(folder, *args, **env):
    return subprocess.run(["bash", str(folder / "run_all.sh"), *args], cwd=folder,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_run_all_lists_its_jobs_and_a_second_pass_does_no_work(tmp_path):
    """--list --quick: the 85 runs and 51 evaluations of the reduced protocol, one command
    per line; the tiny App. F.2 part run twice through xargs: all work the first time,
    none the second; --status counts the jobs by state."""
    folder = project_copy(tmp_path)
    listed = run_all(folder, "--list", "--quick", RUN_ALL_TINY="")
    lines = listed.stdout.splitlines()
    runs = 3 * 3 * 2 * 2 + 3 * 2 + 3 * 7 + 3 * 2 + 4 * 4     # fig2 x 2 modes, f2, collapse,
    evaluations = 2 * 3 * 2 + 2 + 3 * 7 + 4 * 4               # fig3, images; then their evals
    assert listed.returncode == 0 and len(lines) == runs + evaluations == 136
    assert sum(" --evaluate " in line for line in lines) == evaluations
    assert len(set(lines)) == len(lines) and all(" --job results/" in l for l in lines)
    jobs = run_all(folder, "--list", "--quick", **TINY_F2).stdout
    first = subprocess.run(["xargs", "-d", "\\n", "-P", "2", "-n", "1", "bash", "-c",
                            'eval "$1"', "job"], input=jobs, cwd=folder, capture_output=True,
                           text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert first.returncode == 0, first.stderr
    assert sorted(first.stdout.split()) == sorted(
        ["trained:"] * 6 + ["evaluated:"] * 2 + [f"results/f2/{loss}-s{seed}" for loss in
                                                ("mim", "ce") for seed in (1, 2, 3)] +
        ["results/f2/mim-s1", "results/f2/ce-s1"])
    again = subprocess.run(["bash", "-c", jobs], cwd=folder, capture_output=True, text=True)
    assert again.returncode == 0 and again.stdout == ""
    status = run_all(folder, "--status", "--quick", **TINY_F2).stdout.splitlines()
    assert [line.split() for line in status[1:]] == [["f2", "evaluation", "finished", "2"],
                                                     ["f2", "training", "finished", "6"]]


def test_run_all_jobs_take_their_gpu_by_slot_and_resume_on_their_device(tmp_path):
    """A job in xargs' slot 3 of a node with 2 GPUs runs on GPU 1; an interrupted run is
    resumed with only its device passed again. python is a stub that records its call."""
    folder = project_copy(tmp_path)
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "python").write_text('#!/bin/sh\necho "$CUDA_VISIBLE_DEVICES $*" >> calls\n')
    (stub / "python").chmod(0o755)
    env = {"PATH": f"{stub}{os.pathsep}{os.environ['PATH']}", "RUN_ALL_SLOT": "3",
           "RUN_ALL_GPUS": "2"}
    job = ["--job", "results/toy/run", "--data", "toy2d", "--device", "cuda"]
    assert run_all(folder, *job, **env).stdout == "trained: results/toy/run\n"
    (folder / "results" / "toy" / "run").mkdir()
    (folder / "results" / "toy" / "run" / "last.pt").write_bytes(b"")
    run_all(folder, *job, **env)
    assert (folder / "calls").read_text().splitlines() == [
        "1 mim.py --data toy2d --device cuda --out results/toy/run",
        "1 mim.py --resume results/toy/run --device cuda"]


@pytest.mark.slow
def test_run_all_with_cuda_and_no_gpu_refuses_before_any_job(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    folder = project_copy(tmp_path)
    for args in (["--quick", "--device", "cuda"], ["--list", "--device", "cuda"],
                 ["--slurm", "--device", "cuda"]):
        proc = run_all(folder, *args)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert "no CUDA device" in proc.stderr and not (folder / "results").exists()


SLURM_DAEMONS = ("munged", "slurmctld", "slurmd")
SLURM_CLIENTS = ("sbatch", "squeue", "sinfo")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A one-node SLURM cluster on this machine: munged, slurmctld and slurmd started
    here on free ports, stopped afterwards. Yields the environment its clients need."""
    sbin = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    missing = [b for b in SLURM_DAEMONS + SLURM_CLIENTS if not shutil.which(b, path=sbin)]
    if missing:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} missing; Debian: "
                    "apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        pytest.skip("starting slurmd needs root")
    folder = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "PATH": sbin, "SLURM_CONF": str(folder / "slurm.conf")}
    node = socket.gethostname().split(".")[0]
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2 ** 20 // 2
    settings = {"ClusterName": "mimtest", "SlurmctldHost": "localhost", "SlurmUser": "root",
                "SlurmctldPort": free_port(), "SlurmdPort": free_port(),
                "StateSaveLocation": folder, "SlurmdSpoolDir": folder / "spool",
                "SlurmctldPidFile": folder / "ctld.pid", "SlurmdPidFile": folder / "d.pid",
                "SlurmctldLogFile": folder / "ctld.log", "SlurmdLogFile": folder / "d.log",
                "ProctrackType": "proctrack/linuxproc", "TaskPlugin": "task/none",
                "SelectType": "select/cons_tres", "SelectTypeParameters": "CR_Core",
                "AccountingStorageType": "accounting_storage/none", "MinJobAge": 3600,
                "JobCompType": "jobcomp/filetxt", "JobCompLoc": folder / "jobcomp.log",
                "ReturnToService": 2}
    (folder / "slurm.conf").write_text(
        "".join(f"{k}={v}\n" for k, v in settings.items()) +
        f"NodeName={node} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={memory}\n"
        f"PartitionName=test Nodes={node} Default=YES MaxTime=INFINITE State=UP\n")
    if subprocess.run("munge -n | unmunge", shell=True, env=env,
                      capture_output=True).returncode != 0:
        os.makedirs("/run/munge", exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "munged"], env=env, check=True)
    for daemon in ("slurmctld", "slurmd"):
        subprocess.run([daemon, "-f", str(folder / "slurm.conf")], env=env, check=True)
    try:
        deadline = time.time() + 60
        while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%t"], env=env,
                                           capture_output=True, text=True).stdout:
            assert time.time() < deadline, (folder / "ctld.log").read_text()[-2000:]
            time.sleep(0.5)
        yield env
    finally:
        for pid_file in ("d.pid", "ctld.pid"):
            if (folder / pid_file).exists():
                os.kill(int((folder / pid_file).read_text()), signal.SIGTERM)


def wait_for_queue(env, timeout=600):
    deadline = time.time() + timeout
    while subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True).stdout:
        assert time.time() < deadline, "SLURM jobs did not end"
        time.sleep(1)


def ended_jobs(env):
    """The scheduler's own record of the jobs that have ended, in the order they ended, read
    by sacct from the job completion log: (job name, state) per job or array task."""
    proc = subprocess.run(["sacct", "--completion", "--noheader", "--parsable2",
                           "--format", "JobID,JobName,State,ExitCode"], env=env,
                          capture_output=True, text=True, check=True)
    print(proc.stdout)
    return [tuple(line.split("|")[1:3]) for line in proc.stdout.splitlines()]


@pytest.mark.slow
def test_run_all_on_a_real_slurm_cluster_resubmits_only_what_is_unfinished(slurm, tmp_path):
    """--slurm --submit: the tiny App. F.2 protocol as sbatch arrays on a real slurmctld,
    every task COMPLETED in the scheduler's record and the summary written by the
    dependent job, which ended last; then one run's folder deleted, and the re-submission
    runs exactly that one job again, then the summary."""
    folder = project_copy(tmp_path)
    env = {**slurm, **TINY_F2}
    proc = run_all(folder, "--slurm", "--quick", "--submit", **env)
    assert proc.returncode == 0 and "jobs not finished: 8," in proc.stdout, proc.stderr
    wait_for_queue(env)
    f2 = folder / "results" / "f2"
    assert len(list(f2.glob("*/results.json"))) == 6 and len(list(f2.glob("*/eval.json"))) == 2
    assert (f2 / "summary.md").exists()
    logs = folder / "results" / "slurm" / "logs"
    assert len(list(logs.glob("mim-cpu-train-*_*.out"))) == 6
    first = ended_jobs(env)
    assert sorted(first) == sorted([("mim-cpu-train", "COMPLETED")] * 6 +
                                   [("mim-cpu-evaluate", "COMPLETED")] * 2 +
                                   [("mim-summaries", "COMPLETED")])
    assert first[-1][0] == "mim-summaries"             # it waited for every other task
    shutil.rmtree(f2 / "ce-s2")
    (f2 / "summary.md").unlink()
    proc = run_all(folder, "--slurm", "--quick", "--submit", **env)
    assert proc.returncode == 0 and "jobs not finished: 1," in proc.stdout, proc.stderr
    jobs = (folder / "results" / "slurm" / "cpu-train.jobs").read_text().splitlines()
    assert len(jobs) == 1 and " --job results/f2/ce-s2 " in jobs[0]
    wait_for_queue(env)
    assert (f2 / "ce-s2" / "results.json").exists() and (f2 / "summary.md").exists()
    assert ended_jobs(env)[len(first):] == [("mim-cpu-train", "COMPLETED"),
                                            ("mim-summaries", "COMPLETED")]
    status = run_all(folder, "--status", "--quick", **env).stdout
    assert "missing" not in status and "interrupted" not in status


def toy2d_run(folder):
    """A run directory as mim.py --out writes it (config.json, best.pt) for an untrained
    toy2d model: evaluate.py only reads the checkpoint and reloads the data."""
    cfg = cli.Config(data="toy2d", hidden=8, out=str(folder))
    torch.manual_seed(0)
    model = mim.build_model(mim.ModelSpec(x_dim=2, hidden=8))
    os.makedirs(folder)
    cli.write_json(os.path.join(folder, "config.json"), vars(cfg))
    cli.save_run_checkpoint(os.path.join(folder, "best.pt"), model, cfg,
                            {"x_dim": 2, "binary": False})
    return folder


@pytest.mark.slow
def test_evaluate_cli_writes_eval_json_and_fig1(tmp_path, capsys):
    out = toy2d_run(tmp_path / "run")
    proc = run_main("evaluate", str(out), "--nll-samples", "10", "--test-size", "2000")
    assert proc.returncode == 0, proc.stderr
    assert "nats" in proc.stdout and "fraction" in proc.stdout
    results = json.loads((out / "eval.json").read_text())
    for key in ("test_mi_ksg", "test_nll", "test_rmse", "test_knn5_acc"):
        assert math.isfinite(results[key]), key
    assert results["nll_samples"] == 10 and results["test_size"] == 2000
    assert results["knn_train_size"] == 10_000 and results["test_au_z"] in (0, 1, 2)
    assert (out / "fig1.png").read_bytes()[:4] == b"\x89PNG"
    cli.main(["evaluate", str(out), "--nll-samples", "0", "--test-size", "300", "--knn-train", "500",
                   "--device", "cpu"])
    small = json.loads((out / "eval.json").read_text())
    assert small["test_size"] == 300 and small["knn_train_size"] == 500
    assert "test_nll" not in small and "test_size" in capsys.readouterr().out
    assert "test_nll_tight" not in small and "test_informative_z" in small
    cli.main(["evaluate", str(out), "--nll-samples", "0", "--test-size", "20", "--ais-steps", "3",
                   "--ais-chains", "2", "--ais-leapfrog", "1", "--device", "cpu"])
    tight = json.loads((out / "eval.json").read_text())
    assert math.isfinite(tight["test_nll_tight"]) and tight["test_nll_tight_se"] >= 0
    assert (tight["ais_steps"], tight["ais_chains"], tight["ais_leapfrog"]) == (3, 2, 1)
    assert tight["ais_points"] == 20 and "test_nll_ais_points" not in tight
    cli.main(["evaluate", str(out), "--nll-samples", "10", "--test-size", "20", "--ais-steps", "3",
                   "--ais-chains", "2", "--ais-leapfrog", "1", "--ais-points", "5",
                   "--ais-inflate", "1.5", "--device", "cpu"])
    subset = json.loads((out / "eval.json").read_text())
    assert subset["ais_points"] == 5 and subset["test_size"] == 20
    assert subset["ais_inflate"] == 1.5 and tight["ais_inflate"] == evaluate.AIS_INFLATE
    assert math.isfinite(subset["test_nll_ais_points"])
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


def test_evaluate_cli_reports_a_missing_checkpoint_in_one_line(tmp_path):
    proc = run_main("evaluate", str(tmp_path / "missing"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "best.pt not found" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args,needle", [
    (["--nll-samples", "-1"], "--nll-samples"),
    (["--test-size", "0"], "--test-size"),
    (["--ais-steps", "-2"], "--ais-steps"),
    (["--ais-chains", "0"], "--ais-chains"),
    (["--ais-points", "0"], "--ais-points"),
    (["--ais-inflate", "0"], "--ais-inflate"),
    (["--knn-train", "x"], "--knn-train"),
    (["--device", "tpu"], "--device"),
    ([], "best.pt not found"),
])
def test_evaluate_cli_rejects_bad_flags_in_one_line(tmp_path, capsys, args, needle):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["evaluate", str(tmp_path / "missing"), *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert needle in err and len(err.strip().splitlines()) == 1


def image_folder(tmp_path, n_train):
    """Four IDX files of random grey-level 28x28 images, the layout of MNIST."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
              "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (60, 28, 28)),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, 60)}
    for stem, array in arrays.items():
        write_idx(folder / stem, array, compress=False)
    return folder


def interactive_signals():
    """A shell starts background jobs (`cmd &`, as CI may run the tests) with SIGINT
    ignored, and Python then never raises KeyboardInterrupt; give the child the terminal's
    default so that Ctrl-C reaches it as it would a user's run."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_mim(*args):
    return subprocess.Popen([sys.executable, os.path.join(HERE, "mim.py"), *args], cwd=HERE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=interactive_signals)


@pytest.mark.slow
def test_resume_after_kill_ends_with_the_same_weights(tmp_path):
    """Dynamic binarization, shuffling, Adam and early stopping all continue exactly."""
    flags = ["--data", "mnist", "--data-dir", str(image_folder(tmp_path, 1200)),
             "--arch", "mlp", "--hidden", "16", "--z-dim", "3", "--batch-size", "8",
             "--epochs", "4", "--warmup", "1", "--nll-samples", "5"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert start_mim(*flags, "--out", str(whole)).wait(timeout=300) == 0
    proc = start_mim(*flags, "--out", str(cut))
    while not (cut / "last.pt").exists() and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.2)                                     # into the second epoch
    proc.kill()                                         # SIGKILL: no chance to clean up
    proc.wait()
    done = torch.load(cut / "last.pt", weights_only=True)["extra"]["progress"]["epoch"]
    assert 1 <= done < 4
    resumed = start_mim("--resume", str(cut))
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert f"epoch {done + 1:3d} |" in out and f"epoch {done:3d} |" not in out
    for name in ("best.pt", "last.pt"):
        a, b = (torch.load(d / name, weights_only=True)["model"] for d in (whole, cut))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (json.loads((whole / "results.json").read_text())["best_epoch"]
            == json.loads((cut / "results.json").read_text())["best_epoch"])


def folder_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_finished_run_folder_survives_a_second_run_byte_for_byte(tmp_path):
    out = tmp_path / "run"
    tiny = ["--epochs", "1", "--warmup", "1", "--nll-samples", "0", "--out", str(out)]
    assert run_main(*tiny).returncode == 0
    before = folder_bytes(out)
    for extra in (["--batch-size", "100000"],   # fails after parsing, inside run
                  ["--seed", "2"]):             # would succeed
        proc = run_main(*tiny, *extra)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert "already holds a run" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
        assert folder_bytes(out) == before
    proc = run_main(*tiny, "--seed", "2", "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "config.json").read_text())["seed"] == 2


def test_a_run_that_fails_before_its_first_epoch_leaves_no_folder(tmp_path):
    out = tmp_path / "new"
    proc = run_main("--batch-size", "100000", "--out", str(out))
    assert proc.returncode == 2 and "--batch-size" in proc.stderr
    assert not out.exists()


@pytest.mark.slow
def test_two_runs_into_one_new_folder_leave_it_to_one_of_them(tmp_path):
    out = tmp_path / "run"
    procs = [start_mim("--epochs", "2", "--warmup", "1", "--nll-samples", "0", "--seed", seed,
                       "--out", str(out)) for seed in ("1", "2")]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    winner = ("1", "2")[[code for code, _ in results].index(0)]
    loser_err = [err for code, err in results if code == 2][0]
    assert ("another process is writing" in loser_err or "already holds a run" in loser_err)
    assert json.loads((out / "config.json").read_text())["seed"] == int(winner)
    assert torch.load(out / "best.pt", weights_only=True)["extra"]["config"]["seed"] == int(winner)


@pytest.mark.slow
def test_resume_goes_on_after_a_nan_with_a_lower_lr(tmp_path, monkeypatch, capsys):
    real, calls = mim.validate, []

    def nan_in_epoch_3(*args):
        calls.append(1)
        stats = real(*args)
        return {**stats, "loss": math.nan} if len(calls) == 3 else stats

    out = tmp_path / "run"
    monkeypatch.setattr(mim, "validate", nan_in_epoch_3)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--epochs", "5", "--warmup", "1", "--patience", "5", "--nll-samples", "0",
                  "--out", str(out)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "validation loss became nan in epoch 3" in err
    assert f"mim.py --resume {out} --lr LR" in err
    monkeypatch.setattr(mim, "validate", real)
    cli.main(["--resume", str(out), "--lr", "1e-4"])
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5]
    assert [float(r["lr"]) for r in rows] == [1e-3, 1e-3, 1e-4, 1e-4, 1e-4]
    assert json.loads((out / "config.json").read_text())["lr"] == 1e-4


def test_a_nan_in_the_first_epoch_advises_training_again(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(mim, "validate", lambda *args: {"loss": math.nan})
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--epochs", "3", "--nll-samples", "0", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "in epoch 1" in err[0]
    assert err[0].endswith("train again with a lower --lr or a higher --std-floor")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_resume_with_more_epochs_extends_a_finished_run(tmp_path):
    out = tmp_path / "run"
    tiny = ["--warmup", "1", "--patience", "9", "--nll-samples", "0"]
    assert run_main(*tiny, "--epochs", "2", "--out", str(out)).returncode == 0
    assert json.loads((out / "results.json").read_text())["epochs"] == 2
    proc = run_main("--resume", str(out), "--epochs", "4")
    assert proc.returncode == 0, proc.stderr
    assert "epoch   3 |" in proc.stdout and "epoch   2 |" not in proc.stdout
    assert json.loads((out / "results.json").read_text())["epochs"] == 4
    assert json.loads((out / "config.json").read_text())["epochs"] == 4


def test_resume_takes_no_other_flags(tmp_path):
    proc = run_main("--resume", str(tmp_path), "--hidden", "3")
    assert proc.returncode == 2 and "drop --hidden" in proc.stderr
    proc = run_main("--resume", str(tmp_path / "none"))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "last.pt not found" in proc.stderr


@pytest.mark.slow
def test_convhvae_vamp_mim_trains_and_evaluates_on_images(tmp_path):
    out = tmp_path / "run"
    proc = run_main("--data", "mnist", "--data-dir", str(image_folder(tmp_path, 150)),
                      "--arch", "convhvae", "--prior", "vamp", "--prior-components", "10",
                      "--loss", "mim", "--epochs", "1", "--batch-size", "32", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert {"best.pt", "last.pt", "config.json", "log.csv", "results.json"} <= set(
        os.listdir(out))
    model, extra = mim.load_checkpoint(out / "best.pt")
    assert extra["config"]["z_dim"] == 40
    assert model.latent_groups == {"z1": (0, 40), "z2": (40, 80)}
    assert model.prior.pseudo_inputs.shape == (10, 784)
    proc = run_main("evaluate", str(out), "--nll-samples", "4")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "eval.json").read_text())
    for key in ("test_nll", "test_nll_bpd", "test_au_z1", "test_au_z2", "test_knn5_acc"):
        assert math.isfinite(metrics[key]), key
    assert metrics["test_nll_bpd"] == pytest.approx(metrics["test_nll"] / (784 * math.log(2)))
    for png in ("tsne.png", "reconstructions.png", "samples.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_image_architectures_refuse_non_image_data():
    proc = run_main("--data", "toy2d", "--arch", "convhvae", "--epochs", "1")
    assert proc.returncode == 2 and "--arch convhvae models binary images" in proc.stderr


# ----------------------------------------------------------------------------------------
# Bad input and faults: one line, exit status 2, no traceback and nothing
# half-written (table-driven), and full disks, signals and umasks.
# ----------------------------------------------------------------------------------------

# Each case: (script, arguments, what to prepare in the folder, a needle of the message).
# {tmp} is the case's folder, {run} a finished toy run in it. Every case must end with one
# line naming the problem, exit status 2, no traceback, and every file in {tmp} as it was.

def replace_last_pt(payload):
    def prepare(run):
        torch.save(payload(torch.load(run / "last.pt", weights_only=True)), run / "last.pt")
    return prepare


def truncate_last_pt(run):
    (run / "last.pt").write_bytes((run / "last.pt").read_bytes()[:1000])


def foreign_config(run):
    """Both checkpoints as a later version with one more setting would write them."""
    for ckpt in (run / "last.pt", run / "best.pt"):
        state = torch.load(ckpt, weights_only=True)
        state["extra"]["config"]["from_the_future"] = 1
        torch.save(state, ckpt)


def edit_config(text=None, **changes):
    """config.json edited by hand: settings changed, or its text replaced."""
    def prepare(run):
        cfg = json.loads((run / "config.json").read_text())
        (run / "config.json").write_text(text if text is not None
                                         else json.dumps({**cfg, **changes}))
    return prepare


def odd_file(name, kind):
    """One of a run's files replaced by a folder, a FIFO or a dangling symbolic link."""
    def prepare(run):
        path = run / name
        if path.exists():
            path.unlink()
        {"folder": path.mkdir, "fifo": lambda: os.mkfifo(path),
         "dangling": lambda: path.symlink_to(run / "gone")}[kind]()
    return prepare


def removed(name):
    return lambda run: (run / name).unlink()


def pickled_last_pt(run):
    """last.pt written by plain pickle (protocol 4), as another program might."""
    with open(run / "last.pt", "wb") as f:
        pickle.dump({"payload": list(range(5))}, f, protocol=4)


def wider_weights(state):
    state["model"] = {k: torch.cat([v, v]) for k, v in state["model"].items()}
    return state


COMPARE_LOSSES = ["evaluate", "--summary", "{tmp}/runs", "--compare", "loss"]
BAD_INPUTS = [
    ("mim.py", ["--loss", "elbo"], None, "--loss"),
    ("mim.py", ["--data", "nope"], None, "unknown data set"),
    ("mim.py", ["--arch", "resnet"], None, "--arch"),
    ("mim.py", ["--device", "tpu"], None, "--device"),
    ("mim.py", ["--batch-size", "0"], None, "--batch-size"),
    ("mim.py", ["--batch-size", "100000", "--out", "{tmp}/new"], None, "--batch-size"),
    ("mim.py", ["--lr", "abc"], None, "--lr"),
    ("mim.py", ["--lr", "nan"], None, "--lr must be a finite number"),
    ("mim.py", ["--lr", "inf"], None, "--lr must be a finite number"),
    ("mim.py", ["--lr", "-1"], None, "--lr"),
    ("mim.py", ["--std-floor", "0"], None, "--std-floor"),
    ("mim.py", ["--std-floor", "nan"], None, "--std-floor must be a finite number"),
    ("mim.py", ["--alpha", "inf"], None, "--alpha must be a finite number"),
    ("mim.py", ["--critic-lr=-inf"], None, "--critic-lr must be a finite number"),
    ("mim.py", ["--patience", "-3"], None, "--patience must be at least 1"),
    ("mim.py", ["--patience", "0"], None, "--patience must be at least 1"),
    ("mim.py", ["--epochs", "0"], None, "--epochs"),
    ("mim.py", ["--hidden", "-1"], None, "--hidden"),
    ("mim.py", ["--z-dim", "0"], None, "--z-dim"),
    ("mim.py", ["--prior-components", "0"], None, "--prior-components"),
    ("mim.py", ["--draws", "1"], None, "--draws"),
    ("mim.py", ["--warmup", "-1"], None, "--warmup"),
    ("mim.py", ["--nll-samples", "-1"], None, "--nll-samples"),
    ("mim.py", ["--seed", "100000000000000000000000"], None, "--seed must be between"),
    ("mim.py", ["--seed", "-1"], None, "--seed must be between"),
    ("mim.py", ["--data-seed", "-5"], None, "--data-seed must be between"),
    ("mim.py", ["--train-size", "0"], None, "--train-size"),
    ("mim.py", ["--train-size", "100000", "--out", "{tmp}/new"], None,
     "--train-size 100000 exceeds"),
    ("mim.py", ["--q-x", "mog", "--components", "300", "--train-size", "256", "--out",
                "{tmp}/new"], None,
     "--components 300 exceeds"),
    ("mim.py", ["--out", ""], None, "--out needs a folder name"),
    ("mim.py", ["--resume", ""], None, "--resume needs a folder name"),
    ("mim.py", ["--out", "{tmp}/file"], "file", "cannot use"),
    ("mim.py", ["--out", "{tmp}/file/run"], "file", "cannot use"),
    ("mim.py", ["--out", "{run}"], "run", "already holds a run"),
    ("mim.py", ["--out", "{run}", "--lr", "nan"], "run", "finite"),
    ("mim.py", ["--resume", "{tmp}/none"], None, "last.pt not found"),
    ("mim.py", ["--resume", "{run}", "--hidden", "3"], "run", "drop --hidden"),
    ("mim.py", ["--resume", "{run}", "--lr", "nan"], "run", "finite"),
    ("mim.py", ["--resume", "{run}"], truncate_last_pt, "not a readable checkpoint"),
    ("mim.py", ["--resume", "{run}"], replace_last_pt(lambda s: torch.zeros(3)),
     "not a checkpoint written by mim.py"),
    ("mim.py", ["--resume", "{run}"], replace_last_pt(lambda s: s["model"]),
     "not a checkpoint written by mim.py"),
    ("mim.py", ["--resume", "{run}"], foreign_config, "another version"),
    ("mim.py", ["--resume", "{run}"], replace_last_pt(wider_weights), "does not fit"),
    ("mim.py", ["--data", "mnist", "--data-dir", "{tmp}/five", "--batch-size", "2"],
     "five images",
     "mnist (read from {tmp}/five) has no validation points"),
    ("mim.py", ["--data", "mnist", "--data-dir", "{tmp}/corrupt"], "corrupt images",
     "not an IDX file"),
    ("mim.py", ["--preset", "authors"], None, "--preset authors is the authors' image"),
    ("mim.py", ["--prob-clamp", "0.7"], None, "--prob-clamp must be between 0 and 0.5"),
    ("mim.py", ["--prob-clamp", "0.1"], None, "--prob-clamp 0.1 bounds a Bernoulli decoder"),
    ("mim.py", ["--data", "mnist", "--data-dir", "{tmp}/images", "--arch", "pixelhvae",
                "--prior", "normal", "--estimator", "authors", "--batch-size", "10"],
     "images", "--estimator authors draws the decoder's mean image"),
    ("mim.py", ["--data", "mnist", "--data-dir", "{tmp}/data"], "labels 200",
     "holds label 200; its classes are 0-9"),
    ("mim.py", ["--data", "mnist", "--data-dir", "{tmp}/data"], "no test images",
     "t10k-images-idx3-ubyte.gz holds no images"),
    ("mim.py", ["--data", "omniglot", "--data-dir", "{tmp}/data"], "chardata 0-255",
     "holds values from 0 to 255, not grey levels in [0, 1]"),
    ("mim.py", ["--data", "omniglot", "--data-dir", "{tmp}/data"], "chardata NaN",
     "'data' holds NaN or infinite values"),
    ("mim.py", ["--data", "mnist", "--data-dir", "{tmp}/data"], "entry folder",
     "train-images-idx3-ubyte.gz is a folder, not a data file"),
    ("mim.py", ["--data", "mnist", "--data-dir", "{tmp}/data"], "entry fifo",
     "train-images-idx3-ubyte.gz is a FIFO, not a data file"),
    ("mim.py", ["--data", "mnist", "--data-dir", "{tmp}/data"], "entry dangling",
     "train-images-idx3-ubyte.gz is a broken symbolic link"),
    ("mim.py", ["--data", "pca_fashion_mnist", "--data-dir", "{tmp}/data"], "alike images",
     "the training images are all alike"),
    ("mim.py", ["--train-size", "3", "--batch-size", "1"], None,
     "--train-size 3: too few training points; the 5-NN"),
    ("mim.py", ["evaluate", "{tmp}/none"], None, "best.pt not found"),
    ("mim.py", ["evaluate", "{run}"], foreign_config, "another version"),
    ("mim.py", ["evaluate", "{run}", "--ais-inflate", "0"], "run", "--ais-inflate"),
    ("mim.py", ["evaluate", "{run}", "--nll-samples", "-1"], "run", "--nll-samples"),
    ("mim.py", ["--hidden", "1000000000"], None, "--hidden 1000000000: 1.4e+10 parameters"),
    ("mim.py", ["--prior", "mog", "--prior-components", "1000000000"], None,
     "--prior-components 1000000000 would hold about"),
    ("mim.py", ["--nll-samples", "1000000000000000000", "--out", "{tmp}/new"], None,
     "--nll-samples 1000000000000000000 would hold about"),
    ("mim.py", ["--draws", "1000000000000", "--out", "{tmp}/new"], None,
     "--draws 1000000000000 would hold about"),
    ("mim.py", ["--out", "{tmp}/loop"], "link loop", "a broken symbolic link (or a loop"),
    ("mim.py", ["--out", "{tmp}/dangling"], "dangling link", "it is a broken symbolic link"),
    ("mim.py", ["--resume", "{run}", "--epochs", "3"], odd_file("log.csv", "folder"),
     "log.csv is a folder, not a file of the run"),
    ("mim.py", ["--resume", "{run}", "--epochs", "3"], odd_file("results.json", "fifo"),
     "results.json is not a regular file"),
    ("mim.py", ["--resume", "{run}", "--epochs", "3"], odd_file("last.pt", "folder"),
     "last.pt is a folder, not a file of the run"),
    ("mim.py", ["--out", "{run}", "--overwrite"], odd_file("eval.json", "folder"),
     "eval.json is a folder, not a file of the run"),
    ("mim.py", ["--out", "{run}", "--overwrite"], odd_file("best.pt", "dangling"),
     "best.pt is a broken symbolic link"),
    ("mim.py", ["--resume", "{run}", "--epochs", "3"], edit_config(lr=0.01),
     "sets lr to 0.01 but the run was trained with 0.001; --resume takes its settings from "
     "last.pt: pass --lr 0.01 with --resume instead"),
    ("mim.py", ["--resume", "{run}", "--epochs", "3"], edit_config(hidden=16),
     "sets hidden to 16 but the run was trained with 8; --resume takes its settings from "
     "last.pt: put the value back"),
    ("mim.py", ["--resume", "{run}", "--epochs", "3"], edit_config(text="{"),
     "config.json is not valid JSON"),
    ("mim.py", ["--resume", "{run}", "--epochs", "3"], edit_config(text="[]"),
     "config.json holds no settings"),
    ("mim.py", ["evaluate", "{run}", "--nll-samples", "1000000000000000000"], "run",
     "--nll-samples 1000000000000000000 would hold about"),
    ("mim.py", ["evaluate", "{run}", "--ais-steps", "1000000000000"], "run",
     "--ais-steps 1000000000000 would hold about"),
    ("mim.py", ["evaluate", "{run}", "--ais-steps", "10", "--ais-chains", "1000000000000"],
     "run", "--ais-chains 1000000000000 would hold about"),
    ("mim.py", ["evaluate", "{run}", "--ais-inflate", "1e309"], "run",
     "--ais-inflate must be a finite number above 0"),
    ("mim.py", ["evaluate", "{run}", "--ais-chains", "0"], "run", "--ais-chains"),
    ("mim.py", ["evaluate", "{run}", "--test-size", "0"], "run",
     "--test-size 0: the metrics need at least 2 test points, KSG's on continuous x more "
     "than 5; use --test-size 6 or more (2 or more on binary images)"),
    ("mim.py", ["evaluate", "{run}", "--test-size", "1"], "run",
     "--test-size 1: the metrics need at least 2 test points"),
    ("mim.py", ["evaluate", "{run}", "--test-size", "3"], "run",
     "--test-size 3: the KSG estimate of the MI needs more than k = 5 test points; use "
     "--test-size 6 or more"),
    ("mim.py", ["evaluate", "{run}", "--knn-train", "3"], "run",
     "--knn-train 3: the 5-NN classifier needs at least 5 training codes; use --knn-train 5 "
     "or more"),
    ("mim.py", ["--resume", "{run}"], pickled_last_pt,
     "last.pt is not a readable checkpoint (UnpicklingError); train again"),
    ("mim.py", ["--data", "fashion_mnist", "--data-dir", "{tmp}/data"], "three of four files",
     "t10k-labels-idx1-ubyte.gz not found in {tmp}/data (nor in {tmp}/data/fashion_mnist), "
     "the --data-dir given; put them there"),
    ("mim.py", ["--data", "pca_fashion_mnist", "--pca-dim", "2", "--data-dir", "{tmp}/data",
                "--batch-size", "10"], "three test images",
     "pca_fashion_mnist (read from {tmp}/data) has 3 test points, but the KSG estimate of "
     "the MI needs more than k = 5 test points; use a larger test file"),
    ("mim.py", ["evaluate", "{run}", "--max-batch", "0"], "run", "--max-batch must be at least 1"),
    ("mim.py", ["evaluate", "{run}", "--format", "gif"], "run", "--format"),
    ("mim.py", ["evaluate"], None, "give run directories to evaluate, or --summary DIR"),
    ("mim.py", ["evaluate", "{run}"], removed("best.pt"),
     "best.pt not found; finish the run with mim.py --resume"),
    ("mim.py", ["evaluate", "{run}/log.csv"], "run", "log.csv is a file, not a run folder"),
    ("mim.py", ["evaluate", "{run}"], odd_file("eval.json", "folder"),
     "eval.json is a folder, not a file of the run"),
    ("mim.py", ["evaluate", "--summary", "{tmp}/runs"], "summary list",
     "results.json holds a JSON list, not an object; test the run again with mim.py --resume"),
    ("mim.py", ["evaluate", "--summary", "{tmp}/runs"], "summary not json",
     "results.json is not valid JSON"),
    ("mim.py", ["evaluate", "--summary", "{tmp}/runs"], "summary text metric",
     "eval.json: test_nll is 'low', not a number; evaluate it again with mim.py evaluate"),
    ("mim.py", ["evaluate", "--summary", "{tmp}/runs"], "summary bool metric",
     "results.json: test_rmse is True, not a number"),
    ("mim.py", ["evaluate", "--summary", "{tmp}/runs"], "summary text setting",
     "hidden is '8' in"),
    ("mim.py", ["evaluate", "--summary", "{tmp}/runs", "--x", "hidden"],
     "summary missing setting", "s2/config.json lacks hidden, which"),
    ("mim.py", ["evaluate", "--summary", "{tmp}/runs"], "summary no config",
     "config.json not found"),
    ("mim.py", COMPARE_LOSSES, "compare other points", "were scored on different test points"),
    ("mim.py", COMPARE_LOSSES, "compare other S",
     "were evaluated differently: nll_samples 100 and 1000"),
    ("mim.py", COMPARE_LOSSES, "compare no points", "vae-s1/points.csv not found"),
    ("mim.py", COMPARE_LOSSES, "compare short points",
     "vae-s1/points.csv holds 59 points and 20 NLLs, not the 60"),
    ("mim.py", COMPARE_LOSSES, "compare not evaluated",
     "vae-s1 has no eval.json of its present best.pt"),
    ("mim.py", COMPARE_LOSSES, "compare seed twice", "are both seed 1 of one kind"),
    ("mim.py", ["evaluate", "--summary", "{tmp}/runs", "--compare", "hidden"],
     "compare", "--compare hidden: hidden does not vary between these runs"),
    ("mim.py", ["evaluate", "--compare", "loss"], None, "--compare loss compares the runs of a "
     "summary; add --summary DIR"),
    ("mim.py", ["evaluate", "{run}", "--nll-points", "1"], "run",
     "--nll-points 1: the NLL's standard error needs at least 2 points"),
    ("mim.py", ["evaluate", "--summary", "{tmp}/runs"], "summary empty",
     "no */results.json under"),
    ("mim.py", ["--resume", "{run}"], lambda run: shutil.copy(run / "best.pt", run / "last.pt"),
     "last.pt holds a trained model without the training state that --resume needs"),
    ("mim.py", ["--data", "pca_fashion_mnist", "--pca-dim", "1000"], None,
     "--pca-dim must be at most 784"),
    ("mim.py", ["--resume", "{run}", "--nll-samples", "1000000000000000000"], "run",
     "--nll-samples 1000000000000000000 would hold about"),
    ("bench.py", ["--out", "{tmp}/file/bench.json"], "file", "cannot write a file there"),
    ("bench.py", ["--out", "{run}"], "run", "cannot write a file there"),
    ("bench.py", ["--device", "tpu"], None, "--device"),
]


@pytest.fixture(scope="module")
def finished_toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    proc = run_main("--epochs", "2", "--warmup", "1", "--hidden", "8", "--nll-samples", "0",
                   "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


def prepare_case(tmp, prepare, finished):
    if prepare in ("run", None) or callable(prepare):
        if prepare is not None:
            shutil.copytree(finished, tmp / "run")
        if callable(prepare):
            prepare(tmp / "run")
    elif prepare == "file":
        (tmp / "file").write_text("not a folder")
    elif prepare == "link loop":
        (tmp / "loop").symlink_to(tmp / "loop2")
        (tmp / "loop2").symlink_to(tmp / "loop")
    elif prepare == "dangling link":
        (tmp / "dangling").symlink_to(tmp / "gone")
    elif prepare.startswith("summary"):
        prepare_summary(tmp / "runs", prepare, finished)
    elif prepare.startswith("compare"):
        prepare_comparison(tmp / "runs", prepare)
    elif prepare == "five images":
        write_idx_set(tmp / "five", n_train=5)
    elif prepare == "images":
        write_idx_set(tmp / "images")
    elif prepare == "corrupt images":
        write_idx_set(tmp / "corrupt")
        (tmp / "corrupt" / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"junk"))
    else:
        prepare_data(tmp / "data", prepare)


def prepare_summary(folder, fault, finished):
    """Two seeds of a finished run under folder, one of whose files holds a fault."""
    folder.mkdir()
    if fault == "summary empty":
        return
    for seed in (1, 2):
        shutil.copytree(finished, folder / f"s{seed}")
        edit_config(seed=seed)(folder / f"s{seed}")
    run = folder / "s2"
    if fault == "summary list":
        (run / "results.json").write_text("[]")
    elif fault == "summary not json":
        (run / "results.json").write_text('{"test_rmse": 0.5')
    elif fault == "summary text metric":
        (run / "eval.json").write_text(json.dumps({"test_nll": "low"}))
    elif fault == "summary bool metric":
        results = json.loads((run / "results.json").read_text())
        (run / "results.json").write_text(json.dumps({**results, "test_rmse": True}))
    elif fault == "summary text setting":
        edit_config(hidden="8")(run)
    elif fault == "summary missing setting":
        cfg = json.loads((run / "config.json").read_text())
        (run / "config.json").write_text(json.dumps({k: v for k, v in cfg.items()
                                                     if k != "hidden"}))
    elif fault == "summary no config":
        (run / "config.json").unlink()


def prepare_comparison(folder, fault):
    """Seed 1 of a MIM and a VAE run scored on the same points, one fault in the VAE's."""
    evaluation = {"compare other points": {"scored_points_sha256": "other points"},
                  "compare other S": {"nll_samples": 1000}}.get(fault, {})
    planted_pair(folder, 1, 8, 2, **evaluation)
    run = folder / "vae-s1"
    if fault == "compare no points":
        (run / "points.csv").unlink()
    elif fault == "compare short points":
        (run / "points.csv").write_text("\n".join(
            (run / "points.csv").read_text().splitlines()[:-1]) + "\n")
    elif fault == "compare not evaluated":
        (run / "eval.json").unlink()
    elif fault == "compare seed twice":
        shutil.copytree(run, folder / "vae-s1-again")


def prepare_data(folder, fault):
    """A data folder whose files hold one fault of their values or kind."""
    if fault.startswith("chardata"):
        folder.mkdir()
        write_chardata(folder / "chardata.mat")
        mat = {k: v for k, v in scipy.io.loadmat(folder / "chardata.mat").items()
               if not k.startswith("__")}                 # not MATLAB's header fields
        mat["data"] = mat["data"] * 255 if fault == "chardata 0-255" else mat["data"]
        mat["data"][3, 5] = np.nan if fault == "chardata NaN" else mat["data"][3, 5]
        scipy.io.savemat(folder / "chardata.mat", mat)
        return
    write_idx_set(folder, n_test={"no test images": 0, "three test images": 3}.get(fault, 12))
    images = folder / "train-images-idx3-ubyte.gz"
    if fault == "labels 200":
        write_idx(folder / "train-labels-idx1-ubyte.gz", np.full(60, 200, np.uint8), True)
    elif fault == "alike images":
        write_idx(images, np.full((60, 28, 28), 7, np.uint8), True)
    elif fault == "three of four files":
        (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    elif fault.startswith("entry"):
        images.unlink()
        {"entry folder": images.mkdir, "entry fifo": lambda: os.mkfifo(images),
         "entry dangling": lambda: images.symlink_to(folder / "gone")}[fault]()


@pytest.mark.parametrize("script,args,prepare,needle", BAD_INPUTS,
                         ids=[f"{c[0]} {' '.join(c[1])}" for c in BAD_INPUTS])
def test_bad_input_gets_one_line_and_exit_2_and_changes_nothing(
        tmp_path, finished_toy_run, script, args, prepare, needle):
    prepare_case(tmp_path, prepare, finished_toy_run)
    def contents():
        return {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")}
    before = contents()
    args = [a.format(tmp=tmp_path, run=tmp_path / "run") for a in args]
    needle = needle.format(tmp=tmp_path, run=tmp_path / "run")
    proc = run_main(*args, script=script)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and needle in lines[0], lines
    assert contents() == before                  # no file changed, none and no folder added


@pytest.mark.slow
def test_evaluate_waits_for_training_and_records_the_checkpoint_it_measured(tmp_path):
    """Evaluated while it trains: refused in one line; evaluated after: eval.json names
    the final best.pt by epoch and digest, and a summary takes it; an eval.json of another
    best.pt is stale, and the summary falls back to results.json and says so."""
    flags = ["--data", "mnist", "--data-dir", str(image_folder(tmp_path, 1200)),
             "--arch", "mlp", "--hidden", "16", "--z-dim", "3", "--batch-size", "8",
             "--epochs", "60", "--patience", "60", "--warmup", "1", "--nll-samples", "0"]
    out = tmp_path / "runs" / "run"
    training = start_mim(*flags, "--out", str(out))
    while not (out / "last.pt").exists() and training.poll() is None:
        time.sleep(0.05)
    during = run_main("evaluate", str(out), "--nll-samples", "0")
    assert training.poll() is None, "training ended before the evaluation was tried"
    assert during.returncode == 2 and during.stderr.strip() == (
        f"mim.py evaluate: error: another process is training or evaluating {out}; "
        "evaluate it once that process has ended")
    assert not (out / "eval.json").exists()
    training.send_signal(signal.SIGTERM)          # its lock ends with it; one epoch more
    assert training.wait(timeout=300) == 128 + signal.SIGTERM    # finishes the run
    done = torch.load(out / "last.pt", weights_only=True)["extra"]["progress"]["epoch"]
    assert run_main("--resume", str(out), "--epochs", str(done + 1)).returncode == 0
    after = run_main("evaluate", str(out), "--nll-samples", "0")
    assert after.returncode == 0, after.stderr
    record = json.loads((out / "eval.json").read_text())
    results = json.loads((out / "results.json").read_text())
    digest = hashlib.sha256((out / "best.pt").read_bytes()).hexdigest()
    assert record["checkpoint"] == {"file": "best.pt", "epoch": results["best_epoch"],
                                    "sha256": digest}
    assert record["figures"] == sorted(p.name for p in out.glob("*.png"))
    assert "training.png" in record["figures"]
    assert cli.load_runs(tmp_path / "runs")[0][1]["metrics_from"] == (
        "eval.json, else results.json")
    (out / "eval.json").write_text(json.dumps({**record, "test_knn5_acc": 9.0, "checkpoint": {
        **record["checkpoint"], "sha256": "0" * 64}}))
    (cfg, metrics), = cli.load_runs(tmp_path / "runs")
    assert metrics["metrics_from"] == "results.json (eval.json stale: of an older best.pt)"
    assert metrics["test_knn5_acc"] == results["test_knn5_acc"] != 9.0


@pytest.mark.slow
def test_the_fixes_that_the_messages_give_work(tmp_path, finished_toy_run):
    """Each refusal below names a fix; following it, the command succeeds."""
    def refused_then_fixed(prepare, args, fix):
        run = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        shutil.copytree(finished_toy_run, run)
        prepare(run)
        args = [a.format(run=run) for a in args]
        proc = run_main(*args)
        assert proc.returncode == 2, proc.stderr
        fixed = fix(run, args, proc.stderr)
        proc = run_main(*fixed)
        assert proc.returncode == 0, proc.stderr

    resume = ["--resume", "{run}", "--epochs", "3"]
    refused_then_fixed(edit_config(lr=0.01), resume,     # "pass --lr 0.01 with --resume"
                       lambda run, args, err: args + ["--lr", "0.01"])
    refused_then_fixed(edit_config(text="{"), resume,    # "... or delete config.json"
                       lambda run, args, err: (run / "config.json").unlink() or args)
    def move_out(run, args, err):                                # "move it out"
        (run / "log.csv").rename(tmp_path / "moved")
        return args
    refused_then_fixed(odd_file("log.csv", "folder"), resume, move_out)
    def finish_then_evaluate(run, args, err):
        assert f"finish the run with mim.py --resume {run}" in err
        assert run_main("--resume", str(run)).returncode == 0
        return args
    refused_then_fixed(removed("best.pt"), ["evaluate", "{run}", "--nll-samples", "0"],
                       finish_then_evaluate)
    def smallest_that_works(run, args, err):                    # "use --FLAG N or more"
        flag, n = re.search(r"use (--[a-z-]+) (\d+) or more", err).groups()
        return [n if previous == flag else a for previous, a in zip([None, *args], args)]
    for flag, value in (("--test-size", "1"), ("--test-size", "3"), ("--knn-train", "1")):
        refused_then_fixed(lambda run: None,
                           ["evaluate", "{run}", "--nll-samples", "0", flag, value],
                           smallest_that_works)


def test_resume_may_change_the_nll_samples_of_the_final_test(tmp_path, finished_toy_run):
    run = tmp_path / "run"
    shutil.copytree(finished_toy_run, run)
    proc = run_main("--resume", str(run), "--nll-samples", "7")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((run / "results.json").read_text())["nll_samples"] == 7


@pytest.fixture
def terminal_sigint():
    """Ctrl-C as a terminal delivers it to this process, for the test's duration: under a
    background shell job (see interactive_signals) SIGINT is ignored here too."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.slow
@pytest.mark.parametrize("sig,how", [(signal.SIGINT, "Ctrl-C"), (signal.SIGTERM, "SIGTERM")])
@pytest.mark.parametrize("stage", ["run_figures", "test_metrics"])
def test_a_signal_during_evaluate_keeps_the_earlier_evaluation(
        tmp_path, finished_toy_run, monkeypatch, capsys, terminal_sigint, sig, how, stage):
    run = tmp_path / "run"
    shutil.copytree(finished_toy_run, run)
    cli.main(["evaluate", str(run), "--nll-samples", "0"])
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    capsys.readouterr()
    real = getattr(evaluate, stage)

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), sig)             # delivered as it would be from a terminal
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate, stage, signalled)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["evaluate", str(run), "--nll-samples", "3"])
    assert exit_info.value.code == 128 + sig
    assert capsys.readouterr().err.strip() == (
        f"mim.py evaluate: stopped by {how}; each run keeps the evaluation it had before "
        "this command (or none): run the command again")
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


@pytest.mark.slow
def test_a_closed_pipe_ends_evaluate_quietly(tmp_path, finished_toy_run):
    """python mim.py evaluate RUN | head -c0: the reader went away; exit 141, no words."""
    run = tmp_path / "run"
    shutil.copytree(finished_toy_run, run)
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "mim.py"), "evaluate",
                             str(run), "--nll-samples", "0"],
                            cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141 and err == "", err
    assert json.loads((run / "eval.json").read_text())["checkpoint"]["file"] == "best.pt"


@pytest.mark.slow
def test_training_outlives_its_console(tmp_path):
    """python mim.py ... 2>&1 | head -1: the reader goes after the first epoch's line, and
    training goes on to its end, writes its files and exits 0, printing nothing more. So
    does a run whose terminal hangs up (SIGHUP) and whose pipes then close."""
    flags = ["--epochs", "6", "--warmup", "1", "--patience", "6", "--hidden", "8",
             "--nll-samples", "8"]
    mim_py = [sys.executable, os.path.join(HERE, "mim.py"), *flags]
    piped = tmp_path / "piped"
    proc = subprocess.run(["bash", "-c", "set -o pipefail; \"$@\" 2>&1 | head -1", "bash",
                           *mim_py, "--out", str(piped)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("epoch   1 |") and proc.stdout.count("\n") == 1
    assert json.loads((piped / "results.json").read_text())["epochs"] == 6
    hung_up = tmp_path / "hung-up"
    proc = subprocess.Popen([*mim_py, "--out", str(hung_up)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("epoch   1 |")
    proc.send_signal(signal.SIGHUP)
    proc.stdout.close()
    proc.stderr.close()
    assert proc.wait(timeout=300) == 0
    assert json.loads((hung_up / "results.json").read_text())["epochs"] == 6


@pytest.fixture
def small_disk(tmp_path):
    """A real file system of 1 MiB (tmpfs; needs root), unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                             capture_output=True, text=True) if os.geteuid() == 0 else None
    if mounted is None or mounted.returncode != 0:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def fill(disk, leave):
    """Fill the disk up to `leave` bytes free, with one file."""
    free = shutil.disk_usage(disk).free
    (disk / "filler").write_bytes(b"\0" * max(free - leave, 0))


@pytest.mark.slow
def test_a_real_full_disk_ends_training_and_evaluate_in_one_line(small_disk,
                                                                 finished_toy_run):
    fill(small_disk, 12 * 1024)           # room for config.json and log.csv, not last.pt
    out = small_disk / "run"
    proc = run_main("--epochs", "2", "--warmup", "1", "--hidden", "8", "--nll-samples", "0",
                   "--out", str(out))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr
    assert "No space left on device" in lines[0] and "free space" in lines[0]
    assert not [p for p in out.glob("*") if p.suffix == ".tmp" or p.name == "last.pt"]
    shutil.rmtree(out, ignore_errors=True)
    (small_disk / "filler").unlink()
    shutil.copytree(finished_toy_run, out)
    fill(small_disk, 16 * 1024)            # room for eval.json, not for the figures
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = run_main("evaluate", str(out), "--nll-samples", "0")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "No space left on device" in lines[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before   # all or nothing
    (small_disk / "filler").unlink()
    assert run_main("evaluate", str(out), "--nll-samples", "0").returncode == 0
    assert (out / "eval.json").exists() and (out / "fig1.png").exists()


def test_checkpoints_record_their_data_and_refuse_another_test_split(tmp_path):
    images = image_folder(tmp_path, 300)
    out = tmp_path / "run"
    proc = run_main("--data", "mnist", "--data-dir", os.path.relpath(images, HERE), "--arch",
                   "mlp", "--hidden", "8", "--z-dim", "2", "--batch-size", "32", "--epochs",
                   "1", "--warmup", "1", "--nll-samples", "0", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "config.json").read_text())["data_dir"] == str(images)
    info = torch.load(out / "best.pt", weights_only=True)["extra"]["data"]
    assert info["name"] == "mnist" and info["sizes"][2] == 60
    moved = tmp_path / "moved"
    images.rename(moved)
    evaluated = run_main("evaluate", str(out), "--nll-samples", "0", "--data-dir",
                           str(moved))
    assert evaluated.returncode == 0, evaluated.stderr
    other = tmp_path / "other"
    write_idx_set(other, n_train=300, n_test=60)          # same shapes, other test images
    refused = run_main("evaluate", str(out), "--nll-samples", "0", "--data-dir",
                         str(other))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "is not the mnist one" in refused.stderr and "--data-dir" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    resumed = run_main("--resume", str(out), "--epochs", "2", "--data-dir", str(moved))
    assert resumed.returncode == 0, resumed.stderr
    refused = run_main("--resume", str(out), "--epochs", "3", "--data-dir", str(other))
    assert refused.returncode == 2 and "is not the mnist one" in refused.stderr


def test_a_full_disk_ends_the_run_in_one_line(tmp_path, monkeypatch, capsys):
    def no_space(path, rows):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(cli, "write_csv", no_space)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--epochs", "2", "--warmup", "1", "--nll-samples", "0", "--out", str(out)])
    lines = [l for l in capsys.readouterr().err.splitlines() if "error" in l]
    assert exit_info.value.code == 2 and len(lines) == 1
    assert "No space left on device" in lines[0] and "free space" in lines[0]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_outputs_follow_the_umask_and_orphan_temporary_files_go(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, os.path.join(HERE, "mim.py"), "--epochs", "1",
                           "--warmup", "1", "--nll-samples", "0", "--out", str(out)],
                          cwd=HERE, capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: os.umask(0o027))
    assert proc.returncode == 0, proc.stderr
    for name in ("config.json", "log.csv", "last.pt", "best.pt", "results.json"):
        assert (out / name).stat().st_mode & 0o777 == 0o640, name
    (out / "last.pt.k3j9x_q1.tmp").write_bytes(b"left by kill -9")   # mkstemp's pattern
    (out / "notes.tmp").write_text("the user's own file")
    assert run_main("--resume", str(out), "--epochs", "2").returncode == 0
    assert sorted(p.name for p in out.glob("*.tmp")) == ["notes.tmp"]


@pytest.mark.slow
@pytest.mark.parametrize("sig,how", [(signal.SIGINT, "Ctrl-C"), (signal.SIGTERM, "SIGTERM")])
def test_ctrl_c_and_sigterm_stop_with_one_line_and_a_resumable_run(tmp_path, sig, how):
    flags = ["--data", "mnist", "--data-dir", str(image_folder(tmp_path, 1200)),
             "--arch", "mlp", "--hidden", "16", "--z-dim", "3", "--batch-size", "8",
             "--epochs", "50", "--warmup", "1", "--patience", "50"]
    out = tmp_path / "run"
    proc = start_mim(*flags, "--out", str(out))
    while not (out / "last.pt").exists() and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig and "Traceback" not in err
    progress = re.compile(r"epoch \d+: \d+/\d+ batches")   # the long epochs' stderr lines
    assert [l for l in err.strip().splitlines() if not progress.match(l)] == [
        f"mim.py: stopped by {how}; {out}/last.pt holds the last finished epoch: "
        f"continue with python mim.py --resume {out}"]
    assert torch.load(out / "last.pt", weights_only=True)["extra"]["progress"]["epoch"] >= 1
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


def test_amp_is_a_switch():
    assert cli.parse_args(["--amp"])[0].amp and not cli.parse_args([])[0].amp


PAGE_FAULT_PROBE = """
import resource, sys, torch, cli
took = cli.reuse_freed_memory() if sys.argv[1] == "reuse" else None
faults = []
for _ in range(10):      # the heap settles after a few allocations, how many varies
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(2 ** 24)  # 64 MiB, written and freed
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(took, min(faults[5:]))
"""




def test_the_command_line_keeps_freed_memory_on_the_cpu(monkeypatch):
    """The allocator setting is the command line's, for its own process: choosing the
    CPU applies it, and the library's speed_up never does."""
    calls = []
    monkeypatch.setattr(cli, "reuse_freed_memory", lambda: calls.append(1))
    mim.speed_up(mim.build_model(mim.ModelSpec(x_dim=4, binary=True, image_shape=(1, 2, 2),
                                               arch="convhvae", z_dim=1)))
    assert not calls
    assert cli.command_line_device("cpu") == torch.device("cpu") and calls == [1]
