#!/usr/bin/env bash
# Reproduces the paper's experiments, into results/:
#   fig2-paper/, fig2-authors/  Fig. 1-2: MIM vs VAE on the 2-D GMM against hidden width,
#                               with the warm-up of Sec. 5 and with the authors' warm-up
#   f2/                         App. F.2: L_MIM vs L_CE on 1-D data, mixture priors (trained
#                               to convergence: patience 20 rather than the warm-up length)
#   fig3/                       Fig. 3: MIM vs VAE on 20-D PCA Fashion-MNIST against the
#                               latent dimension
#   collapse/                   posterior-collapse remedies side by side on the 20-D GMM of
#                               App. F.5 with a 20-D latent: VAE, MIM, A-MIM, InfoMax-VAE
#                               and the three inference critics, same network and budget
#   images/                     Sec. 5.2-5.3, Fig. 4 (NLL), Fig. 6 (5-NN) and Fig. 7-8
#                               (t-SNE): MIM / A-MIM vs VAE, convHVAE and PixelHVAE, standard
#                               and VampPrior priors, on MNIST, Fashion-MNIST and Omniglot
# Each run is a folder written by `mim.py --out`; each experiment gets summary.md (mean and
# std over seeds) and, where there is an x-axis, summary.png; mim.py evaluate writes eval.json
# and the figures of single runs (fig1.png, consistency.png, tsne.png, reconstructions.png,
# samples.png) next to them.
#
#   ./run_all.sh           the paper's protocol: 10 seeds; toy widths 5-500; images with
#                          100 warm-up epochs, early stopping and S = 5000 importance samples,
#                          which is meant for a GPU (many days on a CPU; about 55 hours
#                          on one GPU by RESULTS.md's FLOP estimate, not measured)
#   ./run_all.sh --quick   the reduced protocol for two CPU cores: 3 seeds and widths 5, 20,
#                          500 on the toys and in collapse/, S = 100 (26 min 49 s before
#                          collapse/ was added, whose 21 runs took 27 min more on one busy
#                          core); Fig. 3 at latent dimensions 2, 10 and 20 with one seed;
#                          the paper's four VampPrior image rows (convHVAE MIM and VAE,
#                          PixelHVAE A-MIM and VAE) on MNIST with seeds 1-3 and on
#                          Fashion-MNIST with seed 1, each trained for 10 epochs on the first
#                          5,000 training images in bfloat16 (--amp), evaluated on 500 test
#                          images with S = 100, and seed 1 also by AIS on 10 of them
#                          (README, "Reproducing the experiments", for the time it takes)
#
# Finished runs (those with results.json) are skipped and interrupted ones resumed, so an
# interrupted call can be rerun.
# JOBS=N sets how many runs go side by side, each on one thread (default: the number of
# cores). DATA_DIR=PATH is passed to the MNIST runs as --data-dir (offline:
# ../shared/data/mnist, the official split); it is not passed to Fashion-MNIST runs, whose
# IDX files have the same names and would be read from it.
set -euo pipefail
cd "$(dirname "$0")"

