"""Real-hardware plumbing on CPU: accelerate-dispatched and offloaded models, bf16/fp16 models, the
float64 master, write refusals, solve devices, bounded-memory and data-parallel Σ₀, ``--dtype`` and
``--device-map``, and a structural check against stray device/dtype literals."""

from __future__ import annotations

import ast
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import cpu_offload, dispatch_model
from safetensors.torch import load_file
from typer.testing import CliRunner

from seqedit import Editor, Fact
from seqedit.bank import LayerBank, default_solve_device
from seqedit.errors import PlacementError
from seqedit.evaluate.config import EvalConfig, EvalSettingsError
from seqedit.locate import stats as stats_mod
from seqedit.locate.stats import collect_stats, layer_stats, token_windows
from seqedit.locate.trace import shadow_forward
from seqedit.steps import StepReport
from seqedit.models import load as load_mod
from seqedit.models.load import as_loaded, load_model, parse_device_map
from seqedit.models.placement import HOST
from seqedit.shared_data import wikitext_path
from seqedit.locate.fused_blocks import unsupported
from seqedit.testing import tiny_model

SRC = Path(__file__).resolve().parents[2] / "src" / "seqedit"
LAYERS = (1, 2)
# v_upper_blocks="modules": models with accelerate hooks run their own modules in the value pass, and the
# placements compared here must run the same floating-point operations as the plain model
HP = dict(layers=LAYERS, stats_tokens=1000, v_steps=3, lam=10.0, n_context_templates=2, v_upper_blocks="modules")
FACTS = [
    Fact(prompt="{} is located in", subject="Danielle Darrieux", target="Rome"),
    Fact(prompt="The capital of {} is", subject="Spain", target="Paris"),
]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh cache: Σ₀ and templates are computed on the model under test, not read back."""
    path = tmp_path / "cache"
    monkeypatch.setenv("SEQEDIT_CACHE", str(path))
    return path


def _device_map(lm, disk_block: int) -> dict[str, str]:
    """Every top-level module and every decoder block on the CPU, block ``disk_block`` on disk."""
    layers = lm.adapter.spec.layers
    parent = layers.rsplit(".", 1)[0]
    dm = {}
    for name, _ in lm.model.get_submodule(parent).named_children():
        full = f"{parent}.{name}"
        if full == layers:
            dm |= {f"{full}.{i}": "disk" if i == disk_block else "cpu" for i in range(lm.adapter.n_layers)}
        else:
            dm[full] = "cpu"
    dm |= {name: "cpu" for name, _ in lm.model.named_children() if name != parent}
    return dm


def _edit(lm, monkeypatch, cache_root: Path, **kw) -> Editor:
    monkeypatch.setenv("SEQEDIT_CACHE", str(cache_root))
    editor = Editor(lm, **HP, **kw)
    editor.apply(FACTS)
    return editor


def _logits(lm) -> torch.Tensor:
    ids = lm.tokenizer(["Danielle Darrieux is located in"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return lm.model(input_ids=ids.to(lm.input_device)).logits.float()


# ----------------------------------------------------------------------- accelerate-dispatched models


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_dispatched_model_edits_like_the_plain_one_and_keeps_its_hooks(family, tmp_path, monkeypatch) -> None:
    plain = tiny_model(family)
    other = tiny_model(family)
    model = dispatch_model(other.model, _device_map(other, disk_block=3), offload_dir=str(tmp_path / "off"),
                           force_hooks=True)
    lm = as_loaded(model, other.tokenizer)
    blocks = list(lm.adapter.blocks)
    assert lm.fingerprint == plain.fingerprint  # the disk-offloaded block is read from its offloaded copy
    assert lm.adapter.ffn_out(3).weight.is_meta

    ref = _edit(plain, monkeypatch, tmp_path / "a")
    got = _edit(lm, monkeypatch, tmp_path / "b")
    for l in LAYERS:
        torch.testing.assert_close(got.master[l], ref.master[l], rtol=1e-5, atol=1e-9)
        assert got.bank.deployed_matches(l)
    torch.testing.assert_close(_logits(lm), _logits(plain), rtol=1e-5, atol=1e-5)

    # the replay of lower blocks put accelerate's forward back: every block's hook still runs
    calls = []
    for i, b in enumerate(blocks):
        assert "forward" in b.__dict__ and hasattr(b, "_old_forward"), f"block {i} lost accelerate's forward"
        pre = b._hf_hook.pre_forward
        b._hf_hook.pre_forward = lambda m, *a, _i=i, _pre=pre, **k: (calls.append(_i), _pre(m, *a, **k))[1]
    _logits(lm)
    assert calls == list(range(len(blocks)))
    # a disk-offloaded edited layer is refused, before anything is written
    with pytest.raises(PlacementError, match="offloaded to disk"):
        lm.adapter.set_weight(3, torch.zeros(lm.adapter.dims(3), dtype=torch.float64))


def test_cpu_offloaded_model_is_edited_in_its_offloaded_copy(tmp_path, monkeypatch) -> None:
    plain = tiny_model("llama")
    other = tiny_model("llama")
    lm = as_loaded(cpu_offload(other.model, execution_device=HOST), other.tokenizer)
    assert lm.adapter.ffn_out(1).weight.is_meta and lm.fingerprint == plain.fingerprint
    assert "meta device" in unsupported(lm, 1)  # offloaded weights: the value pass runs the modules
    ref = _edit(plain, monkeypatch, tmp_path / "a")
    got = _edit(lm, monkeypatch, tmp_path / "b")
    for l in LAYERS:
        torch.testing.assert_close(got.master[l], ref.master[l], rtol=1e-5, atol=1e-9)
        assert got.bank.deployed_matches(l)  # the offloaded copy holds the edit
    torch.testing.assert_close(_logits(lm), _logits(plain), rtol=1e-5, atol=1e-5)


def test_shadowed_forward_restores_an_instance_forward_and_the_class_one() -> None:
    hooked, plain = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    own = lambda x: x * 0  # noqa: E731  (an instance forward, as accelerate installs)
    hooked.forward = own
    with shadow_forward([hooked, plain], lambda x: x + 1):
        assert hooked(torch.zeros(2)).tolist() == [1.0, 1.0] and plain(torch.zeros(2)).tolist() == [1.0, 1.0]
    assert hooked.forward is own and "forward" not in plain.__dict__


# ----------------------------------------------------------------------------- write refusals


def test_set_weight_refuses_quantized_and_meta_weights() -> None:
    lm = tiny_model("llama")
    module = lm.adapter.ffn_out(1)
    d = lm.adapter.dims(1)
    module.weight = torch.nn.Parameter(torch.zeros(d, dtype=torch.int8), requires_grad=False)
    with pytest.raises(PlacementError, match="quantized"):
        lm.adapter.set_weight(1, torch.ones(d, dtype=torch.float64))
    assert not module.weight.any()
    module.weight = torch.nn.Parameter(torch.empty(d, device="meta"))
    with pytest.raises(PlacementError, match="meta device"):
        lm.adapter.set_weight(1, torch.ones(d, dtype=torch.float64))


# ----------------------------------------------------------------------------- dtypes and the master


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_apply(dtype, cache) -> None:
    lm = tiny_model("llama", dtype=dtype)
    editor = Editor(lm, **HP)
    report = editor.apply(FACTS)
    assert report.final_residual < report.target_norm
    for l in LAYERS:
        assert editor.master[l].dtype == torch.float64 and lm.adapter.weight(l).dtype == dtype
        assert editor.bank.deployed_matches(l) and editor.delta(l).norm() > 0


def test_float64_master_keeps_updates_smaller_than_the_models_resolution() -> None:
    lm = tiny_model("llama", dtype=torch.bfloat16)
    bank = LayerBank(lm.adapter, Editor(lm, **HP).spec, (1,), 10.0)
    d_in = lm.adapter.dims(1)[1]
    bank.init({1: torch.eye(d_in, dtype=torch.float64)})
    W0 = bank.w0[1]
    step = torch.full_like(W0, 2e-5)  # under half a bf16 spacing for almost every |w| > 0.006
    dropped = lm.adapter.weight(1).clone()
    for _ in range(100):
        bank.write(1, step)
        dropped = (dropped.double() + step).to(torch.bfloat16)  # what a model without a master would hold
    live = lm.adapter.weight(1)
    assert torch.equal(live, (W0 + 100 * step).to(torch.bfloat16))
    moved = (live.double() - W0).mean().item()
    assert abs(moved - 2e-3) < 2e-4  # the 100 small updates all arrived
    assert (dropped.double() - W0).mean().item() < 1e-3  # rounding them one by one loses most of them


def _bf16_ledger(tmp_path) -> tuple[Path, Editor, StepReport]:
    """A tiny bf16 llama saved as an HF directory, loaded from it in bf16, and one step journalled
    into a ledger at ``tmp_path / "L"``; returns the ledger, its closed editor and the step's report."""
    src = tiny_model("llama", dtype=torch.bfloat16)
    model_dir = tmp_path / "bf16-model"
    src.model.save_pretrained(model_dir)
    src.tokenizer.save_pretrained(model_dir)
    ledger = tmp_path / "L"
    with Editor(load_model(str(model_dir), dtype="bfloat16", device_map="cpu"), ledger=ledger, **HP) as editor:
        report = editor.apply(FACTS)
    return ledger, editor, report


