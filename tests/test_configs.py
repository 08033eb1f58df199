"""configs/: the one argument grammar (configs/common.py: Grammar) and the
config as the whole schema (every field the library reads is declared, so
`--config.FIELD=VALUE` reaches it)."""
import importlib
import re

import pytest
from absl import flags
from ml_collections import config_flags

from cnn.errors import ConfigError
from cnn.training import run_folder
from configs import common
from tests.conftest import ROOT

GRAMMAR = common.Grammar(
    words=(common.Word('kind', ('rcnn', 'fast_rcnn'), 'fast_rcnn'),
           common.Word('photos', ('raccoon', 'coco128')),
           common.Word('local', ('local',))),
    options={'seeds': 2, 'depths': (), 'lr': 0.1}, default='rcnn')


def test_words_fill_their_slots_in_order_and_options_take_their_type():
  p = GRAMMAR.parse
  assert p('fast_rcnn,raccoon,local') == dict(
      kind='fast_rcnn', photos='raccoon', local='local', seeds=2, depths=(),
      lr=0.1)
  assert p('rcnn,local')['photos'] == ''  # an optional slot left out
  assert p(None)['kind'] == p('')['kind'] == 'rcnn'  # the file's default
  assert p(',coco128')['kind'] == 'fast_rcnn'  # an empty word: its default
  assert p('rcnn, local ,seeds=3,depths=20-56,lr=0.5') == dict(
      kind='rcnn', photos='', local='local', seeds=3, depths=(20, 56),
      lr=0.5)
  assert GRAMMAR.usage() == ('rcnn|fast_rcnn[,raccoon|coco128][,local]'
                             '[,seeds=N][,depths=A-B-...][,lr=X]')
  free = common.Grammar(words=(common.Word('model', default='lenet5'),
                               common.Word('preset', ('fast',))))
  assert free.usage() == 'MODEL[,fast]'
  assert free.parse('anything_at_all,fast') == dict(model='anything_at_all',
                                                    preset='fast')


@pytest.mark.parametrize('arg,message', [
    ('fats_rcnn', r"^unknown preset 'fats_rcnn'; did you mean 'fast_rcnn'\? "
                  r'use one of rcnn, fast_rcnn: write rcnn\|fast_rcnn'),
    ('rcnn,racoon', r"^unknown preset 'racoon' in 'rcnn,racoon'; did you "
                    r"mean 'raccoon'\? use one of raccoon, coco128, local"),
    ('rcnn,local,raccoon', r"^'raccoon' is out of place in "
                           r"'rcnn,local,raccoon': one word per slot, in the "
                           r'order rcnn\|fast_rcnn\[,raccoon'),
    ('rcnn,raccoon,coco128', r"^'coco128' is out of place"),
    ('rcnn,raccoon,local,more', r"^unexpected 'more' in "
                                r"'rcnn,raccoon,local,more': write "),
    ('rcnn,seed=1', r"^unknown option 'seed=1' in 'rcnn,seed=1'; did you "
                    r"mean 'seeds'\? use key=value with key one of seeds, "
                    r'depths, lr: write '),
    ('rcnn,seeds=two', r"^bad value in option 'seeds=two': expected an "
                       r'integer, e.g. seeds=2$'),
    ('rcnn,depths=8-x', r"^bad value in option 'depths=8-x': expected ints "
                        r'joined by -, e.g. depths=8-20$'),
])
def test_a_bad_argument_is_one_line_naming_the_part_and_the_fix(arg, message):
  with pytest.raises(ConfigError, match=message) as e:
    GRAMMAR.parse(arg)
  assert '\n' not in str(e.value)


def test_every_config_file_parses_its_argument_with_the_one_grammar():
  from configs import cifar10, mnist  # pylint: disable=g-import-not-at-top
  files = sorted(p.stem for p in (ROOT / 'configs').glob('*.py')
                 if 'def get_config(' in p.read_text())
  assert len(files) == 8, files
  for name in files:
    module = importlib.import_module(f'configs.{name}')
    assert isinstance(module.ARG, common.Grammar), name
    # The grammar's own error, not another parser's.
    with pytest.raises(ConfigError, match=r'unknown|unexpected'):
      module.get_config(f'{module.ARG.default},nonsense_word')
  with pytest.raises(ConfigError, match="unknown option 'seeds=2'.* takes no "
                     'key=value option'):
    cifar10.get_config('cifar_resnet20,seeds=2')
  with pytest.raises(ConfigError, match='seeds=0 must be at least 1'):
    mnist.sweep('lenet5,seeds=0')


