#!/bin/bash
#$ -cwd
#$ -V
#$ -j y
#$ -S /bin/bash

# One trial of the Grid Engine hyperparameter search, the twin of run_hp_slurm.sh: the search runs
# `qsub -sync y -N <name> run_hp_sge.sh <27 values>`, -sync y waits for the trial and returns its
# exit status. -cwd runs it in the submit folder, -V passes the environment (E2E_PYTHON among it).
# The values arrive as $1..$27 in the order of the original search script.

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
