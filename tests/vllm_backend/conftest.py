"""vLLM engine settings for the CPU test run (read when vLLM is imported, so set before any test imports it)."""

import os

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the toys need a few MiB
# Run the engine core in this process: the tests read the model's remembered selections (apply_model), and
# one process starts faster on two cores.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
