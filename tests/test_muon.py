import pytest
import torch

import flow
import muon
from conftest import randomize
from model import DiT


def matrices(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in ((64, 16), (16, 64), (32, 32))]


def test_the_same_numbers_as_torchs_muon_in_bf16():
    ours, theirs = matrices(), matrices()
    a = muon.Muon(ours, lr=0.01, weight_decay=0.1, ns_dtype=torch.bfloat16)
    b = torch.optim.Muon(theirs, lr=0.01, weight_decay=0.1, adjust_lr_fn='match_rms_adamw')
    g = torch.Generator().manual_seed(1)
    for _ in range(3):  # momentum carries over steps
        for p, q in zip(ours, theirs):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        a.step(), b.step()
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q)
    assert not torch.equal(ours[0], matrices()[0])


@pytest.mark.parametrize('shape', [(96, 24), (24, 96), (40, 40)])
def test_fp32_newton_schulz_orthogonalises(shape):
    g = torch.Generator().manual_seed(0)
    k = min(shape)
    u = torch.linalg.qr(torch.randn(shape[0], k, generator=g))[0]
    v = torch.linalg.qr(torch.randn(shape[1], k, generator=g))[0]
    grad = u @ torch.diag(torch.logspace(-1, 0, k)) @ v.T  # singular values from 0.1 to 1: condition 10
    o = muon.orthogonalise(grad[None], torch.float32)[0]
    assert o.shape == shape and o.dtype == torch.float32
    s = torch.linalg.svdvals(o)
    assert s.min() > 0.5 and s.max() < 1.5, s  # every direction moves, by about the same amount
    assert torch.nn.functional.cosine_similarity(o.flatten(), (u @ v.T).flatten(), dim=0) > 0.95  # ~U V^T
    # the fp32 iteration computes what the bf16 one does, more exactly
    assert (o - muon.orthogonalise(grad[None], torch.bfloat16)[0].float()).abs().max() < 0.05


@pytest.mark.parametrize('shape', [(32, 64), (16, 96), (128, 768)])
def test_the_gram_form_computes_the_direct_iterations_numbers(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    x = x / x.norm()
    direct = muon.newton_schulz(x[None], 5)[0]
    assert (muon.gram_newton_schulz(x[None], 5)[0] - direct).abs().max() < 1e-4
    assert (direct - x).abs().max() > 0.1  # five steps moved it far: the agreement is not of two no-ops
    wide = torch.randn(shape, generator=g)  # orthogonalise takes the Gram form for fp32 wide and tall matrices
    for m in (wide, wide.T):  # float64 takes the direct form
        exact = muon.orthogonalise(m[None].double(), torch.float64)[0].float()
        assert (muon.orthogonalise(m[None], torch.float32)[0] - exact).abs().max() < 1e-4


@pytest.mark.parametrize('shape', [(24, 24), (16, 96), (96, 16)])
def test_a_stack_is_orthogonalised_matrix_by_matrix(shape):
    g = torch.Generator().manual_seed(0)
    stack = torch.randn(3, *shape, generator=g) * torch.tensor([0.01, 1.0, 100.0])[:, None, None]  # norms differ
    alone = torch.stack([muon.orthogonalise(m[None], torch.float32)[0] for m in stack])
    assert (muon.orthogonalise(stack, torch.float32) - alone).abs().max() < 1e-5
    assert torch.linalg.svdvals(alone).median(dim=1).values.min() > 0.5  # each scaled by its own norm: none stays small


def test_the_update_has_adamws_rms():
    p = torch.nn.Parameter(torch.zeros(128, 512))
    p.grad = torch.randn(128, 512)
    muon.Muon([p], lr=1e-2, momentum=0.0).step()
    assert 0.1 < p.detach().square().mean().sqrt() / 1e-2 < 0.3  # Moonshot's 0.2 x lr


def test_muon_takes_matrices_only():
    with pytest.raises(ValueError, match='matrices only'):
        muon.Muon([torch.nn.Parameter(torch.zeros(4))], lr=1e-3)


def test_with_adamw_splits_the_blocks_matrices_from_the_rest_and_everything_learns():
    m = randomize(DiT('DiT-Ti/4', 3, 64, 16))
    adamw, mu = muon.with_adamw(m, 1e-3, (0.9, 0.999), 0.0, torch.float32)
    names = {p: n for n, p in m.named_parameters()}
    on_muon = {names[p] for p in mu.param_groups[0]['params']}
    on_adamw = {names[p] for p in adamw.param_groups[0]['params']}
    assert on_muon | on_adamw == set(names.values()) and not on_muon & on_adamw  # each parameter once
    assert all(n.startswith('blocks.') and n.endswith('.weight') and 'norm' not in n for n in on_muon)
    assert {'blocks.0.img.mlp.0.weight', 'blocks.0.txt.mod.1.weight'} <= on_muon
    assert {'final.weight', 'patch_embed.weight', 'pos_embed', 'blocks.0.img.mlp.0.bias',
            'blocks.0.img.q_norm.weight'} <= on_adamw
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    x, ctx = torch.randn(2, 3, 16, 16), torch.randn(2, 10, 64)
    flow.loss(m, x, torch.rand(2), ctx, torch.randn_like(x)).mean().backward()
    adamw.step(), mu.step()
    frozen = [n for n, p in m.named_parameters() if torch.equal(p, before[n])]
    assert not frozen, frozen


def test_optimizers_name_the_rate_scale_of_each():
    m = DiT('DiT-Mi/4', 3, 64, 16)
    (adamw, mu), scales = muon.optimizers(m, 'muon', 1e-3, (0.9, 0.999), 0.0, torch.float32, adamw_lr_scale=0.5)
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(mu, muon.Muon) and scales == [0.5, 1.0]
    (alone,), scales = muon.optimizers(m, 'adamw', 1e-3, (0.9, 0.999), 0.0, torch.float32, adamw_lr_scale=0.5)
    assert isinstance(alone, torch.optim.AdamW) and scales == [1.0]  # the scale is Muon's pair's alone
    assert len(alone.param_groups[0]['params']) == len(list(m.parameters()))
