"""Tokenizer, vocabulary, word vectors (word2vec binary, GloVe, fastText) and caption vectors."""

import gzip
import struct

import numpy as np
import pytest

from gta_jax.retrieval import text


def test_tokenize_lowercases_and_keeps_apostrophes():
  assert text.tokenize("A man's cutting ONIONS, then-slicing 2 tomatoes!") == [
      "a", "man's", "cutting", "onions", "then", "slicing", "2", "tomatoes"]
  assert text.tokenize("Crème brûlée_x") == ["crème", "brûlée_x"]
  assert text.tokenize("  ...  ") == []


CAPTIONS = ["the cat sat", "the dog sat", "a cat ran", "the end", "zebra yak"]


def test_vocabulary_orders_by_count_then_alphabet():
  vocab = text.Vocabulary.build(CAPTIONS, max_size=100)
  # the: 3; cat, sat: 2; then the ones seen once, alphabetical.
  assert vocab.words == ["<pad>", "<unk>", "the", "cat", "sat", "a", "dog", "end", "ran",
                         "yak", "zebra"]
  assert len(vocab) == 11


def test_vocabulary_max_size_counts_the_special_tokens():
  vocab = text.Vocabulary.build(CAPTIONS, max_size=5)
  assert vocab.words == ["<pad>", "<unk>", "the", "cat", "sat"]
  assert text.Vocabulary.build(CAPTIONS, max_size=2).words == ["<pad>", "<unk>"]
  with pytest.raises(ValueError, match="max_size"):
    text.Vocabulary.build(CAPTIONS, max_size=1)


def test_encode_pads_truncates_and_maps_unknown_words():
  vocab = text.Vocabulary.build(CAPTIONS, max_size=5)  # the=2, cat=3, sat=4
  ids, mask = vocab.encode("The cat ate", max_words=5)
  assert ids.dtype == np.int32 and mask.dtype == bool
  np.testing.assert_array_equal(ids, [2, 3, 1, 0, 0])
  np.testing.assert_array_equal(mask, [True, True, True, False, False])
  ids, mask = vocab.encode("the cat ate", max_words=5, drop_unknown=True)
  np.testing.assert_array_equal(ids, [2, 3, 0, 0, 0])
  np.testing.assert_array_equal(mask, [True, True, False, False, False])
  ids, mask = vocab.encode("sat sat the cat sat", max_words=3)
  np.testing.assert_array_equal(ids, [4, 4, 2])
  assert mask.all()


@pytest.mark.parametrize("caption,drop", [("", False), ("!?", False), ("dog ran", True)])
def test_a_caption_without_words_keeps_one_unknown_token(caption, drop):
  vocab = text.Vocabulary.build(CAPTIONS, max_size=5)
  ids, mask = vocab.encode(caption, max_words=4, drop_unknown=drop)
  np.testing.assert_array_equal(ids, [text.UNK_ID, 0, 0, 0])
  np.testing.assert_array_equal(mask, [True, False, False, False])


def test_encode_batch_stacks():
  vocab = text.Vocabulary.build(CAPTIONS, max_size=100)
  ids, mask = vocab.encode_batch(["the cat", "", "zebra yak the end sat"], max_words=4)
  assert ids.shape == mask.shape == (3, 4)
  np.testing.assert_array_equal(mask.sum(axis=1), [2, 1, 4])
  np.testing.assert_array_equal(ids[0], vocab.encode("the cat", 4)[0])
  ids, mask = vocab.encode_batch([], max_words=4)
  assert ids.shape == mask.shape == (0, 4)


def test_vocabulary_round_trips_through_json_and_files(tmp_path):
  vocab = text.Vocabulary.build(CAPTIONS + ["Crème brûlée"], max_size=100)
  assert text.Vocabulary.from_json(vocab.to_json()).words == vocab.words
  vocab.save(tmp_path / "vocab.json")
  loaded = text.Vocabulary.load(str(tmp_path / "vocab.json"))
  assert loaded.words == vocab.words
  np.testing.assert_array_equal(loaded.encode("crème the", 3)[0], vocab.encode("crème the", 3)[0])


