#!/bin/sh
# C/C++ compiler for DeepSpeed's ahead-of-time op build in the image (Dockerfile, trainer-deps stage).
# DeepSpeed compiles its CPU ops with -march=native and with the SIMD width of the machine that builds them
# (-D__AVX512__ on an AVX-512 builder), so an image built on one CPU could die with SIGILL on another node.
# On x86-64 this rewrites both to a fixed level: CPU_MARCH (default x86-64-v3: AVX2 and FMA, every x86 server
# since about 2015) and AVX2-wide vectors. Elsewhere it passes everything through unchanged.
set -eu
if [ "$(uname -m)" = x86_64 ]; then
  for arg do
    shift
    case $arg in
      -march=native) arg=-march=${CPU_MARCH:-x86-64-v3} ;;
      -D__AVX512__) arg=-D__AVX256__ ;;
    esac
    set -- "$@" "$arg"
  done
fi
exec g++ "$@"
