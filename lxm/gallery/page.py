"""The gallery page: records -> one self-contained index.html (plain Python, every text html-escaped).

Self-contained: the style sheet and the filter script are inline, the pictures are relative paths into assets/
beside the page, nothing is fetched from the network (the page holds no http(s) reference), so the folder can be
copied anywhere or opened from a cluster's file system.

The filters are plain JavaScript: "wrong only", one select per type field, a text search; each example is an
`<article class="ex">` whose data attributes (data-right, data-answer-type, ...) they test, and an example filtered
out gets the `hidden` attribute. The filter state is mirrored in the URL hash (`index.html#wrong=1&answer_type=yes/no
&q=color`) and read from it on load, so a filtered view can be linked to (and is what the browser test opens).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from urllib.parse import quote

from lxm.gallery.records import GalleryRecord, Summary, field_label

GENERATOR = "lxm gallery"  # <meta name="generator">: how a later run recognises a folder it may replace


@dataclass
class ImageView:
    """One image of a shown example."""

    img_id: str
    src: str | None  # path of the asset relative to the page; None = not drawn
    note: str | None = None  # why not ("image not found", the decoding error)


def _attr(field: str) -> str:
    return "data-" + field.replace("_", "-").lower()


def _num(x: float) -> str:
    return f"{x:.2f}".rstrip("0").rstrip(".") if x != int(x) else str(int(x))


def _summary_html(summary: Summary) -> str:
    metrics = " ".join(f'<span class="metric"><b>{_num(v)}</b> {escape(k)}</span>' for k, v in summary.metrics.items())
    parts = [f'<div class="metrics">{metrics}<span class="metric"><b>{summary.right}</b> of '
             f'{summary.examples} right</span></div>']
    tables = []
    for name, rows in summary.by_type.items():
        body = "".join(
            f'<tr><td><a href="#{quote(name)}={quote(r.value, safe="")}">{escape(r.value)}</a></td>'
            f'<td class="n">{r.count}</td><td class="n">{_num(r.score)}</td>'
            f'<td class="bar"><i style="width:{max(0.0, min(100.0, r.score)):.1f}%"></i></td></tr>' for r in rows)
        tables.append(f'<table class="types"><caption>{escape(field_label(name))}</caption><thead><tr><th>value</th>'
                      f'<th>n</th><th>{escape(summary.metric)}</th><th></th></tr></thead><tbody>{body}</tbody>'
                      f'</table>')
    if tables:
        parts.append(f'<div class="tables">{"".join(tables)}</div>')
    parts.extend(f'<p class="note">{escape(n)}</p>' for n in summary.notes)
    return "".join(parts)


def _filters_html(records: Sequence[GalleryRecord], fields: Sequence[str]) -> str:
    selects = []
    for name in fields:
        values = sorted({r.types[name] for r in records})
        options = "".join(f'<option value="{escape(v)}">{escape(v)}</option>' for v in values)
        selects.append(f'<label>{escape(field_label(name))} <select data-field="{escape(name)}" '
                       f'data-attr="{escape(_attr(name))}"><option value="">all</option>{options}</select></label>')
    return ('<form id="filters" onsubmit="return false"><label><input type="checkbox" id="f-wrong"> wrong only'
            f'</label>{"".join(selects)}<label>search <input type="search" id="f-q" placeholder="text, id, answer">'
            f'</label><span id="count">showing {len(records)} of {len(records)}</span></form>')


def _example_html(rec: GalleryRecord, views: Sequence[ImageView]) -> str:
    truth = dict(rec.truth)
    figures = []
    for v in views:
        if v.src is not None:
            inner = (f'<a href="{escape(v.src)}"><img src="{escape(v.src)}" alt="{escape(v.img_id)}" '
                     f'loading="lazy"></a>')
        else:
            inner = f'<div class="noimg">{escape(v.note or "image not found")}</div>'
        figures.append(f'<figure>{inner}<figcaption>{escape(v.img_id)}</figcaption></figure>')
    truth_rows = "".join(f'<tr><td>{escape(a)}</td><td class="n">{_num(s)}</td></tr>' for a, s in rec.truth)
    top_rows = "".join(
        f'<tr class="{"hit" if a in truth else ""}"><td class="n">{k + 1}</td><td>{escape(a)}</td>'
        f'<td class="n">{p:.3f}</td><td class="bar"><i style="width:{100 * p:.1f}%"></i></td></tr>'
        for k, (a, p) in enumerate(rec.top))
    partial = rec.right and rec.score < 100
    verdict = ("right" if rec.right else "wrong") + (f" (score {_num(rec.score)})" if partial else "")
    kind = "partial" if partial else "right" if rec.right else "wrong"
    types = "".join(f' · {escape(field_label(k))}: <b>{escape(v)}</b>' for k, v in rec.types.items())
    data = "".join(f' {_attr(k)}="{escape(v)}"' for k, v in rec.types.items())
    search = " ".join([rec.text, str(rec.id), *rec.types.values(), *(a for a, _ in rec.truth),
                       *(a for a, _ in rec.top), *rec.images]).lower()
    return (f'<article class="ex {kind}" data-right="{int(rec.right)}" data-id="{escape(str(rec.id))}"{data} '
            f'data-search="{escape(search)}"><div class="imgs{" pair" if len(views) > 1 else ""}">{"".join(figures)}'
            f'</div><div class="body">'
            f'<p class="text">{escape(rec.text)}</p><p class="verdict"><span class="tag">{escape(verdict)}</span>'
            f' id <code>{escape(str(rec.id))}</code>{types}</p><div class="cols"><table class="truth"><caption>ground '
            f'truth</caption>{truth_rows}</table><table class="top"><caption>predictions</caption>{top_rows}'
            f'</table></div></div></article>')


_STYLE = """
:root { --right: #2e7d32; --wrong: #c62828; --partial: #ef8f00; --line: #ddd; }
[hidden] { display: none !important; }
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #222; background: #f6f6f4; }
header { background: #fff; padding: 12px 20px 4px; }
nav { background: #fff; border-bottom: 1px solid var(--line); padding: 6px 20px; position: sticky; top: 0; z-index: 1; }
h1 { font-size: 18px; margin: 0 0 4px; }
.meta, .note { color: #555; margin: 2px 0; }
.note { font-style: italic; }
.warn { color: var(--wrong); margin: 2px 0; }
.metrics { display: flex; gap: 18px; margin: 6px 0; }
.metric b { font-size: 20px; }
.tables { display: flex; gap: 24px; flex-wrap: wrap; align-items: flex-start; }
table { border-collapse: collapse; }
caption { text-align: left; font-weight: 600; color: #444; white-space: nowrap; }
td, th { padding: 1px 6px; text-align: left; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
table.types { max-height: 180px; display: block; overflow-y: auto; }
td.bar { width: 80px; }
td.bar i { display: block; height: 8px; background: #7a9cc6; }
#filters { display: flex; gap: 16px; align-items: center; flex-wrap: wrap; }
#count { color: #555; margin-left: auto; }
main { padding: 12px 20px; display: grid; gap: 12px; }
article.ex { display: grid; grid-template-columns: auto 1fr; gap: 14px; background: #fff; padding: 10px;
             border: 1px solid var(--line); border-left: 6px solid var(--right); }
article.wrong { border-left-color: var(--wrong); }
article.partial { border-left-color: var(--partial); }
.imgs { display: flex; gap: 8px; min-width: 480px; }
figure { margin: 0; }
figure img { display: block; max-width: 480px; max-height: 480px; }
.pair figure img { max-width: 360px; max-height: 360px; }
figcaption { color: #777; font-size: 12px; }
.noimg { width: 240px; height: 160px; display: flex; align-items: center; justify-content: center;
         background: #eee; color: #777; text-align: center; padding: 6px; box-sizing: border-box; }
.text { font-size: 17px; margin: 0 0 4px; }
.verdict { margin: 0 0 8px; color: #555; }
.tag { font-weight: 700; color: var(--right); }
.wrong .tag { color: var(--wrong); }
.partial .tag { color: var(--partial); }
.cols { display: flex; gap: 28px; align-items: flex-start; }
tr.hit td { font-weight: 700; color: var(--right); }
"""

_SCRIPT = """
(function () {
  var examples = Array.prototype.slice.call(document.querySelectorAll('article.ex'));
  var wrong = document.getElementById('f-wrong');
  var search = document.getElementById('f-q');
  var selects = Array.prototype.slice.call(document.querySelectorAll('select[data-field]'));
  var count = document.getElementById('count');

  function apply() {
    var q = search.value.trim().toLowerCase();
    var shown = 0;
    examples.forEach(function (el) {
      var ok = !(wrong.checked && el.getAttribute('data-right') === '1');
      selects.forEach(function (s) {
        if (s.value !== '' && el.getAttribute(s.getAttribute('data-attr')) !== s.value) { ok = false; }
      });
      if (q && el.getAttribute('data-search').indexOf(q) < 0) { ok = false; }
      if (ok) { el.removeAttribute('hidden'); shown++; } else { el.setAttribute('hidden', ''); }
    });
    count.textContent = 'showing ' + shown + ' of ' + examples.length;
  }

  function toHash() {
    var parts = [];
    if (wrong.checked) { parts.push('wrong=1'); }
    selects.forEach(function (s) {
      if (s.value !== '') { parts.push(s.getAttribute('data-field') + '=' + encodeURIComponent(s.value)); }
    });
    if (search.value) { parts.push('q=' + encodeURIComponent(search.value)); }
    history.replaceState(null, '', parts.length ? '#' + parts.join('&') : location.pathname + location.search);
  }

  function fromHash() {
    var state = {};
    location.hash.replace(/^#/, '').split('&').forEach(function (kv) {
      var i = kv.indexOf('=');
      if (i > 0) { state[decodeURIComponent(kv.slice(0, i))] = decodeURIComponent(kv.slice(i + 1)); }
    });
    wrong.checked = state.wrong === '1';
    search.value = state.q || '';
    selects.forEach(function (s) {
      var v = state[s.getAttribute('data-field')] || '';
      // a value no shown example has still filters (to none), rather than being ignored
      if (v !== '' && !Array.prototype.some.call(s.options, function (o) { return o.value === v; })) {
        var o = document.createElement('option');
        o.value = v;
        o.textContent = v;
        s.appendChild(o);
      }
      s.value = v;
    });
    apply();
  }

  [wrong].concat(selects).forEach(function (el) { el.addEventListener('change', function () { apply(); toHash(); }); });
  search.addEventListener('input', function () { apply(); toHash(); });
  window.addEventListener('hashchange', fromHash);
  fromHash();
})();
"""


def render_page(summary: Summary, records: Sequence[GalleryRecord], views: Sequence[Sequence[ImageView]], *,
                title: str, lines: Sequence[str] = (), warnings: Sequence[str] = ()) -> str:
    """The page's HTML: `summary` at the top, then the shown `records` with the `views` of their images
    (one list per record, in its image order); `lines` and `warnings` are said under the title."""
    fields = list(records[0].types) if records else list(summary.by_type)
    head = "".join(f'<p class="meta">{escape(line)}</p>' for line in lines)
    head += "".join(f'<p class="warn">{escape(w)}</p>' for w in warnings)
    body = "\n".join(_example_html(r, v) for r, v in zip(records, views))
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="generator" content="{GENERATOR}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{escape(title)}</title>'
            f'<style>{_STYLE}</style></head>\n<body><header><h1>{escape(title)}</h1>{head}'
            f'<section class="summary">{_summary_html(summary)}</section></header>\n'
            f'<nav>{_filters_html(records, fields)}</nav>\n'
            f'<main id="examples">\n{body}\n</main>\n<script>{_SCRIPT}</script></body></html>\n')