@pytest.mark.parametrize("words,message", [
    (["<unk>", "<pad>", "a"], "starts with"),
    (["<pad>", "<unk>", "a", "a"], "repeat"),
])
def test_bad_vocabularies_are_refused(words, message):
  with pytest.raises(ValueError, match=message):
    text.Vocabulary(words)


# -- word vectors ----------------------------------------------------------------------

ENTRIES = [  # as a file would list them: frequent words first, cased
    ("the", [1.0, 2.0, 3.0]),
    ("Paris", [4.0, 5.0, 6.0]),
    ("paris", [7.0, 8.0, 9.0]),
    ("Berlin", [0.5, -1.5, 2.25]),
    ("BERLIN", [9.0, 9.0, 9.0]),
    ("crème", [-1.0, 0.0, 1.0]),
    ("rome", [3.0, 3.0, 3.0]),
]


def write_word2vec(path, entries, newline=True, dim=3):
  with open(path, "wb") as f:
    f.write(f"{len(entries)} {dim}\n".encode())
    for word, vector in entries:
      f.write(word.encode() + b" " + struct.pack(f"<{dim}f", *vector))
      if newline:
        f.write(b"\n")


def write_text(path, entries, header=False):
  with open(path, "w", encoding="utf-8") as f:
    if header:
      f.write(f"{len(entries)} {len(entries[0][1])}\n")
    for word, vector in entries:
      # fastText's .vec ends each line with a space.
      f.write(word + " " + " ".join(str(v) for v in vector) + (" \n" if header else "\n"))


WORDS = ["<pad>", "<unk>", "the", "paris", "berlin", "crème", "Rome", "unseen"]


def check_vectors(vectors, found):
  assert vectors.dtype == np.float32 and vectors.shape == (len(WORDS), 3)
  np.testing.assert_array_equal(found, [False, False, True, True, True, True, True, False])
  np.testing.assert_array_equal(vectors[2], [1, 2, 3])
  np.testing.assert_array_equal(vectors[3], [7, 8, 9])  # the exact 'paris', not 'Paris'
  np.testing.assert_array_equal(vectors[4], [0.5, -1.5, 2.25])  # 'Berlin', listed first
  np.testing.assert_array_equal(vectors[5], [-1, 0, 1])
  np.testing.assert_array_equal(vectors[6], [3, 3, 3])  # 'Rome' from the file's 'rome'
  assert not vectors[[0, 1, 7]].any()


@pytest.mark.parametrize("newline", [True, False])
def test_word2vec_binary(tmp_path, newline):
  path = tmp_path / "vectors.bin"
  write_word2vec(path, ENTRIES, newline=newline)
  check_vectors(*text.load_word_vectors(str(path), WORDS, dim=3))


def test_word2vec_binary_larger_than_a_read_chunk(tmp_path, monkeypatch):
  monkeypatch.setattr(text, "_CHUNK", 7)  # entries straddle every read
  path = tmp_path / "vectors.bin"
  write_word2vec(path, ENTRIES)
  check_vectors(*text.load_word_vectors(str(path), WORDS, dim=3))


def test_gzipped_word2vec_binary(tmp_path):
  write_word2vec(tmp_path / "vectors.bin", ENTRIES)
  with gzip.open(tmp_path / "vectors.bin.gz", "wb") as f:
    f.write((tmp_path / "vectors.bin").read_bytes())
  check_vectors(*text.load_word_vectors(str(tmp_path / "vectors.bin.gz"), WORDS, dim=3))


@pytest.mark.parametrize("header", [False, True], ids=["glove", "fasttext"])
def test_text_vectors(tmp_path, header):
  path = tmp_path / ("vectors.vec" if header else "vectors.txt")
  write_text(path, ENTRIES, header=header)
  check_vectors(*text.load_word_vectors(str(path), WORDS, dim=3))


