"""Plots and reports of what the method did: training curves, connectivity histograms, anchor-highlighted
responses (HTML and PNG) and a token's attention over its image. Matplotlib with the Agg backend (no screen)."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Sequence

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: str | Path) -> Path:
    """Write a figure to PNG and free it (one place, so tests can inspect figures before they are saved)."""
    path = Path(out)
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def _series(history: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(h["step"], h[key]) for h in history if key in h and isinstance(h[key], (int, float))
           and math.isfinite(h[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def training_curves(history: Sequence[dict], out: str | Path) -> Path:
    """Reward, accuracy reward and anchor fraction against the optimizer step (two panels)."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, label in (("reward", "total reward"), ("rewards/accuracy_reward/mean", "accuracy reward"),
                       ("rewards/format_reward/mean", "format reward")):
        x, y = _series(history, key)
        if x:
            ax1.plot(x, y, marker=".", label=label)
    ax1.set_xlabel("training step")
    ax1.set_ylabel("mean reward per completion")
    ax1.set_title("Reward during AT-RL")
    ax1.legend(fontsize=8)
    x, y = _series(history, "atrl/anchor_fraction")
    ax2.plot(x, y, marker=".", color="tab:red")
    ax2.set_xlabel("training step")
    ax2.set_ylabel("share of tokens in anchor clusters")
    ax2.set_title("Anchor fraction")
    ax2.set_ylim(0, 1)
    fig.tight_layout()
    return _save(fig, out)


def connectivity_histogram(conn: np.ndarray, anchors: np.ndarray, bimodality: float, out: str | Path) -> Path:
    """Histogram of per-token connectivity, anchors and other tokens stacked, with the bimodality coefficient."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    hi = float(conn.max()) if conn.size and conn.max() > 0 else 1.0
    bins = np.linspace(0, hi, 41)
    ax.hist([conn[~anchors], conn[anchors]], bins=bins, stacked=True, label=["other tokens", "anchor tokens"],
            color=["tab:gray", "tab:red"])
    ax.set_xlabel("connectivity density c_t (visual attention mass, debiased)")
    ax.set_ylabel("number of response tokens")
    verdict = "bimodal" if bimodality > 5 / 9 else "not bimodal"
    ax.set_title(f"Connectivity: bimodality coefficient {bimodality:.3f} (> 0.555: {verdict})", fontsize=9)
    ax.legend()
    fig.tight_layout()
    return _save(fig, out)


def _rgb(value: float) -> tuple[float, float, float]:
    """White to red by value in [0, 1]."""
    g = 1.0 - 0.7 * min(1.0, max(0.0, value))
    return (1.0, g, g)


def _colour(value: float) -> str:
    r, g, b = (int(round(255 * c)) for c in _rgb(value))
    return f"rgb({r},{g},{b})"


def highlighted_html(views: Sequence, out: str | Path, title: str = "Anchor tokens") -> Path:
    """A self-contained HTML page: each response's tokens shaded by connectivity, anchors bold and underlined,
    perception spans outlined."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
             "body{font-family:sans-serif;max-width:60em;margin:2em auto}"
             ".tok{white-space:pre;padding:1px 0}.anchor{font-weight:bold;text-decoration:underline}"
             ".percep{outline:1px solid #1565c0}.resp{font-family:monospace;line-height:1.9;margin:.3em 0 1.2em}"
             "</style></head><body>",
             f"<h1>{html.escape(title)}</h1><p>Shading: connectivity (white = none, red = the response's most "
             "visual token). <b><u>Bold underlined</u></b>: anchor tokens. Blue outline: perception span "
             "(what the reference says was read from the image).</p>"]
    for v in views:
        top = float(v.conn.max()) if v.conn.size and v.conn.max() > 0 else 1.0
        parts.append(f"<h3>{html.escape(v.family)} &middot; {html.escape(v.uid)}</h3><div class='resp'>")
        for t, c, a, p in zip(v.tokens, v.conn, v.anchor, v.perception):
            cls = "tok" + (" anchor" if a else "") + (" percep" if p else "")
            parts.append(f"<span class='{cls}' style='background:{_colour(c / top)}' "
                         f"title='c={c:.4f}'>{html.escape(t)}</span>")
        parts.append("</div>")
    parts.append("</body></html>")
    path = Path(out)
    path.write_text("".join(parts), encoding="utf-8")
    return path


