"""rollouts.html: the logged groups as one self-contained page (thumbnails embedded as data URIs, no network),
each reward term coloured from red (low) to green (high), filterable by task type and step."""
from __future__ import annotations

import base64
import functools
import html
import io
from pathlib import Path

from flare_exp.io import write_text

THUMB = 112  # pixels, longest side

PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>GRPO rollouts</title><style>
body{{font:13px sans-serif;margin:16px}} .group{{border:1px solid #ccc;margin:10px 0;padding:8px}}
.head{{display:flex;gap:10px;align-items:flex-start}} .head img{{border:1px solid #999}}
table{{border-collapse:collapse;margin-top:6px;width:100%}} td,th{{border:1px solid #ddd;padding:3px 5px;
vertical-align:top}} td.text{{white-space:pre-wrap;max-width:640px}} .num{{text-align:right;font-family:monospace}}
.cap{{color:#b00;font-weight:bold}} .ref{{background:#f4f4f4;padding:4px;white-space:pre-wrap}}
</style></head><body><h2>GRPO rollouts ({count} groups)</h2>
<label>task type <select id="task" onchange="show()"><option value="">all</option>{tasks}</select></label>
<label>step <select id="step" onchange="show()"><option value="">all</option>{steps}</select></label>
<span id="shown"></span>
<p>Term scores are raw (before weights; the weights are under each record); the colour runs from the lowest to
the highest score of that term on this page. Advantage: the total minus its group's mean (scaled as
rl.scale_rewards says). <span class="cap">cap</span>: the completion reached rl.max_completion_length.</p>
{groups}
<script>function show(){{var t=document.getElementById('task').value,s=document.getElementById('step').value,n=0;
document.querySelectorAll('.group').forEach(function(g){{var on=(!t||g.dataset.task==t)&&(!s||g.dataset.step==s);
g.style.display=on?'':'none';if(on)n++;}});document.getElementById('shown').textContent=n+' shown';}}show();</script>
</body></html>"""


def shown_image(path: Path, window):
    """The picture the model was given for an image file (the stages' decoding rule: 16-bit scaled by the
    record's window, EXIF orientation, alpha over black), not the file's raw pixels."""
    from flare_exp.data.decoding import check_window, decode_image

    return decode_image(path, check_window(window))



@functools.lru_cache(maxsize=4096)
def thumbnail(path: Path, window: tuple | None = None) -> str:
    """A JPEG data URI of the picture the model was given (shown_image), THUMB pixels on its longest
    side; empty when the file cannot be read."""
    try:
        image = shown_image(path, window)
        image.thumbnail((THUMB, THUMB))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=80)
    except (OSError, ValueError):
        return ""
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def colour(value: float, low: float, high: float) -> str:
    share = 0.5 if high <= low else (value - low) / (high - low)
    return f"hsl({round(120 * share)},70%,80%)"


def term_ranges(entries: list[dict]) -> dict[str, tuple[float, float]]:
    values: dict[str, list[float]] = {}
    for e in entries:
        for c in e["completions"]:
            for k, v in [*c["terms"].items(), ("total", c["total"]), ("advantage", c["advantage"])]:
                values.setdefault(k, []).append(v)
    return {k: (min(v), max(v)) for k, v in values.items()}


def group_html(e: dict, ranges: dict, image_root: Path) -> str:
    esc = html.escape
    window = tuple(e["image_window"]) if e.get("image_window") else None  # hashable: thumbnails are cached
    images = "".join(f'<img src="{thumbnail(image_root / name, window)}" title="{esc(name)}" '
                     f'alt="{esc(name)}">' for name in e["images"])
    terms = sorted({t for c in e["completions"] for t in c["terms"]})
    header = "".join(f"<th>{esc(t)}</th>" for t in [*terms, "total", "advantage"])
    rows = []
    for c in e["completions"]:
        cells = "".join("<td></td>" if v is None else
                        f'<td class="num" style="background:{colour(v, *ranges[k])}">{v:.3f}</td>'
                        for k, v in [*((t, c["terms"].get(t)) for t in terms), ("total", c["total"]),
                                     ("advantage", c["advantage"])])
        cap = ' <span class="cap">cap</span>' if c["at_cap"] else ""
        rows.append(f'<tr><td class="text">{esc(c["text"])}</td>{cells}<td class="num">{c["length"]}{cap}</td></tr>')
    weights = ", ".join(f"{k} {v:g}" for k, v in e.get("weights", {}).items())
    return (f'<div class="group" data-task="{esc(e["task_type"])}" data-step="{e["step"]}"><div class="head">'
            f'{images}<div><b>step {e["step"]}</b> &middot; {esc(e["id"])} &middot; {esc(str(e["dataset"]))} '
            f'&middot; {esc(e["task_type"])}<br>weights: {esc(weights)}<div class="ref">reference: '
            f'{esc(e["reference"])}</div></div></div><table><tr><th>completion</th>{header}<th>tokens</th></tr>'
            f'{"".join(rows)}</table></div>')


def write_html(entries: list[dict], path: Path, image_root: Path) -> None:
    ranges = term_ranges(entries)
    options = lambda values: "".join(f'<option value="{html.escape(str(v))}">{html.escape(str(v))}</option>'  # noqa: E731
                                     for v in values)
    write_text(path, PAGE.format(
        count=len(entries), tasks=options(sorted({e["task_type"] for e in entries})),
        steps=options(sorted({e["step"] for e in entries})),
        groups="\n".join(group_html(e, ranges, image_root) for e in entries)))
