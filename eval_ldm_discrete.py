"""Sample a trained DiM into a folder of PNGs and score it: FID, sFID, Inception Score, precision and recall
(ADM's suite) against the config's reference file; the digits config is scored by its classifier report.

    python eval_ldm_discrete.py --config=configs/imagenet256_H_DiM.py --nnet_path=PATH/nnet_ema.pth
    accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 eval_ldm_discrete.py \
        --config=configs/imagenet256_H_DiM.py --nnet_path=PATH/nnet_ema.pth [--config.sample.n_samples=10000] [--npz]
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 eval_ldm_discrete.py ...   # CPU processes

Any number of processes writes the same `{i}.png` files; restarting the same command goes on where it stopped.
The folder, its run.json / results.json and how scoring works: libs/evaluation/evaluate.py.
"""
import logging
import os

from absl import app, flags
from accelerate import Accelerator
from ml_collections import config_flags

from libs.config import config_name
from libs.evaluation.evaluate import run_evaluation
from libs.evaluation.fid import default_weights_path
from libs.evaluation.sample_files import NPZ_NAME

FLAGS = flags.FLAGS


def define_flags():
    config_flags.DEFINE_config_file('config', None, 'Sampling configuration (a configs/*.py file).', lock_config=False)
    flags.DEFINE_string('nnet_path', None, 'Network weights (nnet_ema.pth), loaded strictly.')
    flags.DEFINE_string('inception_path', None, 'FID Inception weights (default: config.sample.inception_path if '
                        f'set, else {default_weights_path()}).')
    flags.DEFINE_string('output_dir', None, 'Image folder (default: config.sample.path if set, else '
                        'workdir/<config name>/eval/<nnet folder>_<nnet file stem>).')
    flags.DEFINE_bool('overwrite', False, 'Delete the images of another run found in the output folder.')
    flags.DEFINE_bool('npz', False, f'Also write the samples as <output_dir>/{NPZ_NAME} (arr_0: uint8 N x H x W x 3), '
                      "the input of ADM's evaluations/evaluator.py (the tool DiT and SiT report with).")
    flags.mark_flags_as_required(['config', 'nnet_path'])


def evaluate(config, nnet_path, output_dir=None, inception_path=None, overwrite=False, name='config', npz=False):
    """Sample and score on this launch's processes; the results dict on the main process, None elsewhere."""
    accelerator = Accelerator()
    results = run_evaluation(accelerator, config, nnet_path, output_dir, inception_path, overwrite, name, npz)
    # Tear the process group down before exit: left to the interpreter's shutdown, its threads can die mid-use
    # and abort a finished run (SIGABRT / SIGBUS seen with 2 gloo processes). run_evaluation ended on a collective.
    accelerator.end_training()
    return results


def main(_):
    logging.basicConfig(level=logging.INFO if int(os.environ.get('RANK', 0)) == 0 else logging.ERROR, force=True,
                        format='%(asctime)s %(levelname)s %(message)s', datefmt='%H:%M:%S')
    name = config_name(config_flags.get_config_filename(FLAGS['config']))
    evaluate(FLAGS.config, FLAGS.nnet_path, FLAGS.output_dir, FLAGS.inception_path, FLAGS.overwrite, name,
             FLAGS.npz)


if __name__ == '__main__':
    define_flags()
    app.run(main)