def test_text_format_overrides_the_name_and_words_may_hold_spaces(tmp_path):
  path = tmp_path / "vectors.bin"  # named .bin, but text
  write_text(path, ENTRIES[:1] + [("at name@mail.com", [9.0, 9.0, 9.0]),
                                  ("at", [4.0, 5.0, 6.0])] + ENTRIES[1:])
  check_vectors(*text.load_word_vectors(str(path), WORDS, dim=3, fmt="text"))
  vectors, found = text.load_word_vectors(str(path), ["at"], dim=3, fmt="text")
  assert found.all()
  np.testing.assert_array_equal(vectors[0], [4, 5, 6])


def test_a_dimension_mismatch_names_the_file(tmp_path):
  write_word2vec(tmp_path / "w.bin", ENTRIES)
  with pytest.raises(ValueError, match=r"w\.bin holds vectors of dimension 3, not dim=300"):
    text.load_word_vectors(str(tmp_path / "w.bin"), WORDS, dim=300)
  write_text(tmp_path / "w.vec", ENTRIES, header=True)
  with pytest.raises(ValueError, match=r"w\.vec .*dimension 3, not dim=4"):
    text.load_word_vectors(str(tmp_path / "w.vec"), WORDS, dim=4)


def test_no_known_word_names_the_file(tmp_path):
  write_text(tmp_path / "w.txt", ENTRIES)
  with pytest.raises(ValueError, match=r"w\.txt has a vector for none of the 2 words"):
    text.load_word_vectors(str(tmp_path / "w.txt"), ["london", "oslo"], dim=3)


@pytest.mark.parametrize("content,fmt,message", [
    (b"3 2\nab", "word2vec", "ends inside entry 0"),
    (b"hello world\n", "word2vec", "not a word2vec binary file"),
    (b"a 1 2 3\nb 1 2\n", "text", "line 2 has fewer than 3 values"),
    (b"", "text", "no vectors"),
    (b"the 1 x 3\n", "text", "bad values for 'the'"),
])
def test_malformed_files(tmp_path, content, fmt, message):
  (tmp_path / "w").write_bytes(content)
  with pytest.raises(ValueError, match=message):
    text.load_word_vectors(str(tmp_path / "w"), ["the"], dim=2 if fmt == "word2vec" else 3,
                           fmt=fmt)


def test_unknown_format():
  with pytest.raises(ValueError, match="fmt"):
    text.load_word_vectors("w.bin", ["the"], dim=3, fmt="glove")


# -- precomputed caption vectors -------------------------------------------------------


def test_load_text_vectors(tmp_path):
  path = tmp_path / "captions.npz"
  np.savez(path, captions=["a cat", "a dog", "a cat"],
           vectors=np.array([[1, 2], [3, 4], [1, 2]], np.float64))
  got = text.load_text_vectors(str(path))
  assert sorted(got) == ["a cat", "a dog"]
  assert got["a dog"].dtype == np.float32
  np.testing.assert_array_equal(got["a dog"], [3, 4])


@pytest.mark.parametrize("arrays,message", [
    (dict(captions=["a"]), "no 'vectors' array"),
    (dict(vectors=np.zeros((1, 2))), "no 'captions' array"),
    (dict(captions=["a", "b"], vectors=np.zeros((3, 2))), "2 captions but 3 vectors"),
    (dict(captions=[1, 2], vectors=np.zeros((2, 2))), "string array"),
    (dict(captions=["a", "b"], vectors=np.zeros(2)), r"\(N, D\)"),
    (dict(captions=["a", "a"], vectors=np.eye(2)), "two different vectors"),
])
def test_bad_text_vectors_name_the_file(tmp_path, arrays, message):
  path = tmp_path / "bad.npz"
  np.savez(path, **arrays)
  with pytest.raises(ValueError, match=message) as error:
    text.load_text_vectors(str(path))
  assert "bad.npz" in str(error.value)
