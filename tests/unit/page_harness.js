// A minimal DOM and fetch for the page's script (tests/unit/test_serve_facts.py runs it with node when no
// browser is installed): elements by id, tables of rows, and an API answered from a JSON fixture.
const fs = require('fs');
const [script, fixture] = [fs.readFileSync(process.argv[2], 'utf8'), JSON.parse(fs.readFileSync(process.argv[3], 'utf8'))];
class El {
  constructor(tag) { this.tag = tag; this.children = []; this.dataset = {}; this.textContent = ''; this.value = ''; this.checked = false; this.disabled = false; }
  appendChild(c) { this.children.push(c); return c; }
  replaceChildren() { this.children = []; }
  reset() {}
}
const els = {};
const $$ = (id) => document.getElementById(id);
global.document = {
  getElementById: (id) => (els[id] = els[id] || new El('#' + id)),
  createElement: (tag) => new El(tag),
};
const store = {};
global.sessionStorage = {getItem: (k) => store[k] ?? null, setItem: (k, v) => { store[k] = v; }};
const calls = [];
global.fetch = async (path, init) => {
  calls.push([init.method, path, init.body ? JSON.parse(init.body) : null]);
  const route = path.split('?')[0];
  let body = fixture[init.method + ' ' + route];
  if (route === '/v1/facts') {
    const q = new URLSearchParams(path.split('?')[1]);
    const all = fixture.facts.filter((f) => !q.get('q') || (f.id + f.subject + f.target).toLowerCase().includes(q.get('q').toLowerCase()));
    const off = +q.get('offset'), lim = +q.get('limit');
    body = {total: all.length, offset: off, limit: lim, facts: all.slice(off, off + lim)};
  }
  return {ok: true, status: 200, json: async () => body};
};
global.setInterval = () => 0;
eval(script);
const tick = () => new Promise((r) => setTimeout(r, 20));
(async () => {
  const out = {};
  await tick();
  out.range0 = $$('facts-range').textContent; out.rows0 = $$('facts').children.length;
  out.prev0 = $$('facts-prev').disabled; out.next0 = $$('facts-next').disabled;
  $$('facts-next').onclick(); await tick();
  out.range1 = $$('facts-range').textContent; out.first1 = $$('facts').children[0].dataset.factId;
  $$('fact-search').value = 'Place 7'; $$('fact-search').oninput(); await tick();
  out.range2 = $$('facts-range').textContent; out.nfacts2 = $$('nfacts').textContent;
  $$('try-text').value = 'Place 7 is located in';
  await $$('try-form').onsubmit({preventDefault() {}}); out.bare = $$('try-answer').textContent;
  $$('try-chat').checked = true; $$('try-text').value = 'Place 7 is located in what?';
  await $$('try-form').onsubmit({preventDefault() {}}); out.chat = $$('try-answer').textContent;
  out.calls = calls.filter((c) => c[0] === 'POST');
  console.log(JSON.stringify(out));
})();
