"""The profiler hook: `config.profile_steps=START,COUNT` writes a jax.profiler trace."""

import glob
import os
import tempfile

import pytest

from tests import toy_families
from train import loop
from train import storage
from train.errors import UserError


def test_profile_steps_writes_a_trace_of_the_window(tmp_path, capsys):
  result = loop.train(toy_families.regression_config(total_steps=6, profile_steps='2,3'),
                      str(tmp_path))
  assert sorted(result.step_losses) == [1, 2, 3, 4, 5, 6]  # training went on past the window
  traces = glob.glob(str(tmp_path / 'profile/**/*.xplane.pb'), recursive=True)
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0, traces
  # ... and a Perfetto trace beside it (ui.perfetto.dev opens it).
  assert glob.glob(str(tmp_path / 'profile/**/*.trace.json.gz'), recursive=True)
  assert 'profile of steps 2-4 written to' in capsys.readouterr().out


def test_profile_window_past_the_end_still_closes_the_trace(tmp_path):
  loop.train(toy_families.regression_config(total_steps=3, profile_steps='2,10'), str(tmp_path))
  assert glob.glob(str(tmp_path / 'profile/**/*.xplane.pb'), recursive=True)


@pytest.mark.parametrize('text', ['5', '1,0', '-1,2', 'a,b', '1,2,3'])
def test_bad_profile_steps_is_one_line(tmp_path, text):
  with pytest.raises(UserError, match=r'config.profile_steps=.*START,COUNT') as e:
    loop.train(toy_families.regression_config(profile_steps=text), str(tmp_path))
  assert '\n' not in str(e.value)
  assert not os.path.exists(tmp_path / 'checkpoints')


def test_remote_run_directory_gets_the_trace_copied(tmp_path, monkeypatch):
  # jax.profiler writes local files: for a run directory that is not local (gs://), the loop
  # traces into a temporary directory and copies the files over. Pretend every path is remote.
  monkeypatch.setattr(storage, 'is_local', lambda path: False)
  temp_root = tmp_path / 'tmp'
  temp_root.mkdir()
  monkeypatch.setattr(tempfile, 'tempdir', str(temp_root))
  loop.train(toy_families.regression_config(total_steps=4, profile_steps='1,2'),
             str(tmp_path / 'run'))
  assert glob.glob(str(tmp_path / 'run/profile/**/*.xplane.pb'), recursive=True)
  assert glob.glob(str(tmp_path / 'run/profile/**/*.trace.json.gz'), recursive=True)
  assert not os.listdir(temp_root)  # the temporary trace directory is gone
