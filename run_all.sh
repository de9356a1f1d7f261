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
#                          which is meant for a GPU (many days on a CPU; about 12 days
#                          of one H200 by RESULTS.md's estimate at rates measured there)
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
#   ./run_all.sh --list [--quick]    the protocol's jobs, one command per line, for any
#                          runner (xargs -P, GNU parallel, a scheduler): every training,
#                          then every evaluation; each skips finished work and resumes
#                          interrupted work, so a list can be rerun
#   ./run_all.sh --slurm [--quick] [--submit]   results/slurm/: the unfinished jobs as
#                          sbatch arrays, with submit.sh (resources at its top) to submit
#                          them and a summary job after them (--submit runs it)
#   ./run_all.sh --status [--quick]  each experiment's jobs by state: finished, running,
#                          interrupted or missing
#   ./run_all.sh --summaries         results/*/summary.md of every experiment with runs
#
# JOBS=N sets how many jobs go side by side (default: the number of cores, which they
# share as threads); with --device cuda, N jobs per GPU, each on one GPU in turn.
# --device DEVICE is passed to every job. DATA_DIR=PATH is passed to the MNIST runs as
# --data-dir (a folder holding the official MNIST IDX files); it is not passed to
# Fashion-MNIST runs, whose IDX files have the same names and would be read from it.
# ONLY=REGEX keeps the jobs whose command matches it; RUN_ALL_TINY=1 shrinks every job to
# seconds (the tests' protocol).
set -euo pipefail
cd "$(dirname "$0")"
# The files of a run folder, as cli.py's part 1 names them (NAME = "file"), their one owner
run_file() {
  local name; name=$(sed -n "s/^$1 = \"\(.*\)\"$/\1/p" cli.py)
  [[ -n $name ]] || { echo "run_all.sh: cli.py names no $1 file" >&2; exit 1; }
  echo "$name"
}
results_file=$(run_file RESULTS) last_file=$(run_file LAST) best_file=$(run_file BEST)
eval_file=$(run_file EVALUATION)

