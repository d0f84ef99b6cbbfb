#!/usr/bin/env python
"""Runs a sweep of the paper's experiments: a grid over the recipe's axes (text checkpoint %,
image-token ratio, instruction data, fine-tuning epochs, encoder, projector, scale) expanded
into stage runs that share what they can, run in dependency order, collected into one table.

    python tools/sweep.py examples/sweeps/fig4_checkpoint_pct_tiny_cpu.yaml     # run it here
    python tools/sweep.py examples/sweeps/fig4_checkpoint_pct_1b.yaml --dry-run # plan, GPU-hours
    python tools/sweep.py examples/sweeps/fig8_finetune_epochs_1b.yaml --nproc 8   # one GPU node
    python tools/sweep.py examples/sweeps/fig4_checkpoint_pct_1b.yaml --slurm slurm/fig4
    bash slurm/fig4/submit.sh                         # jobs chained with --dependency=afterok
    python tools/sweep.py SWEEP.yaml --collect        # only rebuild the results table
    python tools/sweep.py examples/sweeps/seed_ablations_tiny_cpu.yaml --only encoder=frozen
    python tools/sweep.py examples/sweeps/seed_ablations_tiny_cpu.yaml \\
        --compare ckpt80_encfrozen_projmlp2_ft4        # every arm against this one, paired

Run it from the repository root: paths inside the stage configs and the sweep's output_root
are relative to the working directory. Each run is a subprocess of pretrain_vlm.py,
finetune_vlm.py or tools/evaluate_vlm.py with the stage's YAML and key=value overrides; its
output goes to OUTPUT_ROOT/logs/<run>.log, the console gets one line per run (start, done or
skipped, with seconds). Runs whose results exist are skipped and interrupted ones resume, so a
rerun finishes what is left; a failed run stops the sweep with one line naming it and its log.
Every run that completes records what it was run with (OUTPUT_ROOT/<stage>/<run>/sweep_stage.json:
its whole resolved config, or its command). A finished run whose config the sweep now resolves
differently (an edited stage YAML, override or axis), or that started from a run which ran again,
stops the sweep before anything runs, with one line naming the runs and the changed settings;
--rerun-changed moves their directories aside (<dir>.replaced-<time>) and runs them again.
Ctrl-C or SIGTERM stops the running child and every process it started. At the end (and with
--collect) every evaluation goes into OUTPUT_ROOT/results.csv and results.md, one row per grid
point; tools/plot_results.py draws the paper's figures from the CSV. --compare RUN compares
every evaluated grid point with the one named RUN (a paired test per task and stable score,
Holm-adjusted over all of them) into OUTPUT_ROOT/comparison.md, .json and .png. The sweep file
format is in docs/experiments.md.
"""

from megatron_vlm.logs import configure_logging  # noqa: I001  (first, before other imports)

import argparse
import json
import sys
from pathlib import Path

from megatron_vlm.cli import run_main

PROG = "sweep"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tools/sweep.py", description=__doc__.split("\n\n")[0],
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", help="the sweep file (YAML; format in docs/experiments.md)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true",
                      help="print the plan (runs in dependency order, shared stages, commands, "
                           "which runs are done) and the GPU-hours estimate; run nothing. "
                           "Every command is parsed by its tool's own parser first (also "
                           "before a run or --slurm)")
    mode.add_argument("--slurm", metavar="DIR",
                      help="write one SLURM job script per run not done yet and DIR/submit.sh, "
                           "which submits them with sbatch --dependency=afterok; run nothing")
    mode.add_argument("--collect", action="store_true",
                      help="only collect the existing evaluations into OUTPUT_ROOT/results.csv "
                           "and results.md")
    mode.add_argument("--compare", metavar="RUN",
                      help="only compare every evaluated grid point with grid point RUN (its "
                           "name, the run column of results.csv): B - A with a paired bootstrap "
                           "95%% interval and a p-value per task and stable score, Holm-adjusted "
                           "over all; writes OUTPUT_ROOT/comparison.md, .json and .png")
    parser.add_argument("--nproc", type=int, default=1,
                        help="processes per run here: 1 runs python SCRIPT (CPU, or one GPU); N "
                             "runs torchrun --standalone --nproc_per_node N (a GPU node)")
    parser.add_argument("--only", action="append", default=[], metavar="AXIS=V[,V...]",
                        help="run only the grid points with these values (repeatable; values as "
                             "in the grid or as run-name tags, e.g. projector=linear, "
                             "text_checkpoint=80); the table still covers the whole grid")
    parser.add_argument("--rerun-changed", action="store_true",
                        help="finished runs whose settings changed since they ran (and the runs "
                             "started from them) are moved aside to <dir>.replaced-<time> and run "
                             "again; without it such runs stop the sweep with one line naming "
                             "them and the changed settings")
    parser.add_argument("--json", action="store_true",
                        help="with --dry-run: print the plan as one JSON object")
    parser.add_argument("--grace", type=float, default=10.0, metavar="SECONDS",
                        help="on Ctrl-C/SIGTERM, seconds the running child gets to stop after "
                             "SIGTERM before SIGKILL (default 10)")
    return parser


