"""DiM-Small/2 on your own images at 256x256 (latent 4x32x32): a template. Fill in the four values below.

The four commands (README "Train on your own images"; the folder layout and the bad-file rules: docs/own-images.md):

    python scripts/fid_reference_stats.py path/to/my_images FID_STATS --resolution 256
    python scripts/extract_features.py path/to/my_images FEATURES --resolution 256
    python train_ldm_discrete.py --config=configs/image_folder_DiM_S.py
    python sample.py --config=configs/image_folder_DiM_S.py --classes <class name> ... \
        --nnet_path=workdir/image_folder_DiM_S/default/ckpts/<step>.ckpt/nnet_ema.pth

path/to/my_images holds <class name>/**/<image> (class-conditional, the classes are the sorted subfolder names) or
images only (unconditional). A wrong NUM_CLASSES stops the run at start-up, naming the count of the data.
To encode the images on the fly instead of reading features (no extraction; the encoder then runs every step):
    config.dataset = d(name='image_folder', path='path/to/my_images', resolution=256, random_flip=True,
                       p_uncond=..., fid_stat=FID_STATS)
The schedule and batch size are starting points for a data set of about 10,000-100,000 images, not measured ones:
best.json keeps the checkpoint of the lowest in-training FID, and the final evaluation samples that one.
"""
import ml_collections

FEATURES = 'assets/datasets/my_images_features256'          # written by scripts/extract_features.py
FID_STATS = 'assets/fid_stats/fid_stats_my_images256.npz'      # written by scripts/fid_reference_stats.py
AUTOENCODER = 'assets/stable-diffusion/autoencoder_kl_ema.pth'  # the KL-f8 VAE (README, Assets)
NUM_CLASSES = 5                 # class subfolders of your image folder; 0: images only (unconditional)


def d(**kwargs):
    return ml_collections.ConfigDict(initial_dictionary=kwargs)


def get_config():
    conditional = NUM_CLASSES > 0
    config = ml_collections.ConfigDict()
    config.seed = 1234
    config.compile = 'none'          # or 'default', 'max-autotune', 'reduce-overhead': torch.compile (libs/model/compile.py)
    config.z_shape = (4, 32, 32)
    config.autoencoder = d(pretrained_path=AUTOENCODER)
    config.gradient_accumulation_steps = 1
    config.max_grad_norm = 1.0
    config.gradient_checkpointing = False
    config.recompute = 'auto'         # 'on' / 'off': recompute activations in backward (auto: only when memory is short)

    config.train = d(n_steps=100000, batch_size=256, mode='cond' if conditional else 'uncond',
                     log_interval=10, eval_interval=5000, save_interval=10000, fid_interval=10000, keep_ckpts=3,
                     num_workers=8, pin_memory=True, prefetch_factor=2,
                     save_every_minutes=60.0,               # a timed checkpoint, kept until the next one (0: none)
                     stop_signals=('SIGTERM', 'SIGINT', 'SIGUSR1'))   # stop, save, exit 75 (training-on-gpus.md)
    config.optimizer = d(name='adamw', lr=2e-4, weight_decay=0.03, betas=(0.99, 0.99), eps=1e-15, fused=True)
    config.lr_scheduler = d(name='customized', warmup_steps=2500)

    config.nnet = d(
        name='Mamba_DiT_S_2',
        num_attention_heads=1, attention_head_dim=512, num_layers=25,
        in_channels=4, out_channels=4, patch_size=2, sample_size=32,
        num_embeds_ada_norm=NUM_CLASSES,
        mamba_d_state=16, mamba_d_conv=3, mamba_expand=2,
        encoder_start_blk_id=1,
        pad_token_schedules=['dec_split', 'lateral'],
    )

    config.dataset = d(name='features', path=FEATURES, p_uncond=0.1 if conditional else 0.0, fid_stat=FID_STATS)
    guidance = dict(cfg=True, scale=0.4) if conditional else {}
    config.sample = d(sample_steps=50, n_samples=10000, intermediate_n_samples=5000, mini_batch_size=50,
                      algorithm='dpm_solver', path='', **guidance)
    return config
