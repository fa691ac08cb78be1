"""FID, CLIP score and FD-DINOv2, offline: the Frechet distance against closed forms, and every metric's model a tiny
stand-in loaded through the path the real one takes (a TorchScript file for FID, save_pretrained folders for CLIP and
DINOv2). sample.py --eval and eval_interval run for real."""
import json
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import metrics
import shapes
from conftest import TINY, run

pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')  # TorchScript, the FID network's format


class TinyInception(torch.nn.Module):
    """The interface of NVIDIA's TorchScript Inception: uint8 (B, 3, H, W) in, resized inside, and with
    return_features=True the pool features (here 8 of them) instead of class probabilities."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(12, 8)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = F.interpolate(x.float(), size=(8, 8), mode='bilinear', align_corners=False) / 255
        parts = [x.mean((2, 3)), x.std((2, 3)), x[:, :, :4].mean((2, 3)), x[:, :, :, :4].mean((2, 3))]  # (B, 3) each
        f = self.proj(torch.cat(parts, 1))
        return f if return_features else f.softmax(-1)


@pytest.fixture(scope='module')
def models(tmp_path_factory):
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model, PreTrainedTokenizerFast
    root = tmp_path_factory.mktemp('metric-models')
    torch.jit.save(torch.jit.script(TinyInception()), str(root / 'inception.pt'))
    words = ['[PAD]', '[UNK]', '[BOS]', '[EOS]'] + sorted({w for s in shapes.all_scenes()
                                                          for w in shapes.CAPTION.format(**s).replace(',', '').split()})
    tok = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(words)}, unk_token='[UNK]'))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, pad_token_id=0, bos_token_id=2,
                         eos_token_id=3),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8), projection_dim=16))
    clip.save_pretrained(root / 'clip')
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token='[PAD]', unk_token='[UNK]', bos_token='[BOS]',
                            eos_token='[EOS]').save_pretrained(root / 'clip')
    Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, patch_size=14,
                             image_size=28)).save_pretrained(root / 'dino')
    return {k: str(root / v) for k, v in (('fid', 'inception.pt'), ('clip', 'clip'), ('dino', 'dino'))}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, 'CACHE', str(tmp_path / 'cache'))
    return tmp_path / 'cache'


def reference_folder(folder, n, size=16):
    """img2dataset's 'files' layout: shapes images as PNGs with their captions in .txt files of the same name."""
    folder.mkdir(parents=True)
    rng, captions = np.random.default_rng(0), []
    for i in range(n):
        img, caption, _ = shapes.random_scene(rng, size)
        Image.fromarray(img).save(folder / f'{i:05d}.png')
        (folder / f'{i:05d}.txt').write_text(caption)
        captions.append(caption)
    return captions


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    d1, d2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    # commuting (diagonal) covariances: ||mu1 - mu2||^2 + sum (sqrt(d1) - sqrt(d2))^2
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(d1) - np.sqrt(d2)) ** 2).sum()
    assert metrics.frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2)) == pytest.approx(expected, rel=1e-10)
    # non-commuting 2x2: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) for M = S1 S2, whose eigenvalues are >= 0
    a, b = rng.normal(size=(2, 2)), rng.normal(size=(2, 2))
    s1, s2 = a @ a.T + 0.1 * np.eye(2), b @ b.T + 0.1 * np.eye(2)
    m = s1 @ s2
    tr_sqrt = np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
    expected = ((mu1[:2] - mu2[:2]) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert metrics.frechet_distance(mu1[:2], s1, mu2[:2], s2) == pytest.approx(expected, rel=1e-9)
    # a set against itself, and against itself shifted
    x = rng.normal(size=(500, 16)) @ rng.normal(size=(16, 16))
    assert abs(metrics.frechet_distance(*metrics.gaussian(x), *metrics.gaussian(x))) < 1e-8
    shift = rng.normal(size=16)
    fd = metrics.frechet_distance(*metrics.gaussian(x), *metrics.gaussian(x + shift))
    assert fd == pytest.approx((shift ** 2).sum(), rel=1e-8)


def test_clip_score_by_path(models):
    from transformers import AutoTokenizer, CLIPModel
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    captions = ['large red circle in the center, blue background', 'small white square at the top', 'green']
    scores = metrics.CLIPScore(models['clip'], 'cpu')(images, captions)
    # by hand: normalised pixels, both towers' projections, 100 * cosine clipped at 0
    model, tok = CLIPModel.from_pretrained(models['clip']), AutoTokenizer.from_pretrained(models['clip'])
    mean, std = torch.tensor(metrics.CLIP_MEAN)[:, None, None], torch.tensor(metrics.CLIP_STD)[:, None, None]
    pixels = (torch.from_numpy(images).permute(0, 3, 1, 2) / 255 - mean) / std
    t = tok(captions, padding=True, return_tensors='pt')
    with torch.no_grad():
        img = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        txt = model.text_projection(model.text_model(**t).pooler_output)
    cos = F.cosine_similarity(img, txt)
    torch.testing.assert_close(scores, 100 * cos.clamp(min=0), atol=1e-4, rtol=1e-4)
    assert scores.shape == (3,) and (scores >= 0).all()


def test_reference_statistics_cached_and_reused(models, cache, tmp_path, monkeypatch):
    reference_folder(tmp_path / 'ref', 12)
    scorer = metrics.Scorer(models['fid'], '', models['dino'], 'cpu', batch=5)
    stats = scorer.reference(str(tmp_path / 'ref'), 12, 16)
    # the Gaussian of the stand-in's features of the very images, read independently
    images = np.stack([np.asarray(Image.open(tmp_path / 'ref' / f'{i:05d}.png')) for i in range(12)])
    net = torch.jit.load(models['fid'])
    feats = net(torch.from_numpy(images).permute(0, 3, 1, 2), return_features=True).detach().numpy()
    mu, sigma = metrics.gaussian(feats)
    np.testing.assert_allclose(stats['fid'][0], mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats['fid'][1], sigma, rtol=1e-4, atol=1e-6)
    assert stats['fd_dinov2'][0].shape == (16,) and len(list(cache.glob('ref-*.npz'))) == 1
    # read once: the second time nothing of the reference is loaded
    monkeypatch.setattr(metrics, 'reference_image', lambda *a, **k: pytest.fail('the reference was read again'))
    again = scorer.reference(str(tmp_path / 'ref'), 12, 16)
    np.testing.assert_array_equal(again['fid'][1], stats['fid'][1])
    # another n is another reference
    with pytest.raises(BaseException):
        scorer.reference(str(tmp_path / 'ref'), 10, 16)


def test_reference_sources_agree(tmp_path):
    """A folder, JSON lines and a tar shard of the same pairs give the same captions and images; broken images are
    skipped, not fatal."""
    import tarfile
    captions = reference_folder(tmp_path / 'ref', 4)
    (tmp_path / 'ref' / '00002.png').write_bytes(b'not a png')
    with open(tmp_path / 'ref.jsonl', 'w') as f:
        for i, c in enumerate(captions):
            f.write(json.dumps({'image': f'ref/{i:05d}.png', 'caption': c}) + '\n')
    with tarfile.open(tmp_path / 'ref.tar', 'w') as tar:
        for i in range(4):
            tar.add(tmp_path / 'ref' / f'{i:05d}.png', f'{i:09d}.png')
            tar.add(tmp_path / 'ref' / f'{i:05d}.txt', f'{i:09d}.txt')
    loaded = []
    for ref in ('ref', 'ref.jsonl', 'ref.tar'):
        rows = list(metrics.reference_rows(str(tmp_path / ref), 4))
        assert [r['caption'] for r in rows] == captions
        loaded.append([metrics.reference_image(r, 16) for r in rows])
    for images in loaded:
        assert isinstance(images[2], metrics.Skip)
        for a, b in zip(images, loaded[0]):
            if not isinstance(a, metrics.Skip):
                np.testing.assert_array_equal(a, b)
                assert a.shape == (16, 16, 3)
    assert len(list(metrics.reference_rows(str(tmp_path / 'ref'), 3))) == 3
    with pytest.raises(SystemExit, match='no reference set'):
        metrics.reference_rows(str(tmp_path / 'nothing-*.jsonl'))


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp('run')
    run([sys.executable, 'train.py', *TINY, f'--out_dir={out}', '--max_iters=3', '--tensorboard_log=False'])
    return out


def eval_args(models, ref, out, *extra):
    return [sys.executable, 'sample.py', '--eval', f'--out_dir={out}', f'--ref={ref}', '--eval_n=10', '--batch=4',
            '--steps=2', '--device=cpu', '--dtype=float32', f"--fid_model={models['fid']}",
            f"--clip_model={models['clip']}", f"--dino_model={models['dino']}", *extra]


def test_sample_eval_against_a_reference(models, checkpoint, tmp_path):
    import sample
    captions = reference_folder(tmp_path / 'ref', 10)
    env = {'FLOWDIT_CACHE': str(tmp_path / 'cache')}
    p = run(eval_args(models, tmp_path / 'ref', checkpoint), env=env)
    written = json.loads((checkpoint / 'eval-000003-n10-cfg4.json').read_text())
    res = written['results']
    assert set(res) == {'fid', 'clip_score', 'fd_dinov2'} and written['step'] == 3
    assert written['settings']['steps'] == 2 and written['settings']['n'] == 10
    assert f"fid {res['fid']:.4g}" in p.stdout and list((tmp_path / 'cache').glob('ref-*.npz'))
    assert not list(checkpoint.glob('*.partial.npz'))
    # the same numbers by hand: the checkpoint's images for the reference's captions, the stand-ins' features
    model, te, vae, cfg, step = sample.load_for_sampling(str(checkpoint), 'cpu')
    gen = dict(steps=2, cfg=4.0, sampler='euler', shift=1.0, negative_prompt='')
    images = np.concatenate([im for _, im in sample.generate_many(model, te, vae, captions, 4, 0, **gen)])
    ref = np.stack([np.asarray(Image.open(tmp_path / 'ref' / f'{i:05d}.png')) for i in range(10)])
    net = torch.jit.load(models['fid'])
    feats = [net(torch.from_numpy(x).permute(0, 3, 1, 2), return_features=True).detach().numpy() for x in (images, ref)]
    fid = metrics.frechet_distance(*metrics.gaussian(feats[0]), *metrics.gaussian(feats[1]))
    assert res['fid'] == pytest.approx(fid, rel=1e-3)
    clip = metrics.CLIPScore(models['clip'], 'cpu')(images, captions)
    assert res['clip_score'] == pytest.approx(clip.mean().item(), rel=1e-3)
    # a missing reference is a one-line error
    p = run(eval_args(models, tmp_path / 'nowhere', checkpoint), check=False, env=env)
    assert p.returncode != 0 and 'no reference set' in p.stderr and 'Traceback' not in p.stderr


def test_interrupted_eval_resumes_to_the_same_numbers(models, checkpoint, tmp_path):
    import sample
    model, te, vae, cfg, step = sample.load_for_sampling(str(checkpoint), 'cpu')
    scorer = metrics.Scorer(models['fid'], models['clip'], '', 'cpu')
    prompts = [shapes.CAPTION.format(**s) for s in shapes.all_scenes()[::97]]  # 18
    gen = dict(steps=2, cfg=4.0)
    whole = sample.score_images(model, te, vae, scorer, prompts, 4, 0, **gen)
    partial, calls = str(tmp_path / 'eval.partial.npz'), []

    def dies_on_the_third(images, captions):
        calls.append(len(images))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return scorer(images, captions)
    with pytest.raises(KeyboardInterrupt):
        sample.score_images(model, te, vae, dies_on_the_third, prompts, 4, 0, partial, save_every=0, **gen)
    resumed = sample.score_images(model, te, vae, scorer, prompts, 4, 0, partial, save_every=0, **gen)
    assert sum(len(p['clip_score']) for p in resumed) == 18
    joined = [{k: np.concatenate([p[k] for p in parts]) for k in parts[0]} for parts in (whole, resumed)]
    for k in ('fid', 'clip_score'):
        np.testing.assert_allclose(joined[1][k], joined[0][k], rtol=1e-5, atol=1e-5)


def scalars(folder, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(folder), size_guidance={'scalars': 0, 'images': 0}).Reload()
    return {e.step: e.value for e in events.Scalars(tag)}, events


def test_loss_by_t_is_each_bins_mean_and_shows_an_empty_bin_as_a_dash():
    line, scalars = metrics.loss_by_t([2.0, 0.0, 3.0, 1.0], [4.0, 0.0, 3.0, 2.0])
    assert line == '  loss by t: [0.00,0.25) 0.5000 [0.25,0.50) - [0.50,0.75) 1.0000 [0.75,1.00) 0.5000'
    assert scalars == {'loss_by_t/[0.00,0.25)': 0.5, 'loss_by_t/[0.50,0.75)': 1.0, 'loss_by_t/[0.75,1.00)': 0.5}


def test_eval_interval_and_tensorboard_curves_shapes(tmp_path):
    """Training evaluates the EMA every eval_interval steps, logs the numbers and the curves; the last evaluation is
    the one sample.py --eval gives of the checkpoint."""
    out = tmp_path / 'run'
    p = run([sys.executable, 'train.py', *TINY, f'--out_dir={out}', '--max_iters=4', '--eval_interval=2',
             '--eval_n=16', '--sample_interval=2', '--sample_steps=3', '--dtype=float32'])
    assert p.stdout.count('eval step') == 2
    losses, events = scalars(out, 'train/loss')
    logged = {int(line.split()[1]): float(line.split('loss ')[1].split()[0])
              for line in p.stdout.splitlines() if line.startswith('step ')}
    assert sorted(losses) == [1, 2, 3, 4] and all(abs(losses[s] - logged[s]) < 1e-4 for s in logged)
    assert {'train/lr', 'train/images_per_s', 'eval/shape', 'eval/color'} <= set(events.Tags()['scalars'])
    assert any(t.startswith('loss_by_t/') for t in events.Tags()['scalars'])
    assert [e.step for e in events.Images('samples')] == [2, 4]
    shape_curve, _ = scalars(out, 'eval/shape')
    assert sorted(shape_curve) == [2, 4]
    run([sys.executable, 'sample.py', '--eval', f'--out_dir={out}', f'--eval_stride={1680 // 16}', '--device=cpu',
         '--dtype=float32'])
    final = json.loads((out / 'eval-000004-shapes.json').read_text())['results']
    assert final['shape'] == pytest.approx(shape_curve[4], abs=1e-6)
    last_eval = [line for line in p.stdout.splitlines() if line.startswith('eval step')][-1]
    assert last_eval.startswith('eval step 4:') and f"shape {final['shape']:.4g}" in last_eval
    # an evaluation at other settings is written beside the first, not over it
    first = (out / 'eval-000004-shapes.json').read_text()
    run([sys.executable, 'sample.py', '--eval', f'--out_dir={out}', f'--eval_stride={1680 // 8}', '--device=cpu',
         '--dtype=float32', '--cfg=2'])
    assert (out / 'eval-000004-shapes.json').read_text() == first
    [other] = [json.loads(f.read_text()) for f in out.glob('eval-000004-shapes-*.json')]
    assert other['settings']['cfg'] == 2 and other['settings']['eval_stride'] == 210
    # and a file that no longer reads as JSON (cut short by hand, say) is kept as it is, not overwritten or fatal
    (out / 'eval-000004-shapes.json').write_text('{"step": 4, "res')
    run([sys.executable, 'sample.py', '--eval', f'--out_dir={out}', f'--eval_stride={1680 // 16}', '--device=cpu',
         '--dtype=float32'])
    assert (out / 'eval-000004-shapes.json').read_text() == '{"step": 4, "res'
    again = [json.loads(f.read_text()) for f in out.glob('eval-000004-shapes-*.json')]
    assert len(again) == 2 and any(e['results'] == final for e in again)


@pytest.mark.slow
def test_eval_interval_over_two_ranks_puts_their_shares_together(tmp_path):
    """Under torchrun each rank makes half of the evaluation's images, from its own seed; the logged numbers are the
    mean of the two halves' adherence, as one process computes them from the checkpoint's EMA."""
    import sample
    out = tmp_path / 'run'
    run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train.py', *TINY,
         f'--out_dir={out}', '--max_iters=2', '--eval_interval=2', '--eval_n=16', '--sample_steps=3',
         '--dtype=float32'])
    model, te, vae, cfg, step = sample.load_for_sampling(out, 'cpu')
    scenes = shapes.all_scenes()[::1680 // 16]
    gen = dict(steps=3, cfg=cfg['sample_cfg'])
    halves = [sample.evaluate_shapes(model, te, vae, scenes[:8], 0, **gen),
              sample.evaluate_shapes(model, te, vae, scenes[8:], 8, **gen)]
    assert halves[0] != halves[1]  # the test tells the whole from either half
    for k in halves[0]:
        logged, _ = scalars(out, f'eval/{k}')
        assert logged[2] == pytest.approx((halves[0][k] + halves[1][k]) / 2, abs=1e-6), k


def test_eval_interval_fid_on_laion(models, tmp_path):
    """A LAION-style run (tar shards) with eval_ref: FID and CLIP score every eval_interval steps, the same numbers
    as sample.py --eval of the checkpoint; and without eval_ref a one-line error."""
    from test_shards import write_tar
    (tmp_path / 'tars').mkdir()
    write_tar(tmp_path / 'tars' / '00000.tar', [f'sample {i}' for i in range(8)])
    reference_folder(tmp_path / 'ref', 8)
    out = tmp_path / 'run'
    args = [sys.executable, 'train.py', *TINY, '--dataset=laion', f"--data_shards={tmp_path / 'tars' / '*.tar'}",
            '--data_workers=1', '--fetch_threads=1', '--min_image_size=16', f'--cache_dir={tmp_path / "cache"}',
            '--batch_size=4', '--max_iters=2', '--sample_steps=2', '--dtype=float32', f'--out_dir={out}',
            '--eval_interval=2', '--eval_n=8', f"--fid_model={models['fid']}", f"--clip_model={models['clip']}"]
    env = {'FLOWDIT_CACHE': str(tmp_path / 'stats')}
    p = run(args, check=False, env=env)
    assert p.returncode != 0 and 'eval_ref' in p.stderr and 'Traceback' not in p.stderr
    p = run(args + [f"--eval_ref={tmp_path / 'ref'}"], env=env)
    fid, _ = scalars(out, 'eval/fid')
    clip, _ = scalars(out, 'eval/clip_score')
    assert sorted(fid) == [2] and fid[2] > 0 and 'eval step 2: fid' in p.stdout
    run(eval_args(models, tmp_path / 'ref', out, '--eval_n=8', '--batch=64', '--dino_model='), env=env)
    res = json.loads((out / 'eval-000002-n8-cfg4.json').read_text())['results']
    assert res['fid'] == pytest.approx(fid[2], rel=1e-4) and res['clip_score'] == pytest.approx(clip[2], rel=1e-4)


def test_wandb_when_asked_and_no_extras_when_off(tmp_path):
    """wandb_log sends what the log says to Weights & Biases (a stand-in module with wandb's API records it here);
    off, neither wandb nor TensorBoard is imported."""
    fake = tmp_path / 'fake'
    fake.mkdir()
    (fake / 'wandb.py').write_text(
        'import json, os\n'
        'def _write(**kw):\n'
        '    with open(os.environ["WANDB_RECORD"], "a") as f:\n'
        '        f.write(json.dumps(kw, default=str) + "\\n")\n'
        'def init(project, name, config): _write(init=project, name=name, max_iters=config["max_iters"])\n'
        'def log(data, step): _write(step=step, keys=sorted(data), loss=data.get("train/loss"))\n'
        'def finish(): _write(finish=True)\n'
        'class Image:\n'
        '    def __init__(self, array): self.shape = array.shape\n')
    record = tmp_path / 'record.jsonl'
    p = run([sys.executable, 'train.py', *TINY, f"--out_dir={tmp_path / 'run'}", '--max_iters=2', '--wandb_log=True',
             '--wandb_run_name=tiny', '--sample_interval=2', '--sample_steps=2', '--tensorboard_log=False'],
            env={'PYTHONPATH': str(fake), 'WANDB_RECORD': str(record)})
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert calls[0] == {'init': 'flowdit', 'name': 'tiny', 'max_iters': 2} and calls[-1] == {'finish': True}
    losses = {c['step']: c['loss'] for c in calls if c.get('loss') is not None}
    logged = {int(line.split()[1]): float(line.split('loss ')[1].split()[0])
              for line in p.stdout.splitlines() if line.startswith('step ')}
    assert sorted(losses) == [1, 2] and all(abs(losses[s] - logged[s]) < 1e-4 for s in logged)
    assert any(c.get('keys') == ['samples'] and c['step'] == 2 for c in calls)
    assert not list((tmp_path / 'run').glob('events.out.tfevents*'))
    probe = ("import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path('train.py', run_name='__main__'); "
             "assert 'wandb' not in sys.modules and 'torch.utils.tensorboard' not in sys.modules, 'imported'")
    run([sys.executable, '-c', probe, 'train.py', *TINY, f"--out_dir={tmp_path / 'off'}", '--max_iters=1',
         '--tensorboard_log=False'], env={'PYTHONPATH': str(fake), 'WANDB_RECORD': str(record)})
