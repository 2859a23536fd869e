"""The identity of a training file's bytes: what a resume compares to tell a replaced, edited, truncated or shuffled
file from the one its checkpoint trained on (tests/checkpoint/test_reliability.py runs the refusals end to end)."""

import os
import random

from automodel.data.identity import file_identity, source_identity


def test_a_large_file_is_sampled_and_any_usual_change_shows(tmp_path):
    rng = random.Random(0)
    lines = [f'{{"prompt": "{rng.random()}", "completion": "{rng.random()}"}}\n' for _ in range(60_000)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(lines))
    size = path.stat().st_size
    assert size > 3 * 2**20  # sampled, not read whole
    before = file_identity(path)
    assert before.startswith(f"{size} bytes, sha256 ")
    os.utime(path, (1, 1))  # touched, or copied without its times: the same bytes, the same identity
    assert file_identity(path) == before

    def changed(text: str) -> str:
        path.write_text(text)
        return file_identity(path)

    shuffled = lines[:]
    rng.shuffle(shuffled)
    assert changed("".join(shuffled)) != before
    assert changed("".join(lines[: len(lines) // 2 + 1])) != before  # truncated just past a midpoint
    assert changed("".join(lines[:-1] + [lines[-1].replace("0", "1", 1)])) != before  # the last row edited, same size
    assert changed("".join(lines)) == before


def test_a_small_file_is_read_whole_a_directory_is_its_files_and_a_hub_id_has_none(tmp_path):
    small = tmp_path / "a.jsonl"
    small.write_text('{"text": "one"}\n' * 100)
    first = source_identity(str(small))
    small.write_text('{"text": "one"}\n' * 49 + '{"text": "two"}\n' + '{"text": "one"}\n' * 50)
    assert source_identity(str(small)) != first  # one byte in the middle of a small file
    shards = tmp_path / "shards"
    shards.mkdir()
    for k in range(20):
        (shards / f"part-{k:03d}.jsonl").write_text(f'{{"text": "{k}"}}\n' * 10)
    (shards / ".cache").mkdir()
    (shards / ".cache" / "lock").write_text("ignored")
    whole = source_identity(str(shards))
    assert whole.startswith("20 files, sha256 ")
    (shards / ".cache" / "lock").write_text("still ignored")
    assert source_identity(str(shards)) == whole
    (shards / "part-007.jsonl").write_text('{"text": "x"}\n' * 10)
    assert source_identity(str(shards)) != whole
    assert source_identity("HuggingFaceH4/ultrachat_200k") is None