def test_bf16_ledger_reopens_from_the_cli(tmp_path, cache) -> None:
    from seqedit.cli import app

    ledger, editor, report = _bf16_ledger(tmp_path)
    assert editor.steps[-1].constraints == {} and set(report.constraints) == set(LAYERS)  # K/V not kept
    result = CliRunner().invoke(app, ["verify", "--ledger", str(ledger), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["ok"] is True
    result = CliRunner().invoke(app, ["verify", "--ledger", str(ledger), "--dtype", "float32"])
    assert result.exit_code == 2 and "fingerprint" in result.output  # the dtype is part of the base


def test_serve_loads_a_bf16_ledger_in_its_recorded_dtype(tmp_path, cache) -> None:
    from seqedit.serve.app import default_loader
    from seqedit.serve.config import ServeConfig

    ledger, _, _ = _bf16_ledger(tmp_path)
    served = default_loader(ServeConfig(ledger=ledger))()  # the worker then reopens the ledger on it
    assert served.model.dtype == torch.bfloat16
    with Editor(served, ledger=ledger) as editor:  # the base fingerprint (dtype included) matches
        assert editor.verify().ok


# ----------------------------------------------------------------------------- loading and settings


def test_fingerprint_is_cached_per_checkpoint(tmp_path, cache, monkeypatch) -> None:
    src = tiny_model("llama")
    src.model.save_pretrained(tmp_path / "m")
    src.tokenizer.save_pretrained(tmp_path / "m")
    calls = []
    real = load_mod.fingerprint_model
    monkeypatch.setattr(load_mod, "fingerprint_model", lambda m: calls.append(1) or real(m))
    first = load_model(str(tmp_path / "m"), device_map="cpu")
    again = load_model(str(tmp_path / "m"), device_map="cpu")
    assert first.fingerprint == again.fingerprint == src.fingerprint and len(calls) == 1
    half = load_model(str(tmp_path / "m"), dtype="bf16", device_map="cpu")
    assert half.fingerprint != first.fingerprint and len(calls) == 2  # another dtype, another entry

    # a hub id is cached through its snapshot directory in the HF cache
    import huggingface_hub.constants as hub

    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    src.model.save_pretrained(repo / "snapshots" / ("a" * 40))
    src.tokenizer.save_pretrained(repo / "snapshots" / ("a" * 40))
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fingerprints = {load_model("org/tiny", device_map="cpu").fingerprint for _ in range(2)}
    assert fingerprints == {src.fingerprint} and len(calls) == 3


def test_device_map_and_dtype_settings_are_checked() -> None:
    assert parse_device_map('{"model.layers.0": "cpu", "lm_head": 0}') == {"model.layers.0": "cpu", "lm_head": 0}
    assert parse_device_map("auto") == "auto" and parse_device_map(None) is None
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_device_map("{model: cpu}")
    for bad in (dict(dtype="float13"), dict(device_map="{oops")):
        with pytest.raises(EvalSettingsError, match=next(iter(bad))):
            EvalConfig(**bad).validate()
    EvalConfig(dtype="bf16", device_map="auto").validate()


def test_solve_device_follows_the_layers_accelerator() -> None:
    class Where:
        def __init__(self, device: str) -> None:
            self.dev = torch.device(device)

        def device(self, layer: int) -> torch.device:
            return self.dev

    assert default_solve_device(Where("cuda:1"), 0) == torch.device("cuda", 1)
    assert default_solve_device(Where("meta"), 0) == HOST  # offloaded: solve on the host
    assert default_solve_device(Where("cpu"), 0) == HOST
    lm = tiny_model("llama")
    editor = Editor(lm, **HP)
    assert set(editor.bank.solve_device.values()) == {HOST}


def test_a_solve_state_too_large_for_its_gpu_is_refused_before_any_allocation(monkeypatch) -> None:
    import seqedit.bank as bank_mod

    lm = tiny_model("llama")
    bank = LayerBank(lm.adapter, Editor(lm, **HP).spec, LAYERS, 10.0, solve_device="cuda:0")
    assert bank.state_bytes() == {torch.device("cuda", 0): 2 * 8 * (3 * 64 * 64 + 2 * 32 * 64)}
    monkeypatch.setattr(bank_mod, "free_bytes", lambda device: 1000)
    with pytest.raises(PlacementError, match="solve_device='cpu'"):
        bank.init({l: torch.eye(64, dtype=torch.float64) for l in LAYERS})
    assert not bank.ready and not bank.master


# ----------------------------------------------------------------------------- Σ₀ in bounded memory


def test_stats_chunks_give_the_same_gram_and_a_too_large_config_fails_first(tmp_path, cache, monkeypatch) -> None:
    lm = tiny_model("llama")
    text = wikitext_path("valid").read_text(encoding="utf-8")[:20_000]
    windows = token_windows(lm.tokenizer, text, 800, 64)
    whole = collect_stats(lm, LAYERS, windows, batch_size=4)
    chunked = collect_stats(lm, LAYERS, windows, batch_size=4, chunk_tokens=7)
    for l in LAYERS:
        torch.testing.assert_close(chunked[l].gram, whole[l].gram, rtol=1e-12, atol=0)
    need = stats_mod.stats_memory(lm, LAYERS, 7)
    assert need == {HOST: 2 * 8 * 64 * 64 + 8 * 7 * 64}

    corpus = tmp_path / "c.txt"
    corpus.write_text(text, encoding="utf-8")
    monkeypatch.setattr(stats_mod, "free_bytes", lambda device: 1000)
    monkeypatch.setattr(stats_mod, "token_windows", lambda *a, **k: pytest.fail("worked before refusing"))
    with pytest.raises(PlacementError, match="GiB of float64 accumulators"):
        layer_stats(lm, LAYERS, corpus, 800, 64)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_data_parallel_stats_equal_single_process(tmp_path, cache) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        import stats_dist_worker as worker
    finally:
        sys.path.pop(0)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(wikitext_path("valid").read_text(encoding="utf-8")[:30_000], encoding="utf-8")
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, worker.__file__, str(r), "2", str(port), str(corpus),
                               str(tmp_path / f"rank{r}.safetensors")], env=env) for r in range(2)]
    assert [p.wait(timeout=180) for p in procs] == [0, 0]

    lm = tiny_model("llama")
    windows = token_windows(lm.tokenizer, corpus.read_text(encoding="utf-8"), worker.N_TOKENS, worker.SEQ_LEN)
    single = collect_stats(lm, worker.LAYERS, windows, batch_size=worker.BATCH)
    for r in range(2):
        got = load_file(str(tmp_path / f"rank{r}.safetensors"))
        for l in worker.LAYERS:
            ref = single[l].gram
            assert int(got[f"count{l}"]) == single[l].count
            assert ((got[f"gram{l}"] - ref).norm() / ref.norm()).item() < 1e-12
    written = sorted(p.name for p in (cache / "stats").iterdir())
    assert len(written) == len(worker.LAYERS)  # rank 0 wrote the cache, once per layer


