"""Captions as words: the tokenizer, the vocabulary, pretrained word and caption vectors.

The tokenizer is HowTo100M's (`[\\w']+`), on lowercased text. Word vectors come from a
file the user supplies (word2vec binary such as GoogleNews-vectors-negative300.bin, or
text such as GloVe or a fastText `.vec`), read as a stream and reduced to the rows of
the vocabulary. Precomputed caption vectors (from any sentence encoder) come from an
`.npz` of `captions` and `vectors`.
"""

import collections
import gzip
import io
import itertools
import json
import re
from typing import Any, BinaryIO, Callable, Dict, Iterable, Iterator, List, Sequence, Tuple

from absl import logging
import numpy as np

from gta_jax import paths

_TOKEN = re.compile(r"[\w']+")

PAD, UNK = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1


def tokenize(text: str) -> List[str]:
  """The words of `text`: lowercased, runs of word characters and apostrophes."""
  return _TOKEN.findall(text.lower())


class Vocabulary:
  """Words and their ids: 0 is `<pad>`, 1 `<unk>`, then the words by frequency.

  Words outside the vocabulary map to `<unk>` by default, so that a caption keeps its
  length and the model sees that something was there; HowTo100M drops them instead
  (`drop_unknown=True`).
  """

  def __init__(self, words: Sequence[str]):
    """`words[0]` must be `<pad>`, `words[1]` `<unk>`, and no word may repeat."""
    words = list(words)
    if words[:2] != [PAD, UNK]:
      raise ValueError(f"a vocabulary starts with {PAD!r}, {UNK!r}, got {words[:2]}")
    self._ids = {w: i for i, w in enumerate(words)}
    if len(self._ids) != len(words):
      repeated = [w for w, n in collections.Counter(words).items() if n > 1]
      raise ValueError(f"words repeat in the vocabulary: {repeated[:5]}")
    self._words = words

  @classmethod
  def build(cls, captions: Iterable[str], max_size: int) -> "Vocabulary":
    """The `max_size - 2` most frequent words of `captions` (ties alphabetical).

    Args:
      captions: the training captions.
      max_size: the most entries in all, `<pad>` and `<unk>` included (at least 2).
    """
    if not isinstance(max_size, int) or max_size < 2:
      raise ValueError(f"max_size must be an int >= 2 (<pad> and <unk>), got {max_size!r}")
    counts = collections.Counter(w for caption in captions for w in tokenize(caption))
    ranked = sorted(counts, key=lambda w: (-counts[w], w))
    return cls([PAD, UNK] + ranked[:max_size - 2])

  @property
  def words(self) -> List[str]:
    """The words in id order (a copy)."""
    return list(self._words)

  def __len__(self) -> int:
    return len(self._words)

  def encode(self, caption: str, max_words: int,
             drop_unknown: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """The ids of a caption's first `max_words` words, padded.

    Args:
      caption: the text.
      max_words: the length of the output; longer captions are truncated.
      drop_unknown: leave out words outside the vocabulary (HowTo100M) instead of
        mapping them to `<unk>`.

    Returns:
      `ids` int32 `(max_words,)` (`<pad>` after the words) and `mask` bool
      `(max_words,)`, True on the words. A caption with no words left gets a single
      `<unk>`, so that every caption has at least one valid position.
    """
    if not isinstance(max_words, int) or max_words < 1:
      raise ValueError(f"max_words must be a positive int, got {max_words!r}")
    ids = [self._ids.get(w, UNK_ID) for w in tokenize(caption)]
    if drop_unknown:
      ids = [i for i in ids if i != UNK_ID]
    ids = ids[:max_words] or [UNK_ID]
    out = np.full((max_words,), PAD_ID, np.int32)
    out[:len(ids)] = ids
    return out, np.arange(max_words) < len(ids)

  def encode_batch(self, captions: Sequence[str], max_words: int,
                   drop_unknown: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """:meth:`encode` of each caption, stacked: `(N, max_words)` ids and mask."""
    encoded = [self.encode(c, max_words, drop_unknown) for c in captions]
    if not encoded:
      return np.zeros((0, max_words), np.int32), np.zeros((0, max_words), bool)
    ids, mask = zip(*encoded)
    return np.stack(ids), np.stack(mask)

  def to_json(self) -> str:
    return json.dumps({"words": self._words}, ensure_ascii=False)

  @classmethod
  def from_json(cls, text: str) -> "Vocabulary":
    return cls(json.loads(text)["words"])

  def save(self, path: paths.PathLike) -> None:
    """Writes the vocabulary as JSON to `path` (local or a URL such as gs://)."""
    paths.path(path).write_text(self.to_json(), encoding="utf-8")

  @classmethod
  def load(cls, path: paths.PathLike) -> "Vocabulary":
    return cls.from_json(paths.path(path).read_text(encoding="utf-8"))


# -- word vectors ----------------------------------------------------------------------

_CHUNK = 1 << 20

# (file dimension, iterator of (word, raw entry), raw entry -> float32 vector)
_Entries = Tuple[int, Iterator[Tuple[str, Any]], Callable[[Any], np.ndarray]]


def _binary_entries(stream: BinaryIO, name: str) -> _Entries:
  """word2vec binary: a header `N D\\n`, then per word `word ` + D float32 (+ `\\n`)."""
  header = stream.readline().split()
  if len(header) != 2 or not all(x.isdigit() for x in header):
    raise ValueError(f"{name}: not a word2vec binary file (its first line should be "
                     f"'<count> <dimension>', got {b' '.join(header)[:80]!r})")
  count, dim = int(header[0]), int(header[1])

  def entries() -> Iterator[Tuple[str, bytes]]:
    buffer, pos = b"", 0
    for index in range(count):
      while (space := buffer.find(b" ", pos)) < 0 or len(buffer) - space - 1 < 4 * dim:
        chunk = stream.read(_CHUNK)
        if not chunk:
          raise ValueError(f"{name}: the file ends inside entry {index} of {count}")
        buffer, pos = buffer[pos:] + chunk, 0
      word = buffer[pos:space].lstrip(b"\n").decode("utf-8", errors="replace")
      pos = space + 1 + 4 * dim
      yield word, buffer[space + 1:pos]

  return dim, entries(), lambda raw: np.frombuffer(raw, "<f4")


def _text_entries(stream: BinaryIO, name: str) -> _Entries:
  """Text: `word v1 ... vD` per line (a word may hold spaces); a first line `N D`
  (fastText's header) is skipped."""
  lines = io.TextIOWrapper(stream, encoding="utf-8", errors="replace")
  first = lines.readline()
  fields = first.split()
  if not fields:
    raise ValueError(f"{name}: no vectors in the file")
  header = len(fields) == 2 and all(x.isdigit() for x in fields)
  dim = int(fields[1]) if header else len(fields) - 1

  def entries() -> Iterator[Tuple[str, str]]:
    source = lines if header else itertools.chain([first], lines)
    for number, line in enumerate(source, start=2 if header else 1):
      line = line.rstrip()
      if not line:
        continue
      spaces = line.count(" ")
      if spaces < dim:
        raise ValueError(f"{name}: line {number} has fewer than {dim} values")
      # Splitting only the lines of wanted words keeps a large file fast to scan.
      yield line.partition(" ")[0] if spaces == dim else line.rsplit(" ", dim)[0], line

  def decode(line: str) -> np.ndarray:
    try:
      return np.asarray(line.rsplit(" ", dim)[1:], np.float32)
    except ValueError as e:
      raise ValueError(f"{name}: bad values for {line.split(' ', 1)[0]!r}: {e}") from e

  return dim, entries(), decode


def load_word_vectors(path: paths.PathLike, words: Sequence[str], dim: int,
                      fmt: str = "auto") -> Tuple[np.ndarray, np.ndarray]:
  """The vectors of `words` from a pretrained file, read as a stream.

  Each word takes the entry spelled exactly like it; failing that, the first entry in
  the file whose lowercase form equals the word's (GoogleNews vectors are cased,
  captions lowercased, and the file lists frequent spellings first).

  Args:
    path: the file, local or a URL; a name ending in `.gz` is decompressed.
    words: the words wanted (e.g. `Vocabulary.words`).
    dim: the dimension the file must have.
    fmt: `word2vec` (binary: header `N D`, then `word ` + D little-endian float32 per
      word), `text` (`word v1 ... vD` per line: GloVe, or fastText `.vec` with its
      `N D` first line), or `auto`: `word2vec` if the name ends in `.bin` (or
      `.bin.gz`), else `text`.

  Returns:
    `vectors` float32 `(len(words), dim)`, zero where not found, and `found` bool
    `(len(words),)`.

  Raises:
    ValueError: an unknown `fmt`, a file of another dimension than `dim`, a malformed
      file, or a file with a vector for none of the words.
  """
  name = str(path)
  if fmt == "auto":
    fmt = "word2vec" if name.removesuffix(".gz").endswith(".bin") else "text"
  if fmt not in ("word2vec", "text"):
    raise ValueError(f"fmt must be 'auto', 'word2vec' or 'text', got {fmt!r}")
  exact, folded = collections.defaultdict(list), collections.defaultdict(list)
  for i, w in enumerate(words):
    exact[w].append(i)
    folded[w.lower()].append(i)
  vectors = np.zeros((len(words), dim), np.float32)
  by_case = np.zeros((len(words),), bool)  # found through the lowercase fallback
  found = np.zeros((len(words),), bool)
  with paths.path(path).open("rb") as f:
    stream = gzip.GzipFile(fileobj=f) if name.endswith(".gz") else f
    read = _binary_entries if fmt == "word2vec" else _text_entries
    file_dim, entries, decode = read(stream, name)
    if file_dim != dim:
      raise ValueError(f"{name} holds vectors of dimension {file_dim}, not dim={dim}")
    for word, raw in entries:
      exact_hits = [i for i in exact.get(word, ()) if not found[i] or by_case[i]]
      found[exact_hits], by_case[exact_hits] = True, False
      case_hits = [i for i in folded.get(word.lower(), ()) if not found[i]]
      found[case_hits], by_case[case_hits] = True, True
      if exact_hits or case_hits:
        vectors[exact_hits + case_hits] = decode(raw)
  if not found.any():
    raise ValueError(f"{name} has a vector for none of the {len(words)} words")
  logging.info("%s: vectors for %d of %d words (%d through their lowercase form)", name,
               found.sum(), len(words), by_case.sum())
  return vectors, found


def load_text_vectors(path: paths.PathLike) -> Dict[str, np.ndarray]:
  """Precomputed caption vectors: caption -> float32 `(D,)`.

  Args:
    path: an `.npz` (local or a URL) with `captions`, an `(N,)` string array (what
      `np.savez` makes of a list of str), and `vectors`, `(N, D)` floats.

  Raises:
    ValueError: a missing array, arrays of the wrong kind or of different lengths, or
      a caption given two different vectors.
  """
  with paths.path(path).open("rb") as f:
    arrays = np.load(io.BytesIO(f.read()), allow_pickle=False)
  for key in ("captions", "vectors"):
    if key not in arrays:
      raise ValueError(f"{path} has no {key!r} array (it holds {sorted(arrays.files)})")
  captions, vectors = arrays["captions"], arrays["vectors"]
  if captions.ndim != 1 or captions.dtype.kind != "U":
    raise ValueError(f"{path}: 'captions' must be a 1-D string array, got {captions.dtype} "
                     f"{captions.shape}")
  if vectors.ndim != 2 or vectors.dtype.kind not in "fiu":
    raise ValueError(f"{path}: 'vectors' must be (N, D) numbers, got {vectors.dtype} "
                     f"{vectors.shape}")
  if len(captions) != len(vectors):
    raise ValueError(f"{path}: {len(captions)} captions but {len(vectors)} vectors")
  out = {}
  for caption, vector in zip(captions.tolist(), vectors.astype(np.float32)):
    if caption in out and not np.array_equal(out[caption], vector):
      raise ValueError(f"{path}: caption {caption!r} has two different vectors")
    out[caption] = vector
  return out
