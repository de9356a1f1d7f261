#!/usr/bin/env bash
# Reproduces the paper's experiments that fit on a CPU, into results/:
#   fig2-paper/, fig2-authors/  Fig. 1-2: MIM vs VAE on the 2-D GMM against hidden width,
#                               with the warm-up of Sec. 5 and with the authors' warm-up
#   f2/                         App. F.2: L_MIM vs L_CE on 1-D data, mixture priors (trained
#                               to convergence: patience 20 rather than the warm-up length)
# Each run is a folder written by `mim.py --out`; each experiment gets summary.md (mean and
# std over seeds) and summary.png; evaluate.py draws fig1.png / consistency.png per run.
#
#   ./run_all.sh           the paper's protocol: 10 seeds, widths 5-500, S = 1000 (about 1.5
#                          hours on two cores)
#   ./run_all.sh --quick   3 seeds, widths 5, 20, 500, S = 100 (about 9 minutes)
#
# Finished runs (those with results.json) are skipped, so an interrupted call can be rerun.
# JOBS=N sets how many runs go side by side (default: the number of cores).
set -euo pipefail
cd "$(dirname "$0")"

case "${1:-}" in
  --quick) seeds="1 2 3"; widths="5 20 500"; nll=100 ;;
  "") seeds="1 2 3 4 5 6 7 8 9 10"; widths="5 20 50 100 200 300 400 500"; nll=1000 ;;
  *) echo "run_all.sh: error: unknown option '$1' (use --quick, or nothing for the full run)" >&2
     exit 2 ;;
esac
jobs=${JOBS:-$(nproc)}
export OMP_NUM_THREADS=1  # small networks: separate processes beat threads within one

train() {  # train OUT_DIR MIM_FLAGS...: one run, skipped if it has finished before
  local out=$1; shift
  [[ -f $out/results.json ]] && return 0
  mkdir -p "$(dirname "$out")"
  if ! python mim.py "$@" --out "$out" > "$out.log" 2>&1; then
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
} | xargs -P "$jobs" -L 1 bash -c 'train "$@"' train

for mode in paper authors; do
  python evaluate.py --summary "results/fig2-$mode" --x hidden
  python evaluate.py results/fig2-$mode/{mim,vae}-h{5,20,500}-s1
done
python evaluate.py --summary results/f2
python evaluate.py results/f2/{mim,ce}-s1
echo "tables: results/*/summary.md; figures: results/*/summary.png, */fig1.png, */consistency.png"