# ./run_all.sh --gpu-check: what one GPU can tell in about 10 minutes, into results/gpu-check/
# (gpu_check.md holds every number): the convHVAE + VampPrior MIM (defaults), the authors'
# MIM (--preset authors) and the VAE trained side by side on MNIST for GPU_CHECK_EPOCHS
# epochs (warm-up GPU_CHECK_WARMUP), each evaluated on GPU_CHECK_TEST test digits (5-NN,
# IWAE NLL with GPU_CHECK_NLL samples); the S = GPU_CHECK_TIMING_S NLL of
# GPU_CHECK_TIMING_POINTS digits timed with TF32 allowed and in full float32; a run and its
# resume compared bit for bit under --deterministic; then the test suite (GPU_CHECK_TESTS=0
# skips it), whose command-line tests train on the GPU through --device auto. The variables
# below size it; the test suite runs it on the CPU with a tiny budget.
gpu_check() {
  local device=${GPU_CHECK_DEVICE:-cuda} out=${GPU_CHECK_OUT:-results/gpu-check}
  local epochs=${GPU_CHECK_EPOCHS:-5} warmup=${GPU_CHECK_WARMUP:-2}
  local test=${GPU_CHECK_TEST:-1000} nll=${GPU_CHECK_NLL:-1000}
  local timing_points=${GPU_CHECK_TIMING_POINTS:-100} timing_s=${GPU_CHECK_TIMING_S:-5000}
  local resume_size=${GPU_CHECK_RESUME_SIZE:-2000} extra=${GPU_CHECK_FLAGS:-}
  local data="--data mnist ${DATA_DIR:+--data-dir $DATA_DIR} --device $device"
  local model="--arch convhvae --prior vamp $extra"
  if [[ -e $out ]]; then
    echo "run_all.sh: $out exists; move it away or set GPU_CHECK_OUT" >&2; return 2
  fi
  python - "$device" <<'PY' || return 2   # refuse in one line before anything starts
import sys, mim
try:
    mim.choose_device(sys.argv[1])
except mim.UsageError as e:
    print(f"run_all.sh: --gpu-check: {e}", file=sys.stderr)
    sys.exit(2)
PY
  mkdir -p "$out"
  fail() { echo "run_all.sh: --gpu-check: $1 failed; see $2" >&2; return 1; }
  local name flags pids=()
  for name in mim authors-mim vae; do
    case $name in
      mim) flags="--loss mim" ;; authors-mim) flags="--loss mim --preset authors" ;;
      vae) flags="--loss vae" ;;
    esac
    python mim.py $data $model $flags --epochs "$epochs" --warmup "$warmup" --amp \
      --out "$out/$name" > "$out/$name.log" 2>&1 &
    pids+=($!)
  done
  local i=0
  for name in mim authors-mim vae; do
    wait "${pids[$i]}" || fail "training $name" "$out/$name.log" || return
    i=$((i + 1))
  done
  for name in mim authors-mim vae; do
    python mim.py evaluate "$out/$name" --test-size "$test" --nll-samples "$nll" \
      --device "$device" > "$out/$name.eval.log" 2>&1 \
      || fail "evaluating $name" "$out/$name.eval.log" || return
  done
  for precision in tf32 fp32; do
    cp -r "$out/mim" "$out/timing-$precision"
    local start=$(date +%s.%N)
    python mim.py evaluate "$out/timing-$precision" --test-size "$timing_points" \
      --nll-samples "$timing_s" --device "$device" $([[ $precision == tf32 ]] && echo --tf32) \
      > "$out/timing-$precision.log" 2>&1 || fail "timing" "$out/timing-$precision.log" || return
    echo "$start $(date +%s.%N)" > "$out/timing-$precision/seconds"
  done
  local resume="$data $model --loss mim --train-size $resume_size --warmup 1 --deterministic"
  { python mim.py $resume --epochs 2 --out "$out/straight" > "$out/straight.log" 2>&1 &&
    python mim.py $resume --epochs 1 --out "$out/resumed" > "$out/resumed.log" 2>&1 &&
    python mim.py --resume "$out/resumed" --epochs 2 >> "$out/resumed.log" 2>&1; } \
    || fail "the resume check" "$out/straight.log and $out/resumed.log" || return
  local tests="not run (GPU_CHECK_TESTS=0)"
  if [[ ${GPU_CHECK_TESTS:-1} == 1 ]]; then
    tests=$(python -m pytest -q -p no:cacheprovider 2>&1 | tail -1 || true)
  fi
  python - "$out" "$device" "$tests" <<'PY'
