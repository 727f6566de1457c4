"""Training-free 1024x1024 generation (latent 4x128x128) from the 512 model with upsample guidance.

Evaluation only: pass the released 512 weights with --nnet_path. Their 32x32 positional table is
interpolated to this config's 64x64 grid at load, as the official code does.
"""
import ml_collections

MULTI_TIMES = 2  # upsampling factor m: 512 * m pixels


def d(**kwargs):
    return ml_collections.ConfigDict(initial_dictionary=kwargs)


def get_config():
    base_latent, patch_size = 64, 2
    latent = base_latent * MULTI_TIMES
    config = ml_collections.ConfigDict()
    config.seed = 1234
    config.compile = 'none'          # or 'default', 'max-autotune', 'reduce-overhead': torch.compile (libs/model/compile.py)
    config.z_shape = (4, latent, latent)
    config.autoencoder = d(pretrained_path='assets/stable-diffusion/autoencoder_kl_ema.pth')

    config.nnet = d(
        name='Mamba_DiT_H_2',
        num_attention_heads=1, attention_head_dim=1536, num_layers=49,
        in_channels=4, out_channels=4, patch_size=patch_size, sample_size=latent,
        num_embeds_ada_norm=1000,
        mamba_d_state=16, mamba_d_conv=3, mamba_expand=2,
        encoder_start_blk_id=1,
        pad_token_schedules=['dec_split', 'rho_pad'],
        multi_times=MULTI_TIMES,
        # Token grids of the high-res pass, the intermediate size and the 512 base; the first sets the table size.
        num_patches=[(latent // patch_size) ** 2, (latent // 2 // patch_size) ** 2, (base_latent // patch_size) ** 2],
        is_skip_tune=True, skip_tune_param=(0.82, 1.0),
    )

    # FID of these images is measured against the 512 statistics, as in the official code.
    config.dataset = d(name='imagenet512_features', path='assets/datasets/imagenet512_features',
                       p_uncond=0.15,
                       fid_stat='assets/fid_stats/fid_stats_imagenet512_guided_diffusion.npz')
    config.sample = d(sample_steps=50, n_samples=50000, mini_batch_size=1,
                      algorithm='dpm_solver_upsample_g', cfg=True, scale=3.0,
                      ug_theta=1.0, ug_eta=0.3, ug_T=1.0,
                      vis_label=None,  # e.g. 330 rabbit, 388 panda, 291 lion, 283 cat
                      path='')  # default: workdir/<config>/eval/<checkpoint>
    return config
