#!/usr/bin/env bash
# The paper's recipe at 1.4B on one node with torchrun, stage by stage (README.md):
#
#   text                  text-only pre-training, checkpoints at x% of its schedule
#   image_text            image-text continued pre-training from the text run's checkpoint
#   image_text_rewarmup   image-text from the 100% checkpoint, LR re-warmed
#   image_text_scratch    image-text with no text pre-training (0%), same re-warmup
#   finetune              instruction fine-tuning (LLaVA-1.5 665K), 1 epoch, from image_text
#   ablation_projector_linear[_finetune], ablation_unfrozen_encoder[_finetune]
#                         the ablations (README.md: their status)
#
# Usage (from anywhere; the data must be prepared first, README.md):
#   bash examples/1b/run.sh                                   # STAGES: text image_text finetune
#   STAGES="image_text_rewarmup finetune" bash examples/1b/run.sh
#   NPROC=4 bash examples/1b/run.sh train.micro_batch_size=2  # overrides go to every stage
# A stage that was interrupted, or that already finished, resumes from its latest checkpoint
# when run again. For several nodes use slurm.sbatch.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."   # the repository root: run directories are relative to it

NPROC=${NPROC:-8}
STAGES=${STAGES:-"text image_text finetune"}

source examples/stages.sh
run_training_stages 1b "$@"
