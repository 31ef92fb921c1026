"""The gallery page: records -> one self-contained index.html (plain Python, every text html-escaped).

Self-contained: the style sheet and the filter script are inline, the pictures are relative paths into assets/
beside the page, nothing is fetched from the network (the page holds no http(s) reference), so the folder can be
copied anywhere or opened from a cluster's file system.

One card per image (per image pair for NLVR2) holds all the shown examples on it, each an `<article class="ex">`
with its own picture of the image(s), its strongest boxes drawn (`lxm.gallery.assets`; their labels also in the
picture's alt text), its text (with relevance, each word highlighted by its share, as `lxm ask --explain`'s title),
and its verdict: right (score 100), partly right (0 < score < 100: VQA's soft credit) or
wrong (score 0), its score and the score each prediction would get, all in percent as the summary's accuracy (the
mean score). The layout reflows down to a phone's width (flex-wrap, images at most their box's width).

Text from the data (questions, answers, labels, ids, type values) is html-escaped and isolated in `<bdi>`, so a
bidi control character in it (U+202E RIGHT-TO-LEFT OVERRIDE) reorders only itself, never the page around it;
where no element can go (the title, select options, alt text) such characters are shown as `<U+202E>`.

The filters are plain JavaScript: verdict, one select per type field, a text search, and the order (the dataset's,
the most confident predictions first, or the least confident first); an example filtered out gets the `hidden`
attribute, and a card with no example left is hidden. The state is mirrored in the URL hash
(`index.html#verdict=wrong&answer_type=yes/no&q=color&sort=confident`; `#wrong=1` = `#verdict=wrong`) and read
from it on load, so a filtered view can be linked to (and is what the browser test opens).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from urllib.parse import quote

from lxm.gallery.records import BUCKETS, GalleryRecord, Summary, field_label

GENERATOR = "lxm gallery"  # <meta name="generator">: how a later run recognises a folder it may replace
SORTS = {"dataset": "dataset order", "confident": "most confident first", "unsure": "least confident first"}
# the Unicode bidi controls (embeddings, overrides, isolates, marks): what could reorder text around them
_BIDI = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


@dataclass
class ImageView:
    """One image of a shown example."""

    img_id: str
    src: str | None  # path of the asset relative to the page; None = not drawn
    note: str | None = None  # why not ("image not found", the decoding error)
    labels: tuple[str, ...] = ()  # the labels of the boxes drawn, most attended first ("attribute object weight")


def _attr(field: str) -> str:
    return "data-" + field.replace("_", "-").lower()


def _num(x: float) -> str:
    return f"{x:.2f}".rstrip("0").rstrip(".") if x != int(x) else str(int(x))


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{_num(x)}%"


def _t(text: object) -> str:
    """Data text as element content: escaped and bidi-isolated."""
    return f"<bdi>{escape(str(text))}</bdi>"


def visible_controls(text: object) -> str:
    """`text` with its bidi control characters written out (`<U+202E>`), for places that cannot isolate them."""
    return _BIDI.sub(lambda m: f"<U+{ord(m.group()):04X}>", str(text))


def _plain(text: object) -> str:
    return escape(visible_controls(text))


def _summary_html(summary: Summary) -> str:
    metrics = " ".join(f'<span class="metric"><b>{_pct(v)}</b> {escape(k)}</span>'
                       for k, v in summary.metrics.items())
    counts = [(summary.right, "right", "score 100")]
    if summary.partial or summary.partial_credit:
        counts.append((summary.partial, "partial", "0 &lt; score &lt; 100"))
    counts.append((summary.wrong, "wrong", "score 0"))
    buckets = " · ".join(f'<span class="b-{b}"><b>{n}</b> {BUCKETS[b]}</span> ({why})' for n, b, why in counts)
    parts = [f'<div class="metrics">{metrics}</div>',
             f'<p class="buckets">{buckets} of <b>{summary.examples}</b> examples; the {escape(summary.metric)} is '
             f'their mean score.</p>']
    tables = []
    for name, rows in summary.by_type.items():
        body = "".join(
            f'<tr><td><a href="#{quote(name)}={quote(r.value, safe="")}">{_t(r.value)}</a></td>'
            f'<td class="n">{r.count}</td><td class="n">{_pct(r.score)}</td>'
            f'<td class="bar"><i style="width:{max(0.0, min(100.0, r.score)):.1f}%"></i></td></tr>' for r in rows)
        tables.append(f'<table class="types"><caption>{escape(field_label(name))}</caption><thead><tr><th>value</th>'
                      f'<th class="n">n</th><th class="n">{escape(summary.metric)}</th><th></th></tr></thead>'
                      f'<tbody>{body}</tbody></table>')
    if summary.by_label:
        body = "".join(f'<tr><td>{_t(r.label)}</td><td class="n">{r.support}</td><td class="n">{r.predicted}</td>'
                       f'<td class="n">{_pct(r.precision)}</td><td class="n">{_pct(r.recall)}</td></tr>'
                       for r in summary.by_label)
        tables.append('<table class="types labels"><caption>per label</caption><thead><tr><th>label</th>'
                      '<th class="n">true</th><th class="n">predicted</th><th class="n">precision</th>'
                      f'<th class="n">recall</th></tr></thead><tbody>{body}</tbody></table>')
    if tables:
        parts.append(f'<div class="tables">{"".join(tables)}</div>')
    parts.extend(f'<p class="note">{_plain(n)}</p>' for n in summary.notes)
    return "".join(parts)


def _filters_html(records: Sequence[GalleryRecord], fields: Sequence[str], cards: int) -> str:
    verdicts = "".join(f'<option value="{b}">{escape(label)}</option>' for b, label in BUCKETS.items())
    selects = []
    for name in fields:
        values = sorted({r.types[name] for r in records})
        options = "".join(f'<option value="{escape(v)}">{_plain(v)}</option>' for v in values)
        selects.append(f'<label>{escape(field_label(name))} <select data-field="{escape(name)}" '
                       f'data-attr="{escape(_attr(name))}"><option value="">all</option>{options}</select></label>')
    sorts = "".join(f'<option value="{k}">{escape(v)}</option>' for k, v in SORTS.items())
    return ('<form id="filters" onsubmit="return false"><label>verdict <select id="f-verdict"><option value="">all'
            f'</option>{verdicts}</select></label>{"".join(selects)}<label>search <input type="search" id="f-q" '
            f'placeholder="text, id, answer"></label><label>order <select id="f-sort">{sorts}</select></label>'
            f'<span id="count">showing {len(records)} of {len(records)} examples on {cards} of {cards} '
            f'cards</span></form>')


def _figure_html(v: ImageView) -> str:
    if v.src is not None:
        alt = f"{v.img_id}; most attended boxes: {', '.join(v.labels)}" if v.labels else v.img_id
        inner = f'<a href="{escape(v.src)}"><img src="{escape(v.src)}" alt="{_plain(alt)}" loading="lazy"></a>'
    else:
        inner = f'<div class="noimg">{_t(v.note or "image not found")}</div>'
    return f'<figure>{inner}<figcaption>{_t(v.img_id)}</figcaption></figure>'


def _example_html(rec: GalleryRecord, order: int, views: Sequence[ImageView]) -> str:
    truth = dict(rec.truth)
    truth_rows = "".join(f'<tr><td>{_t(a)}</td><td class="n">{_pct(100 * s)}</td></tr>' for a, s in rec.truth)
    top_rows = "".join(
        f'<tr class="{"hit" if a in truth else ""}"><td class="n">{k + 1}</td><td>{_t(a)}</td>'
        f'<td class="n">{p:.3f}</td><td class="bar"><i style="width:{100 * p:.1f}%"></i></td>'
        f'<td class="n">{_pct(100 * truth.get(a, 0.0))}</td></tr>'
        for k, (a, p) in enumerate(rec.top))
    types = "".join(f' · {escape(field_label(k))}: <b>{_t(v)}</b>' for k, v in rec.types.items())
    data = "".join(f' {_attr(k)}="{escape(v)}"' for k, v in rec.types.items())
    search = " ".join([rec.text, str(rec.id), *rec.types.values(), *(a for a, _ in rec.truth),
                       *(a for a, _ in rec.top), *rec.images]).lower()
    return (f'<article class="ex {rec.bucket}" data-bucket="{rec.bucket}" data-id="{escape(str(rec.id))}" '
            f'data-conf="{rec.confidence:.6f}" data-order="{order}"{data} data-search="{escape(search)}">'
            f'<div class="imgs{" pair" if len(views) > 1 else ""}">{"".join(_figure_html(v) for v in views)}</div>'
            f'<div class="about"><p class="text">{_text_html(rec)}</p>'
            f'<p class="verdict"><span class="tag">{BUCKETS[rec.bucket]}</span> · '
            f'id <code>{_t(rec.id)}</code> · score <b class="score">{_pct(rec.score)}</b> · confidence '
            f'<span class="conf">{rec.confidence:.3f}</span>{types}</p><div class="cols"><table class="truth"><caption>'
            f'ground truth</caption><thead><tr><th>answer</th><th class="n">score</th></tr></thead>{truth_rows}'
            f'</table><table class="top"><caption>predictions</caption><thead><tr><th class="n">#</th><th>answer'
            f'</th><th class="n">prob.</th><th></th><th class="n">score</th></tr></thead>{top_rows}</table></div>'
            f'</div></article>')


def _text_html(rec: GalleryRecord) -> str:
    """The example's text; with relevance shares (`rec.words`), each word on a highlight as strong as its share
    relative to the largest (the colour of `lxm ask --explain`'s title band), its share in the tooltip."""
    if not rec.words:
        return _t(rec.text)
    top = max(share for _, share in rec.words) or 1.0
    marks = " ".join(f'<mark style="background:rgba(255,200,0,{share / top:.2f})" title="share {share:.3f}">'
                     f'{_t(word)}</mark>' for word, share in rec.words)
    return f"<bdi>{marks}</bdi>"  # the sentence keeps its own direction (an Arabic one right to left), as _t gives


def group_by_image(records: Sequence[GalleryRecord]) -> list[list[int]]:
    """Indices of `records` per image (per image tuple), cards in the order of their first example."""
    cards: dict[tuple[str, ...], list[int]] = {}
    for n, r in enumerate(records):
        cards.setdefault(tuple(r.images), []).append(n)
    return list(cards.values())


def _card_html(records: Sequence[GalleryRecord], views: Sequence[Sequence[ImageView]],
               members: Sequence[int]) -> str:
    examples = "".join(_example_html(records[n], n, views[n]) for n in members)
    return f'<section class="card"><div class="qs">{examples}</div></section>'


_STYLE = """
:root { --right: #2e7d32; --wrong: #c62828; --partial: #ef8f00; --line: #ddd; }
[hidden] { display: none !important; }
* { box-sizing: border-box; }
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #222; background: #f6f6f4; }
header { background: #fff; padding: 12px 20px 4px; }
nav { background: #fff; border-bottom: 1px solid var(--line); padding: 6px 20px; position: sticky; top: 0; z-index: 1; }
h1 { font-size: 18px; margin: 0 0 4px; }
h1, .meta, .warn, .note, .text, td, code, figcaption, .verdict { overflow-wrap: anywhere; }
.meta, .note { color: #555; margin: 2px 0; }
.note { font-style: italic; }
.warn { color: var(--wrong); margin: 2px 0; }
.metrics { display: flex; flex-wrap: wrap; gap: 4px 18px; margin: 6px 0 0; }
.metric b { font-size: 20px; }
.buckets { margin: 2px 0 6px; color: #555; }
.b-right b { color: var(--right); } .b-partial b { color: var(--partial); } .b-wrong b { color: var(--wrong); }
.tables { display: flex; gap: 12px 24px; flex-wrap: wrap; align-items: flex-start; }
table { border-collapse: collapse; }
caption { text-align: left; font-weight: 600; color: #444; }
td, th { padding: 1px 6px; text-align: left; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
table.types { max-height: 180px; max-width: 100%; display: block; overflow: auto; }
td.bar { width: 80px; min-width: 40px; }
td.bar i { display: block; height: 8px; background: #7a9cc6; }
#filters { display: flex; gap: 6px 16px; align-items: center; flex-wrap: wrap; }
#filters select, #filters input { max-width: 100%; }
#filters label { max-width: 100%; }
#count { color: #555; margin-left: auto; }
main { padding: 12px 20px; display: grid; grid-template-columns: minmax(0, 1fr); gap: 12px; }
section.card { display: flex; flex-wrap: wrap; gap: 12px 16px; background: #fff; padding: 10px;
               border: 1px solid var(--line); min-width: 0; }
.imgs { display: flex; gap: 8px; flex: 0 1 480px; max-width: 100%; min-width: 0; align-items: flex-start; }
.imgs.pair { flex-basis: 728px; }
figure { margin: 0; min-width: 0; }
.pair figure { flex: 1 1 0; }
figure img { display: block; max-width: 100%; height: auto; }
.pair figure img { max-height: 360px; }
figcaption { color: #777; font-size: 12px; }
.noimg { width: 240px; max-width: 100%; min-height: 120px; display: flex; align-items: center;
         justify-content: center; background: #eee; color: #777; text-align: center; padding: 6px; }
.qs { flex: 1 1 100%; min-width: 0; display: grid; grid-template-columns: minmax(0, 1fr); gap: 10px; }
article.ex { border-left: 6px solid var(--right); padding: 2px 0 4px 10px; min-width: 0; display: flex;
             flex-wrap: wrap; gap: 6px 16px; align-items: flex-start; }
.about { flex: 1 1 340px; min-width: 0; }
article.wrong { border-left-color: var(--wrong); }
article.partial { border-left-color: var(--partial); }
.text { font-size: 17px; margin: 0 0 2px; }
.text mark { color: inherit; padding: 0 1px; border-radius: 2px; }
.verdict { margin: 0 0 6px; color: #555; }
.tag { font-weight: 700; color: var(--right); }
.wrong .tag { color: var(--wrong); }
.partial .tag { color: var(--partial); }
.cols { display: flex; flex-wrap: wrap; gap: 6px 28px; align-items: flex-start; }
.cols table { max-width: 100%; }
tr.hit td { font-weight: 700; color: var(--right); }
@media (max-width: 600px) {
  header, nav, main { padding-left: 8px; padding-right: 8px; }
  nav { position: static; }  /* the filters would cover a third of a phone's screen */
  section.card { padding: 8px; }
}
"""

_SCRIPT = """
(function () {
  var main = document.getElementById('examples');
  var cards = Array.prototype.slice.call(document.querySelectorAll('section.card'));
  var examples = Array.prototype.slice.call(document.querySelectorAll('article.ex'));
  var verdict = document.getElementById('f-verdict');
  var sort = document.getElementById('f-sort');
  var search = document.getElementById('f-q');
  var selects = Array.prototype.slice.call(document.querySelectorAll('select[data-field]'));
  var count = document.getElementById('count');

  function key(el) {
    var conf = parseFloat(el.getAttribute('data-conf'));
    if (sort.value === 'confident') { return -conf; }
    if (sort.value === 'unsure') { return conf; }
    return parseInt(el.getAttribute('data-order'), 10);
  }
  function byKey(a, b) { return a.k - b.k || a.o - b.o; }

  function apply() {
    var q = search.value.trim().toLowerCase();
    var shown = 0, shownCards = 0;
    examples.forEach(function (el) {
      var ok = verdict.value === '' || el.getAttribute('data-bucket') === verdict.value;
      selects.forEach(function (s) {
        if (s.value !== '' && el.getAttribute(s.getAttribute('data-attr')) !== s.value) { ok = false; }
      });
      if (q && el.getAttribute('data-search').indexOf(q) < 0) { ok = false; }
      if (ok) { el.removeAttribute('hidden'); shown++; } else { el.setAttribute('hidden', ''); }
    });
    // order the examples inside each card, then the cards by their first shown example
    var keyed = cards.map(function (card, n) {
      var box = card.querySelector('.qs');
      var items = Array.prototype.slice.call(box.children).map(function (el) {
        return {el: el, k: key(el), o: parseInt(el.getAttribute('data-order'), 10)};
      });
      items.sort(byKey);
      items.forEach(function (it) { box.appendChild(it.el); });
      var visible = items.filter(function (it) { return !it.el.hasAttribute('hidden'); });
      if (visible.length) { card.removeAttribute('hidden'); shownCards++; } else { card.setAttribute('hidden', ''); }
      var first = visible.length ? visible[0] : items[0];
      return {el: card, k: first.k, o: first.o};
    });
    keyed.sort(byKey);
    keyed.forEach(function (it) { main.appendChild(it.el); });
    count.textContent = 'showing ' + shown + ' of ' + examples.length + ' examples on ' + shownCards + ' of ' +
      cards.length + ' cards';
  }

  function toHash() {
    var parts = [];
    if (verdict.value) { parts.push('verdict=' + verdict.value); }
    selects.forEach(function (s) {
      if (s.value !== '') { parts.push(s.getAttribute('data-field') + '=' + encodeURIComponent(s.value)); }
    });
    if (search.value) { parts.push('q=' + encodeURIComponent(search.value)); }
    if (sort.value !== 'dataset') { parts.push('sort=' + sort.value); }
    history.replaceState(null, '', parts.length ? '#' + parts.join('&') : location.pathname + location.search);
  }

  function setSelect(s, v) {
    // a value no shown example has still filters (to none), rather than being ignored
    if (v !== '' && !Array.prototype.some.call(s.options, function (o) { return o.value === v; })) {
      var o = document.createElement('option');
      o.value = v;
      o.textContent = v;
      s.appendChild(o);
    }
    s.value = v;
  }

  function fromHash() {
    var state = {};
    location.hash.replace(/^#/, '').split('&').forEach(function (kv) {
      var i = kv.indexOf('=');
      if (i > 0) { state[decodeURIComponent(kv.slice(0, i))] = decodeURIComponent(kv.slice(i + 1)); }
    });
    setSelect(verdict, state.verdict || (state.wrong === '1' ? 'wrong' : ''));
    sort.value = state.sort in {confident: 1, unsure: 1} ? state.sort : 'dataset';
    search.value = state.q || '';
    selects.forEach(function (s) { setSelect(s, state[s.getAttribute('data-field')] || ''); });
    apply();
  }

  [verdict, sort].concat(selects).forEach(function (el) {
    el.addEventListener('change', function () { apply(); toHash(); });
  });
  search.addEventListener('input', function () { apply(); toHash(); });
  window.addEventListener('hashchange', fromHash);
  fromHash();
})();
"""


def render_page(summary: Summary, records: Sequence[GalleryRecord], views: Sequence[Sequence[ImageView]], *,
                title: str, lines: Sequence[str] = (), warnings: Sequence[str] = ()) -> str:
    """The page's HTML: `summary` at the top, then one card per image (tuple) of the shown `records`, each record
    with the `views` of its images (one list per record, in its image order: its own pictures); `lines` and
    `warnings` are said under the title."""
    fields = list(records[0].types) if records else list(summary.by_type)
    head = "".join(f'<p class="meta">{_plain(line)}</p>' for line in lines)
    head += "".join(f'<p class="warn">{_plain(w)}</p>' for w in warnings)
    cards = group_by_image(records)
    body = "\n".join(_card_html(records, views, members) for members in cards)
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="generator" content="{GENERATOR}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{_plain(title)}</title>'
            f'<style>{_STYLE}</style></head>\n<body><header><h1>{_plain(title)}</h1>{head}'
            f'<section class="summary">{_summary_html(summary)}</section></header>\n'
            f'<nav>{_filters_html(records, fields, len(cards))}</nav>\n'
            f'<main id="examples">\n{body}\n</main>\n<script>{_SCRIPT}</script></body></html>\n')
