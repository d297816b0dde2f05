"""Subprocess for tests/unit/test_interrupts.py: an ``Editor.apply`` with a ledger that pauses at one point of
its step and tells the test so by creating MARKER; the test then sends SIGINT. ``values``: inside the
value optimisation (the first unembedding with gradients); ``layers``: in the
layer solves, after the first layer's Δ is written and before the next layer's keys are read. Prints one JSON line with what the interrupted editor saw, exits 130.

    python interrupt_worker.py LEDGER_DIR PHASE MARKER STEPS_BEFORE
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)
# a shell's background job starts with SIGINT ignored, and children inherit that: Python's own handler
# (KeyboardInterrupt) is what the test is about
signal.signal(signal.SIGINT, signal.default_int_handler)

from ledger_helpers import make_editor  # noqa: E402

from seqedit import Fact  # noqa: E402


def fact(i: int) -> Fact:
    return Fact(prompt="{} is located in", subject=f"Place {i}", target=f"Town {i}", id=f"f{i}")


def main() -> None:
    ledger, phase, marker, before = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
    editor = make_editor(ledger, n_context_templates=1)
    for i in range(before):
        editor.apply([fact(i)])
    live = {l: editor.master[l].clone() for l in editor.hparams.layers} if before else {}

    def pause() -> None:
        if not marker.exists():
            marker.write_text("paused")
            for _ in range(1200):  # 60 s at most: the test's SIGINT arrives long before
                time.sleep(0.05)

    def on_event(event) -> None:
        if phase == "layers" and event.phase.value == "layers" and event.advance:
            pause()

    def on_forward(_module, _args, _out) -> None:
        if phase == "values" and torch.is_grad_enabled():
            pause()

    # the unembedding of the scored positions: inside the value optimisation with gradients, whichever
    # path (the model's modules or the fused upper blocks) runs the blocks above the z-layer
    handle = editor.loaded.adapter.unembed.register_forward_hook(on_forward)
    try:
        editor.apply([fact(before)], progress=on_event)
    except KeyboardInterrupt:
        handle.remove()
        seen = {"interrupted": True, "dir_exists": Path(ledger).exists()}
        if before:  # the editor itself is still usable and agrees with its ledger
            seen |= {"last_step": editor.ledger.last_step, "verify_ok": editor.verify().ok,
                     "weights_restored": all(torch.equal(editor.master[l], W) for l, W in live.items()),
                     "in_force": [f.id for f in editor.facts_in_force()]}
        editor.close()
        print(json.dumps(seen), flush=True)
        sys.exit(130)
    print(json.dumps({"interrupted": False}), flush=True)


if __name__ == "__main__":
    main()
