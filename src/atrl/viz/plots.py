"""Plots and reports of what the method did: training curves, connectivity histograms, anchor-highlighted
responses (HTML and PNG) and a token's attention over its image. Matplotlib with the Agg backend (no screen)."""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
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


def _reward_keys(history: Sequence[dict], prefix: str = "") -> list[tuple[str, str]]:
    """("reward", "total reward") and one ("rewards/NAME/mean", NAME) per reward function the run logged; with
    prefix "eval_", the same of TRL's evaluation on held-out data."""
    names = sorted({k for h in history for k in h if k.startswith(prefix + "rewards/") and k.endswith("/mean")})
    return [(prefix + "reward", "total reward"), *((k, k.split("/")[1].replace("_", " ")) for k in names)]


def _held_out_reward_keys(history: Sequence[dict]) -> list[tuple[str, str]]:
    return _reward_keys(history, "eval_")


_LINE_STYLES = ("-", "--", ":", "-.")
_CREDIT_PER_STEP = "credit seconds per step"  # derived, see _with_credit_per_step


def _trailing_mean(y: Sequence[float], window: int) -> np.ndarray:
    """Mean of each point and the window - 1 before it (fewer at the start)."""
    c = np.cumsum(np.concatenate([[0.0], np.asarray(y, dtype=float)]))
    i = np.arange(1, len(y) + 1)
    lo = np.maximum(i - window, 0)
    return (c[i] - c[lo]) / (i - lo)


def _draw_panel(ax, runs: dict[str, Sequence[dict]], keys, smooth: int = 1,
                empty: str = "not logged by these runs", styles: Sequence[str] = _LINE_STYLES) -> bool:
    """Plot `keys` ([(history key, label)], or a function of the history giving them) of every run: a colour
    per run, a line style per key. Returns whether anything was drawn; an empty panel says so."""
    drawn = False
    for colour, (run, history) in enumerate(runs.items()):
        run_keys = keys(history) if callable(keys) else keys
        for style, (key, label) in zip(list(styles) * 4, run_keys):
            x, y = _series(history, key)
            if not x:
                continue
            name = label if len(runs) == 1 else f"{run}: {label}"
            kw = {"color": f"C{colour}", "linestyle": style}
            if smooth > 1:
                ax.plot(x, y, alpha=0.25, **kw)
                ax.plot(x, _trailing_mean(y, smooth), label=name, **kw)
            else:
                ax.plot(x, y, marker="." if len(x) < 40 else None, label=name, **kw)
            drawn = True
    if drawn:
        ax.legend(fontsize=7)
        ax.xaxis.set_major_locator(_plt().MaxNLocator(integer=True))  # steps are whole
    else:
        ax.text(0.5, 0.5, empty, ha="center", va="center", color="grey", transform=ax.transAxes)
    return drawn


