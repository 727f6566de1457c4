"""DiM-Large/2 on ImageNet 256x256 (latent 4x32x32)."""
import ml_collections


def d(**kwargs):
    return ml_collections.ConfigDict(initial_dictionary=kwargs)


def get_config():
    config = ml_collections.ConfigDict()
    config.seed = 1234
    config.compile = 'none'          # or 'default', 'max-autotune', 'reduce-overhead': torch.compile (libs/model/compile.py)
    config.z_shape = (4, 32, 32)
    config.autoencoder = d(pretrained_path='assets/stable-diffusion/autoencoder_kl_ema.pth')
    config.gradient_accumulation_steps = 1
    config.max_grad_norm = 1.0
    config.gradient_checkpointing = False
    config.recompute = 'auto'         # 'on' / 'off': recompute activations in backward (auto: only when memory is short)

    config.train = d(n_steps=300000, batch_size=1024, mode='cond',
                     log_interval=10, eval_interval=5000, save_interval=25000, fid_interval=25000,
                     num_workers=8, pin_memory=True, prefetch_factor=2,
                     save_every_minutes=60.0,               # a timed checkpoint, kept until the next one (0: none)
                     stop_signals=('SIGTERM', 'SIGINT', 'SIGUSR1'))   # stop, save, exit 75 (training-on-gpus.md)
    config.optimizer = d(name='adamw', lr=2e-4, weight_decay=0.03, betas=(0.99, 0.99), eps=1e-15, fused=True)
    config.lr_scheduler = d(name='customized', warmup_steps=5000)

    config.nnet = d(
        name='Mamba_DiT_L_2',
        num_attention_heads=16, attention_head_dim=64, num_layers=49,
        in_channels=4, out_channels=4, patch_size=2, sample_size=32,
        num_embeds_ada_norm=1000,
        mamba_d_state=16, mamba_d_conv=3, mamba_expand=2,
        encoder_start_blk_id=1,
        pad_token_schedules=['dec_split', 'lateral'],
    )

    config.dataset = d(name='imagenet', path='assets/datasets/ImageNet', resolution=256,
                       p_uncond=0.15,
                       fid_stat='assets/fid_stats/fid_stats_imagenet256_guided_diffusion.npz')
    config.sample = d(sample_steps=50, n_samples=50000, intermediate_n_samples=10000, mini_batch_size=25,
                      algorithm='dpm_solver', cfg=True, scale=0.4, path='')
    return config
