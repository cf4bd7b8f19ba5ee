#!/usr/bin/env bash
# VoxCeleb speaker verification, in numbered stages (as WeSpeaker's examples/voxceleb/v2/run.sh):
# train on VoxCeleb2 dev, score Vox1-O/E/H, AS-norm with a VoxCeleb2 cohort, calibrate, export, fine-tune.
#
#   bash recipes/voxceleb/run.sh --data /data/voxceleb --exp exp/voxceleb --stage 1 --stop-stage 9
#
# Stages (see recipes/voxceleb/README.md for what each reads and writes):
#   1 lists and trials from <data>/vox1/wav, <data>/vox2/wav and the official lists (local/prepare_lists.py)
#   2 fbank features to HDF5 (data_prep.py): vox2 for training (+ MUSAN / RIR copies), vox1 for scoring
#   3 training (train.py; several processes or nodes: torchrun, or Slurm with --slurm true)
#   4 checkpoint averaging (average_checkpoints.py --last N)
#   5 embeddings of vox1 and vox2 (embed.py on the wav lists; vox2 is the AS-norm cohort)
#   6 cosine, e2e and fused scores of every trial list (eval.py)
#   7 AS-norm with the vox2 cohort (eval.py --cohort)
#   8 calibration on the held-out vox1_dev list (calibrate.py), then eval.py --calibration
#   9 ONNX export (export.py)
#  10 large-margin fine-tuning (train.py --pretrained-path: longer crops, larger margin), then 4-8 into <exp>/lm
# The EER table (local/eer_table.py) is printed after any run that reaches stage 6 or later.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
local_dir="$root/recipes/voxceleb/local"
PYTHON=${PYTHON:-python}

stage=1
stop_stage=10
data=""
trials_dir=""
exp=exp/voxceleb
model=ResNet34
softmax=aam_softmax
margin=0.2
scale=32
epochs=150
batch_size=26         # speakers per batch, 5 utterances each (--samples-per-class)
n_frames=200
lr=1.5                # Noam schedule: a scale, peak lr / sqrt(warmup)
warmup=2000
num_mel_bins=80
musan=""              # folder of noise wav files (e.g. musan/), searched recursively
rir=""                # folder of room impulse responses (e.g. RIRS_NOISES/simulated_rirs)
augment_copies=1
avg_num=10
cohort_top_n=300
p_target=0.01
nodes=1
nproc_per_node=1
rdzv_endpoint=localhost:29400
rdzv_id=voxceleb
slurm=false
workers=4
device=""
seed=1
train_args=""         # more train.py flags, split on spaces, e.g. "--latent-size 64 --hidden-size 64"
ft_epochs=5
ft_margin=0.5
ft_n_frames=600
ft_lr=0.15
ft_avg_num=2

usage="usage: run.sh [--data DIR] [--exp DIR] [--stage N] [--stop-stage M] [--model NAME] [--epochs N] ... (see the header)"
die() {
  echo "run.sh: error: $*" >&2
  exit 2
}

while [ $# -gt 0 ]; do
  case "$1" in
    -h | --help) sed -n '2,18p' "${BASH_SOURCE[0]}"; echo "$usage"; exit 0 ;;
    --*)
      [ $# -ge 2 ] || die "$1 needs a value"
      name=${1#--}
      name=${name//-/_}
      case "$name" in
        stage | stop_stage | data | trials_dir | exp | model | softmax | margin | scale | epochs | batch_size | \
          n_frames | lr | warmup | num_mel_bins | musan | rir | augment_copies | avg_num | cohort_top_n | p_target | \
          nodes | nproc_per_node | rdzv_endpoint | rdzv_id | slurm | workers | device | seed | train_args | \
          ft_epochs | ft_margin | ft_n_frames | ft_lr | ft_avg_num) printf -v "$name" '%s' "$2" ;;
        *) die "unknown option $1" ;;
      esac
      shift 2
      ;;
    *) die "unexpected argument $1 ($usage)" ;;
  esac
done

