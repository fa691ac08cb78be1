import pytest
import torch

import flow
from conftest import randomize
from model import DiT

MU, SIGMA = 1.5, 0.5  # data ~ N(MU, SIGMA^2) elementwise


def exact_velocity(z, t):
    """E[v | z_t] for Gaussian data and unit Gaussian noise, with v = noise - z0 and z_t = (1-t) z0 + t noise."""
    t = t.view(-1, *[1] * (z.dim() - 1))
    k = (t - (1 - t) * SIGMA ** 2) / ((1 - t) ** 2 * SIGMA ** 2 + t ** 2)  # Cov(v, z_t) / Var(z_t)
    return -MU + k * (z - (1 - t) * MU)


def test_loss_of_the_exact_field_is_the_conditional_variance():
    g = torch.Generator().manual_seed(0)
    n, d = 4000, 64
    z0 = MU + SIGMA * torch.randn(n, d, generator=g)
    noise = torch.randn(n, d, generator=g)
    for t0 in (0.1, 0.5, 0.9):
        t = torch.full((n,), t0)
        got = flow.loss(lambda z, t, ctx: exact_velocity(z, t), z0, t, None, noise).mean().item()
        cov, var = t0 - (1 - t0) * SIGMA ** 2, (1 - t0) ** 2 * SIGMA ** 2 + t0 ** 2
        assert got == pytest.approx(1 + SIGMA ** 2 - cov ** 2 / var, rel=0.02)
    # a model trained on the other time convention (v = z0 - noise) is far off
    wrong = flow.loss(lambda z, t, ctx: -exact_velocity(z, t), z0, torch.full((n,), 0.5), None, noise).mean()
    assert wrong > 3


def test_contrastive_loss_and_its_minimiser():
    g = torch.Generator().manual_seed(2)
    n, d, lam = 4000, 64, 0.2
    z0 = MU + SIGMA * torch.randn(n, d, generator=g)
    noise = torch.randn(n, d, generator=g)
    t = torch.rand(n, generator=g)
    exact = lambda z, t, ctx: exact_velocity(z, t)  # noqa: E731
    plain = flow.loss(exact, z0, t, None, noise)
    assert torch.equal(flow.loss(exact, z0, t, None, noise, contrast=0.0), plain)
    z_t = (1 - t[:, None]) * z0 + t[:, None] * noise
    against_next = ((exact_velocity(z_t, t) - (noise - z0).roll(1, 0)) ** 2).mean(1)  # sample i-1's target
    assert torch.allclose(flow.loss(exact, z0, t, None, noise, contrast=lam), plain - lam * against_next)
    # the minimiser moves away from the mean target (-MU): (v - lam * (-MU)) / (1 - lam)
    shifted = lambda z, t, ctx: (exact_velocity(z, t) + lam * MU) / (1 - lam)  # noqa: E731
    best = flow.loss(shifted, z0, t, None, noise, contrast=lam).mean()
    for other in (exact, lambda z, t, ctx: 0.9 * shifted(z, t, ctx), lambda z, t, ctx: 1.1 * shifted(z, t, ctx)):
        assert flow.loss(other, z0, t, None, noise, contrast=lam).mean() > best + 0.005


def test_samplers_reproduce_gaussian_data():
    noise = torch.randn(200_000, generator=torch.Generator().manual_seed(1))

    def error(sampler, steps, shift):
        x = flow.sample(exact_velocity, noise.clone(), steps=steps, sampler=sampler, shift=shift)
        assert x.mean().item() == pytest.approx(MU, abs=0.002)  # the mean is exact for any linear field
        return abs(x.var().item() - SIGMA ** 2)
    for steps in (10, 20):  # Heun beats Euler at equal steps (with shift 3 both share a long last Euler step)
        assert error('heun', steps, 1.0) < error('euler', steps, 1.0) / 4
        assert error('heun', steps, 3.0) < error('euler', steps, 3.0)
    assert error('euler', 10, 1.0) / error('euler', 20, 1.0) == pytest.approx(2, rel=0.15)  # first order
    assert error('heun', 10, 1.0) / error('heun', 20, 1.0) > 4  # second order (its last step is Euler)
    assert error('heun', 20, 1.0) < 0.002 and error('heun', 40, 3.0) < 0.01