def highlighted_png(views: Sequence, out: str | Path, max_views: int = 6, per_line: int = 60) -> Path:
    """The same view as `highlighted_html`, drawn as a PNG (one block of lines per response)."""
    plt = _plt()
    views = list(views)[:max_views]
    lines_per_view = [max(1, math.ceil(len(v.tokens) / per_line)) for v in views]
    height = 0.5 + sum(0.35 * n + 0.45 for n in lines_per_view)
    fig = plt.figure(figsize=(11, height))
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, per_line + 2)
    ax.set_ylim(height, 0)
    ax.axis("off")
    y = 0.35
    ax.text(0.5, y, "Response tokens shaded by connectivity; anchors bold red; perception spans underlined blue",
            fontsize=9)
    y += 0.3
    for v, n_lines in zip(views, lines_per_view):
        ax.text(0.5, y + 0.1, f"{v.family} / {v.uid}", fontsize=8, color="gray")
        y += 0.3
        top = float(v.conn.max()) if v.conn.size and v.conn.max() > 0 else 1.0
        for k, (t, c, a, p) in enumerate(zip(v.tokens, v.conn, v.anchor, v.perception)):
            col, row = k % per_line, k // per_line
            x, yy = 1 + col, y + 0.35 * row
            ax.add_patch(plt.Rectangle((x - 0.5, yy - 0.15), 1, 0.3, color=_rgb(c / top), lw=0))
            ax.text(x, yy, t.replace("\n", "⏎") or " ", ha="center", va="center", fontsize=7, family="monospace",
                    color="darkred" if a else "black", fontweight="bold" if a else "normal")
            if p:
                ax.plot([x - 0.5, x + 0.5], [yy + 0.16, yy + 0.16], color="tab:blue", lw=1)
        y += 0.35 * n_lines + 0.15
    return _save(fig, out)


def token_heatmap(view, token_index: int, out: str | Path) -> Path:
    """The image with one token's attention over its regions (its region profile) laid over it."""
    plt = _plt()
    rh, rw = view.grid
    profile = view.profile[token_index][: rh * rw].reshape(rh, rw)
    img = np.asarray(view.image.convert("RGB"))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 4))
    ax1.imshow(img)
    ax1.set_title("image")
    ax1.set_xlabel("x (pixels)")
    ax1.set_ylabel("y (pixels)")
    ax2.imshow(img)
    shown = ax2.imshow(profile, cmap="magma", alpha=0.6, extent=(0, img.shape[1], img.shape[0], 0),
                       interpolation="nearest")
    token = view.tokens[token_index].replace("\n", "\\n")
    ax2.set_title(f"attention of token {token_index} {token!r} (c={view.conn[token_index]:.3f})", fontsize=9)
    ax2.set_xlabel("x (pixels)")
    ax2.set_ylabel("y (pixels)")
    fig.colorbar(shown, ax=ax2, label="share of the token's visual attention")
    fig.tight_layout()
    return _save(fig, out)


def write_analysis_report(result, out_dir: str | Path, *, html_views: int | None = None,
                          png_views: int = 6) -> dict[str, Path]:
    """The views of an `atrl.eval.analyze.AnalysisResult`: connectivity histogram, anchor-highlighted responses
    (HTML, PNG) and the heatmap of the first response's most visual token. Returns the written files."""
    out = Path(out_dir)
    views = result.views
    anchors = np.concatenate([v.anchor for v in views])
    view = views[0]
    return {
        "connectivity_histogram": connectivity_histogram(result.connectivity, anchors, result.bimodality,
                                                         out / "connectivity_histogram.png"),
        "responses_html": highlighted_html(views[:html_views], out / "anchors.html"),
        "responses_png": highlighted_png(views, out / "anchors.png", max_views=png_views),
        "heatmap": token_heatmap(view, int(view.conn.argmax()), out / "token_heatmap.png"),
    }
