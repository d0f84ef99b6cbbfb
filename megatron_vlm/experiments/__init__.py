"""Sweeps of the paper's experiments: a grid over the recipe's axes, expanded into stage runs
that share what they can, run in dependency order (locally or as SLURM jobs), and collected
into one results table and the paper's figures.

* :mod:`.sweep_spec`: the sweep file (dataclasses, checks, the axes);
* :mod:`.plan`: grid -> stage runs (shared stages, dependency order, GPU-hours estimate);
* :mod:`.execute`: the local runner (subprocesses, logs, skip/resume, clean interrupt) and the
  SLURM writer;
* :mod:`.results_table`: every evaluation's results.json -> one CSV + markdown table;
* :mod:`.plots`: the paper's figure types from that table;
* :mod:`.sweep_compare`: every arm against a baseline arm, paired (``tools/sweep.py --compare``);
* :mod:`.lineage_tree`, :mod:`.lineage_graph`: the tree of runs, branches and evaluations under
  a directory, read from the checkpoints' lineage records, as text and as a picture
  (``tools/lineage.py``).

Entry points: ``tools/sweep.py`` and ``tools/plot_results.py`` (docs/experiments.md).
"""
