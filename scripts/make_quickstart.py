"""Regenerates examples/quickstart/: a character-level tokenizer and a string-reversal task.

    python scripts/make_quickstart.py

The task ("Reverse: kdwqe" -> "eqwdk") is small enough for a ~1M-parameter Llama to learn on two CPU
cores in a few minutes, and its held-out exact match starts at 0%, so learning is plain to see. The
output is deterministic (seeded), so re-running it changes nothing.
"""

import json
import random
import string
from pathlib import Path

from automodel.models import byte_level_tokenizer

OUT = Path(__file__).resolve().parents[1] / "examples" / "quickstart"


def rows(n: int, rng: random.Random, seen: set[str]) -> list[dict]:
    out = []
    while len(out) < n:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 8)))
        if word in seen:
            continue
        seen.add(word)
        out.append({"instruction": f"Reverse: {word}", "output": word[::-1]})
    return out


def main() -> None:
    rng = random.Random(0)
    seen: set[str] = set()
    train, validation = rows(6000, rng, seen), rows(200, rng, seen)  # disjoint words
    OUT.mkdir(parents=True, exist_ok=True)
    for name, data in (("train", train), ("validation", validation)):
        with open(OUT / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in data)
    tokenizer = byte_level_tokenizer([r["instruction"] + "\n" + r["output"] for r in train])
    tokenizer.save_pretrained(OUT / "tokenizer")
    print(f"wrote {len(train)} train and {len(validation)} validation rows and a "
          f"{len(tokenizer)}-token tokenizer to {OUT}")


if __name__ == "__main__":
    main()
