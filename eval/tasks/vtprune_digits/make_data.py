"""Write the task's data file: python eval/tasks/vtprune_digits/make_data.py"""

import json
from pathlib import Path

from utils import SAMPLES, held_out_split

OUT = Path(__file__).with_name("digits_test.jsonl")

if __name__ == "__main__":
    with OUT.open("w") as f:
        for index, sample in enumerate(held_out_split()):
            record = {"index": index, "question": sample.question, "answer": sample.answer, "qtype": sample.qtype}
            f.write(json.dumps(record) + "\n")
    print(f"wrote {SAMPLES} questions to {OUT}")
