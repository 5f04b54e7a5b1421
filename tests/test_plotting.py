"""refimpl.plotting.label_points: every label placed, off every point and off every other label."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest

from refimpl.plotting import label_boxes, label_points


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_labels_cover_no_point_and_no_other_label():
    # a crowded scatter: a column of points, two pairs on top of each other, a tight cluster
    x = [5, 5, 5, 5, 5, 1, 1, 2.0, 2.05, 2.1, 2.1, 8]
    y = [1, 1.02, 2, 2.01, 5, 1, 1, 1.1, 1.15, 1.1, 1.12, 9]
    labels = [f"label-{i}-{'x' * (i % 4)}" for i in range(len(x))]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100, layout="constrained")
    ax.scatter(x, y)
    ax.margins(0.15)
    texts = label_points(ax, x, y, labels, fontsize=9)
    fig.canvas.draw()
    assert [t.get_text() for t in texts] == labels
    boxes = label_boxes(texts)
    points = [tuple(ax.transData.transform(p)) for p in zip(x, y)]
    frame = ax.get_window_extent()
    for i, box in enumerate(boxes):
        assert frame.x0 <= box[0] and box[2] <= frame.x1 and frame.y0 <= box[1] and box[3] <= frame.y1
        for px, py in points:
            assert not _overlap(box, (px - 4, py - 4, px + 4, py + 4)), (labels[i], (px, py))
        for j in range(i):
            assert not _overlap(box, boxes[j]), (labels[i], labels[j])
    # a label away from its point has a leader line: the coincident points' labels at least
    assert any(line.get_gid() == "leader" for line in ax.lines)
    plt.close(fig)


def test_label_points_checks_lengths():
    fig, ax = plt.subplots()
    with pytest.raises(ValueError, match="same length"):
        label_points(ax, [1, 2], [1], ["a", "b"])
    plt.close(fig)