def main(argv=None) -> int:
    configure_logging()
    from megatron_vlm.experiments.execute import (
        Interrupted,
        LocalRunner,
        StageFailed,
        check_commands,
        stage_done,
        write_slurm,
    )
    from megatron_vlm.experiments.plan import build_plan, parse_only
    from megatron_vlm.experiments.results_table import collect, write_tables
    from megatron_vlm.experiments.stage_records import check_records, move_aside, stale_message
    from megatron_vlm.experiments.sweep_spec import load_sweep
    from megatron_vlm.evaluation.statistics import RESAMPLES, SEED

    args = build_parser().parse_args(argv)
    if args.json and not args.dry_run:
        raise ValueError("--json goes with --dry-run")
    spec = load_sweep(args.sweep)
    full = build_plan(spec)
    only = parse_only(args.only, spec)
    plan = build_plan(spec, only) if only else full
    if not plan.points:
        raise ValueError(f"--only {' '.join(args.only)} leaves no grid point")
    if args.compare:
        from megatron_vlm.experiments.sweep_compare import compare_sweep

        files, skipped = compare_sweep(full, args.compare, RESAMPLES, SEED)
        left_out = f" (not evaluated yet: {', '.join(skipped)})" if skipped else ""
        print(f"comparison with {args.compare}: {', '.join(map(str, files))}{left_out}")
        return 0
    if not args.collect:
        check_commands(plan)  # a command its tool would refuse stops the sweep before it starts

    stale, _ = check_records(plan, stage_done) if not args.collect else ({}, [])

    def status(run):
        done = stage_done(run)
        if done and run.id in stale:
            return f"{done}, but it ran with other settings ({stale[run.id]}): " + \
                ("runs again with --rerun-changed" if not args.rerun_changed else "runs again")
        return done

    if args.dry_run:
        if args.json:
            out = plan.to_dict()
            for entry, run in zip(out["runs"], plan.runs):
                entry["done"] = status(run)
            print(json.dumps(out, indent=1))
        else:
            print(plan.describe(status))
        return 0
    if stale and not args.rerun_changed:
        raise ValueError(stale_message(plan, stale))
    for old, new in move_aside(plan, stale):
        print(f"sweep {spec.name}: moved {old} aside to {new} (it ran with other settings)",
              flush=True)
    if args.slurm:
        files = write_slurm(plan, Path(args.slurm))
        print(f"sweep {spec.name}: {len(files) - 1} job scripts and {files[-1]} "
              f"(submit with: bash {files[-1]})")
        return 0
    if not args.collect:
        try:
            LocalRunner(plan, nproc=args.nproc, grace=args.grace).run()
        except StageFailed as err:
            print(f"{PROG}: error: {err}", file=sys.stderr, flush=True)
            return 1
        except Interrupted as err:
            where = f" during {err.run.id}: stopped it and every process it started (log: " \
                    f"{err.run.log})" if err.run else ""
            print(f"{PROG}: interrupted by {err}{where}; run the same command again to resume",
                  file=sys.stderr, flush=True)
            return 128 + err.signum
    table = collect(full)
    csv_path, md_path = write_tables(table, spec.output_root)
    ok = sum(1 for row in table.rows if row["status"] == "ok")
    print(f"results: {csv_path} and {md_path} ({ok} of {len(table.rows)} grid points evaluated)")
    return 0


if __name__ == "__main__":
    run_main(main, PROG)
