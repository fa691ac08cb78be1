"""
Rectified flow, the one place its convention is written down:

    t = 0 is data, t = 1 is noise:   z_t = (1 - t) * z0 + t * noise
    the model predicts the velocity:  v = dz_t/dt = noise - z0
    samplers integrate dz = v dt from t = 1 (noise) down to t = 0 (data).
"""
import torch
from tqdm import tqdm


def sample_t(n, mode, mean=0.0, std=1.0, generator=None, device='cpu'):
    # 'logit_normal' is SD3's sigmoid(N(mean, std)): more training signal at middle t, where the task is hardest
    if mode == 'uniform':
        return torch.rand(n, generator=generator, device=device)
    if mode == 'logit_normal':
        return torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))
    raise ValueError(f"unknown t sampling {mode!r}: use 'uniform' or 'logit_normal'")


def loss(model, z0, t, ctx, noise, contrast=0.0):
    """Per-sample mean squared error of the predicted velocity, (B,). With contrast > 0, minus `contrast` times the
    error against the next sample's target in the batch (contrastive flow matching, Stoica et al. 2025): it pushes
    the velocities of different captions apart, and can go below zero. Its minimiser is (the flow's velocity -
    contrast * the mean target, -mean(z0)) / (1 - contrast): samples land a little further from the mean image."""
    tt = t.view(-1, *[1] * (z0.dim() - 1))
    zt = (1 - tt) * z0 + tt * noise
    v = model(zt, t, ctx).float()
    target = (noise - z0).float()
    dims = tuple(range(1, z0.dim()))
    per_sample = ((v - target) ** 2).mean(dim=dims)
    if contrast:
        per_sample = per_sample - contrast * ((v - target.roll(1, 0)) ** 2).mean(dim=dims)
    return per_sample


def shift_t(t, shift):
    # SD3's resolution shift: shift > 1 spends more steps near noise. shift_t(., 1/s) inverts shift_t(., s).
    return shift * t / (1 + (shift - 1) * t)


def guided(model, ctx, uncond, cfg, interval=(0.0, 1.0)):
    """The velocity function v(z, t) with classifier-free guidance, both branches in one batched forward. Guidance
    acts only while interval[0] <= t <= interval[1] (Kynkaanniemi et al., 2024: guidance at high noise costs
    diversity and adds little); elsewhere the conditional velocity alone, one forward of half the batch."""
    if cfg == 1:
        return lambda z, t: model(z, t, ctx)

    def v(z, t):  # t: (B,), one time for the whole batch
        # reading t back is a host sync on a GPU: only a narrowed interval needs it
        if interval != (0.0, 1.0) and not interval[0] <= t[0].item() <= interval[1]:
            return model(z, t, ctx)
        v_cond, v_uncond = model(torch.cat([z, z]), torch.cat([t, t]), torch.cat([ctx, uncond])).chunk(2)
        return v_uncond + cfg * (v_cond - v_uncond)
    return v


@torch.no_grad()
def sample(v, z, steps, sampler='euler', shift=1.0, t_start=1.0, progress=False):
    """Integrate dz = v(z, t) dt from t_start down to 0. z: the state at t_start (pure noise when t_start = 1).
    The grid is uniform in unshifted time, then shifted, and starts exactly at t_start."""
    if sampler not in ('euler', 'heun'):
        raise ValueError(f"unknown sampler {sampler!r}: use 'euler' or 'heun'")
    u0 = shift_t(torch.tensor(float(t_start)), 1 / shift)
    ts = shift_t(torch.linspace(1, 0, steps + 1) * u0, shift).tolist()
    for t, t_next in tqdm(list(zip(ts[:-1], ts[1:])), disable=not progress, desc='sampling', leave=False):
        tb = torch.full((z.shape[0],), t, device=z.device)
        d = v(z, tb)
        if sampler == 'heun' and t_next > 0:  # trapezoid with the slope at the Euler guess; Euler on the last step
            d_next = v(z + (t_next - t) * d, torch.full_like(tb, t_next))
            d = (d + d_next) / 2
        z = z + (t_next - t) * d
    return z
