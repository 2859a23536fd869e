"""Streamed sources: rows equal to what tokenising in full gives, shares of ranks, packing that never splits a
sample, weighted mixing, and a stream position from which a resumed stream goes on exactly."""

import json

import attrs
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from automodel.config import BatchShape, ConfigError, DataConfig, DataSourceConfig, load_config
from automodel.data import format_options, load_examples, tokenize_examples
from automodel.data import stream as stream_module
from automodel.data.stream import TrainStream, open_rank_stream, open_train_stream, preflight
from automodel.data.tokenize import chunk_stream, document_stream
from automodel.loss import IGNORE_INDEX
from tests.helpers import ASSETS, QUICKSTART, shared_data, write_jsonl


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ASSETS / "tokenizer")  # byte-level: one token per character


def instruction_source(limit: int = 60, **kw) -> DataSourceConfig:
    return DataSourceConfig(source=str(ASSETS / "train.jsonl"), format="instruction", limit=limit, streaming=True,
                            **kw)


def text_source(tmp_path, docs: int = 30) -> DataSourceConfig:
    rng = np.random.default_rng(0)
    rows = [{"text": " ".join(f"w{int(x)}" for x in rng.integers(0, 50, size=int(rng.integers(3, 40))))}
            for _ in range(docs)]
    return DataSourceConfig(source=str(write_jsonl(tmp_path / "docs.jsonl", rows)), format="text", streaming=True)


def in_full(src: DataSourceConfig, data_cfg: DataConfig, tokenizer):
    """The source tokenised in full (the path that is not streamed)."""
    examples, _ = load_examples(attrs.evolve(src, streaming=False), format_options(data_cfg, tokenizer))
    return tokenize_examples(examples, tokenizer, data_cfg.seq_len, data_cfg.truncate, "train",
                             chunk_documents=src.format == "text")


def stream_of(data_cfg: DataConfig, tokenizer, shape: BatchShape, rank: int = 0, position=None) -> TrainStream:
    return open_train_stream(data_cfg, tokenizer, format_options(data_cfg, tokenizer), shape, seed=5, rank=rank,
                             position=position)


def rows_of(stream: TrainStream, n: int) -> list:
    return [stream.next_row() for _ in range(n)]


def test_unpacked_rows_are_the_samples_tokenised_in_full_in_order_and_a_new_pass_follows(tokenizer):
    data_cfg = DataConfig(seq_len=32, train=instruction_source(limit=60))
    want = in_full(data_cfg.train[0], data_cfg, tokenizer)
    stream = stream_of(data_cfg, tokenizer, BatchShape(4, 2))
    got = rows_of(stream, len(want) + 3)
    for k, (ids, labels, positions) in enumerate(got):
        i = k % len(want)  # the second pass starts at the first sample again
        assert ids.tolist() == want.input_ids[i] and labels.tolist() == want.labels[i] and positions is None
    assert stream.position()["sources"][0]["pass"] == 1


@pytest.mark.parametrize("kind", ["parquet", "chat"])
def test_other_files_and_formats_stream_the_samples_tokenised_in_full(tmp_path, tokenizer, kind):
    if kind == "parquet":
        import datasets

        path = tmp_path / "rows.parquet"
        datasets.load_dataset("json", data_files=str(ASSETS / "train.jsonl"), split="train[:30]").to_parquet(path)
        src = DataSourceConfig(source=str(path), format="instruction", streaming=True)
    else:
        src = DataSourceConfig(source=str(shared_data("llamafactory-demos/v1_sft_demo.jsonl")), format="chat",
                               limit=20, streaming=True)
    data_cfg = DataConfig(seq_len=4096, chat_template="chatml", train=src)
    want = in_full(src, data_cfg, tokenizer)
    got = rows_of(stream_of(data_cfg, tokenizer, BatchShape(4, 2)), len(want))
    assert len(want) >= 20
    assert [ids.tolist() for ids, _, _ in got] == list(want.input_ids)
    assert [labels.tolist() for _, labels, _ in got] == list(want.labels)


@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
def test_text_rows_are_the_document_stream_cut_into_seq_len_rows(tmp_path, tokenizer, suffix):
    data_cfg = DataConfig(seq_len=48, train=text_source(tmp_path))
    if suffix == ".txt":  # one document per line
        lines = [json.loads(line)["text"] for line in open(data_cfg.train[0].source)]
        (tmp_path / "docs.txt").write_text("\n".join(lines) + "\n")
        data_cfg = attrs.evolve(data_cfg, train=attrs.evolve(data_cfg.train[0], source=str(tmp_path / "docs.txt")))
    want = in_full(data_cfg.train[0], data_cfg, tokenizer)
    got = rows_of(stream_of(data_cfg, tokenizer, BatchShape(4, 2)), len(want) - 1)  # the last row in full is short
    assert len(want) > 10
    for k, (ids, labels, positions) in enumerate(got):
        assert ids.tolist() == want.input_ids[k] == labels.tolist() and positions is None


