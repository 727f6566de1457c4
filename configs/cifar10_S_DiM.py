"""DiM-Small/2 on CIFAR-10 32x32, pixel space, unconditional.

Unlike the official continuous-time train.py, CIFAR-10 goes through train_ldm_discrete.py with the
same discrete schedule as ImageNet (no checkpoint was released for it).
"""
import ml_collections


def d(**kwargs):
    return ml_collections.ConfigDict(initial_dictionary=kwargs)


def get_config():
    config = ml_collections.ConfigDict()
    config.seed = 1234
    config.compile = 'none'          # or 'default', 'max-autotune', 'reduce-overhead': torch.compile (libs/model/compile.py)
    config.z_shape = (3, 32, 32)
    config.gradient_accumulation_steps = 1
    config.max_grad_norm = None  # the official CIFAR run had no clipping
    config.gradient_checkpointing = False
    config.recompute = 'auto'         # 'on' / 'off': recompute activations in backward (auto: only when memory is short)

    config.train = d(n_steps=500000, batch_size=128, mode='uncond',
                     log_interval=10, eval_interval=5000, save_interval=50000, fid_interval=50000,
                     num_workers=8, pin_memory=True, prefetch_factor=2,
                     save_every_minutes=60.0,               # a timed checkpoint, kept until the next one (0: none)
                     stop_signals=('SIGTERM', 'SIGINT', 'SIGUSR1'))   # stop, save, exit 75 (training-on-gpus.md)
    config.optimizer = d(name='adamw', lr=2e-4, weight_decay=0.03, betas=(0.99, 0.999), eps=1e-8, fused=True)
    config.lr_scheduler = d(name='customized', warmup_steps=2500)

    config.nnet = d(
        name='Mamba_DiT_S_2',
        num_attention_heads=1, attention_head_dim=512, num_layers=25,
        in_channels=3, out_channels=3, patch_size=2, sample_size=32,
        num_embeds_ada_norm=10,
        mamba_d_state=16, mamba_d_conv=3, mamba_expand=2,
        encoder_start_blk_id=1,
        pad_token_schedules=['dec_split', 'lateral'],
    )

    config.dataset = d(name='cifar10', path='assets/datasets/cifar10', random_flip=True,
                       fid_stat='assets/fid_stats/fid_stats_cifar10_train_pytorch.npz')
    config.sample = d(sample_steps=1000, n_samples=50000, intermediate_n_samples=10000, mini_batch_size=500,
                      algorithm='euler_maruyama', path='')
    return config
