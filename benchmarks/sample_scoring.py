"""Cost of scoring generated images per 1,000 images: in memory (uint8 -> FID Inception, libs/evaluation/sample_scorer.py)
against the PNG path (write `{i}.png`, read the folder back with decoding workers, Inception).

    python benchmarks/sample_scoring.py [--n 100] [--sizes 32 256] [--batch 25] [--weights PATH] [--out DIR]

Images: a tiny random pixel-space DiM (3 layers, width 64) sampled with 2 DPM-Solver steps at 32 x 32, resized
bilinearly to each size (PNG cost depends on size and content; Inception's does not: it resizes to 299).
Inception weights: --weights, or random ones (the same network and speed). Sampling itself is not timed (both paths
pay it alike). Writes sample_scoring.json with seconds per 1,000 images for each part.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from benchmarks.machine import cpu_name                          # noqa: E402
from libs import get_nnet                                        # noqa: E402
from libs.evaluation.fid import FIDInception, fid_inception_v3, folder_loader, load_inception   # noqa: E402
from libs.evaluation.sample_files import png_array, write_png               # noqa: E402
from libs.evaluation.sample_scorer import SampleScorer, to_uint8            # noqa: E402
from libs.sampling import SamplingSpec, decode, generate          # noqa: E402

TINY = dict(name='Mamba_DiT_S_2', attention_head_dim=32, num_layers=3, in_channels=3, sample_size=32,
            num_embeds_ada_norm=10)


def tiny_dim_images(n):
    """(n, 3, 32, 32) float images in [0, 1] from a random tiny DiM."""
    torch.manual_seed(0)
    nnet = get_nnet(**TINY).eval()
    spec = SamplingSpec(algorithm='dpm_solver', sample_steps=2, scale=0.0, num_classes=10, conditional=True, seed=0,
                        z_shape=(3, 32, 32), mini_batch_size=n)
    return decode(generate(nnet, spec, range(n), torch.arange(n) % 10))


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def measure(images, inception, batch, workers):
    """Seconds for each part of both paths over the given images."""
    n = len(images)

    def in_memory():
        scorer = SampleScorer(inception, n)
        for s in range(0, n, batch):
            scorer.add(images[s:s + batch], range(s, min(s + batch, n)))
        return scorer.gather()

    _, memory_s = timed(in_memory)
    with tempfile.TemporaryDirectory() as folder:
        def write():
            for i, image in enumerate(to_uint8(images)):
                write_png(png_array(image), os.path.join(folder, f'{i}.png'))

        def read():
            return [b for b in folder_loader(folder, batch, workers)]

        def read_and_score():
            return [inception.activations(b) for b in folder_loader(folder, batch, workers)]

        _, write_s = timed(write)
        _, read_s = timed(read)
        _, read_score_s = timed(read_and_score)
        png_bytes = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    return dict(in_memory_s=memory_s, png_write_s=write_s, png_read_s=read_s, png_read_and_inception_s=read_score_s,
                png_path_s=write_s + read_score_s, png_kb_per_image=png_bytes / n / 1024)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--n', type=int, default=100, help='images per size (figures are scaled to 1,000)')
    parser.add_argument('--sizes', type=int, nargs='+', default=[32, 256])
    parser.add_argument('--batch', type=int, default=25)
    parser.add_argument('--workers', type=int, default=min(8, os.cpu_count() or 1), help='PNG decoding processes')
    parser.add_argument('--weights', default=None, help='FID Inception weights (default: random ones)')
    parser.add_argument('--out', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results'))
    args = parser.parse_args(argv)
    inception = (load_inception(args.weights, 'cpu') if args.weights else
                 FIDInception(fid_inception_v3().state_dict()))
    base = tiny_dim_images(args.n)
    results = dict(machine=cpu_name(), threads=torch.get_num_threads(),
                   n=args.n, batch=args.batch, workers=args.workers, sizes={})
    for size in args.sizes:
        images = base if size == 32 else F.interpolate(base, size=(size, size), mode='bilinear',
                                                       align_corners=False).clamp(0, 1)
        seconds = measure(images, inception, args.batch, args.workers)
        per_1000 = {f'{k}_per_1000': round(v * 1000 / args.n, 2) for k, v in seconds.items() if k.endswith('_s')}
        per_1000['png_kb_per_image'] = round(seconds['png_kb_per_image'], 1)
        results['sizes'][str(size)] = per_1000
        print(f'{size}px, per 1,000 images: in memory {per_1000["in_memory_s_per_1000"]} s; PNG path '
              f'{per_1000["png_path_s_per_1000"]} s (write {per_1000["png_write_s_per_1000"]} s, read '
              f'{per_1000["png_read_s_per_1000"]} s, read + Inception {per_1000["png_read_and_inception_s_per_1000"]}'
              f' s; {per_1000["png_kb_per_image"]} KB per PNG)', flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'sample_scoring.json'), 'w') as f:
        json.dump(results, f, indent=2)


if __name__ == '__main__':
    main()
