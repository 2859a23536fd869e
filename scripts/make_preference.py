"""Regenerates examples/preference/: preference pairs and KTO examples for the quickstart's string reversal.

    python scripts/make_preference.py

Each pair's prompt is a quickstart instruction ("Reverse: kdwqe\n", the quickstart's plain prompt template), the
chosen completion its reversal ("eqwdk") and the rejected one a near miss: the word copied unreversed, or the
reversal with two neighbouring letters swapped. A model built from config starts at chance (about 50% of held-out
pairs ranked right) and DPO teaches it to rank them. kto_*.jsonl holds the same completions unpaired, each with a
boolean `label`. The words are the quickstart's, so nothing here is new to a model that saw it; the output is
deterministic (seeded).
"""

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "examples" / "preference"


def near_miss(word: str, rng: random.Random) -> str:
    """A wrong answer close to the right one."""
    right = word[::-1]
    if rng.random() < 0.5 and word != right:
        return word
    while True:
        i = rng.randrange(len(right) - 1)
        wrong = right[:i] + right[i + 1] + right[i] + right[i + 2:]
        if wrong != right:
            return wrong
        if len(set(right)) == 1:
            return right + right[0]


def pairs(source: Path, n: int, rng: random.Random) -> list[dict]:
    rows = [json.loads(line) for line in source.read_text().splitlines()][:n]
    out = []
    for row in rows:
        word = row["instruction"].removeprefix("Reverse: ")
        out.append({"prompt": row["instruction"] + "\n", "chosen": row["output"], "rejected": near_miss(word, rng)})
    return out


def unpaired(rows: list[dict], rng: random.Random) -> list[dict]:
    """Each pair becomes one KTO example: its chosen (label true) or its rejected completion (label false)."""
    return [{"prompt": r["prompt"], "completion": r["chosen"], "label": True} if rng.random() < 0.5 else
            {"prompt": r["prompt"], "completion": r["rejected"], "label": False} for r in rows]


def main() -> None:
    rng = random.Random(0)
    OUT.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 3000), ("validation", 200)):
        rows = pairs(ROOT / "examples" / "quickstart" / f"{split}.jsonl", n, rng)
        (OUT / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (OUT / f"kto_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in unpaired(rows, rng)))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