# ----------------------------------------------------------------------------- structural check

# Device and dtype paths: where a stray host literal or a hard-coded float32 would pin work to the CPU
# or lose precision on a real model. Each allowed occurrence is named with its reason.
_DEVICE_PATHS = ("bank.py", "editor.py", "pipeline.py", "locate/keys.py", "locate/stats.py", "locate/trace.py",
                 "locate/templates.py", "locate/values.py", "models/arch.py", "models/load.py",
                 "models/placement.py", "ledger/session.py")
_ALLOWED = {
    ("models/placement.py", "cpu"): "HOST, the one spelling of the host device",
    ("models/load.py", "float32"): "load_model's documented default dtype, and the GGUF dequantisation",
    ("locate/values.py", "float32"): "δ and its optimiser state are float32 by design",
}


def _literals(path: Path) -> list[tuple[str, int]]:
    """``("cpu", line)`` for each bare ``"cpu"`` string, ``("float32", line)`` for each ``torch.float32``,
    ``("parameters", line)`` for each ``next(<x>.parameters())``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Constant) and node.value == "cpu":
            found.append(("cpu", node.lineno))
        elif isinstance(node, ast.Attribute) and node.attr == "float32" and getattr(node.value, "id", "") == "torch":
            found.append(("float32", node.lineno))
        elif (isinstance(node, ast.Call) and getattr(node.func, "id", "") == "next" and node.args
              and isinstance(node.args[0], ast.Call) and getattr(node.args[0].func, "attr", "") == "parameters"):
            found.append(("parameters", node.lineno))
    return found


def test_no_stray_device_or_dtype_literals() -> None:
    stray = []
    for rel in _DEVICE_PATHS:
        for kind, line in _literals(SRC / rel):
            if (rel, kind) in _ALLOWED or (kind == "parameters" and rel == "models/placement.py"):
                continue
            stray.append(f"{rel}:{line}: {kind}")
    assert not stray, "device/dtype literals outside models/placement.py: " + ", ".join(stray)
    # everything else that needs a device asks the model where it lives
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).as_posix()
        if rel != "models/placement.py":
            assert not [l for k, l in _literals(path) if k == "parameters"], f"{rel} guesses the device"


def test_cli_dtype_and_device_map_options(tmp_path, cache) -> None:
    from seqedit.cli import app

    src = tiny_model("llama")
    src.model.save_pretrained(tmp_path / "m")
    src.tokenizer.save_pretrained(tmp_path / "m")
    run = CliRunner().invoke
    ok = run(app, ["generate", "Hello", "-m", str(tmp_path / "m"), "--dtype", "bf16", "--device-map",
                   '{"": "cpu"}', "--max-new-tokens", "2", "--json"])
    assert ok.exit_code == 0, ok.output
    for flag, value in (("--dtype", "float13"), ("--device-map", "{oops")):
        bad = run(app, ["generate", "Hello", "-m", str(tmp_path / "m"), flag, value])
        assert bad.exit_code == 2 and "error:" in bad.output and value in bad.output and "Traceback" not in bad.output