def training_curves(history: Sequence[dict], out: str | Path) -> Path:
    """Reward, accuracy reward and anchor fraction against the optimizer step (two panels)."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    _draw_panel(ax1, {"run": history}, [k for k in _reward_keys(history) if k[0] in (
        "reward", "rewards/accuracy_reward/mean", "rewards/format_reward/mean")])
    ax1.set_xlabel("training step")
    ax1.set_ylabel("mean reward per completion")
    ax1.set_title("Reward during AT-RL")
    _draw_panel(ax2, {"run": history}, [("atrl/anchor_fraction", "anchor fraction")])
    ax2.set_xlabel("training step")
    ax2.set_ylabel("share of tokens in anchor clusters")
    ax2.set_title("Anchor fraction")
    ax2.set_ylim(0, 1)
    fig.tight_layout()
    return _save(fig, out)


# The panels of `training_report`: title, y-axis label, and the series ([(logged key, label)] or a function of a
# run's history giving them). The keys are TRL's and ATRLTrainer's metric names (docs/ALGORITHM.md, "Logged metrics").
_CLIPPED = "completions/clipped_ratio"
REPORT_PANELS = (
    ("Reward", "mean reward per completion", _reward_keys),
    ("Held-out reward (data.eval)", "mean reward per completion", _held_out_reward_keys),
    ("Completion length", "tokens per completion", [("completions/mean_length", "mean length")]),
    ("Anchors' share", "share of the tokens / of the credit",
     [("atrl/anchor_fraction", "anchor fraction of tokens"), ("atrl/anchor_credit_share", "anchors' credit share")]),
    ("Connectivity", "mean connectivity c_t (debiased)",
     [("atrl/anchor_conn", "anchor tokens"), ("atrl/other_conn", "other tokens")]),
    ("Bimodality of connectivity", "Sarle's coefficient (> 5/9: bimodal)", [("atrl/bimodality", "bimodality")]),
    ("Credit weights", "per-token weight W(C_k(t))",
     [("atrl/weight_max", "max"), ("atrl/weight_min", "min"), ("atrl/weight_std", "std")]),
    ("Policy entropy", "mean token entropy (nats)", [("entropy", "entropy")]),
    ("Time", "seconds per optimizer step",
     [("step_time", "training step (TRL's step_time)"), (_CREDIT_PER_STEP, "credit in the training loop")]),
)


def _with_credit_per_step(history: Sequence[dict]) -> list[dict]:
    """The history with the seconds of credit per optimizer step, `atrl/time/credit_share x step_time`, where both
    were logged (`atrl/time/credit_s` itself is per micro-batch)."""
    return [h | {_CREDIT_PER_STEP: h["atrl/time/credit_share"] * h["step_time"]}
            if "atrl/time/credit_share" in h and "step_time" in h else h for h in history]


def training_report(runs: dict[str, Sequence[dict]], out: str | Path, smooth: int = 1) -> Path:
    """One figure of what training did, for one run or several overlaid (e.g. `atrl` against `uniform`).

    runs: label -> the run's log history (`trainer.state.log_history`, or `log_history` of a `trainer_state.json`).
    smooth: with a window > 1, each series is drawn faint as logged and solid as its trailing mean over that many
    logged points. Panels: `REPORT_PANELS`; a metric a run did not log (e.g. anchors under `uniform`) is left out,
    and a panel no run logged says so."""
    if not runs:
        raise ValueError("training_report: no runs to plot")
    if smooth < 1:
        raise ValueError(f"training_report: smooth={smooth} must be at least 1 (1: no smoothing)")
    plt = _plt()
    fig, axes = plt.subplots(3, 3, figsize=(15, 11))
    runs = {run: _with_credit_per_step(history) for run, history in runs.items()}
    for ax, (title, ylabel, keys) in zip(axes.flat, REPORT_PANELS):
        held_out = title.startswith("Held-out")
        _draw_panel(ax, runs, keys, smooth, **({"empty": "no held-out data in these runs\n(recipe: data.eval)"}
                                               if held_out else {}))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        if title == "Anchors' share":
            ax.set_ylim(0, 1)
        if title.startswith("Bimodality"):
            ax.axhline(5 / 9, color="grey", linewidth=0.8, linestyle="--")
        if title == "Completion length" and any(_series(h, _CLIPPED)[0] for h in runs.values()):
            twin = ax.twinx()  # the share cut at the limit: answers lost to it, and where length growth stops
            _draw_panel(twin, runs, [(_CLIPPED, "cut at max_completion_length")], smooth, styles=(":",))
            twin.set_ylabel("share of completions cut at the limit")
            twin.set_ylim(0, 1.05)
            twin.legend(fontsize=7, loc="lower right")
    fig.suptitle("AT-RL training: " + ", ".join(runs), fontsize=11)
    fig.tight_layout()
    return _save(fig, out)


def comparison_plot(comparison, out: str | Path) -> Path:
    """Accuracy of each compared checkpoint with its 95% bootstrap interval, and by category (thin lines).

    When every model is a `checkpoint-N` folder of one run (`atrl eval --model runs/x/checkpoint-*`), the x axis is
    the training step; otherwise the models in the order given (the baseline first)."""
    from ..eval.compare import checkpoint_steps

    plt = _plt()
    labels = comparison.labels
    steps = checkpoint_steps(labels)
    by_step = steps is not None
    xs = steps if by_step else list(range(len(labels)))
    order = sorted(range(len(labels)), key=lambda i: xs[i])
    x = [xs[i] for i in order]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(labels)), 4.2))
    accuracy = [100 * comparison.accuracy[labels[i]] for i in order]
    low = [100 * comparison.accuracy_ci[labels[i]][0] for i in order]
    high = [100 * comparison.accuracy_ci[labels[i]][1] for i in order]
    ax.fill_between(x, low, high, color="#1565c0", alpha=0.15, label="95% bootstrap interval")
    ax.plot(x, accuracy, "o-", color="#1565c0", linewidth=2, label="all questions")
    if len(comparison.by_category) > 1:
        for cat, row in sorted(comparison.by_category.items()):
            ax.plot(x, [100 * row[labels[i]] for i in order], linewidth=0.9, alpha=0.7,
                    label=f"{cat} (n={int(row['n'])})")
    if by_step:
        ax.set_xlabel(f"training step ({Path(labels[0]).resolve().parent.name})")
    else:
        ax.set_xticks(x, [Path(labels[i]).name or labels[i] for i in order], rotation=20, ha="right", fontsize=8)
        ax.set_xlabel("model")
    ax.set_ylabel("accuracy, %")
    ax.set_title(f"{comparison.n} questions, {comparison.samples} answer(s) each", fontsize=10)
    ax.legend(fontsize=7, loc="best")
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


def highlighted_html(views: Sequence, out: str | Path, title: str = "Anchor tokens",
                     note: str = "Blue outline: perception span (what the reference says was read from the image).",
                     ) -> Path:
    """A self-contained HTML page: each response's tokens shaded by connectivity, anchors bold and underlined,
    perception spans outlined; a view with `weights` shows each token's credit weight on hover."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
             "body{font-family:sans-serif;max-width:60em;margin:2em auto}"
             ".tok{white-space:pre;padding:1px 0}.anchor{font-weight:bold;text-decoration:underline}"
             ".percep{outline:1px solid #1565c0}.resp{font-family:monospace;line-height:1.9;margin:.3em 0 1.2em}"
             "</style></head><body>",
             f"<h1>{html.escape(title)}</h1><p>Shading: connectivity (white = none, red = the response's most "
             f"visual token). <b><u>Bold underlined</u></b>: anchor tokens. {html.escape(note)}</p>"]
    for v in views:
        top = float(v.conn.max()) if v.conn.size and v.conn.max() > 0 else 1.0
        weights = getattr(v, "weights", None)
        parts.append(f"<h3>{html.escape(v.family)} &middot; {html.escape(v.uid)}</h3><div class='resp'>")
        for i, (t, c, a, p) in enumerate(zip(v.tokens, v.conn, v.anchor, v.perception)):
            cls = "tok" + (" anchor" if a else "") + (" percep" if p else "")
            hover = f"c={c:.4f}" + (f" w={weights[i]:.3f}" if weights is not None else "") + _looked(v, i)
            parts.append(f"<span class='{cls}' style='background:{_colour(c / top)}' "
                         f"title='{hover}'>{html.escape(t)}</span>")
        parts.append("</div>")
    parts.append("</body></html>")
    path = Path(out)
    path.write_text("".join(parts), encoding="utf-8")
    return path


