"""Evaluation outputs under `WORKDIR/eval/`.

For split S at step N:

* `S_stepN.json`: `top1`, `top5`, `mean_class_accuracy`, `loss`, `num_videos`,
  `step`, `split`, `num_views`;
* `S_stepN_predictions.csv`: one row per video (`video_index`, `label`,
  `prediction`, `confidence`, `top5`);
* `S_stepN_confusion.csv` and `.png`: the confusion matrix (rows: true class).
"""

import csv
import json
import os
from typing import Any, Dict, Sequence

import numpy as np

from gta_jax.evaluation import metrics


def write_reports(out_dir: str, split: str, step: int, summary: Dict[str, Any],
                  predictions: Dict[str, np.ndarray],
                  class_names: Sequence[str]) -> str:
  """Writes the files listed in the module docstring; returns the JSON's path."""
  os.makedirs(out_dir, exist_ok=True)
  stem = os.path.join(out_dir, f"{split}_step{step}")
  with open(stem + ".json", "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2)

  probs, labels = predictions["probs"], predictions["label"]
  top5 = np.argsort(-probs, axis=1, kind="stable")[:, :5]
  with open(stem + "_predictions.csv", "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(["video_index", "label", "prediction", "confidence", "top5"])
    for i, index in enumerate(predictions["video_index"]):
      writer.writerow([int(index), class_names[labels[i]], class_names[top5[i, 0]],
                       f"{probs[i, top5[i, 0]]:.6f}",
                       " ".join(class_names[c] for c in top5[i])])

  matrix = metrics.confusion_matrix(labels, top5[:, 0], probs.shape[1])
  with open(stem + "_confusion.csv", "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(["true \\ predicted"] + list(class_names))
    for name, row in zip(class_names, matrix):
      writer.writerow([name] + row.tolist())
  plot_confusion(matrix, class_names, stem + "_confusion.png",
                 f"{split}, step {step}: top-1 {summary['top1']:.3f}")
  return stem + ".json"


def plot_confusion(matrix: np.ndarray, class_names: Sequence[str], path: str,
                   title: str) -> None:
  """Row-normalised confusion matrix as a PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
  n = len(class_names)
  size = min(4 + 0.35 * n, 40)
  fig, ax = plt.subplots(figsize=(size, size))
  ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
  if n <= 60:
    ax.set_xticks(range(n), class_names, rotation=90, fontsize=7)
    ax.set_yticks(range(n), class_names, fontsize=7)
    if n <= 20:
      for i in range(n):
        for j in range(n):
          if matrix[i, j]:
            ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if rates[i, j] > 0.5 else "black")
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
