"""Kill-anywhere resume of a real training CLI: bench/soak_resume.py on stage 2 with a SIGTERM and a SIGKILL.

Stage 2's run holds everything a resume must restore (two train states, the generator EMA, the code-map iterator,
metrics logged between reports, the copy of its stage 1); stage 1 resumes through the same loop (tests/test_loop.py
stops it by signal; tests/test_data.py resumes its iterator). `make soak` kills both stages' CLIs 20 times each."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_killed_runs_resume_bit_for_bit(tmp_path, tiny_chain):
  """The SIGTERMed run saves at the step it names and exits 143, every restart resumes from the newest complete
  checkpoint, and the final checkpoint and every step's losses equal an uninterrupted run exactly."""
  result = subprocess.run([sys.executable, '-m', 'bench.soak_resume', '--stage=gan', '--kills=2', '--signals=TERM,KILL',
                           '--steps=40', '--max_delay=0.5', '--seed=1', f'--workdir={tmp_path}',
                           f'--stage1_workdir={tiny_chain["stage1"]}'],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  (stage,) = summary['results']
  assert summary['ok'] and stage['stage'] == 'gan'
  assert stage['kills'] == 2 and stage['by_signal'] == {'TERM': 1, 'KILL': 1} and stage['terms_clean']
  assert stage['params_equal'] and stage['losses_equal'] and stage['steps'] == 40
