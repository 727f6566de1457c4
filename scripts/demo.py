"""A local web page that makes images with a DiM: pick classes by name, seed, steps and guidance (Gradio, install
with `pip install -e ".[demo]"`).

    python scripts/demo.py                                     # the digits model of the README's quick start
    python scripts/demo.py --pipeline dim-imagenet256          # a folder of scripts/convert_to_diffusers.py
    python scripts/demo.py --config configs/imagenet256_H_DiM.py --nnet_path assets/dim/imagenet256_H_DiM/nnet_ema.pth

Then open http://127.0.0.1:7860 (--host, --port to change). Runs on the GPU when there is one.
"""
import argparse
import glob
import os
import sys

os.environ.setdefault('GRADIO_ANALYTICS_ENABLED', 'False')     # nothing leaves this machine

import torch  # noqa: E402

from libs.config import load_config  # noqa: E402
from libs.pipeline import DiMPipeline  # noqa: E402
from libs.pipeline.convert import pipeline_from_config  # noqa: E402
from libs.pipeline.demo import serve  # noqa: E402

DIGITS_CONFIG = 'configs/digits_DiM_tiny.py'
DIGITS_RUN = 'workdir/digits_DiM_tiny/default'


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='Serve a local page that makes images with a DiM.')
    p.add_argument('--pipeline', help='a pipeline folder (scripts/convert_to_diffusers.py)')
    p.add_argument('--config', help='a configs/*.py file, with --nnet_path')
    p.add_argument('--nnet_path', help='its weights (.pth, .safetensors or a pipeline folder)')
    p.add_argument('--host', default='127.0.0.1')
    p.add_argument('--port', type=int, default=7860)
    return p.parse_args(argv)


def digits_checkpoint():
    """The last checkpoint of the quick start's run, or None."""
    paths = glob.glob(os.path.join(DIGITS_RUN, 'ckpts', '*.ckpt', 'nnet_ema.pth'))
    return max(paths, key=lambda p: int(os.path.basename(os.path.dirname(p)).split('.')[0])) if paths else None


def load_pipeline(args):
    if args.pipeline:
        if args.config or args.nnet_path:
            raise ValueError('give --pipeline or --config with --nnet_path, not both')
        return DiMPipeline.from_pretrained(args.pipeline)
    if bool(args.config) != bool(args.nnet_path):
        raise ValueError('--config and --nnet_path go together')
    if args.config:
        return pipeline_from_config(load_config(args.config), args.nnet_path)
    nnet_path = digits_checkpoint()
    if nnet_path is None:
        sys.exit(f"no pipeline given and no digits model in {DIGITS_RUN}: "
                 f"train it with `python train_ldm_discrete.py --config={DIGITS_CONFIG}` (minutes on a CPU), or "
                 "pass --pipeline FOLDER or --config C --nnet_path P")
    print(f"serving the digits model {nnet_path}")
    return pipeline_from_config(load_config(DIGITS_CONFIG), nnet_path)


def main(argv=None):
    args = parse_args(argv)
    pipe = load_pipeline(args)
    if torch.cuda.is_available():
        pipe.to('cuda')
    serve(pipe, host=args.host, port=args.port)


if __name__ == '__main__':
    main()
