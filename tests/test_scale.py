"""Training at scale: activation checkpointing, the FLOP count, FSDP, bench.py."""
import re
import shutil
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import TINY, logged_losses, randomize, run
from model import DiT


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = randomize(DiT('DiT-Ti/4', 3, 64, 16))
    ckpt = DiT('DiT-Ti/4', 3, 64, 16, grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x, t, ctx = torch.randn(2, 3, 16, 16), torch.rand(2), torch.randn(2, 10, 64)
    for m in (plain, ckpt):
        m(x, t, ctx).square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert sum(p.grad.abs().sum() for p in ckpt.parameters()) > 0


def test_flop_count_matches_a_hand_count():
    m = DiT('DiT-Ti/4', 3, 64, 16)  # depth 6, width 192; 16/4 = 4 x 4 = 16 image tokens; 10 caption tokens
    # per block: (3 + 1 + 8) * 192^2 MACs for each of the 26 tokens, plus QK^T and AV: 2 * 26^2 * 192;
    # the last block's caption stream skips q, proj and MLP: 10 * 192^2 * 10, and its 10 queries' share of attention:
    # 2 * 10 * 26 * 192; patch embed + final: 2 * 3 * 16 * 192 * 16
    macs = 6 * (12 * 192 ** 2 * 26 + 2 * 26 ** 2 * 192) - 10 * 192 ** 2 * 10 - 2 * 10 * 26 * 192 + 2 * 3 * 16 * 192 * 16
    assert m.flops_per_image(10) == 3 * 2 * macs
    # and against torch's own count of a forward pass (which also sees the small per-image layers we leave out)
    with FlopCounterMode(display=False) as counter:
        m(torch.randn(4, 3, 16, 16), torch.rand(4), torch.randn(4, 10, 64))
    assert 1.0 < counter.get_total_flops() / (4 * 2 * macs) < 1.06
    # MLP ratio 2 (the shapes default's): the MLP's 8 D^2 MACs a token become 4 D^2
    half = DiT('DiT-Ti/4', 3, 64, 16, mlp_ratio=2)
    assert half.flops_per_image(10) == 3 * 2 * (macs - 6 * 4 * 192 ** 2 * 26 + 4 * 192 ** 2 * 10)


@pytest.mark.slow
@pytest.mark.parametrize('dtype', ['auto', 'float16'])  # float16: the gradient scaler's skipped steps agree across shards
def test_fsdp_trains_like_ddp_and_saves_a_plain_checkpoint(tmp_path, dtype):
    # a rate that moves weights ~1e-3 a step, far above the tolerance: a shard stepped wrongly (or not) shows
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train.py',
                *TINY, '--max_iters=3', '--ckpt_interval=3', '--learning_rate=1e-3', '--warmup_iters=0', f'--dtype={dtype}']
    ddp = run(torchrun + [f'--out_dir={tmp_path / "ddp"}'])
    fsdp = run(torchrun + [f'--out_dir={tmp_path / "fsdp"}', '--fsdp=True', '--grad_checkpointing=True'])
    assert 'sharded (FSDP)' in fsdp.stdout
    a, b = logged_losses(ddp.stdout), logged_losses(fsdp.stdout)
    assert sorted(b) == [1, 2, 3] and all(abs(a[s] - b[s]) < 1e-4 for s in a), (a, b)  # the same training
    assert b[3] < b[1]  # and it trains
    sd_ddp = torch.load(tmp_path / 'ddp' / 'ckpt.pt', weights_only=True)
    sd_fsdp = torch.load(tmp_path / 'fsdp' / 'ckpt.pt', weights_only=True)  # the same plain format
    assert sd_fsdp['model'].keys() == sd_ddp['model'].keys()
    assert sd_fsdp['optimizer']['param_groups'][0]['params'] == sd_ddp['optimizer']['param_groups'][0]['params']
    assert sd_fsdp['scaler'] == sd_ddp['scaler']
    for k, v in sd_ddp['model'].items():
        torch.testing.assert_close(sd_fsdp['model'][k], v, rtol=1e-4, atol=1e-5, msg=k)
    # a single process resumes the sharded run and samples from it
    p = run([sys.executable, 'train.py', *TINY, '--max_iters=4', '--init_from=resume', f'--out_dir={tmp_path / "fsdp"}',
             f'--dtype={dtype}'])
    assert sorted(logged_losses(p.stdout)) == [4]
    run([sys.executable, 'sample.py', f'--out_dir={tmp_path / "fsdp"}', '--prompt', 'small red circle on the left, blue background',
         '--n', '1', '--steps', '2', '--out', str(tmp_path / 's.png')])


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which('g++'), reason="torch.compile on the CPU needs a C++ compiler (inductor's backend)")
def test_compiled_training_matches_eager_and_saves_plain_checkpoints(tmp_path):
    # compile is the default on GPUs; on the CPU the same code path runs, through inductor's C++ backend
    args = [sys.executable, 'train.py', *TINY, '--max_iters=4', '--ckpt_interval=4', '--learning_rate=1e-3',
            '--warmup_iters=0', '--dtype=float32']  # fp32: compiled and eager kernels round bf16 differently
    eager = run(args + [f'--out_dir={tmp_path / "eager"}'])
    compiled = run(args + [f'--out_dir={tmp_path / "compiled"}', '--compile=True', '--grad_checkpointing=True'])
    a, b = logged_losses(eager.stdout), logged_losses(compiled.stdout)
    assert sorted(b) == [1, 2, 3, 4] and all(abs(a[s] - b[s]) < 1e-3 * a[s] for s in a), (a, b)
    plain = torch.load(tmp_path / 'eager' / 'ckpt.pt', weights_only=True)['model']
    sd = torch.load(tmp_path / 'compiled' / 'ckpt.pt', weights_only=True)['model']
    assert sd.keys() == plain.keys()  # saved from the module itself, not compile's wrapper
    assert sd['final.weight'].abs().sum() > 0  # zero at init: the compiled backward and update ran
    for k, v in plain.items():
        torch.testing.assert_close(sd[k], v, rtol=1e-3, atol=1e-4, msg=k)


