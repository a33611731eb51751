"""Evaluation outputs under `WORKDIR/eval/`.

For split S at step N:

* `S_stepN.json`: `top1`, `top5`, `mean_class_accuracy`, `loss`, `num_videos`,
  `step`, `split`, `num_views`;
* `S_stepN_predictions.csv`: one row per video (`video_index`, `label`,
  `prediction`, `confidence`, `top5`);
* `S_stepN_confusion.csv` and `.png`: the confusion matrix (rows: true class).
"""

import csv
import io
import json
from typing import Any, Dict, List, Sequence

import numpy as np
from etils import epath

from gta_jax import paths
from gta_jax.evaluation import metrics


def csv_text(rows: List[List[Any]]) -> str:
  """Rows (the header first) as CSV text."""
  buffer = io.StringIO(newline="")
  csv.writer(buffer).writerows(rows)
  return buffer.getvalue()


def write_reports(out_dir: paths.PathLike, split: str, step: int,
                  summary: Dict[str, Any], predictions: Dict[str, np.ndarray],
                  class_names: Sequence[str]) -> epath.Path:
  """Writes the files listed in the module docstring (local or in a bucket).

  Returns:
    The JSON's path.
  """
  out_dir = paths.path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  stem = f"{split}_step{step}"
  (out_dir / f"{stem}.json").write_text(json.dumps(summary, indent=2))

  probs, labels = predictions["probs"], predictions["label"]
  top5 = np.argsort(-probs, axis=1, kind="stable")[:, :5]
  rows = [["video_index", "label", "prediction", "confidence", "top5"]]
  rows += [[int(index), class_names[labels[i]], class_names[top5[i, 0]],
            f"{probs[i, top5[i, 0]]:.6f}", " ".join(class_names[c] for c in top5[i])]
           for i, index in enumerate(predictions["video_index"])]
  (out_dir / f"{stem}_predictions.csv").write_text(csv_text(rows))

  matrix = metrics.confusion_matrix(labels, top5[:, 0], probs.shape[1])
  rows = [["true \\ predicted"] + list(class_names)]
  rows += [[name] + row.tolist() for name, row in zip(class_names, matrix)]
  (out_dir / f"{stem}_confusion.csv").write_text(csv_text(rows))
  plot_confusion(matrix, class_names, out_dir / f"{stem}_confusion.png",
                 f"{split}, step {step}: top-1 {summary['top1']:.3f}")
  return out_dir / f"{stem}.json"


def plot_confusion(matrix: np.ndarray, class_names: Sequence[str],
                   path: paths.PathLike, title: str) -> None:
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
  paths.save_figure(fig, path, dpi=100)
  plt.close(fig)
