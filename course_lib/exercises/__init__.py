"""Exercises a learner does, checked by real runs: ``check()``, ``hint()``, ``solution()``.

Each chapter's module holds its exercises (``from course_lib.exercises import ch1``; then
``ch1.gradient.check(my_gradient)``), each with the stub the learner starts from, the course's
solution, and the typical wrong answers the check recognises. The companion notebooks
``notebooks/exercises/NN_*.ipynb`` pose them.

Modules:
- ``core``: an exercise and its check (the learner's function run in a fresh process, or on 2
  ranks under ``mpirun``), the one-line verdict
- ``harness``: one rank of a check (started by ``core``)
- ``ch1``, ``ch2``, ``ch3``, ``ch4``, ``ch5``, ``ch6``: the exercises of each chapter
"""

from course_lib.exercises.core import Exercise, Verdict

__all__ = ["Exercise", "Verdict"]
