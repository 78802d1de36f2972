"""The benchmarks' machine header: the CPU kind it names decides which table of docs/performance.md a figure is for."""
from bench import train_step


def _cpuinfo(tmp_path, model, flags):
  path = tmp_path / 'cpuinfo'
  block = f'processor\t: 0\nmodel name\t: {model}\nflags\t\t: {" ".join(flags)}\n\n'
  path.write_text(block + block.replace(': 0', ': 1'))
  return str(path)


def test_cpu_kind_names_the_vector_features(tmp_path):
  base = ['fpu', 'sse4_2', 'avx', 'avx2', 'fma']
  assert train_step.cpu_kind(_cpuinfo(tmp_path, 'AMD EPYC 7B13', base)) == 'AMD EPYC 7B13 (AVX2 only)'
  assert train_step.cpu_kind(_cpuinfo(tmp_path, 'AMD EPYC 9B45', base + ['avx512f', 'avx512bw'])) == \
      'AMD EPYC 9B45 (AVX-512)'
  assert train_step.cpu_kind(_cpuinfo(tmp_path, 'Intel(R) Xeon(R) Processor',
                                      base + ['avx512f', 'amx_tile', 'amx_bf16'])) == \
      'Intel(R) Xeon(R) Processor (AVX-512 with AMX)'
  assert train_step.cpu_kind(str(tmp_path / 'missing')) == 'unknown CPU'
