"""Image folders the tests write: coloured shapes (one class per colour) in assorted sizes and file formats, damaged
files, and the rule that scores generated shapes by their dominant colour."""
import io
import os

import numpy as np
import torch
from PIL import Image

from tiny_assets import write_config

# Class name -> RGB colour of its shapes; the shapes lie on a mid-grey background.
PALETTE = {'blue': (40, 60, 220), 'green': (40, 190, 60), 'red': (220, 40, 40), 'yellow': (230, 210, 40)}
BACKGROUND = (128, 128, 128)
FORMATS = ('png', 'jpg', 'JPEG', 'webp', 'bmp')


def shape_image(rng, colour, width, height):
    """(height, width, 3) uint8: a filled disc or square of `colour` covering about a third of a grey image."""
    arr = np.empty((height, width, 3), np.uint8)
    arr[:] = BACKGROUND
    side = min(width, height)
    r = rng.uniform(0.3, 0.45) * side
    cy, cx = rng.uniform(0.4, 0.6) * height, rng.uniform(0.4, 0.6) * width
    y, x = np.mgrid[:height, :width] + 0.5
    if rng.random() < 0.5:
        inside = (y - cy) ** 2 + (x - cx) ** 2 <= r ** 2
    else:
        inside = (abs(y - cy) <= r * 0.85) & (abs(x - cx) <= r * 0.85)
    arr[inside] = colour
    return arr


def save_image(arr, path):
    """Save `arr` with the format its extension names (JPEG at quality 95)."""
    ext = os.path.splitext(path)[1].lower()
    kind = {'.jpg': 'JPEG', '.jpeg': 'JPEG', '.png': 'PNG', '.webp': 'WEBP', '.bmp': 'BMP'}[ext]
    options = {'quality': 95} if kind in ('JPEG', 'WEBP') else {}
    Image.fromarray(arr).save(path, kind, **options)


def write_shapes(root, classes=tuple(PALETTE), per_class=6, sizes=(12, 40), seed=0, conditional=True):
    """Write per_class shape images of each class under `root` (class subfolders if `conditional`, else all
    directly in root), sides drawn in `sizes`, formats cycling through FORMATS, every third image of a class in a
    nested folder. Returns {path: class index}."""
    rng = np.random.default_rng(seed)
    written = {}
    for k, name in enumerate(classes):
        for i in range(per_class):
            folder = os.path.join(root, name) if conditional else str(root)
            if conditional and i % 3 == 2:
                folder = os.path.join(folder, 'more')
            os.makedirs(folder, exist_ok=True)
            w, h = rng.integers(sizes[0], sizes[1] + 1, size=2)
            path = os.path.join(folder, f'{name}_{i:03d}.{FORMATS[(i + k) % len(FORMATS)]}')
            save_image(shape_image(rng, PALETTE[name], int(w), int(h)), path)
            written[path] = k
    return written


def write_truncated_jpeg(path, seed=0):
    """A JPEG cut after 60% of its bytes: its header reads, its pixels do not (noise makes the pixel data much
    longer than the header)."""
    rng = np.random.default_rng(seed)
    noisy = shape_image(rng, PALETTE['red'], 64, 48).astype(np.int16) + rng.integers(-40, 40, (48, 64, 3))
    buffer = io.BytesIO()
    Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(buffer, 'JPEG', quality=95)
    data = buffer.getvalue()
    with open(path, 'wb') as f:
        f.write(data[:int(len(data) * 0.6)])


def write_text_as_jpeg(path):
    with open(path, 'w') as f:
        f.write('not an image\n')


def dominant_classes(images, classes=tuple(PALETTE), min_distance=60.0):
    """(B,) class index of each image (B, 3, H, W) in [0, 1]: the palette colour nearest to the most pixels that
    are away from the grey background (by more than `min_distance` in 0..255 RGB); -1 for an image without such
    pixels."""
    pixels = images.permute(0, 2, 3, 1).reshape(len(images), -1, 3) * 255
    palette = torch.tensor([PALETTE[c] for c in classes], dtype=pixels.dtype)
    grey = torch.tensor(BACKGROUND, dtype=pixels.dtype)
    coloured = (pixels - grey).norm(dim=-1) > min_distance
    nearest = torch.cdist(pixels, palette[None].expand(len(images), -1, -1)).argmin(-1)
    votes = torch.stack([((nearest == k) & coloured).sum(1) for k in range(len(classes))], dim=1)
    return torch.where(coloured.any(1), votes.argmax(1), torch.full((len(images),), -1))


def folder_config(path, images, num_classes, resolution=16, width=32, depth=3, **sections):
    """Write a config of a tiny pixel-space DiM (patch 4) on the image folder `images` at `resolution` px, with K =
    `num_classes` (0: unconditional, no guidance); `sections` replace or extend the config's sections (dicts are
    merged into them). Returns the file's path."""
    conditional = num_classes > 0
    config = dict(
        seed=3, z_shape=(3, resolution, resolution), gradient_accumulation_steps=1, max_grad_norm=1.0,
        train=dict(n_steps=4, batch_size=8, mode='cond' if conditional else 'uncond', log_interval=2,
                   eval_interval=1000, save_interval=2, fid_interval=0, num_workers=0, grid_columns=2,
                   ema_rate=0.995),
        optimizer=dict(name='adamw', lr=2e-3, weight_decay=0.0, betas=(0.9, 0.99), eps=1e-8),
        lr_scheduler=dict(name='customized', warmup_steps=0),
        nnet=dict(name='Mamba_DiT_S_2', num_attention_heads=1, attention_head_dim=width, num_layers=depth,
                  in_channels=3, out_channels=3, patch_size=4, sample_size=resolution, num_embeds_ada_norm=num_classes),
        dataset=dict(name='image_folder', path=str(images), resolution=resolution, random_flip=True,
                     p_uncond=0.1 if conditional else 0.0),
        sample=dict(sample_steps=2, n_samples=4, mini_batch_size=4, algorithm='dpm_solver', path='',
                    **(dict(cfg=True, scale=1.0) if conditional else {})),
    )
    for key, value in sections.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) and isinstance(config.get(key), dict) \
            else value
    return write_config(path, **config)
