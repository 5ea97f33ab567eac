"""Figures of a reader study that the benchmark's figures do not cover: the distribution of 1-5 scores
(stacked bars, one per method) and the unblinded images of one slice."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from crossdiff.preview import save_figure  # noqa: E402


def score_distributions(path: Path, counts: Mapping[str, Mapping[str, Sequence[int]]], titles: Mapping[str, str]) -> Path:
    """One panel per question ({question: {method: counts of scores 1..5}}): a bar per method, split into
    the share of each score, red (1) to green (5)."""
    figure, axes = plt.subplots(1, len(counts), figsize=(4.2 * len(counts), 0.5 * max(map(len, counts.values())) + 1.6),
                                squeeze=False)
    colours = plt.get_cmap("RdYlGn")(np.linspace(0.05, 0.95, 5))
    for axis, (question, by_method) in zip(axes[0], counts.items()):
        names = list(by_method)
        shares = np.array([np.asarray(by_method[n], float) / max(sum(by_method[n]), 1) for n in names])
        left = np.zeros(len(names))
        for score in range(5):
            axis.barh(names, shares[:, score], left=left, color=colours[score], label=str(score + 1))
            left += shares[:, score]
        axis.invert_yaxis()
        axis.set_xlim(0, 1)
        axis.set_xlabel("share of scores")
        axis.set_title(titles.get(question, question), fontsize=10)
    axes[0][-1].legend(title="score", fontsize=8, bbox_to_anchor=(1.02, 1), loc="upper left")
    return save_figure(figure, path)


def unblinded_slice(path: Path, images: Mapping[str, Path], title: str) -> Path:
    """The PNGs readers saw of one slice, side by side (already windowed: no colour bar), labelled with what
    each one is."""
    figure, axes = plt.subplots(1, len(images), figsize=(3.2 * len(images), 3.6), squeeze=False)
    for axis, (name, file) in zip(axes[0], images.items()):
        axis.imshow(np.asarray(Image.open(file)), cmap="gray", vmin=0, vmax=255)
        axis.set_title(name, fontsize=10)
        axis.axis("off")
    figure.suptitle(title, fontsize=11)
    return save_figure(figure, path)
