"""Regenerates examples/quickstart/: a character-level tokenizer, a string-reversal task, and a second task for
configs_toml/qlora_cpu.toml to teach the reversal model: reversing longer words (9 to 12 letters; it saw 3 to 8).

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


def reverse(word: str) -> dict:
    return {"instruction": f"Reverse: {word}", "output": word[::-1]}


def rows(n: int, rng: random.Random, seen: set[str], lengths: tuple[int, int] = (3, 8)) -> list[dict]:
    out = []
    while len(out) < n:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(*lengths)))
        if word in seen:
            continue
        seen.add(word)
        out.append(reverse(word))
    return out


def main() -> None:
    rng = random.Random(0)
    seen: set[str] = set()
    train, validation = rows(6000, rng, seen), rows(200, rng, seen)  # disjoint words
    OUT.mkdir(parents=True, exist_ok=True)
    rng, seen = random.Random(1), set()  # its own stream: the reversal files stay as they were
    long_train, long_validation = rows(6000, rng, seen, (9, 12)), rows(200, rng, seen, (9, 12))
    files = {"train": train, "validation": validation, "long_train": long_train, "long_validation": long_validation}
    for name, data in files.items():
        with open(OUT / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in data)
    tokenizer = byte_level_tokenizer([r["instruction"] + "\n" + r["output"] for r in train])
    tokenizer.save_pretrained(OUT / "tokenizer")
    print(f"wrote {len(train)} train and {len(validation)} validation rows of each task and a "
          f"{len(tokenizer)}-token tokenizer to {OUT}")


if __name__ == "__main__":
    main()