# ./run_all.sh --gpu-check: the paper's two image claims on one GPU in under 9 minutes,
# into results/gpu-check/ (gpu_check.md holds every number): convHVAE + VampPrior MIM and
# VAE at seeds GPU_CHECK_SEEDS, PixelHVAE + VampPrior A-MIM and VAE at seed 1 (and, with
# GPU_CHECK_AUTHORS=1, the authors' MIM, --preset authors, at seed 1), all side by side on
# MNIST's 50,000 training digits for GPU_CHECK_EPOCHS epochs (warm-up GPU_CHECK_WARMUP);
# then each evaluated, 5-NN on all GPU_CHECK_TEST test digits (default: all 10,000) and the
# IWAE NLL with GPU_CHECK_NLL samples on the first GPU_CHECK_NLL_POINTS of them, and the
# two losses of each network compared point by point and seed by seed (mim.py evaluate
# --summary --compare loss). GPU_CHECK_TESTS=1 runs the test suite afterwards (one test per
# core where pytest-xdist is installed). The variables below size it; RESULTS.md, "Images
# on one GPU", holds the arithmetic of its time; the test suite runs it on the CPU with a
# tiny budget.
gpu_check() {
  local device=${GPU_CHECK_DEVICE:-cuda} out=${GPU_CHECK_OUT:-results/gpu-check}
  local epochs=${GPU_CHECK_EPOCHS:-5} warmup=${GPU_CHECK_WARMUP:-2}
  local seeds=${GPU_CHECK_SEEDS:-1 2 3} test=${GPU_CHECK_TEST:-}
  local nll=${GPU_CHECK_NLL:-1000} nll_points=${GPU_CHECK_NLL_POINTS:-1000}
  local extra=${GPU_CHECK_FLAGS:-}
  local data="--data mnist ${DATA_DIR:+--data-dir $DATA_DIR} --device $device"
  if [[ -e $out ]]; then
    echo "run_all.sh: $out exists; move it away or set GPU_CHECK_OUT" >&2; return 2
  fi
  python - "$device" <<'PY' || return 2   # refuse in one line before anything starts
import sys, cli
try:
    cli.choose_device(sys.argv[1])
except cli.UsageError as e:
    print(f"run_all.sh: --gpu-check: {e}", file=sys.stderr)
    sys.exit(2)
PY
  mkdir -p "$out/runs"
  local runs=() seed
  for seed in $seeds; do runs+=("convhvae:mim:$seed" "convhvae:vae:$seed"); done
  runs+=("pixelhvae:amim:1" "pixelhvae:vae:1")
  [[ ${GPU_CHECK_AUTHORS:-0} == 1 ]] && runs+=("convhvae:mim:1:authors")
  local threads=$(( $(nproc) / ${#runs[@]} ))
  train_one() {  # train_one ARCH:LOSS:SEED[:PRESET]; prints its log's name if it fails
    local arch loss seed preset name
    IFS=: read -r arch loss seed preset <<< "$1"
    name=$arch-${preset:+$preset-}$loss-s$seed
    OMP_NUM_THREADS=$(( threads > 0 ? threads : 1 )) python mim.py $data --arch "$arch" \
      --prior vamp --loss "$loss" ${preset:+--preset $preset} --seed "$seed" \
      --epochs "$epochs" --warmup "$warmup" --amp $extra --out "$out/runs/$name" \
      > "$out/$name.log" 2>&1 || echo -n " $out/$name.log"
  }
  evaluate_one() {  # evaluate_one NAME; prints its log's name if it fails
    python mim.py evaluate "$out/runs/$1" --nll-samples "$nll" --nll-points "$nll_points" \
      --device "$device" ${test:+--test-size "$test"} > "$out/$1.eval.log" 2>&1 \
      || echo -n " $out/$1.eval.log"
  }
  local start=$SECONDS failed run i=0
  # every run at once, the cores shared out as threads
  failed=$(for run in "${runs[@]}"; do train_one "$run" & done; wait)
  [[ -z $failed ]] || { echo "run_all.sh: --gpu-check: training failed; see$failed" >&2
                        return 1; }
  local trained=$((SECONDS - start))
  # three at a time: each sizes its passes to a quarter of the GPU memory free at its start,
  # so three started together take at most three quarters of it
  failed=$(for run in "$out"/runs/*/; do
             evaluate_one "$(basename "$run")" & (( ++i % 3 )) || wait
           done; wait)
  [[ -z $failed ]] || { echo "run_all.sh: --gpu-check: evaluation failed; see$failed" >&2
                        return 1; }
  local evaluated=$((SECONDS - start - trained))
  python mim.py evaluate --summary "$out/runs" --compare loss > /dev/null || return 1
  local tests="not run (GPU_CHECK_TESTS=1 runs them)"
  if [[ ${GPU_CHECK_TESTS:-0} == 1 ]]; then
    local env=() parallel=()
    if python -c "import xdist" 2> /dev/null; then   # pytest-xdist: one test per core
      env=(OMP_NUM_THREADS=1) parallel=(-n auto)
    fi
    tests=$(env "${env[@]}" python -m pytest -q -p no:cacheprovider "${parallel[@]}" 2>&1 \
            | tail -1 || true)
  fi
  python - "$out" "$device" "$trained" "$evaluated" "$tests" <<'PY'
import glob, json, os, sys, torch, cli
out, device, trained, evaluated, tests = sys.argv[1:]
machine = (f"{torch.cuda.get_device_name()} (compute capability "
           f"{'.'.join(map(str, torch.cuda.get_device_capability()))})" if device == "cuda"
           else f"CPU, capability {torch.backends.cpu.get_cpu_capability()}")
lines = [f"# GPU check: {out}", "", f"torch {torch.__version__}, {machine}; training "
         f"{trained} s, all runs side by side; evaluation {evaluated} s, three at a time",
         "", "| run | epochs | training (s) |", "| --- | --- | --- |"]
for path in sorted(glob.glob(os.path.join(out, "runs", "*", cli.RESULTS))):
    res = json.load(open(path))
    lines.append(f"| {os.path.basename(os.path.dirname(path))} | {res['epochs']} | "
                 f"{res['train_seconds']:.1f} |")
summary = open(os.path.join(out, "runs", "summary.md"), encoding="utf-8").read()
text = "\n".join(lines + ["", summary, f"tests: {tests}"]) + "\n"
open(os.path.join(out, "gpu_check.md"), "w", encoding="utf-8").write(text)
print(text, end="")
PY
}

# ---------------------------------------------------------------------------------------
# The protocol as a list of jobs. Each job is one line, `run_all.sh --job OUT FLAGS...
# [--evaluate FLAGS...]`: train OUT with mim.py's FLAGS unless it has finished (resumed
# where it stopped), then, for an evaluation job, evaluate it unless eval.json is newer
# than best.pt. The jobs of one run take the lock OUT.lock in turn, so its training job and
# its evaluation job never both work on it, in whatever order a runner starts them.
# ---------------------------------------------------------------------------------------

job() {
  local out=$1 train=() evaluation=() evaluating=0; shift
  for arg in "$@"; do
    if [[ $arg == --evaluate ]]; then evaluating=1
    elif ((evaluating)); then evaluation+=("$arg")
    else train+=("$arg"); fi
  done
  if [[ -n ${RUN_ALL_SLOT:-} && ${RUN_ALL_GPUS:-0} -gt 0 ]]; then  # xargs' slot: one GPU each
    export CUDA_VISIBLE_DEVICES=$((RUN_ALL_SLOT % RUN_ALL_GPUS))
  fi
  mkdir -p "$(dirname "$out")"
  exec 9>> "$out.lock"
  flock 9
  if [[ ! -f $out/$results_file ]]; then
    local device=() flag
    for flag in "${!train[@]}"; do    # a resumed run keeps its flags, but not its device
      [[ ${train[$flag]} == --device ]] && device=(--device "${train[$((flag + 1))]}")
    done
    if [[ -f $out/$last_file ]]; then set -- --resume "$out" "${device[@]}"
    else set -- "${train[@]}" --out "$out"; fi
    python mim.py "$@" >> "$out.log" 2>&1 \
      || { echo "run_all.sh: training $out failed; see $out.log" >&2; return 1; }
    echo "trained: $out"
  fi
  if ((evaluating)) && [[ ! $out/$eval_file -nt $out/$best_file ]]; then
    python mim.py evaluate "$out" "${evaluation[@]}" > "$out.eval.log" 2>&1 \
      || { echo "run_all.sh: evaluating $out failed; see $out.eval.log" >&2; return 1; }
    echo "evaluated: $out"
  fi
}

protocol() {  # settings of the full or the --quick protocol, as variables
  if ((quick)); then
    seeds="1 2 3"; widths="5 20 500"; nll=100; pca_seeds="1"; pca_dims="2 10 20"
    image_runs="mnist:1 fashion_mnist:1 mnist:2 mnist:3"; image_nll=100
    image_flags="--train-size 5000 --epochs 10 --amp"; image_eval="--test-size 500"
    image_models="convhvae:vamp:mim convhvae:vamp:vae pixelhvae:vamp:amim pixelhvae:vamp:vae"
  else
    seeds="1 2 3 4 5 6 7 8 9 10"; widths="5 20 50 100 200 300 400 500"; nll=1000
    pca_seeds=$seeds; pca_dims="2 4 6 8 10 12 14 16 18 20"
    image_runs=$(for s in $seeds; do echo mnist:$s fashion_mnist:$s omniglot:$s; done)
    image_nll=5000; image_flags="--epochs 2000 --warmup 100"; image_eval=""
    image_models=""
    for arch_loss in convhvae:mim convhvae:vae pixelhvae:amim pixelhvae:vae; do
      for prior in normal vamp; do image_models+=" ${arch_loss%:*}:$prior:${arch_loss#*:}"; done
    done
  fi
  if [[ -n ${RUN_ALL_TINY:-} ]]; then   # the tests' protocol: seconds per job
    tiny_train="--epochs 1 --warmup 1 --patience 1 --train-size 300"; tiny_eval="--test-size 50"
    nll=5; image_nll=5; image_flags="$image_flags --train-size 300 --epochs 1 --warmup 1"
  fi
}

records() {  # every job as OUT|TRAIN FLAGS|EVALUATE FLAGS (empty: no evaluation job)
  local seed h loss mode z run data dir model arch prior eval
  for seed in $seeds; do
    for h in $widths; do for loss in mim vae; do for mode in paper authors; do
      eval=""; [[ $seed == 1 && " 5 20 500 " == *" $h "* ]] && eval="--nll-samples $nll"
      echo "results/fig2-$mode/$loss-h$h-s$seed|--data toy2d --hidden $h --loss $loss" \
           "--warmup-mode $mode --seed $seed --nll-samples $nll|$eval"
    done; done; done
    for loss in mim ce; do
      eval=""; [[ $seed == 1 ]] && eval="--nll-samples $nll"
      echo "results/f2/$loss-s$seed|--data toy1d --z-dim 1 --hidden 10 --activation silu" \
           "--prior mog --q-x mog --loss $loss --patience 20 --seed $seed --nll-samples" \
           "$nll|$eval"
    done
  done
  for seed in $seeds; do  # eval.json adds active units, the ELBO's KL and the minibatch MI
    for loss in vae mim amim infomax critic-self critic-nn critic-hybrid; do
      echo "results/collapse/$loss-s$seed|--data toy20d --z-dim 20 --hidden 50 --loss" \
           "$loss --seed $seed --nll-samples $nll|--nll-samples $nll"
    done
  done
  for seed in $pca_seeds; do for z in $pca_dims; do for loss in mim vae; do
    echo "results/fig3/$loss-z$z-s$seed|--data pca_fashion_mnist --z-dim $z --hidden 50" \
         "--loss $loss --seed $seed --nll-samples $nll|"
  done; done; done
  # Sec. 5.2: MIM (convHVAE) and A-MIM (PixelHVAE, whose sampling is too slow for MIM's
  # decoder samples) against the VAE with the same network, each prior; the tight NLL (AIS
  # from the encoder itself, see RESULTS.md) on seed 1's first test images.
  local ais="--ais-steps 300 --ais-chains 4 --ais-leapfrog 2 --ais-points 10 --ais-inflate 1"
  for run in $image_runs; do
    IFS=: read -r data seed <<< "$run"
    [[ $data == mnist ]] && dir=$data_dir || dir=""   # DATA_DIR holds MNIST's files only
    for model in $image_models; do
      IFS=: read -r arch prior loss <<< "$model"
      echo "results/images/$data-$arch-$prior-$loss-s$seed|--data $data --arch $arch" \
           "--prior $prior --loss $loss --seed $seed $image_flags $dir|--nll-samples" \
           "$image_nll $image_eval $([[ $seed == 1 ]] && echo "$ais")"
    done
  done
}

job_lines() {  # the protocol's jobs as commands: every training, then every evaluation
  local out train evaluation extra=${device:+--device $device} self evaluations=""
  self=$(printf %q "$PWD/run_all.sh")
  {
    while IFS='|' read -r out train evaluation; do
      echo "$self --job $out $train ${tiny_train:-} $extra"
      [[ -z $evaluation ]] || evaluations+="$self --job $out $train ${tiny_train:-} $extra \
--evaluate $evaluation ${tiny_eval:-} $extra"$'\n'
    done < <(records | grep -E -- "${ONLY:-.}")
    printf %s "$evaluations"        # after every training
  } | sed -E 's/ +/ /g; s/ $//'
}

summaries() {  # summary.md (and .png) of every experiment that has finished runs
  local exp x
  for exp in fig2-paper:hidden fig2-authors:hidden f2: fig3:z_dim collapse:loss images:; do
    IFS=: read -r exp x <<< "$exp"
    compgen -G "results/$exp/*/$results_file" > /dev/null || continue
    python mim.py evaluate --summary "results/$exp" ${x:+--x $x} > /dev/null
    echo "summary: results/$exp/summary.md"
  done
}

job_state() {  # job_state LINE: its run folder, its kind (training or evaluation) and
               # its state (finished, running, interrupted or missing)
  local out kind=training state=missing
  read -r _ _ out _ <<< "$1"
  [[ $1 == *" --evaluate "* ]] && kind=evaluation
  if [[ $kind == training && -f $out/$results_file ]] ||
     [[ $kind == evaluation && $out/$eval_file -nt $out/$best_file ]]; then state=finished
  elif [[ -e $out.lock ]] && ! flock -n "$out.lock" true; then state=running
  elif [[ -e $out ]]; then state=interrupted; fi
  echo "$out $kind $state"
}

status() {  # how many jobs of each experiment and kind are in each state
  echo "experiment     job         state        jobs"
  job_lines | while read -r line; do
    read -r out kind state <<< "$(job_state "$line")"
    echo "$(basename "$(dirname "$out")") $kind $state"
  done | sort | uniq -c | awk '{printf "%-14s %-11s %-12s %d\n", $2, $3, $4, $1}'
}

slurm() {  # results/slurm/: the unfinished jobs as sbatch arrays, then a summary job
  local dir=results/slurm line out kind state where
  mkdir -p "$dir/logs"
  rm -f "$dir"/*.jobs
  job_lines | while read -r line; do
    read -r out kind state <<< "$(job_state "$line")"
    [[ $state == finished ]] && continue
    where=cpu; [[ $out == results/images/* ]] && where=gpu
    [[ $kind == evaluation ]] && kind=evaluate || kind=train
    echo "$line" >> "$dir/$where-$kind.jobs"
  done
  write_task "$dir/task.sbatch"
  write_submit "$dir/submit.sh"
  echo "run_all.sh: jobs not finished: $(cat "$dir"/*.jobs 2> /dev/null | wc -l), in $dir/*.jobs;" \
       "submit them with $dir/submit.sh (edit its resources first)"
  if ((submit)); then bash "$dir/submit.sh"; fi
}

write_task() {  # the script of one array task: line SLURM_ARRAY_TASK_ID of a .jobs file
  cat > "$1" <<TASK
#!/usr/bin/env bash
# One task of an array that results/slurm/submit.sh submits: runs line
# \$SLURM_ARRAY_TASK_ID of the .jobs file given as its argument.
set -euo pipefail
cd $(printf %q "$PWD")
eval "\$(sed -n "\${SLURM_ARRAY_TASK_ID}p" "\$1")"
TASK
}

write_submit() {  # the submission script, its resources as variables at its top
  cat > "$1" <<SUBMIT
#!/usr/bin/env bash
# Submits results/slurm/*.jobs as sbatch arrays (training, then evaluation once the
# training array has ended) and a summary job once all have ended. Written by
# run_all.sh --slurm, which lists only the jobs not yet finished: after failures, run it
# again and submit what it writes. Edit the resources below to fit your cluster.
set -euo pipefail
cd $(printf %q "$PWD")
# MLP jobs on the toys and Fashion-MNIST PCA: one core; measured about 10 s (toy2d) to
# 2 min (toy20d, 20-D latent) per run on a CPU core
CPU_SBATCH=\${CPU_SBATCH:-"--cpus-per-task=1 --mem=2G --time=01:00:00"}
# image jobs: one GPU; a convHVAE MIM step of 128 took 38 ms on an H200 (RESULTS.md), so
# about 2.5 h to epoch 500 and 10 h to the cap of 2,000; a job cut by --time resumes
GPU_SBATCH=\${GPU_SBATCH:-"--gres=gpu:1 --cpus-per-task=4 --mem=16G --time=12:00:00"}
SUMMARY_SBATCH=\${SUMMARY_SBATCH:-"--cpus-per-task=1 --mem=2G --time=00:30:00"}
EXTRA_SBATCH=\${EXTRA_SBATCH:-}     # for example --partition=... --account=...
dir=results/slurm ended=""
submit() {  # submit NAME RESOURCES [DEPENDENCY]: one array over dir/NAME.jobs
  local n; n=\$(wc -l < "\$dir/\$1.jobs")
  sbatch --parsable --job-name="mim-\$1" --array=1-"\$n" \$2 \$EXTRA_SBATCH \\
    --output="\$dir/logs/%x-%A_%a.out" \${3:+--dependency=afterany:\$3} \\
    "\$dir/task.sbatch" "\$dir/\$1.jobs"
}
for kind in cpu gpu; do
  resources=CPU_SBATCH; [[ \$kind == gpu ]] && resources=GPU_SBATCH
  train=""
  if [[ -s \$dir/\$kind-train.jobs ]]; then
    train=\$(submit "\$kind-train" "\${!resources}"); ended+=":\$train"
    echo "submitted \$kind-train: job \$train"
  fi
  if [[ -s \$dir/\$kind-evaluate.jobs ]]; then
    id=\$(submit "\$kind-evaluate" "\${!resources}" "\$train"); ended+=":\$id"
    echo "submitted \$kind-evaluate: job \$id"
  fi
done
id=\$(sbatch --parsable --job-name=mim-summaries \$SUMMARY_SBATCH \$EXTRA_SBATCH \\
  --output="\$dir/logs/%x-%j.out" \${ended:+--dependency=afterany\$ended} \\
  --wrap="./run_all.sh --summaries")
echo "submitted summaries: job \$id"
SUBMIT
}

check_device() {  # refuse in one line before any job starts
  [[ -z $device ]] && return 0
  RUN_ALL_GPUS=$(python - "$device" <<'PY'
import sys, torch, cli
try:
    cli.choose_device(sys.argv[1])
except cli.UsageError as e:
    print(f"run_all.sh: error: {e}", file=sys.stderr)
    sys.exit(2)
print(torch.cuda.device_count() if sys.argv[1] != "cpu" else 0)
PY
) || exit 2
  export RUN_ALL_GPUS
}

run_locally() {  # JOBS jobs at a time: per GPU with --device cuda, else over the cores
  local cores parallel threads
  cores=$(nproc)
  if [[ ${RUN_ALL_GPUS:-0} -gt 0 ]]; then
    parallel=$(( ${JOBS:-1} * RUN_ALL_GPUS )); threads=$(( cores / parallel ))
  else
    parallel=${JOBS:-$cores}; threads=$(( cores / parallel ))
  fi
  job_lines | OMP_NUM_THREADS=$(( threads > 0 ? threads : 1 )) \
    xargs -d '\n' -P "$parallel" --process-slot-var=RUN_ALL_SLOT -n 1 bash -c 'eval "$1"' job
  summaries
}

quick=0 action=run device="" submit=0
while (($#)); do
  case $1 in
    --gpu-check) gpu_check; exit ;;
    --job) shift; job "$@"; exit ;;
    --quick) quick=1 ;;
    --list|--status|--summaries|--slurm) action=${1#--} ;;
    --submit) submit=1 ;;
    --device) device=${2:-}; shift
              [[ $device =~ ^(cpu|cuda|auto)$ ]] || {
                echo "run_all.sh: error: --device takes cpu, cuda or auto, not '$device'" >&2
                exit 2; } ;;
    *) echo "run_all.sh: error: unknown option '$1' (use --quick, --list, --status," \
            "--summaries, --slurm [--submit], --device DEVICE, --gpu-check)" >&2
       exit 2 ;;
  esac
  shift
done
data_dir=${DATA_DIR:+--data-dir $DATA_DIR}
protocol
case $action in
  list) check_device; job_lines ;;
  status) status ;;
  summaries) summaries ;;
  slurm) check_device; slurm ;;
  run) check_device; run_locally
       echo "tables: results/*/summary.md; figures: results/*/summary.png and the run folders" ;;
esac
