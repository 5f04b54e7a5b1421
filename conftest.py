"""Loaded by pytest before the notebooks' and the tests' own conftest files, whatever is run.

OpenMP's idle threads sleep rather than spin, in the test processes and in the notebook kernels they
start (set before anything imports torch): with two test processes on two cores (pyproject.toml), a
thread spinning while it waits for work takes the core from the other process. Results do not depend
on it, only the time; a value set by the caller is kept.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
