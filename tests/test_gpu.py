"""What only a GPU exercises: the flash kernel, compiled bf16 training with checkpointing, pinned host-to-GPU copies
that never wait for the GPU, and train.py's choices there."""
import sys
import time

import pytest
import torch

import data
from conftest import TINY, logged_losses, randomize, run, tiny_vae
from encoders import load_vae
from model import DiT, to_device
from test_shards import SIZE, epoch_latents, options, tars, url_shards, web  # noqa: F401 (tars, web: fixtures)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')


def test_sdpa_runs_on_the_flash_kernel():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    m = DiT('DiT-S/2', 4, 768, 32).cuda()
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast('cuda', torch.bfloat16):  # errors if it cannot
        m(torch.randn(2, 4, 32, 32, device='cuda'), torch.rand(2, device='cuda'),
          torch.randn(2, 77, 768, device='cuda')).sum().backward()


def test_compiled_bf16_with_checkpointing_matches_eager():
    torch.manual_seed(0)
    eager = randomize(DiT('DiT-S/2', 4, 768, 32), seed=1).cuda()
    ckpt = DiT('DiT-S/2', 4, 768, 32, grad_checkpointing=True).cuda()
    ckpt.load_state_dict(eager.state_dict())
    x, t, ctx = torch.randn(8, 4, 32, 32).cuda(), torch.rand(8).cuda(), torch.randn(8, 77, 768).cuda()
    outs, grads = {}, {}
    for name, net, dtype in (('fp32', eager, None), ('eager', eager, torch.bfloat16),
                             ('compiled', torch.compile(ckpt), torch.bfloat16)):
        with torch.autocast('cuda', dtype or torch.float32, enabled=dtype is not None):
            out = net(x, t, ctx).float()  # (B, C, H, W)
        out.square().mean().backward()
        outs[name] = out.detach()
        grads[name] = torch.cat([p.grad.flatten() for p in (ckpt if name == 'compiled' else eager).parameters()])
        eager.zero_grad(set_to_none=True)

    def err(name, what):  # relative to fp32
        return ((what[name] - what['fp32']).norm() / what['fp32'].norm()).item()
    for what in (outs, grads):
        assert err('eager', what) < 5e-2  # bf16's rounding, no more (1% on outputs, 2% on gradients on a CPU)
        assert err('compiled', what) < 2 * err('eager', what) + 1e-3, (err('compiled', what), err('eager', what))


def test_host_batches_are_pinned_and_copied_without_waiting_for_the_gpu(tars, tmp_path):  # noqa: F811
    stream = data.LaionStream(tars[0], 4, SIZE, 0, 0, 1, 1, pin_memory=True, **options(tmp_path))
    images, _ = next(stream)
    assert images.is_pinned()  # the DataLoader pinned it: the copy below is a DMA, asynchronous
    torch.cuda._sleep(2_000_000_000)  # keep the GPU busy for about a second
    t0 = time.perf_counter()
    on_gpu = to_device(images, 'cuda')
    assert time.perf_counter() - t0 < 0.1 and not torch.cuda.current_stream().query()  # returned while the GPU works
    assert torch.equal(on_gpu.cpu(), images)
    pageable = torch.randn(4, 3, 64, 64)
    assert torch.equal(to_device(pageable, 'cuda').cpu(), pageable)  # pinned on the way, same numbers


def test_a_warm_latent_cache_serves_without_waiting_for_the_gpu(web, tmp_path):  # noqa: F811
    url, _, images = web
    vae = load_vae(tiny_vae(tmp_path / 'vae')).cuda()
    stream = data.LaionStream(url_shards(tmp_path / 'shards', url, images), 4, SIZE, 0, 0, 1, 0, pin_memory=True,
                              vae=vae, cache_tag='gpu', **options(tmp_path))
    first = epoch_latents(stream, len(images))  # every latent encoded on the GPU and cached
    torch.cuda._sleep(2_000_000_000)  # keep the GPU busy for about a second
    t0 = time.perf_counter()
    z, captions = next(stream)  # the second epoch: all hits
    assert time.perf_counter() - t0 < 0.5 and not torch.cuda.current_stream().query()
    assert stream.counters()[1] == 4 and z.device.type == 'cuda'
    assert all(torch.equal(a, first[c]) for a, c in zip(z, captions))


def test_train_on_the_gpu_picks_bf16_and_compiles(tmp_path):
    p = run([sys.executable, 'train.py', *TINY, '--device=cuda', '--max_iters=30', '--learning_rate=1e-3',
             '--warmup_iters=5', f'--out_dir={tmp_path}'])
    assert 'bfloat16' in p.stdout.splitlines()[0], p.stdout.splitlines()[0]
    losses = logged_losses(p.stdout)
    assert sorted(losses) == list(range(1, 31))
    assert sum(losses[s] for s in range(26, 31)) < 0.8 * sum(losses[s] for s in range(1, 6))  # it learns
    assert 'mfu n/a' not in p.stdout  # the GPU's peak is known: MFU is logged
