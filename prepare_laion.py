"""
Turn LAION metadata parquet files into shards for data.py's URL streamer: filter, drop duplicate URLs, shuffle,
and write N shards of JSON lines {"url", "caption", "width", "height"} (read with the standard library alone).

    python prepare_laion.py --out_dir=laion-shards --num_shards=1024                      # Re-LAION from the hub
    python prepare_laion.py --input 'meta/*.parquet' --out_dir=laion-shards --min_side=256

The default input is Re-LAION-2B-en research-safe (laion/relaion2B-en-research-safe), the release that replaced
LAION-5B after its withdrawal in December 2023; it is gated on the hub (accept its terms, then `hf auth login`).
Re-running with the same settings writes the same shards.
"""
import argparse
import glob
import json
import os

import numpy as np
import pyarrow.parquet as pq
from tqdm import tqdm

# our name -> the names releases use for it (matched case-insensitively); None: optional
COLUMNS = {'url': ('url',), 'caption': ('caption', 'text'), 'width': ('original_width', 'width'),
           'height': ('original_height', 'height'), 'punsafe': ('punsafe',), 'pwatermark': ('pwatermark',),
           'similarity': ('similarity',), 'aesthetic': ('aesthetic_score', 'aesthetic')}
REQUIRED = ('url', 'caption', 'width', 'height')


def resolve(names, path):
    """Our column name -> the file's, for those present; a clear error when a required one is missing."""
    lower = {n.lower(): n for n in names}
    found = {ours: next((lower[c] for c in cands if c in lower), None) for ours, cands in COLUMNS.items()}
    missing = [k for k in REQUIRED if found[k] is None]
    if missing:
        raise SystemExit(f"error: {path} has no column for {', '.join(missing)} "
                         f"(looked for {', '.join('/'.join(COLUMNS[k]) for k in missing)}; it has {', '.join(names)})")
    return {k: v for k, v in found.items() if v is not None}


def input_files(spec, max_files):
    if os.path.exists(spec) or glob.has_magic(spec):
        files = sorted(glob.glob(os.path.join(spec, '*.parquet')) if os.path.isdir(spec) else glob.glob(spec))
    else:  # a hub dataset id
        from huggingface_hub import hf_hub_download, list_repo_files
        names = sorted(f for f in list_repo_files(spec, repo_type='dataset') if f.endswith('.parquet'))
        names = names[:max_files or None]
        files = [hf_hub_download(spec, f, repo_type='dataset') for f in tqdm(names, desc='download')]
    if not files:
        raise SystemExit(f'error: no parquet files in {spec!r}')
    return files[:max_files or None]


def keep_mask(t, a, counts):
    """Apply the filters to one table of columns (numpy arrays); count each row's first failing reason."""
    n = len(t['url'])
    keep = np.ones(n, dtype=bool)
    w, h = t['width'].astype(float), t['height'].astype(float)
    lengths = np.array([len(c) if isinstance(c, str) else -1 for c in t['caption']])
    checks = [
        ('bad_url', np.array([isinstance(u, str) and u.startswith(('http://', 'https://')) for u in t['url']])),
        ('caption_length', (lengths >= a.min_caption_len) & (lengths <= a.max_caption_len)),
        ('small', np.nan_to_num(np.minimum(w, h)) >= a.min_side),
        ('aspect', np.nan_to_num(np.maximum(w, h) / np.maximum(np.minimum(w, h), 1), nan=np.inf) <= a.max_aspect),
    ]
    for col, limit, below in (('punsafe', a.max_punsafe, True), ('pwatermark', a.max_pwatermark, True),
                              ('similarity', a.min_similarity, False), ('aesthetic', a.min_aesthetic, False)):
        if col in t:  # where present; a missing score (NaN) fails its filter
            v = t[col].astype(float)
            checks.append((col, v <= limit if below else v >= limit))
    for reason, ok in checks:
        counts[reason] = counts.get(reason, 0) + int((keep & ~ok).sum())
        keep &= ok
    return keep


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--input', default='laion/relaion2B-en-research-safe', help='hub dataset id, folder, file or glob')
    p.add_argument('--max_files', type=int, default=0, help='use only the first N parquet files (0: all)')
    p.add_argument('--out_dir', default='laion-shards')
    p.add_argument('--num_shards', type=int, default=64)
    p.add_argument('--min_side', type=int, default=256, help='pixels, of the original image')
    p.add_argument('--max_aspect', type=float, default=2.0)
    p.add_argument('--max_punsafe', type=float, default=0.1)
    p.add_argument('--max_pwatermark', type=float, default=0.8)
    p.add_argument('--min_similarity', type=float, default=0.0, help='CLIP image-text similarity')
    p.add_argument('--min_aesthetic', type=float, default=0.0)
    p.add_argument('--min_caption_len', type=int, default=5, help='characters')
    p.add_argument('--max_caption_len', type=int, default=1000)
    p.add_argument('--seed', type=int, default=0)
    a = p.parse_args()

    rows, seen, counts, read = [], set(), {}, 0
    for path in input_files(a.input, a.max_files):
        f = pq.ParquetFile(path)
        cols = resolve(f.schema_arrow.names, path)
        for batch in tqdm(f.iter_batches(batch_size=65536, columns=list(cols.values())), desc=os.path.basename(path),
                          total=f.metadata.num_row_groups):
            t = {ours: batch.column(theirs).to_numpy(zero_copy_only=False) for ours, theirs in cols.items()}
            read += len(t['url'])
            for i in np.nonzero(keep_mask(t, a, counts))[0]:
                url = t['url'][i]
                if url in seen:
                    counts['duplicate_url'] = counts.get('duplicate_url', 0) + 1
                    continue
                seen.add(url)
                rows.append({'url': url, 'caption': ' '.join(t['caption'][i].split()),
                             'width': int(t['width'][i]), 'height': int(t['height'][i])})
    if not rows:
        raise SystemExit(f'error: no row passed the filters ({read} read; dropped: {counts})')
    order = np.random.default_rng(a.seed).permutation(len(rows))
    os.makedirs(a.out_dir, exist_ok=True)
    n = min(a.num_shards, len(rows))
    for s in tqdm(range(n), desc='write shards'):
        with open(os.path.join(a.out_dir, f'shard_{s:05d}.jsonl'), 'w') as out:
            out.writelines(json.dumps(rows[i], ensure_ascii=False) + '\n' for i in order[s::n])
    summary = {'read': read, 'kept': len(rows), 'dropped': counts, 'shards': n, 'settings': vars(a)}
    with open(os.path.join(a.out_dir, 'summary.json'), 'w') as out:
        json.dump(summary, out, indent=1)
    print(f"read {read} rows, kept {len(rows)} in {n} shards under {a.out_dir}; dropped: "
          + (', '.join(f'{k} {v}' for k, v in counts.items() if v) or 'none'))


if __name__ == '__main__':
    main()
