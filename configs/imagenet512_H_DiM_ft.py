"""DiM-Huge/2 on ImageNet 512x512 (latent 4x64x64), fine-tuned from the 256 model. Released checkpoint: FID 3.94."""
import ml_collections


def d(**kwargs):
    return ml_collections.ConfigDict(initial_dictionary=kwargs)


def get_config():
    config = ml_collections.ConfigDict()
    config.seed = 1234
    config.compile = 'none'          # or 'default', 'max-autotune', 'reduce-overhead': torch.compile (libs/model/compile.py)
    config.z_shape = (4, 64, 64)
    config.autoencoder = d(pretrained_path='assets/stable-diffusion/autoencoder_kl_ema.pth')
    # Real accumulation: 240 x 2 = 480 samples per optimiser step.
    config.gradient_accumulation_steps = 2
    config.max_grad_norm = 1.0
    # On: without it the official per-GPU batch needs more than an 80 GB card holds under DDP (the sharded launches
    # leave little headroom; libs/model/memory_estimate.py, python benchmarks/activation_memory.py prints the table).
    config.gradient_checkpointing = True
    config.recompute = 'auto'         # 'on' / 'off': recompute activations in backward (auto: only when memory is short)

    config.train = d(n_steps=64000, batch_size=240, mode='cond',
                     log_interval=10, eval_interval=1000, save_interval=10000, fid_interval=10000,
                     num_workers=8, pin_memory=True, prefetch_factor=2,
                     save_every_minutes=60.0,               # a timed checkpoint, kept until the next one (0: none)
                     stop_signals=('SIGTERM', 'SIGINT', 'SIGUSR1'))   # stop, save, exit 75 (training-on-gpus.md)
    config.optimizer = d(name='adamw', lr=1e-4, weight_decay=0.0, betas=(0.99, 0.99), eps=1e-15, fused=True)
    config.lr_scheduler = d(name='customized', warmup_steps=2500)

    config.nnet = d(
        name='Mamba_DiT_H_2',
        num_attention_heads=1, attention_head_dim=1536, num_layers=49,
        in_channels=4, out_channels=4, patch_size=2, sample_size=64,
        num_embeds_ada_norm=1000,
        mamba_d_state=16, mamba_d_conv=3, mamba_expand=2,
        encoder_start_blk_id=1,
        pad_token_schedules=['dec_split', 'rho_pad'],
        multi_times=2,
        # The released 256 EMA weights; the 16x16 positional table is interpolated to 32x32 at load.
        pretrained_path='assets/dim/imagenet256_H_DiM/nnet_ema.pth',
    )

    config.dataset = d(name='imagenet512_features', path='assets/datasets/imagenet512_features',
                       p_uncond=0.15,
                       fid_stat='assets/fid_stats/fid_stats_imagenet512_guided_diffusion.npz')
    config.sample = d(sample_steps=50, n_samples=50000, intermediate_n_samples=10000, mini_batch_size=25,
                      algorithm='dpm_solver', cfg=True, scale=0.7, path='')
    return config