def test_packed_rows_take_samples_in_order_until_the_next_does_not_fit(tokenizer):
    data_cfg = DataConfig(seq_len=48, packing=True, train=instruction_source(limit=80))
    samples = in_full(data_cfg.train[0], data_cfg, tokenizer)
    got = rows_of(stream_of(data_cfg, tokenizer, BatchShape(4, 2)), 12)
    k = 0
    for ids, labels, positions in got:
        assert len(ids) <= 48
        start = 0
        for p in np.flatnonzero(positions == 0).tolist()[1:] + [len(ids)]:  # each sample of the row, whole
            assert ids[start:p].tolist() == samples.input_ids[k]
            assert labels[start] == IGNORE_INDEX and labels[start + 1:p].tolist() == samples.labels[k][1:]
            assert positions[start:p].tolist() == list(range(p - start))
            start, k = p, k + 1
        assert len(ids) + len(samples.input_ids[k]) > 48  # the next sample did not fit: it opens the next row
    assert k > 12  # several samples per row


def test_each_rank_reads_every_world_size_th_row(tokenizer):
    data_cfg = DataConfig(seq_len=32, train=instruction_source(limit=40))
    want = in_full(data_cfg.train[0], data_cfg, tokenizer)
    for rank in (0, 1):
        got = rows_of(stream_of(data_cfg, tokenizer, BatchShape(4, 2, world_size=2), rank=rank), 20)
        assert [ids.tolist() for ids, _, _ in got] == want.input_ids[rank::2]


def test_mixed_sources_draw_rows_by_weight_as_a_function_of_seed_rank_and_row(tmp_path, tokenizer):
    data_cfg = DataConfig(seq_len=48, train=[instruction_source(limit=50, weight=3.0),
                                             attrs.evolve(text_source(tmp_path), weight=1.0)])
    stream = stream_of(data_cfg, tokenizer, BatchShape(4, 2))
    draws = [stream.source_of(n) for n in range(4000)]
    assert 0.72 < draws.count(0) / 4000 < 0.78
    again = stream_of(data_cfg, tokenizer, BatchShape(4, 2))
    other_rank = stream_of(data_cfg, tokenizer, BatchShape(4, 2), rank=1)
    assert draws == [again.source_of(n) for n in range(4000)]
    assert draws != [other_rank.source_of(n) for n in range(4000)]
    # A row holds one source's tokens: a text row is seq_len long, an instruction row one sample.
    for n, (ids, labels, _) in enumerate(rows_of(stream, 40)):
        assert (len(ids) == 48 and (labels == ids).all()) if draws[n] == 1 else (labels == IGNORE_INDEX).any()


def steps(stream: TrainStream, n: int) -> list:
    return [stream.next_step() for _ in range(n)]


