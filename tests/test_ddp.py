import json
import sys

import pytest

from conftest import TINY, logged_losses, run


@pytest.mark.slow
def test_two_ranks_differ_in_data_agree_in_weights(tmp_path):
    p = run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'tests/ddp_probe.py',
             str(tmp_path), *TINY, '--max_iters=4', f'--out_dir={tmp_path}'])
    r0, r1 = (json.load(open(tmp_path / f'probe{r}.json')) for r in (0, 1))
    assert len(r0['weights']) == 4
    assert all(a != b for a, b in zip(r0['captions'], r1['captions']))  # each rank draws its own samples
    assert r0['weights'] == r1['weights']  # yet holds the same weights after every step
    assert r0['weights'][0] != r0['weights'][-1]
    logged = logged_losses(p.stdout)
    for step in range(1, 5):
        assert logged[step] == pytest.approx((r0['loss'][step - 1] + r1['loss'][step - 1]) / 2, abs=1e-4)
    assert 'global batch 16' in p.stdout and p.stdout.count('parameters') == 1  # only rank 0 prints
    # gloo's worker threads must not be running as the interpreter shuts down: one that still needs the GIL there
    # aborts the finished run (SIGABRT at exit: CI's run of 8c3cb82)
    assert 'pt_gloo_runloop' not in p.stdout
