"""Tests for the model zoo: golden parameter counts, shapes, BN, grads."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn import models
from cnn.models.resnet import _shortcut

# Golden counts: params only (kernels, biases, BN scale + bias), from the
# papers' architectures; the same as torchvision's / the Torch CIFAR nets'.
GOLDEN = {
    'alexnet': 62_378_344,
    'vgg_a': 132_863_336,
    'vgg_a_lrn': 132_863_336,
    'vgg_b': 133_047_848,
    'vgg_c': 133_638_952,
    'vgg_d': 138_357_544,
    'vgg_e': 143_667_240,
    'vgg11': 132_863_336,
    'vgg13': 133_047_848,
    'vgg16': 138_357_544,
    'vgg19': 143_667_240,
    'resnet18': 11_689_512,
    'resnet34': 21_797_672,
    'resnet50': 25_557_032,
    'resnet101': 44_549_160,
    'resnet152': 60_192_808,
    'cifar_resnet20': 269_722,
    'cifar_resnet32': 464_154,
    'cifar_resnet44': 658_586,
    'cifar_resnet56': 853_018,
    'cifar_resnet110': 1_727_962,
    'cifar_resnet1202': 19_421_274,
    'lenet5': 61_706,
    # Tiny ImageNet (200 classes): ResNet-18's 11,689,512 with the 7x7 stem
    # (9,408) replaced by a 3x3 one (1,728) and a 200-way head (102,600 for
    # 513,000); its plain twin lacks the three projections (173,824).
    'resnet18_64': 11_271_432,
    'plain18_64': 11_097_608,
    # VGG-B's first 8 convs (4,683,456) + BN (3,840) + fc6 8192->1024 +
    # fc7 1024->1024 + head 1024->200.
    'vgg_64': 14_331_528,
}


def abstract_variables(model, input_shape):
  """Variables as ShapeDtypeStructs: no memory, so full-size nets are fine."""
  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  return jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False), x)


def num_params(name, input_shape=None, **kwargs):
  model = models.get_model(name, **kwargs)
  shape = input_shape or models.default_input_shape(name)
  params = abstract_variables(model, shape)['params']
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


def intermediates(name, input_shape=None, **kwargs):
  """Abstract outputs of every submodule (`capture_intermediates`)."""
  model = models.get_model(name, **kwargs)
  shape = input_shape or models.default_input_shape(name)
  x = jax.ShapeDtypeStruct((1, *shape), jnp.float32)

  def run(x):
    variables = model.init(jax.random.key(0), x, train=False)
    _, state = model.apply(variables, x, train=False,
                           capture_intermediates=True,
                           mutable=['intermediates'])
    return state['intermediates']

  return jax.eval_shape(run, x)


@pytest.mark.parametrize('name', sorted(GOLDEN))
def test_golden_param_counts(name):
  assert num_params(name) == GOLDEN[name]


def test_alexnet_two_towers():
  assert num_params('alexnet', groups=2) == 60_965_224


@pytest.mark.parametrize('depth', [18, 34])
def test_plain_equals_resnet_minus_projections(depth):
  model = models.get_model(f'resnet{depth}')
  params = abstract_variables(model, (224, 224, 3))['params']
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  projections = sum(int(np.prod(leaf.shape)) for path, leaf in flat
                    if any('proj' in str(k.key) for k in path))
  assert projections == 173_824  # three 1x1 conv + BN projections
  assert num_params(f'plain{depth}') == GOLDEN[f'resnet{depth}'] - projections


@pytest.mark.parametrize('depth', [20, 110])
def test_cifar_plain_has_resnet_count(depth):
  assert num_params(f'cifar_plain{depth}') == GOLDEN[f'cifar_resnet{depth}']


@pytest.mark.parametrize('depth', [20, 56])
def test_cifar_option_b_adds_two_projections(depth):
  # 1x1 16->32 + BN(32) and 1x1 32->64 + BN(64); option A is parameter-free.
  extra = (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
  assert (num_params(f'cifar_resnet{depth}', shortcut='B')
          - num_params(f'cifar_resnet{depth}')) == extra == 2752


def test_option_a_shortcut_subsamples_and_zero_pads():
  x = jnp.arange(1 * 4 * 4 * 2, dtype=jnp.float32).reshape(1, 4, 4, 2)
  out = _shortcut(x, (1, 2, 2, 4), 2, 'A', None, None)
  np.testing.assert_array_equal(out[..., :2], x[:, ::2, ::2, :])
  np.testing.assert_array_equal(out[..., 2:], 0)
  assert _shortcut(x, (1, 4, 4, 2), 1, 'A', None, None) is x


def test_any_6n_plus_2_depth():
  assert num_params('cifar_resnet8') == 75_290
  assert num_params('cifar_plain14') == 172_506


@pytest.mark.parametrize('name', ['cifar_resnet21', 'cifar_plain21',
                                  'cifar_resnet2', 'cifar_resnet0'])
def test_bad_cifar_depth(name):
  with pytest.raises(ValueError, match=r'cifar_\w+\{6n\+2\}, e\.g\. 20, 32, '
                     r'44, 56, 110') as info:
    models.get_model(name)
  assert '\n' not in str(info.value)


def test_unknown_name_lists_known_names():
  # Nothing close: every name, on one line.
  with pytest.raises(ValueError, match='unknown model') as info:
    models.get_model('nosuchnet')
  message = str(info.value)
  assert '\n' not in message
  assert 'resnet18' in message and 'vgg_e' in message
  with pytest.raises(ValueError):
    models.default_input_shape('nope')
  # An exact match but for case or '_': that one alone.
  assert models.close_names('VGG16') == ['vgg16']
  assert models.close_names('nosuchnet') == []


@pytest.mark.parametrize('typo, first', [
    ('resnet_20', 'cifar_resnet20'), ('VGG16', 'vgg16'),
    ('resnet19', 'resnet18'), ('vgg-d', 'vgg_d'), ('lenet', 'lenet5'),
    ('cifar_resnt56', 'cifar_resnet56'), ('plain20', 'cifar_plain20')])
def test_a_misspelt_name_suggests_the_closest(typo, first):
  close = models.close_names(typo)
  assert close[0] == first and 1 <= len(close) <= 4
  with pytest.raises(ValueError) as info:
    models.get_model(typo)
  message = str(info.value)
  assert '\n' not in message
  assert message.startswith(f"unknown model '{typo}'; did you mean {first}")
  assert 'vgg_a_lrn' not in message  # not the whole list


def test_unknown_override():
  with pytest.raises(ValueError, match='no option widht'):
    models.get_model('cifar_resnet20', widht=3)


def test_registry_helpers():
  names = models.model_names()
  assert names == sorted(names)
  assert set(GOLDEN) | {'plain18', 'plain34', 'cifar_plain20', 'resnet_tiny',
                        'vgg_tiny', 'alexnet_tiny'} <= set(names)
  for name in names:  # every listed name resolves
    assert len(models.default_input_shape(name)) == 3
  assert models.default_input_shape('alexnet') == (227, 227, 3)
  assert models.default_input_shape('vgg16') == (224, 224, 3)
  assert models.default_input_shape('cifar_resnet44') == (32, 32, 3)
  assert models.default_input_shape('lenet5') == (28, 28, 1)
  assert models.default_num_classes('resnet50') == 1000
  assert models.default_num_classes('cifar_plain56') == 10


# Top-level submodules, grouped for freezing; `head` is always the last FC.
TOP_LEVEL = {
    'cifar_resnet20': {'stem', 'stage1', 'stage2', 'stage3', 'head'},
    'cifar_plain20': {'stem', 'stage1', 'stage2', 'stage3', 'head'},
    'resnet18': {'stem', 'stage1', 'stage2', 'stage3', 'stage4', 'head'},
    'resnet50': {'stem', 'stage1', 'stage2', 'stage3', 'stage4', 'head'},
    'vgg_d': {'features', 'fc6', 'fc7', 'head'},
    'alexnet': {'features', 'fc6', 'fc7', 'head'},
    'lenet5': {'conv1', 'conv2', 'fc1', 'fc2', 'head'},
}


@pytest.mark.parametrize('name', sorted(TOP_LEVEL))
def test_submodule_names_and_head(name):
  model = models.get_model(name, num_classes=7)
  variables = abstract_variables(model, models.default_input_shape(name))
  params = variables['params']
  assert set(params) == TOP_LEVEL[name]
  assert params['head']['kernel'].shape[-1] == 7
  assert params['head']['bias'].shape == (7,)
  for leaf in jax.tree.leaves(variables):
    assert leaf.dtype == jnp.float32


def test_nested_names():
  params = abstract_variables(models.get_model('cifar_resnet20', shortcut='B'),
                              (32, 32, 3))['params']
  assert set(params['stage1']) == {'block0', 'block1', 'block2'}
  assert set(params['stage1']['block0']) == {'conv1', 'bn1', 'conv2', 'bn2'}
  assert {'proj_conv', 'proj_bn'} <= set(params['stage2']['block0'])
  assert 'bias' not in params['stage1']['block0']['conv1']  # BN follows
  assert set(params['stem']) == {'conv', 'bn'}


def test_alexnet_shapes():
  inter = intermediates('alexnet')
  features = inter['features']
  assert features['conv1']['__call__'][0].shape == (1, 55, 55, 96)
  assert features['pool5']['__call__'][0].shape == (1, 6, 6, 256)
  assert inter['head']['__call__'][0].shape == (1, 1000)


def test_alexnet_groups_split_conv2_conv4_conv5():
  params = abstract_variables(models.get_model('alexnet', groups=2),
                              (227, 227, 3))['params']['features']
  assert params['conv2']['kernel'].shape == (5, 5, 48, 256)
  assert params['conv3']['kernel'].shape == (3, 3, 256, 384)
  assert params['conv4']['kernel'].shape == (3, 3, 192, 384)
  assert params['conv5']['kernel'].shape == (3, 3, 192, 256)


def test_vgg_shapes_and_other_input_sizes():
  inter = intermediates('vgg_a')
  assert inter['features']['pool5']['__call__'][0].shape == (1, 7, 7, 512)
  params = abstract_variables(models.get_model('vgg_d'), (224, 224, 3))
  assert params['params']['fc6']['kernel'].shape == (7 * 7 * 512, 4096)
  # FC6 follows the input size: 32x32 leaves a 1x1x512 map.
  params = abstract_variables(models.get_model('vgg_d', num_classes=10),
                              (32, 32, 3))
  assert params['params']['fc6']['kernel'].shape == (512, 4096)
  # C's third conv in blocks 3-5 is 1x1.
  params = abstract_variables(models.get_model('vgg_c'), (224, 224, 3))
  assert params['params']['features']['conv3_3']['kernel'].shape == (
      1, 1, 256, 256)


def test_tiny_imagenet_nets_keep_an_8x8_map_and_narrow_variants():
  inter = intermediates('resnet18_64')
  assert inter['stem']['__call__'][0].shape == (1, 64, 64, 64)
  assert inter['stage4']['__call__'][0].shape == (1, 8, 8, 512)
  inter = intermediates('resnet18_64', num_filters=16, stem_strides=2)
  assert inter['stage1']['__call__'][0].shape == (1, 32, 32, 16)
  assert inter['stage4']['__call__'][0].shape == (1, 4, 4, 128)
  inter = intermediates('vgg_64', width_multiplier=0.25, fc_width=256)
  assert inter['features']['pool4']['__call__'][0].shape == (1, 4, 4, 128)
  params = abstract_variables(
      models.get_model('vgg_64', width_multiplier=0.25, fc_width=256),
      (64, 64, 3))['params']
  assert params['fc6']['kernel'].shape == (4 * 4 * 128, 256)
  with pytest.raises(ValueError, match='stem'):
    num_params('resnet18_64', stem='5x5')


def test_a_model_that_cannot_take_the_input_is_one_line():
  from cnn.errors import ConfigError  # pylint: disable=g-import-not-at-top
  from cnn.tasks.classification.task import check_input_shape  # pylint: disable=g-import-not-at-top
  check_input_shape(models.get_model('vgg_64'), 'vgg_64', (64, 64, 3),
                    'tiny_imagenet')
  # Five 2x2 pools take 28 to nothing: refused before any step.
  with pytest.raises(ConfigError) as e:
    check_input_shape(models.get_model('vgg_d', num_classes=10), 'vgg_d',
                      (28, 28, 1), 'mnist')
  msg = str(e.value)
  assert '\n' not in msg and '28x28x1' in msg and 'mnist' in msg
  assert '224x224x3' in msg


def test_resnet50_shapes():
  inter = intermediates('resnet50')
  assert inter['stem']['__call__'][0].shape == (1, 56, 56, 64)
  assert inter['stage1']['__call__'][0].shape == (1, 56, 56, 256)
  assert inter['stage4']['__call__'][0].shape == (1, 7, 7, 2048)
  assert inter['__call__'][0].shape == (1, 1000)


@pytest.mark.parametrize('name', ['cifar_resnet20', 'cifar_plain20'])
def test_cifar_shapes(name):
  inter = intermediates(name)
  assert inter['stage1']['__call__'][0].shape == (1, 32, 32, 16)
  assert inter['stage2']['__call__'][0].shape == (1, 16, 16, 32)
  assert inter['stage3']['__call__'][0].shape == (1, 8, 8, 64)
  assert inter['__call__'][0].shape == (1, 10)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  model = models.get_model('cifar_resnet8', dtype=jnp.bfloat16)
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)

  def run(x):
    variables = model.init(jax.random.key(0), x, train=False)
    return variables, model.apply(variables, x, train=False)

  variables, logits = jax.eval_shape(run, x)
  assert logits.dtype == jnp.float32
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables))


# The real-compute tests below jit init and apply together (on CPU one XLA
# compile is far cheaper than running init op by op, each op compiling alone)
# and use 'rbg' keys: XLA compiles threefry bit generation for every parameter
# tensor and dropout mask, which took ~5x longer than the nets themselves.


def rbg_key(seed):
  return jax.random.key(seed, impl='rbg')


def normal_input(shape, seed=1):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape),
                     jnp.float32)


def test_batch_norm_statistics_update_only_in_training():
  model = models.get_model('cifar_resnet8')

  @jax.jit
  def run(x):
    variables = model.init(rbg_key(0), x, train=False)
    _, train_state = model.apply(variables, x, train=True,
                                 mutable=['batch_stats'])
    _, eval_state = model.apply(variables, x, train=False,
                                mutable=['batch_stats'])
    return variables['batch_stats'], train_state, eval_state

  x = normal_input((4, 16, 16, 3)) * 3 + 1
  stats, train_state, eval_state = run(x)
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), stats,
                         train_state['batch_stats'])
  assert all(jax.tree.leaves(changed))
  jax.tree.map(np.testing.assert_array_equal, stats,
               eval_state['batch_stats'])


def test_dropout_only_in_training():
  model = models.get_model('vgg_tiny')

  @jax.jit
  def run(x):
    variables = model.init(rbg_key(0), x, train=False)
    return [model.apply(variables, x, train=False),  # needs no dropout rng
            model.apply(variables, x, train=True,
                        rngs={'dropout': rbg_key(2)}),
            model.apply(variables, x, train=True,
                        rngs={'dropout': rbg_key(3)})]

  eval_out, a, b = run(normal_input((2, 32, 32, 3)))
  assert np.all(np.isfinite(eval_out))
  assert not np.allclose(a, b)
  assert not np.allclose(a, eval_out)


# One tiny net per family and block type. Each costs one XLA compile, so
# options whose code paths are covered elsewhere (VGG with BN/LRN, option-B
# CIFAR shortcuts) are checked abstractly instead.
TINY = [
    ('cifar_resnet8', {}),
    ('cifar_plain8', {}),
    ('resnet_tiny', {}),
    # Two stages suffice to run a projection and a strided bottleneck.
    ('resnet_tiny', {'block': 'bottleneck', 'stage_sizes': (1, 1)}),
    ('vgg_tiny', {}),
    ('alexnet_tiny', {'groups': 2}),
    ('lenet5', {}),
]


@pytest.mark.parametrize('name,overrides', TINY,
                         ids=[f'{n}-{o}' if o else n for n, o in TINY])
def test_tiny_forward_backward(name, overrides):
  num_classes = 5
  model = models.get_model(name, num_classes=num_classes, **overrides)
  labels = jnp.array([0, 3])

  @jax.jit
  def run(x, rng):
    variables = model.init(rbg_key(0), x, train=False)
    others = {k: v for k, v in variables.items() if k != 'params'}

    def loss_fn(params):
      logits, _ = model.apply({'params': params, **others}, x, train=True,
                              rngs={'dropout': rng}, mutable=['batch_stats'])
      onehot = jax.nn.one_hot(labels, num_classes)
      loss = -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * onehot, -1))
      return loss, logits

    return jax.value_and_grad(loss_fn, has_aux=True)(variables['params'])

  x = normal_input((2, *models.default_input_shape(name)))
  (loss, logits), grads = run(x, rbg_key(2))
  assert logits.shape == (2, num_classes)
  assert logits.dtype == jnp.float32
  assert np.isfinite(loss)
  leaves = jax.tree.leaves(grads)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  assert any(bool(jnp.any(g != 0)) for g in leaves)
  # The head always gets a gradient: transfer learning trains it alone.
  assert bool(jnp.any(grads['head']['kernel'] != 0))


@pytest.mark.parametrize('name,overrides', [
    ('vgg_tiny', {'batch_norm': True, 'lrn': True}),
    ('cifar_resnet8', {'shortcut': 'B'}),
    ('resnet_tiny', {'residual': False}),
])
def test_tiny_options_trace(name, overrides):
  model = models.get_model(name, num_classes=5, **overrides)
  x = jax.ShapeDtypeStruct((2, *models.default_input_shape(name)),
                           jnp.float32)

  def run(x):
    variables = model.init(jax.random.key(0), x, train=False)
    return jax.grad(lambda p: model.apply(
        {**variables, 'params': p}, x, train=True,
        rngs={'dropout': jax.random.key(1)},
        mutable=['batch_stats'])[0].sum())(variables['params'])

  grads = jax.eval_shape(run, x)
  assert grads['head']['kernel'].shape[-1] == 5
