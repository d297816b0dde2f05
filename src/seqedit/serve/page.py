"""The page at ``/``: one server-rendered HTML document (no build step, no external assets) showing the
facts in force (paged, searchable: it stays usable with 100,000 of them), the steps and the queue, with
forms to submit and withdraw facts and a "try it" panel that asks the live model, bare or through the
chat template, so a user sees an edit take effect. It holds no data
itself: its script calls the same ``/v1`` API with the token the user enters (kept in the tab's
``sessionStorage``), so the page has exactly the rights of that token. Data is inserted as text
(``textContent``), never as HTML."""

from __future__ import annotations

import html

__all__ = ["render_page"]

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5rem;color:#1d2330;background:#f7f8fa}
h1{font-size:1.3rem;margin:0 0 .2rem}h2{font-size:1.05rem;margin:1.2rem 0 .4rem}
.muted{color:#667}.row{display:flex;gap:1.5rem;flex-wrap:wrap}.card{background:#fff;border:1px solid #dde;
border-radius:6px;padding:.8rem 1rem;flex:1 1 28rem}table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:.25rem .4rem;border-bottom:1px solid #eef;vertical-align:top}
input{padding:.3rem;border:1px solid #bbc;border-radius:4px;width:100%;box-sizing:border-box}
label{display:block;margin:.3rem 0}button{padding:.3rem .8rem;border-radius:4px;border:1px solid #557;
background:#eef;cursor:pointer}#msg{min-height:1.2rem;color:#176b2c}#msg.bad{color:#a22}.state-applied{color:#176b2c}
.state-rejected{color:#a22}.state-queued{color:#8a6500}
"""

_SCRIPT = """
const $ = (id) => document.getElementById(id);
const PAGE = 50;
const token = () => sessionStorage.getItem('seqedit-token') || '';
async function api(method, path, body) {
  const headers = {'Content-Type': 'application/json'};
  if (token()) headers['Authorization'] = 'Bearer ' + token();
  const r = await fetch(path, {method, headers, body: body === undefined ? undefined : JSON.stringify(body)});
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error((data.error && data.error.message) || ('HTTP ' + r.status));
  return data;
}
function cell(tr, text, cls) { const td = document.createElement('td'); td.textContent = text ?? ''; if (cls) td.className = cls; tr.appendChild(td); return td; }
function button(td, label, testid, onclick) { const b = document.createElement('button'); b.textContent = label; b.dataset.testid = testid; b.onclick = onclick; td.appendChild(b); }
function fill(id, rows, make) { const tb = $(id); tb.replaceChildren(); for (const r of rows) { const tr = document.createElement('tr'); make(tr, r); tb.appendChild(tr); } }
function say(text, bad) { $('msg').textContent = text; $('msg').className = bad ? 'bad' : ''; }
async function refresh() {
  try {
    const query = $('fact-search').value.trim();
    const factsPath = '/v1/facts?limit=' + PAGE + '&offset=' + offset + (query ? '&q=' + encodeURIComponent(query) : '');
    const [facts, log, edits] = await Promise.all([api('GET', factsPath), api('GET', '/v1/log?limit=20'), api('GET', '/v1/edits?limit=20')]);
    if (offset && offset >= facts.total) { offset = Math.max(0, facts.total - PAGE); return refresh(); }
    if (!query) $('nfacts').textContent = facts.total;  // the header counts all facts, not the matches
    $('laststep').textContent = log.last_step;
    $('facts-range').textContent = facts.total ? (offset + 1) + '–' + (offset + facts.facts.length) + ' of ' + facts.total + (query ? ' matching' : '') : (query ? 'no match' : 'none');
    $('facts-prev').disabled = offset === 0; $('facts-next').disabled = offset + PAGE >= facts.total;
    $('queued').textContent = edits.counts.queued;
    fill('facts', facts.facts, (tr, f) => {
      tr.dataset.factId = f.id; cell(tr, f.id); cell(tr, f.prompt.replace('{}', f.subject)); cell(tr, f.target); cell(tr, f.step);
      button(cell(tr, ''), 'withdraw', 'withdraw-' + f.id, async () => {
        try { const s = await api('DELETE', '/v1/facts/' + encodeURIComponent(f.id)); say('forgot ' + f.id + ' (step ' + s.id + ')'); } catch (e) { say(e.message, true); }
        refresh();
      });
    });
    fill('steps', log.steps, (tr, s) => {
      cell(tr, s.id); cell(tr, s.kind + (s.target ? ' of ' + s.target : '')); cell(tr, '+' + s.added.length + ' / −' + s.removed.length);
      cell(tr, s.undone_by ? 'undone by ' + s.undone_by : '');
      button(cell(tr, ''), 'undo', 'undo-' + s.id, async () => {
        try { const u = await api('POST', '/v1/steps/' + s.id + '/undo'); say('step ' + u.id + ' undoes step ' + s.id); } catch (e) { say(e.message, true); }
        refresh();
      });
    });
    fill('edits', edits.edits, (tr, e) => {
      tr.dataset.editId = e.id; cell(tr, e.id); cell(tr, e.fact_id); cell(tr, e.state, 'state-' + e.state); cell(tr, e.step ?? ''); cell(tr, e.reason ?? '');
    });
    $('status').textContent = 'connected';
  } catch (e) { $('status').textContent = e.message; }
}
$('token-form').onsubmit = (ev) => { ev.preventDefault(); sessionStorage.setItem('seqedit-token', $('token').value.trim()); $('token').value = ''; refresh(); };
$('fact-form').onsubmit = async (ev) => {
  ev.preventDefault();
  const fact = {prompt: $('prompt').value, subject: $('subject').value, target: $('target').value};
  if ($('fact-id').value.trim()) fact.id = $('fact-id').value.trim();
  try { const r = await api('POST', '/v1/edits', fact); say('queued ' + r.edits[0].id + ' (fact ' + r.edits[0].fact_id + ')'); ev.target.reset(); }
  catch (e) { say(e.message, true); }
  refresh();
};
let offset = 0;
$('facts-prev').onclick = () => { offset = Math.max(0, offset - PAGE); refresh(); };
$('facts-next').onclick = () => { offset += PAGE; refresh(); };
$('fact-search').oninput = () => { offset = 0; refresh(); };
$('try-form').onsubmit = async (ev) => {
  ev.preventDefault();
  const text = $('try-text').value, chat = $('try-chat').checked, ask = {max_tokens: 16, temperature: 0};
  $('try-answer').textContent = '…';
  try {
    const r = chat ? await api('POST', '/v1/chat/completions', {...ask, messages: [{role: 'user', content: text}]})
                   : await api('POST', '/v1/completions', {...ask, prompt: text});
    $('try-answer').textContent = chat ? r.choices[0].message.content : r.choices[0].text;
    $('try-step').textContent = 'answered at step ' + $('laststep').textContent;
  } catch (e) { $('try-answer').textContent = ''; say(e.message, true); }
};
refresh(); setInterval(refresh, 1000);
"""


def render_page(model_id: str) -> str:
    """The whole page as one HTML string."""
    model = html.escape(model_id)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>seqedit serve · {model}</title><style>{_STYLE}</style></head>
<body>
<h1>seqedit serve</h1>
<div class="muted">model <b>{model}</b> · step <b id="laststep">–</b> · <b id="nfacts">–</b> facts in force ·
<b id="queued">–</b> queued · <span id="status">connecting…</span></div>
<form id="token-form" class="muted" style="margin:.6rem 0;max-width:28rem">
<label>API token (kept in this tab only) <input id="token" type="password" autocomplete="off"></label>
<button type="submit">use token</button></form>
<div id="msg" role="status"></div>
<div class="row">
<div class="card"><h2>Submit a fact</h2>
<form id="fact-form">
<label>Subject <input id="subject" required placeholder="Danielle Darrieux"></label>
<label>Prompt (<code>{{}}</code> marks the subject) <input id="prompt" required placeholder="The mother tongue of {{}} is"></label>
<label>Target <input id="target" required placeholder="English"></label>
<label>Fact id (optional) <input id="fact-id"></label>
<button type="submit" data-testid="submit">submit</button></form></div>
<div class="card"><h2>Try it</h2>
<form id="try-form">
<label>Ask the served model <input id="try-text" required placeholder="The mother tongue of Danielle Darrieux is"></label>
<label style="display:inline"><input id="try-chat" type="checkbox" style="width:auto"> through the chat template
(ask a question: "… is what?")</label>
<button type="submit" data-testid="ask">ask</button></form>
<p><b>answer</b> <span class="muted" id="try-step"></span></p><pre id="try-answer" data-testid="answer"
style="white-space:pre-wrap;background:#f3f4f8;padding:.5rem;border-radius:4px;min-height:1.4rem"></pre></div>
<div class="card"><h2>Queue (latest edits)</h2>
<table><thead><tr><th>edit</th><th>fact</th><th>state</th><th>step</th><th>reason</th></tr></thead><tbody id="edits"></tbody></table></div>
</div>
<div class="row">
<div class="card"><h2>Facts in force</h2>
<div style="display:flex;gap:.5rem;align-items:center;margin-bottom:.4rem">
<input id="fact-search" type="search" placeholder="search id, subject, target, text" style="flex:1">
<button id="facts-prev" type="button">‹ prev</button><span id="facts-range" class="muted">–</span>
<button id="facts-next" type="button">next ›</button></div>
<table><thead><tr><th>id</th><th>text</th><th>target</th><th>step</th><th></th></tr></thead><tbody id="facts"></tbody></table></div>
<div class="card"><h2>Steps (latest first)</h2>
<table><thead><tr><th>step</th><th>kind</th><th>facts</th><th></th><th></th></tr></thead><tbody id="steps"></tbody></table></div>
</div>
<script>{_SCRIPT}</script>
</body></html>
"""
