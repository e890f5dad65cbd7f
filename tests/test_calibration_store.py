"""The calibration store: what `qplan run` measured on this machine corrects later plans."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from qplan import api
from qplan.cli import cli
from qplan.planner import store as S
from qplan.planner.config import TrainConfig
from qplan.runner import protocol as P

CFG = TrainConfig(seq_len=2048, batch_size=2, grad_accum=8, grad_ckpt=True, packed_rows=True)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("QPLAN_HOME", str(tmp_path))
    monkeypatch.delenv("QPLAN_NO_CALIBRATION", raising=False)
    api._STORES.clear()
    yield tmp_path
    api._STORES.clear()


def _record(model="llama-3.1-8b", gpu="rtx-4090", cfg=CFG, mem_ratio=1.2, speed_ratio=0.8,
            simulated=False):
    m, g = api.get_model(model), api.get_gpu(gpu)
    est = api.estimate(m, g, cfg, use_calibration=False)
    static = sum(t.bytes for t in est.memory.terms if t.key in (
        "base_weights_4bit", "unquantized_weights", "lora_adapters", "gradients",
        "optimizer_states", "libraries")) / 2**30
    dyn = est.memory.peak_gib - static - est.memory.term("cuda_context").gib
    measured = {"nvml_peak_gib": static + dyn * mem_ratio + 0.55, "cuda_context_gib": 0.55,
                "device": "NVIDIA GeForce RTX 4090"}
    return S.attempt_record(gpu=g.name, model=m, memory=est.memory, speed=est.speed,
                            measured=measured,
                            steady_tokens_per_s=est.speed.tokens_per_s * speed_ratio,
                            simulated=simulated), est


def test_record_measures_the_dynamic_part(home):
    rec, est = _record(mem_ratio=1.25)
    assert rec["measured_dynamic_gib"] == pytest.approx(1.25 * rec["estimated_dynamic_gib"], rel=1e-3)
    assert rec["regime"] == est.memory.regime and rec["arch"].startswith("llama:h4096")


def test_nothing_recorded_without_nvml(home):
    m, g = api.get_model("llama-3.1-8b"), api.get_gpu("rtx-4090")
    est = api.estimate(m, g, CFG)
    assert S.attempt_record(gpu=g.name, model=m, memory=est.memory, speed=est.speed,
                            measured={"device": "cpu"}, steady_tokens_per_s=None) is None


def test_a_recorded_run_corrects_later_estimates_of_that_regime_only(home):
    rec, before = _record(mem_ratio=1.2, speed_ratio=0.8)
    S.Store().add(rec)
    api._STORES.clear()
    m, g = api.get_model("llama-3.1-8b"), api.get_gpu("rtx-4090")
    after = api.estimate(m, g, CFG)
    assert after.memory.peak_bytes > before.memory.peak_bytes
    assert after.speed.tokens_per_s == pytest.approx(0.8 * before.speed.tokens_per_s, rel=1e-3)
    # switched off: the model's own figures
    off = api.estimate(m, g, CFG, use_calibration=False)
    assert off.memory.peak_bytes == before.memory.peak_bytes
    # another GPU, another regime: untouched
    assert (api.estimate(m, api.get_gpu("rtx-3090"), CFG).memory.peak_bytes
            == api.estimate(m, api.get_gpu("rtx-3090"), CFG, use_calibration=False).memory.peak_bytes)
    other = CFG.with_(grad_ckpt=False, batch_size=1)
    assert (api.estimate(m, g, other).memory.peak_bytes
            == api.estimate(m, g, other, use_calibration=False).memory.peak_bytes)


def test_corrections_never_lower_memory_and_are_clamped(home):
    st = S.Store()
    low, _ = _record(mem_ratio=0.5, speed_ratio=5.0)
    st.add(low)
    c = st.correction(low["gpu"], low["arch"], low["regime"])
    assert c.memory_factor == S.MEMORY_FACTOR_RANGE[0]
    assert c.speed_factor == S.SPEED_FACTOR_RANGE[1]
    wild, _ = _record(mem_ratio=9.0)
    st.add(wild)
    assert st.correction(low["gpu"], low["arch"], low["regime"]).memory_factor == S.MEMORY_FACTOR_RANGE[1]


def test_simulated_cards_do_not_correct_speed(home):
    st = S.Store()
    rec, _ = _record(speed_ratio=0.5, simulated=True)
    st.add(rec)
    assert st.correction(rec["gpu"], rec["arch"], rec["regime"]).speed_factor == 1.0


def test_environment_switch_and_torn_lines(home, monkeypatch):
    rec, before = _record(mem_ratio=1.3)
    st = S.Store()
    st.add(rec)
    with open(st.path, "a") as f:
        f.write('{"version": 1, "gpu": "rtx-4090", "arch"')  # a killed writer's half line
    assert len(S.Store().records()) == 1
    monkeypatch.setenv("QPLAN_NO_CALIBRATION", "1")
    api._STORES.clear()
    m, g = api.get_model("llama-3.1-8b"), api.get_gpu("rtx-4090")
    assert api.estimate(m, g, CFG).memory.peak_bytes == before.memory.peak_bytes


def test_calibrate_cli_show_and_reset(home):
    rec, _ = _record()
    S.Store().add(rec)
    r = CliRunner().invoke(cli, ["calibrate", "--show", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["records"] == 1 and d["corrections"][0]["memory_factor"] > 1.0
    r = CliRunner().invoke(cli, ["calibrate"])
    assert r.exit_code == 0 and "rtx-4090" in r.output
    r = CliRunner().invoke(cli, ["calibrate", "--reset", "--json"])
    assert json.loads(r.output)["removed"] == 1
    r = CliRunner().invoke(cli, ["calibrate"])
    assert "no runs recorded yet" in r.output


def test_estimate_cli_is_corrected_unless_told_not_to(home):
    args = ["estimate", "--model", "llama-3.1-8b", "--gpu", "rtx-4090", "--seq", "2048",
            "--batch", "2", "--grad-accum", "8", "--grad-ckpt", "--json"]
    off = json.loads(CliRunner().invoke(cli, args + ["--no-calibration"]).output)
    rec, _ = _record(cfg=TrainConfig.from_dict(off["settings"]), mem_ratio=1.3)
    S.Store().add(rec)
    api._STORES.clear()
    on = json.loads(CliRunner().invoke(cli, args).output)
    assert on["peak_gib"] > off["peak_gib"]
    again = json.loads(CliRunner().invoke(cli, args + ["--no-calibration"]).output)
    assert again["peak_gib"] == off["peak_gib"]


def _fake_run(use_calibration=True):
    m, g = api.get_model("llama-3.1-8b"), api.get_gpu("rtx-4090")
    notes = []
    return SimpleNamespace(req=SimpleNamespace(use_calibration=use_calibration), profile=m,
                           gpu=g, pm=None, notify=notes.append, notes=notes,
                           state=SimpleNamespace(data={}), runs_on=None)


def _attempt(measured: P.Measured | None, status="ok"):
    spec = SimpleNamespace(settings=CFG)
    res = SimpleNamespace(status=status, measured=measured, steady_tokens_per_s=1234.0,
                          simulate=None)
    return SimpleNamespace(spec=spec, result=res)


def test_runner_records_each_gpu_attempt(home):
    from qplan.runner.run import _calibrate

    gpu_measured = P.Measured(device="NVIDIA GeForce RTX 4090", host_rss_peak_gib=3.0,
                              peak_reserved_gib=12.0, peak_allocated_gib=11.0,
                              nvml_peak_gib=13.5, cuda_context_gib=0.55)
    _calibrate(_fake_run(), _attempt(gpu_measured))
    recs = S.Store().records()
    assert len(recs) == 1 and recs[0]["measured_tokens_per_s"] == 1234.0
    assert recs[0]["status"] == "ok" and recs[0]["gpu"] == "rtx-4090"
    # an out-of-memory attempt records its memory, not its speed
    _calibrate(_fake_run(), _attempt(gpu_measured, status="oom"))
    assert S.Store().records()[-1]["measured_tokens_per_s"] is None
    # CPU attempts and --no-calibration record nothing
    _calibrate(_fake_run(), _attempt(P.Measured(device="cpu", host_rss_peak_gib=2.0)))
    _calibrate(_fake_run(use_calibration=False), _attempt(gpu_measured))
    assert len(S.Store().records()) == 2


def test_runner_survives_an_unwritable_home(home, monkeypatch):
    from qplan.runner.run import _calibrate

    def refuse(self, record):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(S.Store, "add", refuse)
    run = _fake_run()
    m = P.Measured(device="NVIDIA H200", host_rss_peak_gib=3.0, nvml_peak_gib=13.5,
                   cuda_context_gib=0.55)
    _calibrate(run, _attempt(m))
    assert "could not write the calibration store" in run.notes[0]


def test_a_simulated_run_teaches_the_real_gpus_speed(home):
    """Under --simulate-gpu the card's record keeps the memory (its speed is not the card's);
    a speed-only record of the GPU that trained carries the steady tokens/s against the
    prediction for that GPU, and corrects later speed estimates there, not memory."""
    from qplan.runner.run import _calibrate

    run = _fake_run()
    run.gpu = api.get_gpu("rtx-4060")
    run.runs_on = api.get_gpu("h200")
    m = P.Measured(device="NVIDIA H200", host_rss_peak_gib=3.0, nvml_peak_gib=7.0,
                   cuda_context_gib=0.6)
    att = _attempt(m)
    att.result.simulate = object()  # simulated
    _calibrate(run, att)
    recs = S.Store().records()
    assert [r["gpu"] for r in recs] == ["rtx-4060", "h200"]
    assert recs[0]["simulated"] and recs[1]["speed_only"] and not recs[1]["simulated"]
    real = api.estimate(run.profile, run.runs_on, CFG, use_calibration=False)
    assert recs[1]["predicted_tokens_per_s"] == pytest.approx(real.speed.tokens_per_s, rel=1e-3)
    c = S.Store().correction("h200", recs[1]["arch"], recs[1]["regime"])
    assert c.memory_factor == 1.0
    assert c.speed_factor == pytest.approx(
        max(S.SPEED_FACTOR_RANGE[0], 1234.0 / recs[1]["predicted_tokens_per_s"]), rel=1e-3)
    card = S.Store().correction("rtx-4060", recs[0]["arch"], recs[0]["regime"])
    assert card.speed_factor == 1.0  # a simulated card's speed is not the card's
