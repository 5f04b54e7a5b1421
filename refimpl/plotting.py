"""Labels for a scatter plot that cover neither the points nor each other.

Chapter 09 labels every row of the effects table in its trade-off plots; many rows sit close together
(the 4-bit formats, the unstructured pruning rows that store their zeros densely), some on top of each
other. :func:`label_points` places the labels one at a time, in display pixels, by a small
deterministic search:

1. the points with the most neighbours are labelled first (they have the fewest free places);
2. each label takes the nearest free place on a grid of positions around its point: its box (plus a
   small margin) covers no point, no label placed before it and no leader line drawn before it, stays
   inside the axes, and the leader line to it crosses no label placed before it (where no such place
   is left, one whose leader line crosses a label). Beside the point (right, then left) comes first;
   farther places are taken only when the near ones are occupied;
3. a label away from its point gets a thin leader line, drawn beneath the points; every label has a
   white background, so that the grid shows through nowhere under the text.

The same input gives the same picture (no randomness). Call it after the axes' limits, scales and the
figure's layout are final (it reads the pixel positions of the points), and keep the figure's size and
dpi when it is saved. The labels are left out of the layout.
"""

from __future__ import annotations

from typing import Sequence


Box = tuple[float, float, float, float]  # (x0, y0, x1, y1) in display pixels


def _overlaps(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _crosses(segment: Box, box: Box) -> bool:
    """Whether the segment ``(x0, y0, x1, y1)`` passes through ``box`` (Liang-Barsky clipping)."""
    x0, y0, x1, y1 = segment
    dx, dy = x1 - x0, y1 - y0
    low, high = 0.0, 1.0
    for p, q in ((-dx, x0 - box[0]), (dx, box[2] - x0), (-dy, y0 - box[1]), (dy, box[3] - y0)):
        if p == 0:
            if q < 0:
                return False
        else:
            t = q / p
            if p < 0:
                low = max(low, t)
            else:
                high = min(high, t)
            if low > high:
                return False
    return True


def _nearest_on(box: Box, px: float, py: float) -> tuple[float, float]:
    return min(max(px, box[0]), box[2]), min(max(py, box[1]), box[3])


def label_points(
    ax,
    x: Sequence[float],
    y: Sequence[float],
    labels: Sequence[str],
    *,
    fontsize: float = 9,
    gap: float = 4.0,
    point_radius: float = 5.0,
    reach: float = 220.0,
    leader_color: str = "0.35",
):
    """Label point ``i`` at data coordinates ``(x[i], y[i])`` with ``labels[i]``; return the texts.

    ``gap``: pixels kept free around each label; ``point_radius``: half the side, in pixels, of the
    square around each point that no label may cover; ``reach``: how far, in pixels, a label may be
    moved from its point. A label that finds no free place within ``reach`` takes the place that
    overlaps least. Modifies ``ax``; the leader lines are ``ax.lines`` with the ``gid`` "leader".
    """
    if not (len(x) == len(y) == len(labels)):
        raise ValueError(f"x, y and labels must have the same length, got {len(x)}, {len(y)}, {len(labels)}")
    fig = ax.figure
    fig.canvas.draw()  # run the layout, so that the pixel positions below are the final ones
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    points = [tuple(ax.transData.transform((xi, yi))) for xi, yi in zip(x, y)]
    r = point_radius
    point_boxes = [(px - r, py - r, px + r, py + r) for px, py in points]

    sizes = []
    for label in labels:  # the pixel size of each label at this font size
        probe = ax.text(0, 0, label, fontsize=fontsize)
        extent = probe.get_window_extent(renderer)
        sizes.append((extent.width, extent.height))
        probe.remove()

    step = 3.0
    placed: list[Box] = []
    leaders: list[Box] = []

    def search(px: float, py: float, w: float, h: float, strict: bool):
        """The cheapest free place (cost, x, y) for a w x h label of the point (px, py), or None."""
        best = None
        for dy_steps in range(-int(reach / step), int(reach / step) + 1):
            for dx_steps in range(-int(reach / step), int(reach / step) + 1):
                cx, cy = px + dx_steps * step, py + dy_steps * step
                box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
                near_x, near_y = _nearest_on(box, px, py)
                distance = ((near_x - px) ** 2 + (near_y - py) ** 2) ** 0.5
                if distance > reach:
                    continue
                # prefer beside the point (right, then left), level with it
                cost = distance + 0.5 * abs(cy - py) + (0 if cx >= px else 2)
                if best is not None and cost >= best[0]:
                    continue
                if not (frame.x0 + 2 <= box[0] and box[2] <= frame.x1 - 2
                        and frame.y0 + 2 <= box[1] and box[3] <= frame.y1 - 2):
                    continue
                padded = (box[0] - gap, box[1] - gap, box[2] + gap, box[3] + gap)
                if any(_overlaps(padded, other) for other in point_boxes):
                    continue
                if any(_overlaps(padded, other) for other in placed):
                    continue
                if strict:
                    leader = (px, py, near_x, near_y)
                    if any(_crosses(segment, padded) for segment in leaders):
                        continue
                    if distance > r + gap + step + 1 and any(_crosses(leader, other) for other in placed):
                        continue
                best = (cost, cx, cy)
        return best

    # the most crowded points first: they have the fewest free places
    crowd = [sum(abs(px - qx) < 120 and abs(py - qy) < 40 for qx, qy in points) for px, py in points]
    order = sorted(range(len(points)), key=lambda i: (-crowd[i], i))

    centres: dict[int, tuple[float, float]] = {}
    for i in order:
        px, py = points[i]
        w, h = sizes[i]
        best = None
        for strict in (True, False):  # a place whose leader line crosses a label only if none is free
            best = search(px, py, w, h, strict)
            if best is not None:
                break
        if best is None:  # nowhere free: right of the point
            best = (0.0, px + r + gap + w / 2, py)
        _, cx, cy = best
        box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
        placed.append((box[0] - gap / 2, box[1] - gap / 2, box[2] + gap / 2, box[3] + gap / 2))
        near_x, near_y = _nearest_on(box, px, py)
        if ((near_x - px) ** 2 + (near_y - py) ** 2) ** 0.5 > r + gap + step + 1:
            leaders.append((px, py, near_x, near_y))
        centres[i] = (cx, cy)

    to_data = ax.transData.inverted()
    texts = []
    for i, label in enumerate(labels):
        cx, cy = centres[i]
        px, py = points[i]
        w, h = sizes[i]
        box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
        near_x, near_y = _nearest_on(box, px, py)
        if ((near_x - px) ** 2 + (near_y - py) ** 2) ** 0.5 > r + gap + step + 1:
            (x0, y0), (x1, y1) = to_data.transform([(px, py), (near_x, near_y)])
            (line,) = ax.plot([x0, x1], [y0, y1], color=leader_color, lw=0.7, zorder=1.5, scalex=False,
                              scaley=False)
            line.set_gid("leader")
        tx, ty = to_data.transform((cx, cy))
        text = ax.text(tx, ty, label, fontsize=fontsize, ha="center", va="center", zorder=4,
                       bbox=dict(boxstyle="square,pad=0.05", facecolor="white", edgecolor="none", alpha=0.85))
        text.set_in_layout(False)
        texts.append(text)
    return texts


def label_boxes(texts, renderer=None) -> list[Box]:
    """The pixel boxes ``(x0, y0, x1, y1)`` of the label texts, as drawn (for checks)."""
    boxes = []
    for text in texts:
        extent = text.get_window_extent(renderer or text.figure.canvas.get_renderer())
        boxes.append((extent.x0, extent.y0, extent.x1, extent.y1))
    return boxes
