"""Are old facts' z-layer targets still good on the edited model, and does the model still reach them?

For every fact in force in a ledger edited in the bare format (one key column per fact), by age group
(the order the facts are in force; a rekey keeps that order):

* **reached**: ``1 − ‖Z − H_now‖ / ‖Z − H_base‖``, the share of the distance from the unedited model's
  z-layer state to the fact's stored target ``Z`` that the edited model covers (``H``: the z-layer
  block output at the subject's last token of the bare prompt);
* **efficacy now**: the CounterFact efficacy test (``s(new) < s(true)``, mean NLL per target token) on
  the edited model as it is;
* **efficacy with Z**: the same test on the edited model with the z-layer output at the subject's last
  token replaced by ``Z``: whether the target, were it reached exactly, would still make the model say
  the new object now that every other position runs through the edited layers. A fact whose
  efficacy with ``Z`` has fallen has a stale target (its value was optimised on a model whose other
  positions have changed since); one that passes with ``Z`` but fails now is not reached.

    python benchmarks/target_staleness.py LEDGER [--groups 4] [--json OUT]

The model is the ledger's base model with the ledger's weights restored (``Editor.from_ledger``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from seqedit.editor import Editor
from seqedit.ledger.columns import column_groups, targets
from seqedit.locate.keys import ContextRows, KeyReader
from seqedit.locate.tokens import encode_prompt, pad_id_of, pad_right, target_ids
from seqedit.locate.trace import block_hidden, hooks


def z_states(editor: Editor, facts) -> torch.Tensor:
    """``H: [d, n]``, the z-layer block output at each fact's subject's last token (bare prompt)."""
    ctx = ContextRows.build(editor.loaded.tokenizer, facts, ["{}"], "bare", False)
    return KeyReader(editor.loaded, ctx, editor.hparams.key_batch_rows).read([], z_layer=editor.hparams.z_layer).z_hidden.double().cpu()


@torch.no_grad()
def efficacy(editor: Editor, facts, Z: torch.Tensor | None, batch: int = 32) -> torch.Tensor:
    """Per fact 1.0 when ``s(new) < s(true)`` on its rewrite prompt, with the z-layer state at the
    subject's last token set to ``Z[:, i]`` when ``Z`` is given."""
    lm, tok = editor.loaded, editor.loaded.tokenizer
    rows, where, spans = [], [], []
    for i, f in enumerate(facts):
        enc = encode_prompt(tok, "{}", f.prompt, f.subject)
        for target in (f.target, f.true_target):
            t = target_ids(tok, target)
            rows.append(list(enc.ids) + list(t))
            where.append((i, enc.subject_last))
            spans.append((len(enc.ids), t))
    nll = torch.empty(len(rows))
    block = lm.adapter.block(editor.hparams.z_layer)
    for lo in range(0, len(rows), batch):
        ids, mask = pad_right(rows[lo : lo + batch], pad_id_of(tok))
        part = where[lo : lo + batch]

        def inject(_m, _a, out, part=part):
            h = block_hidden(out)
            for b, (i, pos) in enumerate(part):
                h[b, pos] = Z[:, i].to(h.dtype)
            return out

        handles = [block.register_forward_hook(inject)] if Z is not None else []
        with hooks(handles):
            hidden = lm.model.base_model(input_ids=ids.to(lm.input_device), attention_mask=mask.to(lm.input_device)).last_hidden_state
        # the vocabulary is formed only where a target token is predicted
        r_idx = torch.tensor([b for b in range(ids.shape[0]) for _ in spans[lo + b][1]])
        p_idx = torch.tensor([spans[lo + b][0] - 1 + j for b in range(ids.shape[0]) for j in range(len(spans[lo + b][1]))])
        logp = torch.log_softmax(lm.adapter.unembed(hidden[r_idx, p_idx]).float(), -1).cpu()
        want = torch.tensor([tok_id for b in range(ids.shape[0]) for tok_id in spans[lo + b][1]])
        lp = logp[torch.arange(len(want)), want]
        for b, part_lp in enumerate(lp.split([len(spans[lo + b][1]) for b in range(ids.shape[0])])):
            nll[lo + b] = -part_lp.mean()
    pairs = nll.view(-1, 2)
    return (pairs[:, 0] < pairs[:, 1]).double()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ledger", type=Path)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    editor = Editor.from_ledger(a.ledger)
    L = editor.ledger
    rows = L.in_force()
    if [(fmt, w) for fmt, w, _, _ in column_groups(L, rows)] != [("bare", 1)]:
        sys.exit("target_staleness reads ledgers edited in the bare format with one key column per fact")
    facts = [r.fact for r in rows]
    Z, steps = targets(L, rows), L.last_step
    H_now = z_states(editor, facts)
    eff_now = efficacy(editor, facts, None)
    eff_z = efficacy(editor, facts, Z)
    for l in editor.hparams.layers:  # the unedited model's z-layer states
        editor.loaded.adapter.set_weight(l, editor.w0[l])
    H_base = z_states(editor, facts)
    eff_z_base = efficacy(editor, facts, Z)
    for l in editor.hparams.layers:
        editor.loaded.adapter.set_weight(l, editor.master[l])
    editor.close()
    reached = 1 - (Z - H_now).norm(dim=0) / (Z - H_base).norm(dim=0).clamp(min=1e-30)
    n, per = len(facts), -(-len(facts) // a.groups)
    out = {"ledger": str(a.ledger), "facts": n, "steps": steps, "groups": []}
    print(f"{'facts':>12} {'reached':>8} {'eff now':>8} {'eff with Z':>11} {'eff with Z, base':>17}")
    for lo in range(0, n, per):
        sl = slice(lo, min(lo + per, n))
        g = {"facts": [lo + 1, sl.stop], "reached_median": float(reached[sl].median()),
             "efficacy_now": float(eff_now[sl].mean()), "efficacy_with_z": float(eff_z[sl].mean()),
             "efficacy_with_z_on_base": float(eff_z_base[sl].mean())}
        out["groups"].append(g)
        print(f"{lo + 1:>5}–{sl.stop:<6} {g['reached_median']:8.3f} {100 * g['efficacy_now']:8.1f} "
              f"{100 * g['efficacy_with_z']:11.1f} {100 * g['efficacy_with_z_on_base']:17.1f}")
    if a.json is not None:
        a.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
