"""
Muon (Jordan et al., 2024): momentum SGD whose update of each weight matrix is orthogonalised by a Newton-Schulz
iteration, so every direction of the matrix moves by about the same amount. The update is scaled to AdamW's RMS
(Moonshot's "Muon is scalable", 2025), so one learning rate and schedule serve the matrices (Muon) and the rest
(AdamW).

torch.optim.Muon computes the same thing, always in bf16, which a CPU without native bf16 emulates ~30x slower than
fp32 (Newton-Schulz on 20 of DiT-Mi/4's matrices, one thread: 910 ms against 29 ms). This one iterates in
`ns_dtype`: bf16 where it is native, else fp32. With ns_dtype=torch.bfloat16 it gives
torch.optim.Muon(adjust_lr_fn='match_rms_adamw')'s numbers (tests/test_muon.py).
"""
import torch


A, B, C = 3.4445, -4.7750, 2.0315  # the quintic's coefficients, tuned for speed over exactness (Jordan et al.)


def newton_schulz(x, steps):
    # x: (k, m, n), k matrices, m <= n, spectral norms <= 1. A step: x <- a x + (b G + c G^2) x, G = x x^T (k, m, m)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=B, alpha=C), x, beta=A)
    return x


def gram_newton_schulz(x, steps):
    """newton_schulz's numbers in (m, m) products: each step multiplies x on the left by P = a I + b G + c G^2, a
    polynomial in G that commutes with it, so x_k = P_k ... P_1 x and the next G = P G P. 4 m^2 n + 34 m^3 FLOPs
    against 5 (4 m^2 n + 2 m^3): fewer where n > 1.5 m (DiT's modulation and MLP matrices: 1.7-2x faster)."""
    gram, q = x @ x.mT, None
    for i in range(steps):
        poly = torch.baddbmm(gram, gram, gram, beta=B, alpha=C)
        poly.diagonal(dim1=1, dim2=2).add_(A)
        q = poly if q is None else poly @ q
        if i < steps - 1:
            gram = poly @ gram @ poly
    return q @ x


def orthogonalise(g, dtype, steps=5):
    """~U V^T of each g = U S V^T in a stack (k, m, n) of matrices of one shape: the singular values land in about
    [0.5, 1.5], which trains as well as exact ones (Jordan et al.). A stack is one batch of products: DiT-Mi/4's 80
    matrices take 3 shapes, and on 2 cores of an AVX2-only EPYC its Muon step falls from 133 to 92 ms, the same
    numbers. Wide matrices take the Gram form in fp32 only: bf16 keeps torch.optim.Muon's own numbers."""
    x = g.to(dtype)
    tall = x.size(1) > x.size(2)
    x = x.mT if tall else x  # (k, m, n), m <= n: the Gram matrices are the smaller ones
    x = x / x.norm(dim=(1, 2), keepdim=True).clamp(min=1e-7)  # spectral norm <= Frobenius norm <= 1: the basin
    wide = dtype == torch.float32 and x.size(2) > 1.5 * x.size(1)
    x = gram_newton_schulz(x, steps) if wide else newton_schulz(x, steps)
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr, weight_decay=0.0, momentum=0.95, ns_dtype=torch.float32):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum))
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            if any(p.ndim != 2 for p in group['params']):
                raise ValueError('Muon updates weight matrices only: give the other parameters to AdamW')

    @torch.no_grad()
    def step(self, closure=None):  # no closure is used; torch.distributed.checkpoint's loading passes None
        for group in self.param_groups:
            lr, momentum, decay = group['lr'], group['momentum'], group['weight_decay']
            by_shape = {}  # the matrices of one shape are orthogonalised as one stack: fewer, larger products
            for p in group['params']:
                if p.grad is not None:
                    by_shape.setdefault(p.shape, []).append(p)
            for shape, params in by_shape.items():
                looks = []
                for p in params:
                    state = self.state[p]
                    if 'momentum_buffer' not in state:
                        state['momentum_buffer'] = torch.zeros_like(p)
                    state['momentum_buffer'].lerp_(p.grad, 1 - momentum)
                    looks.append(p.grad.lerp(state['momentum_buffer'], momentum))  # Nesterov's look-ahead
                updates = orthogonalise(torch.stack(looks), self.ns_dtype)
                for p, update in zip(params, updates):
                    if decay:  # no pass over the weights for nothing (the shapes default has none)
                        p.mul_(1 - lr * decay)
                    p.add_(update, alpha=-lr * 0.2 * max(shape) ** 0.5)  # RMS 0.2 * lr, as AdamW's typical update


def with_adamw(model, lr, betas, weight_decay, ns_dtype):
    """[AdamW, Muon]: Muon for the weight matrices of model.blocks, AdamW for the rest (embeddings, biases, norms,
    the input, time, caption and output layers), as Muon's authors split a network."""
    matrices = [p for p in model.blocks.parameters() if p.ndim == 2]
    on_muon = set(map(id, matrices))
    rest = [p for p in model.parameters() if id(p) not in on_muon]
    return [torch.optim.AdamW(rest, lr=lr, betas=betas, weight_decay=weight_decay, fused=True),
            Muon(matrices, lr=lr, weight_decay=weight_decay, ns_dtype=ns_dtype)]


def optimizers(model, name, lr, betas, weight_decay, ns_dtype, adamw_lr_scale=1.0):
    """train.py's optimizers and the scale of each one's rate on the shared schedule: for 'muon' with_adamw's pair,
    AdamW's part at adamw_lr_scale; for 'adamw' AdamW alone, over every parameter."""
    if name == 'muon':
        return with_adamw(model, lr, betas, weight_decay, ns_dtype), [adamw_lr_scale, 1.0]
    return [torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay, fused=True)], [1.0]
