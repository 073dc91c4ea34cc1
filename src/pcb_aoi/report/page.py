"""The shell of a report page: one self-contained HTML file that opens anywhere, offline.

Everything is inline (CSS, the one small script, images as ``data:`` URIs), and the page's own
Content-Security-Policy forbids any fetch, so mailing the file or opening it on an air-gapped line PC
shows the same page and leaks nothing. Every piece of text from a file (names, errors, provenance) goes
through ``esc`` (``html.escape``); the helpers here take text and return HTML. Stdlib only.
"""
from __future__ import annotations

import base64
import html
import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from string import Template

# No fetch of any kind: scripts, styles and images only from the page itself.
CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
       "base-uri 'none'; form-action 'none'")

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1200px;padding:0 16px 40px;color:#1d2329}
h1{font-size:22px;margin:20px 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d5dbe1;padding-bottom:4px}
p.lead{color:#56606b;margin:0 0 12px}p.note{color:#56606b;font-size:13px;max-width:860px}
table{border-collapse:collapse;margin:6px 0 10px}th,td{border:1px solid #d5dbe1;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f1f4f7;font-weight:600}td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:8px 0}.card{border:1px solid #d5dbe1;border-radius:6px;padding:8px 12px;min-width:120px}
.card .v{font-size:22px;font-weight:600;font-variant-numeric:tabular-nums}.card .k{color:#56606b;font-size:12px}
.bad{color:#b3261e}.good{color:#1b7f3b}.warn{background:#fff4d6;border:1px solid #e8c66a;padding:6px 10px;border-radius:4px}
.grid{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0;border:1px solid #d5dbe1;border-radius:4px;padding:6px;max-width:540px}
figure img{display:block;max-width:100%;height:auto}figcaption{font-size:12px;color:#38414a;overflow-wrap:anywhere}
code,.mono{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12.5px;word-break:break-all}
.diag{background:#e3f3e8}.off{background:#fde7e4}footer{margin-top:32px;color:#7a848e;font-size:12px}
.sw{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:4px;vertical-align:baseline}
"""

# Marks on <body> whether every picture decoded (data-images-loaded="n/m") and how many network fetches
# the page made (data-requests, from the Resource Timing API; data: URIs are not fetches), and says so
# in the footer: a reader sees a broken picture named, a test reads the attributes.
SELF_CHECK = """
addEventListener('load',function(){var im=[].slice.call(document.images),ok=im.filter(function(i){return i.complete&&i.naturalWidth>0});
var rq=performance.getEntriesByType('resource').length,b=document.body,s=document.getElementById('self-check');
b.setAttribute('data-images-loaded',ok.length+'/'+im.length);b.setAttribute('data-requests',String(rq));
im.forEach(function(i){if(ok.indexOf(i)<0){i.alt='picture failed to load: '+(i.alt||'');i.style.outline='2px solid #b3261e'}});
if(s)s.textContent='Self-check: '+ok.length+' of '+im.length+' pictures shown, '+rq+' network requests.';});
"""

PAGE = Template("""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="$csp">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>$title</title><style>$css</style></head>
<body data-report="$kind">
<h1>$title</h1><p class="lead">$lead</p>
$body
<footer>Written by pcb-aoi-report at $when. <span id="self-check"></span></footer>
<script>$script</script>
</body></html>
""")


def esc(value) -> str:
    """Any value as HTML text (quotes escaped too, so it is safe in attributes)."""
    return html.escape(str(value), quote=True)


def fmt(value, digits: int = 4) -> str:
    """A number for a table: floats rounded to ``digits`` significant decimals, None as an en dash."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value else f"{round(value, digits):g}"
    return str(value)


def table(headers: list[str], rows: list[list], num: set[int] = frozenset(), attrs: str = "",
          row_attrs: list[str] | None = None) -> str:
    """A table of already-HTML cells (pass text through ``esc``); columns in ``num`` align right."""
    head = "".join(f'<th{" class=num" if i in num else ""}>{h}</th>' for i, h in enumerate(headers))
    body = []
    for r, row in enumerate(rows):
        extra = f" {row_attrs[r]}" if row_attrs else ""
        cells = "".join(f'<td{" class=num" if i in num else ""}>{c}</td>' for i, c in enumerate(row))
        body.append(f"<tr{extra}>{cells}</tr>")
    return f"<table {attrs}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def cards(items: list[tuple[str, str, str]]) -> str:
    """Headline numbers: (key for data-key, label, value text) each in a box."""
    return '<div class="cards">' + "".join(
        f'<div class="card" data-key="{esc(k)}"><div class="v">{esc(v)}</div><div class="k">{esc(label)}</div></div>'
        for k, label, v in items) + "</div>"


def flatten(obj, prefix: str = "") -> list[tuple[str, object]]:
    """Nested dicts as (dotted key, leaf value) rows, in the file's order; lists stay JSON."""
    if isinstance(obj, dict):
        out = []
        for k, v in obj.items():
            out += flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    return [(prefix, json.dumps(obj) if isinstance(obj, list) else obj)]


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def figure(uri: str, caption_html: str, alt: str, attrs: str = "") -> str:
    return (f'<figure {attrs}><img src="{uri}" alt="{esc(alt)}" loading="eager">'
            f"<figcaption>{caption_html}</figcaption></figure>")


def page(kind: str, title: str, lead: str, sections: list[str]) -> str:
    """The whole document; ``sections`` are HTML, ``title`` and ``lead`` text."""
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return PAGE.substitute(csp=CSP, title=esc(title), css=CSS, kind=esc(kind), lead=esc(lead),
                           body="\n".join(sections), when=when, script=SELF_CHECK)


def write_page(path: str | Path, text: str) -> Path:
    """Write atomically (temp file beside it, fsync, rename): a crash leaves the previous report whole.
    Own helper because ``pcb_aoi.data.dataset``'s imports pandas and the edge box may not have it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


class ReportError(ValueError):
    """Input the report cannot be written from; the message names the file (and line) and how to fix it."""
