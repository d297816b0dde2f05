"""Cache entries are built once when several processes (or threads) miss them at the same time."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from seqedit.locate import stats as stats_mod
from seqedit.locate import templates as templates_mod
from seqedit.locate.stats import layer_stats
from seqedit.locate.templates import context_templates
from seqedit.testing import tiny_model

# Each process announces itself, waits for the other, then asks for the same cache directory; the
# build is slow enough that without a lock both would run it.
_WORKER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from seqedit.models.embedded import ensure_cached_dir

    root, me, other = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    (root / f"ready-{me}").touch()
    deadline = time.time() + 60
    while not (root / f"ready-{other}").exists():
        if time.time() > deadline:
            sys.exit("the other process never started")
        time.sleep(0.01)

    def build(tmp: Path) -> None:
        with open(root / "builds.log", "a") as log:
            log.write(me + "\\n")
        time.sleep(1.5)
        (tmp / "data.txt").write_text("built by " + me)

    out = ensure_cached_dir(root / "models" / "m", build, {"format": 1})
    print((out / "data.txt").read_text())
    """
)


def test_two_processes_build_a_cache_dir_once(tmp_path: Path) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(tmp_path), me, other], stdout=subprocess.PIPE, text=True
        )
        for me, other in (("a", "b"), ("b", "a"))
    ]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    builders = (tmp_path / "builds.log").read_text().split()
    assert len(builders) == 1, f"both processes built the directory: {builders}"
    assert outs == [f"built by {builders[0]}"] * 2  # the waiter got the winner's directory


def _run_concurrently(fn, n: int = 2) -> list:
    results: list = [None] * n
    errors: list[BaseException] = []

    def call(i: int) -> None:
        try:
            results[i] = fn()
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    if errors:
        raise errors[0]
    return results


def test_concurrent_sigma0_requests_compute_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SEQEDIT_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The capital of Italy is Rome. Water boils at one hundred degrees.\n" * 20)
    lm = tiny_model("llama")
    passes: list[tuple[int, ...]] = []
    real = stats_mod.collect_stats

    def slow(loaded, layers, *args, **kwargs):
        passes.append(tuple(layers))
        time.sleep(0.5)  # long enough for the other request to miss the cache too
        return real(loaded, layers, *args, **kwargs)

    monkeypatch.setattr(stats_mod, "collect_stats", slow)
    a, b = _run_concurrently(lambda: layer_stats(lm, (1, 2), corpus, n_tokens=200, seq_len=32))
    assert passes == [(1, 2)]
    for layer in (1, 2):
        assert a[layer].count == b[layer].count and (a[layer].gram == b[layer].gram).all()


def test_concurrent_template_requests_sample_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEQEDIT_CACHE", str(tmp_path / "cache"))
    lm = tiny_model("gpt2")
    samples: list[int] = []
    real = templates_mod._sample

    def slow(*args, **kwargs):
        samples.append(1)
        time.sleep(0.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(templates_mod, "_sample", slow)
    a, b = _run_concurrently(lambda: context_templates(lm, n=2, length=4))
    assert len(samples) == 1 and a == b and len(a) == 3