for pair in "--stage:$stage" "--stop-stage:$stop_stage"; do
  flag=${pair%%:*}
  value=${pair#*:}
  [[ "$value" =~ ^[0-9]+$ ]] && [ "$value" -ge 1 ] && [ "$value" -le 10 ] || die "$flag must be a stage 1..10, got '$value'"
done
[ "$stage" -le "$stop_stage" ] || die "--stage $stage is after --stop-stage $stop_stage"
case "$slurm" in true | false) ;; *) die "--slurm must be true or false, got '$slurm'" ;; esac
for pair in "--nodes:$nodes" "--nproc-per-node:$nproc_per_node"; do
  [[ "${pair#*:}" =~ ^[1-9][0-9]*$ ]] || die "${pair%%:*} must be a positive integer, got '${pair#*:}'"
done
if [ "$stage" -le 1 ]; then
  [ -n "$data" ] || die "stage 1 needs --data (a VoxCeleb folder holding vox1/wav and vox2/wav)"
fi
[ -n "$trials_dir" ] || trials_dir="$data/vox1"

case "$exp" in /*) ;; *) exp=$PWD/$exp ;; esac  # absolute, for the Slurm job (started in the repository root)
case "$PYTHON" in /*) ;; */*) PYTHON=$PWD/$PYTHON ;; esac  # a relative path, made absolute; a bare name stays
lists=$exp/data
feats=$exp/feats
device_flags=()
[ -z "$device" ] || device_flags=(--device "$device")
read -r -a extra_train <<<"$train_args"

# train.py on one process, under torchrun (several processes or nodes: run the same command on every node),
# or as a Slurm job (run_train_slurm.sh; sbatch --wait, so the next stages follow when it ends).
launch_train() {
  if [ "$slurm" = true ]; then  # the script runs from the repository root: every path here is absolute
    (cd "$root" && E2E_PYTHON="$PYTHON" E2E_NPROC_PER_NODE="$nproc_per_node" E2E_NNODES="$nodes" \
      sbatch --wait --nodes "$nodes" run_train_slurm.sh "$@")
  elif [ "$nodes" -gt 1 ] || [ "$nproc_per_node" -gt 1 ]; then
    "$PYTHON" -m torch.distributed.run --nnodes "$nodes" --nproc-per-node "$nproc_per_node" \
      --rdzv-backend c10d --rdzv-endpoint "$rdzv_endpoint" --rdzv-id "$rdzv_id" "$root/train.py" "$@"
  else
    "$PYTHON" "$root/train.py" "$@"
  fi
}

# the train.py flags shared by stage 3 and stage 10
train_flags=(--train-hdf-file "$feats/vox2_train.hdf" --model "$model" --ncoef "$num_mel_bins" --batch-size "$batch_size"
  --softmax "$softmax" --scale "$scale" --warmup "$warmup" --workers "$workers" --seed "$seed" "${device_flags[@]}")

# Stages 4-8 for the model trained into $1/cp (averaged to $1/avg_model.pt, scores in $1/scores).
back_end() {
  local dir=$1 from=$2 to=$3 n_avg=$4
  local avg=$dir/avg_model.pt scores=$dir/scores emb=$dir/embeddings
  local cohort=(--cohort "$emb/vox2/embeddings.h5" --cohort-top-n "$cohort_top_n")
  if [ "$from" -le 4 ] && [ "$to" -ge 4 ]; then
    echo "stage 4: average the last $n_avg checkpoints of $dir/cp"
    "$PYTHON" "$root/average_checkpoints.py" --checkpoint-path "$dir/cp" --last "$n_avg" --out "$avg"
  fi
  if [ "$from" -le 5 ] && [ "$to" -ge 5 ]; then
    echo "stage 5: embeddings of vox1 and vox2"
    for set in vox1 vox2; do
      "$PYTHON" "$root/embed.py" --wav-scp "$lists/$set/wav.scp" --cp-path "$avg" --out-path "$emb/$set" \
        "${device_flags[@]}"
    done
  fi
  [ "$to" -lt 6 ] || mkdir -p "$scores"
  local eval=("$PYTHON" "$root/eval.py" --test-data "$feats/vox1.hdf" --cp-path "$avg" "${device_flags[@]}")
  if [ "$from" -le 6 ] && [ "$to" -ge 6 ]; then
    echo "stage 6: cosine, e2e and fused scores of every trial list"
    "${eval[@]}" --trials-path "$lists/trials/vox1_all" --out-path "$scores/vox1_all.score"
  fi
  if [ "$from" -le 7 ] && [ "$to" -ge 7 ]; then
    echo "stage 7: AS-norm (top $cohort_top_n) with the vox2 cohort"
    "${eval[@]}" --trials-path "$lists/trials/vox1_all" "${cohort[@]}" --out-path "$scores/vox1_all.asnorm.score"
  fi
  if [ "$from" -le 8 ] && [ "$to" -ge 8 ]; then
    echo "stage 8: calibration on vox1_dev, applied to every list"
    "${eval[@]}" --trials-path "$lists/trials/vox1_dev" "${cohort[@]}" --out-path "$scores/vox1_dev.asnorm.score"
    "$PYTHON" "$root/calibrate.py" --scores "$scores/vox1_dev.asnorm.score" --out "$dir/calibration.json" \
      --p-target "$p_target"
    "${eval[@]}" --trials-path "$lists/trials/vox1_all" "${cohort[@]}" --calibration "$dir/calibration.json" \
      --out-path "$scores/vox1_all.calibrated.score"
  fi
}

