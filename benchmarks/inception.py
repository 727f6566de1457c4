"""Speed of the FID Inception (libs/evaluation/fid.py FIDInception, channels-last) against the same network in NCHW
(torch's default layout), per image, for each thread count.

    python benchmarks/inception.py [--batch 50] [--threads 1 2] [--repeats 2] [--out benchmarks/results/inception.json]

Random weights and random 8x8 images (the network resizes every input to 299 x 299, so its cost depends on neither).
Each figure is the best of --repeats timed passes over one batch, after one untimed warm-up pass. Also checks that
both layouts give the same pool features (to float32 rounding) and prints the largest difference.
"""
import argparse
import copy
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from benchmarks.machine import cpu_name                  # noqa: E402
from libs.evaluation.fid import FIDInception, fid_inception_v3     # noqa: E402


def seconds_per_image(model, h, repeats):
    """Best wall time of `repeats` passes of model.features over prepared inputs h (B,3,299,299), divided by B; and
    the (B,2048) features."""
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            out = model.features(h).flatten(1)
            times.append(time.perf_counter() - start)
    return min(times[1:]) / len(h), out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batch', type=int, default=50)
    parser.add_argument('--threads', type=int, nargs='+', default=[1, 2])
    parser.add_argument('--repeats', type=int, default=2)
    parser.add_argument('--out', default=None, help='JSON file for the results')
    args = parser.parse_args()

    torch.manual_seed(0)
    model = FIDInception(fid_inception_v3().state_dict())
    nchw = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    h = model._prepare(torch.rand(args.batch, 3, 8, 8))                        # channels-last
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        fast, a = seconds_per_image(model, h, args.repeats)
        slow, b = seconds_per_image(nchw, h.contiguous(), args.repeats)
        diff = (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)
        rows.append(dict(threads=threads, channels_last_ms_per_image=1e3 * fast, nchw_ms_per_image=1e3 * slow,
                         speedup=slow / fast, max_relative_difference=diff))
        print(f'{threads} thread(s): channels-last {1e3 * fast:.1f} ms/img, NCHW {1e3 * slow:.1f} ms/img '
              f'({slow / fast:.2f}x), pool features differ by {diff:.1e} (relative to their largest)', flush=True)
    if args.out:
        result = dict(machine=cpu_name(), torch=torch.__version__,
                      batch=args.batch, repeats=args.repeats, rows=rows)
        with open(args.out, 'w') as f:
            json.dump(result, f, indent=1)
        print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