def _looked(view, i: int) -> str:
    """For a response to a video: where token i's visual attention peaks (its stretch of time, its frames and its
    cell of the region grid), for the token's hover text."""
    if getattr(view, "frames", None) is None or view.profile[i].sum() <= 0:
        return ""
    rh, rw = view.grid
    region = int(np.argmax(view.profile[i][: rh * rw * view.time_bins]))
    k, cell = divmod(region, rh * rw)
    frames = _bin_frames(len(view.frames), view.time_bins)[k]
    span = f"frames {frames[0]}-{frames[-1]}" if frames else "no frames"
    return f" looked most at {span}, cell {divmod(cell, rw)}"


@dataclass
class SampledView:
    """A completion sampled in training, as `highlighted_html` shows it (no reference, so no perception spans)."""

    uid: str
    family: str  # the heading: advantage, anchor share, largest weight
    tokens: list[str]
    conn: np.ndarray  # (T,)
    anchor: np.ndarray  # (T,) bool
    weights: np.ndarray  # (T,)

    @property
    def perception(self) -> np.ndarray:
        return np.zeros(len(self.tokens), dtype=bool)


def sampled_views(tokens: Sequence[list[str]], conn: Sequence[np.ndarray], anchors: Sequence[np.ndarray],
                  weights: Sequence[np.ndarray], advantages: Sequence[float]) -> list[SampledView]:
    """Completions sampled during training with what AT-RL did to them: per completion i, its tokens, their
    connectivity and anchor flags and weights (each (T_i,), padding removed) and its advantage A(i)."""
    return [SampledView(uid=f"completion {i}", tokens=list(t), conn=np.asarray(c, dtype=float),
                        anchor=np.asarray(a, dtype=bool), weights=np.asarray(w, dtype=float),
                        family=f"A(i) = {adv:+.3f}, anchors {np.mean(a) if len(a) else 0:.0%} of "
                               f"{len(t)} tokens, largest weight {max(w, default=0):.2f}")
            for i, (t, c, a, w, adv) in enumerate(zip(tokens, conn, anchors, weights, advantages))]


