"""course_lib.allocator: MLX's freed arrays are reused, not faulted in again from fresh pages."""

import json
import os
import sys

import pytest
from conftest import PY, run

# Allocate and free a 256 MB MLX array five times; count the page faults of rounds 2-5.
ROUNDS = """
import json, resource
import mlx.core as mx
from course_lib import allocator
applied = allocator.keep_freed_memory()
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = mx.zeros((64 * 1024 * 1024,)) + 1.0
    mx.eval(a)
    del a
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _rounds(**env_overrides) -> dict:
    env = {**os.environ, **env_overrides}
    proc = run([PY, "-c", ROUNDS], env=env, timeout=300)
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_freed_arrays_are_reused_instead_of_faulted_in_again():
    kept = _rounds()
    default = _rounds(COURSE_LIB_KEEP_FREED_MEMORY="0")
    assert kept["applied"] and not default["applied"]
    pages = 256 * 1024 * 1024 // 4096
    # glibc's defaults: every round maps and faults in the array's pages afresh (the
    # addition's result too, so at least one array's worth); kept: the first round's
    # pages are reused.
    assert min(default["faults"][1:]) > pages // 2, default
    assert max(kept["faults"][1:]) < pages // 20, kept
