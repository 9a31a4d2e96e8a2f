# lowrank_native: the CPU kernels. Each ISA's kernels are a static library compiled with only that ISA's flags
# (never -march=native: the build machine need not be the machine that runs it); addon.cc picks one at load
# time from what the CPU reports (LOWRANK_ISA or setIsa() can force a narrower one).
{
  'variables': {
    'lowrank_cflags': ['-O3', '-fPIC', '-fvisibility=hidden', '-fno-math-errno', '-Wno-unknown-pragmas'],
    'lowrank_avx2_flags': ['-mavx2', '-mfma', '-mf16c'],
    'lowrank_avx512_flags': ['-mavx512f', '-mavx512bw', '-mavx512vl', '-mfma', '-mf16c'],
  },
  'target_defaults': {
    'cflags!': ['-O2', '-fno-exceptions'],
    'cflags_cc!': ['-O2', '-fno-exceptions'],
    'conditions': [
      ['OS=="linux"', {
        'cflags': ['-fopenmp'],
        'ldflags': ['-fopenmp'],
      }],
    ],
  },
  'targets': [
    {
      'target_name': 'lowrank_generic',
      'type': 'static_library',
      'sources': ['gemm_generic.cc'],
      'cflags': ['<@(lowrank_cflags)'],
      'xcode_settings': {'OTHER_CFLAGS': ['<@(lowrank_cflags)']},
    },
    {
      # The op kernels (ops_*.cc, ops_*.h: elementwise, norms, rope, attention, losses, 4-bit, row-invariant GEMM
      # routing), one static library per ISA like the GEMM.
      'target_name': 'lowrank_ops_generic',
      'type': 'static_library',
      'sources': ['ops_generic.cc'],
      'cflags': ['<@(lowrank_cflags)'],
      'xcode_settings': {'OTHER_CFLAGS': ['<@(lowrank_cflags)']},
    },
    {
      'target_name': 'lowrank_native',
      'sources': ['addon.cc', 'ops_addon.cc', 'pool.cc'],
      'dependencies': [
        "<!(node -p \"require('node-addon-api').targets\"):node_addon_api_except",
        'lowrank_generic',
        'lowrank_ops_generic',
      ],
      'cflags': ['-O3', '-fvisibility=hidden', '-Wno-unknown-pragmas'],
      'cflags_cc': ['-fexceptions'],
      'xcode_settings': {'GCC_ENABLE_CPP_EXCEPTIONS': 'YES'},
      'conditions': [
        ['OS=="linux"', {'libraries': ['-fopenmp']}],
        ['target_arch=="x64"', {'dependencies': ['lowrank_avx2', 'lowrank_avx512', 'lowrank_ops_avx2', 'lowrank_ops_avx512']}],
      ],
    },
  ],
  'conditions': [
    ['target_arch=="x64"', {
      'targets': [
        {
          'target_name': 'lowrank_avx2',
          'type': 'static_library',
          'sources': ['gemm_avx2.cc'],
          'cflags': ['<@(lowrank_cflags)', '<@(lowrank_avx2_flags)'],
          'xcode_settings': {'OTHER_CFLAGS': ['<@(lowrank_cflags)', '<@(lowrank_avx2_flags)']},
        },
        {
          'target_name': 'lowrank_avx512',
          'type': 'static_library',
          'sources': ['gemm_avx512.cc'],
          # GCC 12's own headers trip the uninitialized warnings (_mm512_undefined_ps is self-initialised).
          'cflags': ['<@(lowrank_cflags)', '<@(lowrank_avx512_flags)', '-Wno-uninitialized', '-Wno-maybe-uninitialized'],
          'xcode_settings': {'OTHER_CFLAGS': ['<@(lowrank_cflags)', '<@(lowrank_avx512_flags)']},
        },
        {
          'target_name': 'lowrank_ops_avx2',
          'type': 'static_library',
          'sources': ['ops_avx2.cc'],
          'cflags': ['<@(lowrank_cflags)', '<@(lowrank_avx2_flags)'],
          'xcode_settings': {'OTHER_CFLAGS': ['<@(lowrank_cflags)', '<@(lowrank_avx2_flags)']},
        },
        {
          'target_name': 'lowrank_ops_avx512',
          'type': 'static_library',
          'sources': ['ops_avx512.cc'],
          'cflags': ['<@(lowrank_cflags)', '<@(lowrank_avx512_flags)', '-Wno-uninitialized', '-Wno-maybe-uninitialized'],
          'xcode_settings': {'OTHER_CFLAGS': ['<@(lowrank_cflags)', '<@(lowrank_avx512_flags)']},
        },
      ],
    }],
  ],
}
