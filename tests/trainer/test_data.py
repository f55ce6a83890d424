"""Datasets: sources (JSON/JSONL/Parquet/folders), formats, prompt masking, truncation, packing,
collate, held-out split and the resumable batch loader."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from kubetune.trainer.config.finetune import DatasetSection
from kubetune.trainer.data import DatasetError, format_alpaca_prompt, load_records, pack_samples, tokenize_records
from kubetune.trainer.data.collate import collate
from kubetune.trainer.data.dataset import BatchLoader, build_datasets, hold_out
from kubetune.trainer.data.formats import IGNORE_INDEX
from kubetune.trainer.data.sources import SourceRecord

ALPACA = [
    {"instruction": "What sound does a cow make?", "input": "", "output": "moo"},
    {"instruction": "Answer in one word.", "input": "What color is snow?", "output": "white"},
    {"instruction": "Opposite of hot?", "output": "cold"},
]


class CharTokenizer:
    """One id per character (ids 3..), BOS=1, EOS=2, PAD=0: enough to check the data logic by hand."""

    bos_id, eos_id, pad_id = 1, 2, 0

    def encode(self, text, add_bos=True, add_eos=False):
        return ([self.bos_id] if add_bos else []) + [3 + ord(c) % 200 for c in text] + ([self.eos_id] if add_eos else [])

    def tokenize_messages(self, messages):
        ids, mask = [], []
        for message in messages:
            piece = self.encode(f"<{message['role']}>{message['content']}", add_bos=False, add_eos=True)
            ids += piece
            mask += [message["role"] == "assistant"] * len(piece)
        return ids, mask


TOK = CharTokenizer()


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def records_of(data):
    return [SourceRecord(r, f"test record {i}") for i, r in enumerate(data, start=1)]


# --- sources -----------------------------------------------------------------------------------

def test_jsonl_json_and_parquet_files_give_the_same_records(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ALPACA)
    (tmp_path / "a.json").write_text(json.dumps(ALPACA))
    rows = [{"input": "", **r} for r in ALPACA]  # parquet needs one schema
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    for name in ("a.jsonl", "a.json", "a.parquet"):
        loaded = load_records(str(tmp_path / name))
        assert [r.data["output"] for r in loaded] == ["moo", "white", "cold"]
        assert loaded[1].where.endswith("record 2") or "record 2 " in loaded[1].where


def test_a_folder_source_picks_the_split_file(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ALPACA)
    write_jsonl(tmp_path / "validation.jsonl", ALPACA[:1])
    assert len(load_records(str(tmp_path), "train")) == 3
    assert len(load_records(str(tmp_path), "validation")) == 1
    with pytest.raises(DatasetError, match=r"no file for split 'test'.*found: train.jsonl, validation.jsonl"):
        load_records(str(tmp_path), "test")


def test_unreadable_sources_are_errors_naming_file_and_record(tmp_path):
    with pytest.raises(DatasetError, match="no such file or folder"):
        load_records(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ALPACA[0]) + "\n\n{not json\n")
    with pytest.raises(DatasetError, match=r"bad.jsonl record 2 \(line 3\): not valid JSON"):
        load_records(str(bad))
    scalar = tmp_path / "scalar.jsonl"
    scalar.write_text('"just a string"\n')
    with pytest.raises(DatasetError, match=r"scalar.jsonl record 1 \(line 1\): a record must be a JSON object, got str"):
        load_records(str(scalar))
    (tmp_path / "obj.json").write_text('{"a": 1}')
    with pytest.raises(DatasetError, match="must be a list of records"):
        load_records(str(tmp_path / "obj.json"))
    (tmp_path / "data.xml").write_text("<a/>\n")
    with pytest.raises(DatasetError, match="unsupported file type '.xml'"):
        load_records(str(tmp_path / "data.xml"))
    with pytest.raises(DatasetError, match="unknown built-in dataset"):
        load_records("builtin://nope")


def test_hf_source_reads_through_the_datasets_library(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # a local folder org/name stands in for the Hub repo org/name
    (tmp_path / "org" / "name").mkdir(parents=True)
    write_jsonl(tmp_path / "org" / "name" / "train.jsonl", ALPACA)
    loaded = load_records("hf://org/name", "train")
    assert [r.data["output"] for r in loaded] == ["moo", "white", "cold"]
    assert loaded[2].where == "hf://org/name [train] record 3"
    # huggingface_hub's form names the same repository (not a repository datasets/org with a config name)
    assert [r.data for r in load_records("hf://datasets/org/name", "train")] == [r.data for r in loaded]
    with pytest.raises(DatasetError, match=r"hf://org/name split 'nosuch'"):
        load_records("hf://org/name", "nosuch")


# --- formats -----------------------------------------------------------------------------------

def test_alpaca_masks_the_prompt_and_trains_on_the_response():
    (sample,) = tokenize_records(records_of(ALPACA[:1]), TOK, "alpaca", max_seq_len=4096)
    prompt = TOK.encode(format_alpaca_prompt("What sound does a cow make?"))
    response = TOK.encode("moo", add_bos=False, add_eos=True)
    assert sample["input_ids"] == prompt + response
    assert sample["labels"] == [IGNORE_INDEX] * len(prompt) + response


def test_alpaca_input_field_goes_into_the_prompt_and_train_on_input_keeps_it():
    (sample,) = tokenize_records(records_of(ALPACA[1:2]), TOK, "alpaca", 4096, train_on_input=True)
    prompt = TOK.encode(format_alpaca_prompt("Answer in one word.", "What color is snow?"))
    assert "### Input:\nWhat color is snow?" in format_alpaca_prompt("Answer in one word.", "What color is snow?")
    assert sample["input_ids"][: len(prompt)] == prompt
    # Everything is trained on except the first token, which nothing predicts.
    assert sample["labels"] == [IGNORE_INDEX] + sample["input_ids"][1:]


@pytest.mark.parametrize(
    "record, message",
    [
        ({"instruction": "x"}, r"test record 1: field 'output' is missing \(alpaca records need"),
        ({"output": "x"}, r"test record 1: field 'instruction' is missing"),
        ({"instruction": "x", "output": 3}, r"test record 1: field 'output' must be a string, got int"),
        ({"instruction": "x", "output": "y", "input": ["z"]}, r"field 'input' must be a string, got list"),
    ],
)
def test_malformed_alpaca_records_name_record_and_field(record, message):
    with pytest.raises(DatasetError, match=message):
        tokenize_records(records_of([record]), TOK, "alpaca", 4096)


def test_malformed_record_in_a_file_names_the_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [ALPACA[0], {"instruction": "no output"}])
    with pytest.raises(DatasetError, match=r"train.jsonl record 2 \(line 2\): field 'output' is missing"):
        tokenize_records(load_records(str(path)), TOK, "alpaca", 4096)


def test_chat_trains_only_on_assistant_turns():
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    (sample,) = tokenize_records(records_of([{"messages": messages}]), TOK, "chat", 4096)
    ids, mask = TOK.tokenize_messages(messages)
    assert sample["input_ids"] == ids
    assert sample["labels"] == [t if keep else IGNORE_INDEX for t, keep in zip(ids, mask)]
    (everything,) = tokenize_records(records_of([{"messages": messages}]), TOK, "chat", 4096, train_on_input=True)
    assert everything["labels"][1:] == ids[1:]


@pytest.mark.parametrize(
    "messages, message",
    [
        (None, "field 'messages' must be a non-empty list"),
        ([{"role": "robot", "content": "x"}], r"field 'messages\[0\].role' is 'robot'; expected one of system, user, assistant"),
        ([{"role": "user", "content": 5}], r"field 'messages\[0\].content' must be a string"),
        ([{"role": "user", "content": "x"}], "has no assistant turn"),
    ],
)
def test_malformed_chat_records_name_the_field(messages, message):
    with pytest.raises(DatasetError, match=message):
        tokenize_records(records_of([{"messages": messages}]), TOK, "chat", 4096)


def test_text_documents_are_split_into_max_seq_len_chunks_not_cut():
    text = "abcdefghij" * 3  # 30 chars + BOS + EOS = 32 tokens
    samples = tokenize_records(records_of([{"body": text}]), TOK, "text", max_seq_len=10, text_field="body")
    assert [len(s["input_ids"]) for s in samples] == [10, 10, 10, 2]
    assert sum((s["input_ids"] for s in samples), []) == TOK.encode(text, add_bos=True, add_eos=True)
    with pytest.raises(DatasetError, match="field 'body' is missing"):
        tokenize_records(records_of([{"text": text}]), TOK, "text", 10, text_field="body")


def test_preference_records_give_chosen_and_rejected_with_the_prompt_masked():
    (sample,) = tokenize_records(
        records_of([{"prompt": "Q?", "chosen": "good", "rejected": "bad"}]), TOK, "preference", 4096
    )
    prompt = TOK.encode("Q?")
    assert sample["chosen_input_ids"] == prompt + TOK.encode("good", add_bos=False, add_eos=True)
    assert sample["rejected_labels"] == [IGNORE_INDEX] * len(prompt) + TOK.encode("bad", add_bos=False, add_eos=True)
    with pytest.raises(DatasetError, match="field 'rejected' is missing"):
        tokenize_records(records_of([{"prompt": "Q?", "chosen": "good"}]), TOK, "preference", 4096)


def test_truncation_keeps_max_seq_len_and_drops_samples_with_nothing_to_learn(caplog):
    long_output = {"instruction": "x", "output": "y" * 500}
    samples = tokenize_records(records_of([long_output]), TOK, "alpaca", max_seq_len=300)
    assert len(samples[0]["input_ids"]) == len(samples[0]["labels"]) == 300
    long_prompt = {"instruction": "x" * 500, "output": "y"}  # the response falls past max_seq_len
    assert tokenize_records(records_of([long_prompt, long_output]), TOK, "alpaca", max_seq_len=300) == samples
    assert "1 of 2 samples dropped" in caplog.text and "raise max_seq_len" in caplog.text


# --- packing and collate -----------------------------------------------------------------------

def sample(n, start):
    ids = list(range(start, start + n))
    return {"input_ids": ids, "labels": [IGNORE_INDEX] + ids[1:]}


def test_packing_keeps_documents_apart_with_segments_and_restarting_positions():
    # Best-fit decreasing: 5 tokens first, then 4 (does not fit beside it), then 3 (fills the first pack).
    packs = pack_samples([sample(3, 10), sample(4, 20), sample(5, 30)], max_seq_len=8, pad_id=0)
    assert len(packs) == 2
    first, second = packs
    assert first["input_ids"] == [10, 11, 12, 30, 31, 32, 33, 34]
    assert first["segment_ids"] == [1, 1, 1, 2, 2, 2, 2, 2]
    assert first["position_ids"] == [0, 1, 2, 0, 1, 2, 3, 4]
    # Each document's first label is ignored, so the shifted loss never crosses a boundary; pads too.
    assert first["labels"] == [IGNORE_INDEX, 11, 12, IGNORE_INDEX, 31, 32, 33, 34]
    assert second["input_ids"] == [20, 21, 22, 23, 0, 0, 0, 0]
    assert second["segment_ids"] == [1] * 4 + [0] * 4 and second["position_ids"] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert second["labels"] == [IGNORE_INDEX, 21, 22, 23] + [IGNORE_INDEX] * 4


def test_packing_fills_packs_better_than_file_order_and_loses_nothing():
    lengths = [5, 4, 3, 4, 2, 6]  # 24 tokens: in file order they need 4 packs of 8, best fit needs 3
    docs = [sample(n, 10 * (i + 1)) for i, n in enumerate(lengths)]
    packs = pack_samples(docs, max_seq_len=8, pad_id=0)
    assert len(packs) == 3 and all(0 not in p["segment_ids"] for p in packs)
    tokens = sorted(t for p in packs for t, s in zip(p["input_ids"], p["segment_ids"]) if s)
    assert tokens == sorted(t for d in docs for t in d["input_ids"])
    assert pack_samples(docs, 8, 0) == packs  # deterministic
    with pytest.raises(ValueError, match="longer than max_seq_len=4"):
        pack_samples(docs, max_seq_len=4, pad_id=0)


def test_packed_model_logits_equal_each_document_run_alone():
    """Document masking + restarted positions: a packed sequence computes what separate ones do."""
    from kubetune.trainer.models.llama import LlamaForCausalLM, ModelArgs

    torch.manual_seed(0)
    args = ModelArgs.from_hf_config({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
    })
    model = LlamaForCausalLM(args).eval()
    docs = [sample(5, 3), sample(7, 20), sample(2, 40)]
    (pack,) = pack_samples(docs, max_seq_len=16, pad_id=0)
    batch = collate([pack], pad_id=0)
    with torch.no_grad():
        packed = model(
            batch["input_ids"], attention_mask=batch["attention_mask"],  # the pack's tail padding is skipped
            position_ids=batch["position_ids"], segment_ids=batch["segment_ids"],
        )
        assert batch["attention_mask"].sum() < batch["attention_mask"].numel()  # the skipped path is the one tested
        start = 0
        for doc in docs:
            alone = model(torch.tensor([doc["input_ids"]]))
            n = len(doc["input_ids"])
            torch.testing.assert_close(packed[0, start:start + n], alone[0], atol=1e-5, rtol=1e-5)
            start += n


def test_collate_pads_right_and_masks_padding():
    batch = collate([sample(3, 10), sample(5, 20)], pad_id=0)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 0, 0], [20, 21, 22, 23, 24]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert batch["labels"][0].tolist() == [IGNORE_INDEX, 11, 12, IGNORE_INDEX, IGNORE_INDEX]
    packed = collate(pack_samples([sample(3, 10)], 4, 0), pad_id=0)
    assert set(packed) == {"input_ids", "labels", "position_ids", "segment_ids", "attention_mask"}
    assert packed["attention_mask"].tolist() == [[1, 1, 1, 0]]  # the pack's padding segment


# --- splits and loader -------------------------------------------------------------------------

def test_held_out_split_is_seeded_disjoint_and_complete():
    items = list(range(100))
    train, held = hold_out(items, 0.1, seed=3)
    assert len(held) == 10 and sorted(train + held) == items
    assert hold_out(items, 0.1, seed=3) == (train, held)
    assert hold_out(items, 0.1, seed=4)[1] != held


def test_build_datasets_uses_eval_split_or_fraction_and_packs(tmp_path):
    records = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(20)]
    write_jsonl(tmp_path / "train.jsonl", records)
    write_jsonl(tmp_path / "dev.jsonl", records[:3])
    cfg = DatasetSection(source=str(tmp_path), eval_split="dev")
    splits = build_datasets(cfg, TOK, max_seq_len=512, seed=0)
    assert (len(splits.train), len(splits.eval)) == (20, 3)
    cfg = DatasetSection(source=str(tmp_path / "train.jsonl"), eval_fraction=0.25)
    splits = build_datasets(cfg, TOK, max_seq_len=512, seed=0)
    assert (len(splits.train), len(splits.eval)) == (15, 5)
    cfg = DatasetSection(source=str(tmp_path / "train.jsonl"), eval_fraction=0.0, packed=True)
    packed = build_datasets(cfg, TOK, max_seq_len=512, seed=0)
    assert packed.eval is None and len(packed.train) < 20
    assert all(len(p["input_ids"]) == 512 for p in packed.train)
    with pytest.raises(DatasetError, match="eval_split 'dev'.*not a folder"):
        build_datasets(DatasetSection(source=str(tmp_path / "train.jsonl"), eval_split="dev"), TOK, 512, 0)
    with pytest.raises(DatasetError, match="raise max_seq_len"):
        build_datasets(DatasetSection(source=str(tmp_path / "train.jsonl")), TOK, max_seq_len=8, seed=0)


def test_loader_visits_every_sample_once_per_epoch_in_a_seeded_order():
    samples = [sample(2, 10 * i) for i in range(10)]
    loader = BatchLoader(samples, batch_size=4, pad_id=0, shuffle=True, seed=1)
    assert loader.batches_per_epoch == 3
    seen = [row[0] for _ in range(3) for row in loader.next_batch()["input_ids"].tolist()]
    assert sorted(seen) == [10 * i for i in range(10)]
    second_epoch = [row[0] for _ in range(3) for row in loader.next_batch()["input_ids"].tolist()]
    assert sorted(second_epoch) == sorted(seen) and second_epoch != seen and loader.epoch == 2


def test_loader_resumes_at_its_saved_position():
    samples = [sample(2, 10 * i) for i in range(10)]
    reference = BatchLoader(samples, batch_size=3, pad_id=0, seed=5)
    expected = [reference.next_batch()["input_ids"] for _ in range(9)]
    first = BatchLoader(samples, batch_size=3, pad_id=0, seed=5)
    for _ in range(5):
        first.next_batch()
    resumed = BatchLoader(samples, batch_size=3, pad_id=0, seed=5)
    resumed.load_state_dict(first.state_dict())
    for want in expected[5:]:
        assert torch.equal(resumed.next_batch()["input_ids"], want)
    with pytest.raises(DatasetError, match="cannot resume.*same dataset and batch_size"):
        BatchLoader(samples, batch_size=2, pad_id=0).load_state_dict(first.state_dict())


def test_loader_ranks_take_disjoint_slices_of_each_global_batch():
    samples = [sample(2, 10 * i) for i in range(8)]
    ranks = [BatchLoader(samples, batch_size=2, pad_id=0, seed=0, rank=r, world_size=2) for r in range(2)]
    seen = [row[0] for _ in range(2) for loader in ranks for row in loader.next_batch()["input_ids"].tolist()]
    assert sorted(seen) == [10 * i for i in range(8)]


def test_loader_position_saved_by_two_ranks_resumes_on_one_and_back():
    """Resume at another world size with the same global batch (2 ranks x 2 = 1 x 4): the position
    counts global batches, so the resumed loader takes exactly the batches an uninterrupted loader at
    the new world size takes from there. The two world sizes agree on every global batch of the
    first epoch; with samples that do not divide the global batch (10 by 4) their epochs differ in
    length (1 rank keeps the short last batch, several drop it), so past that point they do not."""
    samples = [sample(2, 10 * i) for i in range(10)]

    def loaders(world_size: int) -> list[BatchLoader]:
        return [BatchLoader(samples, batch_size=4 // world_size, pad_id=0, seed=3, rank=r, world_size=world_size)
                for r in range(world_size)]

    def global_batch(group: list[BatchLoader]) -> list[int]:
        return [row[0] for loader in group for row in loader.next_batch()["input_ids"].tolist()]

    def uninterrupted(world_size: int, steps: int) -> list[list[int]]:
        group = loaders(world_size)
        return [global_batch(group) for _ in range(steps)]

    one, two = uninterrupted(1, 6), uninterrupted(2, 6)
    assert one[:2] == two[:2]  # the first epoch of 2 ranks (2 global batches) is 1 rank's first 8 samples
    assert len(one[2]) == 2 and len(two[2]) == 4  # then 1 rank takes the short batch of 2, 2 ranks a new epoch
    for old, new, reference in ((2, 1, one), (1, 2, two)):
        for position in range(5):
            saved = loaders(old)
            for _ in range(position):
                global_batch(saved)
            resumed = loaders(new)
            for loader in resumed:
                loader.load_state_dict(saved[0].state_dict())
            assert [global_batch(resumed) for _ in range(6 - position)] == reference[position:]


def test_loader_says_when_a_resume_changes_the_world_size_and_what_differs(caplog):
    samples = [sample(2, 10 * i) for i in range(10)]
    saved = BatchLoader(samples, batch_size=2, pad_id=0, rank=0, world_size=2)
    saved.next_batch()
    with caplog.at_level("INFO", logger="kubetune.data"):
        BatchLoader(samples, batch_size=4, pad_id=0).load_state_dict(saved.state_dict())
        BatchLoader(samples, batch_size=2, pad_id=0, rank=1, world_size=2).load_state_dict(saved.state_dict())
    [message] = caplog.messages  # rank 0 only, and only when the world size changed
    assert "taken with 2 process(es) x batch_size 2, this run has 1 x 4: the same global batch of 4" in message
    assert "an epoch is 3 batches now, 2 before (10 samples do not divide the global batch" in message
    caplog.clear()
    even = [sample(2, 10 * i) for i in range(8)]
    with caplog.at_level("INFO", logger="kubetune.data"):
        BatchLoader(even, batch_size=4, pad_id=0).load_state_dict(
            BatchLoader(even, batch_size=2, pad_id=0, world_size=2).state_dict())
    [message] = caplog.messages
    assert "the same global batch of 4" in message and "epoch" not in message
