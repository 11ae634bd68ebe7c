"""Progress lines of long host loops (sampling, likelihoods): rate after the compiling chunk,
ETA, and the throttle, on a fake clock."""

from train import metrics


def test_progress_rate_excludes_the_first_chunk_and_throttles_lines():
  now = [0.0]
  lines = []
  progress = metrics.Progress('sampling', 1000, every_s=5.0, printer=lines.append,
                              clock=lambda: now[0])
  assert lines == ['sampling: 1,000 images']
  now[0] = 100.0                # the first chunk: 100 s, mostly compilation
  progress.update(100)
  assert lines[-1] == ('sampling 100/1,000 images | 1.0 images/s | elapsed 1m40s | ETA 15m00s'
                       ' | first chunk: includes compilation, if any')
  now[0] = 102.0                # 2 s later: too soon for another line
  progress.update(100)
  assert len(lines) == 2
  now[0] = 108.0                # 8 s for the 200 images after the first chunk: 25 images/s
  progress.update(100)
  assert lines[-1] == ('sampling 300/1,000 images | 25.0 images/s | elapsed 1m48s | ETA 28s')
  now[0] = 109.0
  progress.update(700)          # the last chunk always prints
  assert lines[-1].startswith('sampling 1,000/1,000 images') and lines[-1].endswith('ETA 0s')
