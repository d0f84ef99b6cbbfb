"""The wheelhouse builder (tools/wheelhouse.py) and the staged GPU check (tools/gpu_check.py).

Standard library only, in every module: the check runs on a bare GPU machine before anything is
installed, from ``sys.path.insert(0, repo_root)``. One idea per module:

* ``manifest``  the wheelhouse's manifest.json: groups, parts, batches; verifying and joining.
* ``planner``   which batch (copy) each file goes to, and the working tree's size.
* ``resolve``   pip's resolution for the target machine, the closure of each group, downloads.
* ``build``     ``make wheelhouse``: resolve, download, lay out, print the copy plan.
* ``proctree``  the processes under a process (from /proc), and stopping them.
* ``children``  running one command: parent-death signal, time limit, log capped to its tail.
* ``guardian``  the helper process that ends the check's commands if the check is SIGKILLed.
* ``summary``   summary.json (rewritten after every step), JUnit and throughput rows, the table.
* ``stages``    the stages, their budgets and the ``--dry-run`` plan.
* ``install``   the check's environment: virtual environment, offline pip, Transformer Engine.
* ``check``     the check's command line and the stage runner.
* ``pytest_te`` a pytest plugin that selects or leaves out the Transformer Engine tests.
"""