def sampled_anchors_html(views: Sequence[SampledView], out: str | Path, title: str) -> Path:
    """The sampled completions (`sampled_views`) as `highlighted_html` shows them, weights on hover."""
    return highlighted_html(views, out, title=title, note="A token's weight W(C_k(t)) shows on hover; its advantage "
                            "is W x A(i) (a positive A(i) pushes its log-probability up).")


def sampled_anchors_png(views: Sequence[SampledView], out: str | Path, max_views: int = 4,
                        max_tokens: int = 240, width: int = 1200) -> Path:
    """A preview of the sampled completions for image loggers (TensorBoard, W&B), drawn with PIL (about 20 times
    faster than matplotlib: it runs on the trainer's main process): the first `max_views` completions, each cut
    to its first `max_tokens` tokens (the HTML page has them whole), shaded as the page is, anchors dark red and
    underlined."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=12)
    line, pad = 18, 8
    items: list[tuple[str, float, float, str, bool]] = []  # (kind, x, y, text, anchor) ; kind: head | tok
    shades: list[tuple[float, float, float, float, tuple[int, int, int]]] = []
    y = pad + 2 * line
    for v in list(views)[:max_views]:
        shown = len(v.tokens) > max_tokens
        items.append(("head", pad, y, v.family + (f" (first {max_tokens} tokens shown)" if shown else ""), False))
        y += line + 2
        top = float(v.conn.max()) if v.conn.size and v.conn.max() > 0 else 1.0
        x = pad
        for t, c, a in zip(v.tokens[:max_tokens], v.conn[:max_tokens], v.anchor[:max_tokens]):
            text = t.replace("\n", "\\n") or " "
            w = max(6.0, font.getlength(text) + 2)
            if x + w > width - pad:
                x, y = pad, y + line
            shades.append((x, y, x + w, y + line - 2, tuple(round(255 * k) for k in _rgb(float(c) / top))))
            items.append(("tok", x + 1, y + 2, text, bool(a)))
            x += w
            if "\n" in t:  # the completion's own line breaks
                x, y = pad, y + line
        y += line + line // 2
    image = Image.new("RGB", (width, int(y + pad)), "white")
    draw = ImageDraw.Draw(image)
    draw.text((pad, pad), "Completions sampled in training, tokens shaded by connectivity (red = the completion's "
              "most visual token); anchors (the tokens AT-RL boosted) dark red, underlined", fill="black", font=font)
    for x0, y0, x1, y1, colour in shades:
        draw.rectangle((x0, y0, x1, y1), fill=colour)
    for kind, x, yy, text, anchor in items:
        if kind == "head":
            draw.text((x, yy), text, fill=(110, 110, 110), font=font)
        else:
            draw.text((x, yy), text, fill=(150, 0, 0) if anchor else "black", font=font)
            if anchor:
                draw.line((x, yy + 13, x + font.getlength(text), yy + 13), fill=(150, 0, 0), width=1)
    path = Path(out)
    image.save(path)
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


def _bin_frames(n_frames: int, time_bins: int) -> list[list[int]]:
    """The frames of each stretch of time: temporal patches of two frames, patch i of t in bin i * bins // t."""
    t = max(1, (n_frames + 1) // 2)
    bins: list[list[int]] = [[] for _ in range(time_bins)]
    for frame in range(n_frames):
        bins[(frame // 2) * time_bins // t].append(frame)
    return bins


def video_heatmap(view, token_index: int, out: str | Path) -> Path:
    """A video's frame strip, one panel per stretch of time (its middle frame), with one token's attention over
    that stretch's regions laid over it; each panel's title gives the stretch's share of the token's visual
    attention and its frames."""
    plt = _plt()
    rh, rw = view.grid
    block = rh * rw
    bins = _bin_frames(len(view.frames), view.time_bins)
    profile = view.profile[token_index][: block * view.time_bins].reshape(view.time_bins, rh, rw)
    share = profile.sum(axis=(1, 2)) / max(float(profile.sum()), 1e-12)
    top = float(profile.max()) or 1.0
    used = [k for k, frames in enumerate(bins) if frames]
    fig, axes = plt.subplots(1, len(used), figsize=(2.6 * len(used), 3.2), squeeze=False)
    for ax, k in zip(axes[0], used):
        frame = view.frames[bins[k][len(bins[k]) // 2]]
        ax.imshow(frame)
        ax.imshow(profile[k], cmap="magma", alpha=0.6, vmin=0, vmax=top, interpolation="nearest",
                  extent=(0, frame.shape[1], frame.shape[0], 0))
        ax.set_title(f"frames {bins[k][0]}-{bins[k][-1]}: {share[k]:.0%}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    token = view.tokens[token_index].replace("\n", "\\n")
    fig.suptitle(f"where and when token {token_index} {token!r} looked (c={view.conn[token_index]:.3f})",
                 fontsize=10)
    fig.tight_layout()
    return _save(fig, out)


def token_heatmap(view, token_index: int, out: str | Path) -> Path:
    """The image with one token's attention over its regions (its region profile) laid over it; for a video, the
    frame strip of `video_heatmap`."""
    if getattr(view, "frames", None) is not None:
        return video_heatmap(view, token_index, out)
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
    spans = any(v.perception.any() for v in views)
    note = ("Blue outline: perception span (what the reference says was read from the image)." if spans else
            "The model's own responses: no perception spans to compare with.")
    written = {
        "connectivity_histogram": connectivity_histogram(result.connectivity, anchors, result.bimodality,
                                                         out / "connectivity_histogram.png"),
        "responses_html": highlighted_html(views[:html_views], out / "anchors.html", note=note),
        "responses_png": highlighted_png(views, out / "anchors.png", max_views=png_views),
    }
    # the first response to an image or a video (rows may have neither)
    view = next((v for v in views if v.image is not None or getattr(v, "frames", None) is not None), None)
    if view is not None:
        written["heatmap"] = token_heatmap(view, int(view.conn.argmax()), out / "token_heatmap.png")
    return written
