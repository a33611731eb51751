"""Evaluation metrics, gathering over a loader, and the report files."""

import csv
import json
import os

import numpy as np
import pytest

from gta_jax.evaluation import evaluator
from gta_jax.evaluation import metrics
from gta_jax.evaluation import reports
from gta_jax.training import sharding


def test_top_k_and_class_metrics_on_a_worked_example():
  probs = np.array([[0.6, 0.3, 0.1],   # true 0, predicted 0
                    [0.5, 0.4, 0.1],   # true 1, predicted 0, 2nd guess 1
                    [0.2, 0.3, 0.5],   # true 2, predicted 2
                    [0.1, 0.2, 0.7]])  # true 1, predicted 2, 2nd guess 1
  labels = np.array([0, 1, 2, 1])
  assert metrics.top_k_accuracy(probs, labels, 1) == 0.5
  assert metrics.top_k_accuracy(probs, labels, 2) == 1.0
  matrix = metrics.confusion_matrix(labels, probs.argmax(1), 3)
  np.testing.assert_array_equal(matrix, [[1, 0, 0], [1, 0, 1], [0, 0, 1]])
  # Recalls: class 0 1/1, class 1 0/2, class 2 1/1.
  assert metrics.mean_class_accuracy(matrix) == pytest.approx(2 / 3)
  summary = metrics.summarize(probs, labels)
  assert summary["num_videos"] == 4
  assert summary["loss"] == pytest.approx(-np.mean(np.log([0.6, 0.4, 0.5, 0.2])))


def fake_eval_step(variables, batch):
  """Probabilities that encode the video index, so the test can trace each row."""
  index = np.asarray(batch["video_index"])
  probs = np.stack([np.eye(5)[i % 5] * 0.9 + 0.02 for i in index])
  return {"probs": probs, "label": batch["label"], "mask": batch["mask"],
          "video_index": batch["video_index"]}


def loader(num_videos, batch_size, order):
  """Batches of `order`'s videos, the last padded with masked repeats."""
  padded = list(order) + [order[0]] * (-len(order) % batch_size)
  for start in range(0, len(padded), batch_size):
    index = np.array(padded[start:start + batch_size])
    yield {"video": np.zeros((batch_size, 1, 1, 8, 8, 3), np.uint8),
           "label": (index % 5).astype(np.int32),
           "mask": np.arange(start, start + batch_size) < num_videos,
           "video_index": index.astype(np.int64)}


def test_predict_keeps_each_video_once_in_index_order():
  order = [4, 0, 6, 2, 1, 5, 3]
  out = evaluator.predict(fake_eval_step, None, loader(7, 4, order), sharding.make_mesh())
  np.testing.assert_array_equal(out["video_index"], np.arange(7))
  np.testing.assert_array_equal(out["probs"].argmax(1), np.arange(7) % 5)
  np.testing.assert_array_equal(out["label"], np.arange(7) % 5)


def test_predict_refuses_a_video_seen_twice():
  with pytest.raises(RuntimeError, match="more than once"):
    evaluator.predict(fake_eval_step, None, loader(5, 5, [0, 1, 2, 2, 3]),
                      sharding.make_mesh())


def test_reports_write_json_predictions_and_confusion(tmp_path):
  probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1]])
  labels = np.array([0, 1, 2])
  summary = dict(metrics.summarize(probs, labels), step=7, split="val")
  path = reports.write_reports(str(tmp_path), "val", 7, summary,
                               {"probs": probs, "label": labels,
                                "video_index": np.array([10, 11, 12])},
                               ["a", "b", "c"])
  assert os.path.basename(path) == "val_step7.json"
  saved = json.load(open(path))
  for key in ("top1", "top5", "mean_class_accuracy", "loss", "num_videos", "step"):
    assert key in saved
  assert saved["top1"] == pytest.approx(2 / 3)
  rows = list(csv.reader(open(tmp_path / "val_step7_predictions.csv")))
  assert rows[0][:3] == ["video_index", "label", "prediction"]
  assert [r[:3] for r in rows[1:]] == [["10", "a", "a"], ["11", "b", "b"], ["12", "c", "a"]]
  confusion = list(csv.reader(open(tmp_path / "val_step7_confusion.csv")))
  assert confusion[3] == ["c", "1", "0", "0"]
  assert (tmp_path / "val_step7_confusion.png").stat().st_size > 1000
