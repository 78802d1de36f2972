"""The process set-up the top-level scripts share (oasis_jax/cli.py)."""
import sys

import pytest

# Frees and allocates a 64 MiB array after cli.keep_freed_memory(), counting the page faults of the later ones.
_REALLOCATE = '''
import resource
from oasis_jax import cli
applied = cli.keep_freed_memory()
import numpy as np
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2):
  np.ones(1 << 24, np.float32)   # 64 MiB, written, then freed
before = faults()
for _ in range(3):
  np.ones(1 << 24, np.float32)
print(applied, faults() - before)
'''


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc options')
def test_keep_freed_memory_serves_a_freed_buffer_again_without_mapping_new_pages(run_cli):
  """A 64 MiB buffer allocated again after one was freed comes from the memory already mapped: no page faults. With
  glibc's defaults each is mapped afresh (about 1600 faults for the three here, with transparent huge pages on
  request; 16384 each without), as XLA:CPU's per-call buffers are in the evaluation (docs/performance.md)."""
  applied, faults = run_cli('-c', _REALLOCATE).stdout.split()
  assert applied == 'True'
  assert int(faults) < 16, f'{faults} page faults in allocating a freed 64 MiB buffer again, three times'
