"""Shared test fixtures: small configs on tfds mock data, the real data path."""
import os
import pathlib

import pytest

# pytest -n 2 runs two workers on the machine's cores: each gets its share
# for oneDNN's OpenMP threads (two teams of 2 threads on 2 cores spin at
# each other's barriers), as sweep workers do (cnn.tools.sweeps.worker_env).
if os.environ.get('PYTEST_XDIST_WORKER_COUNT'):
  os.environ.setdefault('OMP_NUM_THREADS', str(max(
      1, (os.cpu_count() or 1) // int(os.environ['PYTEST_XDIST_WORKER_COUNT']))))

# Compiled steps are cached on disk (cnn/training/compile_cache.py): the
# suite compiles the same small nets in many tests and processes.
from cnn.training import compile_cache  # pylint: disable=g-import-not-at-top,wrong-import-position
_CACHE_DIR = compile_cache.enable()
if _CACHE_DIR:
  # Child processes inherit it: the experiment scripts through
  # $CNN_COMPILATION_CACHE, and the `python -c` scripts of `run_script` and
  # the multi-host workers, which never call `compile_cache.enable`,
  # through JAX's own variables.
  os.environ.update(compile_cache.environment(_CACHE_DIR))

ROOT = pathlib.Path(__file__).resolve().parents[0].parent
# The prepared CIFAR-10 copy beside the project (see shared/data/README.md).
SHARED_TFDS = pathlib.Path(os.environ.get(
    'CNN_SHARED_TFDS', ROOT.parent / 'shared' / 'data' / 'tfds'))
HAS_CIFAR10_JPEG = (SHARED_TFDS / 'cifar10_jpeg').is_dir()

requires_cifar10_jpeg = pytest.mark.skipif(
    not HAS_CIFAR10_JPEG, reason=f'no cifar10_jpeg under {SHARED_TFDS}')


def requires_shared(name: str):
  """Skips a test where the prepared dataset `name` is not in SHARED_TFDS."""
  return pytest.mark.skipif(not (SHARED_TFDS / name).is_dir(),
                            reason=f'no {name} under {SHARED_TFDS}')


# Fields of metrics.jsonl that measure time, not the run's math: left out
# where two runs are compared for equality.
TIMING_KEYS = ('wall_seconds',)


def metric_rows(workdir, timing: bool = False) -> list[dict]:
  """The rows of a run's metrics.jsonl, without TIMING_KEYS by default."""
  import json  # pylint: disable=g-import-not-at-top
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  if not timing:
    rows = [{k: v for k, v in r.items() if k not in TIMING_KEYS}
            for r in rows]
  return rows


@pytest.fixture(autouse=True)
def cifar10_on_mock_data(monkeypatch):
  """The CIFAR configs on TFDS's `cifar10` in TFDS's default folder.

  They read the prepared cifar10_jpeg where the data folder holds it
  (configs/common.py), but `tfds.testing.mock_data`, which the suite trains
  on, fakes only TFDS's registered datasets; so the suite sees the recipe as
  on a machine without the prepared copy. Tests that read the real data name
  it (SHARED_TFDS); tests/test_newcomer.py checks the rule itself.
  """
  from configs import common  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(common, 'dataset_and_dir',
                      lambda prepared, tfds_name: (tfds_name, None))


# The suite's numerics, the config fields of configs/common.py at the
# settings that compile fastest for many tiny nets run a few steps each:
# XLA's own weight gradient (the library's default, 'auto', measures a batch
# split per new shape), XLA:CPU's default convolution kernels and fusion
# pass. `small_config` carries them, and library code called outside a run
# uses them too (`small_numerics`); runs from configs/ presets, and the
# experiment scripts the suite starts, use the library's defaults. The
# defaults are checked against these in tests/ops/test_conv.py and
# tests/training/test_loop.py.
SMALL_NUMERICS = dict(conv_weight_grad='xla', xla_cpu_conv='ynnpack',
                      xla_cpu_fusion='on')


@pytest.fixture(autouse=True, scope='session')
def small_numerics():
  """SMALL_NUMERICS for library code called outside a run (a run enters
  its own config's)."""
  from cnn.ops import compiler  # pylint: disable=g-import-not-at-top
  from cnn.ops import conv  # pylint: disable=g-import-not-at-top
  with conv.policy(SMALL_NUMERICS['conv_weight_grad']), \
      conv.engine(SMALL_NUMERICS['xla_cpu_conv']), \
      compiler.fusion(SMALL_NUMERICS['xla_cpu_fusion']):
    yield


def small_config(model='cifar_resnet8', steps=4, **overrides):
  """The CIFAR recipe shrunk to a few steps of a tiny net, on TFDS's
  `cifar10` (for `tfds.testing.mock_data`; see `cifar10_on_mock_data`)."""
  from configs import cifar10  # pylint: disable=g-import-not-at-top
  c = cifar10.get_config(model)
  c.dataset, c.data_dir = 'cifar10', None
  c.num_train_steps = steps
  c.batch_size = 8
  c.eval_batch_size = 16
  c.eval_every_steps = 2
  c.checkpoint_every_steps = 2
  c.log_every_steps = 1
  c.tensorboard = True
  for k, v in {**SMALL_NUMERICS, **overrides}.items():
    setattr(c, k, v)
  return c


def endless_lenet5_args(workdir) -> list[str]:
  """`experiments.train` flags of a LeNet-5 run that trains until stopped
  (no eval, log or checkpoint on the way), for tests that interrupt it."""
  return ['--config=configs/cifar10.py:lenet5', f'--workdir={workdir}'] + [
      f'--config.{k}={v}' for k, v in dict(
          batch_size=8, eval_batch_size=8, num_train_steps=1000000,
          eval_every_steps=1000000, checkpoint_every_steps=1000000,
          log_every_steps=1000000, tensorboard=False).items()]


def classifier_step(model, tx, schedule, mean=None, *, image_shape=(32, 32, 3),
                    augment='crop_flip', frozen=None,
                    compiler_options='default', seed=0):
  """The library's classification train step and a fresh state
  (`compiler_options='default'`: a run's, `cnn.ops.compiler`)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from cnn.ops import compiler  # pylint: disable=g-import-not-at-top
  from cnn.tasks.classification import task as classification  # pylint: disable=g-import-not-at-top
  from cnn.training import state as state_lib  # pylint: disable=g-import-not-at-top
  from cnn.training import step as step_lib  # pylint: disable=g-import-not-at-top
  if mean is None:
    mean = np.zeros(image_shape[-1], np.float32)
  loss_fn = classification.make_loss_fn(model, mean, augment=augment)
  if compiler_options == 'default':
    compiler_options = compiler.train_step_options()
  step = step_lib.make_train_step(loss_fn, tx, schedule, frozen=frozen,
                                  compiler_options=compiler_options)
  state = state_lib.create(
      lambda r: classification.init_variables(model, image_shape, r), tx,
      seed)
  return step, state


def resnet8_after_steps(steps: int = 2, **step_kwargs):
  """(state, last loss) after `steps` train steps of cifar_resnet8 on one
  fixed random batch of 8, with `classifier_step(..., **step_kwargs)`: for
  tests that compare two ways of compiling the same step
  (`assert_same_training`)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from cnn import models  # pylint: disable=g-import-not-at-top
  from cnn.training import optim  # pylint: disable=g-import-not-at-top
  model = models.get_model('cifar_resnet8', num_classes=10)
  c = small_config()
  rng = np.random.default_rng(1)
  batch = {'image': rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
           'label': rng.integers(0, 10, 8).astype(np.int32)}
  train_step, state = classifier_step(model, optim.make_optimizer(c),
                                      optim.make_schedule(c), **step_kwargs)
  for _ in range(steps):
    state, m = train_step(state, batch)
  return jax.device_get(state), float(m['loss'])


def assert_same_training(a, b, leaf_rel: float = 2e-3):
  """Two `resnet8_after_steps()` results agree to float32 rounding: the
  loss to 1e-5, and every parameter and BatchNorm statistic to `leaf_rel`
  of its leaf's largest magnitude.

  Why per leaf, not per element: at learning rate 0.1 on a batch of 8,
  BatchNorm amplifies rounding from step to step, so two convolution
  engines drift apart by a growing fraction of a leaf's largest value
  (results/speed/README.md, "Numbers behind the code's comments"); a
  BatchNorm bias near zero then fails any element-wise rtol. A wrong
  gradient (a chunk dropped or counted twice) moves a leaf by a good part
  of its whole update, far beyond `leaf_rel`.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  (s_a, loss_a), (s_b, loss_b) = a, b
  assert loss_a == pytest.approx(loss_b, rel=1e-5)
  for (path, x), y in zip(
      jax.tree_util.tree_leaves_with_path((s_a.params, s_a.batch_stats)),
      jax.tree.leaves((s_b.params, s_b.batch_stats))):
    scale = float(np.max(np.abs(y)))
    np.testing.assert_allclose(x, y, rtol=0, atol=leaf_rel * scale + 1e-8,
                               err_msg=jax.tree_util.keystr(path))


def once_per_session(tmp_path_factory, name: str, compute):
  """`compute()` (a JSON value) computed once per pytest session, also
  under xdist, whose workers would otherwise each build a module fixture:
  the first worker to ask computes it under a file lock in the folder the
  workers share, the others wait and read it."""
  import fcntl  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    root = root.parent  # pytest-N/, above each worker's popen-gwK/
  path = root / f'{name}.json'
  with open(root / f'{name}.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if path.exists():
      return json.loads(path.read_text())
    value = compute()
    path.write_text(json.dumps(value))
    return value


def run_script(script: str, devices: int = 1, **env) -> dict:
  """Runs Python `script` in a fresh CPU process (with `devices` forced host
  devices) from the project root; returns the JSON of its last line."""
  import json  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2', **env)
  if devices > 1:
    env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' --xla_force_host_'
                        f'platform_device_count={devices}').strip()
  proc = subprocess.run([sys.executable, '-c', script], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])
