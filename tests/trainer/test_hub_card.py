"""Dataset folders whose splits exist only in the dataset card (README.md's `configs`): read as the
Hub defines them, compared record for record with the `datasets` library (the reference: its
packaged json/parquet builders read the same card), and the errors that name the configs and
splits there are."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune.trainer.data.sources import DatasetError, has_split, load_records

datasets = pytest.importorskip("datasets")


def write(folder: Path, files: dict[str, object]) -> Path:
    for rel, content in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, list):
            if rel.endswith(".parquet"):
                import pyarrow as pa
                import pyarrow.parquet as pq

                pq.write_table(pa.Table.from_pylist(content), path)
            else:
                path.write_text("".join(json.dumps(r) + "\n" for r in content))
        else:
            path.write_text(str(content))
    return folder


def rows(tag: str, n: int) -> list[dict]:
    return [{"text": f"{tag}-{i}", "n": i} for i in range(n)]


def card(yaml_block: str) -> str:
    return f"---\nlicense: mit\n{yaml_block}---\n\n# A dataset\n\n---\n\nA Markdown rule above, not front matter.\n"


LAYOUTS = {
    # lists of paths and globs per split; `**` crosses folders; hidden files and the card are not data
    "lists_and_globs": ({
        "README.md": card("configs:\n- config_name: default\n  data_files:\n  - split: train\n    path:\n    - data/b.jsonl\n"
                          "    - data/part-*.jsonl\n  - split: test\n    path: holdout/**/*.jsonl\n"),
        "data/b.jsonl": rows("b", 2), "data/part-0.jsonl": rows("p0", 3), "data/part-1.jsonl": rows("p1", 1),
        "data/.hidden-part.jsonl": rows("hidden", 1), "holdout/x/deep.jsonl": rows("deep", 2), "holdout/top.jsonl": rows("top", 1),
        "holdout/.git/junk.jsonl": rows("junk", 1), "train.jsonl": rows("not-declared", 1),
    }, [(None, "train"), (None, "test")]),
    # several configs: `default: true` picks one; data_files as a plain pattern is the train split;
    # data_dir: patterns inside it (Parquet: the library reads one format per dataset)
    "several_configs": ({
        "README.md": card("configs:\n- config_name: en\n  data_files: en/*.parquet\n- config_name: fr\n  default: true\n"
                          "  data_dir: langs/fr\n  data_files:\n  - split: train\n    path: t*.parquet\n"
                          "  - split: validation\n    path: [v1.parquet, v2.parquet]\n"),
        "en/a.parquet": rows("en", 2), "langs/fr/t0.parquet": rows("fr", 3), "langs/fr/v1.parquet": rows("v1", 1),
        "langs/fr/v2.parquet": rows("v2", 2),
    }, [(None, "train"), (None, "validation"), ("en", "train"), ("fr", "train")]),
    # one config, not named default: it is the default; data_files a list of patterns; a config
    # with data_dir alone reads its folder's usual layout
    "one_config_and_data_dir": ({
        "README.md": card("configs:\n- config_name: main\n  data_files: [shards/*.jsonl, extra.jsonl]\n"),
        "shards/s1.jsonl": rows("s1", 2), "shards/s0.jsonl": rows("s0", 1), "extra.jsonl": rows("extra", 1),
    }, [(None, "train"), ("main", "train")]),
    # the Hub documentation's own example: CSV files at the root, one per split
    "docs_example_csv": ({
        "README.md": card("configs:\n- config_name: default\n  data_files:\n  - split: train\n    path: \"data.csv\"\n"
                          "  - split: test\n    path: \"holdout.csv\"\n"),
        "data.csv": 'text,n,score\nhello,1,0.5\n"a, quoted\nline",2,\nNA,3,1.5\n', "holdout.csv": "text,n,score\nheld,9,2.0\n",
    }, [(None, "train"), (None, "test")]),
    # the Hub documentation's builder-parameter example: a CSV separator per config
    "csv_sep": ({
        "README.md": card("configs:\n- config_name: tab\n  data_files: tab.csv\n  sep: \"\\t\"\n- config_name: semicolon\n"
                          "  data_files: semi.csv\n  delimiter: \";\"\n  default: true\n"),
        "tab.csv": "text\tn\nx, with comma\t1\n", "semi.csv": "text;n\ny, with comma;2\nz;3\n",
    }, [(None, "train"), ("tab", "train")]),
    "data_dir_alone": ({
        "README.md": card("configs:\n- config_name: default\n  data_dir: v2\n"),
        "v2/train.jsonl": rows("v2-train", 2), "v2/test.jsonl": rows("v2-test", 1), "train.jsonl": rows("v1", 5),
    }, [(None, "train"), (None, "test")]),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_card_configs_read_as_the_datasets_library_reads_them(layout, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    files, reads = LAYOUTS[layout]
    folder = write(tmp_path / "repo", files)
    for config, split in reads:
        ours = [r.data for r in load_records(str(folder / config) if config else str(folder), split)]
        reference = datasets.load_dataset(str(folder), config, split=split, cache_dir=str(tmp_path / "hf-cache")).to_list()
        assert ours == reference, (config, split)
        assert ours and has_split(str(folder / config) if config else str(folder), split)


def test_the_card_decides_even_where_file_names_look_like_splits(tmp_path):
    folder = write(tmp_path / "repo", {
        "README.md": card("configs:\n- config_name: default\n  data_files:\n  - split: train\n    path: all.jsonl\n"),
        "all.jsonl": rows("all", 2), "train.jsonl": rows("file-name", 1), "test.jsonl": rows("file-name", 1),
    })
    assert [r.data["text"] for r in load_records(str(folder), "train")] == ["all-0", "all-1"]
    assert not has_split(str(folder), "test")


def test_a_readme_without_configs_leaves_the_usual_layout(tmp_path):
    folder = write(tmp_path / "repo", {"README.md": "---\nlicense: mit\n---\n", "train.jsonl": rows("t", 2)})
    assert len(load_records(str(folder), "train")) == 2
    markdown = write(tmp_path / "notes", {"README.md": "---\n# Not YAML: {{ a: [\n---\n", "train.jsonl": rows("t", 1)})
    assert len(load_records(str(markdown), "train")) == 1  # a Markdown rule, not a card


def test_missing_splits_and_configs_are_named_with_the_ones_there_are(tmp_path):
    folder = write(tmp_path / "repo", LAYOUTS["several_configs"][0])
    with pytest.raises(DatasetError, match=r"config 'fr' of its dataset card: no split 'test'; its splits: train, validation; set dataset\.split"):
        load_records(str(folder), "test")
    with pytest.raises(DatasetError, match=r"declares no config 'de' \(its configs: en, fr\) and there is no such folder"):
        load_records(str(folder / "de"), "train")
    with pytest.raises(DatasetError, match=r"config 'en' of its dataset card: no split 'validation'; its splits: train"):
        has_split(str(folder / "en"), "train") and load_records(str(folder / "en"), "validation")


@pytest.mark.parametrize("yaml_block, message", [
    ("configs:\n- config_name: a\n  data_files: a.jsonl\n- config_name: b\n  data_files: b.jsonl\n",
     r"declares the configs a, b and none is the default; name one after the folder: .*/repo/CONFIG"),
    ("configs:\n- config_name: default\n  data_files: a.jsonl\n- config_name: b\n  default: true\n  data_files: b.jsonl\n",
     r"several default configs \(default, b\); keep `default: true` on one"),
    ("configs:\n- data_files: a.jsonl\n", r"each entry of configs needs a config_name"),
    ("configs:\n- config_name: default\n  data_files:\n  - split: train\n    path: a.jsonl\n  - split: train\n    path: b.jsonl\n",
     r"split 'train' appears twice"),
    ("configs:\n- config_name: default\n  data_files:\n  - split: train\n    files: a.jsonl\n", r"data_files must be .*got the entry"),
    ("configs:\n- config_name: default\n  data_files: https://example.com/a.jsonl\n", r"only paths inside the repository"),
    ("configs:\n- config_name: default\n  data_files: ../outside.jsonl\n", r"only paths inside the repository"),
    ("configs:\n- config_name: default\n  data_files: nothing-*.jsonl\n", r"split 'train': 'nothing-\*\.jsonl' matches no file in"),
    ("configs:\n- config_name: default\n  data_files: '*.xml'\n", r"split 'train' is a\.xml: no file kubetune reads; convert"),
    ("configs:\n- config_name: default\n  data_files: a.jsonl\n  field: data\n",
     r"config 'default' sets field, a loading option kubetune does not apply"),
    ("configs:\n- config_name: default\n  data_files: a.jsonl\n  sep: ';;'\n", r"sep/delimiter must be one character"),
])
def test_bad_cards_are_errors_naming_the_fix(yaml_block, message, tmp_path):
    folder = write(tmp_path / "repo", {"README.md": card(yaml_block), "a.jsonl": rows("a", 1), "b.jsonl": rows("b", 1), "a.xml": "<a/>\n"})
    with pytest.raises(DatasetError, match=message):
        load_records(str(folder), "train")


def test_what_the_initializer_downloads_covers_every_file_the_reader_then_reads(tmp_path):
    """download_patterns are huggingface_hub's fnmatch patterns (`*` crosses `/`, `**/` needs a
    folder): the files they let through must include every file the card's globs match here."""
    from huggingface_hub.utils import filter_repo_objects

    from kubetune.trainer.data.hub_card import card_configs, download_patterns, match_files

    files = ["README.md", "data/a.jsonl", "data/x/b.jsonl", "data/x/y/c.jsonl", "top.jsonl", "lang/fr/d.jsonl",
             "lang/fr/sub/e.jsonl", "other/f.jsonl", "lang/de/g.jsonl"]
    write(tmp_path, {rel: rows(rel, 1) if rel.endswith(".jsonl") else "---\n---\n" for rel in files})
    text = ("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: [data/**/*.jsonl, '*.jsonl']\n"
            "  - split: test\n    path: data/x/**\n- config_name: fr\n  data_dir: lang/fr\n  data_files: '**/*.jsonl'\n"
            "- config_name: dir\n  data_dir: lang\n---\n")
    for config in card_configs(text, "README.md").values():
        allowed = set(filter_repo_objects(files, allow_patterns=download_patterns(config)))
        base = tmp_path / config.data_dir if config.data_dir else tmp_path
        wanted = {p.relative_to(tmp_path).as_posix() for patterns in (config.data_files or {"all": ["**"]}).values()
                  for pattern in patterns for p in match_files(base, pattern)}
        assert wanted and wanted <= allowed, (config.name, wanted - allowed)
        assert "README.md" in allowed  # the card: the reader needs it to find the config again
        if config.data_dir:  # a superset, but within the config's folder (fnmatch's `*` crosses `/`: a root `*.jsonl` cannot be)
            assert all(rel == "README.md" or rel.startswith(config.data_dir + "/") for rel in allowed), allowed