import json, os, sys, torch, mim
out, device, tests = sys.argv[1:]
lines = [f"# GPU check: {out}", "", f"torch {torch.__version__}, device {device}" +
         (f": {torch.cuda.get_device_name()} (compute capability "
          f"{'.'.join(map(str, torch.cuda.get_device_capability()))})"
          if device == "cuda" else f", CPU capability {torch.backends.cpu.get_cpu_capability()}"),
         "", "| run | epochs | training (s) | 5-NN, encoder means | 5-NN, one code | "
         "NLL, IWAE (nats) | S | test digits |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
for name in ("mim", "authors-mim", "vae"):
    res = json.load(open(f"{out}/{name}/results.json"))
    ev = json.load(open(f"{out}/{name}/eval.json"))
    lines.append(f"| {name} | {res['epochs']} | {res['train_seconds']:.1f} | "
                 f"{ev['test_knn5_acc_mean']:.4f} | {ev['test_knn5_acc']:.4f} | "
                 f"{ev['test_nll']:.2f} | {ev['nll_samples']} | {ev['test_size']} |")
lines += ["", "| NLL of the mim run | seconds | NLL (nats) | S | test digits |",
          "| --- | --- | --- | --- | --- |"]
for precision in ("tf32", "fp32"):
    start, end = map(float, open(f"{out}/timing-{precision}/seconds").read().split())
    ev = json.load(open(f"{out}/timing-{precision}/eval.json"))
    lines.append(f"| {precision} | {end - start:.1f} | {ev['test_nll']:.4f} | "
                 f"{ev['nll_samples']} | {ev['test_size']} |")
a = mim.read_checkpoint(f"{out}/straight/last.pt")["model"]
b = mim.read_checkpoint(f"{out}/resumed/last.pt")["model"]
same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
lines += ["", "resume with --deterministic, 2 epochs straight against 1 + 1 resumed: " +
          ("bit-identical weights" if same else "weights DIFFER"), "", f"tests: {tests}"]
text = "\n".join(lines) + "\n"
open(f"{out}/gpu_check.md", "w").write(text)
print(text, end="")
PY
}

case "${1:-}" in
  --gpu-check) gpu_check; exit ;;
  --quick) seeds="1 2 3"; widths="5 20 500"; nll=100
           pca_seeds="1"; pca_dims="2 10 20"
           image_runs="mnist:1 fashion_mnist:1 mnist:2 mnist:3"; image_nll=100
           image_flags="--train-size 5000 --epochs 10 --amp"
           image_eval="--test-size 500"
           image_models="convhvae:vamp:mim convhvae:vamp:vae pixelhvae:vamp:amim
                         pixelhvae:vamp:vae" ;;
  "") seeds="1 2 3 4 5 6 7 8 9 10"; widths="5 20 50 100 200 300 400 500"; nll=1000
      pca_seeds=$seeds; pca_dims="2 4 6 8 10 12 14 16 18 20"
      image_runs=$(for s in $seeds; do echo mnist:$s fashion_mnist:$s omniglot:$s; done)
      image_nll=5000; image_flags="--epochs 2000 --warmup 100"; image_eval=""
      image_models="" ;;
  *) echo "run_all.sh: error: unknown option '$1' (use --quick, --gpu-check, or nothing for the full run)" >&2
     exit 2 ;;
esac
jobs=${JOBS:-$(nproc)}
data_dir=${DATA_DIR:+--data-dir $DATA_DIR}

train() {  # train OUT_DIR MIM_FLAGS...: one run, skipped if it has finished before and
           # resumed from its last finished epoch if it was interrupted
  local out=$1; shift
  [[ -f $out/results.json ]] && return 0
  mkdir -p "$(dirname "$out")"
  if [[ -f $out/last.pt ]]; then set -- --resume "$out"; else set -- "$@" --out "$out"; fi
  if ! python mim.py "$@" >> "$out.log" 2>&1; then
    echo "run_all.sh: $out failed; see $out.log" >&2
    return 1
  fi
  echo "done: $out"
}
export -f train