def same_batches(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


@pytest.mark.parametrize("kind", ["instruction", "packed", "text", "mixed", "two ranks", "shuffled"])
def test_a_stream_resumed_from_a_saved_position_gives_the_rows_of_the_uninterrupted_one(tmp_path, tokenizer, kind):
    """Positions are taken mid-document (text), with a sample pending (packed), across a pass boundary (a 25-row
    source read for 12 steps of 4 rows: every source of every kind wraps), and survive a JSON round trip (the checkpoint's form)."""
    docs = text_source(tmp_path, docs=6)
    sources = {"instruction": [instruction_source(limit=25)], "packed": [instruction_source(limit=25)],
               "shuffled": [instruction_source(limit=8), attrs.evolve(docs, weight=1.0)],
               "text": [docs], "two ranks": [instruction_source(limit=25)],
               "mixed": [instruction_source(limit=8, weight=1.0), attrs.evolve(docs, weight=2.0)]}
    data_cfg = DataConfig(seq_len=40, packing=kind in ("packed", "shuffled"), train=sources[kind],
                          shuffle_window=7 if kind == "shuffled" else 0)
    shape = BatchShape(8 if kind == "two ranks" else 4, 2, world_size=2 if kind == "two ranks" else 1)
    for rank in range(shape.world_size):
        whole = steps(stream_of(data_cfg, tokenizer, shape, rank), 12)
        for cut in (1, 5, 9):
            position = json.loads(json.dumps(whole[cut - 1][1]))
            resumed = steps(stream_of(data_cfg, tokenizer, shape, rank, position), 12 - cut)
            assert all(same_batches(got, want) for (got, _), (want, _) in zip(resumed, whole[cut:]))
            # Resumed again from the resumed stream's own position (a run preempted twice).
            again = steps(stream_of(data_cfg, tokenizer, shape, rank, resumed[1][1]), 12 - cut - 2)
            assert all(same_batches(got, want) for (got, _), (want, _) in zip(again, whole[cut + 2:]))
    # Every source was read past its end: the cuts above include positions in a second pass.
    assert min(at["pass"] for at in whole[-1][1]["sources"]) >= 1


def global_steps(data_cfg: DataConfig, tokenizer, shape: BatchShape, n: int, position=None) -> tuple[list, dict]:
    """Each step's global batch (every rank's micro-batches, in rank order), and the position gathered from every
    rank's last one as a checkpoint's stream/ folder is (checkpoint.store.load_stream)."""
    per_rank = [steps(open_rank_stream(data_cfg, tokenizer, format_options(data_cfg, tokenizer), shape, seed=5,
                                       rank=r, position=position), n) for r in range(shape.world_size)]
    batches = [[b for r in range(shape.world_size) for b in per_rank[r][s][0]] for s in range(n)]
    last = [json.loads(json.dumps(per_rank[r][-1][1])) for r in range(shape.world_size)]
    gathered = {"shards": last[0]["shards"], "positions": {k: v for p in last for k, v in p["positions"].items()}}
    return batches, gathered


@pytest.mark.parametrize("kind", ["packed", "mixed"])
@pytest.mark.parametrize("saved_on, resumed_on", [(2, 1), (1, 2), (2, 4), (4, 2)])
def test_a_stream_resumed_on_another_number_of_ranks_gives_the_same_global_batches(tmp_path, tokenizer, kind,
                                                                                    saved_on, resumed_on):
    """The shards are the first start's ranks: resumed on another number of ranks, each step's global batch holds
    the uninterrupted run's micro-batches in the same order (so no sample is lost or read twice), whether a rank
    reads several shards (2 -> 1), a part of one (1 -> 2), or of one of several (2 -> 4)."""
    sources = {"packed": [instruction_source(limit=25)],
               "mixed": [instruction_source(limit=8, weight=1.0), attrs.evolve(text_source(tmp_path, docs=6),
                                                                              weight=2.0)]}
    data_cfg = DataConfig(seq_len=40, packing=True, train=sources[kind])
    shape = BatchShape(8, 2, world_size=saved_on)
    whole, _ = global_steps(data_cfg, tokenizer, shape, 10)
    _, at_4 = global_steps(data_cfg, tokenizer, shape, 4)
    assert at_4["shards"] == saved_on and sorted(at_4["positions"], key=int) == [str(v) for v in range(saved_on)]
    resumed, at_10 = global_steps(data_cfg, tokenizer, attrs.evolve(shape, world_size=resumed_on), 6, at_4)
    assert all(same_batches(got, want) for got, want in zip(resumed, whole[4:]))
    assert at_10["shards"] == saved_on  # and so on: the shards stay the first start's


def test_a_shuffle_window_permutes_each_window_afresh_each_pass_as_a_function_of_the_seed(tokenizer):
    data_cfg = DataConfig(seq_len=32, shuffle_window=10, train=instruction_source(limit=25))
    want = [tuple(r) for r in in_full(data_cfg.train[0], data_cfg, tokenizer).input_ids]
    assert len(want) == 25
    got = [tuple(ids.tolist()) for ids, _, _ in rows_of(stream_of(data_cfg, tokenizer, BatchShape(2, 2)), 50)]
    for first, second in ((got[:25], want), (got[25:], want)):  # two passes
        for lo, hi in ((0, 10), (10, 20), (20, 25)):  # windows of 10 rows (the last one short)
            assert sorted(first[lo:hi]) == sorted(second[lo:hi])
    assert got[:25] != want and got[25:] != got[:25]  # shuffled, and differently in the second pass
    again = [tuple(ids.tolist()) for ids, _, _ in rows_of(stream_of(data_cfg, tokenizer, BatchShape(2, 2)), 25)]
    assert again == got[:25]
    other_seed = open_train_stream(data_cfg, tokenizer, format_options(data_cfg, tokenizer), BatchShape(2, 2), seed=6,
                                   rank=0)
    assert [tuple(ids.tolist()) for ids, _, _ in rows_of(other_seed, 25)] != got[:25]


def test_a_bad_row_names_the_source_row_and_pass(tmp_path, tokenizer):
    rows = [{"instruction": "a", "output": "b"}] * 5 + [{"instruction": "a"}]
    src = DataSourceConfig(source=str(write_jsonl(tmp_path / "bad.jsonl", rows)), format="instruction",
                           streaming=True)
    data_cfg = DataConfig(seq_len=32, train=src)
    with pytest.raises(ConfigError, match=r"bad\.jsonl: line 6 \(split `train`\), field `output`"):
        preflight(data_cfg, format_options(data_cfg, tokenizer))  # before the model loads
    with pytest.raises(ConfigError, match=r"bad\.jsonl: row 2 of rank 1's share of the rows, pass 1 .*`output`"):
        stream_of(data_cfg, tokenizer, BatchShape(2, 1, world_size=2), rank=1).next_step()
    skipping = attrs.evolve(data_cfg, on_bad_row="skip")
    assert len(rows_of(stream_of(skipping, tokenizer, BatchShape(2, 2)), 12)) == 12  # 5 per pass, the bad one skipped


def test_a_source_that_yields_no_sample_is_an_error_not_an_endless_loop(tmp_path, tokenizer):
    rows = [{"instruction": "x" * 100, "output": "y" * 100}] * 3  # all longer than seq_len: dropped
    src = DataSourceConfig(source=str(write_jsonl(tmp_path / "long.jsonl", rows)), format="instruction",
                           streaming=True)
    with pytest.raises(ConfigError, match="a whole pass of the stream gave no sample"):
        stream_of(DataConfig(seq_len=32, train=src), tokenizer, BatchShape(2, 2)).next_step()


def test_config_rules_for_streaming(tmp_path):
    def problems(*overrides, path=QUICKSTART):
        with pytest.raises(ConfigError) as e:
            load_config(path, ["data.train.streaming=true", *overrides], world_size=1)
        return str(e.value)

    by_epochs = tmp_path / "epochs.toml"
    by_epochs.write_text(QUICKSTART.read_text().replace("max_steps = 500", "epochs = 1"))
    assert "a streamed source's length is not known ahead; set train.max_steps" in problems(path=by_epochs)
    assert "validation sets are read in full" in problems("data.validation.streaming=true")
    assert "stream every training source or none" in problems(
        'data.train=[{source = "a.jsonl", streaming = true}, {source = "b.jsonl"}]')


def test_a_directory_of_files_splits_by_whole_files_and_resumes_in_its_second_file(tmp_path, tokenizer,
                                                                                    monkeypatch):
    monkeypatch.setattr(stream_module, "READ_ROWS", 4)  # windows of 4 rows: a position can start in file 2
    folder = tmp_path / "corpus"
    folder.mkdir()
    for k in range(2):
        write_jsonl(folder / f"part{k}.jsonl", [{"instruction": f"file {k} row {i}", "output": str(i)}
                                                for i in range(7)])
    data_cfg = DataConfig(seq_len=32, train=DataSourceConfig(source=str(folder), format="instruction",
                                                             streaming=True))
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    for rank in (0, 1):  # 2 files, 2 ranks: each rank reads one whole file
        rows = rows_of(stream_of(data_cfg, tokenizer, BatchShape(2, 1, world_size=2), rank), 7)
        assert all(f"file {rank} row {i}" in decode(ids) for i, (ids, _, _) in enumerate(rows))
    whole = steps(stream_of(data_cfg, tokenizer, BatchShape(2, 2)), 6)  # one rank reads both files in turn
    resumed = steps(stream_of(data_cfg, tokenizer, BatchShape(2, 2), position=whole[4][1]), 1)  # in file 2
    assert '"shard_idx": 1' in json.dumps(whole[4][1])  # the datasets state names the file
    assert same_batches(resumed[0][0], whole[5][0])


def test_a_source_that_changed_under_a_saved_position_is_an_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(10)])
    data_cfg = DataConfig(seq_len=32, train=DataSourceConfig(source=str(path), format="instruction", streaming=True))
    stream = stream_of(data_cfg, tokenizer, BatchShape(2, 2))
    _, position = stream.next_step()
    _, position = stream.next_step()
    assert position["sources"][0]["taken"] == 4  # 4 samples into the first window
    write_jsonl(path, [{"instruction": "q", "output": "a"}] * 3)  # the file replaced by a shorter one
    with pytest.raises(ConfigError, match="4 samples into a window that now holds 3: the source changed"):
        stream_of(data_cfg, tokenizer, BatchShape(2, 2), position=position)
