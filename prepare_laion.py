"""
Turn LAION metadata parquet files into shards for data.py's URL streamer: filter, drop duplicate URLs, shuffle,
and write N shards of JSON lines {"url", "caption", "width", "height"} (read with the standard library alone).

    python prepare_laion.py --out_dir=laion-shards --num_shards=1024                      # Re-LAION from the hub
    python prepare_laion.py --input 'meta/*.parquet' --out_dir=laion-shards --min_side=256

The default input is Re-LAION-2B-en research-safe (laion/relaion2B-en-research-safe), the release that replaced
LAION-5B after its withdrawal in December 2023; it is gated on the hub (accept its terms, then `hf auth login`).

Two passes over all cores, in memory bounded by the largest output shard, not by the dataset (a set of 2B URLs alone
would take well over 100 GB): 1. each parquet file's kept rows go, as JSON lines, to the output shard a hash of their
URL names, so that all copies of a URL meet in one shard; 2. each shard drops its duplicate URLs (the first in file
order stays) and is shuffled. The same settings and inputs write the same shards and summary whatever --workers.
Interrupted, a re-run with the same settings redoes only what is missing: a step's output is written under a
temporary name and renamed when complete, and out_dir/.work keeps each finished step's counts until the summary.
"""
import argparse
import glob
import json
import multiprocessing
import os
import shutil
import zlib

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


def write_atomic(path, text):
    with open(path + '.tmp', 'w') as f:
        f.write(text)
    os.replace(path + '.tmp', path)  # a half-written file never has the final name


def route(job):
    """Pass 1 for parquet file i: its kept rows, as JSON lines, to work/file_i/SHARD.jsonl; returns its counts."""
    i, path, a, work = job
    done = os.path.join(work, f'file_{i:05d}.json')
    if os.path.exists(done):
        return json.load(open(done))
    folder = os.path.join(work, f'file_{i:05d}')
    shutil.rmtree(folder, ignore_errors=True)  # the rest of an interrupted attempt
    os.makedirs(folder)
    f = pq.ParquetFile(path)
    cols = resolve(f.schema_arrow.names, path)
    counts, read = {}, 0
    for batch in f.iter_batches(batch_size=65536, columns=list(cols.values())):
        t = {ours: batch.column(theirs).to_numpy(zero_copy_only=False) for ours, theirs in cols.items()}
        read += len(t['url'])
        lines = {}
        for j in np.nonzero(keep_mask(t, a, counts))[0]:
            url = t['url'][j]
            row = {'url': url, 'caption': ' '.join(t['caption'][j].split()), 'width': int(t['width'][j]),
                   'height': int(t['height'][j])}
            lines.setdefault(zlib.crc32(url.encode()) % a.num_shards, []).append(json.dumps(row, ensure_ascii=False))
        for s, rows in lines.items():
            with open(os.path.join(folder, f'{s:05d}.jsonl'), 'a') as out:
                out.write('\n'.join(rows) + '\n')
    result = {'read': read, 'dropped': counts}
    write_atomic(done, json.dumps(result))
    return result


def merge(job):
    """Pass 2 for output shard s: its rows from every file in file order, each URL's first copy, shuffled."""
    s, n_files, a, work = job
    done = os.path.join(work, f'shard_{s:05d}.json')
    if os.path.exists(done):
        return json.load(open(done))
    seen, rows, duplicates = set(), [], 0
    parts = [os.path.join(work, f'file_{i:05d}', f'{s:05d}.jsonl') for i in range(n_files)]
    for part in parts:
        if os.path.exists(part):
            for line in open(part):
                url = json.loads(line)['url']
                if url in seen:
                    duplicates += 1
                else:
                    seen.add(url)
                    rows.append(line)
    if rows:
        order = np.random.default_rng([a.seed, s]).permutation(len(rows))
        write_atomic(os.path.join(a.out_dir, f'shard_{s:05d}.jsonl'), ''.join(rows[k] for k in order))
    result = {'kept': len(rows), 'duplicate_url': duplicates}
    write_atomic(done, json.dumps(result))
    for part in parts:  # the shard is safe: its parts are not needed again (disk)
        if os.path.exists(part):
            os.remove(part)
    return result


def run(fn, jobs, workers, desc):
    """fn over jobs, in order, on `workers` processes (1: this one)."""
    if workers == 1:
        return [fn(job) for job in tqdm(jobs, desc=desc)]
    with multiprocessing.Pool(workers) as pool:
        return list(tqdm(pool.imap(fn, jobs), total=len(jobs), desc=desc))


def main(argv=None):
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
    p.add_argument('--workers', type=int, default=os.cpu_count(), help='processes (the output does not depend on it)')
    a = p.parse_args(argv)
    for flag, least in (('num_shards', 1), ('workers', 1), ('max_files', 0)):  # a one-line error, not a traceback
        if getattr(a, flag) < least:
            raise SystemExit(f'error: --{flag} must be at least {least}, got {getattr(a, flag)}')

    settings = {k: v for k, v in vars(a).items() if k not in ('workers', 'out_dir')}  # what decides the output
    files = input_files(a.input, a.max_files)
    for f in files:  # a missing column is a one-line error now, not in a worker process
        resolve(pq.read_schema(f).names, f)
    work = os.path.join(a.out_dir, '.work')
    os.makedirs(work, exist_ok=True)
    marker = os.path.join(work, 'settings.json')
    if os.path.exists(marker) and json.load(open(marker)) != {**settings, 'files': files}:
        raise SystemExit(f'error: {a.out_dir} holds an unfinished run with other settings or inputs: '
                         f'finish it, or delete {work}')
    write_atomic(marker, json.dumps({**settings, 'files': files}))
    routed = run(route, [(i, f, a, work) for i, f in enumerate(files)], a.workers, 'pass 1: filter and route')
    merged = run(merge, [(s, len(files), a, work) for s in range(a.num_shards)], a.workers, 'pass 2: dedup, shuffle')
    counts = {}
    for r in routed:
        for reason, n in r['dropped'].items():
            counts[reason] = counts.get(reason, 0) + n
    counts['duplicate_url'] = sum(m['duplicate_url'] for m in merged)
    read, kept = sum(r['read'] for r in routed), sum(m['kept'] for m in merged)
    if not kept:
        raise SystemExit(f'error: no row passed the filters ({read} read; dropped: {counts})')
    summary = {'read': read, 'kept': kept, 'dropped': counts, 'shards': sum(m['kept'] > 0 for m in merged),
               'settings': settings}
    write_atomic(os.path.join(a.out_dir, 'summary.json'), json.dumps(summary, indent=1))
    shutil.rmtree(work)
    print(f"read {read} rows, kept {kept} in {summary['shards']} shards under {a.out_dir}; dropped: "
          + (', '.join(f'{k} {v}' for k, v in counts.items() if v) or 'none'))


if __name__ == '__main__':
    main()
