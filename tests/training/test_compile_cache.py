"""The persistent compilation cache: a second process compiling the same
train step loads it from disk; 'off' turns the cache off."""
import os
import textwrap

from cnn.training import compile_cache
from tests.conftest import run_script

_SCRIPT = textwrap.dedent('''
    import json, time
    import jax, jax.numpy as jnp
    from cnn import models
    from cnn.training import compile_cache, optim
    from configs import cifar10
    from tests.conftest import classifier_step
    folder = compile_cache.enable()  # $CNN_COMPILATION_CACHE
    events = []
    jax.monitoring.register_event_listener(
        lambda name, **kw: events.append(name))
    model = models.get_model('lenet5', num_classes=10)
    c = cifar10.get_config('lenet5')
    step, state = classifier_step(model, optim.make_optimizer(c),
                                  optim.make_schedule(c))
    batch = {'image': jnp.zeros((8, 32, 32, 3), jnp.uint8),
             'label': jnp.zeros((8,), jnp.int32)}
    t = time.perf_counter()
    step.lower(state, batch).compile()
    print(json.dumps({
        'folder': folder, 'seconds': time.perf_counter() - t,
        'hits': events.count('/jax/compilation_cache/cache_hits'),
        'misses': events.count('/jax/compilation_cache/cache_misses')}))
''')


def _compile_in_a_new_process(cache: str) -> dict:
  return run_script(_SCRIPT, CNN_COMPILATION_CACHE=cache)


def test_a_second_compile_of_the_same_step_is_a_cache_hit(tmp_path):
  cache = str(tmp_path / 'cache')
  first = _compile_in_a_new_process(cache)
  assert first['folder'] == cache and first['misses'] >= 1
  files = sorted(os.listdir(cache))
  assert files  # the compiled step is on disk
  second = _compile_in_a_new_process(cache)
  assert second['hits'] >= 1 and second['misses'] == 0
  assert second['seconds'] < first['seconds']
  off = _compile_in_a_new_process('off')
  assert off['folder'] is None and off['hits'] == 0
  assert sorted(os.listdir(cache)) == files  # nothing written


def test_the_cache_folder_comes_from_the_flag_or_the_environment(
    monkeypatch):
  monkeypatch.setenv('CNN_COMPILATION_CACHE', '/tmp/x')
  assert compile_cache.resolve('') == '/tmp/x'
  assert compile_cache.resolve('~/y') == os.path.expanduser('~/y')
  assert compile_cache.resolve('off') is None
  monkeypatch.delenv('CNN_COMPILATION_CACHE')
  assert compile_cache.resolve(None) == os.path.expanduser(
      '~/.cache/cnn/jax')


def test_child_processes_get_the_same_settings_from_the_environment():
  env = compile_cache.environment('/tmp/c')
  assert env == {'JAX_ENABLE_COMPILATION_CACHE': 'true',
                 'JAX_COMPILATION_CACHE_DIR': '/tmp/c',
                 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': str(
                     compile_cache.MIN_COMPILE_SECONDS),
                 'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0',
                 'CNN_COMPILATION_CACHE': '/tmp/c'}
