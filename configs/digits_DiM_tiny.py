"""A tiny DiM on scikit-learn's 8x8 digits, upsampled to 16x16: the embedded demo (CPU, minutes, no download).

Patch 4 gives a 4x4 token grid (a 54-token sequence with the pads and extra tokens).

The full official structure (scan orders, pad tokens, smoothers, long skips, adaLN-single) at small
width and depth; class-conditional with CFG label dropout and guided sampling as in the ImageNet configs.
"""
import ml_collections


def d(**kwargs):
    return ml_collections.ConfigDict(initial_dictionary=kwargs)


def get_config():
    config = ml_collections.ConfigDict()
    config.seed = 1234
    config.compile = 'none'          # or 'default', 'max-autotune', 'reduce-overhead': torch.compile (libs/model/compile.py)
    config.z_shape = (1, 16, 16)
    config.gradient_accumulation_steps = 1
    config.max_grad_norm = 1.0
    config.gradient_checkpointing = False
    config.recompute = 'auto'         # 'on' / 'off': recompute activations in backward (auto: only when memory is short)

    # batch 32 at lr 4e-3: for the same CPU time, twice the steps of batch 64 learn the class conditioning sooner
    # (docs/performance.md, "How the schedule was chosen")
    config.train = d(n_steps=1200, batch_size=32, mode='cond', log_interval=10,
                     eval_interval=600, save_interval=600, keep_ckpts=2, num_workers=0,
                     fid_interval=1200,                     # the digits report scores the last checkpoint (no FID)
                     grid_columns=10, report_per_class=50,  # samples per class: grid row, digits report
                     ema_rate=0.99,                         # a short run needs a short EMA
                     save_every_minutes=0.0,                # minutes between timed checkpoints (0: none)
                     stop_signals=('SIGTERM', 'SIGINT', 'SIGUSR1'))   # stop, save, exit 75
    config.optimizer = d(name='adamw', lr=4e-3, weight_decay=0.0, betas=(0.9, 0.99), eps=1e-8, fused=True)
    config.lr_scheduler = d(name='customized', warmup_steps=100)

    config.nnet = d(
        name='Mamba_DiT_S_2',
        num_attention_heads=1, attention_head_dim=96, num_layers=7,
        in_channels=1, out_channels=1, patch_size=4, sample_size=16,
        num_embeds_ada_norm=10,
        mamba_d_state=16, mamba_d_conv=3, mamba_expand=2,
        encoder_start_blk_id=1,
        pad_token_schedules=['dec_split', 'lateral'],
    )

    config.dataset = d(name='digits', resolution=16, p_uncond=0.1)
    config.sample = d(sample_steps=15, n_samples=500, mini_batch_size=100,
                      algorithm='dpm_solver', cfg=True, scale=3.0, path='')
    return config
