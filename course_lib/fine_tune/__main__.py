"""``python -m course_lib.fine_tune``: switch to the fast BLAS first (before MLX loads, see
:mod:`course_lib.blas`), then run the command line (:mod:`course_lib.fine_tune.cli`)."""

from course_lib.blas import reexec_with_fast_blas

reexec_with_fast_blas()

import sys  # noqa: E402

from course_lib.fine_tune.cli import main  # noqa: E402

sys.exit(main())
