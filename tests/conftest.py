import gc
import os
import signal
import subprocess
import sys
import threading

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# pytest-xdist runs the tests in one process per core: each takes its share of the cores, not all of them (threads
# spinning over each other's cores)
torch.set_num_threads(max(1, torch.get_num_threads() // int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', 1))))

# a training run small enough for a few seconds on a CPU
TINY = ['--model=DiT-Ti/4', '--image_size=16', '--batch_size=8', '--text_max_length=10', '--sample_interval=0',
        '--log_interval=1', '--device=cpu']


gc.freeze()  # torch and the project's modules are never garbage: the collections below need not walk them


@pytest.fixture(autouse=True)
def collect_garbage():
    """A DataLoader left in a reference cycle is stopped here, in its own test's teardown, not whenever the collector
    next runs: from a later test's fetch thread, its 10 s stop (the collector closes its queues first) timed out that
    test's fetches."""
    yield
    gc.collect()


def run(args, check=True, timeout=300, **kw):
    """Run a command from the repository root (env: variables to add); on failure show what it printed."""
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1', **kw.pop('env', {})}
    p = subprocess.run(args, cwd=kw.pop('cwd', ROOT), capture_output=True, text=True, timeout=timeout, env=env, **kw)
    if check and p.returncode != 0:
        pytest.fail(f'{args} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}')
    return p


def kill_tree(pid):
    """SIGKILL to a process and all its descendants (torchrun's ranks run in sessions of their own)."""
    tree, i = [pid], 0
    while i < len(tree):
        try:
            tree += [int(c) for t in os.listdir(f'/proc/{tree[i]}/task')
                     for c in open(f'/proc/{tree[i]}/task/{t}/children').read().split()]
        except OSError:  # gone already
            pass
        i += 1
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def interrupt(args, after_step, sig=signal.SIGTERM, whom=lambda p: [p.pid], timeout=300):
    """Start a run in its own process group, send `sig` to the pids `whom` names (a negative one: a group) once it
    has logged `after_step`, and return its exit status and all it printed."""
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1'}
    p = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                         start_new_session=True)
    watchdog = threading.Timer(timeout, kill_tree, (p.pid,))  # a run that hangs fails the test
    watchdog.start()
    printed = []
    for line in p.stdout:
        printed.append(line)
        if line.startswith(f'step {after_step} '):
            for pid in whom(p):
                os.kill(pid, sig)
            break
    printed.append(p.communicate()[0])
    watchdog.cancel()
    return p.returncode, ''.join(printed)


def logged_losses(stdout):
    return {int(line.split()[1]): float(line.split('loss ')[1].split()[0])
            for line in stdout.splitlines() if line.startswith('step ')}


def randomize(model, seed=0):
    """A fresh DiT outputs zeros by design; tests of its arithmetic need weights that do something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def tiny_vae(path, **config):
    """A diffusers AutoencoderKL small enough for a CPU test (factor 2, 4 latent channels), saved where users' VAEs
    would be loaded from."""
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=('DownEncoderBlock2D',) * 2,
                        up_block_types=('UpDecoderBlock2D',) * 2, block_out_channels=(8, 16), latent_channels=4,
                        layers_per_block=1, norm_num_groups=4, sample_size=16, **config)
    vae.save_pretrained(path)
    return str(path)


def stream_options(tmp_path, size, **kw):
    """LaionShards / LaionStream options for a test: loopback allowed, a cache under tmp_path. The deadline is train.py's
    (a fetch that fails is cached as failed: a CI host stalling for a second must not lose a good image for good)."""
    o = dict(fetch_threads=8, fetch_timeout=10.0, max_image_bytes=2_000_000, max_image_pixels=50_000_000,
             min_image_size=size, allow_private_urls=True, honor_robots=True, random_crop=False, random_flip=False,
             cache_dir=str(tmp_path / 'cache'), cache_bytes=1 << 30)
    return {**o, **kw}
