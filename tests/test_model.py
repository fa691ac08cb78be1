import pytest
import torch

from conftest import randomize
from encoders import HashTextEncoder
from model import DiT, JointBlock, PRESETS, rotary, rotate, token_positions


def hand_count(depth, D, heads, p, C, Dt, grid, r=4):
    """Parameters of a preset (MLP ratio r), counted from the architecture description, not from the code."""
    hd = D // heads
    pre = (D * 6 * D + 6 * D) + (3 * D * D + 3 * D) + 2 * hd  # modulation, qkv, q/k RMSNorm weights
    post = (D * D + D) + (D * r * D + r * D) + (r * D * D + D)  # out projection, MLP
    last_txt = (D * 2 * D + 2 * D) + (2 * D * D + 2 * D) + hd  # the last caption stream only lends keys and values
    blocks = depth * (pre + post) + (depth - 1) * (pre + post) + last_txt
    embed = (C * p * p * D + D) + (grid // p) ** 2 * D + (256 * D + D + D * D + D) + 2 * (Dt * D + D)
    final = (D * 2 * D + 2 * D) + (D * p * p * C + p * p * C)
    return blocks + embed + final


@pytest.mark.parametrize('name', ['DiT-Mi/4', 'DiT-Ti/4', 'DiT-S/2', 'DiT-B/2', 'DiT-L/4', 'DiT-XL/2', 'DiT-XL/8'])
def test_presets_shapes_and_parameter_counts(name):
    depth, D, heads, p = PRESETS[name]
    with torch.device('meta'):  # XL/2 needs no memory to be counted
        m = DiT(name, in_channels=4, caption_dim=768, grid=32)
    assert m.num_params() == hand_count(depth, D, heads, p, 4, 768, 32)
    assert len(m.blocks) == depth and m.dim == D
    assert m.pos_embed.shape == (1, (32 // p) ** 2, D)


def test_paper_widths_and_depths():
    assert [PRESETS[f'DiT-{n}/2'][:3] for n in ('S', 'B', 'L', 'XL')] == \
        [(12, 384, 6), (12, 768, 12), (24, 1024, 16), (28, 1152, 16)]
    assert {name.split('/')[1] for name in PRESETS} == {'2', '4', '8'}


def test_forward_shape_and_unknown_preset():
    m = randomize(DiT('DiT-Ti/4', 3, 64, 16))
    out = m(torch.randn(2, 3, 16, 16), torch.rand(2), torch.randn(2, 10, 64))
    assert out.shape == (2, 3, 16, 16) and out.abs().sum() > 0
    with pytest.raises(ValueError, match='unknown model preset'):
        DiT('DiT-Q/2', 3, 64, 16)


SMALL = ['DiT-Mi/2', 'DiT-Ti/2']  # the shapes default's width and the one before it


@pytest.mark.parametrize('name', SMALL)
@pytest.mark.parametrize('pos_embed', ['table', 'rope'])
def test_adaln_zero_blocks_start_as_identity(pos_embed, name):
    torch.manual_seed(0)
    m = DiT(name, 4, 32, 16, pos_embed=pos_embed)
    x, c, y = torch.randn(2, 64, m.dim), torch.randn(2, 7, m.dim), torch.randn(2, m.dim)
    rope = rotary(token_positions(8, 8, 7), m.head_dim) if pos_embed == 'rope' else None
    for block in m.blocks:
        x2, c2 = block(x, c, y, rope)
        assert torch.equal(x2, x) and (c2 is None if block.txt.last else torch.equal(c2, c))
    assert torch.equal(m(torch.randn(2, 4, 16, 16), torch.rand(2), torch.randn(2, 7, 32)), torch.zeros(2, 4, 16, 16))


@pytest.mark.parametrize('name', SMALL)
@pytest.mark.parametrize('pos_embed', ['table', 'rope'])
def test_manual_attention_matches_sdpa(pos_embed, name):
    torch.manual_seed(0)
    sdpa = randomize(DiT(name, 3, 64, 16, attn_impl='sdpa', pos_embed=pos_embed))
    manual = DiT(name, 3, 64, 16, attn_impl='manual', pos_embed=pos_embed)
    manual.load_state_dict(sdpa.state_dict())
    x, t, ctx = torch.randn(3, 3, 16, 16), torch.rand(3), torch.randn(3, 10, 64)
    a, b = sdpa(x, t, ctx), manual(x, t, ctx)
    assert a.abs().mean() > 0.1
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', SMALL)
@pytest.mark.parametrize('pos_embed', ['table', 'rope'])
def test_every_parameter_learns(pos_embed, name):
    # a parameter whose gradient is always zero (as the last caption stream's queries would be) is dead weight
    m = randomize(DiT(name, 3, 64, 16, pos_embed=pos_embed))
    m(torch.randn(2, 3, 16, 16), torch.rand(2), torch.randn(2, 10, 64)).square().mean().backward()
    dead = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, dead


def test_mlp_ratio_keeps_the_guarantees():
    # the shapes default's narrower MLP: counted by hand, the identity at init, both attentions agree, all learn
    depth, D, heads, p = PRESETS['DiT-Mi/4']
    m = DiT('DiT-Mi/4', 3, 64, 16, mlp_ratio=2)
    assert m.num_params() == hand_count(depth, D, heads, p, 3, 64, 16, r=2) < DiT('DiT-Mi/4', 3, 64, 16).num_params()
    assert m.blocks[0].img.mlp[0].out_features == 2 * D
    x, t, ctx = torch.randn(2, 3, 16, 16), torch.rand(2), torch.randn(2, 10, 64)
    assert torch.equal(m(x, t, ctx), torch.zeros_like(x))
    randomize(m)
    manual = DiT('DiT-Mi/4', 3, 64, 16, attn_impl='manual', mlp_ratio=2)
    manual.load_state_dict(m.state_dict())
    torch.testing.assert_close(m(x, t, ctx), manual(x, t, ctx), rtol=1e-5, atol=1e-5)
    m(x, t, ctx).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    for bad in (0, 2.5):
        with pytest.raises(ValueError, match='mlp_ratio'):
            DiT('DiT-Mi/4', 3, 64, 16, mlp_ratio=bad)


def test_text_tokens_change_the_image_stream():
    # joint attention: the caption must reach the image tokens
    m = randomize(DiT('DiT-Ti/4', 3, 64, 16))
    x, t = torch.randn(1, 3, 16, 16), torch.rand(1)
    assert not torch.allclose(m(x, t, torch.randn(1, 10, 64)), m(x, t, torch.randn(1, 10, 64)))


def test_positional_embedding_resizes_to_another_grid():
    m = randomize(DiT('DiT-Ti/4', 3, 64, 16))
    assert m.pos_embed_for(4, 4) is m.pos_embed
    out = m(torch.randn(1, 3, 32, 24), torch.rand(1), torch.randn(1, 10, 64))
    assert out.shape == (1, 3, 32, 24)
    # a table that is constant along the grid stays constant when resized bilinearly
    with torch.no_grad():
        m.pos_embed.copy_(torch.arange(m.dim, dtype=torch.float32).expand_as(m.pos_embed))
    assert torch.allclose(m.pos_embed_for(8, 6), m.pos_embed[:, :1].expand(1, 48, -1))


def scores(q, k, pos, head_dim=32):
    cos, sin = rotary(pos, head_dim)
    return rotate(q, cos, sin) @ rotate(k, cos, sin).transpose(-2, -1)


def test_rope_is_relative():
    # shifting every token by the same (row, column) leaves every attention score as it was
    torch.manual_seed(0)
    q, k, pos = torch.randn(2, 3, 22, 32), torch.randn(2, 3, 22, 32), token_positions(3, 4, 10)
    base = scores(q, k, pos)
    torch.testing.assert_close(scores(q, k, pos + torch.tensor([5.0, -7.0])), base, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(scores(q, k, pos * 2), base, atol=1e-2)  # while the distances matter
    # a rotation leaves lengths unchanged
    cos, sin = rotary(pos, 32)
    torch.testing.assert_close(rotate(q, cos, sin).norm(dim=-1), q.norm(dim=-1))


def test_rope_positions_image_grid_and_captions_at_the_origin():
    pos = token_positions(2, 3, 4)
    # image tokens row-major on their grid from the top-left corner; the caption, Flux's way, at the origin
    assert pos.tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]] + [[0, 0]] * 4
    cos, sin = rotary(pos, 32)
    assert torch.equal(cos[6:], torch.ones(4, 16)) and torch.equal(sin[6:], torch.zeros(4, 16))  # unrotated
    # axial: a head's first quarter of pairs turns with the row alone, the second with the column alone
    freqs = 10000.0 ** (-torch.arange(8) / 8)
    torch.testing.assert_close(torch.atan2(sin[5], cos[5]), torch.cat([1 * freqs, 2 * freqs]))
    # so the scores between a caption token and an image token tell where the image token is: absolute position,
    # which the relative code alone would not give
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 10, 32), torch.randn(1, 1, 10, 32)
    k[..., :6, :] = k[..., :1, :]  # the same key content on every image token
    assert scores(q, k, pos)[0, 0, 6, :6].unique().numel() == 6


def test_rope_model_has_no_table_and_runs_on_any_grid():
    m = randomize(DiT('DiT-Ti/4', 3, 64, 16, pos_embed='rope'))
    assert m.pos_embed is None and 'pos_embed' not in m.state_dict()
    ctx = torch.randn(1, 10, 64)
    for h, w in ((16, 16), (12, 20), (24, 8)):
        assert m(torch.randn(1, 3, h, w), torch.rand(1), ctx).shape == (1, 3, h, w)
    with pytest.raises(ValueError, match='pos_embed'):
        DiT('DiT-Ti/4', 3, 64, 16, pos_embed='learned')


def test_hash_text_encoder():
    enc = HashTextEncoder(dim=64, max_length=10)
    a, b, empty = enc(['small red circle on the left, blue background', 'small blue circle on the left, red background', ''])
    assert a.shape == (10, 64)
    assert torch.equal(empty, torch.zeros(10, 64))  # the unconditional input
    assert torch.equal(a[8:], torch.zeros(2, 64))  # padding after the 8 words
    assert not torch.allclose(a, b)  # word order matters: the shape's color is not the background's
    assert torch.equal(enc(['Small RED circle'])[0, :3], a[:3])  # case and punctuation do not
    assert torch.equal(HashTextEncoder(64, 10)(['red'])[0], enc(['red'])[0])  # the same vectors in every process
