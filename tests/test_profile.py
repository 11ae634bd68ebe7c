"""The profiler hook: `config.profile_steps=START,COUNT` writes a jax.profiler trace."""

import glob
import os

import pytest

from tests import toy_families
from train import loop
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
