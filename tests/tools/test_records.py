"""cnn.tools.records / experiments.records: a study keeps its runs' records
in the repository, and its tables rebuild from them alone."""
import os
import pathlib

import pytest
import tensorflow_datasets as tfds

from cnn.errors import ConfigError
from cnn.tools import plotting
from cnn.tools import records
from cnn import runs as runs_lib
from tests.conftest import ROOT, small_config


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('run') / 'resnet8_s0'
  with tfds.testing.mock_data(num_examples=24):
    runs_lib.train_and_evaluate(small_config(steps=2), str(workdir))
  return workdir


def test_keeps_the_records_never_the_checkpoints(finished, tmp_path):
  dest = tmp_path / 'results' / 'study' / 'runs' / 'resnet8_s0'
  written = records.keep(str(finished), str(dest))
  assert sorted(os.listdir(dest)) == ['config.json', 'metrics.jsonl',
                                      'provenance.json']
  assert len(written) == 3
  for name in os.listdir(dest):
    assert (dest / name).read_bytes() == (finished / name).read_bytes()
  assert (finished / 'checkpoints').is_dir()
  # Kept again unchanged: fine; other records under the name: refused.
  records.keep(str(finished), str(dest))
  (dest / 'metrics.jsonl').write_text('{"step": 1, "split": "train"}\n')
  with pytest.raises(ConfigError, match='already keeps other records'):
    records.keep(str(finished), str(dest))
  records.keep(str(finished), str(dest), replace=True)
  assert (dest / 'metrics.jsonl').read_bytes() == (
      finished / 'metrics.jsonl').read_bytes()
  # The kept folder is a sweep folder to the plotting tools.
  [run] = plotting.load_runs(str(dest.parent))
  assert run.name == 'resnet8_s0' and run.depth == 8


def test_an_unfinished_run_is_refused_in_one_line(finished, tmp_path):
  cut = tmp_path / 'cut'
  cut.mkdir()
  for name in records.RECORDS:
    text = (finished / name).read_text()
    if name == 'metrics.jsonl':
      text = ''.join(line + '\n' for line in text.splitlines()
                     if '"step": 1,' in line)
    (cut / name).write_text(text)
  with pytest.raises(ConfigError, match='stopped at step 1 of 2'):
    records.keep(str(cut), str(tmp_path / 'dest'))
  assert not (tmp_path / 'dest').exists()
  records.keep(str(cut), str(tmp_path / 'dest'), unfinished=True)
  os.remove(cut / 'provenance.json')
  with pytest.raises(ConfigError, match='lacks provenance.json'):
    records.keep(str(cut), str(tmp_path / 'dest2'))


STUDIES = sorted(p.parent for p in (ROOT / 'results').glob('*/runs')
                 if (p.parent / 'table6.md').is_file())


@pytest.mark.parametrize('study', STUDIES, ids=lambda p: p.name)
def test_a_committed_table_rebuilds_from_its_records_byte_for_byte(study):
  runs = plotting.load_runs(str(study / 'runs'))
  assert plotting.table6(runs) == (study / 'table6.md').read_text()


def test_at_least_one_study_keeps_its_records():
  assert STUDIES, 'no results/<study>/runs/ with a table6.md'
  assert isinstance(STUDIES[0], pathlib.Path)
