"""Classification metrics from per-video class probabilities (numpy)."""

from typing import Dict

import numpy as np


def top_k_accuracy(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
  """Fraction of videos whose label is among the k most probable classes."""
  k = min(k, probs.shape[1])
  top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
  return float(np.mean(np.any(top == labels[:, None], axis=1)))


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray,
                     num_classes: int) -> np.ndarray:
  """`(num_classes, num_classes)` counts: row = true class, column = prediction."""
  matrix = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(matrix, (labels, predictions), 1)
  return matrix


def mean_class_accuracy(matrix: np.ndarray) -> float:
  """Recall averaged over the classes that occur."""
  totals = matrix.sum(axis=1)
  present = totals > 0
  return float(np.mean(np.diag(matrix)[present] / totals[present]))


def summarize(probs: np.ndarray, labels: np.ndarray) -> Dict[str, float]:
  """top1, top5, mean_class_accuracy, loss (NLL of the averaged softmax), num_videos."""
  if not len(labels):
    raise ValueError("no videos to evaluate")
  predictions = np.argmax(probs, axis=1)
  matrix = confusion_matrix(labels, predictions, probs.shape[1])
  picked = probs[np.arange(len(labels)), labels]
  return {
      "top1": top_k_accuracy(probs, labels, 1),
      "top5": top_k_accuracy(probs, labels, 5),
      "mean_class_accuracy": mean_class_accuracy(matrix),
      "loss": float(-np.mean(np.log(np.maximum(picked, 1e-12)))),
      "num_videos": int(len(labels)),
  }
