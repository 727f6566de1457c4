"""Train DiM with the discrete-time latent diffusion objective.

    python train_ldm_discrete.py --config=configs/digits_DiM_tiny.py
    accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 train_ldm_discrete.py \
        --config=configs/imagenet256_H_DiM.py [--workdir=DIR] [--config.train.n_steps=...]
    accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml train_ldm_discrete.py --config=...

Restarting the same command resumes from the newest complete checkpoint in <workdir>/ckpts. What a run writes
and when: libs/training/trainer.py.
"""
import os

from absl import app, flags
from ml_collections import config_flags

from libs.config import config_name
from libs.training.trainer import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Training configuration (a configs/*.py file).', lock_config=False)
flags.DEFINE_string('workdir', None, 'Output folder (default: workdir/<config name>/default).')
flags.mark_flags_as_required(['config'])


def main(_):
    name = config_name(config_flags.get_config_filename(FLAGS['config']))
    train(FLAGS.config, FLAGS.workdir or os.path.join('workdir', name, 'default'), name)


if __name__ == '__main__':
    app.run(main)