{
  for seed in $seeds; do
    for h in $widths; do
      for loss in mim vae; do
        for mode in paper authors; do
          echo "results/fig2-$mode/$loss-h$h-s$seed --data toy2d --hidden $h --loss $loss" \
               "--warmup-mode $mode --seed $seed --nll-samples $nll"
        done
      done
    done
    for loss in mim ce; do
      echo "results/f2/$loss-s$seed --data toy1d --z-dim 1 --hidden 10 --activation silu" \
           "--prior mog --q-x mog --loss $loss --patience 20 --seed $seed --nll-samples $nll"
    done
  done
  for seed in $seeds; do
    for loss in vae mim amim infomax critic-self critic-nn critic-hybrid; do
      echo "results/collapse/$loss-s$seed --data toy20d --z-dim 20 --hidden 50 --loss $loss" \
           "--seed $seed --nll-samples $nll"
    done
  done
  for seed in $pca_seeds; do
    for z in $pca_dims; do
      for loss in mim vae; do
        echo "results/fig3/$loss-z$z-s$seed --data pca_fashion_mnist --z-dim $z --hidden 50" \
             "--loss $loss --seed $seed --nll-samples $nll"
      done
    done
  done
} | OMP_NUM_THREADS=1 xargs -P "$jobs" -L 1 bash -c 'train "$@"' train  # small networks:
                                                   # separate processes beat threads

for mode in paper authors; do
  python mim.py evaluate --summary "results/fig2-$mode" --x hidden
  python mim.py evaluate results/fig2-$mode/{mim,vae}-h{5,20,500}-s1 --nll-samples "$nll"
done
python mim.py evaluate --summary results/f2
python mim.py evaluate results/f2/{mim,ce}-s1 --nll-samples "$nll"
python mim.py evaluate --summary results/fig3 --x z_dim
# eval.json adds active units, the ELBO's KL term and the minibatch MI to each run
for run in results/collapse/*-s*/; do
  [[ -f $run/eval.json ]] || python mim.py evaluate "$run" --nll-samples "$nll" > "${run%/}.eval.log"
done
python mim.py evaluate --summary results/collapse --x loss

# Sec. 5.2: MIM (convHVAE) and A-MIM (PixelHVAE, whose sampling is too slow for MIM's
# decoder samples) against the VAE with the same network, each prior (arch:prior:loss).
if [[ -z $image_models ]]; then
  for arch_loss in convhvae:mim convhvae:vae pixelhvae:amim pixelhvae:vae; do
    for prior in normal vamp; do
      image_models+=" ${arch_loss%:*}:$prior:${arch_loss#*:}"
    done
  done
fi
# The tight NLL (AIS from the encoder itself, see RESULTS.md) on seed 1's first test images.
ais="--ais-steps 300 --ais-chains 4 --ais-leapfrog 2 --ais-points 10 --ais-inflate 1"
image() {  # image OUT MIM_FLAGS...: train, then evaluate on the test images
  local out=$1
  train "$@" || return 1
  [[ -f $out/eval.json ]] && return 0
  [[ $out == *-s1 ]] || ais=""
  python mim.py evaluate "$out" --nll-samples "$image_nll" $image_eval $ais > "$out.eval.log" 2>&1 \
    || echo "run_all.sh: evaluating $out failed; see $out.eval.log" >&2
}
export -f image; export image_nll image_eval ais
for run in $image_runs; do
  IFS=: read -r data seed <<< "$run"
  [[ $data == mnist ]] && dir=$data_dir || dir=""   # DATA_DIR holds MNIST's files only
  for model in $image_models; do
    IFS=: read -r arch prior loss <<< "$model"
    echo "results/images/$data-$arch-$prior-$loss-s$seed --data $data --arch $arch" \
         "--prior $prior --loss $loss --seed $seed $image_flags $dir"
  done
done | OMP_NUM_THREADS=1 xargs -P "$jobs" -L 1 bash -c 'image "$@"' image
python mim.py evaluate --summary results/images
echo "tables: results/*/summary.md; figures: results/*/summary.png and the run folders"