def _documented_arguments():
  """(file, argument) of every `configs/FILE.py:ARG` written in the README,
  results/, the Makefile, the configs' docstrings, experiments/ and tests/
  (placeholders such as MODEL or $(MODEL) left out)."""
  texts = [ROOT / 'README.md', ROOT / 'Makefile']
  texts += sorted((ROOT / 'results').glob('*/README.md'))
  for folder in ('configs', 'experiments', 'tests'):
    texts += sorted((ROOT / folder).rglob('*.py'))
  found = set()
  for path in texts:
    for m in re.finditer(r'configs/(\w+)\.py:([\w,=.\-]*)(:?)',
                         path.read_text()):
      name, arg, line_ref = m.group(1), m.group(2).rstrip('.,'), m.group(3)
      if (not arg or line_ref or arg.isdigit()
          or any(ch.isupper() for ch in arg)):
        continue
      found.add((name, arg))
  return sorted(found)


def test_every_documented_command_argument_still_parses():
  args = _documented_arguments()
  assert ('cifar10', 'cifar_resnet20,fast') in args
  assert ('plain_vs_resnet', 'cpu,depths=8-20-56,seeds=1') in args
  assert ('detection', 'fast_rcnn,raccoon') in args
  for name, arg in args:
    module = importlib.import_module(f'configs.{name}')
    if arg in ('yolo',):  # the documented error (tests/training/test_loop)
      with pytest.raises(ConfigError):
        module.get_config(arg)
      continue
    module.get_config(arg)
    if hasattr(module, 'sweep'):
      module.sweep(arg)


def _parse_flags(argv):
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, flag_values=values,
                                  lock_config=True, sys_argv=argv)
  values(argv)
  return values.config


@pytest.mark.parametrize('spec,overrides', [
    # Fields the library read with a default of its own, undeclared: the
    # locked config refused --config.image_size on cifar10.
    ('cifar10.py:lenet5', {'image_size': 48, 'crop_area': (0.5, 1.0)}),
    ('mnist.py:lenet5', {'image_size': 32}),
    ('imagenet.py:resnet50', {'crop_area': (0.08, 1.0)}),
    ('detection.py:fast_rcnn', {'max_objects_per_photo': 3}),
])
def test_an_override_of_a_field_the_library_reads_is_accepted(spec,
                                                              overrides):
  argv = ['train', f'--config={ROOT}/configs/{spec}'] + [
      f'--config.{k}={str(v).replace(" ", "")}' for k, v in overrides.items()]
  config = _parse_flags(argv)
  for k, v in overrides.items():
    assert config[k] == v


def _all_configs():
  from cnn.tools import sweeps  # pylint: disable=g-import-not-at-top
  out = []
  presets = [('cifar10', 'cifar_resnet8,fast_local'),
             ('localization', 'joint'),
             ('localization', 'local,tiny_imagenet'),
             ('detection', 'rcnn,local'),
             ('detection', 'faster_rcnn,coco128,local'),
             ('tiny_imagenet', 'resnet18_64'),
             ('tiny_imagenet', 'vgg_64,local'),
             ('lr_schedules', 'local'), ('mnist', 'lenet5,seeds=2')]
  for name, arg in _documented_arguments() + presets:
    if arg == 'yolo':
      continue
    module = importlib.import_module(f'configs.{name}')
    base = module.get_config(arg)
    out.append(base)
    if hasattr(module, 'sweep'):
      out += [sweeps.apply_overrides(base, o) for _, o in module.sweep(arg)]
  return out


def test_every_config_declares_what_the_library_reads():
  """The training loop's and each task's fields, and every field of the
  table of old records' defaults (else a resume would call a field the
  config lacks a change)."""
  from cnn import runs, tasks  # pylint: disable=g-import-not-at-top
  from cnn.tasks.classification import task as classification  # pylint: disable=g-import-not-at-top
  for c in _all_configs():
    missing = [f for f in runs.REQUIRED_FIELDS if f not in c]
    if c.task == 'classification':
      missing += [f for f in classification.REQUIRED_FIELDS if f not in c]
    table = {**run_folder.RECORD_DEFAULTS[''],
             **run_folder.RECORD_DEFAULTS.get(c.task, {})}
    for key in table:
      node = c
      for part in key.split('.'):
        if part not in node:
          missing.append(key)
          break
        node = node[part]
    assert not missing, (c.task, missing)
    assert tasks.get(c).name == c.task
