"""SIGINT during ``Editor.apply`` with a ledger, in a real subprocess, at two points of the step: in the
value optimisation and in the layer solves (after the first layer's Δ is written). The process stops
cleanly (KeyboardInterrupt, exit 130); the interrupted step is absent; the ledger verifies afterwards,
in the interrupted process and reopened by another; a first step interrupted leaves no directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ledger_helpers import make_editor

from seqedit.ledger import Ledger

HERE = Path(__file__).resolve().parent


def _interrupt(tmp_path: Path, phase: str, before: int) -> dict:
    marker = tmp_path / "paused"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent / "src"),
                                                           os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(HERE / "interrupt_worker.py"), str(tmp_path / "L"), phase,
                             str(marker), str(before)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            text=True)
    deadline = time.monotonic() + 240
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"the worker never paused (rc {proc.returncode}): {out}\n{err[-3000:]}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("phase", ["values", "layers"])
def test_sigint_in_a_later_step_leaves_the_step_absent_and_the_ledger_verified(tmp_path: Path, phase: str) -> None:
    seen = _interrupt(tmp_path, phase, before=1)
    assert seen == {"interrupted": True, "dir_exists": True, "last_step": 1, "verify_ok": True,
                    "weights_restored": True, "in_force": ["f0"]}
    with Ledger(tmp_path / "L") as L:
        assert L.last_step == 1 and [r.fact.id for r in L.in_force()] == ["f0"] and not L.check_files()
    ed = make_editor(tmp_path / "L", n_context_templates=1)  # reopened by another process's editor
    assert ed.verify().ok
    ed.close()


@pytest.mark.parametrize("phase", ["values", "layers"])
def test_sigint_in_a_first_step_leaves_no_ledger_behind(tmp_path: Path, phase: str) -> None:
    seen = _interrupt(tmp_path, phase, before=0)
    assert seen == {"interrupted": True, "dir_exists": False}
    assert not (tmp_path / "L").exists()
