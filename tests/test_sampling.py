"""The sampling specification built from a config, and the one generate loop (libs/sampling.py)."""
import ml_collections
import pytest
import torch

from libs import get_nnet
from libs.config import ConfigError
from libs.sampling import SamplingSpec, generate, sample_batches, sample_images

TINY = dict(name='Mamba_DiT_S_2', attention_head_dim=32, num_layers=3, in_channels=1, out_channels=1, patch_size=2,
            sample_size=8, num_embeds_ada_norm=10)


def config_of(train=None, **sample):
    config = ml_collections.ConfigDict(dict(seed=3, z_shape=(1, 8, 8), nnet=dict(TINY)))
    config.sample = dict(algorithm='dpm_solver', sample_steps=3, mini_batch_size=4, cfg=True, scale=0.5,
                         n_samples=10, **sample)
    if train is not None:
        config.train = train
    return config


@pytest.fixture(scope='module')
def nnet():
    torch.manual_seed(0)
    return get_nnet(**TINY).eval()


def test_spec_takes_config_sample_keys_by_their_names():
    spec = SamplingSpec.from_config(config_of())
    assert (spec.algorithm, spec.sample_steps, spec.scale, spec.num_classes, spec.conditional) == \
        ('dpm_solver', 3, 0.5, 10, True)
    assert spec.sde_options() == dict(algorithm='dpm_solver', sample_steps=3, scale=0.5, null_class=10)
    unguided = SamplingSpec.from_config(_without(config_of(), 'scale', cfg=False))
    assert unguided.scale == 0.0 and unguided.sde_options()['null_class'] is None


def _without(config, key, **changes):
    del config.sample[key]
    config.sample.update(changes)
    return config


def test_labels_and_batches_depend_only_on_indices():
    spec = SamplingSpec.from_config(config_of())
    assert [list(b) for b in spec.index_batches(10)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    labels = spec.labels(range(10))
    assert torch.equal(torch.cat([spec.labels(b) for b in spec.index_batches(10)]), labels)
    assert labels.min() >= 0 and labels.max() < 10 and len(set(labels.tolist())) > 3
    assert [list(b) for b in spec.index_batches(10)[1::2]] == [[4, 5, 6, 7]]          # process 1 of 2
    unconditional = SamplingSpec.from_config(_without(config_of(train=dict(mode='uncond')), 'scale', cfg=False))
    assert unconditional.labels(range(3)) is None and unconditional.scale == 0.0


@pytest.mark.parametrize('change, message', [
    (dict(steps=50), r"unknown key\(s\) config.sample.steps"),
    (dict(algorithm='dpm_solver_pp'), "config.sample.algorithm='dpm_solver_pp'"),
    (dict(ug_theta=1.0), "config.sample.ug_theta is read only by algorithm 'dpm_solver_upsample_g'"),
    (dict(cfg=False), "config.sample.scale is read only with config.sample.cfg=True"),
    (dict(sample_steps=0), "config.sample.sample_steps=0: must be an integer >= 1"),
    (dict(vis_label=10), "config.sample.vis_label=10 needs a conditional model and 0 <= label < 10"),
    (dict(scale=-1.0), "config.sample.scale=-1.0: must be >= 0"),
    (dict(algorithm='diffusers'), "config.sample.algorithm='diffusers'; expected one of ddim, dpm_solver, "),
])
def test_bad_sample_sections_are_refused_naming_the_key(change, message):
    config = config_of()
    config.sample.update(change)
    with pytest.raises(ConfigError, match=message):
        SamplingSpec.from_config(config)


def test_guidance_in_an_unconditional_run_is_refused():
    with pytest.raises(ConfigError, match=r"config.sample.cfg=True needs a class-conditional run"):
        SamplingSpec.from_config(config_of(train=dict(mode='uncond')))


def test_the_loop_gives_generate_and_the_same_images_for_any_batch_size(nnet):
    spec = SamplingSpec.from_config(config_of())
    labels = torch.tensor([1, 2, 3, 4, 5])
    whole = sample_images(nnet, spec, labels=labels)
    assert whole.shape == (5, 1, 8, 8) and 0 <= whole.min() and whole.max() <= 1
    small = SamplingSpec(**{**spec.__dict__, 'mini_batch_size': 2})
    pieces = dict(sample_batches(nnet, small, small.index_batches(5), labels))
    assert [list(k) for k in pieces] == [[0, 1], [2, 3], [4]]
    torch.testing.assert_close(torch.cat(list(pieces.values())), whole, rtol=0, atol=1e-5)
    latents = generate(nnet, spec, range(2, 4), labels[2:4])
    torch.testing.assert_close(((latents + 1) / 2).clamp(0, 1), whole[2:4], rtol=0, atol=1e-6)


def test_sample_images_takes_a_seed_and_checks_its_labels(nnet):
    spec = SamplingSpec.from_config(config_of())
    a, b = sample_images(nnet, spec, labels=[1, 1], seed=0), sample_images(nnet, spec, labels=[1, 1], seed=1)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(sample_images(nnet, spec, labels=[1, 1], seed=0), a, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"class ids in \[0, 10\)"):
        sample_images(nnet, spec, labels=[10])
    with pytest.raises(ValueError, match="either labels"):
        sample_images(nnet, spec)


def test_replace_changes_checked_fields_only():
    spec = SamplingSpec.from_config(config_of())
    changed = spec.replace(seed=5, sample_steps=7, scale=0, mini_batch_size=2)
    assert (changed.seed, changed.sample_steps, changed.scale, changed.mini_batch_size) == (5, 7, 0.0, 2)
    assert spec.replace() == spec and changed.z_shape == spec.z_shape
    for change, message in [(dict(sample_steps=0), 'sample_steps=0: must be an integer >= 1'),
                            (dict(mini_batch_size=1.5), 'mini_batch_size=1.5: must be an integer >= 1'),
                            (dict(scale=-0.1), 'guidance scale=-0.1: must be >= 0')]:
        with pytest.raises(ValueError, match=message):
            spec.replace(**change)
    unconditional = SamplingSpec.from_config(_without(config_of(train=dict(mode='uncond')), 'scale', cfg=False))
    with pytest.raises(ValueError, match='guidance needs a class-conditional model'):
        unconditional.replace(scale=1.0)