@pytest.mark.slow
def test_bench_prints_its_tables():
    p = run([sys.executable, 'bench.py', 'train', '--model', 'DiT-Ti/4', '--res', '64', '--batch', '2', '--steps', '1',
             '--warmup', '1', '--text_len', '8', '--text_dim', '32', '--device=cpu'])
    assert re.search(r'^flowdit\s+[\d.]+M\s+[\d.]+\s+[\d.]+\s+n/a', p.stdout, re.M), p.stdout
    assert re.search(r'^diffusers SD3Transformer2DModel\s+[\d.]+M', p.stdout, re.M), p.stdout
    params = re.findall(r'\s([\d.]+)M\s', p.stdout)
    assert abs(float(params[0]) / float(params[1]) - 1) < 0.05  # the twin is the same size
    assert float(re.search(r'step-time ratio flowdit / diffusers: ([\d.]+)', p.stdout).group(1)) > 0
    p = run([sys.executable, 'bench.py', 'sample', '--model', 'DiT-Ti/4', '--res', '64', '--batch', '2', '--steps', '2',
             '--repeats', '1', '--text_len', '8', '--text_dim', '32'])
    assert re.search(r'[\d.]+ images/s', p.stdout)
    p = run([sys.executable, 'bench.py', 'stream', '--n', '40', '--threads', '8', '--timeout', '0.5', '--res', '64'])
    rates = [float(x) for x in re.findall(r'([\d.]+) samples/s', p.stdout)]
    assert len(rates) == 6 and all(r > 0 for r in rates), p.stdout
    p = run([sys.executable, 'bench.py', 'latent', '--model', 'DiT-Ti/4', '--res', '32', '--batch', '2', '--steps', '1',
             '--text_len', '8', '--text_dim', '32'])
    steps = re.findall(r'([\d.]+) ms/step', p.stdout)
    assert len(steps) == 3 and all(float(s) > 0 for s in steps), p.stdout


def test_bench_counts_under_one_are_one_line_errors():
    for args in (['train', '--steps', '0'], ['train', '--batch', '0'], ['stream', '--n', '0'], ['prepare', '--rows', '0']):
        p = run([sys.executable, 'bench.py', *args], check=False)
        assert p.returncode != 0 and p.stderr.strip() == f'error: {args[1]} must be at least 1, got 0', p.stderr
