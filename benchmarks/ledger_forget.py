"""Ledger on the embedded SmolLM2-135M: edit 200 CounterFact facts, forget 50, undo the forget, reopen,
verify, export (full and delta) and compare logits. Prints a table and writes docs/ledger-forget.json.

    SEQEDIT_CACHE=/tmp/seqcache .venv/bin/python benchmarks/ledger_forget.py [--n 200] [--forget 50]

Efficacy is CounterFact's rewrite efficacy (``counterfact_metrics``: P(new) > P(true) on the edit prompt),
measured per record so the forgotten and the kept facts can be followed separately.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

import seqedit
from seqedit.evaluate.counterfact import counterfact_metrics
from seqedit.shared_data import counterfact_path

OUT = Path(__file__).resolve().parents[1] / "docs" / "ledger-forget.json"


def efficacy(lm, facts) -> dict[str, tuple[float, float]]:
    """Per fact id: (efficacy indicator, P(new) − P(true) geometric-mean margin) on the rewrite prompt."""
    bare = [dataclasses.replace(f, paraphrases=(), neighbors=()) for f in facts]
    res = counterfact_metrics(lm, bare)
    return {r.fact_id: (r.efficacy, r.rewrite_gm_prob_new_minus_true) for r in res.records}


def mean(scores: dict, ids, k: int = 0) -> float:
    return sum(scores[i][k] for i in ids) / len(ids)


@torch.no_grad()
def logits(model, tok, prompts) -> torch.Tensor:
    enc = tok(prompts, return_tensors="pt", padding=True)
    return model(**enc).logits.float()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--forget", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)  # the machine is shared
    t_all = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="seqedit-ledger-bench-"))
    ledger_dir = work / "ledger"
    lm = seqedit.load_model("smollm2-135m")
    facts = seqedit.load_facts(counterfact_path(), split="train", limit=args.n)
    ids = [f.id for f in facts]
    forgotten = sorted(random.Random(args.seed).sample(ids, args.forget))
    kept = [i for i in ids if i not in set(forgotten)]
    phases: dict[str, dict] = {}

    def measure(name: str, seconds: float | None = None) -> dict:
        sc = efficacy(lm, facts)
        phases[name] = {
            "efficacy_forgotten": mean(sc, forgotten), "efficacy_kept": mean(sc, kept),
            "margin_forgotten": mean(sc, forgotten, 1), "margin_kept": mean(sc, kept, 1),
            "per_fact": sc, "op_seconds": seconds,
        }
        return sc

    pre = measure("before edits")
    editor = seqedit.Editor(lm, ledger=ledger_dir)
    t = time.perf_counter()
    reports = editor.run(facts, batch_size=args.batch_size)
    post = measure(f"after {args.n} edits ({len(reports)} steps)", time.perf_counter() - t)
    v_edit = editor.verify()

    t = time.perf_counter()
    rec_forget = editor.forget(forgotten)
    forget_s = time.perf_counter() - t
    after_forget = measure(f"forget {args.forget}", forget_s)
    v_forget = editor.verify()

    t = time.perf_counter()
    rec_undo = editor.undo(rec_forget.id)
    undo_s = time.perf_counter() - t
    after_undo = measure("undo the forget", undo_s)
    v_undo = editor.verify()

    live = {l: editor.master[l].clone() for l in editor.hparams.layers}
    prompts = [f.text for f in facts[:16]]
    live_logits = logits(lm.model, lm.tokenizer, prompts)
    t = time.perf_counter()
    editor.export(work / "export")
    export_s = time.perf_counter() - t
    editor.export(work / "delta", delta=True)
    editor.export(work / "delta64", delta=True, delta_dtype="float64")
    editor.close()

    # reopen on a freshly loaded base model: no value optimisation, snapshot + replay
    t = time.perf_counter()
    base = seqedit.load_model("smollm2-135m")
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    reopened = seqedit.Editor(base, ledger=ledger_dir)
    reopen_s = time.perf_counter() - t
    reopen_bitwise = all(torch.equal(reopened.master[l], live[l]) for l in live)
    reopened.close()
    del base, reopened

    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(work / "export", dtype=torch.float32)
    full_diff = float((logits(exported, lm.tokenizer, prompts) - live_logits).abs().max())
    del exported
    delta_lm = seqedit.load_delta("smollm2-135m", work / "delta")
    delta_diff = float((logits(delta_lm.model, lm.tokenizer, prompts) - live_logits).abs().max())
    del delta_lm
    delta_lm = seqedit.load_delta("smollm2-135m", work / "delta64")
    delta64_diff = float((logits(delta_lm.model, lm.tokenizer, prompts) - live_logits).abs().max())
    del delta_lm

    def agree(a: dict, b: dict, group) -> float:
        return sum(a[i][0] == b[i][0] for i in group) / len(group)

    sizes = {p.name: p.stat().st_size for p in sorted(ledger_dir.rglob("*.safetensors"))}
    delta_bytes = (work / "delta" / "delta.safetensors").stat().st_size
    result = {
        "model": lm.name, "n_facts": args.n, "n_forgotten": args.forget, "batch_size": args.batch_size,
        "seed": args.seed, "method": editor.spec.label, "hparams": editor.hparams.to_dict(),
        "torch_threads": torch.get_num_threads(),
        "phases": {k: {kk: vv for kk, vv in v.items() if kk != "per_fact"} for k, v in phases.items()},
        "forgotten_back_to_pre_edit_agreement": agree(after_forget, pre, forgotten),
        "kept_unchanged_by_forget_agreement": agree(after_forget, post, kept),
        "forgotten_restored_by_undo_agreement": agree(after_undo, post, forgotten),
        "steps_seconds": [r.seconds for r in reports],
        "forget_step": rec_forget.to_dict(), "undo_step": rec_undo.to_dict(),
        "verify_rel_error": {
            "after_edits": {l: e["rel_error"] for l, e in v_edit.layers.items()},
            "after_forget": {l: e["rel_error"] for l, e in v_forget.layers.items()},
            "after_undo": {l: e["rel_error"] for l, e in v_undo.layers.items()},
        },
        "verify_ok": [v_edit.ok, v_forget.ok, v_undo.ok],
        "reopen_seconds": reopen_s, "base_load_seconds": load_s, "reopen_bitwise_equal": reopen_bitwise,
        "export_seconds": export_s,
        "exported_max_abs_logit_diff": full_diff, "delta_max_abs_logit_diff": delta_diff,
        "delta_float64_max_abs_logit_diff": delta64_diff,
        "ledger_file_bytes": sizes, "delta_file_bytes": delta_bytes,
        "total_seconds": time.perf_counter() - t_all,
    }
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)

    print(f"\nledger on {lm.name}: {args.n} CounterFact facts, forget {args.forget}, undo ({editor.spec.label})")
    print(f"{'phase':34s} {'eff. forgotten':>15s} {'eff. kept':>10s} {'margin forg.':>13s} {'margin kept':>12s} {'op s':>7s}")
    for name, p in result["phases"].items():
        op = "" if p["op_seconds"] is None else f"{p['op_seconds']:.1f}"
        print(f"{name:34s} {p['efficacy_forgotten']:15.3f} {p['efficacy_kept']:10.3f} "
              f"{p['margin_forgotten']:13.4f} {p['margin_kept']:12.4f} {op:>7s}")
    print(f"forgotten facts with pre-edit efficacy after forget: {result['forgotten_back_to_pre_edit_agreement']:.1%}; "
          f"kept facts unchanged: {result['kept_unchanged_by_forget_agreement']:.1%}; "
          f"forgotten restored by undo: {result['forgotten_restored_by_undo_agreement']:.1%}")
    worst = max(e for v in result["verify_rel_error"].values() for e in v.values())
    print(f"verify: ok={result['verify_ok']}, worst rel. error {worst:.2e}; reopen {reopen_s:.1f} s "
          f"(bitwise equal: {reopen_bitwise}); exported logits max |diff| {full_diff:.2e}, "
          f"delta {delta_diff:.2e} ({delta_bytes / 1e6:.1f} MB float32), float64 delta {delta64_diff:.2e}")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
