"""Test-only worker shim: run a script under accelerate's FSDP / DeepSpeed mode on CPU processes (gloo).

    accelerate launch --config_file configs/accelerate/<fsdp|deepspeed yaml> --num_processes 2 ... \
        tests/sharded_launch.py train_ldm_discrete.py --config=...

accelerate 1.15 only enables FSDP and DeepSpeed for GPU-type launches; on CPU processes it silently runs plain DDP.
This shim, run by every worker that `accelerate launch` (torchrun) starts, makes accelerate take the launch for a
GPU-type one whose backend is gloo and whose device is the CPU, then runs the unchanged script as `__main__`. Every
other setting comes from the launch config and command line as in a real GPU launch.
"""
import importlib
import os
import runpy
import sys

from accelerate.state import PartialState
from accelerate.utils import DistributedType


def _gloo_as_gpu_launch(self, cpu=False, sagemaker_dp=False, backend=None):
    if int(os.environ.get('LOCAL_RANK', -1)) == -1:
        raise RuntimeError('tests/sharded_launch.py runs inside `accelerate launch` (torchrun) workers only')
    return 'gloo', DistributedType.MULTI_GPU


def main():
    if os.environ.get('ACCELERATE_USE_CPU', 'false').lower() in ('1', 'true'):
        raise RuntimeError('tests/sharded_launch.py: unset ACCELERATE_USE_CPU (it would select plain DDP on CPU)')
    # FSDP1 places modules on `device_id`; 'cpu' (no index) is what it accepts for CPU.
    os.environ['ACCELERATE_TORCH_DEVICE'] = 'cpu'
    PartialState._prepare_backend = _gloo_as_gpu_launch
    if os.environ.get('ACCELERATE_USE_DEEPSPEED', 'false').lower() == 'true':
        # DeepSpeed's CPU accelerator JIT-compiles a shared-memory kernel (1-2 minutes) that only its
        # inference all-reduce uses; GPU launches never build it, so neither does this stand-in.
        importlib.import_module('deepspeed.comm.torch').build_shm_op = lambda: None
    script, *args = sys.argv[1:]
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name='__main__')


if __name__ == '__main__':
    main()
