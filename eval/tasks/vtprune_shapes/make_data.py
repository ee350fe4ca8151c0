"""Write the task's data file: python eval/tasks/vtprune_shapes/make_data.py"""

import json
from pathlib import Path

from vtprune.toyvlm.data import TEST_SEED, make_split, to_record

SAMPLES = 300
OUT = Path(__file__).with_name("shapes_test.jsonl")

if __name__ == "__main__":
    with OUT.open("w") as f:
        for sample in make_split(TEST_SEED, SAMPLES):
            f.write(json.dumps(to_record(sample)) + "\n")
    print(f"wrote {SAMPLES} samples to {OUT}")