def test_sample_from_an_intermediate_time():
    # image-to-image: data noised to t = 0.6 and integrated from there is still data
    g = torch.Generator().manual_seed(2)
    z0, noise = MU + SIGMA * torch.randn(200_000, generator=g), torch.randn(200_000, generator=g)
    seen = []

    def v(z, t):
        seen.append(t[0].item())
        return exact_velocity(z, t)
    x = flow.sample(v, 0.4 * z0 + 0.6 * noise, steps=30, sampler='heun', shift=3.0, t_start=0.6)
    assert seen[0] == pytest.approx(0.6) and len(seen) == 30 + 29
    assert x.mean().item() == pytest.approx(MU, abs=0.01) and x.var().item() == pytest.approx(SIGMA ** 2, abs=0.01)


def test_time_shift():
    t = torch.linspace(0, 1, 11)
    assert torch.equal(flow.shift_t(t, 1.0), t)
    assert flow.shift_t(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)  # 3 * 0.5 / (1 + 2 * 0.5)
    assert flow.shift_t(torch.tensor(0.25), 3.0).item() == pytest.approx(0.5)
    torch.testing.assert_close(flow.shift_t(flow.shift_t(t, 3.0), 1 / 3.0), t)
    s = flow.shift_t(t, 3.0)
    assert s[0] == 0 and s[-1] == 1 and (s[1:-1] > t[1:-1]).all()


def test_t_sampling():
    g = torch.Generator().manual_seed(0)
    u = flow.sample_t(100_000, 'uniform', generator=g)
    ln = flow.sample_t(100_000, 'logit_normal', mean=0.5, std=1.0, generator=g)
    assert u.min() >= 0 and u.max() <= 1 and u.mean().item() == pytest.approx(0.5, abs=0.01)
    assert torch.logit(ln).mean().item() == pytest.approx(0.5, abs=0.02)
    assert torch.logit(ln).std().item() == pytest.approx(1.0, abs=0.02)
    with pytest.raises(ValueError):
        flow.sample_t(4, 'beta')


def test_classifier_free_guidance_in_one_forward():
    model = randomize(DiT('DiT-Ti/4', 3, 64, 16))
    calls = []

    def counted(z, t, ctx):
        calls.append(z.shape[0])
        return model(z, t, ctx)
    z, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    ctx, uncond = torch.randn(2, 10, 64), torch.randn(2, 10, 64)
    torch.testing.assert_close(flow.guided(counted, ctx, uncond, 1.0)(z, t), model(z, t, ctx))
    calls.clear()
    got = flow.guided(counted, ctx, uncond, 3.0)(z, t)
    assert calls == [4]  # conditional and unconditional branch batched together
    v_c, v_u = model(z, t, ctx), model(z, t, uncond)
    torch.testing.assert_close(got, v_u + 3.0 * (v_c - v_u), rtol=1e-4, atol=1e-4)

    class NoReadBack(torch.Tensor):  # reading t back is a host sync per step on a GPU: the full interval needs none
        def item(self):
            raise AssertionError('t read back')
    torch.testing.assert_close(flow.guided(counted, ctx, uncond, 3.0)(z, t.as_subclass(NoReadBack)), got)
    # a guidance interval: inside it the same, outside it the conditional branch alone, in one forward of B
    t = torch.full((2,), 0.5)
    v_c, v_u = model(z, t, ctx), model(z, t, uncond)
    torch.testing.assert_close(flow.guided(counted, ctx, uncond, 3.0, (0.2, 0.8))(z, t), v_u + 3.0 * (v_c - v_u),
                               rtol=1e-4, atol=1e-4)
    calls.clear()
    torch.testing.assert_close(flow.guided(counted, ctx, uncond, 3.0, (0.6, 0.8))(z, t), v_c)
    assert calls == [2]
