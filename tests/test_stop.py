"""A signal (SIGTERM: a scheduler's preemption; SIGINT: Ctrl-C) stops train.py at the end of a step with a checkpoint
of that step, from which --init_from=resume goes on exactly as if nothing had happened."""
import signal
import sys

import pytest
import torch

from conftest import TINY, interrupt, logged_losses, run

TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']


def checkpoint_step(out):
    return torch.load(out / 'ckpt.pt', weights_only=True)['step']


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT], ids=['SIGTERM', 'SIGINT'])
def test_a_signal_checkpoints_the_step_and_the_resume_is_exact(tmp_path, sig):
    args = [sys.executable, 'train.py', *TINY, '--ckpt_interval=1000']  # no checkpoint but the signal's
    status, printed = interrupt(args + [f"--out_dir={tmp_path / 'a'}", '--max_iters=1000'], after_step=3, sig=sig)
    stopped = max(logged_losses(printed))
    assert status == 128 + sig, printed[-2000:]  # a shell's status for a run a signal ended: `&&` goes no further
    assert f'stopped at step {stopped} by {sig.name}' in printed.splitlines()[-1]
    assert checkpoint_step(tmp_path / 'a') == stopped >= 3  # the step it stopped at, nothing lost
    if sig == signal.SIGINT:  # the same mechanism: the resume is proved once
        return
    resumed = logged_losses(run(args + [f"--out_dir={tmp_path / 'a'}", f'--max_iters={stopped + 2}',
                                        '--init_from=resume']).stdout)
    full = logged_losses(run(args + [f"--out_dir={tmp_path / 'b'}", f'--max_iters={stopped + 2}']).stdout)
    assert sorted(resumed) == [stopped + 1, stopped + 2]
    assert all(resumed[s] == full[s] for s in resumed), (resumed, full)


def rank_pid(torchrun, rank):
    """The pid of the worker torchrun started for `rank`."""
    children = open(f'/proc/{torchrun.pid}/task/{torchrun.pid}/children').read().split()
    return next(int(c) for c in children if f'RANK={rank}' in open(f'/proc/{c}/environ').read().split('\0'))


@pytest.mark.slow
def test_ranks_stop_together_when_one_is_signalled(tmp_path):
    # SIGTERM to rank 1 alone: rank 0 learns of it at the next log step, where both checkpoint and stop. Were they to
    # stop at different steps, the checkpoint's collectives would hang them both
    args = TORCHRUN + ['train.py', *TINY, '--log_interval=3', '--ckpt_interval=1000']
    status, printed = interrupt(args + [f"--out_dir={tmp_path / 'a'}", '--max_iters=1000'], after_step=3,
                                whom=lambda p: [rank_pid(p, 1)], timeout=120)
    stopped = max(logged_losses(printed))
    assert status != 0 and f'stopped at step {stopped} by SIGTERM' in printed, printed[-3000:]
    assert stopped % 3 == 0 and stopped >= 6  # a log step after the signal
    ckpt = torch.load(tmp_path / 'a' / 'ckpt.pt', weights_only=True)
    assert ckpt['step'] == stopped and len(ckpt['data']) == 2  # both ranks' stream positions
    resumed = logged_losses(run(args + [f"--out_dir={tmp_path / 'a'}", f'--max_iters={stopped + 3}',
                                        '--init_from=resume']).stdout)
    full = logged_losses(run(args + [f"--out_dir={tmp_path / 'b'}", f'--max_iters={stopped + 3}']).stdout)
    assert resumed[stopped + 3] == full[stopped + 3], (resumed, full)
