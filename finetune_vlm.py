"""Instruction fine-tuning of a pre-trained VLM (the paper's LLaVA stage).

    torchrun --nproc_per_node 8 finetune_vlm.py examples/1b/finetune.yaml \\
        checkpoint.load=runs/1b-image/checkpoints [key=value ...]

With ``--recipe NAME`` the paper's fine-tuning settings replace the recipe's pre-training
ones: LR 3e-4 with warmup over 5% of the steps then cosine (``schedule.mode=rewarmup``,
``schedule.warmup_fraction=0.05``), AdamW beta2 0.95 (global batch 256 in the GPU recipes). A
YAML file is used as written (examples/*/finetune.yaml set the same values). A checkpoint to start from is required (``checkpoint.load``: a checkpoint or a run
directory, whose latest checkpoint is used); each number of epochs is its own run (set
``train.train_iters`` to epochs x conversations / global batch). Which parts train is logged at
start. ``--help`` lists every config key.
"""

from megatron_vlm.cli import run_training_entry

FINETUNE_DEFAULTS = ["train.lr=3e-4", "train.adam_beta2=0.95", "schedule.mode=rewarmup",
                     "schedule.warmup_fraction=0.05"]

if __name__ == "__main__":
    run_training_entry(__doc__, "finetune_vlm", defaults=FINETUNE_DEFAULTS, require_load=True)
