"""Pre-training of the VLM: text-only, or image-text continued from a text run's checkpoint.

    torchrun --nproc_per_node 8 pretrain_vlm.py examples/1b/text.yaml [key=value ...]
    python pretrain_vlm.py --recipe tiny data.kind=random train.train_iters=50 \\
        checkpoint.save_fractions=[0.2,0.4,0.6,0.8,1.0]
    python pretrain_vlm.py --recipe tiny checkpoint.load=runs/text/checkpoints/step_0000040 \\
        schedule.mode=continue ...

The data mix is ``data.ratios`` (text only, or text + captions [+ instructions]); the LR
schedule is ``schedule.mode`` (from_scratch, continue, rewarmup) and is logged at start;
checkpoints land in OUTPUT_DIR/checkpoints at ``checkpoint.save_fractions`` of the schedule
and every ``checkpoint.save_interval`` steps; a rerun of the same command resumes from the
latest one. ``--help`` lists every config key.
"""

from megatron_vlm.cli import run_training_entry

if __name__ == "__main__":
    run_training_entry(__doc__, "pretrain_vlm")
