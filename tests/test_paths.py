"""User paths: local ones expanded and absolute as before, URLs kept as given."""

import os

import pytest

from gta_jax import paths
from gta_jax.training import writers


def test_local_paths_are_expanded_and_absolute(monkeypatch, tmp_path):
  monkeypatch.setenv("HOME", str(tmp_path))
  monkeypatch.chdir(tmp_path)
  assert os.fspath(paths.path("~/runs/x")) == str(tmp_path / "runs" / "x")
  assert os.fspath(paths.path("runs/x/")) == str(tmp_path / "runs" / "x")
  assert paths.is_local("runs/x") and paths.name("runs/x/") == "x"


@pytest.mark.parametrize("url", ["gs://bucket/runs/x", "s3://bucket/x"])
def test_urls_are_kept(url):
  assert not paths.is_local(url)
  assert os.fspath(paths.path(url)) == url
  assert paths.name(url + "/") == "x"


def test_local_file_of_a_local_path_is_itself(tmp_path):
  f = tmp_path / "v.mp4"
  f.write_bytes(b"x")
  with paths.local_file(f) as local:
    assert local == str(f)


def test_jsonlines_appends_locally_and_keeps_earlier_rows(tmp_path):
  for value in (1, 2):
    log = writers.JsonLines(tmp_path / "run" / "metrics.jsonl")
    log.append({"step": value})
    log.close()
  assert (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() == [
      '{"step": 1}', '{"step": 2}']