if [ "$stage" -le 1 ] && [ "$stop_stage" -ge 1 ]; then
  echo "stage 1: lists and trials from $data"
  "$PYTHON" "$local_dir/prepare_lists.py" --data "$data" --trials-dir "$trials_dir" --out "$lists"
fi

if [ "$stage" -le 2 ] && [ "$stop_stage" -ge 2 ]; then
  echo "stage 2: fbank features ($num_mel_bins bins)"
  augment=()
  [ -z "$musan" ] || augment+=(--noise-dir "$musan")
  [ -z "$rir" ] || augment+=(--rir-dir "$rir")
  [ ${#augment[@]} -eq 0 ] || augment+=(--augment-copies "$augment_copies" --seed "$seed")
  fbank=(--feature fbank --num-mel-bins "$num_mel_bins" --out-path "$feats")
  "$PYTHON" "$root/data_prep.py" --wav-scp "$lists/vox2/wav.scp" "${fbank[@]}" --out-name vox2_train.hdf \
    "${augment[@]}"
  "$PYTHON" "$root/data_prep.py" --wav-scp "$lists/vox1/wav.scp" "${fbank[@]}" --out-name vox1.hdf
fi

if [ "$stage" -le 3 ] && [ "$stop_stage" -ge 3 ]; then
  echo "stage 3: train $model on vox2 ($nodes node(s) x $nproc_per_node process(es))"
  launch_train "${train_flags[@]}" --checkpoint-path "$exp/cp" --epochs "$epochs" --n-frames "$n_frames" \
    --margin "$margin" --lr "$lr" "${extra_train[@]}"
fi

if [ "$stop_stage" -ge 4 ] && [ "$stage" -le 8 ]; then
  back_end "$exp" "$stage" "$stop_stage" "$avg_num"
fi

if [ "$stage" -le 9 ] && [ "$stop_stage" -ge 9 ]; then
  echo "stage 9: ONNX export"
  "$PYTHON" "$root/export.py" --cp-path "$exp/avg_model.pt" --out "$exp/onnx" --force "${device_flags[@]}"
fi

if [ "$stage" -le 10 ] && [ "$stop_stage" -ge 10 ]; then
  echo "stage 10: large-margin fine-tuning (margin $ft_margin, $ft_n_frames frames, $ft_epochs epochs)"
  launch_train "${train_flags[@]}" --pretrained-path "$exp/avg_model.pt" --checkpoint-path "$exp/lm/cp" \
    --epochs "$ft_epochs" --n-frames "$ft_n_frames" --margin "$ft_margin" --lr "$ft_lr" "${extra_train[@]}"
  back_end "$exp/lm" 4 8 "$ft_avg_num"
fi

if [ "$stop_stage" -ge 6 ]; then
  "$PYTHON" "$local_dir/eer_table.py" --exp "$exp"
fi
