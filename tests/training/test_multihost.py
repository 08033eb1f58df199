"""Multi-host training: two processes on this machine (a localhost
coordinator, gloo CPU collectives, one device each) train the steps of one
process with two devices; checkpoints are written once and restored by
both."""
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np

from cnn.training import checkpointing, run_folder, transfer
from tests.conftest import (ROOT, SHARED_TFDS, metric_rows,
                            requires_cifar10_jpeg)

_SCRIPT = textwrap.dedent('''
    import json, sys
    import jax
    import tensorflow_datasets as tfds
    from cnn import runs
    from tests.conftest import small_config
    workdir = sys.argv[1]
    c = small_config('cifar_resnet8', steps=2, tensorboard=False)
    with tfds.testing.mock_data(num_examples=24):
      final = runs.train_and_evaluate(c, workdir)
      again = runs.evaluate_checkpoint(workdir, 'test', 'latest')
    print(json.dumps({'process': jax.process_index(),
                      'processes': jax.process_count(),
                      'devices': jax.device_count(),
                      'final': final['test']['loss'],
                      'restored': again['loss']}))
''')


def _launch(workdir, env_extra):
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2',
             **env_extra)
  return subprocess.Popen([sys.executable, '-c', _SCRIPT, str(workdir)],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _result(proc) -> dict:
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  return json.loads(out.strip().splitlines()[-1])


def _saved(workdir):
  ckpt = checkpointing.Checkpointer(str(workdir / 'checkpoints'),
                                    read_only=True)
  steps = ckpt.steps()
  saved = transfer._restore_raw(ckpt, steps[-1])  # pylint: disable=protected-access
  ckpt.close()
  return steps, saved


def test_two_processes_train_the_steps_of_one_process_with_two_devices(
    tmp_path):
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  multi, single = tmp_path / 'multi', tmp_path / 'single'
  workers = [_launch(multi, {'JAX_COORDINATOR_ADDRESS': f'127.0.0.1:{port}',
                             'JAX_NUM_PROCESSES': '2',
                             'JAX_PROCESS_ID': str(i)}) for i in range(2)]
  flags = os.environ.get('XLA_FLAGS', '')
  one = _launch(single, {'XLA_FLAGS': (
      flags + ' --xla_force_host_platform_device_count=2').strip()})
  results = [_result(p) for p in workers]
  reference = _result(one)
  assert [(r['process'], r['processes'], r['devices']) for r in results] == [
      (0, 2, 2), (1, 2, 2)]
  assert (reference['processes'], reference['devices']) == (1, 2)
  for r in results:  # the same held-out loss, before and after a restore
    assert abs(r['final'] - reference['final']) < 1e-5
    assert abs(r['restored'] - reference['final']) < 1e-5
  # Process 0 wrote the records, once: the same lines as the one process.
  assert metric_rows(multi) == metric_rows(single)
  (steps_m, saved_m), (steps_s, saved_s) = _saved(multi), _saved(single)
  assert steps_m == steps_s == [2]
  for part in ('params', 'batch_stats'):
    got, want = (transfer.flat_paths(saved_m[part]),
                 transfer.flat_paths(saved_s[part]))
    assert got.keys() == want.keys() and got
    for path in want:
      np.testing.assert_allclose(got[path], want[path], atol=1e-5, rtol=1e-5,
                                 err_msg=path)


@requires_cifar10_jpeg
def test_a_sweep_member_runs_on_two_hosts_with_the_readme_launch(tmp_path):
  """The README's launch, `experiments.sweep --only=^MEMBER$` with
  JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, on two
  processes: they join before anything starts JAX's backend (the CLI used
  to fail there with the library's default settings), train the member
  together and write its folder once."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  # The preset's numerics are the library's defaults (the default
  # weight-gradient policy is what asked for the backend).
  env = dict(os.environ)
  env.update(JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2',
             JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}',
             JAX_NUM_PROCESSES='2')
  cmd = [sys.executable, '-m', 'experiments.sweep',
         '--config=configs/plain_vs_resnet.py:local,depths=8',
         f'--workdir={tmp_path}', '--only=^resnet8_s0$',
         '--config.dataset=cifar10_jpeg', f'--config.data_dir={SHARED_TFDS}',
         '--config.train_split=train[:256]', '--config.test_split=test[:64]']
  procs = [subprocess.Popen(cmd, cwd=ROOT, env=dict(env, JAX_PROCESS_ID=str(i)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for i, (p, (out, err)) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, err[-3000:]
    assert f'multi-host: process {i} of 2, 2 devices in all (1 here)' in out
    assert '| resnet8_s0 | done | 4/4 |' in out
  member = tmp_path / 'resnet8_s0'
  rows = metric_rows(member)
  # Written once, by process 0: one row per logged step and split.
  keys = [(r['step'], r['split']) for r in rows]
  assert len(keys) == len(set(keys)) and (4, 'test') in keys
  assert run_folder.checkpoint_steps(str(member))[-1] == 4
