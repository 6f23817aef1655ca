"""PNG charts without a plotting dependency: a layer x expert heatmap and a grouped bar chart.

A tiny RGB canvas, a 5x7 bitmap font for labels, and a zlib PNG encoder.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# 5x7 glyphs, rows top to bottom, '#' = ink
_FONT_SRC = {
    "0": ".###.#...##..###.#.###..##...#.###.", "1": "..#...##....#....#....#....#...###.",
    "2": ".###." "#...#" "....#" "...#." "..#.." ".#..." "#####", "3": "#####" "...#." "..#.." "...#." "....#" "#...#" ".###.",
    "4": "...#...##..#.#.#..#.#####...#....#.", "5": "#####" "#...." "####." "....#" "....#" "#...#" ".###.",
    "6": "..##..#...#....####.#...##...#.###.", "7": "#####....#...#...#...#....#....#...",
    "8": ".###.#...##...#.###.#...##...#.###.", "9": ".###.#...##...#.####....#...#..##..",
    "A": ".###.#...##...#######...##...##...#", "B": "####.#...##...#####.#...##...#####.",
    "C": ".###.#...##....#....#....#...#.###.", "D": "###..#..#.#...##...##...##..#.###..",
    "E": "######....#....####.#....#....#####", "F": "######....#....####.#....#....#....",
    "G": ".###.#...##....#.####...##...#.####", "H": "#...##...##...#######...##...##...#",
    "I": ".###...#....#....#....#....#...###.", "J": "..###...#....#....#....##..#..##...",
    "K": "#...##..#.#.#..##...#.#..#..#.#...#", "L": "#....#....#....#....#....#....#####",
    "M": "#...###.###.#.##...##...##...##...#", "N": "#...###..##.#.##..###...##...##...#",
    "O": ".###.#...##...##...##...##...#.###.", "P": "####.#...##...#####.#....#....#....",
    "Q": ".###.#...##...##...##.#.##..#..##.#", "R": "####.#...##...#####.#.#..#..#.#...#",
    "S": ".####.....#.....###.....#....#####.", "T": "#####..#....#....#....#....#....#..",
    "U": "#...##...##...##...##...##...#.###.", "V": "#...##...##...##...##...#.#.#...#..",
    "W": "#...##...##...##.#.##.#.##.#.#.#.#.", "X": "#...##...#.#.#...#...#.#.#...##...#",
    "Y": "#...##...#.#.#...#....#....#....#..", "Z": "#####....#...#...#...#...#....#####",
    " ": "." * 35, ".": "." * 30 + "..#..", "-": "." * 15 + "#####" + "." * 15,
    "%": "##...##..#...#...#...#...#..##...##", ":": "....." ".##.." ".##.." "....." ".##.." ".##.." ".....",
    "(": "...#...#...#....#....#.....#.....#.", ")": ".#.....#.....#....#....#...#...#...",
    "/": "....#...#...#...#...#...#...#......", "_": "." * 30 + "#####", "+": ".......#....#..#####..#....#.......",
    "=": "..........#####.....#####..........", ",": "....." "....." "....." "....." ".##.." "..#.." ".#...", "x": "..........#...#.#.#...#...#.#.#...#",
}
_FONT = {k: np.array([c == "#" for c in v], dtype=bool).reshape(7, 5) for k, v in _FONT_SRC.items()}

WHITE = (255, 255, 255)
BLACK = (20, 20, 20)
GREY = (150, 150, 150)
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


class Canvas:
    def __init__(self, w: int, h: int, bg=WHITE) -> None:
        self.img = np.empty((h, w, 3), np.uint8)
        self.img[:] = bg

    def rect(self, x0: int, y0: int, x1: int, y1: int, color) -> None:
        h, w = self.img.shape[:2]
        x0, x1 = max(0, min(x0, x1)), min(w, max(x0, x1))
        y0, y1 = max(0, min(y0, y1)), min(h, max(y0, y1))
        self.img[y0:y1, x0:x1] = color

    def text(self, x: int, y: int, s: str, color=BLACK, scale: int = 1) -> int:
        """Draw ``s`` (upper-cased; unknown characters as blanks); returns the width drawn."""
        cx = x
        for ch in s.upper():
            g = _FONT.get(ch, _FONT[" "])
            ys, xs = np.nonzero(np.kron(g, np.ones((scale, scale), bool)))
            ok = (y + ys < self.img.shape[0]) & (cx + xs < self.img.shape[1]) & (y + ys >= 0) & (cx + xs >= 0)
            self.img[y + ys[ok], cx + xs[ok]] = color
            cx += 6 * scale
        return cx - x

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        h, w = self.img.shape[:2]
        raw = b"".join(b"\x00" + self.img[r].tobytes() for r in range(h))

        def chunk(tag: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

        png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
               + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
        path.write_bytes(png)
        return path


def _diverging(v: float) -> tuple[int, int, int]:
    """-1 blue .. 0 white .. +1 red."""
    v = float(np.clip(v, -1, 1))
    if v >= 0:
        return (255, int(255 * (1 - v)), int(255 * (1 - v)))
    return (int(255 * (1 + v)), int(255 * (1 + v)), 255)


def heatmap_png(scores: np.ndarray, path: str | Path, *, title: str = "", layers: Sequence[int] | None = None,
                marked: Sequence[tuple[int, int]] = (), cell: int = 10) -> Path:
    """Layer (rows) x expert (columns) heatmap; red: positive, blue: negative; marked cells boxed."""
    layers = list(layers) if layers is not None else list(range(scores.shape[0]))
    n_e = scores.shape[1]
    vmax = float(np.abs(scores[layers]).max()) or 1.0
    left, top = 40, 34
    c = Canvas(left + n_e * cell + 20, top + len(layers) * cell + 30)
    c.text(4, 4, title[:80])
    c.text(4, 16, f"RED: MORE ON AWAY LABEL  BLUE: MORE ON TARGET  MAX {vmax:.3g}", GREY)
    for r, layer in enumerate(layers):
        c.text(4, top + r * cell + max(0, (cell - 7) // 2), f"L{layer}", GREY)
        for e in range(n_e):
            c.rect(left + e * cell, top + r * cell, left + (e + 1) * cell - 1, top + (r + 1) * cell - 1,
                   _diverging(scores[layer, e] / vmax))
    for layer, e in marked:
        if layer in layers:
            r = layers.index(layer)
            x0, y0 = left + e * cell, top + r * cell
            for (a, b, cc, d) in ((x0, y0, x0 + cell, y0 + 1), (x0, y0 + cell - 2, x0 + cell, y0 + cell - 1),
                                  (x0, y0, x0 + 1, y0 + cell), (x0 + cell - 2, y0, x0 + cell - 1, y0 + cell)):
                c.rect(a, b, cc, d, BLACK)
    c.text(left, top + len(layers) * cell + 8, f"EXPERT 0 .. {n_e - 1}", GREY)
    return c.save(path)


def bar_chart_png(groups: Sequence[str], series: dict[str, Sequence[float]], path: str | Path, *, title: str = "",
                  errors: dict[str, Sequence[float]] | None = None, as_percent: bool = True) -> Path:
    """Grouped bars: one group per condition, one bar per series (e.g. refusal/compliance/degenerate)."""
    names = list(series)
    bw, gap, h = 18, 34, 200
    left, top = 30, 40
    width = left + len(groups) * (len(names) * bw + gap) + 20
    label_w = max(len(g) for g in groups) * 6 if groups else 0
    c = Canvas(max(width, 260), top + h + 24 + label_w // 6 * 0 + 40)
    c.text(4, 4, title[:60])
    x = 4
    for i, n in enumerate(names):
        c.rect(x, 18, x + 8, 26, PALETTE[i % len(PALETTE)])
        x += 12 + c.text(x + 12, 19, n) + 8
    base = top + h
    c.rect(left - 2, top, left - 1, base, GREY)
    for frac in (0.0, 0.5, 1.0):
        c.text(0, int(base - frac * h) - 3, f"{int(frac * 100)}" if as_percent else f"{frac:g}", GREY)
    for gi, g in enumerate(groups):
        gx = left + gi * (len(names) * bw + gap)
        for si, n in enumerate(names):
            v = float(series[n][gi])
            x0 = gx + si * bw
            c.rect(x0, int(base - v * h), x0 + bw - 3, base, PALETTE[si % len(PALETTE)])
            if errors and n in errors:
                e = float(errors[n][gi])
                xm = x0 + bw // 2 - 1
                c.rect(xm, int(base - (v + e) * h), xm + 1, int(base - (v - e) * h), BLACK)
        c.text(gx, base + 6, g[: (len(names) * bw + gap) // 6])
    return c.save(path)
