"""The runner estimates the rows its data makes: plans assume packed rows (a seq x seq mask);
when every example is longer than the sequence each row is one whole example and no mask is
built, so the report, the re-plan threshold and the calibration store use the unpacked estimate."""
from qplan import api
from qplan.planner.config import TrainConfig
from qplan.runner.run import rows_as_run


def test_rows_of_truncated_examples_are_unpacked():
    cfg = TrainConfig(seq_len=40960, packed_rows=True)
    assert rows_as_run(cfg, {"examples": 18, "train_truncated": 18}).packed_rows is False


def test_short_examples_stay_packed_and_unknown_data_changes_nothing():
    cfg = TrainConfig(seq_len=4096, packed_rows=True)
    assert rows_as_run(cfg, {"examples": 100, "train_truncated": 3}).packed_rows is True
    assert rows_as_run(cfg, {"examples": 0, "train_truncated": 0}) == cfg
    assert rows_as_run(cfg, None) == cfg
    off = cfg.with_(packed_rows=False)
    assert rows_as_run(off, {"examples": 5, "train_truncated": 5}) == off


def test_the_unpacked_estimate_is_lower_at_long_sequences():
    m, gpu = api.get_model("qwen3-0.6b"), api.get_gpu("rtx-3060")
    cfg = TrainConfig(seq_len=40960, grad_ckpt=True, offload_activations=True, loss="fused",
                      packed_rows=True)
    packed = api.estimate(m, gpu, cfg, use_calibration=False).memory.peak_bytes
    run = api.estimate(m, gpu, rows_as_run(cfg, {"examples": 9, "train_truncated": 9}),
                       use_calibration=False).memory.peak_bytes
    assert run < 0.8 * packed
