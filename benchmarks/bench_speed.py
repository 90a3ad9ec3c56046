"""tokenloom, transformers and llama.cpp side by side on the same model and prompts.

    nice -n 19 bash benchmarks/setup_llama_cpp.sh     # once: llama-cpp-python in benchmarks/.venv-llama
    python benchmarks/bench_speed.py [--quick] [-m smollm2-135m-instruct] [--threads 2] [--reps 3]
        [--new-tokens 64] [--engines tokenloom,transformers,llama.cpp] [--tokenloom-quantize auto|none|int8|int4]

The same as `tokenloom bench` (the code is tokenloom/bench.py, whose docstring says what is
measured and how). Prints a markdown table of tok/s for prefill (512-token prompt), decode at
batch 1 / 8 / 32 and 4-beam search, peak RSS against tokenloom's memory budget, and greedy-token
agreement with llama.cpp, with ratios tokenloom / other; writes
benchmarks/results/speed-<timestamp>.json.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's tokenloom, installed or not

from tokenloom import bench  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_arguments(parser)
    sys.exit(bench.run(parser.parse_args()))
