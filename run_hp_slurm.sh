#!/bin/bash
#SBATCH --nodes=1
#SBATCH --gres=gpu:1
#SBATCH --ntasks-per-node=6
#SBATCH --mem=12000M
#SBATCH --time=6-00:00:00
#SBATCH --job-name=hp_search
#SBATCH --wait

# One trial of the Slurm hyperparameter search. hp_search_slurm.py runs
# `sbatch run_hp_slurm.sh <27 values>`; --wait keeps sbatch waiting until the trial ends, and its
# exit status is the trial's. The values arrive as $1..$27 in the order of the original search
# script; the trial reports its objective through the file named by --out-file.
# E2E_PYTHON picks the interpreter (default: python on the PATH of the job).

if [ -n "${SLURM_SUBMIT_DIR:-}" ]; then
	cd "${SLURM_SUBMIT_DIR}" || exit 1
fi

exec "${E2E_PYTHON:-python}" train_hp.py \
	--lr "${1}" \
	--l2 "${2}" \
	--momentum "${3}" \
	--smoothing "${4}" \
	--warmup "${5}" \
	--latent-size "${6}" \
	--n-hidden "${7}" \
	--hidden-size "${8}" \
	--n-frames "${9}" \
	--model "${10}" \
	--ndiscriminators "${11}" \
	--rproj-size "${12}" \
	--ncoef "${13}" \
	--dropout-prob "${14}" \
	--epochs "${15}" \
	--batch-size "${16}" \
	--valid-batch-size "${17}" \
	--workers "${18}" \
	--cuda "${19}" \
	--train-hdf-file "${20}" \
	--valid-hdf-file "${21}" \
	--out-file "${22}" \
	--checkpoint-path "${23}" \
	--cp-name "${24}" \
	--softmax "${25}" \
	--max-gnorm "${26}" \
	--logdir "${27}"
