"""``python -m course_lib.fine_tune``: switch to the fast BLAS first (before MLX loads, see
:mod:`course_lib.blas`), then run the command line (:mod:`course_lib.fine_tune.cli`).

A Ctrl-C that ``scripts/mpirun.sh`` relays (SIGUSR1) is a ``KeyboardInterrupt`` from the
first line on (:func:`course_lib.mpi.handle_relayed_signals`), also while the imports run."""

import sys

from course_lib.mpi import handle_relayed_signals  # light: no MLX

handle_relayed_signals()

try:
    from course_lib.blas import reexec_with_fast_blas

    reexec_with_fast_blas()

    from course_lib.fine_tune.cli import main
except KeyboardInterrupt:
    print("Interrupted before training started; nothing to save.", file=sys.stderr, flush=True)
    sys.exit(130)

sys.exit(main())
